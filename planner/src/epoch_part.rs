//! One part of an epoch's change to a source, as the view coordinator hands it to the
//! pipelines: rows in memory, or rows still where the table keeps them.
//!
//! A DELETE or UPDATE of a table refers to the rows it deleted ([`StoredRows`]) instead of
//! reading them at commit; [`Pipeline::step_bounded`](crate::pipeline::Pipeline::step_bounded)
//! reads them one step's slice at a time. A large change over a spilled table is then never
//! in memory whole (286k deleted rows of 180 bytes held 51 MB until every view was done).
//! A view's own change, when it was too large to hold, reaches the views downstream as its
//! spilled partitions, read the same way ([`crate::spilled_change`]).

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use millrace_storage::StoredRows;

use crate::changelog::Changelog;
use crate::error::Result;
use crate::spilled_change::{SpillFile, ViewChange};

/// A change to one source within an epoch.
#[derive(Debug, Clone)]
pub enum EpochPart {
    /// Rows and weights in memory.
    Rows(Changelog),
    /// Stored rows, each with `weight` (-1: deleted), read when the views take them.
    Stored {
        /// Where the rows are.
        rows: StoredRows,
        /// The weight of every row.
        weight: i64,
    },
    /// Rows `offset..offset + len` of a partition of a view's spilled change, with their
    /// weights, read when the views take them.
    Spilled {
        /// The partition.
        file: Arc<SpillFile>,
        /// The first row.
        offset: usize,
        /// How many rows.
        len: usize,
    },
}

impl From<Changelog> for EpochPart {
    fn from(change: Changelog) -> Self {
        EpochPart::Rows(change)
    }
}

impl EpochPart {
    /// Stored rows that were deleted.
    pub fn deleted(rows: StoredRows) -> Self {
        EpochPart::Stored { rows, weight: -1 }
    }

    /// Stored rows that were inserted.
    pub fn inserted(rows: StoredRows) -> Self {
        EpochPart::Stored { rows, weight: 1 }
    }

    /// A view's change as its downstream views take it: one part, or a part for each
    /// spilled partition.
    pub fn of_view(change: &ViewChange) -> Vec<Self> {
        match change {
            ViewChange::Rows(c) => vec![EpochPart::Rows(c.clone())],
            ViewChange::Spilled(s) => s
                .files()
                .iter()
                .map(|file| EpochPart::Spilled {
                    file: file.clone(),
                    offset: 0,
                    len: file.len(),
                })
                .collect(),
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            EpochPart::Rows(c) => c.len(),
            EpochPart::Stored { rows, .. } => rows.len(),
            EpochPart::Spilled { len, .. } => *len,
        }
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Schema of the rows.
    pub fn schema(&self) -> SchemaRef {
        match self {
            EpochPart::Rows(c) => c.schema(),
            EpochPart::Stored { rows, .. } => rows.schema(),
            EpochPart::Spilled { file, .. } => file.schema(),
        }
    }

    /// Bytes held in memory now.
    pub fn bytes(&self) -> usize {
        match self {
            EpochPart::Rows(c) => c.bytes(),
            EpochPart::Stored { rows, .. } => rows.memory_bytes(),
            EpochPart::Spilled { .. } => 0,
        }
    }

    /// About the bytes the rows take once in memory (what one pipeline step takes in).
    pub fn bytes_when_read(&self) -> usize {
        match self {
            EpochPart::Rows(c) => c.bytes(),
            EpochPart::Stored { rows, .. } => rows.bytes_when_read(),
            EpochPart::Spilled { file, len, .. } => file.bytes_when_read(*len),
        }
    }

    /// `len` rows from `offset` on (nothing is read).
    pub fn slice(&self, offset: usize, len: usize) -> Self {
        match self {
            EpochPart::Rows(c) => EpochPart::Rows(c.slice(offset, len)),
            EpochPart::Stored { rows, weight } => EpochPart::Stored {
                rows: rows.slice(offset, len),
                weight: *weight,
            },
            EpochPart::Spilled {
                file, offset: o, ..
            } => EpochPart::Spilled {
                file: file.clone(),
                offset: o + offset,
                len,
            },
        }
    }

    /// The rows and their weights in memory (stored rows are read now).
    pub fn read(&self) -> Result<Changelog> {
        match self {
            EpochPart::Rows(c) => Ok(c.clone()),
            EpochPart::Stored { rows, weight } => {
                let schema = rows.schema();
                let parts = rows
                    .read()?
                    .into_iter()
                    .map(|batch| {
                        let n = batch.num_rows();
                        Changelog::new(batch, vec![*weight; n])
                    })
                    .collect::<Vec<_>>();
                match parts.len() {
                    0 => Ok(Changelog::empty(schema)),
                    _ => Changelog::concat(&schema, parts),
                }
            }
            EpochPart::Spilled { file, offset, len } => file.read(*offset, *len),
        }
    }

    /// Reads and concatenates parts with one schema into one change.
    pub fn concat(schema: &SchemaRef, parts: &[EpochPart]) -> Result<Changelog> {
        if let [one] = parts {
            return one.read();
        }
        let read = parts
            .iter()
            .map(EpochPart::read)
            .collect::<Result<Vec<_>>>()?;
        Changelog::concat(schema, read)
    }
}
