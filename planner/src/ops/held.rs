//! Results held back during a large epoch (see `StateControl::Hold`), for the keyed
//! operators whose output for a key costs as much as the key's state (the aggregate with
//! multiset aggregates, the ranking window): which keys wait for their evaluation, and the
//! deltas of their changes, kept apart from the key's state until the key is released.
//!
//! A held key evicted between steps would otherwise be read back (whole: its state is one
//! entry) by every step that touches it, and written again by the eviction after it: the
//! 100 string_agg groups of an INSERT of 120,000 rows were evicted and read back 780 times
//! each (180 s), and the steps shrank to a few rows, since what a step reads back counts as
//! its growth. A change goes to the key's open delta piece instead. A piece evicted is
//! written without reading anything, to the operator's scratch location (never part of a
//! checkpoint); the next change opens a new piece. Releasing the key reads it and its
//! pieces once, and the operator merges them.

use std::collections::{HashMap, HashSet, VecDeque};

use millrace_storage::{EncodeFn, SizeFn, StateCounters, StateLocation, StateStore, TieredState};

use super::StateControl;
use crate::error::Result;

/// Bytes of held keys past which the oldest are released while the epoch's input still
/// comes: an epoch that touches millions of keys evaluates most of them once anyway, and
/// its list of held keys must not outgrow the memory limit.
pub(super) const HELD_KEY_BYTES: usize = 8 << 20;

/// Bytes one held key costs: in the queue and in the set, with their allocations.
fn key_cost(key: &[u8]) -> usize {
    2 * key.len() + 64
}

/// Decodes a piece read back (its key, its encoding) into the piece and the bytes it
/// counted for.
pub(super) type DecodeFn<'a, V> = dyn Fn(&[u8], &[u8]) -> Result<(V, i64)> + 'a;

/// Whether an operator holds back keys' results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Holding {
    /// Results are emitted at every step.
    #[default]
    Off,
    /// Touched keys are remembered, not evaluated.
    On,
    /// Each step evaluates held keys of about this many bytes of state.
    Releasing(usize),
}

/// The keys held back by one operator partition, and the delta pieces of their changes.
#[derive(Debug)]
pub(super) struct Held<V> {
    pub(super) holding: Holding,
    /// Keys whose results are held back, in the order they were first touched.
    queue: VecDeque<Box<[u8]>>,
    keys: HashSet<Box<[u8]>>,
    /// What the held keys cost in memory (see [`key_cost`]).
    key_bytes: usize,
    /// Delta pieces, keyed by key and piece number.
    deltas: TieredState<V>,
    /// Pieces opened per key.
    pieces: HashMap<Box<[u8]>, u32>,
    attached: bool,
}

impl<V> Default for Held<V> {
    fn default() -> Self {
        Self {
            holding: Holding::Off,
            queue: VecDeque::new(),
            keys: HashSet::new(),
            key_bytes: 0,
            deltas: TieredState::default(),
            pieces: HashMap::new(),
            attached: false,
        }
    }
}

/// The key of piece `n` of the deltas of `key`.
fn piece_key(key: &[u8], n: u32) -> Vec<u8> {
    let mut piece = Vec::with_capacity(key.len() + 4);
    piece.extend_from_slice(key);
    piece.extend_from_slice(&n.to_be_bytes());
    piece
}

impl<V: Send + std::fmt::Debug> Held<V> {
    /// Answers a holding control: `Hold` (only if the operator `holds` at all), `Release`
    /// (the number of keys held) and `Held` (the same); 0 for any other.
    pub(super) fn control(&mut self, control: StateControl, holds: bool) -> u64 {
        match control {
            StateControl::Hold if holds => self.holding = Holding::On,
            StateControl::Release(budget) => {
                self.holding = match self.queue.len() {
                    0 => Holding::Off,
                    _ => Holding::Releasing(budget.max(1)),
                };
            }
            _ => {}
        }
        match control {
            StateControl::Release(_) | StateControl::Held => self.queue.len() as u64,
            _ => 0,
        }
    }

    /// Number of keys held.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Bytes the held keys cost in memory.
    pub(super) fn key_bytes(&self) -> usize {
        self.key_bytes
    }

    /// Whether pieces can be evicted (the operator has a warm tier).
    pub(super) fn attached(&self) -> bool {
        self.attached
    }

    /// Places the pieces in the scratch location beside the operator's.
    pub(super) fn attach(&mut self, location: &StateLocation) {
        self.deltas.attach(location.scratch());
        self.attached = true;
    }

    /// The open delta piece of `key`: the last one if it is still in memory, else a new
    /// one from `fresh`, whose `size` is added to `bytes`.
    pub(super) fn delta(
        &mut self,
        key: &[u8],
        fresh: &mut dyn FnMut() -> V,
        size: &SizeFn<'_, V>,
        bytes: &mut i64,
    ) -> &mut V {
        let n = self.pieces.get(key).copied().unwrap_or(0);
        let last = n.checked_sub(1).map(|last| piece_key(key, last));
        let (piece, mut new) = match last {
            Some(last) if self.deltas.peek(&last).is_some() => (last, None),
            _ => {
                self.pieces.insert(key.into(), n + 1);
                let piece = piece_key(key, n);
                let new = fresh();
                *bytes += size(&piece, &new);
                (piece, Some(new))
            }
        };
        self.deltas
            .get_or_insert_with(&piece, &mut || new.take().unwrap_or_else(&mut *fresh))
    }

    /// Remembers `touched` keys as held (each once, in order).
    pub(super) fn push(&mut self, touched: impl IntoIterator<Item = Box<[u8]>>) {
        for key in touched {
            if self.keys.insert(key.clone()) {
                self.key_bytes += key_cost(&key);
                self.queue.push_back(key);
            }
        }
    }

    /// Whether another held key is to be released in this step, after `released` bytes
    /// of state: up to the release budget, or while holding, past [`HELD_KEY_BYTES`].
    pub(super) fn releases_more(&self, released: usize) -> bool {
        match self.holding {
            Holding::Off => false,
            Holding::On => self.key_bytes > HELD_KEY_BYTES,
            Holding::Releasing(budget) => released < budget,
        }
    }

    /// Takes the next held key; the last one ends the release.
    pub(super) fn pop(&mut self) -> Option<Box<[u8]>> {
        let key = self.queue.pop_front()?;
        self.keys.remove(&key);
        self.key_bytes -= key_cost(&key);
        if self.queue.is_empty() && matches!(self.holding, Holding::Releasing(_)) {
            self.holding = Holding::Off;
        }
        Some(key)
    }

    /// Removes the delta pieces of `key`, in the order they were opened, reading back those
    /// evicted (`decode` gives a piece and the bytes it counts for). What they held leaves
    /// `bytes` (in memory) or `spilled` (evicted).
    pub(super) fn take_pieces(
        &mut self,
        key: &[u8],
        decode: &DecodeFn<'_, V>,
        size: &SizeFn<'_, V>,
        bytes: &mut i64,
        spilled: &mut i64,
    ) -> Result<Vec<V>> {
        let Some(n) = self.pieces.remove(key) else {
            return Ok(Vec::new());
        };
        let mut pieces = Vec::with_capacity(n as usize);
        for i in 0..n {
            let piece = piece_key(key, i);
            match self.deltas.fetch(&piece)? {
                Some(encoded) => {
                    let (delta, size) = decode(&piece, &encoded)?;
                    *spilled = (*spilled - size).max(0);
                    self.deltas.remove(&piece);
                    pieces.push(delta);
                }
                None => {
                    if let Some(delta) = self.deltas.remove(&piece) {
                        *bytes -= size(&piece, &delta);
                        pieces.push(delta);
                    }
                }
            }
        }
        Ok(pieces)
    }

    /// Once nothing is held: writes the removals of evicted pieces, so that none outlives
    /// its epoch in the scratch location, and forgets the removed keys.
    pub(super) fn finish(&mut self, encode: &mut EncodeFn<'_, V>) -> Result<()> {
        if !self.queue.is_empty() {
            return Ok(());
        }
        if self.attached {
            self.deltas.flush_changes(1, encode)?;
        }
        // NOTE: the store remembers removed keys until a checkpoint takes them; none does.
        self.deltas.take_dirty();
        self.deltas.committed();
        Ok(())
    }

    /// Evicts `fraction` of the pieces in memory; returns the bytes freed.
    pub(super) fn evict(
        &mut self,
        fraction: f64,
        encode: &mut EncodeFn<'_, V>,
        size: &SizeFn<'_, V>,
    ) -> Result<i64> {
        Ok(self.deltas.evict(fraction, encode, size)?)
    }

    /// Pieces in memory, and their store's counters.
    pub(super) fn stats(&self) -> (u64, StateCounters) {
        (self.deltas.len() as u64, self.deltas.counters())
    }
}

/// Counters of an operator's state and of its pieces, together.
pub(super) fn add_counters(a: StateCounters, b: StateCounters) -> StateCounters {
    StateCounters {
        reads: a.reads + b.reads,
        writes: a.writes + b.writes,
        evicted: a.evicted + b.evicted,
        fetched: a.fetched + b.fetched,
    }
}
