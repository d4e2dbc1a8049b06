//! Rewriting a table's log in parts (compaction, ALTER TABLE): the new entries stay out of
//! replays until one last write switches to them; a restart abandons an unfinished rewrite.

use std::sync::atomic::Ordering;

use rocksdb::WriteBatch;

use crate::db::Store;
use crate::db::keys::*;
use crate::db::write_set::WriteSet;
use crate::error::Result;

impl Store {
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
    pub(crate) fn abandon_log_rewrites(&self) -> Result<usize> {
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
}
