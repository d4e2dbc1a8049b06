//! Operator state: the keyed store every stateful incremental operator keeps its state in.
//!
//! Operators in the planner's operator library (aggregate, join, TopN, window) address their
//! state by encoded key bytes (arrow-row encodings of group or join keys) and never see how
//! it is held. [`TieredState`] keeps the entries in use in a hash map (the hot tier). Once
//! its pipeline is attached to a [`StateLocation`], it can evict the least recently used
//! entries to the warm tier in RocksDB (see `state_tier.rs`) and an operator reads a missed
//! key back with [`StateStore::fetch`]. Every store counts the state rows it reads and
//! writes, which `millrace_views` reports per epoch, and remembers which keys changed since
//! the last committed checkpoint, so that a checkpoint writes only the state delta and
//! eviction knows which entries must be written before they leave memory.

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::state_tier::StateLocation;

/// Encoded key of one entry of operator state.
pub type StateKey = Box<[u8]>;

/// Reads and writes counted by a state store since it was created.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StateCounters {
    /// Entries looked up (found or not).
    pub reads: u64,
    /// Entries inserted, changed or removed.
    pub writes: u64,
    /// Entries evicted from memory, and read back from the warm tier.
    pub evicted: u64,
    pub fetched: u64,
}

/// Encodes an entry for the warm tier (the operator's checkpoint encoding).
pub type EncodeFn<'a, V> = dyn FnMut(&mut V) -> Result<Vec<u8>> + 'a;
/// The bytes an entry accounts for in its operator's state figure.
pub type SizeFn<'a, V> = dyn Fn(&[u8], &V) -> i64 + 'a;

/// Keyed operator state.
pub trait StateStore<V>: Send + std::fmt::Debug {
    /// The entry under `key`, if it is in memory.
    fn get(&mut self, key: &[u8]) -> Option<&V>;
    /// The entry under `key` for changing, created with `init` when absent from memory.
    fn get_or_insert_with(&mut self, key: &[u8], init: &mut dyn FnMut() -> V) -> &mut V;
    /// Removes the entry under `key`.
    fn remove(&mut self, key: &[u8]) -> Option<V>;
    /// Number of entries in memory.
    fn len(&self) -> usize;
    /// Whether the store holds no entry in memory.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Counted reads and writes.
    fn counters(&self) -> StateCounters;
    /// Adds `n` to the read counter (for operators that scan inside one entry).
    fn count_reads(&mut self, n: u64);
    /// The entry under `key` without counting a read (for checkpoints).
    fn peek(&self, key: &[u8]) -> Option<&V>;
    /// [`StateStore::peek`] for encoders that need `&mut` (not counted, not dirty).
    fn peek_mut(&mut self, key: &[u8]) -> Option<&mut V>;
    /// Keys inserted, changed or removed since the last committed checkpoint (for a
    /// checkpoint; see [`StateStore::committed`]).
    fn take_dirty(&mut self) -> Vec<StateKey>;
    /// The checkpoint that took the dirty keys committed: they are clean now. (If it did
    /// not, the next [`StateStore::take_dirty`] returns them again.)
    fn committed(&mut self);
    /// Puts an entry back from a checkpoint or the warm tier (not counted, not dirty).
    fn restore(&mut self, key: StateKey, value: V);
    /// The encoded entry under `key` when it is not in memory but in the warm tier; the
    /// operator decodes it and puts it back with [`StateStore::restore`]. None when the
    /// key is in memory or absent.
    fn fetch(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Places the store in its view's warm tier (before the first change).
    fn attach(&mut self, location: StateLocation);
    /// Continues the checkpoint held at the store's location, reading entries key by key
    /// as they are used instead of restoring them up front. False if not attached.
    fn restore_lazily(&mut self) -> bool;
    /// Evicts the least recently used `fraction` of the entries in memory. Changed entries
    /// are encoded and written to the warm tier first, in batches; those a failed write (or
    /// encoding) did not write stay in memory, and the failure is counted on the tier.
    /// Returns the bytes freed as `size` counts them (an error only if removals could not
    /// be written, when nothing is evicted).
    fn evict(
        &mut self,
        fraction: f64,
        encode: &mut EncodeFn<'_, V>,
        size: &SizeFn<'_, V>,
    ) -> Result<i64>;
    /// Writes the entries changed since the last checkpoint to the warm tier in bounded
    /// chunks, when there are at least `min_entries` of them, keeping them in memory; a
    /// checkpoint then commits only what changes after. Returns the entries written.
    fn flush_changes(&mut self, min_entries: usize, encode: &mut EncodeFn<'_, V>) -> Result<u64>;
}

/// Bytes of encoded entries written to the warm tier in one batch.
const SPILL_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug)]
struct Slot<V> {
    value: V,
    /// Access clock at the last use (for least-recently-used eviction).
    used: u64,
}

/// Operator state held in memory with a warm tier (keys hashed with aHash: they are
/// arrow-row encodings, hashed on every change, and SipHash showed up in profiles).
#[derive(Debug)]
pub struct TieredState<V> {
    entries: HashMap<StateKey, Slot<V>, ahash::RandomState>,
    counters: StateCounters,
    /// Changed since the last checkpoint took them.
    dirty: HashSet<StateKey, ahash::RandomState>,
    /// Taken by a checkpoint that has not committed yet.
    pending: HashSet<StateKey, ahash::RandomState>,
    clock: u64,
    location: Option<StateLocation>,
    /// Some entries may be in the warm tier and not in memory.
    cold: bool,
}

impl<V> Default for TieredState<V> {
    fn default() -> Self {
        Self {
            entries: HashMap::default(),
            counters: StateCounters::default(),
            dirty: HashSet::default(),
            pending: HashSet::default(),
            clock: 0,
            location: None,
            cold: false,
        }
    }
}

impl<V> TieredState<V> {
    fn mark(&mut self, key: &[u8]) {
        if !self.dirty.contains(key) {
            self.dirty.insert(key.into());
        }
    }

    fn changed(&self, key: &[u8]) -> bool {
        self.dirty.contains(key) || self.pending.contains(key)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

impl<V: Send + std::fmt::Debug> StateStore<V> for TieredState<V> {
    fn get(&mut self, key: &[u8]) -> Option<&V> {
        self.counters.reads += 1;
        let now = self.tick();
        let slot = self.entries.get_mut(key)?;
        slot.used = now;
        Some(&slot.value)
    }

    fn get_or_insert_with(&mut self, key: &[u8], init: &mut dyn FnMut() -> V) -> &mut V {
        self.counters.reads += 1;
        self.counters.writes += 1;
        self.mark(key);
        let now = self.tick();
        let slot = self.entries.entry(key.into()).or_insert_with(|| Slot {
            value: init(),
            used: now,
        });
        slot.used = now;
        &mut slot.value
    }

    fn remove(&mut self, key: &[u8]) -> Option<V> {
        self.counters.writes += 1;
        self.mark(key);
        self.entries.remove(key).map(|s| s.value)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn counters(&self) -> StateCounters {
        self.counters
    }

    fn count_reads(&mut self, n: u64) {
        self.counters.reads += n;
    }

    fn peek(&self, key: &[u8]) -> Option<&V> {
        self.entries.get(key).map(|s| &s.value)
    }

    fn peek_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        self.entries.get_mut(key).map(|s| &mut s.value)
    }

    fn take_dirty(&mut self) -> Vec<StateKey> {
        let dirty = std::mem::take(&mut self.dirty);
        self.pending.extend(dirty);
        self.pending.iter().cloned().collect()
    }

    fn committed(&mut self) {
        self.pending = HashSet::default();
    }

    fn restore(&mut self, key: StateKey, value: V) {
        let used = self.tick();
        self.entries.insert(key, Slot { value, used });
    }

    fn fetch(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if !self.cold || self.entries.contains_key(key) || self.changed(key) {
            // In memory, never evicted, or removed since the last checkpoint.
            return Ok(None);
        }
        let Some(location) = &self.location else {
            return Ok(None);
        };
        let value = location.get(key)?;
        if value.is_some() {
            self.counters.fetched += 1;
        }
        Ok(value)
    }

    fn attach(&mut self, location: StateLocation) {
        self.location = Some(location);
    }

    fn restore_lazily(&mut self) -> bool {
        self.cold = self.location.is_some();
        self.cold
    }

    fn evict(
        &mut self,
        fraction: f64,
        encode: &mut EncodeFn<'_, V>,
        size: &SizeFn<'_, V>,
    ) -> Result<i64> {
        let Some(location) = self.location.clone() else {
            return Ok(0);
        };
        let n = self.entries.len();
        let k = ((n as f64) * fraction.clamp(0.0, 1.0)).ceil() as usize;
        let rank = |key: &StateKey, slot: &Slot<V>| eviction_rank(self.changed(key), slot.used);
        let cutoff = match k {
            0 => None,
            k if k >= n => Some(u64::MAX),
            k => {
                let mut ranks: Vec<u64> = self.entries.iter().map(|(k, s)| rank(k, s)).collect();
                Some(*ranks.select_nth_unstable(k - 1).1)
            }
        };
        // Changed entries are written before they leave memory, in bounded batches; so are
        // removals, which then need no tombstone in memory.
        let removed: Vec<StateKey> = self
            .dirty
            .iter()
            .chain(self.pending.iter())
            .filter(|key| !self.entries.contains_key(*key))
            .cloned()
            .collect();
        self.write_changes(&location, removed.iter(), encode)?;
        let Some(cutoff) = cutoff else {
            return Ok(0);
        };
        // NOTE: victims are taken out of the map as they are found, not listed first: the
        // list of their keys held 40 MB at the start of a large eviction of a join's state
        // (`state_spill`).
        let (mut freed, mut evicted) = (0, 0u64);
        let mut batch: Vec<(StateKey, Slot<V>, Vec<u8>)> = Vec::new();
        let mut batch_bytes = 0;
        let mut written: Vec<StateKey> = Vec::new();
        let mut unwritten: Vec<(StateKey, Slot<V>)> = Vec::new();
        let mut failure = None;
        {
            let (dirty, pending) = (&self.dirty, &self.pending);
            let changed = |key: &[u8]| dirty.contains(key) || pending.contains(key);
            let mut taken = 0;
            let victims = self.entries.extract_if(|key, slot| {
                let take = taken < k && eviction_rank(changed(key), slot.used) <= cutoff;
                taken += usize::from(take);
                take
            });
            for (key, mut slot) in victims {
                if !changed(&key) {
                    freed += size(&key, &slot.value);
                    evicted += 1;
                    continue;
                }
                match encode(&mut slot.value) {
                    Ok(value) => {
                        batch_bytes += key.len() + value.len();
                        batch.push((key, slot, value));
                    }
                    Err(e) => {
                        unwritten.push((key, slot));
                        failure = Some(e);
                        break;
                    }
                }
                if batch_bytes >= SPILL_CHUNK_BYTES {
                    batch_bytes = 0;
                    match spill_slots(&location, &mut batch, size) {
                        Ok((bytes, keys)) => {
                            freed += bytes;
                            evicted += keys.len() as u64;
                            written.extend(keys);
                        }
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
            }
        }
        if failure.is_none() && !batch.is_empty() {
            match spill_slots(&location, &mut batch, size) {
                Ok((bytes, keys)) => {
                    freed += bytes;
                    evicted += keys.len() as u64;
                    written.extend(keys);
                }
                Err(e) => failure = Some(e),
            }
        }
        // A failed write leaves the entries it did not write in memory, still changed.
        unwritten.extend(batch.into_iter().map(|(key, slot, _)| (key, slot)));
        for (key, slot) in unwritten {
            self.entries.insert(key, slot);
        }
        for key in &written {
            self.dirty.remove(key);
            self.pending.remove(key);
        }
        if evicted > 0 {
            self.cold = true;
            self.counters.evicted += evicted;
            // NOTE: a table sized for the entries before eviction keeps its slots (64 bytes
            // each); left at half load or less after an eviction, it is rebuilt to size.
            if self.entries.len() <= self.entries.capacity() / 2 {
                self.entries.shrink_to_fit();
            }
            if self.dirty.len() <= self.dirty.capacity() / 4 {
                self.dirty.shrink_to_fit();
            }
        }
        // NOTE: counted, not returned: what left memory before the failure must leave the
        // operator's state figure too.
        if let Some(e) = failure {
            tracing::warn!(error = %e, "writing evicted operator state failed; the entries not written stay in memory");
            location.record_failure(e.to_string());
        }
        Ok(freed)
    }

    fn flush_changes(&mut self, min_entries: usize, encode: &mut EncodeFn<'_, V>) -> Result<u64> {
        let Some(location) = self.location.clone() else {
            return Ok(0);
        };
        if self.dirty.len() + self.pending.len() < min_entries.max(1) {
            return Ok(0);
        }
        let keys: Vec<StateKey> = self
            .dirty
            .iter()
            .chain(self.pending.iter())
            .cloned()
            .collect();
        self.write_changes(&location, keys.iter(), encode)
    }
}

/// The order entries are evicted in: unchanged ones before changed ones (dropping them
/// writes nothing), least recently `used` first within each kind.
fn eviction_rank(changed: bool, used: u64) -> u64 {
    if changed { used | 1 << 63 } else { used }
}

/// Writes a batch of evicted changed entries (key, entry, encoded value) to the warm tier
/// and empties it; returns the bytes they accounted for and their keys. On failure the
/// entries stay in the batch (their encoded values taken).
fn spill_slots<V>(
    location: &StateLocation,
    batch: &mut Vec<(StateKey, Slot<V>, Vec<u8>)>,
    size: &SizeFn<'_, V>,
) -> Result<(i64, Vec<StateKey>)> {
    let entries = batch
        .iter_mut()
        .map(|(key, _, value)| (key.to_vec(), Some(std::mem::take(value))))
        .collect();
    location.spill(entries)?;
    let mut bytes = 0;
    let mut keys = Vec::with_capacity(batch.len());
    for (key, slot, _) in batch.drain(..) {
        bytes += size(&key, &slot.value);
        keys.push(key);
    }
    Ok((bytes, keys))
}

impl<V> TieredState<V> {
    /// Writes those of `keys` changed since the last checkpoint (their entry, or their
    /// removal) to the warm tier in batches of about [`SPILL_CHUNK_BYTES`]; each written
    /// key is clean afterwards. Returns the entries written.
    fn write_changes<'k>(
        &mut self,
        location: &StateLocation,
        keys: impl Iterator<Item = &'k StateKey>,
        encode: &mut EncodeFn<'_, V>,
    ) -> Result<u64> {
        let mut batch: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut bytes = 0;
        let mut written = 0;
        let mut keys = keys.peekable();
        while let Some(key) = keys.next() {
            if self.changed(key) {
                let value = match self.entries.get_mut(key) {
                    Some(slot) => Some(encode(&mut slot.value)?),
                    None => None,
                };
                bytes += key.len() + value.as_ref().map_or(0, Vec::len);
                batch.push((key.to_vec(), value));
            }
            if !batch.is_empty() && (bytes >= SPILL_CHUNK_BYTES || keys.peek().is_none()) {
                let keys_written: Vec<Vec<u8>> = batch.iter().map(|(k, _)| k.clone()).collect();
                location.spill(std::mem::take(&mut batch))?;
                for key in &keys_written {
                    self.dirty.remove(key.as_slice());
                    self.pending.remove(key.as_slice());
                }
                written += keys_written.len() as u64;
                bytes = 0;
            }
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tier_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reads_and_writes() {
        let mut s: TieredState<i64> = TieredState::default();
        *s.get_or_insert_with(b"a", &mut || 0) += 2;
        assert_eq!(s.get(b"a"), Some(&2));
        assert_eq!(s.get(b"b"), None);
        assert_eq!(s.remove(b"a"), Some(2));
        assert!(s.is_empty());
        let c = s.counters();
        assert_eq!((c.reads, c.writes), (3, 2));
    }

    #[test]
    fn remembers_changed_keys_until_taken() {
        let mut s: TieredState<i64> = TieredState::default();
        *s.get_or_insert_with(b"a", &mut || 0) += 1;
        *s.get_or_insert_with(b"b", &mut || 0) += 1;
        s.remove(b"a");
        let _ = s.get(b"b");
        let mut dirty = s.take_dirty();
        dirty.sort();
        assert_eq!(dirty, vec![Box::from(&b"a"[..]), Box::from(&b"b"[..])]);
        assert_eq!(s.take_dirty().len(), 2, "taken again until committed");
        s.committed();
        assert!(s.take_dirty().is_empty());
        s.restore(b"c".as_slice().into(), 3);
        assert_eq!(s.peek(b"c"), Some(&3));
        assert!(s.take_dirty().is_empty(), "restored entries are not dirty");
    }
}
