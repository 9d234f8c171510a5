//! Synthetic EM-like volumes for the demo and benchmarks: Voronoi cells (the segmentation) whose
//! boundaries are dark membranes in a noisy image, so the data compresses and downsamples like
//! real EM rather than like uniform noise.

use crate::dtype::DataType;
use crate::geometry::Vec3;
use crate::volume::Volume;

/// Seeds sit one per cell of this size, jittered.
const CELL: usize = 48;

fn hash(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn seed_of(cell: [i64; 3]) -> [f32; 3] {
    let h = hash((cell[0] as u64) ^ ((cell[1] as u64) << 21) ^ ((cell[2] as u64) << 42));
    [0, 1, 2].map(|i| (cell[i] as f32 + ((h >> (i * 16)) & 0xffff) as f32 / 65536.0) * CELL as f32)
}

/// An EM-like uint8 image and its uint64 segmentation of the same shape.
pub fn em_like(shape: Vec3) -> (Volume, Volume) {
    let n = shape[0] * shape[1] * shape[2];
    let mut image = vec![0u8; n];
    let mut labels = vec![0u64; n];
    let plane = shape[0] * shape[1];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let planes_per = shape[2].div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for ((img, lab), z0) in image
            .chunks_mut(plane * planes_per)
            .zip(labels.chunks_mut(plane * planes_per))
            .zip((0..).step_by(planes_per))
        {
            s.spawn(move || fill_planes(img, lab, shape, z0));
        }
    });
    (
        Volume::from_bytes(DataType::Uint8, shape, 1, image).unwrap(),
        Volume::from_bytes(
            DataType::Uint64,
            shape,
            1,
            labels.iter().flat_map(|l| l.to_le_bytes()).collect(),
        )
        .unwrap(),
    )
}

/// The nearest cell seed to voxel (x, y, z) (z sections 4x thicker): its cell id and the squared
/// distances to the nearest and second-nearest seeds.
fn nearest_cell(x: usize, y: usize, z: usize) -> (u64, f32, f32) {
    let p = [x as f32, y as f32, z as f32 * 4.0];
    let cell = [0, 1, 2].map(|d| (p[d] / CELL as f32).floor() as i64);
    let (mut best, mut second, mut best_id) = (f32::MAX, f32::MAX, 0u64);
    for dz in -1..=1 {
        for dy in -1..=1 {
            for dx in -1..=1 {
                let c = [cell[0] + dx, cell[1] + dy, cell[2] + dz];
                let s = seed_of(c);
                let d = (0..3).map(|k| (s[k] - p[k]).powi(2)).sum::<f32>();
                if d < best {
                    second = best;
                    best = d;
                    best_id =
                        hash(c[0] as u64 ^ ((c[1] as u64) << 20) ^ ((c[2] as u64) << 40)) >> 24;
                } else if d < second {
                    second = d;
                }
            }
        }
    }
    (best_id, best, second)
}

fn fill_planes(image: &mut [u8], labels: &mut [u64], shape: Vec3, z0: usize) {
    let plane = shape[0] * shape[1];
    for (i, (px, lab)) in image.iter_mut().zip(labels.iter_mut()).enumerate() {
        let (x, y, z) = (i % shape[0], (i / shape[0]) % shape[1], z0 + i / plane);
        let (best_id, best, second) = nearest_cell(x, y, z);
        // Distance to the boundary between the two nearest cells: membranes are ~3 voxels wide.
        let edge = second.sqrt() - best.sqrt();
        let membrane = (1.0 - edge / 3.0).max(0.0);
        let noise = (hash((x as u64) | ((y as u64) << 20) | ((z as u64) << 40)) & 31) as f32;
        *px = (170.0 - 120.0 * membrane + noise - 16.0).clamp(0.0, 255.0) as u8;
        *lab = best_id + 1;
    }
}

/// Box blur along one axis (radius r), in place: a network's output is smooth, EM is not.
fn blur_axis(v: &mut [f32], shape: Vec3, axis: usize, r: usize) {
    let stride = [1, shape[0], shape[0] * shape[1]][axis];
    let len = shape[axis];
    let mut line = vec![0f32; len];
    for start in 0..v.len() {
        if !(start / stride).is_multiple_of(len) {
            continue; // not the first voxel of a line along `axis`
        }
        for (k, l) in line.iter_mut().enumerate() {
            *l = v[start + k * stride];
        }
        for k in 0..len {
            let (lo, hi) = (k.saturating_sub(r), (k + r).min(len - 1));
            v[start + k * stride] = line[lo..=hi].iter().sum::<f32>() / (hi - lo + 1) as f32;
        }
    }
}

/// An EM-like affinity graph: edges inside cells are high, edges across the membranes of
/// [`em_like`] low; computed from the smoothed image (like a network's output) with a little
/// per-edge noise (so that, as with float output, exact ties are rare). Channel c at v is the
/// edge between v and v - e_c.
pub fn affinities_like(shape: Vec3) -> crate::ops::watershed::Affinities {
    let (image, _) = em_like(shape);
    let img = blurred(image.data.iter().map(|&b| b as f32).collect(), shape);
    let strides = [1, shape[0], shape[0] * shape[1]];
    let channels = [0, 1, 2].map(|c| {
        (0..img.len())
            .map(|i| {
                let at = [i % shape[0], (i / shape[0]) % shape[1], i / strides[2]];
                if at[c] == 0 {
                    return 0.0;
                }
                let darker = img[i].min(img[i - strides[c]]);
                let noise = (hash(i as u64 * 3 + c as u64) >> 40) as f32 / (1u64 << 24) as f32;
                ((darker - 50.0) / 120.0 + 0.01 * noise).clamp(0.0, 1.0)
            })
            .collect()
    });
    crate::ops::watershed::Affinities { shape, channels }
}

/// A probability map with the cells of [`em_like`] bright and membranes dark, in [0, 1].
pub fn probability_like(shape: Vec3) -> Vec<f32> {
    let (image, _) = em_like(shape);
    image.data.iter().map(|&v| v as f32 / 255.0).collect()
}

/// [`probability_like`] smoothed as a network's output is (the image blurred over 2 voxels in
/// x and y, 1 in z): cells bright and even, membranes dark, so that thresholding separates
/// the cells instead of the image's noise.
pub fn smooth_probability_like(shape: Vec3) -> Vec<f32> {
    let (image, _) = em_like(shape);
    blurred(
        image.data.iter().map(|&b| b as f32 / 255.0).collect(),
        shape,
    )
}

/// An image blurred as a network's output is smooth: over 2 voxels in x and y, 1 in z.
fn blurred(mut img: Vec<f32>, shape: Vec3) -> Vec<f32> {
    blur_axis(&mut img, shape, 0, 2);
    blur_axis(&mut img, shape, 1, 2);
    blur_axis(&mut img, shape, 2, 1);
    img
}

/// A standard normal sample from two hashes (Box-Muller).
fn gaussian(key: u64) -> f32 {
    let u1 = ((hash(key) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = (hash(key ^ 0x9e37_79b9_7f4a_7c15) >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// A hard affinity map for the agglomeration: the Voronoi cells of [`em_like`] with affinity
/// `inside` between voxels of one cell and `across` between cells, plus Gaussian noise of
/// `sigma`, clipped to [0, 1]. With noise well above the difference of neighbouring edges, almost
/// every voxel is its own little fragment (millions of fragments, several region-graph edges per
/// voxel): the case that sizes of passes must survive.
pub fn noisy_cell_affinities(
    shape: Vec3,
    inside: f32,
    across: f32,
    sigma: f32,
) -> crate::ops::watershed::Affinities {
    let n = shape[0] * shape[1] * shape[2];
    let cells: Vec<u64> = (0..n)
        .map(|i| {
            let (x, y, z) = (
                i % shape[0],
                (i / shape[0]) % shape[1],
                i / (shape[0] * shape[1]),
            );
            nearest_cell(x, y, z).0
        })
        .collect();
    let strides = [1, shape[0], shape[0] * shape[1]];
    let channels = [0, 1, 2].map(|c| {
        (0..n)
            .map(|i| {
                let at = [i % shape[0], (i / shape[0]) % shape[1], i / strides[2]];
                if at[c] == 0 {
                    return 0.0;
                }
                let mean = if cells[i] == cells[i - strides[c]] {
                    inside
                } else {
                    across
                };
                (mean + sigma * gaussian(i as u64 * 3 + c as u64)).clamp(0.0, 1.0)
            })
            .collect()
    });
    crate::ops::watershed::Affinities { shape, channels }
}
