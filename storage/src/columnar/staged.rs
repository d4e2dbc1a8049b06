//! Rows staged in cold files before the statement that wrote them commits: a large COPY
//! streams its rows into Parquet files a part at a time (`server/src/exec/copy.rs`), so that
//! it never holds them all; its commit checks their primary keys here and adds each file to
//! the table as a cold chunk, which the log refers to.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, RecordBatch, UInt64Array};

use crate::cold::ColdFile;
use crate::columnar::ColumnarTable;
use crate::error::Result;
use crate::rows::RowId;

/// Rows of one statement that a key check reads a part at a time: the rows it holds in
/// memory, then each staged file.
struct Parts<'a> {
    inserted: Option<&'a RecordBatch>,
    staged: &'a [Arc<ColdFile>],
}

impl Parts<'_> {
    fn len(&self) -> usize {
        usize::from(self.inserted.is_some()) + self.staged.len()
    }
}

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

    /// Whether inserting `inserted` and the rows of the `staged` files after deleting
    /// `deleted` would break the primary key: a key twice among them, or a key of a live row
    /// not deleted. Reads only the key columns, a part at a time, and holds 16 bytes a row
    /// (a hash and a position); rows whose hashes are equal have their keys compared.
    pub fn staged_key_conflicts(
        &self,
        deleted: &HashSet<RowId>,
        inserted: Option<&RecordBatch>,
        staged: &[Arc<ColdFile>],
    ) -> Result<bool> {
        if self.primary_key.is_none() {
            return Ok(false);
        }
        let parts = Parts { inserted, staged };
        let mut hashes: Vec<(u64, u32, u32)> = Vec::new();
        for part in 0..parts.len() {
            for (row, key) in self.part_keys(&parts, part)?.iter().enumerate() {
                if self.key_taken(deleted, key)? {
                    return Ok(true);
                }
                hashes.push((self.key_index.hash(key), part as u32, row as u32));
            }
        }
        hashes.sort_unstable();
        for run in hashes.chunk_by(|a, b| a.0 == b.0).filter(|r| r.len() > 1) {
            let mut keys = HashSet::with_capacity(run.len());
            for &(_, part, row) in run {
                let key = self
                    .part_keys(&parts, part as usize)?
                    .swap_remove(row as usize);
                if !keys.insert(key) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The encoded primary keys of one part's rows.
    fn part_keys(&self, parts: &Parts<'_>, part: usize) -> Result<Vec<Box<[u8]>>> {
        let columns = match (parts.inserted, part) {
            (Some(batch), 0) => match &self.primary_key {
                Some(cols) => cols.iter().map(|&i| batch.column(i).clone()).collect(),
                None => Vec::new(),
            },
            (inserted, _) => {
                let file = &parts.staged[part - usize::from(inserted.is_some())];
                self.file_key_columns(file, None)?
            }
        };
        self.encode_key_columns(&columns)
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
