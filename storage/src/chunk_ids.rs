//! The row ids of one chunk of the columnar cache (`columnar.rs`): a range when they are
//! contiguous (an INSERT's rows get consecutive ids), else a list.
//!
//! The ids stay in memory when the chunk's rows are evicted, for every row of every table
//! and view, so a range instead of 8 bytes a row is most of what a cold chunk keeps (a
//! spilled 2M-row table held 16 MB of ids).

use arrow::array::{Array, UInt64Array};

use crate::rows::RowId;

/// Row ids aligned with a chunk's rows.
#[derive(Debug, Clone)]
pub enum ChunkIds {
    /// `first`, `first + 1`, ..., `first + len - 1`.
    Range { first: RowId, len: usize },
    /// Any other ids, in row order.
    List(UInt64Array),
}

impl ChunkIds {
    /// The ids of `ids`, as a range when they are contiguous and ascending.
    pub fn new(ids: UInt64Array) -> Self {
        let values = ids.values();
        let contiguous = ids.null_count() == 0
            && values
                .first()
                .is_some_and(|&first| values.iter().zip(first..).all(|(&id, want)| id == want));
        match values.first() {
            Some(&first) if contiguous => ChunkIds::Range {
                first,
                len: values.len(),
            },
            _ => ChunkIds::List(ids),
        }
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        match self {
            ChunkIds::Range { len, .. } => *len,
            ChunkIds::List(ids) => ids.len(),
        }
    }

    /// The id of row `row`.
    pub fn get(&self, row: usize) -> Option<RowId> {
        match self {
            ChunkIds::Range { first, len } => (row < *len).then(|| first + row as RowId),
            ChunkIds::List(ids) => ids.values().get(row).copied(),
        }
    }

    /// The first id.
    pub fn first(&self) -> Option<RowId> {
        self.get(0)
    }

    /// The last id.
    pub fn last(&self) -> Option<RowId> {
        self.len().checked_sub(1).and_then(|row| self.get(row))
    }

    /// Whether the ids ascend.
    pub fn ascending(&self) -> bool {
        match self {
            ChunkIds::Range { .. } => true,
            ChunkIds::List(ids) => ids.values().windows(2).all(|w| w[0] < w[1]),
        }
    }

    /// The row of `id`, if the ids ascend and hold it.
    pub fn position(&self, id: RowId) -> Option<usize> {
        match self {
            ChunkIds::Range { first, len } => {
                let row = usize::try_from(id.checked_sub(*first)?).ok()?;
                (row < *len).then_some(row)
            }
            ChunkIds::List(ids) => ids.values().binary_search(&id).ok(),
        }
    }

    /// The ids in row order.
    pub fn iter(&self) -> impl Iterator<Item = RowId> + '_ {
        (0..self.len()).filter_map(|row| self.get(row))
    }

    /// The ids of the rows whose `live` is true.
    pub fn filter(&self, live: &[bool]) -> UInt64Array {
        self.iter()
            .zip(live)
            .filter_map(|(id, l)| l.then_some(id))
            .collect()
    }

    /// The ids as an array (a range's are made).
    pub fn to_array(&self) -> UInt64Array {
        match self {
            ChunkIds::Range { .. } => self.iter().collect(),
            ChunkIds::List(ids) => ids.clone(),
        }
    }

    /// Whether [`ChunkIds::to_array`] allocates.
    pub fn is_range(&self) -> bool {
        matches!(self, ChunkIds::Range { .. })
    }

    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        match self {
            ChunkIds::Range { .. } => 0,
            ChunkIds::List(ids) => ids.get_array_memory_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_ids_are_a_range_and_others_a_list() {
        let range = ChunkIds::new(UInt64Array::from(vec![5, 6, 7, 8]));
        assert!(range.is_range());
        assert_eq!(range.memory_bytes(), 0);
        assert_eq!((range.first(), range.last()), (Some(5), Some(8)));
        assert_eq!(range.position(7), Some(2));
        assert_eq!(range.position(4), None);
        assert_eq!(range.position(9), None);
        assert_eq!(range.get(4), None);
        assert_eq!(
            range.filter(&[true, false, true, false]).values().to_vec(),
            vec![5, 7]
        );
        assert_eq!(range.to_array().values().to_vec(), vec![5, 6, 7, 8]);

        let gap = ChunkIds::new(UInt64Array::from(vec![5, 6, 8]));
        assert!(!gap.is_range() && gap.ascending());
        assert_eq!(gap.position(8), Some(2));
        assert_eq!(gap.position(7), None);
        let down = ChunkIds::new(UInt64Array::from(vec![3, 2]));
        assert!(!down.is_range() && !down.ascending());
        assert_eq!(down.iter().collect::<Vec<_>>(), vec![3, 2]);
        let empty = ChunkIds::new(UInt64Array::from(Vec::<u64>::new()));
        assert!(empty.len() == 0 && empty.first().is_none() && empty.last().is_none());
    }
}
