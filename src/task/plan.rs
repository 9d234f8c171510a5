//! Splitting work so that output chunks are written whole by one tile, and GPU slabs fit the
//! adapter's binding limit.

use crate::geometry::{voxels, Box3, Vec3};

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

/// Rounds a region outward to multiples of `align` (relative coordinates), clipped to `size`.
pub fn align_region(region: Box3, align: Vec3, size: Vec3) -> Box3 {
    Box3::new(
        [0, 1, 2].map(|i| region.start[i] / align[i] * align[i]),
        [0, 1, 2].map(|i| (region.stop[i].div_ceil(align[i]) * align[i]).min(size[i])),
    )
}

/// Tiles of `region` (already aligned) whose extents are multiples of `align`, grown along x,
/// then y, then z while a tile stays within `target_bytes` (at `bytes_per_voxel`).
pub fn plan_tiles(
    region: Box3,
    align: Vec3,
    bytes_per_voxel: usize,
    target_bytes: usize,
) -> Vec<Box3> {
    let extent = region.shape();
    let mut tile = [0, 1, 2].map(|i| align[i].min(extent[i].max(1)));
    for axis in 0..3 {
        while tile[axis] < extent[axis] {
            let mut bigger = tile;
            bigger[axis] = (tile[axis] * 2).min(extent[axis].div_ceil(align[axis]) * align[axis]);
            if voxels(bigger) * bytes_per_voxel > target_bytes {
                break;
            }
            tile = bigger;
        }
    }
    split(region, tile)
}

/// Slabs of a tile of `shape` for the GPU: boxes aligned to `align` (the block of the deepest
/// mip) whose bytes stay within `max_bytes`, cut along z first, then y, then x.
/// Returns `None` when even one aligned block does not fit.
pub fn plan_slabs(shape: Vec3, elem: usize, align: Vec3, max_bytes: u64) -> Option<Vec<Box3>> {
    let bytes = |s: Vec3| (voxels(s) * elem) as u64;
    let mut slab = shape;
    for axis in [2, 1, 0] {
        if bytes(slab) <= max_bytes {
            break;
        }
        let per_unit = bytes(slab) / slab[axis] as u64;
        let units = (max_bytes / per_unit.max(1)) as usize / align[axis] * align[axis];
        slab[axis] = units.max(align[axis]).min(shape[axis]);
    }
    (bytes(slab) <= max_bytes).then(|| split(Box3::from_shape(shape), slab))
}

/// Cuts `region` into boxes of `step` (the last ones truncated), z slowest.
pub fn split(region: Box3, step: Vec3) -> Vec<Box3> {
    let mut out = Vec::new();
    let mut z = region.start[2];
    while z < region.stop[2] {
        let mut y = region.start[1];
        while y < region.stop[1] {
            let mut x = region.start[0];
            while x < region.stop[0] {
                let start = [x, y, z];
                let stop = [0, 1, 2].map(|i| (start[i] + step[i]).min(region.stop[i]));
                out.push(Box3::new(start, stop));
                x += step[0];
            }
            y += step[1];
        }
        z += step[2];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slabs_respect_the_limit_and_alignment() {
        let slabs = plan_slabs([1024, 1024, 64], 1, [16, 16, 1], 8 << 20).unwrap();
        assert_eq!(slabs.len(), 8);
        assert!(slabs.iter().all(|s| s.shape() == [1024, 1024, 8]));
        let slabs = plan_slabs([2048, 2048, 32], 2, [32, 32, 32], 64 << 20).unwrap();
        assert!(slabs
            .iter()
            .all(|s| (voxels(s.shape()) * 2) as u64 <= 64 << 20 && s.start[1] % 32 == 0));
        assert_eq!(
            slabs.iter().map(|s| voxels(s.shape())).sum::<usize>(),
            2048 * 2048 * 32
        );
        assert!(plan_slabs([64, 64, 64], 4, [64, 64, 64], 1000).is_none());
    }

    #[test]
    fn tiles_cover_the_region_once() {
        let region = Box3::new([0, 0, 0], [1000, 700, 130]);
        let tiles = plan_tiles(region, [256, 256, 64], 1, 64 << 20);
        assert_eq!(
            tiles.iter().map(|t| voxels(t.shape())).sum::<usize>(),
            1000 * 700 * 130
        );
        assert!(tiles
            .iter()
            .all(|t| t.start.iter().zip([256, 256, 64]).all(|(s, a)| s % a == 0)));
    }

    #[test]
    fn regions_round_outward_to_alignment() {
        let r = align_region(
            Box3::new([10, 300, 5], [20, 301, 6]),
            [64, 64, 16],
            [100, 1000, 10],
        );
        assert_eq!(r, Box3::new([0, 256, 0], [64, 320, 10]));
    }
}
