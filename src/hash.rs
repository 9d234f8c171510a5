//! A fast, deterministic hasher for maps keyed by integers (labels, ids, tables of labels):
//! SipHash's protection against adversarial keys is not needed there and costs most of the time.

/// Multiply-rotate hashing of the integers written into it.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl IdHasher {
    #[inline]
    fn mix(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.mix(b as u64);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.mix(v as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.mix(v);
    }
    fn write_usize(&mut self, v: usize) {
        self.mix(v as u64);
    }
}

/// The `BuildHasher` for std maps and sets.
pub type IdBuildHasher = std::hash::BuildHasherDefault<IdHasher>;

/// A map from u32 ids (any but `u32::MAX`) to u32 values: open addressing with linear probing
/// in one array of (key, value) pairs, at most half full. A lookup usually touches one cache
/// line, where a std `HashMap` touches two (its control bytes, then its entries): what large
/// adjacency maps, probed at random, are bound by. Removal shifts the entries after a gap back,
/// so no tombstones build up.
#[derive(Clone, Debug, Default)]
pub struct IdMap {
    slots: Vec<(u32, u32)>,
    len: usize,
}

const EMPTY: u32 = u32::MAX;

impl IdMap {
    /// A map that holds `n` entries without growing.
    pub fn with_capacity(n: usize) -> IdMap {
        IdMap {
            slots: vec![(EMPTY, 0); (2 * n).next_power_of_two().max(8)],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The slot a key's probe starts at: Fibonacci hashing, the product's top bits.
    fn home(&self, key: u32) -> usize {
        let bits = self.slots.len().trailing_zeros();
        ((key.wrapping_mul(0x9E37_79B9) as u64) << 32 >> (64 - bits)) as usize
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn find(&self, key: u32) -> (usize, bool) {
        debug_assert_ne!(key, EMPTY, "u32::MAX is the empty key");
        if self.slots.is_empty() {
            return (0, false);
        }
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            match self.slots[i].0 {
                k if k == key => return (i, true),
                EMPTY => return (i, false),
                _ => i = (i + 1) & mask,
            }
        }
    }

    pub fn get_mut(&mut self, key: u32) -> Option<&mut u32> {
        match self.find(key) {
            (i, true) => Some(&mut self.slots[i].1),
            _ => None,
        }
    }

    /// Sets `key` to `value`; returns the value it had.
    pub fn insert(&mut self, key: u32, value: u32) -> Option<u32> {
        if 2 * (self.len + 1) > self.slots.len() {
            self.grow();
        }
        match self.find(key) {
            (i, true) => Some(std::mem::replace(&mut self.slots[i].1, value)),
            (i, false) => {
                self.slots[i] = (key, value);
                self.len += 1;
                None
            }
        }
    }

    fn grow(&mut self) {
        let size = (2 * self.slots.len()).max(8);
        let old = std::mem::replace(&mut self.slots, vec![(EMPTY, 0); size]);
        for (key, value) in old.into_iter().filter(|e| e.0 != EMPTY) {
            let (i, _) = self.find(key);
            self.slots[i] = (key, value);
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: u32) -> Option<u32> {
        let (mut gap, found) = self.find(key);
        if !found {
            return None;
        }
        let value = self.slots[gap].1;
        let mask = self.mask();
        // Entries after the gap whose probe started at or before it move back into it.
        let mut j = gap;
        loop {
            j = (j + 1) & mask;
            let k = self.slots[j].0;
            if k == EMPTY {
                break;
            }
            let home = self.home(k);
            // Distances from `home` going forward: the entry may fill the gap when the gap lies
            // on its probe path, i.e. no further from home than the entry itself.
            if (gap.wrapping_sub(home) & mask) < (j.wrapping_sub(home) & mask) {
                self.slots[gap] = self.slots[j];
                gap = j;
            }
        }
        self.slots[gap] = (EMPTY, 0);
        self.len -= 1;
        Some(value)
    }

    /// The (key, value) entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.slots.iter().copied().filter(|e| e.0 != EMPTY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Random inserts, overwrites, removals and lookups, clustered keys among them, agree with
    /// std's HashMap at every step.
    #[test]
    fn id_map_agrees_with_a_hash_map() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for round in 0..4 {
            let mut map = if round == 0 {
                IdMap::default()
            } else {
                IdMap::with_capacity(round * 10)
            };
            let mut reference: HashMap<u32, u32> = HashMap::new();
            for step in 0..20_000u32 {
                let r = next();
                // Keys from a small range (many collisions and removals of present keys), from
                // runs of consecutive ids, and the largest ids.
                let key = match r % 3 {
                    0 => (r >> 8) as u32 % 300,
                    1 => 1_000_000 + (r >> 8) as u32 % 64,
                    _ => u32::MAX - 1 - (r >> 8) as u32 % 5,
                };
                match (r >> 40) % 4 {
                    0 | 1 => assert_eq!(map.insert(key, step), reference.insert(key, step)),
                    2 => assert_eq!(map.remove(key), reference.remove(&key)),
                    _ => assert_eq!(map.get_mut(key).copied(), reference.get(&key).copied()),
                }
                assert_eq!(map.len(), reference.len());
            }
            let mut entries: Vec<(u32, u32)> = map.iter().collect();
            let mut expected: Vec<(u32, u32)> = reference.into_iter().collect();
            entries.sort();
            expected.sort();
            assert_eq!(entries, expected);
        }
    }
}
