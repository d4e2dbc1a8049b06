//! Operator state: the keyed store every stateful incremental operator keeps its state in.
//!
//! Operators in the planner's operator library (aggregate, join, TopN, window) address their
//! state by encoded key bytes (arrow-row encodings of group or join keys) and never see how
//! it is held. [`MemoryState`] keeps it in a hash map. Every store counts the state rows it
//! reads and writes, which `millrace_views` reports per epoch, and remembers which keys
//! changed since the last checkpoint, so that a checkpoint writes only the state delta.

use std::collections::{HashMap, HashSet};

/// Encoded key of one entry of operator state.
pub type StateKey = Box<[u8]>;

/// Reads and writes counted by a state store since it was created.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StateCounters {
    /// Entries looked up (found or not).
    pub reads: u64,
    /// Entries inserted, changed or removed.
    pub writes: u64,
}

/// Keyed operator state.
pub trait StateStore<V>: Send + std::fmt::Debug {
    /// The entry under `key`, if any.
    fn get(&mut self, key: &[u8]) -> Option<&V>;
    /// The entry under `key` for changing, created with `init` when absent.
    fn get_or_insert_with(&mut self, key: &[u8], init: &mut dyn FnMut() -> V) -> &mut V;
    /// Removes the entry under `key`.
    fn remove(&mut self, key: &[u8]) -> Option<V>;
    /// Number of entries.
    fn len(&self) -> usize;
    /// Whether the store holds no entry.
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
    /// Keys inserted, changed or removed since the last call (for checkpoints).
    fn take_dirty(&mut self) -> Vec<StateKey>;
    /// Puts an entry back from a checkpoint (not counted, not dirty).
    fn restore(&mut self, key: StateKey, value: V);
}

/// Operator state held in memory (keys hashed with aHash: they are arrow-row encodings,
/// hashed on every change, and SipHash showed up in profiles).
#[derive(Debug)]
pub struct MemoryState<V> {
    entries: HashMap<StateKey, V, ahash::RandomState>,
    counters: StateCounters,
    dirty: HashSet<StateKey, ahash::RandomState>,
}

impl<V> Default for MemoryState<V> {
    fn default() -> Self {
        Self {
            entries: HashMap::default(),
            counters: StateCounters::default(),
            dirty: HashSet::default(),
        }
    }
}

impl<V> MemoryState<V> {
    fn mark(&mut self, key: &[u8]) {
        if !self.dirty.contains(key) {
            self.dirty.insert(key.into());
        }
    }
}

impl<V: Send + std::fmt::Debug> StateStore<V> for MemoryState<V> {
    fn get(&mut self, key: &[u8]) -> Option<&V> {
        self.counters.reads += 1;
        self.entries.get(key)
    }

    fn get_or_insert_with(&mut self, key: &[u8], init: &mut dyn FnMut() -> V) -> &mut V {
        self.counters.reads += 1;
        self.counters.writes += 1;
        self.mark(key);
        self.entries.entry(key.into()).or_insert_with(init)
    }

    fn remove(&mut self, key: &[u8]) -> Option<V> {
        self.counters.writes += 1;
        self.mark(key);
        self.entries.remove(key)
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
        self.entries.get(key)
    }

    fn peek_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        self.entries.get_mut(key)
    }

    fn take_dirty(&mut self) -> Vec<StateKey> {
        self.dirty.drain().collect()
    }

    fn restore(&mut self, key: StateKey, value: V) {
        self.entries.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reads_and_writes() {
        let mut s: MemoryState<i64> = MemoryState::default();
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
        let mut s: MemoryState<i64> = MemoryState::default();
        *s.get_or_insert_with(b"a", &mut || 0) += 1;
        *s.get_or_insert_with(b"b", &mut || 0) += 1;
        s.remove(b"a");
        let _ = s.get(b"b");
        let mut dirty = s.take_dirty();
        dirty.sort();
        assert_eq!(dirty, vec![Box::from(&b"a"[..]), Box::from(&b"b"[..])]);
        assert!(s.take_dirty().is_empty());
        s.restore(b"c".as_slice().into(), 3);
        assert_eq!(s.peek(b"c"), Some(&3));
        assert!(s.take_dirty().is_empty(), "restored entries are not dirty");
    }
}
