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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt64Array};
use arrow::compute::{concat_batches, filter_record_batch, interleave};
use arrow::datatypes::SchemaRef;
use arrow_row::{RowConverter, SortField};

use crate::chunk_ids::ChunkIds;
use crate::cold::{ColdFile, ColdStore};
use crate::error::{Result, StorageError};
use crate::index::SecondaryIndex;
use crate::key_index::KeyIndex;
use crate::log_entry::LogEntry;
use crate::stored_rows::{Piece, StoredRows};

/// Identifier of a row inside one table; never reused.
pub type RowId = u64;

/// Inserts larger than this are cut into chunks of this many rows: the unit of eviction,
/// and small enough that a query operator holding one batch of a chunk (DataFusion charges
/// the whole buffer to its memory pool) stays within a small pool.
const MAX_CHUNK_ROWS: usize = 16_384;
/// Chunks smaller than this are merged with their small neighbours.
const SMALL_CHUNK_ROWS: usize = 4096;
/// How many small chunks may pile up before they are merged.
const MAX_SMALL_CHUNKS: usize = 16;

/// A consistent, immutable view of a table's live rows.
#[derive(Debug, Clone)]
pub struct TableSnapshot {
    /// The table schema.
    pub schema: SchemaRef,
    /// Live rows, chunk by chunk.
    pub batches: Vec<RecordBatch>,
    /// Row ids aligned with `batches`.
    pub row_ids: Vec<UInt64Array>,
}

impl TableSnapshot {
    /// Total number of live rows.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// One part of a tiered snapshot.
#[derive(Debug, Clone)]
pub enum SnapshotPart {
    /// Live rows in memory.
    Hot(RecordBatch),
    /// Rows in a cold file: the live positions (all rows when `None`).
    Cold {
        /// The file (kept alive by the snapshot).
        file: Arc<ColdFile>,
        /// Ascending positions of the live rows, or `None` when every row is live.
        rows: Option<Arc<[usize]>>,
        /// Row ids of the live rows, appended to what is read as a last column (for DML,
        /// see [`ColumnarTable::tiered_snapshot_with_ids`]).
        ids: Option<UInt64Array>,
    },
}

impl SnapshotPart {
    /// Number of live rows.
    pub fn num_rows(&self) -> usize {
        match self {
            SnapshotPart::Hot(b) => b.num_rows(),
            SnapshotPart::Cold { file, rows, .. } => rows.as_ref().map_or(file.rows, |r| r.len()),
        }
    }
}

/// A snapshot whose cold chunks stay on object storage until the scan reads them.
#[derive(Debug, Clone)]
pub struct TieredSnapshot {
    /// The table schema.
    pub schema: SchemaRef,
    /// Hot batches and cold files, in chunk order.
    pub parts: Vec<SnapshotPart>,
}

/// Cache figures of one table or view, for `millrace_cache`.
#[derive(Debug, Clone, Default)]
pub struct CacheStats {
    /// Bytes held in memory (hot columns, row ids, liveness, indexes).
    pub memory_bytes: u64,
    /// Bytes of cold files on object storage.
    pub object_store_bytes: u64,
    /// Chunks in memory.
    pub hot_chunks: u64,
    /// Chunks on object storage.
    pub cold_chunks: u64,
    /// Reads served from memory (chunks read).
    pub hits: u64,
    /// Reads that went to object storage (chunks read).
    pub misses: u64,
    /// Chunks evicted so far.
    pub evictions: u64,
    /// Cold files held: those of cold chunks and those the durable log refers to.
    pub files: u64,
    /// Cold files the durable log refers to (a restart opens them instead of reading rows).
    pub log_files: u64,
}

/// Logical clock of chunk reads and writes: the eviction order (least recent first).
static ACCESS_CLOCK: AtomicU64 = AtomicU64::new(1);

fn tick() -> u64 {
    ACCESS_CLOCK.fetch_add(1, Ordering::Relaxed)
}

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

#[derive(Debug)]
struct Chunk {
    /// Rows as appended (including rows deleted since).
    rows: Rows,
    /// Row ids aligned with the rows.
    row_ids: ChunkIds,
    /// Liveness of each row.
    live: Vec<bool>,
    /// Number of `true` entries in `live`.
    live_count: usize,
    /// Live rows and their ids of a hot chunk, computed on first read after a change.
    visible: OnceLock<(RecordBatch, UInt64Array)>,
    /// Live row ids of a cold chunk, computed on first read after a change.
    visible_ids: OnceLock<UInt64Array>,
    /// [`ACCESS_CLOCK`] at the last read.
    last_used: AtomicU64,
    /// Whether its row ids ascend and their range overlaps no other regular chunk's, so that
    /// the table finds its rows by range (else each id is in the table's `irregular` map).
    regular: bool,
}

impl Chunk {
    /// A hot chunk of `batch`, every row live.
    fn new(batch: RecordBatch, row_ids: UInt64Array) -> Self {
        let live = vec![true; batch.num_rows()];
        Self::with_rows(Rows::Hot(batch), row_ids, live)
    }

    /// A chunk of `rows` with their ids and liveness (a cold one when a log is replayed).
    fn with_rows(rows: Rows, row_ids: UInt64Array, live: Vec<bool>) -> Self {
        Self {
            live_count: live.iter().filter(|l| **l).count(),
            live,
            rows,
            row_ids: ChunkIds::new(row_ids),
            visible: OnceLock::new(),
            visible_ids: OnceLock::new(),
            last_used: AtomicU64::new(tick()),
            regular: false,
        }
    }

    fn first_id(&self) -> Option<RowId> {
        self.row_ids.first()
    }

    fn last_id(&self) -> Option<RowId> {
        self.row_ids.last()
    }

    fn changed(&mut self) {
        self.visible = OnceLock::new();
        self.visible_ids = OnceLock::new();
    }

    fn touch(&self) {
        self.last_used.store(tick(), Ordering::Relaxed);
    }

    fn all_live(&self) -> bool {
        self.live_count == self.live.len()
    }

    /// The cold file whose reference a log rewrite writes for this chunk: none for a hot
    /// chunk, or for a cold one with fewer than half its rows live (its live rows are written
    /// instead, so that the file is not kept for rows that are gone).
    fn logged_file(&self) -> Option<&Arc<ColdFile>> {
        match &self.rows {
            Rows::Cold(file) if self.live_count * 2 >= self.live.len() => Some(file),
            _ => None,
        }
    }

    /// Ascending positions of the live rows.
    fn live_positions(&self) -> Vec<usize> {
        self.live
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.then_some(i))
            .collect()
    }

    fn mask(&self) -> BooleanArray {
        BooleanArray::from(self.live.clone())
    }

    /// The ids of the live rows; of a cold chunk, remembered until it changes unless they
    /// are a range (then they are made on each read, instead of held 8 bytes a row).
    fn visible_row_ids(&self) -> Result<UInt64Array> {
        if let Rows::Hot(_) = self.rows {
            return self.visible_hot().map(|(_, ids)| ids.clone());
        }
        if let Some(ids) = self.visible_ids.get() {
            return Ok(ids.clone());
        }
        let ids = if self.all_live() {
            self.row_ids.to_array()
        } else {
            self.row_ids.filter(&self.live)
        };
        if self.row_ids.is_range() {
            return Ok(ids);
        }
        Ok(self.visible_ids.get_or_init(|| ids).clone())
    }

    fn visible_hot(&self) -> Result<&(RecordBatch, UInt64Array)> {
        if let Some(v) = self.visible.get() {
            return Ok(v);
        }
        let Rows::Hot(batch) = &self.rows else {
            return Err(corrupt("a cold chunk has no rows in memory"));
        };
        let computed = if self.all_live() {
            (batch.clone(), self.row_ids.to_array())
        } else {
            (
                filter_record_batch(batch, &self.mask())?,
                self.row_ids.filter(&self.live),
            )
        };
        Ok(self.visible.get_or_init(|| computed))
    }

    /// Live rows and their ids; a cold chunk's rows are read from its file.
    fn visible(&self, stats: &Counters) -> Result<(RecordBatch, UInt64Array)> {
        self.touch();
        match &self.rows {
            Rows::Hot(_) => {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                self.visible_hot().cloned()
            }
            Rows::Cold(file) => {
                stats.misses.fetch_add(1, Ordering::Relaxed);
                let positions = (!self.all_live()).then(|| self.live_positions());
                let batch = file.read(None, positions.as_deref())?;
                Ok((batch, self.visible_row_ids()?))
            }
        }
    }

    /// The rows at the given ascending positions (live or not).
    fn rows_at(&self, positions: &[usize], stats: &Counters) -> Result<RecordBatch> {
        self.touch();
        let counter = match &self.rows {
            Rows::Hot(_) => &stats.hits,
            Rows::Cold(_) => &stats.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.rows.at(positions)
    }

    fn memory_bytes(&self) -> usize {
        let rows = match &self.rows {
            Rows::Hot(b) => b.get_array_memory_size(),
            Rows::Cold(_) => 0,
        };
        // NOTE: a hot chunk's visible ids are made from a range of ids, so they are memory
        // of their own.
        let visible = match (&self.rows, self.visible.get()) {
            (Rows::Hot(_), Some((_, ids))) if self.row_ids.is_range() => {
                ids.get_array_memory_size()
            }
            _ => 0,
        };
        rows + visible + self.row_ids.memory_bytes() + self.live.capacity()
    }
}

/// Hits, misses and evictions of one table.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

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

    /// Cache figures: bytes in memory and on object storage, chunks, hits, misses, evictions.
    pub fn cache_stats(&self) -> CacheStats {
        let mut stats = CacheStats {
            memory_bytes: self.memory_bytes() as u64,
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            ..CacheStats::default()
        };
        let mut read: HashSet<&str> = HashSet::new();
        for chunk in self.chunks.values() {
            match &chunk.rows {
                Rows::Hot(_) => stats.hot_chunks += 1,
                Rows::Cold(file) => {
                    stats.cold_chunks += 1;
                    stats.object_store_bytes += file.bytes;
                    read.insert(file.path());
                }
            }
        }
        for (path, file) in &self.log_files {
            if !read.contains(path.as_str()) {
                stats.object_store_bytes += file.bytes;
                stats.files += 1;
            }
        }
        stats.files += read.len() as u64;
        stats.log_files = self.log_files.len() as u64;
        stats
    }

    /// Bytes a row takes in memory, averaged over the chunks (cold ones by their files'
    /// uncompressed sizes): about what reading rows back costs.
    pub fn bytes_per_row(&self) -> u64 {
        let (mut bytes, mut rows) = (0u64, 0u64);
        for chunk in self.chunks.values() {
            match &chunk.rows {
                Rows::Hot(b) => {
                    bytes += b.get_array_memory_size() as u64;
                    rows += b.num_rows() as u64;
                }
                Rows::Cold(file) => {
                    let groups = file.metadata.row_groups().iter();
                    bytes += groups
                        .map(|g| g.total_byte_size().max(0) as u64)
                        .sum::<u64>();
                    rows += file.rows as u64;
                }
            }
        }
        bytes.checked_div(rows).unwrap_or(0)
    }

    /// Hot chunks that could be evicted: (chunk id, last read, bytes in memory).
    pub fn eviction_candidates(&self) -> Vec<(u64, u64, usize)> {
        self.chunks
            .iter()
            .filter_map(|(id, c)| match &c.rows {
                Rows::Hot(b) => Some((
                    *id,
                    c.last_used.load(Ordering::Relaxed),
                    b.get_array_memory_size(),
                )),
                Rows::Cold(_) => None,
            })
            .collect()
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
                self.insert_cold(row_ids, live, file)
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
        if let (Some(cols), Rows::Cold(file)) = (&self.primary_key, &chunk.rows) {
            let keys = file.read(Some(cols), positions.as_deref())?;
            for (key, &id) in self
                .encode_key_columns(keys.columns())?
                .into_iter()
                .zip(ids.values())
            {
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
                let rows = arrow::compute::take_record_batch(batch, &picks)?;
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
        let mut seen = HashSet::with_capacity(keys.len());
        for (row, key) in keys.iter().enumerate() {
            if !seen.insert(key) {
                return Ok(Some(row));
            }
            // NOTE: a row whose key has the same hash is rarely the same key: its key is read
            // (from a cold file if need be) and compared.
            for id in self.key_index.candidates(self.key_index.hash(key)) {
                if deleted.contains(&id) {
                    continue;
                }
                let found = self.fetch(&[id])?;
                if self
                    .encode_keys(&found)?
                    .is_some_and(|k| k.first() == Some(key))
                {
                    return Ok(Some(row));
                }
            }
        }
        Ok(None)
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

    /// A consistent snapshot of the live rows; cold chunks are read into it.
    pub fn snapshot(&self) -> Result<TableSnapshot> {
        let mut batches = Vec::with_capacity(self.chunks.len());
        let mut row_ids = Vec::with_capacity(self.chunks.len());
        for chunk in self.chunks.values() {
            let (b, r) = chunk.visible(&self.counters)?;
            batches.push(b);
            row_ids.push(r);
        }
        Ok(TableSnapshot {
            schema: self.schema.clone(),
            batches,
            row_ids,
        })
    }

    /// A consistent snapshot that leaves cold chunks on object storage: a scan reads each
    /// with the columns it needs (counted as a miss here).
    pub fn tiered_snapshot(&self) -> Result<TieredSnapshot> {
        let mut parts = Vec::with_capacity(self.chunks.len());
        for chunk in self.chunks.values() {
            match &chunk.rows {
                Rows::Hot(_) => {
                    let (b, _) = chunk.visible(&self.counters)?;
                    parts.push(SnapshotPart::Hot(b));
                }
                Rows::Cold(file) => {
                    chunk.touch();
                    self.counters.misses.fetch_add(1, Ordering::Relaxed);
                    let rows = (!chunk.all_live()).then(|| chunk.live_positions().into());
                    parts.push(SnapshotPart::Cold {
                        file: file.clone(),
                        rows,
                        ids: None,
                    });
                }
            }
        }
        Ok(TieredSnapshot {
            schema: self.schema.clone(),
            parts,
        })
    }

    /// [`ColumnarTable::tiered_snapshot`] with the row ids of every part: hot batches carry
    /// them as a last column (`schema` is the table's plus that column), cold parts as
    /// `ids`. DML reads a table larger than memory this way, a file at a time.
    pub fn tiered_snapshot_with_ids(&self, schema: SchemaRef) -> Result<TieredSnapshot> {
        let mut snapshot = self.tiered_snapshot()?;
        for (part, chunk) in snapshot.parts.iter_mut().zip(self.chunks.values()) {
            let live = chunk.visible_row_ids()?;
            match part {
                SnapshotPart::Hot(batch) => {
                    let mut columns = batch.columns().to_vec();
                    columns.push(Arc::new(live));
                    *batch = RecordBatch::try_new(schema.clone(), columns)?;
                }
                SnapshotPart::Cold { ids, .. } => *ids = Some(live),
            }
        }
        snapshot.schema = schema;
        Ok(snapshot)
    }

    /// The live contents, a part per chunk, for rewriting a table's log: each part becomes an
    /// insert entry when read ([`LogPart::read`]), a cold chunk's file only then, or a
    /// reference to its cold file ([`LogPart::entry`]).
    pub fn log_parts(&self) -> Result<Vec<LogPart>> {
        let snapshot = self.tiered_snapshot()?;
        snapshot
            .parts
            .into_iter()
            .zip(self.chunks.values())
            .map(|(rows, chunk)| {
                Ok(LogPart {
                    file_rows: chunk
                        .logged_file()
                        .map(|_| (chunk.row_ids.to_array(), chunk.live.clone())),
                    rows,
                    row_ids: chunk.visible_row_ids()?,
                })
            })
            .collect()
    }

    /// The ids of every live row (cold chunks are not read).
    pub fn live_row_ids(&self) -> Result<Vec<RowId>> {
        let mut ids = Vec::with_capacity(self.live_rows);
        for chunk in self.chunks.values() {
            ids.extend_from_slice(chunk.visible_row_ids()?.values());
        }
        Ok(ids)
    }
}

/// One chunk's live rows as a future insert entry of a rewritten log.
#[derive(Debug)]
pub struct LogPart {
    rows: SnapshotPart,
    row_ids: UInt64Array,
    /// A cold chunk's row ids and liveness of every row of its file.
    file_rows: Option<(UInt64Array, Vec<bool>)>,
}

impl LogPart {
    /// Rows in the part.
    pub fn num_rows(&self) -> usize {
        self.row_ids.len()
    }

    /// The insert entry (reads a cold chunk's live rows from its file).
    pub fn read(self) -> Result<LogEntry> {
        let batch = match self.rows {
            SnapshotPart::Hot(batch) => batch,
            SnapshotPart::Cold { file, rows, .. } => file.read(None, rows.as_deref())?,
        };
        Ok(LogEntry::Insert {
            row_ids: self.row_ids,
            batch,
        })
    }

    /// The cold file [`LogPart::entry`] refers to, if it does.
    pub fn cold_file(&self) -> Option<&Arc<ColdFile>> {
        match (&self.rows, &self.file_rows) {
            (SnapshotPart::Cold { file, .. }, Some(_)) => Some(file),
            _ => None,
        }
    }

    /// The entry of a rewritten log: a hot chunk's rows as an insert, a cold chunk's as a
    /// reference to its file (nothing is read; but a chunk with fewer than half its rows
    /// live is read and written as an insert). The log must then keep the file (see
    /// [`ColumnarTable::set_log_files`]).
    pub fn entry(self) -> Result<LogEntry> {
        match (self.rows, self.file_rows) {
            (SnapshotPart::Cold { file, .. }, Some((row_ids, live))) => Ok(LogEntry::Cold {
                path: file.path().to_string(),
                row_ids,
                live: BooleanArray::from(live),
            }),
            (rows, _) => LogPart {
                rows,
                row_ids: self.row_ids,
                file_rows: None,
            }
            .read(),
        }
    }
}

fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt {
        what: "columnar chunk",
        detail: what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]))
    }

    fn rows(t: &mut ColumnarTable, keys: Vec<i64>) -> Result<LogEntry> {
        let ids = t.allocate_row_ids(keys.len());
        rows_with_ids(ids, keys)
    }

    /// An insert of `keys` (with values `v<key>`) under the given row ids.
    fn rows_with_ids(row_ids: UInt64Array, keys: Vec<i64>) -> Result<LogEntry> {
        let vals: Vec<String> = keys.iter().map(|k| format!("v{k}")).collect();
        Ok(LogEntry::Insert {
            row_ids,
            batch: RecordBatch::try_new(
                schema(),
                vec![
                    Arc::new(Int64Array::from(keys)),
                    Arc::new(StringArray::from(vals)),
                ],
            )?,
        })
    }

    #[test]
    fn insert_delete_snapshot_and_keys() -> Result<()> {
        let mut t = ColumnarTable::try_new(schema(), Some(vec![0]))?;
        let e = rows(&mut t, vec![1, 2, 3])?;
        t.apply(&e)?;
        assert_eq!(t.num_rows(), 3);
        let dup = match &e {
            LogEntry::Insert { batch, .. } => t.find_duplicate_key(&HashSet::new(), batch)?,
            _ => None,
        };
        assert_eq!(dup, Some(0));
        let found = t.lookup_keys(&[Arc::new(Int64Array::from(vec![2]))])?;
        assert_eq!(found, vec![2]);
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from(found.clone()),
        })?;
        assert_eq!(t.num_rows(), 2);
        assert!(
            t.lookup_keys(&[Arc::new(Int64Array::from(vec![2]))])?
                .is_empty()
        );
        let snap = t.snapshot()?;
        assert_eq!(snap.num_rows(), 2);
        assert_eq!(snap.row_ids[0].values().to_vec(), vec![1, 3]);
        let fetched = t.fetch(&[3, 1, 2])?;
        assert_eq!(fetched.num_rows(), 2);
        Ok(())
    }

    #[test]
    fn many_small_inserts_are_merged() -> Result<()> {
        let mut t = ColumnarTable::try_new(schema(), None)?;
        for i in 0..100 {
            let e = rows(&mut t, vec![i])?;
            t.apply(&e)?;
        }
        assert!(t.chunks.len() < MAX_SMALL_CHUNKS + 1);
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from(vec![5, 50]),
        })?;
        let snap = t.snapshot()?;
        assert_eq!(snap.num_rows(), 98);
        let all: Vec<u64> = snap
            .row_ids
            .iter()
            .flat_map(|r| r.values().to_vec())
            .collect();
        assert!(!all.contains(&5) && !all.contains(&50));
        // Repeated and deleted ids are skipped; each chunk's rows come once.
        let by_chunk = t.stored_rows(&[60, 7, 60, 5, 7]).read()?;
        let values = |b: &RecordBatch| -> Vec<i64> {
            b.column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .map(|a| a.values().to_vec())
                .unwrap_or_default()
        };
        let mut chunked: Vec<i64> = by_chunk.iter().flat_map(values).collect();
        chunked.sort_unstable();
        let mut ordered = values(&t.fetch(&[60, 7])?);
        ordered.sort_unstable();
        assert_eq!(chunked.len(), 2);
        assert_eq!(chunked, ordered);
        Ok(())
    }

    #[test]
    fn evicted_chunks_read_through_from_cold_files() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let cold = ColdStore::try_new(Arc::new(fs), "cache", "test")?;
        let mut t = ColumnarTable::try_new(schema(), Some(vec![0]))?;
        t.add_index("by_v", vec![1])?;
        let e = rows(&mut t, (0..10_000).collect())?;
        t.apply(&e)?;
        let before = t.snapshot()?;
        let hot_bytes = t.memory_bytes();
        let candidates = t.eviction_candidates();
        assert_eq!(candidates.len(), 1);
        let freed = t.evict(candidates[0].0, "t", &cold)?;
        assert!(freed > 0 && t.memory_bytes() + freed <= hot_bytes);
        assert_eq!(t.cache_stats().cold_chunks, 1);
        assert!(t.eviction_candidates().is_empty());
        let after = t.snapshot()?;
        assert_eq!(after.batches, before.batches);
        assert_eq!(after.row_ids, before.row_ids);
        // Point reads touch only the rows asked for, in the order asked.
        let got = t.fetch(&[9_000, 3])?;
        assert_eq!(crate::test_util::first_i64s([&got]), vec![8_999, 2]);
        // Deleting cold rows forgets their keys: the key can be inserted again.
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from(vec![1, 2]),
        })?;
        assert!(
            t.lookup_keys(&[Arc::new(Int64Array::from(vec![1]))])?
                .is_empty()
        );
        assert_eq!(
            t.indexes()[0]
                .range(std::ops::Bound::Unbounded, std::ops::Bound::Unbounded)
                .len(),
            9_998
        );
        let again = rows(&mut t, vec![0])?;
        if let LogEntry::Insert { batch, .. } = &again {
            assert_eq!(t.find_duplicate_key(&HashSet::new(), batch)?, None);
        }
        let tiered = t.tiered_snapshot()?;
        let live: usize = tiered.parts.iter().map(SnapshotPart::num_rows).sum();
        assert_eq!(live, 9_998);
        let stats = t.cache_stats();
        assert!(stats.misses >= 3 && stats.object_store_bytes > 0 && stats.evictions == 1);
        // The file goes when the last chunk and snapshot referring to it do.
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from((3..=10_000).collect::<Vec<u64>>()),
        })?;
        assert_eq!(cold.collect_garbage()?, 0);
        drop(tiered);
        assert_eq!(cold.collect_garbage()?, 1);
        Ok(())
    }

    #[test]
    fn stored_rows_read_slices_of_hot_and_cold_chunks_as_they_were() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let cold = ColdStore::try_new(Arc::new(fs), "cache", "test")?;
        let mut t = ColumnarTable::try_new(schema(), None)?;
        for keys in [0..5_000, 5_000..10_000] {
            let e = rows(&mut t, keys.collect())?;
            t.apply(&e)?;
        }
        let (first, _, _) = t.eviction_candidates()[0];
        t.evict(first, "t", &cold)?;
        assert_eq!(t.cache_stats().cold_chunks, 1);
        // Every 7th row, asked for out of order and twice: ids are keys + 1.
        let mut ids: Vec<RowId> = (1..=10_000).filter(|id| id % 7 == 0).rev().collect();
        ids.push(7);
        let stored = t.stored_rows(&ids);
        let want: Vec<i64> = (0..10_000).filter(|k| (k + 1) % 7 == 0).collect();
        assert_eq!(stored.len(), want.len());
        assert!(stored.bytes_when_read() >= stored.len() * 16);
        let read = |s: &StoredRows| -> Result<Vec<i64>> {
            let batches = s.read()?;
            Ok(crate::test_util::first_i64s(batches.iter()))
        };
        assert_eq!(read(&stored)?, want);
        // The rows are deleted, the hot chunk evicted too: the references still read them,
        // in slices that cross the chunks' boundary and in one that is empty.
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from(ids[..ids.len() - 1].to_vec()),
        })?;
        let (second, _, _) = t.eviction_candidates()[0];
        t.evict(second, "t", &cold)?;
        let mut sliced = Vec::new();
        for offset in (0..stored.len()).step_by(300) {
            sliced.extend(read(&stored.slice(offset, 300))?);
        }
        assert_eq!(sliced, want);
        assert!(read(&stored.slice(stored.len(), 10))?.is_empty());
        let across = stored.slice(700, 20);
        assert_eq!(read(&across)?, want[700..720].to_vec());
        // Once every row is gone, the file of the chunk that was cold when the rows were
        // referred to stays while the references do; the other was read from memory, so
        // its later file goes with the table.
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from(t.live_row_ids()?),
        })?;
        assert_eq!(t.cache_stats().cold_chunks, 0);
        drop(t);
        assert_eq!(cold.collect_garbage()?, 1);
        assert_eq!(read(&across)?, want[700..720].to_vec());
        drop((stored, across));
        assert_eq!(cold.collect_garbage()?, 1);
        Ok(())
    }

    #[test]
    fn a_rewritten_log_refers_to_cold_files_and_replays_without_their_rows() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let cold = ColdStore::try_new(fs.clone(), "cache", "test")?;
        let mut t = ColumnarTable::try_new(schema(), Some(vec![0]))?;
        for keys in [0..10_000, 10_000..10_100] {
            let e = rows(&mut t, keys.collect())?;
            t.apply(&e)?;
        }
        let (cold_chunk, _, _) = t.eviction_candidates()[0];
        t.evict(cold_chunk, "t", &cold)?;
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from(vec![5, 6, 10_050]),
        })?;
        assert_eq!(t.unlogged_cold_rows(), 9_998);
        let parts = t.log_parts()?;
        let files: Vec<_> = parts
            .iter()
            .filter_map(|p| p.cold_file().cloned())
            .collect();
        let entries = parts
            .into_iter()
            .map(LogPart::entry)
            .collect::<Result<Vec<_>>>()?;
        assert!(matches!(entries[0], LogEntry::Cold { .. }));
        assert!(matches!(entries[1], LogEntry::Insert { .. }));
        t.set_log_files(files);
        assert_eq!(t.unlogged_cold_rows(), 0);
        // The log keeps the file after its last row is deleted.
        let before = t.snapshot()?;
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from((1..=10_000).collect::<Vec<u64>>()),
        })?;
        drop(before);
        assert_eq!(
            cold.collect_garbage()?,
            0,
            "the log still refers to the file"
        );

        // A restart: a new store replays the rewritten log, reading only the file's footer
        // and its key column.
        let reopened = ColdStore::try_new(fs, "cache", "test")?;
        let mut r = ColumnarTable::try_new(schema(), Some(vec![0]))?;
        for entry in &entries {
            r.replay(entry, &reopened)?;
        }
        assert_eq!(r.num_rows(), 9_998 + 99);
        assert_eq!(r.cache_stats().cold_chunks, 1);
        assert_eq!(r.unlogged_cold_rows(), 0);
        let got = r.fetch(&[7, 9_000, 10_100])?;
        assert_eq!(crate::test_util::first_i64s([&got]), vec![6, 8_999, 10_099]);
        assert!(
            r.fetch(&[5, 6])?.num_rows() == 0,
            "deleted rows stay deleted"
        );
        assert_eq!(
            r.lookup_keys(&[Arc::new(Int64Array::from(vec![3, 5, 9_999]))])?,
            vec![4, 10_000],
            "keys of the cold rows are indexed (key 5 was deleted)"
        );
        let dup = rows_with_ids(UInt64Array::from(vec![20_000]), vec![9_999])?;
        if let LogEntry::Insert { batch, .. } = &dup {
            assert_eq!(r.find_duplicate_key(&HashSet::new(), batch)?, Some(0));
        }
        assert_eq!(r.allocate_row_ids(1).value(0), 10_101);
        // Applying a cold entry without its file is refused.
        assert!(
            ColumnarTable::try_new(schema(), None)?
                .apply(&entries[0])
                .is_err()
        );
        // Once fewer than half of a cold chunk's rows are live, a rewrite writes them as an
        // insert and no longer keeps the file for them.
        r.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from((1_000..=8_000).collect::<Vec<u64>>()),
        })?;
        assert_eq!(r.cache_stats().cold_chunks, 1);
        assert_eq!(r.unlogged_cold_rows(), 0);
        let parts = r.log_parts()?;
        assert!(parts.iter().all(|p| p.cold_file().is_none()));
        match parts.into_iter().next().map(LogPart::entry).transpose()? {
            Some(LogEntry::Insert { row_ids, .. }) => assert_eq!(row_ids.len(), 9_998 - 7_001),
            other => panic!("expected the live rows as an insert, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn rows_are_found_when_inserts_interleave_their_ids() -> Result<()> {
        let mut t = ColumnarTable::try_new(schema(), Some(vec![0]))?;
        let insert = |ids: Vec<u64>, keys: Vec<i64>| rows_with_ids(UInt64Array::from(ids), keys);
        t.apply(&insert(vec![1, 2, 3, 10, 11], vec![1, 2, 3, 10, 11])?)?;
        // Inside the first insert's range, and out of order: found by id, not by range.
        t.apply(&insert(vec![6, 5], vec![6, 5])?)?;
        t.apply(&insert(vec![20, 21], vec![20, 21])?)?;
        assert_eq!(t.num_rows(), 9);
        assert!(t.contains(5) && t.contains(6) && t.contains(21) && !t.contains(4));
        let keys = |b: RecordBatch| crate::test_util::first_i64s([&b]);
        assert_eq!(keys(t.fetch(&[21, 5, 10, 6, 4])?), vec![21, 5, 10, 6]);
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from(vec![5, 10, 20, 21]),
        })?;
        assert_eq!(t.num_rows(), 5);
        assert!(!t.contains(5) && !t.contains(10) && !t.contains(21) && t.contains(6));
        assert_eq!(keys(t.fetch(&[6, 11, 1])?), vec![6, 11, 1]);
        assert_eq!(
            t.lookup_keys(&[Arc::new(Int64Array::from(vec![6, 5, 21]))])?,
            vec![6]
        );
        // The emptied chunk is gone: its range takes new rows again.
        t.apply(&insert(vec![20, 22], vec![20, 22])?)?;
        assert_eq!(keys(t.fetch(&[22, 20])?), vec![22, 20]);
        assert_eq!(
            t.key_index.len(),
            t.num_rows(),
            "the key index follows inserts and deletes"
        );
        // A row whose key hash equals another key's (forced here) is only a candidate: the
        // uniqueness check compares the keys, a lookup leaves it to the caller's filter.
        let key_99 = t.encode_key_columns(&[Arc::new(Int64Array::from(vec![99]))])?;
        let h = t.key_index.hash(&key_99[0]);
        t.key_index.insert(h, 6);
        let new_99 = rows_with_ids(UInt64Array::from(vec![30]), vec![99])?;
        let LogEntry::Insert { batch, .. } = &new_99 else {
            unreachable!()
        };
        assert_eq!(t.find_duplicate_key(&HashSet::new(), batch)?, None);
        assert_eq!(
            t.lookup_keys(&[Arc::new(Int64Array::from(vec![99]))])?,
            vec![6]
        );
        t.apply(&new_99)?;
        assert_eq!(t.find_duplicate_key(&HashSet::new(), batch)?, Some(0));
        assert!(t.key_index.remove(h, 6));
        assert_eq!(t.snapshot()?.num_rows(), 8);
        Ok(())
    }
}
