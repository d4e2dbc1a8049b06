//! The rows of one join side that share a join key (a bucket of the join's state), each with
//! its weight and degree, ordered by their encoding so that matches are emitted in value
//! order.
//!
//! Most buckets hold one row (joins on a key of one side), so a single row is kept inline;
//! a B-tree is allocated from the second row on. A B-tree leaf for one row costs ~380 bytes,
//! four times a typical row (measured in `tests/state_bytes.rs`).

use std::collections::BTreeMap;
use std::collections::btree_map;

/// A row's copies in the bucket and how many rows of the other side it joins with.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub weight: i64,
    pub degree: i64,
}

/// The rows of one side under one join key (an empty tree allocates nothing).
#[derive(Debug)]
pub enum Bucket {
    One(Box<[u8]>, Entry),
    Many(BTreeMap<Box<[u8]>, Entry>),
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket::Many(BTreeMap::new())
    }
}

/// Rows of a bucket in encoding order.
pub enum Iter<'a> {
    One(Option<(&'a [u8], &'a Entry)>),
    Many(btree_map::Iter<'a, Box<[u8]>, Entry>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a [u8], &'a Entry);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::One(one) => one.take(),
            Iter::Many(many) => many.next().map(|(row, entry)| (row.as_ref(), entry)),
        }
    }
}

impl Bucket {
    /// Rows held.
    pub fn len(&self) -> usize {
        match self {
            Bucket::One(..) => 1,
            Bucket::Many(m) => m.len(),
        }
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows in encoding order.
    pub fn iter(&self) -> Iter<'_> {
        match self {
            Bucket::One(row, entry) => Iter::One(Some((row.as_ref(), entry))),
            Bucket::Many(m) => Iter::Many(m.iter()),
        }
    }

    /// The entry of `row`, if held.
    pub fn get_mut(&mut self, row: &[u8]) -> Option<&mut Entry> {
        match self {
            Bucket::One(r, entry) => (r.as_ref() == row).then_some(entry),
            Bucket::Many(m) => m.get_mut(row),
        }
    }

    /// The entry of `row`, inserted with `init` when absent.
    pub fn entry_or_insert_with(
        &mut self,
        row: Box<[u8]>,
        init: impl FnOnce() -> Entry,
    ) -> &mut Entry {
        let mut row = Some(row);
        let mut init = Some(init);
        let other_row = match self {
            Bucket::One(r, _) => Some(r.as_ref()) != row.as_deref(),
            Bucket::Many(m) => m.is_empty(),
        };
        if other_row {
            *self = match std::mem::take(self) {
                Bucket::One(r, e) => Bucket::Many(BTreeMap::from([(r, e)])),
                Bucket::Many(_) => Bucket::One(
                    row.take().unwrap_or_default(),
                    init.take().map_or_else(Entry::default, |f| f()),
                ),
            };
        }
        match self {
            Bucket::One(_, entry) => entry,
            Bucket::Many(m) => m
                .entry(row.take().unwrap_or_default())
                .or_insert_with(|| init.take().map_or_else(Entry::default, |f| f())),
        }
    }

    /// Inserts (or replaces) the entry of `row`.
    pub fn insert(&mut self, row: Box<[u8]>, entry: Entry) {
        *self.entry_or_insert_with(row, Entry::default) = entry;
    }

    /// Removes `row`; a bucket left with one row keeps it inline again.
    pub fn remove(&mut self, row: &[u8]) {
        match self {
            Bucket::One(r, _) if r.as_ref() == row => *self = Bucket::default(),
            Bucket::One(..) => {}
            Bucket::Many(m) => {
                m.remove(row);
                if m.len() == 1
                    && let Some((r, e)) = m.pop_first()
                {
                    *self = Bucket::One(r, e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(b: &Bucket) -> Vec<(Vec<u8>, i64)> {
        b.iter().map(|(r, e)| (r.to_vec(), e.weight)).collect()
    }

    #[test]
    fn grows_from_inline_to_tree_and_back_in_order() {
        let mut b = Bucket::default();
        assert!(b.is_empty());
        b.entry_or_insert_with(b"m".as_slice().into(), Entry::default)
            .weight += 1;
        assert!(matches!(b, Bucket::One(..)));
        b.entry_or_insert_with(b"m".as_slice().into(), Entry::default)
            .weight += 1;
        assert_eq!(rows(&b), vec![(b"m".to_vec(), 2)]);
        b.insert(
            b"a".as_slice().into(),
            Entry {
                weight: 5,
                degree: 0,
            },
        );
        b.insert(
            b"z".as_slice().into(),
            Entry {
                weight: 7,
                degree: 0,
            },
        );
        assert_eq!(
            rows(&b),
            vec![(b"a".to_vec(), 5), (b"m".to_vec(), 2), (b"z".to_vec(), 7)]
        );
        assert_eq!(b.get_mut(b"z").map(|e| e.weight), Some(7));
        assert!(b.get_mut(b"q").is_none());
        b.remove(b"m");
        b.remove(b"a");
        assert!(matches!(b, Bucket::One(..)), "one row left is inline again");
        assert_eq!(rows(&b), vec![(b"z".to_vec(), 7)]);
        b.remove(b"nope");
        b.remove(b"z");
        assert!(b.is_empty());
    }
}
