//! The durable store: one RocksDB instance holding the catalog and every table's log.
//!
//! A statement's changes form one [`WriteSet`]; [`Store::commit`] writes it as a single
//! RocksDB `WriteBatch` with `sync = true`, so a statement is acknowledged only once it is in
//! the WAL on disk, and after a crash either all of it or none of it is there.

pub mod keys;
mod log_rewrite;
pub mod reads;
#[cfg(test)]
mod tests;
pub mod write_set;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};
use tracing::info;

use crate::db::keys::*;
use crate::db::write_set::{WriteOp, WriteSet};
use crate::error::LockResultExt;
use crate::error::{Result, StorageError};

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
        let guard = self.commit_lock.lock().or_poisoned("commit")?;
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
                WriteOp::DropViewStateExcept(view_id, keep) => {
                    let state = self.cf(CF_VIEW_STATE)?;
                    let start = |op: u32| view_state_key(view_id, op, 0, &[])[..12].to_vec();
                    batch.delete_range_cf(state, view_id.to_be_bytes().to_vec(), start(keep));
                    let after = match keep.checked_add(1) {
                        Some(next) => start(next),
                        None => view_id.saturating_add(1).to_be_bytes().to_vec(),
                    };
                    batch.delete_range_cf(
                        state,
                        after,
                        view_id.saturating_add(1).to_be_bytes().to_vec(),
                    );
                    batch.delete_range_cf(
                        self.cf(CF_VIEW_UNDO)?,
                        view_id.to_be_bytes(),
                        view_id.saturating_add(1).to_be_bytes(),
                    );
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
        self.write_synced(batch)
    }

    /// Writes a batch and syncs the WAL before returning.
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
