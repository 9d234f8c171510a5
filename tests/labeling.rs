//! The labelling kernels (connected components, watershed, region graph) against their CPU
//! references on random data, on data with many exact ties (plateaus) and on EM-like data.

mod common;

use common::{gpu, Rng};
use cuboids::geometry::{Box3, Vec3};
use cuboids::gpu::labeling::{connected_components_box, region_graph_box, watershed_box, NONE};
use cuboids::ops::agglomerate::region_graph_cpu;
use cuboids::ops::connected_components::{connected_components_cpu, Connectivity};
use cuboids::ops::union_find::number_by_first_voxel;
use cuboids::ops::watershed::{watershed_cpu, Affinities, WatershedParams};
use cuboids::runtime::synthetic::affinities_like;

/// Roots of a whole-volume box numbered like the CPU references (1..N by first voxel).
fn numbered(roots: &[u32]) -> Vec<u32> {
    number_by_first_voxel(roots.iter().map(|&r| (r != NONE).then_some(r)), roots.len())
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
    for shape in SHAPES {
        let n = shape[0] * shape[1] * shape[2];
        let values = random_values(&mut rng, n, 16);
        for c in [
            Connectivity::Six,
            Connectivity::Eighteen,
            Connectivity::TwentySix,
        ] {
            for threshold in [0.3f32, 0.5, 0.8] {
                let roots = connected_components_box(
                    gpu(),
                    &values,
                    shape,
                    Box3::from_shape(shape),
                    threshold,
                    c,
                )
                .unwrap();
                let cpu = connected_components_cpu(&values, shape, threshold, c);
                assert_eq!(
                    numbered(&roots),
                    cpu,
                    "{shape:?} {c:?} threshold {threshold}"
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
        let out = watershed_box(gpu(), &aff, Box3::from_shape(shape), params).unwrap();
        assert!(
            out.deferred.is_empty(),
            "{name}: a whole volume defers nothing"
        );
        let cpu = watershed_cpu(&aff, params);
        assert_eq!(numbered(&out.roots), cpu, "{name}");
        assert!(
            cpu.iter().any(|&l| l > 0) || shape == [1, 1, 1],
            "{name}: no fragments"
        );
    }
}

#[test]
fn region_graph_matches_cpu() {
    let mut rng = Rng::new(5);
    for shape in [[40, 30, 12], [9, 9, 9]] {
        let aff = random_affinities(&mut rng, shape, 1 << 20);
        let fragments = watershed_cpu(&aff, WatershedParams::default());
        let gpu_edges = region_graph_box(gpu(), &fragments, &aff, Box3::from_shape(shape)).unwrap();
        let cpu = region_graph_cpu(&aff, &fragments);
        assert!(cpu.len() > 10, "{shape:?}: {} edges", cpu.len());
        assert_eq!(gpu_edges.len(), cpu.len(), "{shape:?}: edge count");
        for (pair, stats) in gpu_edges {
            assert_eq!(cpu.get(&pair), Some(&stats), "{shape:?}: edge {pair:?}");
        }
    }
}
