//! Small integer geometry: 3-vectors and boxes in voxel coordinates, Fortran (x-fastest) order.

/// A voxel extent or position `[x, y, z]`.
pub type Vec3 = [usize; 3];

/// Ceiling division, for sizes of downsampled levels.
pub fn div_ceil3(a: Vec3, b: Vec3) -> Vec3 {
    [
        a[0].div_ceil(b[0]),
        a[1].div_ceil(b[1]),
        a[2].div_ceil(b[2]),
    ]
}

pub fn mul3(a: Vec3, b: Vec3) -> Vec3 {
    [a[0] * b[0], a[1] * b[1], a[2] * b[2]]
}

pub fn min3(a: Vec3, b: Vec3) -> Vec3 {
    [a[0].min(b[0]), a[1].min(b[1]), a[2].min(b[2])]
}

pub fn voxels(shape: Vec3) -> usize {
    shape[0] * shape[1] * shape[2]
}

/// `factor^k` per axis: the size of a level-`k` block in level-0 voxels.
pub fn pow3(factor: Vec3, k: u32) -> Vec3 {
    [factor[0].pow(k), factor[1].pow(k), factor[2].pow(k)]
}

/// A half-open box `[start, stop)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Box3 {
    pub start: Vec3,
    pub stop: Vec3,
}

impl Box3 {
    pub fn new(start: Vec3, stop: Vec3) -> Box3 {
        Box3 { start, stop }
    }

    pub fn from_shape(shape: Vec3) -> Box3 {
        Box3::new([0; 3], shape)
    }

    pub fn shape(&self) -> Vec3 {
        [
            self.stop[0].saturating_sub(self.start[0]),
            self.stop[1].saturating_sub(self.start[1]),
            self.stop[2].saturating_sub(self.start[2]),
        ]
    }

    pub fn is_empty(&self) -> bool {
        (0..3).any(|i| self.stop[i] <= self.start[i])
    }

    pub fn intersect(&self, other: &Box3) -> Box3 {
        let start = [0, 1, 2].map(|i| self.start[i].max(other.start[i]));
        let stop = [0, 1, 2].map(|i| self.stop[i].min(other.stop[i]).max(start[i]));
        Box3::new(start, stop)
    }

    /// This box in coordinates whose origin is `origin` (which it must not precede).
    pub fn relative_to(&self, origin: Vec3) -> Box3 {
        Box3::new(
            [0, 1, 2].map(|i| self.start[i] - origin[i]),
            [0, 1, 2].map(|i| self.stop[i] - origin[i]),
        )
    }

    /// This box moved by `offset`.
    pub fn offset_by(&self, offset: Vec3) -> Box3 {
        Box3::new(
            [0, 1, 2].map(|i| self.start[i] + offset[i]),
            [0, 1, 2].map(|i| self.stop[i] + offset[i]),
        )
    }

    /// The box of level `k` covering this level-0 box when each level shrinks by `factor`.
    pub fn downsampled(&self, factor: Vec3, k: u32) -> Box3 {
        let f = pow3(factor, k);
        Box3::new(
            [0, 1, 2].map(|i| self.start[i] / f[i]),
            [0, 1, 2].map(|i| self.stop[i].div_ceil(f[i])),
        )
    }
}

/// A position inside a Fortran-ordered array of `shape`.
#[derive(Clone, Copy, Debug)]
pub struct At {
    pub shape: Vec3,
    pub origin: Vec3,
}

impl At {
    fn row_start(&self, y: usize, z: usize) -> usize {
        self.origin[0]
            + self.shape[0] * ((self.origin[1] + y) + self.shape[1] * (self.origin[2] + z))
    }
}

/// Copies a box of voxels between two Fortran-ordered single-channel arrays of
/// `elem` bytes per voxel. Rows along x are contiguous, so this is one memcpy per row.
pub fn copy_box(src: &[u8], from: At, dst: &mut [u8], to: At, extent: Vec3, elem: usize) {
    let row = extent[0] * elem;
    if row == 0 {
        return;
    }
    for z in 0..extent[2] {
        for y in 0..extent[1] {
            let s = elem * from.row_start(y, z);
            let d = elem * to.row_start(y, z);
            dst[d..d + row].copy_from_slice(&src[s..s + row]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampled_box_rounds_outward() {
        let b = Box3::new([2, 0, 5], [9, 8, 7]);
        assert_eq!(b.downsampled([2, 2, 1], 1), Box3::new([1, 0, 5], [5, 4, 7]));
        assert_eq!(b.downsampled([2, 2, 2], 2), Box3::new([0, 0, 1], [3, 2, 2]));
    }

    #[test]
    fn copy_box_moves_the_right_voxels() {
        let src: Vec<u8> = (0..27).collect();
        let mut dst = vec![0u8; 8];
        let from = At {
            shape: [3, 3, 3],
            origin: [1, 1, 1],
        };
        let to = At {
            shape: [2, 2, 2],
            origin: [0, 0, 0],
        };
        copy_box(&src, from, &mut dst, to, [2, 2, 2], 1);
        assert_eq!(dst, vec![13, 14, 16, 17, 22, 23, 25, 26]);
    }
}
