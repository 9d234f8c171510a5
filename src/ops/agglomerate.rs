//! The region graph of a fragment volume and mean-affinity agglomeration (waterz's
//! `OneMinus<MeanAffinity>` scoring: merge the pair with the highest mean affinity while
//! `1 - mean < threshold`).
//!
//! Affinities are summed as fixed-point integers (2^-24 units, [`quantize`]) so that the sum over
//! an edge is exact and independent of the order voxels are visited in: on the GPU's atomics, on
//! the CPU, and over any chunking. The mean differs from a float mean by at most 2^-25.

use crate::hash::IdBuildHasher;
use crate::ops::union_find::{number_by_first_voxel, UnionFind};
use crate::ops::watershed::Affinities;
use std::cmp::Ordering;
use std::collections::HashMap;

/// Fixed-point units per affinity 1.0.
pub const AFFINITY_ONE: f64 = (1u64 << 24) as f64;

/// An affinity as fixed point: clamped to [0, 1], times 2^24, rounded half to even (WGSL's
/// `round`).
pub fn quantize(a: f32) -> u32 {
    let a = if a.is_nan() { 0.0 } else { a.clamp(0.0, 1.0) };
    (a * 16_777_216.0).round_ties_even() as u32
}

/// The voxel edges between two fragments: how many, and their summed fixed-point affinity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeStats {
    pub count: u64,
    pub sum: u64,
}

impl EdgeStats {
    pub fn add(&mut self, other: EdgeStats) {
        self.count += other.count;
        self.sum += other.sum;
    }

    pub fn mean(&self) -> f64 {
        self.sum as f64 / (self.count as f64 * AFFINITY_ONE)
    }
}

/// Fragment pairs `(a, b)`, a < b, to their edge statistics.
pub type RegionGraph = HashMap<(u32, u32), EdgeStats, IdBuildHasher>;

/// The region graph of `fragments` (0 = background, never an edge) on the CPU.
pub fn region_graph_cpu(aff: &Affinities, fragments: &[u32]) -> RegionGraph {
    let s = aff.shape;
    let mut graph = RegionGraph::default();
    let strides = [1, s[0], s[0] * s[1]];
    for z in 0..s[2] {
        for y in 0..s[1] {
            for x in 0..s[0] {
                let i = x + s[0] * (y + s[1] * z);
                let a = fragments[i];
                if a == 0 {
                    continue;
                }
                for (c, at) in [x, y, z].into_iter().enumerate() {
                    if at == 0 {
                        continue;
                    }
                    let b = fragments[i - strides[c]];
                    if b != 0 && b != a {
                        let e = graph.entry((a.min(b), a.max(b))).or_default();
                        e.add(EdgeStats {
                            count: 1,
                            sum: quantize(aff.channels[c][i]) as u64,
                        });
                    }
                }
            }
        }
    }
    graph
}

/// Neighbour region -> edge id. Most regions have a handful of neighbours (fragments ~8), where
/// a linear scan of a short vector beats hashing and allocates once; regions that grow past
/// [`Adjacency::SMALL`] neighbours switch to a hash map.
#[derive(Clone, Debug)]
enum Adjacency {
    Small(Vec<(u32, u32)>),
    Large(HashMap<u32, u32, IdBuildHasher>),
}

impl Default for Adjacency {
    fn default() -> Self {
        Adjacency::Small(Vec::new())
    }
}

impl Adjacency {
    const SMALL: usize = 24;

    fn with_capacity(neighbours: usize) -> Adjacency {
        if neighbours <= Self::SMALL {
            Adjacency::Small(Vec::with_capacity(neighbours))
        } else {
            let mut map = HashMap::default();
            map.reserve(neighbours);
            Adjacency::Large(map)
        }
    }

    fn len(&self) -> usize {
        match self {
            Adjacency::Small(v) => v.len(),
            Adjacency::Large(m) => m.len(),
        }
    }

    fn get(&self, region: u32) -> Option<u32> {
        match self {
            Adjacency::Small(v) => v.iter().find(|e| e.0 == region).map(|e| e.1),
            Adjacency::Large(m) => m.get(&region).copied(),
        }
    }

    /// Adds a neighbour that is not there yet.
    fn insert(&mut self, region: u32, edge: u32) {
        match self {
            Adjacency::Small(v) if v.len() < Self::SMALL => v.push((region, edge)),
            Adjacency::Small(v) => {
                let mut map: HashMap<u32, u32, IdBuildHasher> = v.drain(..).collect();
                map.insert(region, edge);
                *self = Adjacency::Large(map);
            }
            Adjacency::Large(m) => {
                m.insert(region, edge);
            }
        }
    }

    fn remove(&mut self, region: u32) {
        match self {
            Adjacency::Small(v) => {
                if let Some(at) = v.iter().position(|e| e.0 == region) {
                    v.swap_remove(at);
                }
            }
            Adjacency::Large(m) => {
                m.remove(&region);
            }
        }
    }

    /// Renames neighbour `old` (which is there) to `new` (which is not), keeping its edge.
    fn rename(&mut self, old: u32, new: u32) {
        match self {
            Adjacency::Small(v) => {
                if let Some(e) = v.iter_mut().find(|e| e.0 == old) {
                    e.0 = new;
                }
            }
            Adjacency::Large(m) => {
                if let Some(edge) = m.remove(&old) {
                    m.insert(new, edge);
                }
            }
        }
    }

    fn into_entries(self) -> Vec<(u32, u32)> {
        match self {
            Adjacency::Small(v) => v,
            Adjacency::Large(m) => m.into_iter().collect(),
        }
    }
}

/// The state of an edge between two live regions (which ones: the adjacency maps know): its
/// version, or [`DEAD`]. Kept apart from the statistics, 4 bytes per edge: the queue's staleness
/// check reads it for every popped entry, most of them stale, at random.
const DEAD: u32 = u32::MAX;

/// The live regions a pushed pair now stands for (halving the merge chains it walks).
fn endpoints(merged_into: &mut [u32], pair: (u32, u32)) -> (u32, u32) {
    let mut live = |mut r: u32| {
        while merged_into[r as usize] != r {
            let next = merged_into[r as usize];
            merged_into[r as usize] = merged_into[next as usize];
            r = next;
        }
        r
    };
    (live(pair.0), live(pair.1))
}

/// An entry of the merge queue: an edge as it was when pushed. Entries of dead edges, or of an
/// older `version` of a live one, are skipped. Kept small: the queue's cost is memory traffic.
#[derive(Debug)]
struct Candidate {
    mean: f64,
    /// The edge's fragment pair when pushed: the tie-break among equal means.
    pair: (u32, u32),
    edge: u32,
    version: u32,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Highest mean first (means are exact sums over counts, rounded once to f64); among equal
    /// means the smallest pair first (a max-heap pops the greatest, so the pair order is
    /// reversed).
    fn cmp(&self, other: &Self) -> Ordering {
        self.mean
            .total_cmp(&other.mean)
            .then_with(|| other.pair.cmp(&self.pair))
            .then_with(|| self.version.cmp(&other.version))
    }
}

/// The merge queue: a radix heap. Agglomeration pops means in non-increasing order and only ever
/// pushes means no higher than the last one popped (a combined edge's mean is a weighted average
/// of two live edges' means), so a monotone queue applies: each entry moves down at most 64
/// buckets in its life, in sequential memory, where a binary heap of millions of entries spends
/// its time on cache misses. It pops exactly in [`Candidate`]'s order, ties included.
#[derive(Debug)]
struct MergeQueue {
    /// Bucket 0: entries whose key equals `last`, sorted so that the next to pop is at the end.
    /// Bucket i > 0: keys whose highest bit differing from `last` is bit i - 1.
    buckets: Vec<Vec<Candidate>>,
    last: u64,
    /// An empty vector with capacity, swapped in for a bucket being redistributed, so that
    /// buckets keep their allocations instead of growing again from nothing.
    spare: Vec<Candidate>,
}

impl MergeQueue {
    fn new() -> MergeQueue {
        MergeQueue {
            buckets: (0..=64).map(|_| Vec::new()).collect(),
            last: 0,
            spare: Vec::new(),
        }
    }

    /// Smaller keys pop first: the highest mean (means are non-negative, whose f64 bit patterns
    /// order like their values).
    fn key(c: &Candidate) -> u64 {
        u64::MAX - c.mean.to_bits()
    }

    fn bucket(&self, key: u64) -> usize {
        if key == self.last {
            0
        } else {
            64 - (key ^ self.last).leading_zeros() as usize
        }
    }

    fn push(&mut self, c: Candidate) {
        let key = Self::key(&c);
        debug_assert!(
            key >= self.last,
            "a merge queue only takes means up to the last popped"
        );
        match self.bucket(key) {
            0 => {
                let at = self.buckets[0].partition_point(|x| x < &c);
                self.buckets[0].insert(at, c);
            }
            b => self.buckets[b].push(c),
        }
    }

    fn pop(&mut self) -> Option<Candidate> {
        if self.buckets[0].is_empty() {
            let i = (1..=64).find(|&i| !self.buckets[i].is_empty())?;
            let mut moved =
                std::mem::replace(&mut self.buckets[i], std::mem::take(&mut self.spare));
            self.last = moved.iter().map(Self::key).min().expect("not empty");
            for c in moved.drain(..) {
                let b = self.bucket(Self::key(&c));
                self.buckets[b].push(c);
            }
            self.spare = moved;
            self.buckets[0].sort_unstable();
        }
        self.buckets[0].pop()
    }
}

/// What agglomeration did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeReport {
    pub merges: usize,
    pub segments: usize,
}

/// Merges fragments 1..=`fragments` along `graph` until the best pair's `1 - mean` reaches
/// `threshold`. Returns, per fragment id (index 0 = background), its segment id: segments are
/// numbered 1..N by their smallest fragment, so numbering fragments by first voxel numbers
/// segments by first voxel too.
pub fn agglomerate(fragments: u32, graph: &RegionGraph, threshold: f64) -> (Vec<u32>, MergeReport) {
    let n = fragments as usize + 1;
    // merged_into[r] = r for a live region, else the region it was merged into.
    let mut merged_into: Vec<u32> = (0..n as u32).collect();
    // Edges between live regions; an edge keeps its id when one end merges into another region
    // without a parallel edge there (its mean is unchanged: no new queue entry is needed).
    let mut stats_of: Vec<EdgeStats> = Vec::with_capacity(graph.len());
    let mut version_of: Vec<u32> = Vec::with_capacity(graph.len());
    let mut degree = vec![0usize; n];
    for &(a, b) in graph.keys() {
        degree[a as usize] += 1;
        degree[b as usize] += 1;
    }
    let mut adjacency: Vec<Adjacency> = degree.into_iter().map(Adjacency::with_capacity).collect();
    let mut initial = Vec::with_capacity(graph.len());
    for (&(a, b), &stats) in graph {
        let id = stats_of.len() as u32;
        stats_of.push(stats);
        version_of.push(0);
        adjacency[a as usize].insert(b, id);
        adjacency[b as usize].insert(a, id);
        initial.push(Candidate {
            mean: stats.mean(),
            pair: (a, b),
            edge: id,
            version: 0,
        });
    }
    let mut queue = MergeQueue::new();
    for c in initial {
        queue.push(c);
    }
    let mut report = MergeReport::default();
    while let Some(c) = queue.pop() {
        if version_of[c.edge as usize] != c.version {
            continue; // merged away (DEAD) or re-scored since
        }
        if 1.0 - c.mean >= threshold {
            break;
        }
        version_of[c.edge as usize] = DEAD;
        let (a, b) = endpoints(&mut merged_into, c.pair);
        // The region with more neighbours survives, so each merge costs the smaller adjacency.
        let (keep, gone) = if adjacency[a as usize].len() >= adjacency[b as usize].len() {
            (a, b)
        } else {
            (b, a)
        };
        merged_into[gone as usize] = keep;
        let moved = std::mem::take(&mut adjacency[gone as usize]).into_entries();
        adjacency[keep as usize].remove(gone);
        for (other, id) in moved {
            if other == keep {
                continue;
            }
            match adjacency[keep as usize].get(other) {
                Some(parallel) => {
                    adjacency[other as usize].remove(gone);
                    // Two edges become one: its statistics combine and it is scored again.
                    let absorbed = stats_of[id as usize];
                    version_of[id as usize] = DEAD;
                    let p = parallel as usize;
                    stats_of[p].add(absorbed);
                    version_of[p] += 1;
                    queue.push(Candidate {
                        mean: stats_of[p].mean(),
                        pair: (keep.min(other), keep.max(other)),
                        edge: parallel,
                        version: version_of[p],
                    });
                }
                None => {
                    // The edge moves to `keep` at both ends: renamed in place at `other`.
                    adjacency[keep as usize].insert(other, id);
                    adjacency[other as usize].rename(gone, keep);
                }
            }
        }
        report.merges += 1;
    }
    let mut sets = UnionFind::new(n);
    for (r, &into) in merged_into.iter().enumerate() {
        sets.union(r as u32, into);
    }
    let out = number_segments(&mut sets);
    report.segments = out.iter().max().copied().unwrap_or(0) as usize;
    (out, report)
}

/// Per fragment (index 0 = background) its segment: the sets of `sets` numbered 1..N by their
/// smallest fragment.
fn number_segments(sets: &mut UnionFind) -> Vec<u32> {
    let n = sets.len();
    let roots: Vec<Option<u32>> = (0..n as u32)
        .map(|f| (f > 0).then(|| sets.find(f)))
        .collect();
    number_by_first_voxel(roots.into_iter(), n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(affinities: &[f32]) -> EdgeStats {
        EdgeStats {
            count: affinities.len() as u64,
            sum: affinities.iter().map(|&a| quantize(a) as u64).sum(),
        }
    }

    #[test]
    fn quantization_is_exact_at_the_ends_and_rounds_to_even() {
        assert_eq!(quantize(1.0), 1 << 24);
        assert_eq!(quantize(0.0), 0);
        assert_eq!(quantize(-3.0), 0);
        assert_eq!(quantize(f32::NAN), 0);
        assert_eq!(quantize(0.5), 1 << 23);
        // 2.5 units rounds to 2, 3.5 to 4.
        assert_eq!(quantize(2.5 / 16_777_216.0), 2);
        assert_eq!(quantize(3.5 / 16_777_216.0), 4);
    }

    #[test]
    fn merges_best_first_and_rescoring_uses_combined_means() {
        // 1-2 strong, 2-3 weak, 1-3 medium: after 1+2 merge, the {1,2}-3 edge has mean
        // (0.2 + 0.6) / 2 = 0.4 and 1 - 0.4 = 0.6 < 0.7 merges it too; at 0.5 it does not.
        let mut g = RegionGraph::default();
        g.insert((1, 2), stats(&[0.9]));
        g.insert((2, 3), stats(&[0.2]));
        g.insert((1, 3), stats(&[0.6]));
        let (seg, r) = agglomerate(3, &g, 0.7);
        assert_eq!(seg, vec![0, 1, 1, 1]);
        assert_eq!(r.merges, 2);
        let (seg, r) = agglomerate(3, &g, 0.5);
        assert_eq!(seg, vec![0, 1, 1, 2]);
        assert_eq!(r.segments, 2);
    }

    #[test]
    fn an_edge_moved_to_the_surviving_region_is_still_merged_in_order() {
        // 1-2 merge first; the 2-3 edge then belongs to {1,2} without being queued again, and
        // must still come before the weaker 1-4 edge.
        let mut g = RegionGraph::default();
        g.insert((1, 2), stats(&[0.95]));
        g.insert((2, 3), stats(&[0.85]));
        g.insert((1, 4), stats(&[0.5]));
        let (seg, r) = agglomerate(4, &g, 0.4);
        assert_eq!(seg, vec![0, 1, 1, 1, 2]);
        assert_eq!(r.merges, 2);
        let (seg, _) = agglomerate(4, &g, 0.6);
        assert_eq!(seg, vec![0, 1, 1, 1, 1]);
    }

    /// Greedy merging the slow, obvious way: after every merge, regroup all original edges by
    /// the regions they now join and take the best mean (smaller pair on ties).
    fn agglomerate_naively(fragments: u32, graph: &RegionGraph, threshold: f64) -> Vec<u32> {
        let n = fragments as usize + 1;
        let mut sets = UnionFind::new(n);
        loop {
            let mut joined: HashMap<(u32, u32), EdgeStats> = HashMap::new();
            for (&(a, b), &stats) in graph {
                let (ra, rb) = (sets.find(a), sets.find(b));
                if ra != rb {
                    joined
                        .entry((ra.min(rb), ra.max(rb)))
                        .or_default()
                        .add(stats);
                }
            }
            let best = joined.iter().max_by(|x, y| {
                let (mx, my) = (
                    x.1.sum as u128 * y.1.count as u128,
                    y.1.sum as u128 * x.1.count as u128,
                );
                mx.cmp(&my).then_with(|| y.0.cmp(x.0))
            });
            match best {
                Some((&(a, b), stats)) if 1.0 - stats.mean() < threshold => {
                    sets.union(a, b);
                }
                _ => break,
            }
        }
        number_segments(&mut sets)
    }

    #[test]
    fn merges_like_naive_greedy_merging_on_random_graphs() {
        // Random sums and counts: equal means are improbable, so the tie rule does not matter
        // here. Merged regions grow well past Adjacency::SMALL neighbours.
        let mut state = 987654321u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (fragments, edges, threshold) in
            [(60u32, 200, 0.5), (400, 2400, 0.5), (400, 2400, 0.52)]
        {
            let mut g = RegionGraph::default();
            while g.len() < edges {
                let a = (next() % fragments as u64) as u32 + 1;
                let b = (next() % fragments as u64) as u32 + 1;
                if a != b {
                    let count = next() % 20 + 1;
                    let sum = (0..count).map(|_| next() % (1 << 24)).sum();
                    g.insert((a.min(b), a.max(b)), EdgeStats { count, sum });
                }
            }
            let (fast, report) = agglomerate(fragments, &g, threshold);
            assert_eq!(
                fast,
                agglomerate_naively(fragments, &g, threshold),
                "{fragments} fragments, threshold {threshold}"
            );
            assert!(report.merges > 10 && report.segments > 1, "{report:?}");
        }
    }

    #[test]
    fn the_merge_queue_pops_in_binary_heap_order() {
        use std::collections::BinaryHeap;
        // Means from a few levels (many ties) and pairs; pushes never exceed the last pop.
        let mut state = 12345u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut queue = MergeQueue::new();
        let mut heap = BinaryHeap::new();
        let candidate = |mean: f64, r: u64, version: u32| Candidate {
            mean,
            pair: ((r % 7) as u32, (r % 11) as u32 + 7),
            edge: (r % 1000) as u32,
            version,
        };
        for i in 0..2000 {
            let (mean, r) = ((next() % 50) as f64 / 49.0, next());
            queue.push(candidate(mean, r, i));
            heap.push(candidate(mean, r, i));
        }
        let mut popped = 0;
        while let Some(h) = heap.pop() {
            let q = queue.pop().expect("as many entries");
            assert_eq!((q.mean, q.pair, q.version), (h.mean, h.pair, h.version));
            popped += 1;
            // Push a few entries at or below the popped mean, as merges do.
            if popped % 3 == 0 {
                let r = next();
                let mean = h.mean * ((next() % 4) as f64 / 3.0);
                queue.push(candidate(mean, r, popped));
                heap.push(candidate(mean, r, popped));
            }
        }
        assert!(queue.pop().is_none());
        assert!(popped > 2500);
    }
}
