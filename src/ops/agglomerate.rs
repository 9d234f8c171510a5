//! The region graph of a fragment volume and mean-affinity agglomeration (waterz's
//! `OneMinus<MeanAffinity>` scoring: merge the pair with the highest mean affinity while
//! `1 - mean < threshold`).
//!
//! Affinities are summed as fixed-point integers (2^-24 units, [`quantize`]) so that the sum over
//! an edge is exact and independent of the order voxels are visited in: on the GPU's atomics, on
//! the CPU, and over any chunking. The mean differs from a float mean by at most 2^-25.

use crate::hash::{IdBuildHasher, IdMap};
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

/// A region's neighbours and the edges to them. Most regions have a handful: those live in the
/// region's own entry (one cache miss to reach, no allocation); up to [`Adjacency::SMALL`] in a
/// vector searched linearly; more in a hash map.
#[derive(Clone, Debug)]
enum Adjacency {
    Inline(u32, [(u32, u32); Adjacency::INLINE]),
    Small(Vec<(u32, u32)>),
    Large(IdMap),
}

/// An adjacency on a cache line of its own.
#[derive(Clone, Debug, Default)]
#[repr(align(64))]
struct Aligned(Adjacency);

impl std::ops::Deref for Aligned {
    type Target = Adjacency;
    fn deref(&self) -> &Adjacency {
        &self.0
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut Adjacency {
        &mut self.0
    }
}

const _: () = assert!(
    std::mem::size_of::<Adjacency>() == 64,
    "one cache line per region"
);

impl Default for Adjacency {
    fn default() -> Self {
        Adjacency::Inline(0, [(0, 0); Adjacency::INLINE])
    }
}

impl Adjacency {
    /// Seven entries and the length fill 64 bytes, one cache line.
    const INLINE: usize = 7;
    const SMALL: usize = 24;

    fn with_capacity(neighbours: usize) -> Adjacency {
        if neighbours <= Self::INLINE {
            Adjacency::default()
        } else if neighbours <= Self::SMALL {
            Adjacency::Small(Vec::with_capacity(neighbours))
        } else {
            Adjacency::Large(IdMap::with_capacity(neighbours))
        }
    }

    fn len(&self) -> usize {
        match self {
            Adjacency::Inline(len, _) => *len as usize,
            Adjacency::Small(v) => v.len(),
            Adjacency::Large(m) => m.len(),
        }
    }

    /// The entries of an inline or small adjacency; `None` for a map.
    fn list_mut(&mut self) -> Option<&mut [(u32, u32)]> {
        match self {
            Adjacency::Inline(len, entries) => Some(&mut entries[..*len as usize]),
            Adjacency::Small(v) => Some(v),
            Adjacency::Large(_) => None,
        }
    }

    /// Removes entry `at` of an inline or small adjacency (the last takes its place).
    fn swap_remove(&mut self, at: usize) {
        match self {
            Adjacency::Inline(len, entries) => {
                *len -= 1;
                entries[at] = entries[*len as usize];
            }
            Adjacency::Small(v) => {
                v.swap_remove(at);
            }
            Adjacency::Large(_) => unreachable!("maps remove by key"),
        }
    }

    /// Adds a neighbour that is not there yet.
    fn insert(&mut self, region: u32, edge: u32) {
        match self {
            Adjacency::Inline(len, entries) if (*len as usize) < Self::INLINE => {
                entries[*len as usize] = (region, edge);
                *len += 1;
            }
            Adjacency::Inline(_, entries) => {
                let mut v = Vec::with_capacity(2 * Self::INLINE);
                v.extend_from_slice(entries);
                v.push((region, edge));
                *self = Adjacency::Small(v);
            }
            Adjacency::Small(v) if v.len() < Self::SMALL => v.push((region, edge)),
            Adjacency::Small(v) => {
                let mut map = IdMap::with_capacity(2 * v.len());
                for (r, e) in v.drain(..) {
                    map.insert(r, e);
                }
                map.insert(region, edge);
                *self = Adjacency::Large(map);
            }
            Adjacency::Large(m) => {
                m.insert(region, edge);
            }
        }
    }

    /// The edge to neighbour `region`, to read and replace.
    fn get_mut(&mut self, region: u32) -> Option<&mut u32> {
        match self {
            Adjacency::Large(m) => m.get_mut(region),
            list => list
                .list_mut()
                .expect("a list")
                .iter_mut()
                .find(|e| e.0 == region)
                .map(|e| &mut e.1),
        }
    }

    /// Drops neighbour `gone` and points neighbour `keep` (both there) at `edge`, in one pass.
    fn drop_and_point(&mut self, gone: u32, keep: u32, edge: u32) {
        if let Adjacency::Large(m) = self {
            m.remove(gone);
            m.insert(keep, edge);
            return;
        }
        let (mut at, mut pointed) = (None, false);
        for (i, e) in self.list_mut().expect("a list").iter_mut().enumerate() {
            if e.0 == gone {
                at = Some(i);
            } else if e.0 == keep {
                e.1 = edge;
                pointed = true;
            }
            if pointed && at.is_some() {
                break;
            }
        }
        if let Some(i) = at {
            self.swap_remove(i);
        }
    }

    fn remove(&mut self, region: u32) {
        if let Adjacency::Large(m) = self {
            m.remove(region);
            return;
        }
        let at = self
            .list_mut()
            .expect("a list")
            .iter()
            .position(|e| e.0 == region);
        if let Some(at) = at {
            self.swap_remove(at);
        }
    }

    /// Renames neighbour `old` (which is there) to `new` (which is not), keeping its edge.
    fn rename(&mut self, old: u32, new: u32) {
        match self {
            Adjacency::Large(m) => {
                if let Some(edge) = m.remove(old) {
                    m.insert(new, edge);
                }
            }
            list => {
                if let Some(e) = list
                    .list_mut()
                    .expect("a list")
                    .iter_mut()
                    .find(|e| e.0 == old)
                {
                    e.0 = new;
                }
            }
        }
    }

    /// (neighbour, edge) pairs.
    fn entries(&self) -> Box<dyn Iterator<Item = (u32, u32)> + '_> {
        match self {
            Adjacency::Inline(len, entries) => Box::new(entries[..*len as usize].iter().copied()),
            Adjacency::Small(v) => Box::new(v.iter().copied()),
            Adjacency::Large(m) => Box::new(m.iter()),
        }
    }

    /// Moves the (neighbour, edge) pairs to the end of `out`.
    fn drain_into(self, out: &mut Vec<(u32, u32)>) {
        match self {
            Adjacency::Inline(len, entries) => out.extend_from_slice(&entries[..len as usize]),
            Adjacency::Small(v) => out.extend(v),
            Adjacency::Large(m) => out.extend(m.iter()),
        }
    }
}

/// The state of an edge between two live regions (which ones: the adjacency maps know): its
/// version, or [`DEAD`]. Kept apart from the statistics, 4 bytes per edge: the queue's staleness
/// check reads it for every popped entry, most of them stale, at random.
const DEAD: u32 = u32::MAX;

/// The live region a node now belongs to (halving the merge chain it walks).
fn live(merged_into: &mut [u32], mut r: u32) -> u32 {
    while merged_into[r as usize] != r {
        let next = merged_into[r as usize];
        merged_into[r as usize] = merged_into[next as usize];
        r = next;
    }
    r
}

/// An entry of the merge queue: an edge as it was when scored. Entries of dead edges, or of an
/// older `version` of a live one, are skipped. Kept small: the queue's cost is memory traffic.
#[derive(Debug)]
struct Candidate {
    /// The edge's statistics when scored: means compare exactly, as fractions, so that two
    /// means that round to one f64 still pop in a fixed order.
    stats: EdgeStats,
    /// The edge, which is also the tie-break among equal means (smaller first): edges are
    /// numbered in the order of their ties (see [`GraphEdge::tie`]), and two edges that become
    /// one keep the smaller number.
    edge: u32,
    version: u32,
    /// Two nodes, one in each region the edge joined when scored: the regions it joins when
    /// it pops are theirs. Carried here rather than looked up by edge, which would be a cache
    /// miss per merge.
    ends: (u32, u32),
}

impl Candidate {
    fn mean(&self) -> f64 {
        self.stats.mean()
    }
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
    /// Highest mean first (compared exactly: sum_a * count_b against sum_b * count_a); among
    /// equal means the smallest edge first (a max-heap pops the greatest, so the edge order is
    /// reversed).
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (&self.stats, &other.stats);
        (a.sum as u128 * b.count as u128)
            .cmp(&(b.sum as u128 * a.count as u128))
            .then_with(|| other.edge.cmp(&self.edge))
            .then_with(|| self.version.cmp(&other.version))
    }
}

/// The merge queue: a radix heap. Agglomeration pops means in non-increasing order and only ever
/// pushes means no higher than the last one popped (a combined edge's mean is a weighted average
/// of two live edges' means), so a monotone queue applies: each entry moves down at most 64
/// buckets in its life, in sequential memory, where a binary heap of millions of entries spends
/// its time on cache misses. Buckets go by the mean rounded to f64 (rounding keeps the order of
/// exact means, ties aside); it pops exactly in [`Candidate`]'s order, ties included.
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

    /// A queue holding `candidates` (a function, called twice, that yields them): the buckets
    /// are sized exactly before they are filled, so that millions of initial entries neither
    /// grow vectors by doubling (copies and fresh pages) nor all wait in one bucket for the
    /// first pop to move them.
    fn from_candidates<I: Iterator<Item = Candidate>>(candidates: impl Fn() -> I) -> MergeQueue {
        let mut queue = MergeQueue::new();
        let Some(last) = candidates().map(|c| Self::key(&c)).min() else {
            return queue;
        };
        queue.last = last;
        let mut sizes = [0usize; 65];
        for c in candidates() {
            sizes[queue.bucket(Self::key(&c))] += 1;
        }
        for (bucket, &size) in queue.buckets.iter_mut().zip(&sizes) {
            bucket.reserve_exact(size);
        }
        for c in candidates() {
            let b = queue.bucket(Self::key(&c));
            queue.buckets[b].push(c);
        }
        queue.buckets[0].sort_unstable();
        queue
    }

    /// Smaller keys pop first: the highest mean (means are non-negative, whose f64 bit patterns
    /// order like their values).
    fn key(c: &Candidate) -> u64 {
        u64::MAX - c.mean().to_bits()
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

    /// The next entry, in [`Candidate`]'s order. Entries for which `current` says false are
    /// dropped when their bucket is redistributed, before they cost a sort or a pop: checked
    /// in a batch, the staleness checks' cache misses overlap instead of stalling each pop.
    /// (One pushed into the bucket being popped can still pop: callers check again.)
    fn pop(&mut self, current: impl Fn(&Candidate) -> bool) -> Option<Candidate> {
        while self.buckets[0].is_empty() {
            let i = (1..=64).find(|&i| !self.buckets[i].is_empty())?;
            let mut moved =
                std::mem::replace(&mut self.buckets[i], std::mem::take(&mut self.spare));
            moved.retain(&current);
            if let Some(last) = moved.iter().map(Self::key).min() {
                self.last = last;
            }
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

/// An edge of a graph to agglomerate: its two regions (`a < b`, each named by its smallest
/// node), their statistics, and its tie-break among equal means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphEdge {
    pub a: u32,
    pub b: u32,
    pub stats: EdgeStats,
    /// The smallest fragment pair among the fragments' graph edges that this edge sums (for
    /// an edge of that graph, `(a, b)`); smaller pops first among equal means. It depends on
    /// the edge's voxels only, not on which region survives a merge nor on the order of merges,
    /// and an edge formed from several has the smallest of theirs: what lets agglomeration run
    /// in rounds (see [`agglomerate_rounds`]).
    pub tie: (u32, u32),
}

/// The outcome of [`agglomerate_rounds`]: what was merged and what is left for a later round.
#[derive(Clone, Debug, PartialEq)]
pub struct Agglomeration {
    /// Per node, the smallest node of its region.
    pub region_of: Vec<u32>,
    /// The edges between the regions that are left, sorted, with their ties: a later round that
    /// holds more of the graph goes on from exactly here.
    pub left: Vec<GraphEdge>,
    /// Per node, whether its region ended frozen: its fate depends on edges elsewhere. The
    /// regions that did not are final: every edge they keep has `1 - mean` at or above the
    /// threshold, and so has any edge a later round forms from those (a weighted average), so
    /// they never merge again.
    pub frozen: Vec<bool>,
    pub merges: usize,
}

/// Agglomeration over the part of a graph one task holds, exactly as far as that part decides
/// it (ABISS's frozen segments).
///
/// Nodes are numbered in an order that does not depend on the part (fragments by first voxel),
/// and `frozen[n]` marks the nodes with edges the part does not hold. Edges pop best first as
/// in one whole run; one that touches a frozen region is not merged but freezes both its
/// regions, since what the region would become depends on edges elsewhere. Regions that are
/// not frozen hold all their edges, and any edge the whole run forms from their edges has a
/// mean no higher than its parts (a weighted average) and, on equal means, the smallest of
/// their tie-breaks, so it cannot pop before its parts pop here: every merge made here is one
/// the whole run makes, on the same statistics. A round over the union of parts, given the edges
/// left by its parts and the edges between them, continues where they stopped; the last round,
/// with nothing frozen, ends where one run over the whole graph ends.
pub fn agglomerate_rounds(
    nodes: usize,
    edges: &[GraphEdge],
    frozen: &[bool],
    threshold: f64,
    stop: &dyn Fn() -> bool,
) -> Option<Agglomeration> {
    assert_eq!(frozen.len(), nodes, "one frozen flag per node");
    let mut sorted = edges.to_vec();
    sorted.sort_unstable_by_key(|e| e.tie);
    let mut run = Agglomerator::new(nodes, &sorted, frozen);
    drop(sorted);
    let merges = run.merge_until_or_stopped(threshold, stop)?;
    Some(run.finish(merges))
}

/// Merges fragments 1..=`fragments` along `graph` until the best pair's `1 - mean` reaches
/// `threshold`. Returns, per fragment id (index 0 = background), its segment id: segments are
/// numbered 1..N by their smallest fragment, so numbering fragments by first voxel numbers
/// segments by first voxel too.
pub fn agglomerate(fragments: u32, graph: &RegionGraph, threshold: f64) -> (Vec<u32>, MergeReport) {
    agglomerate_sorted(fragments, &sorted_edges(graph), threshold, &|| false)
        .expect("never stopped")
}

/// The edges of a fragments' graph, each its own tie, sorted by pair (what
/// [`agglomerate_sorted`] takes).
fn sorted_edges(graph: &RegionGraph) -> Vec<GraphEdge> {
    let mut edges: Vec<GraphEdge> = graph
        .iter()
        .map(|(&(a, b), &stats)| GraphEdge {
            a,
            b,
            stats,
            tie: (a, b),
        })
        .collect();
    edges.sort_unstable_by_key(|e| e.tie);
    edges
}

/// [`agglomerate`] over the fragments' graph as edges sorted by fragment pair, each pair once
/// and its own tie (what [`sum_sorted_edges`] makes): no hashing on the way. Asks `stop` now and
/// then (a long agglomeration should not outlive a SIGTERM's grace): `None` once it says so.
pub fn agglomerate_sorted(
    fragments: u32,
    edges: &[GraphEdge],
    threshold: f64,
    stop: &dyn Fn() -> bool,
) -> Option<(Vec<u32>, MergeReport)> {
    debug_assert!(edges.iter().all(|e| e.tie == (e.a, e.b)));
    let n = fragments as usize + 1;
    let mut run = Agglomerator::new(n, edges, &[]);
    let merges = run.merge_until_or_stopped(threshold, stop)?;
    let out = number_by_smallest(&run.region_of());
    let segments = out.iter().max().copied().unwrap_or(0) as usize;
    Some((out, MergeReport { merges, segments }))
}

/// Edges of fragment pairs (`a < b`, in any order and repeated, as chunks report them) summed
/// into a graph sorted by pair: a sort of 8-byte keys instead of millions of hash-map inserts.
pub fn sum_sorted_edges(mut pairs: Vec<(u64, EdgeStats)>) -> Vec<GraphEdge> {
    pairs.sort_unstable_by_key(|p| p.0);
    sum_adjacent(pairs)
}

/// [`sum_sorted_edges`] for pairs that come as a few sorted runs one after another (sorted on
/// several threads): the stable sort finds the runs and only merges them.
pub fn sum_sorted_runs(mut pairs: Vec<(u64, EdgeStats)>) -> Vec<GraphEdge> {
    pairs.sort_by_key(|p| p.0);
    sum_adjacent(pairs)
}

/// Sorted pairs, equal keys summed.
fn sum_adjacent(pairs: Vec<(u64, EdgeStats)>) -> Vec<GraphEdge> {
    let mut out: Vec<GraphEdge> = Vec::with_capacity(pairs.len());
    for (key, stats) in pairs {
        let (a, b) = ((key >> 32) as u32, key as u32);
        match out.last_mut() {
            Some(last) if (last.a, last.b) == (a, b) => last.stats.add(stats),
            _ => out.push(GraphEdge {
                a,
                b,
                stats,
                tie: (a, b),
            }),
        }
    }
    out
}

/// The key of a fragment pair for [`sum_sorted_edges`].
pub fn pair_key(a: u32, b: u32) -> u64 {
    ((a.min(b) as u64) << 32) | a.max(b) as u64
}

/// Per node (index 0 = background) its segment 1..N, numbered by smallest node, given each
/// node's smallest region member.
pub fn number_by_smallest(region_of: &[u32]) -> Vec<u32> {
    let mut out = vec![0u32; region_of.len()];
    let mut next = 0;
    for n in 1..region_of.len() {
        let r = region_of[n] as usize;
        out[n] = if r == n {
            next += 1;
            next
        } else {
            out[r]
        };
    }
    out
}

/// How many neighbours ahead a merge prefetches their adjacency and edge.
const PREFETCH_AHEAD: usize = 4;

/// Asks the CPU to start loading the cache line of `value` (a hint; no effect elsewhere).
#[inline(always)]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults; SSE is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            value as *const T as *const i8,
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Greedy mean-affinity merging over one graph (see [`agglomerate_rounds`]).
struct Agglomerator {
    /// merged_into[r] = r for a live region, else the region it was merged into.
    merged_into: Vec<u32>,
    /// Per region, whether it waits for a later round; empty when nothing does.
    frozen: Vec<bool>,
    /// Edges between live regions, numbered in the order of their ties; an edge keeps its id
    /// when one end merges into another region without a parallel edge there (its mean is
    /// unchanged: no new queue entry), and two parallel edges become the smaller id.
    stats_of: Vec<EdgeStats>,
    /// Each edge's version, or [`DEAD`]. Kept apart from the statistics, 4 bytes per edge: the
    /// queue's staleness check reads it for every popped entry, most of them stale, at random.
    version_of: Vec<u32>,
    /// Each edge's tie as given (the tie of a combined edge is that of its smaller id).
    tie_of: Vec<(u32, u32)>,
    adjacency: Vec<Aligned>,
    /// The merged-away region's neighbours while a merge moves them (kept for its allocation).
    moved: Vec<(u32, u32)>,
    queue: MergeQueue,
}

impl Agglomerator {
    /// `edges` sorted by tie; `frozen` per node, or empty when no node is.
    fn new(nodes: usize, edges: &[GraphEdge], frozen: &[bool]) -> Agglomerator {
        debug_assert!(edges.windows(2).all(|w| w[0].tie < w[1].tie));
        let mut degree = vec![0usize; nodes];
        for e in edges {
            degree[e.a as usize] += 1;
            degree[e.b as usize] += 1;
        }
        let mut adjacency: Vec<Aligned> = degree
            .into_iter()
            .map(|d| Aligned(Adjacency::with_capacity(d)))
            .collect();
        for (id, e) in edges.iter().enumerate() {
            adjacency[e.a as usize].insert(e.b, id as u32);
            adjacency[e.b as usize].insert(e.a, id as u32);
        }
        let queue = MergeQueue::from_candidates(|| {
            edges.iter().enumerate().map(|(id, e)| Candidate {
                stats: e.stats,
                edge: id as u32,
                version: 0,
                ends: (e.a, e.b),
            })
        });
        Agglomerator {
            merged_into: (0..nodes as u32).collect(),
            frozen: if frozen.contains(&true) {
                frozen.to_vec()
            } else {
                Vec::new()
            },
            stats_of: edges.iter().map(|e| e.stats).collect(),
            version_of: vec![0; edges.len()],
            tie_of: edges.iter().map(|e| e.tie).collect(),
            adjacency,
            moved: Vec::new(),
            queue,
        }
    }

    /// Merges best first until the best edge's `1 - mean` reaches `threshold`, asking `stop` every 2^16 queue entries; `None` once it says so.
    fn merge_until_or_stopped(&mut self, threshold: f64, stop: &dyn Fn() -> bool) -> Option<usize> {
        let mut merges = 0;
        let mut popped = 0u32;
        loop {
            let version_of = &self.version_of;
            let Some(c) = self.queue.pop(|c| version_of[c.edge as usize] == c.version) else {
                break;
            };
            popped = popped.wrapping_add(1);
            if popped.is_multiple_of(1 << 16) && stop() {
                return None;
            }
            if self.version_of[c.edge as usize] != c.version {
                continue; // merged away (DEAD) or re-scored since
            }
            if 1.0 - c.mean() >= threshold {
                break;
            }
            let ends = c.ends;
            let a = live(&mut self.merged_into, ends.0);
            let b = live(&mut self.merged_into, ends.1);
            if !self.frozen.is_empty() && (self.frozen[a as usize] || self.frozen[b as usize]) {
                // Decided by edges elsewhere: both regions wait for a round that holds them.
                self.frozen[a as usize] = true;
                self.frozen[b as usize] = true;
                continue;
            }
            self.version_of[c.edge as usize] = DEAD;
            self.merge(a, b);
            merges += 1;
        }
        Some(merges)
    }

    fn merge(&mut self, a: u32, b: u32) {
        // The region with more neighbours survives, so each merge costs the smaller adjacency.
        let (keep, gone) = if self.adjacency[a as usize].len() >= self.adjacency[b as usize].len() {
            (a, b)
        } else {
            (b, a)
        };
        self.merged_into[gone as usize] = keep;
        let mut moved = std::mem::take(&mut self.moved);
        std::mem::take(&mut self.adjacency[gone as usize].0).drain_into(&mut moved);
        for &(ahead, ahead_id) in moved.iter().take(PREFETCH_AHEAD) {
            prefetch(&self.adjacency[ahead as usize]);
            prefetch(&self.stats_of[ahead_id as usize]);
        }
        self.adjacency[keep as usize].remove(gone);
        for i in 0..moved.len() {
            // Each neighbour's adjacency and edge are elsewhere in memory, one cache miss each:
            // fetch those of the neighbours a few steps ahead while this one is updated.
            if let Some(&(ahead, ahead_id)) = moved.get(i + PREFETCH_AHEAD) {
                prefetch(&self.adjacency[ahead as usize]);
                prefetch(&self.stats_of[ahead_id as usize]);
            }
            let (other, id) = moved[i];
            if other == keep {
                continue;
            }
            let parallel = self.adjacency[keep as usize].get_mut(other).map(|slot| {
                let parallel = *slot;
                *slot = parallel.min(id);
                parallel
            });
            match parallel {
                Some(parallel) => {
                    // Two edges become one, under the smaller id (the smaller tie): its
                    // statistics combine and it is scored again.
                    let (kept, absorbed) = (parallel.min(id), parallel.max(id));
                    self.adjacency[other as usize].drop_and_point(gone, keep, kept);
                    let (k, a) = (kept as usize, absorbed as usize);
                    let absorbed_stats = self.stats_of[a];
                    self.stats_of[k].add(absorbed_stats);
                    self.version_of[a] = DEAD;
                    self.version_of[k] += 1;
                    self.queue.push(Candidate {
                        stats: self.stats_of[k],
                        edge: kept,
                        version: self.version_of[k],
                        ends: (keep, other),
                    });
                }
                None => {
                    // The edge moves to `keep` at both ends: renamed in place at `other`.
                    self.adjacency[keep as usize].insert(other, id);
                    self.adjacency[other as usize].rename(gone, keep);
                }
            }
        }
        moved.clear();
        self.moved = moved;
    }

    /// Per node, the smallest node of its region.
    fn region_of(&mut self) -> Vec<u32> {
        const NONE: u32 = u32::MAX;
        let mut smallest = vec![NONE; self.merged_into.len()];
        (0..self.merged_into.len() as u32)
            .map(|n| {
                let r = live(&mut self.merged_into, n) as usize;
                if smallest[r] == NONE {
                    smallest[r] = n; // nodes come in increasing order
                }
                smallest[r]
            })
            .collect()
    }

    fn finish(mut self, merges: usize) -> Agglomeration {
        let region_of = self.region_of();
        let mut left = Vec::new();
        for (r, adjacency) in self.adjacency.iter().enumerate() {
            let mine = region_of[r];
            for (other, id) in adjacency.entries() {
                let theirs = region_of[other as usize];
                if mine < theirs {
                    left.push(GraphEdge {
                        a: mine,
                        b: theirs,
                        stats: self.stats_of[id as usize],
                        tie: self.tie_of[id as usize],
                    });
                }
            }
        }
        left.sort_unstable_by_key(|e| (e.a, e.b));
        let frozen = if self.frozen.is_empty() {
            vec![false; region_of.len()]
        } else {
            let mut merged_into = std::mem::take(&mut self.merged_into);
            (0..region_of.len() as u32)
                .map(|n| self.frozen[live(&mut merged_into, n) as usize])
                .collect()
        };
        Agglomeration {
            region_of,
            left,
            frozen,
            merges,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::union_find::{number_by_first_voxel, UnionFind};

    /// Per fragment (index 0 = background) its segment: the sets of `sets` numbered 1..N by their
    /// smallest fragment.
    fn number_segments(sets: &mut UnionFind) -> Vec<u32> {
        let n = sets.len();
        let roots: Vec<Option<u32>> = (0..n as u32)
            .map(|f| (f > 0).then(|| sets.find(f)))
            .collect();
        number_by_first_voxel(roots.into_iter(), n)
    }

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
    /// the regions they now join and take the best mean (compared exactly), on ties the one
    /// whose smallest original pair is smallest.
    fn agglomerate_naively(fragments: u32, graph: &RegionGraph, threshold: f64) -> Vec<u32> {
        let n = fragments as usize + 1;
        let mut sets = UnionFind::new(n);
        loop {
            let mut joined: HashMap<(u32, u32), (EdgeStats, (u32, u32))> = HashMap::new();
            for (&(a, b), &stats) in graph {
                let (ra, rb) = (sets.find(a), sets.find(b));
                if ra != rb {
                    let e = joined
                        .entry((ra.min(rb), ra.max(rb)))
                        .or_insert((EdgeStats::default(), (a, b)));
                    e.0.add(stats);
                    e.1 = e.1.min((a, b));
                }
            }
            let best = joined.iter().max_by(|x, y| {
                let (mx, my) = (
                    x.1 .0.sum as u128 * y.1 .0.count as u128,
                    y.1 .0.sum as u128 * x.1 .0.count as u128,
                );
                mx.cmp(&my).then_with(|| y.1 .1.cmp(&x.1 .1))
            });
            match best {
                Some((&(a, b), (stats, _))) if 1.0 - stats.mean() < threshold => {
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

    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// Node at a grid position, numbered from 1 in Fortran order (as fragments are numbered by
    /// their first voxel).
    fn node_at(shape: [usize; 3], p: [usize; 3]) -> u32 {
        (1 + p[0] + shape[0] * (p[1] + shape[1] * p[2])) as u32
    }

    fn position(shape: [usize; 3], node: u32) -> [usize; 3] {
        let i = node as usize - 1;
        [
            i % shape[0],
            (i / shape[0]) % shape[1],
            i / (shape[0] * shape[1]),
        ]
    }

    /// A graph on a grid of nodes: edges to the face neighbours and to some diagonal ones, with
    /// means on `levels` levels (many exact ties, and ties of combined means) or, for a quarter
    /// of the edges, off the levels by a few units.
    fn grid_graph(shape: [usize; 3], levels: u64, seed: u64) -> RegionGraph {
        let mut next = xorshift(seed);
        let mut g = RegionGraph::default();
        let steps = [
            [1, 0, 0],
            [0, 1, 0],
            [0, 0, 1],
            [1, 1, 0],
            [0, 1, 1],
            [1, 0, 1],
        ];
        for z in 0..shape[2] {
            for y in 0..shape[1] {
                for x in 0..shape[0] {
                    for (k, d) in steps.iter().enumerate() {
                        let q = [x + d[0], y + d[1], z + d[2]];
                        if (0..3).any(|c| q[c] >= shape[c]) || (k >= 3 && !next().is_multiple_of(4))
                        {
                            continue;
                        }
                        let count = next() % 4 + 1;
                        let level = next() % (levels + 1);
                        let mut sum = level * count * ((1 << 24) / levels);
                        if next().is_multiple_of(4) {
                            sum = sum.saturating_sub(next() % 3);
                        }
                        let (a, b) = (node_at(shape, [x, y, z]), node_at(shape, q));
                        g.insert((a, b), EdgeStats { count, sum });
                    }
                }
            }
        }
        g
    }

    /// Agglomerates `graph` (on a grid of nodes) in rounds, as a hierarchy of tasks would: each
    /// block of `block` nodes alone first, then blocks doubled on every axis, each round given
    /// the edges its parts left and the edges between them, until one block holds the grid.
    /// Returns the segments (numbered by smallest node) and the edges the first round left.
    fn agglomerate_in_rounds(
        shape: [usize; 3],
        graph: &RegionGraph,
        mut block: [usize; 3],
        threshold: f64,
    ) -> (Vec<u32>, usize) {
        let n = crate::geometry::voxels(shape) + 1;
        let mut region_of: Vec<u32> = (0..n as u32).collect();
        let mut left: Vec<GraphEdge> = Vec::new();
        let mut pending: Vec<((u32, u32), EdgeStats)> =
            graph.iter().map(|(&k, &v)| (k, v)).collect();
        pending.sort_unstable_by_key(|e| e.0);
        let mut first_round_left = None;
        loop {
            let group = |node: u32| {
                let p = position(shape, node);
                [p[0] / block[0], p[1] / block[1], p[2] / block[2]]
            };
            let groups = [0, 1, 2].map(|c| shape[c].div_ceil(block[c]));
            let mut next_left = Vec::new();
            for gz in 0..groups[2] {
                for gy in 0..groups[1] {
                    for gx in 0..groups[0] {
                        let here = [gx, gy, gz];
                        let mut edges: Vec<GraphEdge> = left
                            .iter()
                            .filter(|e| group(e.a) == here)
                            .copied()
                            .collect();
                        let mut frozen = vec![false; n];
                        for &((a, b), stats) in &pending {
                            match (group(a) == here, group(b) == here) {
                                (true, true) => {
                                    // Edges between parts join unmerged (frozen) fragments.
                                    assert_eq!(
                                        (region_of[a as usize], region_of[b as usize]),
                                        (a, b)
                                    );
                                    edges.push(GraphEdge {
                                        a,
                                        b,
                                        stats,
                                        tie: (a, b),
                                    });
                                }
                                (true, false) => frozen[region_of[a as usize] as usize] = true,
                                (false, true) => frozen[region_of[b as usize] as usize] = true,
                                (false, false) => {}
                            }
                        }
                        let round =
                            agglomerate_rounds(n, &edges, &frozen, threshold, &|| false).unwrap();
                        for r in region_of.iter_mut() {
                            if group(*r) == here {
                                *r = round.region_of[*r as usize];
                            }
                        }
                        // Final regions never merge again: only edges between frozen
                        // regions go on (what the merge rounds of a staged plan keep).
                        next_left.extend(
                            round.left.into_iter().filter(|e| {
                                round.frozen[e.a as usize] && round.frozen[e.b as usize]
                            }),
                        );
                    }
                }
            }
            left = next_left;
            first_round_left.get_or_insert(left.len());
            pending.retain(|&((a, b), _)| group(a) != group(b));
            if (0..3).all(|c| block[c] >= shape[c]) {
                assert!(pending.is_empty());
                return (number_by_smallest(&region_of), first_round_left.unwrap());
            }
            block = block.map(|b| b * 2);
        }
    }

    #[test]
    fn a_stopped_agglomeration_returns_nothing() {
        let graph = grid_graph([40, 40, 40], 4, 99);
        let edges = sorted_edges(&graph);
        let asked = std::cell::Cell::new(0);
        let stop = || {
            asked.set(asked.get() + 1);
            true
        };
        assert!(agglomerate_sorted(64_000, &edges, 0.9, &stop).is_none());
        assert_eq!(asked.get(), 1);
        let (whole, _) = agglomerate_sorted(64_000, &edges, 0.9, &|| false).unwrap();
        assert_eq!(whole, agglomerate(64_000, &graph, 0.9).0);
    }

    #[test]
    fn merges_like_naive_greedy_merging_on_graphs_with_many_ties() {
        let mut seeds = xorshift(0xfeed);
        for levels in [1, 2, 3, 5] {
            for threshold in [0.3, 0.5, 0.7, 0.99] {
                let shape = [7, 5, 3];
                let graph = grid_graph(shape, levels, seeds() | 1);
                let nodes = crate::geometry::voxels(shape) as u32;
                assert_eq!(
                    agglomerate(nodes, &graph, threshold).0,
                    agglomerate_naively(nodes, &graph, threshold),
                    "{levels} levels, threshold {threshold}"
                );
            }
        }
    }

    #[test]
    fn agglomeration_in_rounds_equals_one_whole_run() {
        let mut seeds = xorshift(0x5eed);
        let mut cases = 0;
        for (shape, block, levels) in [
            ([8, 8, 8], [2, 2, 2], 4),
            ([8, 8, 8], [4, 4, 4], 16),
            ([12, 6, 5], [3, 2, 2], 3),
            ([9, 9, 4], [2, 3, 1], 64),
        ] {
            for threshold in [0.3, 0.5, 0.7, 0.95] {
                for _ in 0..3 {
                    let graph = grid_graph(shape, levels, seeds() | 1);
                    let nodes = crate::geometry::voxels(shape) as u32;
                    let (whole, report) = agglomerate(nodes, &graph, threshold);
                    let (rounds, left) = agglomerate_in_rounds(shape, &graph, block, threshold);
                    assert!(
                        whole == rounds,
                        "shape {shape:?}, blocks {block:?}, {levels} levels, threshold {threshold}"
                    );
                    if report.merges > 10 && report.segments > 1 && left > 0 {
                        cases += 1;
                    }
                }
            }
        }
        // Most cases both merge and leave edges to later rounds: the test exercises freezing.
        assert!(
            cases > 30,
            "{cases} cases with merges, segments and frozen edges"
        );
    }

    #[test]
    fn the_merge_queue_pops_in_binary_heap_order() {
        merge_queue_pops_in_binary_heap_order(false);
    }

    #[test]
    fn a_merge_queue_built_at_once_pops_in_binary_heap_order() {
        merge_queue_pops_in_binary_heap_order(true);
    }

    /// Pops against a binary heap of the same entries; the initial ones pushed one by one, or
    /// given at once (`MergeQueue::from_candidates`).
    fn merge_queue_pops_in_binary_heap_order(at_once: bool) {
        use std::collections::BinaryHeap;
        // Means from a few levels (many ties) and edges; pushes never exceed the last pop.
        let mut state = 12345u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut queue = MergeQueue::new();
        let mut heap = BinaryHeap::new();
        // Means as exact fractions: count 1..=3, sums on a coarse grid, so that many are
        // equal, some equal only as fractions (2/3 = 4/6 of a unit).
        let candidate = |units: u64, count: u64, r: u64, version: u32| Candidate {
            stats: EdgeStats {
                count,
                sum: units * count * (1 << 18) / 3,
            },
            edge: (r % 1000) as u32,
            version,
            ends: (0, 0),
        };
        let initial: Vec<_> = (0..2000)
            .map(|i| (next() % 193, next() % 3 + 1, next(), i))
            .collect();
        let initial_candidates = || initial.iter().map(|&(u, c, r, i)| candidate(u, c, r, i));
        if at_once {
            queue = MergeQueue::from_candidates(initial_candidates);
        } else {
            initial_candidates().for_each(|c| queue.push(c));
        }
        heap.extend(initial_candidates());
        // Entries `current` rejects (as stale ones are) are dropped on the way, or pop to be
        // skipped by the caller (those pushed straight to the bucket being popped); the others
        // pop in order.
        let current = |c: &Candidate| !c.version.is_multiple_of(5);
        let next_current = |queue: &mut MergeQueue| loop {
            let c = queue.pop(current)?;
            if current(&c) {
                return Some(c);
            }
        };
        let mut popped = 0;
        while let Some(h) = heap.pop() {
            if !current(&h) {
                continue;
            }
            let q = next_current(&mut queue).expect("as many entries");
            assert_eq!((q.stats, q.edge, q.version), (h.stats, h.edge, h.version));
            popped += 1;
            // Push a few entries at or below the popped mean, as merges do.
            if popped % 3 == 0 {
                let r = next();
                let count = next() % 3 + 1;
                let units = ((h.mean() * 192.0) as u64).saturating_sub(next() % 4);
                let c = candidate(units, count, r, popped);
                if c.mean() <= h.mean() {
                    queue.push(candidate(units, count, r, popped));
                    heap.push(c);
                }
            }
        }
        assert!(next_current(&mut queue).is_none());
        assert!(popped > 2000);
    }
}
