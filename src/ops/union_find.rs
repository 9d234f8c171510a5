//! A disjoint-set forest over dense indices: the host side of every labelling step (CPU
//! references, stitching chunks, agglomeration).

/// Union by smaller root index, with path halving. Roots are the smallest member, so the result
/// does not depend on the order unions arrive in (as the GPU's atomicMin union-find).
#[derive(Clone, Debug)]
pub struct UnionFind {
    parent: Vec<u32>,
}

impl UnionFind {
    pub fn new(n: usize) -> UnionFind {
        assert!(n < u32::MAX as usize, "union-find over {n} nodes");
        UnionFind {
            parent: (0..n as u32).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.parent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    pub fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let grand = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = grand;
            x = grand;
        }
        x
    }

    /// Joins the sets of `a` and `b`; returns whether they were apart.
    pub fn union(&mut self, a: u32, b: u32) -> bool {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return false;
        }
        let (lo, hi) = (ra.min(rb), ra.max(rb));
        self.parent[hi as usize] = lo;
        true
    }
}

/// Numbers the classes of `class_of` (one entry per voxel, `None` for background) 1..N in the
/// order of their first voxel: the same numbering whatever the classes were called before, so
/// two runs that agree up to relabelling write identical labels.
pub fn number_by_first_voxel(
    class_of: impl Iterator<Item = Option<u32>>,
    classes: usize,
) -> Vec<u32> {
    let mut id = vec![0u32; classes];
    let mut next = 0u32;
    let mut out = Vec::new();
    for c in class_of {
        out.push(match c {
            None => 0,
            Some(c) => {
                let slot = &mut id[c as usize];
                if *slot == 0 {
                    next += 1;
                    *slot = next;
                }
                *slot
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_the_smallest_member_whatever_the_order() {
        let mut a = UnionFind::new(6);
        a.union(5, 4);
        a.union(4, 2);
        a.union(1, 3);
        let mut b = UnionFind::new(6);
        b.union(2, 4);
        b.union(3, 1);
        b.union(4, 5);
        for x in 0..6 {
            assert_eq!(a.find(x), b.find(x));
        }
        assert_eq!(a.find(5), 2);
        assert_eq!(a.find(3), 1);
        assert!(!a.union(2, 5));
    }

    #[test]
    fn numbering_follows_first_occurrence() {
        let labels =
            number_by_first_voxel([Some(7), None, Some(2), Some(7), Some(0)].into_iter(), 8);
        assert_eq!(labels, vec![1, 0, 2, 1, 3]);
    }
}
