//! Rows of a table referred to where the columnar cache keeps them (a hot chunk's batch or a
//! cold chunk's Parquet file) and read when needed, a slice at a time.
//!
//! A DELETE or UPDATE hands the rows it deleted to the views this way
//! ([`ColumnarTable::stored_rows`](crate::ColumnarTable::stored_rows)): the view pipelines
//! read one step's slice at a time, so a large change over a spilled table is not held in
//! memory whole while the views go through it. The references keep the batches and files
//! alive (a file is deleted when its last handle goes), so a later eviction, compaction or
//! rewrite of the table does not change what is read.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::error::Result;
use crate::rows::Rows;

/// Rows of one chunk: its rows (batch or file) at ascending positions.
#[derive(Debug)]
pub(crate) struct Piece {
    pub(crate) rows: Rows,
    pub(crate) positions: Vec<usize>,
}

/// A sequence of stored rows, chunk after chunk, or a slice of one.
#[derive(Debug, Clone)]
pub struct StoredRows {
    schema: SchemaRef,
    pieces: Arc<[Piece]>,
    /// First row of each piece within the whole sequence.
    starts: Arc<[usize]>,
    /// This slice: rows `offset..offset + len` of the whole sequence.
    offset: usize,
    len: usize,
    /// The table's average bytes a row takes in memory (an estimate of what a read brings in).
    bytes_per_row: usize,
}

impl StoredRows {
    pub(crate) fn new(schema: SchemaRef, pieces: Vec<Piece>, bytes_per_row: usize) -> Self {
        let mut starts = Vec::with_capacity(pieces.len());
        let mut len = 0;
        for piece in &pieces {
            starts.push(len);
            len += piece.positions.len();
        }
        Self {
            schema,
            pieces: pieces.into(),
            starts: starts.into(),
            offset: 0,
            len,
            bytes_per_row,
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The table's schema when the rows were referred to.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// About the bytes the rows take once read.
    pub fn bytes_when_read(&self) -> usize {
        self.len.saturating_mul(self.bytes_per_row)
    }

    /// Bytes the references hold (the positions of this slice; the batches of hot chunks
    /// are the table's own memory).
    pub fn memory_bytes(&self) -> usize {
        self.len * std::mem::size_of::<usize>()
    }

    /// `len` rows from `offset` on (no rows are read).
    pub fn slice(&self, offset: usize, len: usize) -> Self {
        let offset = offset.min(self.len);
        Self {
            offset: self.offset + offset,
            len: len.min(self.len - offset),
            ..self.clone()
        }
    }

    /// Reads the rows, a batch per chunk, in order: from memory for hot chunks, from the
    /// file (only the rows referred to) for cold ones.
    pub fn read(&self) -> Result<Vec<RecordBatch>> {
        let (from, to) = (self.offset, self.offset + self.len);
        let mut batches = Vec::new();
        if from == to {
            return Ok(batches);
        }
        // The last piece starting at or before `from`.
        let first = self
            .starts
            .partition_point(|&s| s <= from)
            .saturating_sub(1);
        for (piece, &start) in self.pieces.iter().zip(self.starts.iter()).skip(first) {
            if start >= to {
                break;
            }
            let lo = from.saturating_sub(start);
            let hi = (to - start).min(piece.positions.len());
            if lo >= hi {
                continue;
            }
            let batch = piece.rows.at(&piece.positions[lo..hi])?;
            batches.push(batch);
        }
        Ok(batches)
    }
}
