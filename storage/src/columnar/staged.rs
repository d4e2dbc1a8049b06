//! Rows staged in cold files before the statement that wrote them commits: a large COPY or
//! INSERT ... SELECT writes its rows as Parquet files a part at a time
//! (`server/src/memory/staging.rs`), so that it never holds them all; its commit reads their
//! primary keys and checks them here, then adds each file to the table as a cold chunk,
//! which the log refers to.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, RecordBatch, UInt64Array};

use crate::cold::ColdFile;
use crate::columnar::ColumnarTable;
use crate::error::Result;
use crate::rows::RowId;

impl ColumnarTable {
    /// The encoded primary keys of a staged file's rows (None without a primary key): read
    /// before the commit, so that adding the file after it reads nothing but its rows for
    /// secondary indexes.
    pub fn staged_keys(&self, file: &ColdFile) -> Result<Option<Vec<Box<[u8]>>>> {
        if self.primary_key.is_none() {
            return Ok(None);
        }
        self.encode_key_columns(&self.file_key_columns(file, None)?)
            .map(Some)
    }

    /// Makes staged files the table's own before they are added (their log entries were
    /// committed): a failure while adding one leaves none to be deleted.
    pub fn keep_staged<'a>(&mut self, files: impl Iterator<Item = &'a Arc<ColdFile>>) {
        for file in files {
            self.log_files.insert(file.path().to_string(), file.clone());
        }
    }

    /// Adds the rows of a staged file, all live, as a cold chunk whose rows get `row_ids`
    /// (after the log entry referring to the file was committed), with their encoded keys
    /// from [`ColumnarTable::staged_keys`].
    pub fn add_staged(
        &mut self,
        row_ids: &UInt64Array,
        file: Arc<ColdFile>,
        keys: Option<Vec<Box<[u8]>>>,
    ) -> Result<()> {
        let live = BooleanArray::from(vec![true; row_ids.len()]);
        self.insert_cold(row_ids, &live, file, keys)
    }

    /// Whether inserting `inserted` and the staged rows whose encoded keys are `staged`
    /// (from [`ColumnarTable::staged_keys`], a file's each) after deleting `deleted` would
    /// break the primary key: a key twice among them, or a key of a live row not deleted.
    pub fn key_conflicts(
        &self,
        deleted: &HashSet<RowId>,
        inserted: Option<&RecordBatch>,
        staged: &[Option<Vec<Box<[u8]>>>],
    ) -> Result<bool> {
        let held = match inserted {
            Some(batch) => self.encode_keys(batch)?.unwrap_or_default(),
            None => Vec::new(),
        };
        let keys = held.iter().chain(staged.iter().flatten().flatten());
        Ok(self
            .first_conflict(deleted, keys.map(|k| k.as_ref()))?
            .is_some())
    }

    /// The primary-key columns of a cold file's rows at `positions` (all when `None`), in the
    /// key's order (a file is read in its own column order).
    pub(crate) fn file_key_columns(
        &self,
        file: &ColdFile,
        positions: Option<&[usize]>,
    ) -> Result<Vec<ArrayRef>> {
        let Some(cols) = &self.primary_key else {
            return Ok(Vec::new());
        };
        let mut ascending = cols.clone();
        ascending.sort_unstable();
        ascending.dedup();
        let batch = file.read(Some(&ascending), positions)?;
        Ok(cols
            .iter()
            .filter_map(|c| ascending.iter().position(|a| a == c))
            .map(|i| batch.column(i).clone())
            .collect())
    }
}
