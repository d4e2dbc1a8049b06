//! The stored result of a materialized view: a multiset of rows in the columnar cache.
//!
//! The view runtime applies each epoch's output changelog (rows with signed weights) here;
//! SELECTs read cheap snapshots of the Arrow chunks, exactly like a table's. Rows are found
//! for deletion by their arrow-row encoding, which maps to the row ids holding copies of it.

use std::collections::HashMap;

use arrow::array::{RecordBatch, UInt32Array, UInt64Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::SchemaRef;
use arrow_row::{RowConverter, SortField};

use crate::columnar::{ColumnarTable, RowId, TableSnapshot};
use crate::error::{Result, StorageError};
use crate::log_entry::LogEntry;

/// The maintained contents of one materialized view.
#[derive(Debug)]
pub struct ViewContents {
    table: ColumnarTable,
    converter: RowConverter,
    /// Encoded row to the ids of its copies.
    copies: HashMap<Box<[u8]>, Vec<RowId>>,
    /// Net change of each row's number of copies since the last checkpoint (a version of a
    /// row that came and went in between nets to zero and is not written).
    dirty: HashMap<Box<[u8]>, i64>,
}

impl ViewContents {
    /// Empty contents with the view's schema.
    pub fn try_new(schema: SchemaRef) -> Result<Self> {
        let converter = RowConverter::new(
            schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        Ok(Self {
            table: ColumnarTable::try_new(schema, None)?,
            converter,
            copies: HashMap::new(),
            dirty: HashMap::new(),
        })
    }

    /// Rows whose number of copies changed since the last call, each with its count now
    /// (0: gone), for a checkpoint.
    pub fn take_dirty(&mut self) -> Vec<(Box<[u8]>, i64)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter(|(_, delta)| *delta != 0)
            .map(|(k, _)| {
                let n = self.copies.get(&k).map_or(0, |ids| ids.len() as i64);
                (k, n)
            })
            .collect()
    }

    /// Every row with its number of copies (a full checkpoint); forgets what was dirty.
    pub fn all_counts(&mut self) -> Vec<(Box<[u8]>, i64)> {
        self.dirty.clear();
        self.copies
            .iter()
            .map(|(k, ids)| (k.clone(), ids.len() as i64))
            .collect()
    }

    /// Loads checkpointed rows (encoded, with their counts) into empty contents.
    pub fn restore(&mut self, rows: &[(Vec<u8>, i64)]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let parser = self.converter.parser();
        let columns = self
            .converter
            .convert_rows(rows.iter().map(|(k, _)| parser.parse(k)))?;
        let batch = RecordBatch::try_new(self.table.schema(), columns)?;
        let weights: Vec<i64> = rows.iter().map(|(_, n)| *n).collect();
        self.apply(&batch, &weights)?;
        self.dirty.clear();
        Ok(())
    }

    /// Number of rows (copies counted).
    pub fn num_rows(&self) -> usize {
        self.table.num_rows()
    }

    /// Approximate bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.table.memory_bytes() + self.copies.keys().map(|k| k.len() + 32).sum::<usize>()
    }

    /// A consistent snapshot for a scan.
    pub fn snapshot(&self) -> Result<TableSnapshot> {
        self.table.snapshot()
    }

    /// The rows as a columnar table (for cache figures and eviction; changes go through
    /// [`ViewContents::apply`]).
    pub fn table(&self) -> &ColumnarTable {
        &self.table
    }

    /// The rows as a columnar table, for evicting chunks.
    pub fn table_mut(&mut self) -> &mut ColumnarTable {
        &mut self.table
    }

    /// Applies a changelog: each row is added `weight` times (removed when negative).
    /// Removing a row that is not present is an error: it means the view diverged.
    pub fn apply(&mut self, batch: &RecordBatch, weights: &[i64]) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let rows = self.converter.convert_columns(batch.columns())?;
        let mut deletes = Vec::new();
        let mut picks: Vec<u32> = Vec::new();
        let mut inserted_keys: Vec<usize> = Vec::new();
        for (i, &w) in weights.iter().enumerate() {
            if w != 0 {
                match self.dirty.get_mut(rows.row(i).as_ref()) {
                    Some(delta) => *delta += w,
                    None => {
                        self.dirty.insert(rows.row(i).as_ref().into(), w);
                    }
                }
            }
            if w < 0 {
                let key = rows.row(i);
                let ids = self
                    .copies
                    .get_mut(key.as_ref())
                    .ok_or_else(|| missing_row(w))?;
                for _ in 0..(-w) {
                    deletes.push(ids.pop().ok_or_else(|| missing_row(w))?);
                }
                if ids.is_empty() {
                    self.copies.remove(key.as_ref());
                }
            } else {
                for _ in 0..w {
                    picks.push(i as u32);
                    inserted_keys.push(i);
                }
            }
        }
        if !deletes.is_empty() {
            self.table.apply(&LogEntry::Delete {
                row_ids: UInt64Array::from(deletes),
            })?;
        }
        if !picks.is_empty() {
            let batch = take_record_batch(batch, &UInt32Array::from(picks))?;
            let batch = RecordBatch::try_new(self.table.schema(), batch.columns().to_vec())?;
            let ids = self.table.allocate_row_ids(batch.num_rows());
            for (&row, &id) in inserted_keys.iter().zip(ids.values()) {
                self.copies
                    .entry(rows.row(row).as_ref().into())
                    .or_default()
                    .push(id);
            }
            self.table.apply(&LogEntry::Insert {
                row_ids: ids,
                batch,
            })?;
        }
        Ok(())
    }
}

fn missing_row(weight: i64) -> StorageError {
    StorageError::Corrupt {
        what: "view contents",
        detail: format!(
            "a change removes {} copies of a row the view does not hold",
            -weight
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn multiset_inserts_and_deletes() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut v = ViewContents::try_new(schema.clone()).unwrap();
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![Some(1), None, Some(1)]))],
        )
        .unwrap();
        v.apply(&b, &[2, 1, 1]).unwrap();
        assert_eq!(v.num_rows(), 4);
        v.apply(&b.slice(0, 1), &[-3]).unwrap();
        assert_eq!(v.num_rows(), 1);
        assert!(v.apply(&b.slice(0, 1), &[-1]).is_err());
    }

    #[test]
    fn checkpointed_rows_restore_the_same_multiset() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut v = ViewContents::try_new(schema.clone()).unwrap();
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![Some(1), None, Some(2)]))],
        )
        .unwrap();
        v.apply(&b, &[2, 1, 1]).unwrap();
        let all: Vec<(Vec<u8>, i64)> = v
            .all_counts()
            .into_iter()
            .map(|(k, n)| (k.to_vec(), n))
            .collect();
        assert!(v.take_dirty().is_empty());
        v.apply(&b.slice(2, 1), &[-1]).unwrap();
        v.apply(&b.slice(1, 1), &[1]).unwrap();
        v.apply(&b.slice(1, 1), &[-1]).unwrap();
        let dirty = v.take_dirty();
        assert_eq!(
            dirty.len(),
            1,
            "a row that came and went is not written: {dirty:?}"
        );
        assert_eq!(dirty[0].1, 0, "the row is gone");
        let mut w = ViewContents::try_new(schema).unwrap();
        w.restore(&all).unwrap();
        assert_eq!(w.num_rows(), 4);
        assert!(w.take_dirty().is_empty());
    }
}
