//! The warm tier of operator state: where a view's operators evict state to and read it back
//! from, in RocksDB's `view_state` family, in place of their checkpointed entries.
//!
//! A view's pipeline gets one [`StateTier`]; each operator partition gets a
//! [`StateLocation`] in it (view, operator number, partition and a key prefix: the same key
//! a checkpoint writes the entry under). Operator state held in memory is a cache over
//! that family: an entry unchanged since the last committed checkpoint is simply dropped
//! from memory, since the checkpoint holds it; a changed one is written over its
//! checkpointed entry first. Such a write is outside any checkpoint: it keeps the
//! checkpointed value in an undo record (see `state_recovery.rs`), which the next checkpoint
//! that includes the view deletes and a restart before it puts back, so that the view
//! restores from its last checkpoint after a crash.
//!
//! A pipeline that does not continue a committed checkpoint (`fresh`: a new view, or one
//! rebuilt) has nothing to undo to: its first such write deletes its view's old entries and
//! marks the view's checkpoint stale with a synced metadata key, so that after a crash
//! before its first checkpoint the view is rebuilt from its inputs. That checkpoint clears
//! the mark in its commit.
//!
//! The cache manager asks for evictions through [`StateTier::request_eviction`]; the
//! pipeline takes the request between epochs (see the planner's `pipeline.rs`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};

use crate::db::Store;
use crate::error::{Result, StorageError};

/// Metadata key prefix of a view's stale-checkpoint mark.
const MARK_PREFIX: &[u8] = b"state_spilled/";

#[derive(Debug, Default)]
struct SpillMark {
    /// The mark is written and not yet cleared by a checkpoint.
    marked: bool,
    /// The view's stored state belongs to an earlier pipeline (delete it before writing).
    fresh: bool,
    /// The earlier pipeline's state was deleted by a spill (the checkpoint must not delete
    /// the view's state again).
    dropped: bool,
}

/// The warm tier of one view's pipeline.
#[derive(Debug)]
pub struct StateTier {
    store: Arc<Store>,
    view_id: u64,
    mark: Mutex<SpillMark>,
    /// Held (shared) by each write outside a checkpoint, and exclusively by the commit of a
    /// checkpoint that includes the view: an undo record must not be read as absent
    /// before that commit deletes the records and written after it.
    spills: RwLock<()>,
    /// Requested eviction, as a fraction of the entries in parts per million (0: none).
    eviction: AtomicU32,
    /// Bytes of state the pipeline may hold before it evicts on its own after a step
    /// (u64::MAX: no cap), set by the cache manager from the budget's headroom.
    cap: AtomicU64,
    /// Bytes of state in memory after the pipeline's last step or eviction (u64::MAX: none
    /// yet): the cache manager counts a long epoch's state as it grows from this, not from
    /// the figure recorded when the last epoch ended.
    held: AtomicU64,
    /// Entries written to and read back from the tier.
    written: AtomicU64,
    read: AtomicU64,
    /// Evictions that failed (the state stayed in memory), and the last failure.
    failures: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

impl StateTier {
    /// The tier of view `view_id`; `fresh` when its pipeline does not continue the stored
    /// checkpoint.
    pub fn new(store: Arc<Store>, view_id: u64, fresh: bool) -> Arc<Self> {
        Arc::new(Self {
            store,
            view_id,
            mark: Mutex::new(SpillMark {
                fresh,
                ..SpillMark::default()
            }),
            spills: RwLock::new(()),
            eviction: AtomicU32::new(0),
            cap: AtomicU64::new(u64::MAX),
            held: AtomicU64::new(u64::MAX),
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_failure: Mutex::new(None),
        })
    }

    /// Metadata key of the mark saying view `view_id`'s checkpointed state was replaced by a
    /// fresh pipeline's state before that pipeline's first checkpoint.
    pub fn mark_key(view_id: u64) -> Vec<u8> {
        let mut key = MARK_PREFIX.to_vec();
        key.extend_from_slice(&view_id.to_be_bytes());
        key
    }

    /// Whether view `view_id`'s checkpointed state is stale (it cannot be restored).
    pub fn is_marked(store: &Store, view_id: u64) -> Result<bool> {
        Ok(store.meta(&Self::mark_key(view_id))?.is_some())
    }

    /// The location of operator `op`, partition `partition`.
    pub fn location(self: &Arc<Self>, op: u32, partition: u32) -> StateLocation {
        StateLocation {
            tier: self.clone(),
            op,
            partition,
            prefix: Vec::new(),
        }
    }

    /// Asks every operator of the pipeline to evict `fraction` of its entries in memory.
    pub fn request_eviction(&self, fraction: f64) {
        let ppm = (fraction.clamp(0.0, 1.0) * 1e6) as u32;
        self.eviction.fetch_max(ppm, Ordering::Relaxed);
    }

    /// Caps the state the pipeline holds in memory (it evicts after a step that goes past).
    pub fn set_cap(&self, bytes: u64) {
        self.cap.store(bytes, Ordering::Relaxed);
    }

    /// The cap on state held in memory.
    pub fn cap(&self) -> u64 {
        self.cap.load(Ordering::Relaxed)
    }

    /// Records the bytes of state the pipeline holds in memory now (after a step or an
    /// eviction).
    pub fn set_held(&self, bytes: u64) {
        self.held.store(bytes.min(u64::MAX - 1), Ordering::Relaxed);
    }

    /// The bytes of state the pipeline held after its last step or eviction, if it has
    /// taken one.
    pub fn held(&self) -> Option<u64> {
        match self.held.load(Ordering::Relaxed) {
            u64::MAX => None,
            bytes => Some(bytes),
        }
    }

    /// The eviction requested since the last call, if any.
    pub fn take_eviction(&self) -> Option<f64> {
        match self.eviction.swap(0, Ordering::Relaxed) {
            0 => None,
            ppm => Some(f64::from(ppm) / 1e6),
        }
    }

    /// Entries written to the tier and read back from it since the pipeline started.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.written.load(Ordering::Relaxed),
            self.read.load(Ordering::Relaxed),
        )
    }

    /// Counts an eviction that failed (its state stayed in memory).
    pub fn record_failure(&self, error: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some(error);
        }
    }

    /// Evictions that failed, and the last failure.
    pub fn failures(&self) -> (u64, Option<String>) {
        (
            self.failures.load(Ordering::Relaxed),
            self.last_failure.lock().ok().and_then(|l| l.clone()),
        )
    }

    /// Whether a spill already deleted the earlier pipeline's state (then a checkpoint of
    /// this fresh pipeline must keep what was spilled).
    pub fn dropped_earlier_state(&self) -> bool {
        self.mark.lock().map(|m| m.dropped).unwrap_or(false)
    }

    /// Keeps writes outside a checkpoint out while held (around the commit of a checkpoint
    /// that includes the view).
    pub fn hold_spills(&self) -> RwLockWriteGuard<'_, ()> {
        self.spills.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A checkpoint that includes this view committed and cleared its mark.
    pub fn committed(&self) {
        if let Ok(mut m) = self.mark.lock() {
            m.marked = false;
            m.fresh = false;
        }
    }

    /// Prepares a write outside a checkpoint: a fresh pipeline's first one marks the
    /// checkpoint stale and deletes the earlier pipeline's state. Returns whether the write
    /// keeps undo records (the pipeline continues a committed checkpoint).
    fn before_spill(&self) -> Result<bool> {
        let mut m = self
            .mark
            .lock()
            .map_err(|_| StorageError::Injected("state tier lock poisoned".into()))?;
        if m.marked {
            return Ok(false);
        }
        if !m.fresh {
            return Ok(true);
        }
        self.store
            .put_meta_now(&Self::mark_key(self.view_id), b"1", Some(self.view_id))?;
        m.marked = true;
        m.fresh = false;
        m.dropped = true;
        Ok(false)
    }
}

/// Where one operator partition's state lives in its view's warm tier.
#[derive(Debug, Clone)]
pub struct StateLocation {
    tier: Arc<StateTier>,
    op: u32,
    partition: u32,
    /// Prepended to every key (an operator with several stores tells them apart by it).
    prefix: Vec<u8>,
}

impl StateLocation {
    /// Counts a failed eviction on the tier.
    pub fn record_failure(&self, error: String) {
        self.tier.record_failure(error);
    }

    /// The same location for keys starting with `prefix` (after this location's prefix).
    pub fn with_prefix(&self, prefix: &[u8]) -> Self {
        let mut joined = self.prefix.clone();
        joined.extend_from_slice(prefix);
        Self {
            prefix: joined,
            ..self.clone()
        }
    }

    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k
    }

    /// The encoded entry under `key`, as last checkpointed or spilled.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let value = self.tier.store.view_state_entry(
            self.tier.view_id,
            self.op,
            self.partition,
            &self.full_key(key),
        )?;
        if value.is_some() {
            self.tier.read.fetch_add(1, Ordering::Relaxed);
        }
        Ok(value)
    }

    /// Writes changed entries (None: removed) over their checkpointed ones.
    pub fn spill(&self, mut entries: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let _spilling = self.tier.spills.read().unwrap_or_else(|e| e.into_inner());
        let undo = self.tier.before_spill()?;
        if !self.prefix.is_empty() {
            for (key, _) in &mut entries {
                *key = self.full_key(key);
            }
        }
        self.tier.store.spill_view_state(
            self.tier.view_id,
            self.op,
            self.partition,
            &entries,
            undo,
        )?;
        self.tier
            .written
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{StateStore, TieredState};

    fn encode(v: &mut i64) -> Result<Vec<u8>> {
        Ok(v.to_le_bytes().to_vec())
    }

    fn decode(bytes: &[u8]) -> i64 {
        i64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]))
    }

    /// The value under `key` as an operator sees it: in memory, or read back.
    fn value(s: &mut TieredState<i64>, key: &[u8]) -> Result<Option<i64>> {
        if let Some(bytes) = s.fetch(key)? {
            s.restore(key.into(), decode(&bytes));
        }
        Ok(s.get(key).copied())
    }

    #[test]
    fn evicted_state_reads_back_and_marks_the_checkpoint_stale_until_committed() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        let store = Arc::new(Store::open(dir.path())?);
        let tier = StateTier::new(store.clone(), 7, true);
        let mut s: TieredState<i64> = TieredState::default();
        s.attach(tier.location(1, 0).with_prefix(&[0]));
        for k in 0..100i64 {
            *s.get_or_insert_with(&k.to_be_bytes(), &mut || 0) += k;
        }
        s.remove(&5i64.to_be_bytes());
        let freed = s.evict(0.5, &mut encode, &|_, _| 10)?;
        assert_eq!((s.len(), freed), (49, 500), "half of 99, rounded up, left");
        assert!(
            StateTier::is_marked(&store, 7)?,
            "changed entries were written"
        );
        for k in 0..100i64 {
            let want = (k != 5).then_some(k);
            assert_eq!(value(&mut s, &k.to_be_bytes())?, want, "key {k}");
        }
        assert_eq!(s.counters().fetched, 50, "the evicted half was read back");
        // Entries read back are clean: a full eviction writes only the 49 never evicted,
        // and the next one writes nothing; reads still find every entry.
        let (written, _) = tier.counters();
        s.evict(1.0, &mut encode, &|_, _| 10)?;
        assert_eq!(tier.counters().0, written + 49);
        for k in [1i64, 2, 3] {
            value(&mut s, &k.to_be_bytes())?;
        }
        s.evict(1.0, &mut encode, &|_, _| 10)?;
        assert_eq!(tier.counters().0, written + 49);
        assert_eq!(value(&mut s, &42i64.to_be_bytes())?, Some(42));
        assert_eq!(value(&mut s, &5i64.to_be_bytes())?, None);
        // A change after that is dirty again; a failed write keeps it in memory.
        *s.get_or_insert_with(&42i64.to_be_bytes(), &mut || 0) += 1;
        store.inject_write_failures(1);
        assert_eq!(s.evict(1.0, &mut encode, &|_, _| 10)?, 0, "nothing freed");
        assert_eq!(s.peek(&42i64.to_be_bytes()), Some(&43));
        assert_eq!(tier.failures().0, 1, "the failed write is counted");
        s.evict(1.0, &mut encode, &|_, _| 10)?;
        assert_eq!(value(&mut s, &42i64.to_be_bytes())?, Some(43));
        // The checkpoint that includes the view clears the mark.
        let mut set = crate::WriteSet::new();
        set.delete_meta(&StateTier::mark_key(7));
        store.commit(set)?;
        tier.committed();
        assert!(!StateTier::is_marked(&store, 7)?);
        Ok(())
    }

    #[test]
    fn an_eviction_over_several_writes_that_fails_midway_keeps_every_entry() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        let store = Arc::new(Store::open(dir.path())?);
        let tier = StateTier::new(store.clone(), 11, true);
        let mut s: TieredState<Vec<u8>> = TieredState::default();
        s.attach(tier.location(2, 1));
        // 3,000 changed entries of 1 KB: an eviction of all of them takes three writes.
        let want = |k: u32| vec![(k % 251) as u8; 1000];
        for k in 0..3000u32 {
            *s.get_or_insert_with(&k.to_be_bytes(), &mut Vec::new) = want(k);
        }
        let size = |_: &[u8], v: &Vec<u8>| v.len() as i64;
        // The 1,500th encoding fails: the first write went through, the rest did not.
        let mut calls = 0;
        let mut failing = |v: &mut Vec<u8>| {
            calls += 1;
            match calls {
                1500 => Err(StorageError::Injected("encode".into())),
                _ => Ok(v.clone()),
            }
        };
        let freed = s.evict(1.0, &mut failing, &size)?;
        let written = tier.counters().0;
        assert_eq!(freed, written as i64 * 1000, "what was written left memory");
        assert_eq!(tier.failures().0, 1);
        assert!(
            written > 0 && written < 1499,
            "{written} written before the failure"
        );
        assert_eq!(
            s.len() as u64,
            3000 - written,
            "the entries not written stay"
        );
        assert_eq!(
            s.take_dirty().len() as u64,
            3000 - written,
            "and stay changed"
        );
        let mut encode = |v: &mut Vec<u8>| Ok(v.clone());
        assert_eq!(
            s.evict(1.0, &mut encode, &size)?,
            (3000 - written as i64) * 1000
        );
        assert_eq!((s.len(), tier.counters().0), (0, 3000));
        for k in 0..3000u32 {
            let bytes = s.fetch(&k.to_be_bytes())?;
            assert_eq!(bytes, Some(want(k)), "key {k}");
        }
        Ok(())
    }

    #[test]
    fn changes_written_ahead_of_a_checkpoint_are_clean_and_stay_in_memory() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
        let store = Arc::new(Store::open(dir.path())?);
        let tier = StateTier::new(store.clone(), 9, false);
        let mut s: TieredState<i64> = TieredState::default();
        s.attach(tier.location(0, 3));
        for k in 0..10i64 {
            *s.get_or_insert_with(&k.to_be_bytes(), &mut || 0) += 1;
        }
        assert_eq!(s.flush_changes(100, &mut encode)?, 0, "below the threshold");
        assert_eq!(s.flush_changes(5, &mut encode)?, 10);
        assert!(s.take_dirty().is_empty(), "nothing left for the checkpoint");
        assert_eq!(s.len(), 10);
        let on_disk = store.view_state_op(9, 0)?;
        assert_eq!(on_disk.len(), 10);
        assert!(on_disk.iter().all(|(p, _, v)| *p == 3 && decode(v) == 1));
        Ok(())
    }
}
