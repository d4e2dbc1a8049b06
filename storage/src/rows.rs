//! Row identity and where a chunk's rows live: the two facts every part of a table's cache
//! (chunks, key and secondary indexes, stored-row references) shares, at the bottom of the
//! storage crate's table side.

use std::sync::Arc;

use arrow::array::{RecordBatch, RecordBatchOptions, UInt32Array};
use arrow::error::ArrowError;

use crate::cold::ColdFile;
use crate::error::{Result, StorageError};

/// Identifier of a row inside one table; never reused.
pub type RowId = u64;

/// Where a chunk's rows are.
#[derive(Debug, Clone)]
pub(crate) enum Rows {
    Hot(RecordBatch),
    Cold(Arc<ColdFile>),
}

impl Rows {
    /// The rows at the given ascending positions (a cold file reads only those).
    pub(crate) fn at(&self, positions: &[usize]) -> Result<RecordBatch> {
        match self {
            Rows::Hot(batch) => {
                let idx =
                    UInt32Array::from(positions.iter().map(|&p| p as u32).collect::<Vec<_>>());
                Ok(take_rows(batch, &idx)?)
            }
            Rows::Cold(file) => file.read(None, Some(positions)),
        }
    }
}

/// The rows of `batch` at `indices`, in that order: arrow's `take_record_batch`, also for a
/// batch of no columns (a view or subquery that reads none of a table's columns, such as
/// `EXISTS (SELECT 1 FROM t)`), whose rows are only a count and which arrow refuses ("must
/// either specify a row count or at least one column").
pub fn take_rows(
    batch: &RecordBatch,
    indices: &UInt32Array,
) -> std::result::Result<RecordBatch, ArrowError> {
    if batch.num_columns() == 0 {
        return RecordBatch::try_new_with_options(
            batch.schema(),
            vec![],
            &RecordBatchOptions::new().with_row_count(Some(indices.len())),
        );
    }
    arrow::compute::take_record_batch(batch, indices)
}

/// A chunk found in a state it cannot be in.
pub(crate) fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt {
        what: "columnar chunk",
        detail: what.to_string(),
    }
}
