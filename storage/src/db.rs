//! The durable store: one RocksDB instance holding the catalog and every table's log.
//!
//! A statement's changes form one [`WriteSet`]; [`Store::commit`] writes it as a single
//! RocksDB `WriteBatch` with `sync = true`, so a statement is acknowledged only once it is in
//! the WAL on disk, and after a crash either all of it or none of it is there.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use tracing::info;

use crate::catalog_record::CatalogRecord;
use crate::error::{Result, StorageError};
use crate::log_entry::LogEntry;

const CF_CATALOG: &str = "catalog";
const CF_TABLE_LOG: &str = "table_log";
const CF_META: &str = "meta";
/// Checkpointed state of materialized views: operator state deltas and view contents.
pub(crate) const CF_VIEW_STATE: &str = "view_state";
/// Undo records of state written outside a checkpoint (see `state_recovery.rs`).
pub(crate) const CF_VIEW_UNDO: &str = "view_state_undo";
const COLUMN_FAMILIES: [&str; 5] = [
    CF_CATALOG,
    CF_TABLE_LOG,
    CF_META,
    CF_VIEW_STATE,
    CF_VIEW_UNDO,
];
/// Operator number under which a view's contents are checkpointed.
pub const CONTENTS_OP: u32 = u32::MAX;
const LOG_REBASED_PREFIX: &[u8] = b"log_rebased/";
/// Meta keys of table logs being rewritten: the first sequence number of the new log.
const LOG_REWRITE_PREFIX: &[u8] = b"log_rewrite/";
const META_NEXT_SEQ: &[u8] = b"next_seq";

/// One change to durable state, part of a [`WriteSet`].
#[derive(Debug, Clone)]
enum WriteOp {
    PutCatalog(CatalogRecord),
    DeleteCatalog(u64),
    Append {
        table_id: u64,
        entry: LogEntry,
    },
    DropLog(u64),
    PutOffset {
        source_id: u64,
        value: Vec<u8>,
    },
    DeleteOffset(u64),
    PutSinkRow {
        sink_id: u64,
        row: Vec<u8>,
        count: i64,
    },
    DropSinkRows(u64),
    PutBadRecord {
        seq: u64,
        value: Vec<u8>,
    },
    DeleteBadRecord(u64),
    PutViewState {
        view_id: u64,
        op: u32,
        partition: u32,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
    DropViewState(u64),
    DropViewStateOp(u64, u32),
    KeepViewSpills(u64),
    PutMeta {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    DeleteMeta(Vec<u8>),
}

/// All durable changes of one statement or transaction; committed atomically.
#[derive(Debug, Clone, Default)]
pub struct WriteSet {
    /// The changes, applied in order.
    ops: Vec<WriteOp>,
}

impl WriteSet {
    /// An empty write set.
    pub fn new() -> Self {
        Self::default()
    }
    /// Records how far a source has read, committed with the rows it produced.
    pub fn put_source_offset(&mut self, source_id: u64, offset: u64) {
        self.put_source_state(source_id, offset.to_be_bytes().to_vec());
    }
    /// Records a source's position in a connector-defined encoding (files read, ...).
    pub fn put_source_state(&mut self, source_id: u64, value: Vec<u8>) {
        self.ops.push(WriteOp::PutOffset { source_id, value });
    }
    /// Forgets a dropped source's offset.
    pub fn delete_source_offset(&mut self, source_id: u64) {
        self.ops.push(WriteOp::DeleteOffset(source_id));
    }
    /// Sets how many copies of an encoded row a sink has delivered (0 forgets the row).
    pub fn put_sink_row(&mut self, sink_id: u64, row: Vec<u8>, count: i64) {
        self.ops.push(WriteOp::PutSinkRow {
            sink_id,
            row,
            count,
        });
    }
    /// Forgets every row a dropped sink delivered.
    pub fn drop_sink_rows(&mut self, sink_id: u64) {
        self.ops.push(WriteOp::DropSinkRows(sink_id));
    }
    /// Keeps a source's bad record (number `seq`, encoded by the caller) with the commit of
    /// the rows read beside it.
    pub fn put_bad_record(&mut self, seq: u64, value: Vec<u8>) {
        self.ops.push(WriteOp::PutBadRecord { seq, value });
    }
    /// Forgets bad record `seq` (evicted).
    pub fn delete_bad_record(&mut self, seq: u64) {
        self.ops.push(WriteOp::DeleteBadRecord(seq));
    }
    /// Stores (or replaces) a catalog record.
    pub fn put_catalog(&mut self, record: CatalogRecord) {
        self.ops.push(WriteOp::PutCatalog(record));
    }
    /// Removes a catalog record.
    pub fn delete_catalog(&mut self, id: u64) {
        self.ops.push(WriteOp::DeleteCatalog(id));
    }
    /// Appends an entry to a table's log.
    pub fn append(&mut self, table_id: u64, entry: LogEntry) {
        self.ops.push(WriteOp::Append { table_id, entry });
    }
    /// Removes a table's whole log (DROP TABLE, or before rewriting it).
    pub fn drop_log(&mut self, table_id: u64) {
        self.ops.push(WriteOp::DropLog(table_id));
    }
    /// Appends every change of `other` after this set's changes.
    /// Sets (or with `None` removes) one checkpointed state entry of a view.
    pub fn put_view_state(
        &mut self,
        view_id: u64,
        op: u32,
        partition: u32,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) {
        self.ops.push(WriteOp::PutViewState {
            view_id,
            op,
            partition,
            key,
            value,
        });
    }

    /// Removes every checkpointed state entry of a view (and its undo records).
    pub fn drop_view_state(&mut self, view_id: u64) {
        self.ops.push(WriteOp::DropViewState(view_id));
    }

    /// Makes the state a view evicted since its last checkpoint part of this commit (a
    /// checkpoint that includes the view): its undo records go (see `state_recovery.rs`).
    pub fn keep_view_spills(&mut self, view_id: u64) {
        self.ops.push(WriteOp::KeepViewSpills(view_id));
    }

    /// Deletes the checkpointed state of one operator of a view (or of its contents).
    pub fn drop_view_state_op(&mut self, view_id: u64, op: u32) {
        self.ops.push(WriteOp::DropViewStateOp(view_id, op));
    }

    /// Sets a metadata value (e.g. the checkpoint manifest).
    pub fn put_meta(&mut self, key: &[u8], value: Vec<u8>) {
        self.ops.push(WriteOp::PutMeta {
            key: key.to_vec(),
            value,
        });
    }

    /// Removes a metadata value.
    pub fn delete_meta(&mut self, key: &[u8]) {
        self.ops.push(WriteOp::DeleteMeta(key.to_vec()));
    }

    /// Appends another set's changes after these.
    pub fn extend(&mut self, other: WriteSet) {
        self.ops.extend(other.ops);
    }
    /// True when the set holds no change.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The RocksDB-backed durable store.
pub struct Store {
    /// The database, with column families `catalog`, `table_log`, `meta`, `view_state` and
    /// `view_state_undo`.
    pub(crate) db: DB,
    /// Next sequence number of a table log key; persisted with every commit.
    next_seq: AtomicU64,
    /// Next catalog object id.
    next_object_id: AtomicU64,
    /// Serialises commits so that log sequence numbers follow commit order.
    commit_lock: Mutex<()>,
    /// Number of upcoming commits that fail on purpose (fault-injection tests).
    injected_failures: AtomicU32,
    /// The block cache that memtables are also charged to, when memory is budgeted.
    cache: Option<rocksdb::Cache>,
    /// Keeps the memtables within their share of the budget.
    _write_buffers: Option<rocksdb::WriteBufferManager>,
    /// State entries of each view put back to its last checkpoint when the store opened.
    undone: BTreeMap<u64, u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .finish()
    }
}

impl Store {
    /// Opens (or creates) the store under `path`.
    pub fn open(path: &Path) -> Result<Store> {
        Self::open_with_memory(path, None)
    }

    /// Opens the store with its memtables and block cache held within `memory` bytes
    /// together (a block cache that the write-buffer manager charges memtables to).
    pub fn open_with_memory(path: &Path, memory: Option<usize>) -> Result<Store> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cache = memory.map(|m| rocksdb::Cache::new_lru_cache(m.max(4 << 20)));
        let write_buffers = match (&cache, memory) {
            (Some(cache), Some(m)) => {
                let wbm = rocksdb::WriteBufferManager::new_write_buffer_manager_with_cache(
                    (m / 2).max(2 << 20),
                    false,
                    cache.clone(),
                );
                opts.set_write_buffer_manager(&wbm);
                Some(wbm)
            }
            _ => None,
        };
        let cf_options = |name: &str| {
            let mut o = Options::default();
            let mut table = rocksdb::BlockBasedOptions::default();
            if name == CF_VIEW_STATE || name == CF_VIEW_UNDO {
                // Operators look up evicted state by key, most often a key that is not
                // there (a new group or join key): a Bloom filter answers those in memory.
                table.set_bloom_filter(10.0, false);
            }
            if let (Some(cache), Some(m)) = (&cache, memory) {
                // NOTE: index and filter blocks stay outside the cache (about 1.3 bytes a
                // key): charged to a small cache, a whole filter block was read back and
                // checksummed on nearly every lookup (measured: most of the CPU time of
                // a join under a 64 MiB limit).
                table.set_block_cache(cache);
                // Several memtables per family must fit the write-buffer share.
                o.set_write_buffer_size((m / 8).clamp(1 << 20, 64 << 20));
                // NOTE: a compaction holds its output file's filter hashes (8 bytes a key)
                // and index block in memory until the file is cut, outside the budget. At
                // RocksDB's 64 MiB of compressed data a file, the join state's files held
                // 2.7M keys: 22 MB of hashes and 17 MB of index builder in one compaction
                // (heaptrack, `state_spill`). Files of a 32nd of the limit keep that small.
                o.set_target_file_size_base((m as u64 / 32).clamp(2 << 20, 64 << 20));
            }
            o.set_block_based_table_factory(&table);
            o
        };
        let cfs = COLUMN_FAMILIES
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options(name)));
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let mut store = Store {
            db,
            next_seq: AtomicU64::new(1),
            next_object_id: AtomicU64::new(1),
            commit_lock: Mutex::new(()),
            injected_failures: AtomicU32::new(0),
            cache,
            _write_buffers: write_buffers,
            undone: BTreeMap::new(),
        };
        let seq = match store.db.get_cf(store.cf(CF_META)?, META_NEXT_SEQ)? {
            Some(bytes) => decode_u64(&bytes, "next_seq")?,
            None => 1,
        };
        store.next_seq.store(seq, Ordering::SeqCst);
        let max_id = store.catalog()?.iter().map(|r| r.id).max().unwrap_or(0);
        store.next_object_id.store(max_id + 1, Ordering::SeqCst);
        let abandoned = store.abandon_log_rewrites()?;
        if abandoned > 0 {
            info!(
                tables = abandoned,
                "deleted the unfinished rewrites of table logs"
            );
        }
        store.undone = store.undo_state_spills()?;
        if !store.undone.is_empty() {
            info!(
                views = store.undone.len(),
                entries = store.undone.values().sum::<u64>(),
                "put back the checkpointed state that views evicted after their last checkpoint"
            );
        }
        let orphans = store.drop_orphan_state()?;
        if !orphans.is_empty() {
            info!(views = ?orphans, "deleted the state of dropped views");
        }
        info!(path = %path.display(), next_seq = seq, "opened durable store");
        Ok(store)
    }

    /// Adds to `batch` the deletion of every state entry and undo record of view `view_id`.
    pub(crate) fn drop_view_ranges(&self, batch: &mut WriteBatch, view_id: u64) -> Result<()> {
        for cf in [CF_VIEW_STATE, CF_VIEW_UNDO] {
            batch.delete_range_cf(
                self.cf(cf)?,
                view_id.to_be_bytes(),
                view_id.saturating_add(1).to_be_bytes(),
            );
        }
        Ok(())
    }

    /// Bytes RocksDB holds in memory: its memtables and block cache, and the index and filter
    /// blocks of its open table files (kept outside the cache, see `open_with_memory`).
    pub fn memory_bytes(&self) -> u64 {
        let readers = self.property_sum("rocksdb.estimate-table-readers-mem");
        match &self.cache {
            Some(cache) => cache.get_usage() as u64 + readers,
            None => self.property_sum("rocksdb.cur-size-all-mem-tables") + readers,
        }
    }

    /// An integer property summed over the column families.
    fn property_sum(&self, property: &str) -> u64 {
        COLUMN_FAMILIES
            .into_iter()
            .filter_map(|name| self.db.cf_handle(name))
            .filter_map(|cf| self.db.property_int_value_cf(cf, property).ok().flatten())
            .sum()
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or(StorageError::Corrupt {
            what: "column family",
            detail: format!("{name} is missing"),
        })
    }

    /// State entries of view `view_id` that were evicted after its last checkpoint and put
    /// back to it when the store opened (see `state_recovery.rs`).
    pub fn undone_spills(&self, view_id: u64) -> u64 {
        self.undone.get(&view_id).copied().unwrap_or(0)
    }

    /// Allocates a new catalog object id (not durable until a record using it is committed).
    pub fn allocate_object_id(&self) -> u64 {
        self.next_object_id.fetch_add(1, Ordering::SeqCst)
    }

    /// Whether the next write fails on purpose (counts one injected failure down).
    pub(crate) fn take_injected_failure(&self) -> bool {
        self.injected_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Makes the next `n` commits fail before anything is written (fault injection).
    pub fn inject_write_failures(&self, n: u32) {
        self.injected_failures.store(n, Ordering::SeqCst);
    }

    /// Takes the commit lock; then, when `refusable`, fails if a write failure was injected.
    fn lock_commits(&self, refusable: bool) -> Result<std::sync::MutexGuard<'_, ()>> {
        let guard = self
            .commit_lock
            .lock()
            .map_err(|_| StorageError::Injected("commit lock poisoned".into()))?;
        if refusable && self.take_injected_failure() {
            return Err(StorageError::Injected("write refused".into()));
        }
        Ok(guard)
    }

    /// Writes the set atomically and syncs the WAL before returning.
    pub fn commit(&self, set: WriteSet) -> Result<()> {
        if set.is_empty() {
            return Ok(());
        }
        let _guard = self.lock_commits(true)?;
        let mut batch = WriteBatch::default();
        let seq = self.put_ops(&mut batch, set)?;
        self.write_synced(batch)?;
        self.next_seq.store(seq, Ordering::SeqCst);
        Ok(())
    }

    /// Adds the set's writes to `batch` (with the next log sequence number); returns the next
    /// sequence number once the batch is written. The caller holds the commit lock.
    fn put_ops(&self, batch: &mut WriteBatch, set: WriteSet) -> Result<u64> {
        let catalog = self.cf(CF_CATALOG)?;
        let log = self.cf(CF_TABLE_LOG)?;
        let mut seq = self.next_seq.load(Ordering::SeqCst);
        for op in set.ops {
            match op {
                WriteOp::PutCatalog(record) => {
                    let value = serde_json::to_vec(&record).map_err(|source| {
                        StorageError::CatalogRecord {
                            key: record.id.to_string(),
                            source,
                        }
                    })?;
                    batch.put_cf(catalog, record.id.to_be_bytes(), value);
                }
                WriteOp::DeleteCatalog(id) => batch.delete_cf(catalog, id.to_be_bytes()),
                WriteOp::Append { table_id, entry } => {
                    batch.put_cf(log, log_key(table_id, seq), entry.encode()?);
                    seq += 1;
                }
                WriteOp::DropLog(table_id) => {
                    batch.delete_range_cf(log, log_key(table_id, 0), log_key(table_id + 1, 0));
                    // NOTE: entries before `seq` are gone: a checkpoint taken before it can
                    // no longer be caught up from this table's log.
                    batch.put_cf(
                        self.cf(CF_META)?,
                        log_rebased_key(table_id),
                        seq.to_be_bytes(),
                    );
                }
                WriteOp::PutViewState {
                    view_id,
                    op,
                    partition,
                    key,
                    value,
                } => {
                    let key = view_state_key(view_id, op, partition, &key);
                    match value {
                        Some(value) => batch.put_cf(self.cf(CF_VIEW_STATE)?, key, value),
                        None => batch.delete_cf(self.cf(CF_VIEW_STATE)?, key),
                    }
                }
                WriteOp::DropViewState(view_id) => {
                    self.drop_view_ranges(batch, view_id)?;
                }
                WriteOp::KeepViewSpills(view_id) => {
                    batch.delete_range_cf(
                        self.cf(CF_VIEW_UNDO)?,
                        view_id.to_be_bytes(),
                        (view_id + 1).to_be_bytes(),
                    );
                }
                WriteOp::DropViewStateOp(view_id, op) => {
                    let end = match op.checked_add(1) {
                        Some(next) => view_state_key(view_id, next, 0, &[])[..12].to_vec(),
                        None => (view_id + 1).to_be_bytes().to_vec(),
                    };
                    batch.delete_range_cf(
                        self.cf(CF_VIEW_STATE)?,
                        &view_state_key(view_id, op, 0, &[])[..12],
                        &end,
                    );
                }
                WriteOp::PutMeta { key, value } => {
                    batch.put_cf(self.cf(CF_META)?, key, value);
                }
                WriteOp::DeleteMeta(key) => batch.delete_cf(self.cf(CF_META)?, key),
                WriteOp::PutOffset { source_id, value } => {
                    batch.put_cf(self.cf(CF_META)?, offset_key(source_id), value);
                }
                WriteOp::DeleteOffset(source_id) => {
                    batch.delete_cf(self.cf(CF_META)?, offset_key(source_id));
                }
                WriteOp::PutSinkRow {
                    sink_id,
                    row,
                    count,
                } => {
                    let key = sink_row_key(sink_id, &row);
                    if count == 0 {
                        batch.delete_cf(self.cf(CF_META)?, key);
                    } else {
                        batch.put_cf(self.cf(CF_META)?, key, count.to_be_bytes());
                    }
                }
                WriteOp::PutBadRecord { seq, value } => {
                    batch.put_cf(self.cf(CF_META)?, bad_record_key(seq), value);
                }
                WriteOp::DeleteBadRecord(seq) => {
                    batch.delete_cf(self.cf(CF_META)?, bad_record_key(seq));
                }
                WriteOp::DropSinkRows(sink_id) => {
                    batch.delete_range_cf(
                        self.cf(CF_META)?,
                        sink_row_key(sink_id, &[]),
                        sink_row_key(sink_id + 1, &[]),
                    );
                }
            }
        }
        batch.put_cf(self.cf(CF_META)?, META_NEXT_SEQ, seq.to_be_bytes());
        Ok(seq)
    }

    /// Every catalog record, in id order.
    pub fn catalog(&self) -> Result<Vec<CatalogRecord>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_CATALOG)?, IteratorMode::Start)
        {
            let (key, value) = item?;
            let record: CatalogRecord =
                serde_json::from_slice(&value).map_err(|source| StorageError::CatalogRecord {
                    key: format!("{key:?}"),
                    source,
                })?;
            out.push(record);
        }
        Ok(out)
    }

    /// The committed offset of a source (0 when it has committed nothing).
    pub fn source_offset(&self, source_id: u64) -> Result<u64> {
        match self.source_state(source_id)? {
            Some(bytes) => decode_u64(&bytes, "source offset"),
            None => Ok(0),
        }
    }

    /// The committed position of a source as the connector encoded it, if any.
    pub fn source_state(&self, source_id: u64) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_META)?, offset_key(source_id))?)
    }

    /// The rows a sink has delivered, as (encoded row, copies), in key order.
    pub fn sink_rows(&self, sink_id: u64) -> Result<Vec<(Vec<u8>, i64)>> {
        self.meta_with_prefix(&sink_row_key(sink_id, &[]))?
            .into_iter()
            .map(|(row, count)| Ok((row, decode_u64(&count, "sink row count")? as i64)))
            .collect()
    }

    /// Every kept bad record as (number, encoded record), oldest first.
    pub fn bad_records(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        self.meta_with_prefix(BAD_RECORD_PREFIX)?
            .into_iter()
            .map(|(seq, value)| Ok((decode_u64(&seq, "bad record key")?, value)))
            .collect()
    }

    /// The entries of the `meta` column family whose key starts with `prefix`, in key order,
    /// as (key without the prefix, value).
    fn meta_with_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_META)?,
            IteratorMode::From(prefix, Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key[prefix.len()..].to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// The log of one table with each entry's log sequence number, oldest first.
    pub fn table_log_with_seqs(&self, table_id: u64) -> Result<Vec<(u64, LogEntry)>> {
        let mut out = Vec::new();
        self.for_each_log_entry(table_id, |seq, entry| {
            out.push((seq, entry));
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with each entry of a table's log in order, with its sequence number, decoding
    /// one entry at a time (a restart replays tables larger than memory this way); returns
    /// the number of entries.
    pub fn for_each_log_entry(
        &self,
        table_id: u64,
        mut f: impl FnMut(u64, LogEntry) -> Result<()>,
    ) -> Result<usize> {
        let start = log_key(table_id, 0);
        let iter = self.db.iterator_cf(
            self.cf(CF_TABLE_LOG)?,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut n = 0;
        for item in iter {
            let (key, value) = item?;
            if key.len() != 16 || key[..8] != table_id.to_be_bytes() {
                break;
            }
            f(decode_u64(&key[8..], "log key")?, LogEntry::decode(&value)?)?;
            n += 1;
        }
        Ok(n)
    }
}

impl Store {
    /// The next log sequence number: every log entry written so far has a smaller one.
    pub fn next_log_seq(&self) -> u64 {
        self.next_seq.load(Ordering::SeqCst)
    }

    /// A metadata value.
    pub fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_META)?, key)?)
    }

    /// The log sequence number from which a table's log was last rewritten (compacted,
    /// truncated), if ever.
    pub fn log_rebased_at(&self, table_id: u64) -> Result<Option<u64>> {
        self.meta(&log_rebased_key(table_id))?
            .map(|v| decode_u64(&v, "log rebase"))
            .transpose()
    }

    /// Every checkpointed state entry of a view.
    pub fn view_state(&self, view_id: u64) -> Result<Vec<ViewStateEntry>> {
        let prefix = view_id.to_be_bytes();
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_VIEW_STATE)?,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            if key.len() < 16 || key[..8] != prefix {
                break;
            }
            let op = u32::from_be_bytes([key[8], key[9], key[10], key[11]]);
            let partition = u32::from_be_bytes([key[12], key[13], key[14], key[15]]);
            out.push((op, partition, key[16..].to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// The checkpointed state entries of one operator of a view.
    pub fn view_state_op(&self, view_id: u64, op: u32) -> Result<Vec<OpStateEntry>> {
        let mut out = Vec::new();
        self.for_each_view_state_op(view_id, op, |partition, key, value| {
            out.push((partition, key.to_vec(), value.to_vec()));
            Ok::<(), StorageError>(())
        })?;
        Ok(out)
    }

    /// Calls `f` with each checkpointed state entry (partition, key, value) of one operator
    /// of a view, in key order, without collecting them; stops at the first error.
    pub fn for_each_view_state_op<E: From<StorageError>>(
        &self,
        view_id: u64,
        op: u32,
        mut f: impl FnMut(u32, &[u8], &[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let prefix = view_state_key(view_id, op, 0, &[]);
        let iter = self.db.iterator_cf(
            self.cf(CF_VIEW_STATE)?,
            IteratorMode::From(&prefix[..12], Direction::Forward),
        );
        for item in iter {
            let (key, value) = item.map_err(StorageError::from)?;
            if key.len() < 16 || key[..12] != prefix[..12] {
                break;
            }
            let partition = u32::from_be_bytes([key[12], key[13], key[14], key[15]]);
            f(partition, &key[16..], &value)?;
        }
        Ok(())
    }

    /// One state entry of a view's operator partition, as last written.
    pub fn view_state_entry(
        &self,
        view_id: u64,
        op: u32,
        partition: u32,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        let key = view_state_key(view_id, op, partition, key);
        Ok(self.db.get_cf(self.cf(CF_VIEW_STATE)?, key)?)
    }

    /// Sets a metadata value and, when `remove_view_state` names a view, deletes that view's
    /// state in the same synced write.
    pub fn put_meta_now(
        &self,
        key: &[u8],
        value: &[u8],
        remove_view_state: Option<u64>,
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META)?, key, value);
        if let Some(view_id) = remove_view_state {
            self.drop_view_ranges(&mut batch, view_id)?;
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        Ok(self.db.write_opt(batch, &opts)?)
    }

    /// Starts rewriting a table's log (compacting it a chunk at a time): the entries appended
    /// from now on make the new log. They stay out of replays until
    /// [`Store::finish_log_rewrite`] drops the entries before them in one write; a restart
    /// before that deletes them (the old log stays). The caller appends nothing else to the
    /// table in between. Returns the first sequence number of the new log.
    pub fn begin_log_rewrite(&self, table_id: u64) -> Result<u64> {
        let _guard = self.lock_commits(false)?;
        let from = self.next_seq.load(Ordering::SeqCst);
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_META)?,
            log_rewrite_key(table_id),
            from.to_be_bytes(),
        );
        self.write_synced(batch)?;
        Ok(from)
    }

    /// Makes the log rewritten since [`Store::begin_log_rewrite`] the table's log: the older
    /// entries go, in one synced write with `with` (ALTER TABLE's new catalog record).
    pub fn finish_log_rewrite(&self, table_id: u64, from: u64, with: WriteSet) -> Result<()> {
        let _guard = self.lock_commits(true)?;
        let meta = self.cf(CF_META)?;
        let mut batch = WriteBatch::default();
        let seq = self.put_ops(&mut batch, with)?;
        batch.delete_range_cf(
            self.cf(CF_TABLE_LOG)?,
            log_key(table_id, 0),
            log_key(table_id, from),
        );
        // NOTE: entries before `from` are gone: a checkpoint taken before it can no longer
        // be caught up from this table's log.
        batch.put_cf(meta, log_rebased_key(table_id), from.to_be_bytes());
        batch.delete_cf(meta, log_rewrite_key(table_id));
        self.write_synced(batch)?;
        self.next_seq.store(seq, Ordering::SeqCst);
        Ok(())
    }

    /// Deletes what an unfinished rewrite of a table's log appended (after a failure, or a
    /// crash: [`Store::open`] calls it for every table); the old log stays. Returns whether
    /// there was one.
    pub fn abandon_log_rewrite(&self, table_id: u64) -> Result<bool> {
        let Some(from) = self.meta(&log_rewrite_key(table_id))? else {
            return Ok(false);
        };
        let from = decode_u64(&from, "log rewrite")?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_TABLE_LOG)?,
            log_key(table_id, from),
            log_key(table_id + 1, 0),
        );
        batch.delete_cf(self.cf(CF_META)?, log_rewrite_key(table_id));
        self.write_synced(batch)?;
        Ok(true)
    }

    /// Abandons every unfinished log rewrite; returns how many there were.
    fn abandon_log_rewrites(&self) -> Result<usize> {
        let tables = self
            .meta_with_prefix(LOG_REWRITE_PREFIX)?
            .into_iter()
            .map(|(id, _)| decode_u64(&id, "log rewrite key"))
            .collect::<Result<Vec<_>>>()?;
        for table_id in &tables {
            self.abandon_log_rewrite(*table_id)?;
        }
        Ok(tables.len())
    }

    pub(crate) fn write_synced(&self, batch: WriteBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        Ok(self.db.write_opt(batch, &opts)?)
    }

    /// Flushes checkpointed view state from the memtable to disk, so that a restart does not
    /// replay it from the WAL.
    pub fn flush_view_state(&self) -> Result<()> {
        Ok(self.db.flush_cf(self.cf(CF_VIEW_STATE)?)?)
    }
}

/// One checkpointed state entry of a view: operator, partition, key, value.
pub type ViewStateEntry = (u32, u32, Vec<u8>, Vec<u8>);
/// One checkpointed state entry of an operator: partition, key, value.
pub type OpStateEntry = (u32, Vec<u8>, Vec<u8>);

pub(crate) fn view_state_key(view_id: u64, op: u32, partition: u32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + key.len());
    k.extend_from_slice(&view_id.to_be_bytes());
    k.extend_from_slice(&op.to_be_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn log_rewrite_key(table_id: u64) -> Vec<u8> {
    let mut k = LOG_REWRITE_PREFIX.to_vec();
    k.extend_from_slice(&table_id.to_be_bytes());
    k
}

fn log_rebased_key(table_id: u64) -> Vec<u8> {
    let mut k = LOG_REBASED_PREFIX.to_vec();
    k.extend_from_slice(&table_id.to_be_bytes());
    k
}

fn offset_key(source_id: u64) -> Vec<u8> {
    let mut key = b"source_offset/".to_vec();
    key.extend_from_slice(&source_id.to_be_bytes());
    key
}

const BAD_RECORD_PREFIX: &[u8] = b"bad_record/";

fn bad_record_key(seq: u64) -> Vec<u8> {
    let mut key = BAD_RECORD_PREFIX.to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn sink_row_key(sink_id: u64, row: &[u8]) -> Vec<u8> {
    let mut key = b"sink_row/".to_vec();
    key.extend_from_slice(&sink_id.to_be_bytes());
    key.extend_from_slice(row);
    key
}

fn log_key(table_id: u64, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&table_id.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub(crate) fn decode_u64(bytes: &[u8], what: &'static str) -> Result<u64> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StorageError::Corrupt {
        what,
        detail: format!("expected 8 bytes, got {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog_record::ObjectKind;
    use arrow::array::{Int64Array, RecordBatch, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn log_entries(store: &Store, table_id: u64) -> Result<Vec<LogEntry>> {
        Ok(store
            .table_log_with_seqs(table_id)?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    fn record(id: u64) -> CatalogRecord {
        CatalogRecord {
            id,
            kind: ObjectKind::Table,
            database: "millrace".into(),
            schema: "public".into(),
            name: format!("t{id}"),
            sql: "CREATE TABLE t (k BIGINT)".into(),
            depends_on: vec![],
            search_schema: None,
        }
    }

    fn insert(rows: Vec<i64>, first_id: u64) -> Result<LogEntry> {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let n = rows.len() as u64;
        Ok(LogEntry::Insert {
            row_ids: UInt64Array::from((first_id..first_id + n).collect::<Vec<_>>()),
            batch: RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(rows))])?,
        })
    }

    #[test]
    fn commit_survives_reopen_and_logs_stay_apart() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        {
            let store = Store::open(dir.path())?;
            let mut set = WriteSet::new();
            set.put_catalog(record(1));
            set.put_catalog(record(2));
            set.append(1, insert(vec![10, 20], 1)?);
            set.append(2, insert(vec![30], 1)?);
            set.append(
                1,
                LogEntry::Delete {
                    row_ids: UInt64Array::from(vec![1]),
                },
            );
            store.commit(set)?;
        }
        let store = Store::open(dir.path())?;
        assert_eq!(store.catalog()?.len(), 2);
        assert_eq!(store.allocate_object_id(), 3);
        let log1 = log_entries(&store, 1)?;
        assert_eq!(log1.len(), 2);
        assert!(matches!(log1[1], LogEntry::Delete { .. }));
        assert_eq!(log_entries(&store, 2)?.len(), 1);
        let mut drop = WriteSet::new();
        drop.drop_log(1);
        drop.delete_catalog(1);
        store.commit(drop)?;
        assert!(log_entries(&store, 1)?.is_empty());
        assert_eq!(log_entries(&store, 2)?.len(), 1);
        Ok(())
    }

    /// The rows of a table's log, in order (inserts only).
    fn logged_rows(store: &Store, table_id: u64) -> Result<Vec<i64>> {
        let mut rows = Vec::new();
        for entry in log_entries(store, table_id)? {
            if let LogEntry::Insert { batch, .. } = entry {
                let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
                rows.extend(column.map(|c| c.values().to_vec()).unwrap_or_default());
            }
        }
        Ok(rows)
    }

    #[test]
    fn a_log_rewrite_is_invisible_until_finished_and_abandoned_by_a_restart() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        let mut set = WriteSet::new();
        set.put_catalog(record(1));
        set.put_catalog(record(2));
        set.append(1, insert(vec![1, 2, 3], 1)?);
        set.append(2, insert(vec![9], 1)?);
        {
            let store = Store::open(dir.path())?;
            store.commit(set)?;
            // A rewrite cut short by a crash: its entries go at the next open.
            store.begin_log_rewrite(1)?;
            let mut part = WriteSet::new();
            part.append(1, insert(vec![1, 2], 1)?);
            store.commit(part)?;
        }
        let store = Store::open(dir.path())?;
        assert_eq!(logged_rows(&store, 1)?, vec![1, 2, 3]);
        assert_eq!(store.log_rebased_at(1)?, None);
        // A failed rewrite is abandoned in place.
        store.begin_log_rewrite(1)?;
        let mut part = WriteSet::new();
        part.append(1, insert(vec![7], 1)?);
        store.commit(part)?;
        assert!(store.abandon_log_rewrite(1)?);
        assert_eq!(logged_rows(&store, 1)?, vec![1, 2, 3]);
        // A finished one replaces the log, together with the writes given to it.
        let from = store.begin_log_rewrite(1)?;
        for rows in [vec![1], vec![3]] {
            let mut part = WriteSet::new();
            part.append(1, insert(rows, 1)?);
            store.commit(part)?;
        }
        let mut with = WriteSet::new();
        with.put_catalog(CatalogRecord {
            sql: "CREATE TABLE t (k BIGINT, v TEXT)".into(),
            ..record(1)
        });
        store.finish_log_rewrite(1, from, with)?;
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!(logged_rows(&store, 1)?, vec![1, 3]);
        assert_eq!(logged_rows(&store, 2)?, vec![9]);
        assert_eq!(store.log_rebased_at(1)?, Some(from));
        assert!(store.catalog()?[0].sql.contains("v TEXT"));
        assert!(!store.abandon_log_rewrite(1)?);
        Ok(())
    }

    #[test]
    fn injected_failure_writes_nothing() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        let store = Store::open(dir.path())?;
        store.inject_write_failures(1);
        let mut set = WriteSet::new();
        set.put_catalog(record(1));
        assert!(store.commit(set.clone()).is_err());
        assert!(store.catalog()?.is_empty());
        store.commit(set)?;
        assert_eq!(store.catalog()?.len(), 1);
        Ok(())
    }

    #[test]
    fn sink_rows_are_kept_per_sink_and_dropped_together() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        let store = Store::open(dir.path())?;
        let mut set = WriteSet::new();
        set.put_sink_row(7, b"a".to_vec(), 2);
        set.put_sink_row(7, b"b".to_vec(), 1);
        set.put_sink_row(8, b"a".to_vec(), 5);
        store.commit(set)?;
        let mut set = WriteSet::new();
        set.put_sink_row(7, b"b".to_vec(), 0);
        set.put_sink_row(7, b"c".to_vec(), 3);
        store.commit(set)?;
        assert_eq!(
            store.sink_rows(7)?,
            vec![(b"a".to_vec(), 2), (b"c".to_vec(), 3)]
        );
        let mut set = WriteSet::new();
        set.drop_sink_rows(7);
        store.commit(set)?;
        assert!(store.sink_rows(7)?.is_empty());
        assert_eq!(store.sink_rows(8)?, vec![(b"a".to_vec(), 5)]);
        Ok(())
    }

    #[test]
    fn bad_records_are_kept_in_order_until_deleted() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        {
            let store = Store::open(dir.path())?;
            let mut set = WriteSet::new();
            for seq in [3u64, 1, 2, 256] {
                set.put_bad_record(seq, seq.to_string().into_bytes());
            }
            set.put_sink_row(1, b"x".to_vec(), 1);
            store.commit(set)?;
            let mut set = WriteSet::new();
            set.delete_bad_record(2);
            store.commit(set)?;
        }
        let store = Store::open(dir.path())?;
        assert_eq!(
            store.bad_records()?,
            vec![
                (1, b"1".to_vec()),
                (3, b"3".to_vec()),
                (256, b"256".to_vec())
            ]
        );
        Ok(())
    }

    #[test]
    fn dropping_one_operators_state_keeps_the_others() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        let store = Store::open(dir.path())?;
        let mut set = WriteSet::default();
        for (view, op) in [(7, 1), (7, u32::MAX), (7, 2), (8, 0)] {
            set.put_view_state(view, op, 0, b"k".to_vec(), Some(b"v".to_vec()));
        }
        store.commit(set)?;
        let mut set = WriteSet::default();
        set.drop_view_state_op(7, u32::MAX);
        set.drop_view_state_op(7, 1);
        store.commit(set)?;
        let ops: Vec<u32> = store.view_state(7)?.iter().map(|e| e.0).collect();
        assert_eq!(ops, vec![2]);
        assert_eq!(store.view_state(8)?.len(), 1);
        Ok(())
    }
}
