//! Row identity and where a chunk's rows live: the two facts every part of a table's cache
//! (chunks, key and secondary indexes, stored-row references) shares, at the bottom of the
//! storage crate's table side.

use std::sync::Arc;

use arrow::array::RecordBatch;

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
                let idx = arrow::array::UInt32Array::from(
                    positions.iter().map(|&p| p as u32).collect::<Vec<_>>(),
                );
                Ok(arrow::compute::take_record_batch(batch, &idx)?)
            }
            Rows::Cold(file) => file.read(None, Some(positions)),
        }
    }
}

/// A chunk found in a state it cannot be in.
pub(crate) fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt {
        what: "columnar chunk",
        detail: what.to_string(),
    }
}
