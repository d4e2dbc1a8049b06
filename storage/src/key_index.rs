//! The primary-key index of a table's columnar cache (`columnar.rs`): the 64-bit hash of
//! each live row's encoded key to its row id. A view's row index (`view_contents.rs`) is one
//! too, over whole rows, where a hash's several ids are mostly copies of one row.
//!
//! The index stays in memory for every row, hot or cold, so it holds no key bytes: about
//! 20 bytes a row instead of the 50 a map from boxed keys took (a million-row table's index
//! was most of what a fully evicted table kept in memory). Two keys may share a hash, so a
//! lookup gives candidates: a scan keeps DataFusion's filter above the lookup, and the
//! uniqueness check compares the candidates' keys (see `ColumnarTable::find_duplicate_key`).

use std::collections::HashMap;
use std::collections::hash_map::{Entry, RandomState};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use crate::rows::RowId;

/// Hashes a key that is already a hash: the identity.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Key hash to row ids.
#[derive(Debug, Default)]
pub struct KeyIndex {
    hasher: RandomState,
    /// The first row with each hash.
    first: HashMap<u64, RowId, BuildHasherDefault<PreHashed>>,
    /// Further rows with a hash already in `first` (keys that collide).
    more: HashMap<u64, Vec<RowId>>,
    /// Number of rows indexed.
    len: usize,
}

impl KeyIndex {
    /// The hash of an encoded key.
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Indexes row `id` under `hash`.
    pub fn insert(&mut self, hash: u64, id: RowId) {
        match self.first.entry(hash) {
            Entry::Vacant(v) => {
                v.insert(id);
            }
            Entry::Occupied(_) => self.more.entry(hash).or_default().push(id),
        }
        self.len += 1;
    }

    /// Removes row `id` from under `hash`; returns whether it was there.
    pub fn remove(&mut self, hash: u64, id: RowId) -> bool {
        if self.first.get(&hash) == Some(&id) {
            let next = self.more.get_mut(&hash).and_then(Vec::pop);
            if self.more.get(&hash).is_some_and(Vec::is_empty) {
                self.more.remove(&hash);
            }
            match next {
                Some(next) => self.first.insert(hash, next),
                None => self.first.remove(&hash),
            };
            self.len -= 1;
            return true;
        }
        let Some(ids) = self.more.get_mut(&hash) else {
            return false;
        };
        let Some(at) = ids.iter().position(|x| *x == id) else {
            return false;
        };
        ids.swap_remove(at);
        if ids.is_empty() {
            self.more.remove(&hash);
        }
        self.len -= 1;
        true
    }

    /// The rows whose key has this hash: the row with the key, if any, and rarely others.
    pub fn candidates(&self, hash: u64) -> impl Iterator<Item = RowId> + '_ {
        self.first
            .get(&hash)
            .into_iter()
            .chain(self.more.get(&hash).into_iter().flatten())
            .copied()
    }

    /// Number of rows indexed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no row is indexed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Approximate bytes held: a slot of hash, id and control byte per bucket.
    pub fn memory_bytes(&self) -> usize {
        self.first.capacity() * 17 + self.more.capacity() * 41 + (self.len - self.first.len()) * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colliding_hashes_keep_every_row() {
        let mut index = KeyIndex::default();
        let h = index.hash(b"key");
        assert_eq!(h, index.hash(b"key"));
        assert_ne!(h, index.hash(b"other"));
        index.insert(h, 1);
        index.insert(h, 2);
        index.insert(h, 3);
        index.insert(7, 9);
        assert_eq!(index.len(), 4);
        let mut all: Vec<RowId> = index.candidates(h).collect();
        all.sort_unstable();
        assert_eq!(all, vec![1, 2, 3]);
        assert!(index.remove(h, 1), "the first row; another takes its place");
        assert!(!index.remove(h, 1));
        assert!(index.remove(h, 3));
        assert_eq!(index.candidates(h).collect::<Vec<_>>(), vec![2]);
        assert!(index.remove(h, 2));
        assert_eq!(index.candidates(h).count(), 0);
        assert!(!index.remove(8, 9), "another hash");
        assert_eq!(index.candidates(7).collect::<Vec<_>>(), vec![9]);
        assert_eq!(index.len(), 1);
        assert!(index.more.is_empty());
    }
}
