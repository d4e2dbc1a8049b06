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
use crate::error::LockResultExt;
use crate::error::Result;

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
        let mut m = self.mark.lock().or_poisoned("state tier")?;
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

/// Top bit of the operator number of a scratch location (see [`StateLocation::scratch`]).
const SCRATCH_OP: u32 = 1 << 31;

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

    /// The location beside this one for entries that live only within an epoch (the held
    /// deltas of an aggregate or window): evicted and read back like any state, deleted
    /// by their operator before the epoch ends, and never among the entries a checkpoint
    /// restores, which are read by operator number (this one has its top bit set). A
    /// crash mid-epoch leaves them to the undo records, as any spill after a checkpoint.
    pub fn scratch(&self) -> Self {
        Self {
            op: self.op | SCRATCH_OP,
            ..self.clone()
        }
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
