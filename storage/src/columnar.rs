//! The in-memory columnar copy of a table: Arrow chunks plus a row-id index.
//!
//! It is a cache of the durable table log (the log in RocksDB is the source of truth): DML
//! applies the same [`LogEntry`]s here after they are committed, and scans take a cheap
//! [`TableSnapshot`] of Arc'd batches. A unique index on the primary key (of key hashes, see
//! `key_index.rs`) answers point lookups and enforces uniqueness.
//!
//! Chunks are hot (Arrow columns in memory) or cold (evicted under memory pressure to a
//! Parquet file on object storage, see `cold.rs`; only row ids and liveness stay in memory).
//! Every read sees both: scans get the cold chunks as files to read with projection
//! ([`ColumnarTable::tiered_snapshot`]), point lookups read just the rows they need.

mod chunk;
pub mod snapshot;
mod staged;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt64Array};
use arrow::compute::{concat_batches, interleave};
use arrow::datatypes::SchemaRef;
use arrow_row::{RowConverter, SortField};

use crate::cold::{ColdFile, ColdStore};
use crate::columnar::chunk::{Chunk, Counters};
use crate::error::Result;
use crate::index::SecondaryIndex;
use crate::key_index::KeyIndex;
use crate::log_entry::LogEntry;
use crate::rows::{RowId, Rows, corrupt};
use crate::stored_rows::{Piece, StoredRows};

/// Inserts larger than this are cut into chunks of this many rows: the unit of eviction,
/// and small enough that a query operator holding one batch of a chunk (DataFusion charges
/// the whole buffer to its memory pool) stays within a small pool.
const MAX_CHUNK_ROWS: usize = 16_384;
/// Chunks smaller than this are merged with their small neighbours.
const SMALL_CHUNK_ROWS: usize = 4096;
/// How many small chunks may pile up before they are merged.
const MAX_SMALL_CHUNKS: usize = 16;

/// The columnar cache of one table.
#[derive(Debug)]
pub struct ColumnarTable {
    /// Current schema of the table.
    schema: SchemaRef,
    /// Chunks by chunk id (ids only grow, so removing a chunk moves nothing).
    chunks: BTreeMap<u64, Chunk>,
    /// First row id of each regular chunk (row ids ascend within it and the ranges of regular
    /// chunks are disjoint): a row is found by range, then by binary search in the chunk.
    starts: BTreeMap<RowId, u64>,
    /// Where the rows of irregular chunks sit (rare: an insert whose ids interleave with
    /// another's, as transactions allocating ids concurrently can produce).
    irregular: HashMap<RowId, (u64, usize)>,
    /// Number of live rows.
    live_rows: usize,
    /// Next chunk id.
    next_chunk: u64,
    /// Next row id to hand out.
    next_row_id: RowId,
    /// Primary-key columns, if the table has a primary key.
    primary_key: Option<Vec<usize>>,
    /// Encoder of primary-key values into comparable bytes.
    key_converter: Option<RowConverter>,
    /// Hashes of the primary-key bytes to the rows holding them.
    key_index: KeyIndex,
    /// Secondary indexes (CREATE INDEX).
    indexes: Vec<SecondaryIndex>,
    /// The cold files the table's durable log refers to (by path): kept until a rewrite of
    /// the log no longer does, even when no chunk reads them any more.
    log_files: HashMap<String, Arc<ColdFile>>,
    /// Hits, misses and evictions.
    counters: Counters,
}

impl ColumnarTable {
    /// An empty table with the given schema and optional primary-key columns.
    pub fn try_new(schema: SchemaRef, primary_key: Option<Vec<usize>>) -> Result<Self> {
        let key_converter = match &primary_key {
            Some(cols) => Some(RowConverter::new(
                cols.iter()
                    .map(|&i| SortField::new(schema.field(i).data_type().clone()))
                    .collect(),
            )?),
            None => None,
        };
        Ok(Self {
            schema,
            chunks: BTreeMap::new(),
            starts: BTreeMap::new(),
            irregular: HashMap::new(),
            live_rows: 0,
            next_chunk: 0,
            next_row_id: 1,
            primary_key,
            key_converter,
            key_index: KeyIndex::default(),
            indexes: Vec::new(),
            log_files: HashMap::new(),
            counters: Counters::default(),
        })
    }

    /// The table schema.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Primary-key column indices.
    pub fn primary_key(&self) -> Option<&[usize]> {
        self.primary_key.as_deref()
    }

    /// Number of live rows.
    pub fn num_rows(&self) -> usize {
        self.live_rows
    }

    /// Where a live row sits: (chunk id, row within the chunk).
    fn locate(&self, id: RowId) -> Option<(u64, usize)> {
        let (chunk_id, row) = match self.irregular.get(&id) {
            Some(&at) => at,
            None => {
                let (_, &chunk_id) = self.starts.range(..=id).next_back()?;
                let chunk = self.chunks.get(&chunk_id)?;
                (chunk_id, chunk.row_ids.position(id)?)
            }
        };
        let chunk = self.chunks.get(&chunk_id)?;
        (chunk.row_ids.get(row) == Some(id) && chunk.live.get(row) == Some(&true))
            .then_some((chunk_id, row))
    }

    /// Adds a chunk, finding its rows by range when its ids allow.
    fn place(&mut self, chunk_id: u64, mut chunk: Chunk) {
        chunk.regular = match (chunk.first_id(), chunk.last_id()) {
            (Some(first), Some(last)) if chunk.row_ids.ascending() => {
                !self.overlaps_regular(first, last)
            }
            _ => false,
        };
        if chunk.regular {
            if let Some(first) = chunk.first_id() {
                self.starts.insert(first, chunk_id);
            }
        } else {
            for (row, id) in chunk.row_ids.iter().enumerate() {
                if chunk.live[row] {
                    self.irregular.insert(id, (chunk_id, row));
                }
            }
        }
        self.chunks.insert(chunk_id, chunk);
    }

    fn overlaps_regular(&self, first: RowId, last: RowId) -> bool {
        if self.starts.range(first..=last).next().is_some() {
            return true;
        }
        self.starts
            .range(..first)
            .next_back()
            .and_then(|(_, c)| self.chunks.get(c))
            .and_then(Chunk::last_id)
            .is_some_and(|l| l >= first)
    }

    /// Removes a chunk and the ways to its rows.
    fn unplace(&mut self, chunk_id: u64) -> Option<Chunk> {
        let chunk = self.chunks.remove(&chunk_id)?;
        if chunk.regular {
            if let Some(first) = chunk.first_id() {
                self.starts.remove(&first);
            }
        } else {
            for id in chunk.row_ids.iter() {
                if self.irregular.get(&id).is_some_and(|(c, _)| *c == chunk_id) {
                    self.irregular.remove(&id);
                }
            }
        }
        Some(chunk)
    }

    /// Builds a secondary index over the current rows.
    pub fn add_index(&mut self, name: &str, columns: Vec<usize>) -> Result<()> {
        let mut index = SecondaryIndex::try_new(name, columns, &self.schema)?;
        for chunk in self.chunks.values() {
            let (batch, ids) = chunk.visible(&self.counters)?;
            index.insert(&batch, ids.values())?;
        }
        self.indexes.retain(|i| i.name != name);
        self.indexes.push(index);
        Ok(())
    }

    /// Drops a secondary index.
    pub fn drop_index(&mut self, name: &str) {
        self.indexes.retain(|i| i.name != name);
    }

    /// The secondary indexes.
    pub fn indexes(&self) -> &[SecondaryIndex] {
        &self.indexes
    }

    /// Whether a live row has this id.
    pub fn contains(&self, id: RowId) -> bool {
        self.locate(id).is_some()
    }

    /// Approximate bytes held in memory: hot columns, row ids, liveness and the indexes.
    pub fn memory_bytes(&self) -> usize {
        // A hash map entry costs about its key and value plus a control byte and the unused
        // share of the table.
        let locations = self.irregular.capacity() * 25 + self.starts.len() * 40;
        let keys = self.key_index.memory_bytes();
        self.chunks.values().map(Chunk::memory_bytes).sum::<usize>() + locations + keys
    }

    /// The rows of a hot chunk (for writing them to a cold file).
    pub fn chunk_rows(&self, chunk_id: u64) -> Option<RecordBatch> {
        match &self.chunks.get(&chunk_id)?.rows {
            Rows::Hot(b) => Some(b.clone()),
            Rows::Cold(_) => None,
        }
    }

    /// Writes a hot chunk's rows to `store` and drops them from memory. Returns the bytes
    /// freed (0 when the chunk is gone or already cold).
    pub fn evict(&mut self, chunk_id: u64, owner: &str, store: &Arc<ColdStore>) -> Result<usize> {
        let Some(batch) = self.chunk_rows(chunk_id) else {
            return Ok(0);
        };
        let file = store.write(owner, &batch)?;
        Ok(self.mark_cold(chunk_id, file))
    }

    /// Replaces a hot chunk's rows by the cold file holding the same rows; returns the bytes
    /// freed. A chunk that went away meanwhile leaves the file to be collected.
    pub fn mark_cold(&mut self, chunk_id: u64, file: ColdFile) -> usize {
        let Some(chunk) = self.chunks.get_mut(&chunk_id) else {
            return 0;
        };
        let Rows::Hot(batch) = &chunk.rows else {
            return 0;
        };
        if batch.num_rows() != file.rows {
            return 0;
        }
        let freed = batch.get_array_memory_size();
        chunk.rows = Rows::Cold(Arc::new(file));
        chunk.changed();
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        freed
    }

    /// Hands out `n` fresh row ids.
    pub fn allocate_row_ids(&mut self, n: usize) -> UInt64Array {
        let start = self.next_row_id;
        self.next_row_id += n as u64;
        UInt64Array::from((start..start + n as u64).collect::<Vec<_>>())
    }

    /// Applies a committed log entry (a cold entry only on replay, see
    /// [`ColumnarTable::replay`]).
    pub fn apply(&mut self, entry: &LogEntry) -> Result<()> {
        match entry {
            LogEntry::Insert { row_ids, batch } => self.insert(row_ids, batch),
            LogEntry::Delete { row_ids } => self.delete(row_ids.values()),
            LogEntry::Cold { path, .. } => Err(corrupt(&format!(
                "the cold entry of {path} is applied without its file"
            ))),
        }
    }

    /// Applies an entry of the durable log on start: a cold entry's file is opened in `cold`
    /// (its footer read) and becomes a cold chunk.
    pub fn replay(&mut self, entry: &LogEntry, cold: &Arc<ColdStore>) -> Result<()> {
        match entry {
            LogEntry::Cold {
                path,
                row_ids,
                live,
            } => {
                let file = Arc::new(cold.open(path, self.schema.clone())?);
                self.insert_cold(row_ids, live, file, None)
            }
            other => self.apply(other),
        }
    }

    /// Adds a cold file's rows as a chunk, without reading them (but the key columns of the
    /// live rows when the table has a primary key, and the live rows when it has secondary
    /// indexes). The log refers to the file, so the table keeps it.
    fn insert_cold(
        &mut self,
        row_ids: &UInt64Array,
        live: &BooleanArray,
        file: Arc<ColdFile>,
        keys: Option<Vec<Box<[u8]>>>,
    ) -> Result<()> {
        if row_ids.len() != file.rows || live.len() != file.rows {
            return Err(corrupt(&format!(
                "{} has {} rows, its log entry {}",
                file.path(),
                file.rows,
                row_ids.len()
            )));
        }
        self.log_files.insert(file.path().to_string(), file.clone());
        let chunk = Chunk::with_rows(
            Rows::Cold(file),
            row_ids.clone(),
            live.values().iter().collect(),
        );
        if chunk.live_count == 0 {
            return Ok(());
        }
        let live_count = chunk.live_count;
        let positions = (!chunk.all_live()).then(|| chunk.live_positions());
        let ids = chunk.visible_row_ids()?;
        if let (Some(_), Rows::Cold(file)) = (&self.primary_key, &chunk.rows) {
            let keys = match keys {
                Some(keys) => keys,
                None => {
                    self.encode_key_columns(&self.file_key_columns(file, positions.as_deref())?)?
                }
            };
            for (key, &id) in keys.into_iter().zip(ids.values()) {
                self.key_index.insert(self.key_index.hash(&key), id);
            }
        }
        if !self.indexes.is_empty()
            && let Rows::Cold(file) = &chunk.rows
        {
            let rows = file.read(None, positions.as_deref())?;
            for index in &mut self.indexes {
                index.insert(&rows, ids.values())?;
            }
        }
        if let Some(&last) = row_ids.values().iter().max() {
            self.next_row_id = self.next_row_id.max(last + 1);
        }
        self.live_rows += live_count;
        let chunk_id = self.next_chunk;
        self.next_chunk += 1;
        self.place(chunk_id, chunk);
        Ok(())
    }

    /// Makes `files` the cold files the durable log refers to (after a rewrite of it); the
    /// ones it referred to before and no chunk reads are deleted at the next collection.
    pub fn set_log_files(&mut self, files: Vec<Arc<ColdFile>>) {
        self.log_files = files
            .into_iter()
            .map(|f| (f.path().to_string(), f))
            .collect();
    }

    /// Live rows of cold chunks whose files the durable log does not refer to (it holds
    /// their rows as inserts): what a rewrite of the log would turn into file references.
    pub fn unlogged_cold_rows(&self) -> usize {
        self.chunks
            .values()
            .filter(|c| {
                c.logged_file()
                    .is_some_and(|f| !self.log_files.contains_key(f.path()))
            })
            .map(|c| c.live_count)
            .sum()
    }

    fn insert(&mut self, row_ids: &UInt64Array, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() > MAX_CHUNK_ROWS {
            // Each chunk gets its own copy of its rows, so that evicting it frees them.
            for start in (0..batch.num_rows()).step_by(MAX_CHUNK_ROWS) {
                let len = MAX_CHUNK_ROWS.min(batch.num_rows() - start);
                // NOTE: `take` copies; a slice (or concatenating one slice) would share the
                // whole insert's buffers, so evicting one chunk would free nothing.
                let picks = arrow::array::UInt32Array::from_iter_values(
                    (start as u32)..((start + len) as u32),
                );
                let rows = crate::rows::take_rows(batch, &picks)?;
                let ids = UInt64Array::from(row_ids.values()[start..start + len].to_vec());
                self.insert(&ids, &rows)?;
            }
            return Ok(());
        }
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = self.conform(batch)?;
        let keys = self.encode_keys(&batch)?;
        for index in &mut self.indexes {
            index.insert(&batch, row_ids.values())?;
        }
        let chunk_id = self.next_chunk;
        self.next_chunk += 1;
        for (row, &id) in row_ids.values().iter().enumerate() {
            self.next_row_id = self.next_row_id.max(id + 1);
            if let Some(keys) = &keys {
                self.key_index.insert(self.key_index.hash(&keys[row]), id);
            }
        }
        self.live_rows += batch.num_rows();
        self.place(chunk_id, Chunk::new(batch, row_ids.clone()));
        self.merge_small_chunks()
    }

    /// Deletes rows. The deleted rows' keys are read (from a cold file if need be) before
    /// anything changes, so a failed read leaves the table as it was.
    fn delete(&mut self, ids: &[RowId]) -> Result<()> {
        let mut removed: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for id in ids {
            if let Some((chunk_id, row)) = self.locate(*id) {
                removed.entry(chunk_id).or_default().push(row);
            }
        }
        let mut gone = Vec::new();
        for (chunk_id, rows) in &mut removed {
            rows.sort_unstable();
            rows.dedup();
            if (self.key_converter.is_some() || !self.indexes.is_empty())
                && let Some(chunk) = self.chunks.get(chunk_id)
            {
                let batch = chunk.rows_at(rows, &self.counters)?;
                let ids: Vec<RowId> = rows.iter().filter_map(|&r| chunk.row_ids.get(r)).collect();
                gone.push((batch, ids));
            }
        }
        for (batch, ids) in &gone {
            if let Some(keys) = self.encode_keys(batch)? {
                for (key, id) in keys.iter().zip(ids) {
                    self.key_index.remove(self.key_index.hash(key), *id);
                }
            }
            for index in &mut self.indexes {
                index.remove(batch, ids)?;
            }
        }
        for (chunk_id, rows) in removed {
            let Some(chunk) = self.chunks.get_mut(&chunk_id) else {
                continue;
            };
            for &row in &rows {
                chunk.live[row] = false;
                chunk.live_count -= 1;
            }
            self.live_rows -= rows.len();
            chunk.changed();
            if !chunk.regular {
                for id in rows.into_iter().filter_map(|row| chunk.row_ids.get(row)) {
                    self.irregular.remove(&id);
                }
            }
        }
        let empty: Vec<u64> = self
            .chunks
            .iter()
            .filter(|(_, c)| c.live_count == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in empty {
            self.unplace(id);
        }
        Ok(())
    }

    /// Brings a batch written under an older schema (fewer columns) up to the current one.
    fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        if batch.schema().fields() == self.schema.fields() {
            return Ok(batch.clone());
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for field in self.schema.fields().iter().skip(columns.len()) {
            columns.push(arrow::array::new_null_array(
                field.data_type(),
                batch.num_rows(),
            ));
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    fn merge_small_chunks(&mut self) -> Result<()> {
        let small: Vec<u64> = self
            .chunks
            .iter()
            .rev()
            .take_while(|(_, c)| c.live_count < SMALL_CHUNK_ROWS)
            .map(|(id, _)| *id)
            .collect();
        if small.len() < MAX_SMALL_CHUNKS {
            return Ok(());
        }
        let mut batches = Vec::with_capacity(small.len());
        let mut ids = Vec::new();
        for id in small.iter().rev() {
            if let Some(chunk) = self.chunks.get(id) {
                let (b, r) = chunk.visible(&self.counters)?;
                batches.push(b);
                ids.extend_from_slice(r.values());
            }
        }
        let merged = concat_batches(&self.schema, &batches)?;
        for id in &small {
            self.unplace(*id);
        }
        let chunk_id = self.next_chunk;
        self.next_chunk += 1;
        self.place(chunk_id, Chunk::new(merged, UInt64Array::from(ids)));
        Ok(())
    }

    fn encode_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<Box<[u8]>>>> {
        let Some(cols) = &self.primary_key else {
            return Ok(None);
        };
        let arrays: Vec<ArrayRef> = cols.iter().map(|&i| batch.column(i).clone()).collect();
        self.encode_key_columns(&arrays).map(Some)
    }

    /// The primary-key columns' values, encoded as comparable bytes.
    fn encode_key_columns(&self, columns: &[ArrayRef]) -> Result<Vec<Box<[u8]>>> {
        let Some(conv) = &self.key_converter else {
            return Ok(Vec::new());
        };
        let rows = conv.convert_columns(columns)?;
        Ok(rows.iter().map(|r| r.as_ref().into()).collect())
    }

    /// Checks that inserting `inserted` after deleting `deleted` keeps the primary key unique.
    /// Returns the row index (within `inserted`) of the first duplicate, if any.
    pub fn find_duplicate_key(
        &self,
        deleted: &HashSet<RowId>,
        inserted: &RecordBatch,
    ) -> Result<Option<usize>> {
        let Some(keys) = self.encode_keys(inserted)? else {
            return Ok(None);
        };
        self.first_conflict(deleted, keys.iter().map(|k| k.as_ref()))
    }

    /// The position of the first of `keys` (encoded primary keys of rows to insert after
    /// deleting `deleted`) that an earlier one or a live row not deleted already has.
    fn first_conflict<'k>(
        &self,
        deleted: &HashSet<RowId>,
        keys: impl Iterator<Item = &'k [u8]>,
    ) -> Result<Option<usize>> {
        let mut seen = HashSet::new();
        for (row, key) in keys.enumerate() {
            if !seen.insert(key) || self.key_taken(deleted, key)? {
                return Ok(Some(row));
            }
        }
        Ok(None)
    }

    /// Whether a live row not in `deleted` has the encoded primary key `key`.
    fn key_taken(&self, deleted: &HashSet<RowId>, key: &[u8]) -> Result<bool> {
        // NOTE: a row whose key has the same hash is rarely the same key: its key is read
        // (from a cold file if need be) and compared.
        for id in self.key_index.candidates(self.key_index.hash(key)) {
            if deleted.contains(&id) {
                continue;
            }
            let found = self.fetch(&[id])?;
            if self
                .encode_keys(&found)?
                .is_some_and(|k| k.first().map(|k| k.as_ref()) == Some(key))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Row ids whose primary key may equal the key of each row of `keys` (a batch of the key
    /// columns): the rows with each key, and rarely a row whose key has the same hash, which
    /// the caller's filter drops.
    pub fn lookup_keys(&self, keys: &[ArrayRef]) -> Result<Vec<RowId>> {
        let Some(conv) = &self.key_converter else {
            return Ok(vec![]);
        };
        let rows = conv.convert_columns(keys)?;
        Ok(rows
            .iter()
            .flat_map(|r| self.key_index.candidates(self.key_index.hash(r.as_ref())))
            .collect())
    }

    /// The live rows with the given ids, referred to where they are and read later, a slice
    /// at a time (unknown ids are skipped): chunk by chunk, each chunk's rows in row order.
    pub fn stored_rows(&self, ids: &[RowId]) -> StoredRows {
        let mut wanted: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for id in ids {
            if let Some((chunk_id, row)) = self.locate(*id) {
                wanted.entry(chunk_id).or_default().push(row);
            }
        }
        let mut pieces = Vec::with_capacity(wanted.len());
        for (chunk_id, mut positions) in wanted {
            positions.sort_unstable();
            positions.dedup();
            if let Some(chunk) = self.chunks.get(&chunk_id) {
                pieces.push(Piece {
                    rows: chunk.rows.clone(),
                    positions,
                });
            }
        }
        let per_row = usize::try_from(self.bytes_per_row()).unwrap_or(usize::MAX);
        StoredRows::new(self.schema.clone(), pieces, per_row)
    }

    /// The live rows with the given ids, in the order given (unknown ids are skipped). Rows
    /// of cold chunks are read from their files, only the rows asked for.
    pub fn fetch(&self, ids: &[RowId]) -> Result<RecordBatch> {
        // Per chunk: the rows wanted, in ascending order, deduplicated.
        let mut wanted: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        let mut located = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((chunk_id, row)) = self.locate(*id) {
                wanted.entry(chunk_id).or_default().push(row);
                located.push((chunk_id, row));
            }
        }
        if located.is_empty() {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        let mut batches = Vec::with_capacity(wanted.len());
        let mut position: HashMap<(u64, usize), (usize, usize)> = HashMap::new();
        for (chunk_id, rows) in &mut wanted {
            rows.sort_unstable();
            rows.dedup();
            let Some(chunk) = self.chunks.get(chunk_id) else {
                continue;
            };
            for (i, &row) in rows.iter().enumerate() {
                position.insert((*chunk_id, row), (batches.len(), i));
            }
            batches.push(chunk.rows_at(rows, &self.counters)?);
        }
        let picks: Vec<(usize, usize)> = located
            .iter()
            .filter_map(|key| position.get(key).copied())
            .collect();
        let mut columns = Vec::with_capacity(self.schema.fields().len());
        for col in 0..self.schema.fields().len() {
            let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(col).as_ref()).collect();
            columns.push(interleave(&arrays, &picks)?);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}
