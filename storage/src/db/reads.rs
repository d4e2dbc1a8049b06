//! Reads of the durable store: the catalog, table logs, source positions, sink rows, bad
//! records, metadata and checkpointed view state.

use std::sync::atomic::Ordering;

use rocksdb::{Direction, IteratorMode};

use crate::catalog_record::CatalogRecord;
use crate::db::Store;
use crate::db::keys::*;
use crate::error::{Result, StorageError};
use crate::log_entry::LogEntry;

/// One checkpointed state entry of a view: operator, partition, key, value.
pub type ViewStateEntry = (u32, u32, Vec<u8>, Vec<u8>);
/// One checkpointed state entry of an operator: partition, key, value.
pub type OpStateEntry = (u32, Vec<u8>, Vec<u8>);

impl Store {
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
    pub(crate) fn meta_with_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
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
}
