//! A secondary index over one table's columnar cache: an ordered map from the (comparable,
//! arrow-row encoded) value of the index's first column to the rows holding it. Point and
//! range lookups touch only the matching keys. NULLs are not indexed: no `=`, `<`, `>`,
//! `BETWEEN` or `IN` predicate matches them.

use std::collections::BTreeMap;
use std::ops::Bound;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::SchemaRef;
use arrow_row::{RowConverter, SortField};

use crate::error::Result;
use crate::rows::RowId;

/// One secondary index.
#[derive(Debug)]
pub struct SecondaryIndex {
    /// Index name (unique within its schema).
    pub name: String,
    /// Indexed columns; lookups use the first.
    pub columns: Vec<usize>,
    /// Encoder of the first column's values into order-preserving bytes.
    converter: RowConverter,
    /// Encoded value to the rows holding it.
    entries: BTreeMap<Box<[u8]>, Vec<RowId>>,
}

impl SecondaryIndex {
    /// An empty index on `columns` of `schema`.
    pub fn try_new(name: &str, columns: Vec<usize>, schema: &SchemaRef) -> Result<Self> {
        let first = columns.first().copied().unwrap_or(0);
        Ok(Self {
            name: name.to_string(),
            converter: RowConverter::new(vec![SortField::new(
                schema.field(first).data_type().clone(),
            )])?,
            columns,
            entries: BTreeMap::new(),
        })
    }

    /// The column lookups key on.
    pub fn key_column(&self) -> usize {
        self.columns.first().copied().unwrap_or(0)
    }

    /// Number of distinct indexed values.
    pub fn distinct_keys(&self) -> usize {
        self.entries.len()
    }

    /// Encodes single values (a one-row array) as index keys.
    pub fn encode(&self, value: &ArrayRef) -> Result<Box<[u8]>> {
        let rows = self
            .converter
            .convert_columns(std::slice::from_ref(value))?;
        Ok(rows.row(0).as_ref().into())
    }

    /// Adds rows of `batch` (in the table's schema) with their ids.
    pub fn insert(&mut self, batch: &RecordBatch, ids: &[RowId]) -> Result<()> {
        let column = batch.column(self.key_column());
        let rows = self
            .converter
            .convert_columns(std::slice::from_ref(column))?;
        for (i, id) in ids.iter().enumerate() {
            if column.is_null(i) {
                continue;
            }
            self.entries
                .entry(rows.row(i).as_ref().into())
                .or_default()
                .push(*id);
        }
        Ok(())
    }

    /// Removes rows of `batch` with their ids.
    pub fn remove(&mut self, batch: &RecordBatch, ids: &[RowId]) -> Result<()> {
        let column = batch.column(self.key_column());
        let rows = self
            .converter
            .convert_columns(std::slice::from_ref(column))?;
        for (i, id) in ids.iter().enumerate() {
            if column.is_null(i) {
                continue;
            }
            let key: Box<[u8]> = rows.row(i).as_ref().into();
            if let Some(list) = self.entries.get_mut(&key) {
                if let Some(pos) = list.iter().position(|x| x == id) {
                    list.swap_remove(pos);
                }
                if list.is_empty() {
                    self.entries.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// Row ids whose key lies within the bounds.
    pub fn range(&self, lower: Bound<Box<[u8]>>, upper: Bound<Box<[u8]>>) -> Vec<RowId> {
        if let (Bound::Included(l) | Bound::Excluded(l), Bound::Included(u) | Bound::Excluded(u)) =
            (&lower, &upper)
            && (l > u
                || (l == u
                    && !(matches!(lower, Bound::Included(_))
                        && matches!(upper, Bound::Included(_)))))
        {
            return vec![];
        }
        self.entries
            .range((lower, upper))
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn point_and_range_lookups_skip_nulls() -> Result<()> {
        let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut idx = SecondaryIndex::try_new("i", vec![0], &schema)?;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![
                Some(5),
                None,
                Some(-3),
                Some(5),
                Some(10),
            ]))],
        )?;
        idx.insert(&batch, &[1, 2, 3, 4, 5])?;
        let key = |v: i64| idx.encode(&(Arc::new(Int64Array::from(vec![v])) as ArrayRef));
        let mut eq = idx.range(Bound::Included(key(5)?), Bound::Included(key(5)?));
        eq.sort();
        assert_eq!(eq, vec![1, 4]);
        assert_eq!(
            idx.range(Bound::Unbounded, Bound::Excluded(key(5)?)),
            vec![3]
        );
        assert_eq!(
            idx.range(Bound::Excluded(key(5)?), Bound::Unbounded),
            vec![5]
        );
        assert!(
            idx.range(Bound::Included(key(6)?), Bound::Included(key(4)?))
                .is_empty()
        );
        let five = key(5)?;
        idx.remove(&batch.slice(0, 1), &[1])?;
        assert_eq!(
            idx.range(Bound::Included(five.clone()), Bound::Included(five)),
            vec![4]
        );
        Ok(())
    }
}
