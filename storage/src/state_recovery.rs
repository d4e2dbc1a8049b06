//! What the store does to operator state when it opens after a crash: it puts back the
//! checkpointed values of state evicted after a view's last checkpoint, and deletes the state
//! of views that no longer exist.
//!
//! An operator evicts changed state into the `view_state` family, over its checkpointed
//! entries, between checkpoints (see `state_tier.rs`). In the same write, the first such
//! write of a key since the view's last checkpoint copies the key's checkpointed value (or
//! its absence) to the `view_state_undo` family. The next checkpoint that includes the view
//! deletes the view's undo records in its commit ([`crate::WriteSet::keep_view_spills`]):
//! the evicted entries become part of it. A restart before that puts the checkpointed
//! values back when the store opens ([`Store::undo_state_spills`]), so the view's state is
//! again exactly its last checkpoint and the view restores from it and catches up, instead
//! of being rebuilt from its inputs.
//!
//! A dropped view's state is deleted by the next checkpoint; a crash before it, or a server
//! without checkpoints, leaves it behind, and [`Store::drop_orphan_state`] deletes it on
//! the next start.

use std::collections::{BTreeMap, HashSet};

use rocksdb::{IteratorMode, WriteBatch};

use crate::db::Store;
use crate::db::keys::{CF_VIEW_STATE, CF_VIEW_UNDO, decode_u64, view_state_key};
use crate::error::{Result, StorageError};

/// First byte of an undo record: the key held this value at the checkpoint.
const PRESENT: u8 = 1;
/// First (and only) byte of an undo record: the key was absent at the checkpoint.
const ABSENT: u8 = 0;
/// Keys whose undo records and checkpointed values one batched read looks up.
const UNDO_READ_KEYS: usize = 256;
/// Bytes of one write of a spill, at least (a key's undo record and new entry go together).
const SPILL_WRITE_BYTES: usize = 1 << 20;
/// Bytes of one write while undoing (each write is consistent on its own).
const UNDO_WRITE_BYTES: usize = 4 << 20;

/// The view a `view_state` or `view_state_undo` key belongs to (its first 8 bytes).
fn view_of(key: &[u8]) -> Result<u64> {
    decode_u64(key.get(..8).unwrap_or(key), "view state key")
}

impl Store {
    /// Writes operator state evicted from memory in place of its checkpointed entries (None:
    /// removed), outside any checkpoint. With `undo`, the first write of a key since the
    /// view's last checkpoint keeps the checkpointed value in an undo record, in the same
    /// write; without, the caller has marked the view's checkpoint stale (see
    /// `state_tier::StateTier`). The writes go to the WAL unsynced: the next checkpoint's
    /// synced commit makes it durable together with the entries that reference it. Honours
    /// injected write failures.
    pub fn spill_view_state(
        &self,
        view_id: u64,
        op: u32,
        partition: u32,
        entries: &[(Vec<u8>, Option<Vec<u8>>)],
        undo: bool,
    ) -> Result<()> {
        if self.take_injected_failure() {
            return Err(StorageError::Injected("state spill refused".into()));
        }
        let state = self.cf(CF_VIEW_STATE)?;
        let undo_cf = self.cf(CF_VIEW_UNDO)?;
        let mut batch = WriteBatch::default();
        // NOTE: a few keys at a time, each key's undo record in the same write as its new
        // entry, and a write once the batch holds SPILL_WRITE_BYTES: the caller bounds a
        // spill by its new entries, and a removal there is a key's bytes, while its undo
        // record holds the whole checkpointed value (measured with heaptrack: a spill during
        // a large UPDATE built one 50 MB batch of undo records, outside the budget).
        for chunk in entries.chunks(UNDO_READ_KEYS) {
            let keys: Vec<Vec<u8>> = chunk
                .iter()
                .map(|(key, _)| view_state_key(view_id, op, partition, key))
                .collect();
            if undo {
                // NOTE: a batched read pins a block per value found until its results go; a
                // few keys at a time keep that small (all of a spill at once pinned tens of MB).
                let mut first = Vec::new();
                for (key, recorded) in keys
                    .iter()
                    .zip(self.db.batched_multi_get_cf(undo_cf, &keys, false))
                {
                    if recorded?.is_none() {
                        first.push(key);
                    }
                }
                let checkpointed =
                    self.db
                        .batched_multi_get_cf(state, first.iter().copied(), false);
                for (key, value) in first.into_iter().zip(checkpointed) {
                    let record = match value? {
                        Some(value) => {
                            let mut record = Vec::with_capacity(value.len() + 1);
                            record.push(PRESENT);
                            record.extend_from_slice(&value);
                            record
                        }
                        None => vec![ABSENT],
                    };
                    batch.put_cf(undo_cf, key, record);
                }
            }
            for (key, (_, value)) in keys.iter().zip(chunk) {
                match value {
                    Some(value) => batch.put_cf(state, key, value),
                    None => batch.delete_cf(state, key),
                }
            }
            if batch.size_in_bytes() >= SPILL_WRITE_BYTES {
                self.db.write(std::mem::take(&mut batch))?;
            }
        }
        if !batch.is_empty() {
            self.db.write(batch)?;
        }
        Ok(())
    }

    /// Puts back the checkpointed value of every state entry written since its view's last
    /// checkpoint, and deletes the undo records (called when the store opens). Returns the
    /// entries put back, per view.
    pub(crate) fn undo_state_spills(&self) -> Result<BTreeMap<u64, u64>> {
        let undo = self.cf(CF_VIEW_UNDO)?;
        let state = self.cf(CF_VIEW_STATE)?;
        let mut undone = BTreeMap::new();
        let mut batch = WriteBatch::default();
        for item in self.db.iterator_cf(undo, IteratorMode::Start) {
            let (key, record) = item?;
            let corrupt = |detail: &str| StorageError::Corrupt {
                what: "state undo record",
                detail: format!("{detail} (key {key:?})"),
            };
            let view_id = view_of(&key)?;
            match record.split_first() {
                Some((&PRESENT, value)) => batch.put_cf(state, &key, value),
                Some((&ABSENT, [])) => batch.delete_cf(state, &key),
                _ => return Err(corrupt("unknown record")),
            }
            batch.delete_cf(undo, &key);
            *undone.entry(view_id).or_insert(0) += 1;
            if batch.size_in_bytes() >= UNDO_WRITE_BYTES {
                self.write_synced(std::mem::take(&mut batch))?;
            }
        }
        if !batch.is_empty() {
            self.write_synced(batch)?;
        }
        Ok(undone)
    }

    /// Deletes the state and undo records of every view without a catalog record (called
    /// when the store opens); returns the views whose state went.
    pub(crate) fn drop_orphan_state(&self) -> Result<Vec<u64>> {
        let live: HashSet<u64> = self.catalog()?.iter().map(|r| r.id).collect();
        let mut orphans = Vec::new();
        for name in [CF_VIEW_STATE, CF_VIEW_UNDO] {
            let cf = self.cf(name)?;
            let mut from = 0u64;
            // One seek per view: the first key at or after `from` names the next view.
            loop {
                let mut iter = self.db.raw_iterator_cf(cf);
                iter.seek(from.to_be_bytes());
                let Some(key) = iter.key() else {
                    iter.status()?;
                    break;
                };
                let view_id = view_of(key)?;
                if !live.contains(&view_id) && !orphans.contains(&view_id) {
                    orphans.push(view_id);
                }
                match view_id.checked_add(1) {
                    Some(next) => from = next,
                    None => break,
                }
            }
        }
        if !orphans.is_empty() {
            let mut batch = WriteBatch::default();
            for view_id in &orphans {
                self.drop_view_ranges(&mut batch, *view_id)?;
            }
            self.write_synced(batch)?;
        }
        Ok(orphans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::write_set::WriteSet;

    fn entries(pairs: &[(u8, Option<u8>)]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        pairs
            .iter()
            .map(|(k, v)| (vec![*k], v.map(|v| vec![v])))
            .collect()
    }

    fn state(store: &Store) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(store
            .view_state_op(3, 1)?
            .into_iter()
            .map(|(_, k, v)| (k, v))
            .collect())
    }

    fn pairs(p: &[(u8, u8)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        p.iter().map(|(k, v)| (vec![*k], vec![*v])).collect()
    }

    fn view_record(id: u64) -> crate::catalog_record::CatalogRecord {
        crate::catalog_record::CatalogRecord {
            id,
            kind: crate::catalog_record::ObjectKind::MaterializedView,
            database: "millrace".into(),
            schema: "public".into(),
            name: format!("v{id}"),
            sql: String::new(),
            search_schema: None,
            depends_on: Vec::new(),
        }
    }

    #[test]
    fn state_spilled_after_a_checkpoint_is_undone_on_open_unless_a_checkpoint_keeps_it()
    -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        {
            let store = Store::open(dir.path())?;
            let mut set = WriteSet::new();
            set.put_catalog(view_record(3));
            for (k, v) in [(1u8, 10u8), (2, 20), (3, 30)] {
                set.put_view_state(3, 1, 0, vec![k], Some(vec![v]));
            }
            store.commit(set)?;
            // Two evictions after the checkpoint: changed, removed and new keys; key 1
            // twice (its undo record keeps the checkpointed value, not the first spill's).
            store.spill_view_state(3, 1, 0, &entries(&[(1, Some(11)), (2, None)]), true)?;
            store.spill_view_state(3, 1, 0, &entries(&[(1, Some(12)), (4, Some(40))]), true)?;
            assert_eq!(state(&store)?, pairs(&[(1, 12), (3, 30), (4, 40)]));
        }
        {
            let store = Store::open(dir.path())?;
            assert_eq!(state(&store)?, pairs(&[(1, 10), (2, 20), (3, 30)]));
            assert_eq!(store.undone_spills(3), 3, "keys 1, 2 and 4 put back");
            // Evicted again; this time a checkpoint keeps it.
            store.spill_view_state(3, 1, 0, &entries(&[(3, None), (5, Some(50))]), true)?;
            let mut set = WriteSet::new();
            set.keep_view_spills(3);
            set.put_view_state(3, 1, 0, vec![1], Some(vec![13]));
            store.commit(set)?;
        }
        {
            let store = Store::open(dir.path())?;
            assert_eq!(state(&store)?, pairs(&[(1, 13), (2, 20), (5, 50)]));
            assert_eq!(store.undone_spills(3), 0);
            // Without undo records (a stale-marked view) nothing is put back.
            store.spill_view_state(3, 1, 0, &entries(&[(2, Some(21))]), false)?;
            // A failed write changes nothing.
            store.inject_write_failures(1);
            assert!(
                store
                    .spill_view_state(3, 1, 0, &entries(&[(1, None)]), true)
                    .is_err()
            );
        }
        let store = Store::open(dir.path())?;
        assert_eq!(state(&store)?, pairs(&[(1, 13), (2, 21), (5, 50)]));
        // Dropping the view's state drops its undo records too.
        store.spill_view_state(3, 1, 0, &entries(&[(1, Some(14))]), true)?;
        let mut set = WriteSet::new();
        set.drop_view_state(3);
        store.commit(set)?;
        drop(store);
        let store = Store::open(dir.path())?;
        assert!(state(&store)?.is_empty());
        assert_eq!(store.undone_spills(3), 0);
        Ok(())
    }

    #[test]
    fn a_spill_larger_than_one_write_keeps_every_undo_record() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        let key = |i: u16| i.to_be_bytes().to_vec();
        let value = |i: u16| vec![(i % 251) as u8; 4096];
        {
            let store = Store::open(dir.path())?;
            let mut set = WriteSet::new();
            set.put_catalog(view_record(3));
            for i in 0..2000u16 {
                set.put_view_state(3, 1, 0, key(i), Some(value(i)));
            }
            store.commit(set)?;
            // Removals are small in the caller's count; their undo records are 8 MB here,
            // written a few keys at a time.
            let removed: Vec<_> = (0..2000u16).map(|i| (key(i), None)).collect();
            store.spill_view_state(3, 1, 0, &removed, true)?;
            assert!(state(&store)?.is_empty());
        }
        let store = Store::open(dir.path())?;
        assert_eq!(store.undone_spills(3), 2000);
        let restored = state(&store)?;
        let want: Vec<_> = (0..2000u16).map(|i| (key(i), value(i))).collect();
        assert_eq!(restored, want);
        Ok(())
    }

    #[test]
    fn state_of_views_without_a_catalog_record_is_deleted_on_open() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        {
            let store = Store::open(dir.path())?;
            let mut set = WriteSet::new();
            set.put_catalog(view_record(2));
            set.put_catalog(view_record(5));
            for view_id in [1u64, 2, 4, 5, u64::MAX - 1] {
                set.put_view_state(view_id, 0, 0, vec![1], Some(vec![1]));
            }
            store.commit(set)?;
            // An orphan with only undo records, and a live view's undo record.
            store.spill_view_state(6, 0, 1, &entries(&[(9, Some(9))]), true)?;
            store.spill_view_state(5, 0, 1, &entries(&[(9, Some(9))]), true)?;
        }
        let store = Store::open(dir.path())?;
        let left: Vec<u64> = [1u64, 2, 4, 5, 6, u64::MAX - 1]
            .into_iter()
            .filter(|id| !store.view_state(*id).is_ok_and(|s| s.is_empty()))
            .collect();
        assert_eq!(left, vec![2, 5], "only the live views keep state");
        assert_eq!(store.view_state(5)?.len(), 1, "view 5's spill was undone");
        // Undone first (view 6's too), then the orphans' state went.
        assert_eq!((store.undone_spills(5), store.undone_spills(6)), (1, 1));
        Ok(())
    }
}
