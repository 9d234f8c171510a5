//! The labelling kernels (connected components, watershed, region graph) against their CPU
//! references on random data, on data with many exact ties (plateaus) and on EM-like data.

mod common;

use common::{gpu, Rng};
use cuboids::geometry::{Box3, Vec3};
use cuboids::gpu::labeling::{
    connected_components_box, region_graph_box, watershed_box, BlockMasks, RegionEdge, NONE,
};
use cuboids::gpu::GpuContext;
use cuboids::ops::agglomerate::{region_graph_cpu, RegionGraph};
use cuboids::ops::connected_components::{connected_components_cpu, Connectivity};
use cuboids::ops::union_find::number_by_first_voxel;
use cuboids::ops::watershed::{watershed_cpu, Affinities, WatershedParams};
use cuboids::runtime::synthetic::affinities_like;

/// Roots of a whole-volume box numbered like the CPU references (1..N by first voxel).
fn numbered(roots: &[u32]) -> Vec<u32> {
    let bound = roots
        .iter()
        .filter(|&&r| r != NONE)
        .max()
        .map_or(0, |&r| r as usize + 1);
    number_by_first_voxel(roots.iter().map(|&r| (r != NONE).then_some(r)), bound)
}

/// Equal labellings, or a panic naming the first voxel that differs.
fn assert_same(gpu: &[u32], cpu: &[u32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: voxel count");
    if let Some(i) = (0..gpu.len()).find(|&i| gpu[i] != cpu[i]) {
        panic!(
            "{what}: voxel {i} is {} on the GPU, {} on the CPU",
            gpu[i], cpu[i]
        );
    }
}

fn random_values(rng: &mut Rng, n: usize, levels: u64) -> Vec<f32> {
    (0..n)
        .map(|_| rng.below(levels) as f32 / (levels - 1) as f32)
        .collect()
}

fn random_affinities(rng: &mut Rng, shape: Vec3, levels: u64) -> Affinities {
    let n = shape[0] * shape[1] * shape[2];
    Affinities {
        shape,
        channels: [0, 1, 2].map(|_| random_values(rng, n, levels)),
    }
}

const SHAPES: [Vec3; 5] = [[32, 32, 16], [17, 9, 5], [1, 1, 1], [70, 3, 2], [5, 1, 40]];

#[test]
fn connected_components_match_cpu_for_every_connectivity() {
    let mut rng = Rng::new(7);
    // Also rows of many mask words (the 26-connected kernel takes four blocks per invocation),
    // with a partial word at each row's end.
    for shape in SHAPES.into_iter().chain([[138, 18, 12]]) {
        let n = shape[0] * shape[1] * shape[2];
        let values = random_values(&mut rng, n, 16);
        for c in [
            Connectivity::Six,
            Connectivity::Eighteen,
            Connectivity::TwentySix,
        ] {
            for threshold in [0.3f32, 0.5, 0.8] {
                let masks = BlockMasks::threshold(&values, shape, threshold);
                let roots = connected_components_box(gpu(), masks, c).unwrap().roots();
                let cpu = connected_components_cpu(&values, shape, threshold, c);
                assert_same(
                    &numbered(&roots),
                    &cpu,
                    &format!("{shape:?} {c:?} {threshold}"),
                );
            }
        }
    }
}

#[test]
fn watershed_matches_cpu_on_random_tied_and_em_like_affinities() {
    let mut rng = Rng::new(11);
    let params = WatershedParams::default();
    let mut cases: Vec<(String, Affinities)> = Vec::new();
    for shape in SHAPES {
        cases.push((
            format!("float {shape:?}"),
            random_affinities(&mut rng, shape, 1 << 24),
        ));
        // Five levels: ties everywhere, so plateaus with and without exits are common.
        cases.push((
            format!("5 levels {shape:?}"),
            random_affinities(&mut rng, shape, 5),
        ));
    }
    cases.push(("em-like".into(), affinities_like([64, 64, 16])));
    for (name, aff) in cases {
        let shape = aff.shape;
        let out = watershed_box(gpu(), aff.view(), Box3::from_shape(shape), params, true).unwrap();
        assert!(
            out.deferred.is_empty(),
            "{name}: a whole volume defers nothing"
        );
        let cpu = watershed_cpu(&aff, params);
        let labels = numbered(&out.roots);
        assert_same(&labels, &cpu, &name);
        // The region graph accumulated from the roots on the GPU, keyed by root voxels.
        let mut graph = RegionGraph::default();
        for ((a, b), stats) in out.region_graph {
            let (fa, fb) = (labels[a as usize], labels[b as usize]);
            assert!(
                fa != 0 && fb != 0,
                "{name}: pair ({a}, {b}) names background"
            );
            if fa != fb {
                graph
                    .entry((fa.min(fb), fa.max(fb)))
                    .or_default()
                    .add(stats);
            }
        }
        assert_eq!(graph, region_graph_cpu(&aff, &cpu), "{name}: region graph");
        assert!(
            cpu.iter().any(|&l| l > 0) || shape == [1, 1, 1],
            "{name}: no fragments"
        );
    }
}

#[test]
fn region_graph_matches_cpu() {
    // A context whose bindings hold 64 KiB: the larger graphs need several key-space partitions.
    let mut small = GpuContext::new().unwrap();
    small.limit_bindings(64 << 10);
    let mut rng = Rng::new(5);
    for shape in [[40, 30, 12], [9, 9, 9]] {
        let aff = random_affinities(&mut rng, shape, 1 << 20);
        let fragments = watershed_cpu(&aff, WatershedParams::default());
        let cpu = region_graph_cpu(&aff, &fragments);
        assert!(cpu.len() > 10, "{shape:?}: {} edges", cpu.len());
        for (name, ctx) in [("adapter limits", gpu()), ("64 KiB bindings", &small)] {
            let gpu_edges =
                region_graph_box(ctx, &fragments, &aff, Box3::from_shape(shape)).unwrap();
            assert_same_graph(gpu_edges, &cpu, &format!("{shape:?} {name}"));
        }
    }
    // Every voxel its own fragment: more pairs than voxels. On `small`, the boxes before left
    // a guess of pairs per voxel far below this box's, so its first table (sized by that
    // guess) overflows and it takes the counted way, in partitions.
    let shape = [24, 24, 16];
    let aff = random_affinities(&mut rng, shape, 1 << 20);
    let fragments: Vec<u32> = (1..=(24 * 24 * 16) as u32).collect();
    let cpu = region_graph_cpu(&aff, &fragments);
    let gpu_edges = region_graph_box(&small, &fragments, &aff, Box3::from_shape(shape)).unwrap();
    assert_same_graph(gpu_edges, &cpu, "one fragment per voxel");
    // Two fragments meeting on a plane of 32x32 voxel edges of affinity 1: every workgroup's
    // share of the pair (256 edges: 2^32 in fixed point) carries into the sum's high word,
    // and so does the table's sum of them (2^34).
    let shape = [32, 32, 4];
    let n = 32 * 32 * 4;
    let aff = Affinities {
        shape,
        channels: [0, 1, 2].map(|_| vec![1.0; n]),
    };
    let fragments: Vec<u32> = (0..n).map(|i| 1 + (i >= n / 2) as u32).collect();
    let cpu = region_graph_cpu(&aff, &fragments);
    assert_eq!(cpu[&(1, 2)].sum, 1 << 34);
    let gpu_edges = region_graph_box(gpu(), &fragments, &aff, Box3::from_shape(shape)).unwrap();
    assert_same_graph(gpu_edges, &cpu, "sums past 32 bits");
}

/// The GPU gives as many edges as the CPU, each with the CPU's statistics for its pair.
fn assert_same_graph(gpu_edges: Vec<RegionEdge>, cpu: &RegionGraph, what: &str) {
    assert_eq!(gpu_edges.len(), cpu.len(), "{what}: edge count");
    for (pair, stats) in gpu_edges {
        assert_eq!(cpu.get(&pair), Some(&stats), "{what}: edge {pair:?}");
    }
}

/// Saturated plateaus (edges at or above `high`) are joined along every such edge that touches
/// the core of a box, including the edges from the core to its halo, on either side: the
/// stitching of chunks relies on it. Five levels make such plateaus common and large, with
/// squares of saturated edges that the kernel joins through their other three sides.
#[test]
fn saturated_edges_touching_the_core_join_their_voxels() {
    let mut rng = Rng::new(23);
    let params = WatershedParams::default();
    let shape = [20, 40, 24];
    let core = Box3 {
        start: [3, 2, 1],
        stop: [17, 37, 22],
    };
    let inside = |p: [usize; 3]| (0..3).all(|a| p[a] >= core.start[a] && p[a] < core.stop[a]);
    let index = |p: [usize; 3]| p[0] + shape[0] * (p[1] + shape[1] * p[2]);
    for round in 0..6 {
        let aff = random_affinities(&mut rng, shape, 5);
        let out = watershed_box(gpu(), aff.view(), core, params, false).unwrap();
        let mut joined = 0;
        for z in 0..shape[2] {
            for y in 0..shape[1] {
                for x in 0..shape[0] {
                    let p = [x, y, z];
                    for c in 0..3 {
                        if p[c] == 0 || aff.channels[c][index(p)] < params.high {
                            continue;
                        }
                        let mut q = p;
                        q[c] -= 1;
                        if !inside(p) && !inside(q) {
                            continue;
                        }
                        let (a, b) = (out.roots[index(p)], out.roots[index(q)]);
                        assert_eq!(a, b, "round {round}: saturated edge {p:?} - {q:?}");
                        joined += 1;
                    }
                }
            }
        }
        assert!(joined > 500, "round {round}: {joined} saturated edges");
    }
}
