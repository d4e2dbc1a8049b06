//! Held results of an aggregate during a large epoch (see `StateControl::Hold`): the groups
//! that wait for their evaluation, and the changes of held groups that were evicted, kept as
//! deltas instead of reading the group back. The operator (`aggregate.rs`) routes each
//! row's change either to its group or to the group's open delta; a group's deltas are
//! merged into it when the group is released, just before its evaluation.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use millrace_storage::{StateCounters, StateLocation, StateStore, StorageError, TieredState};

use super::group::{Agg, AggState, Group, GroupCodec, group_overhead, group_size};
use crate::error::{PlanError, Result};

/// First byte of the warm-tier keys of delta pieces (groups are under 0, the meta entry 1).
pub(super) const DELTA_PREFIX: u8 = 2;

/// Bytes of held group keys past which the oldest held groups are released while the
/// epoch's input still comes: an epoch that touches millions of groups evaluates most of
/// them once anyway, and its list of held keys must not outgrow the memory limit.
pub(super) const HELD_KEY_BYTES: usize = 8 << 20;

/// Bytes one held key costs: in the queue and in the set, with their allocations.
fn key_cost(key: &[u8]) -> usize {
    2 * key.len() + 64
}

/// Whether the aggregate holds back groups' results during a large epoch.
///
/// An aggregate evaluated from its group's whole multiset (string_agg, array_agg, ordered
/// and DISTINCT aggregates other than count) costs as much per emitted result as the group
/// holds, and the result itself is as large: emitted after each step of an epoch taken in
/// many steps, a group of n values touched by every step costs O(n) per step (an INSERT of
/// 200,000 rows into 100 string_agg groups did not finish in 10 minutes). Held back, each
/// touched group is evaluated once per epoch, a slice of groups per step at the end.
///
/// Other aggregates do not hold: a delta piece costs a group's overhead (about 800 bytes
/// for three aggregates) and a read at the release, more than reading back a small group
/// (measured: the max/min/count DISTINCT view of 100,000 groups of 2 rows took 22 s to
/// follow an INSERT of 200,000 rows holding, 16 s not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Holding {
    /// Results are emitted at every step.
    #[default]
    Off,
    /// Touched groups are remembered, not evaluated.
    On,
    /// Each step evaluates held groups of about this many bytes of state.
    Releasing(usize),
}

/// The groups held back, and the deltas of those that were not in memory when changed.
///
/// A held group evicted between steps would otherwise be read back (whole: its multiset is
/// one entry) by every step that touches it, and written again by the eviction after it:
/// the 100 string_agg groups of an INSERT of 120,000 rows were evicted and read back 780
/// times each (180 s), and the steps shrank to a few rows, since what a step reads back
/// counts as its growth. A change to a held group not in memory goes to the group's open
/// delta piece instead: a group of signed multisets (for every aggregate, also the
/// retractable ones, whose rows are kept as values until the merge). A piece evicted is
/// written without reading anything; the next change opens a new piece. Releasing the
/// group reads it and its pieces once.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) holding: Holding,
    /// Groups whose results are held back, in the order they were first touched.
    queue: VecDeque<Box<[u8]>>,
    keys: HashSet<Box<[u8]>>,
    /// What the held keys cost in memory (see [`key_cost`]).
    key_bytes: usize,
    /// Delta pieces, keyed by group key and piece number.
    deltas: Box<dyn StateStore<Group>>,
    /// Pieces opened per group.
    pieces: HashMap<Box<[u8]>, u32>,
}

impl Default for Held {
    fn default() -> Self {
        Self {
            holding: Holding::Off,
            queue: VecDeque::new(),
            keys: HashSet::new(),
            key_bytes: 0,
            deltas: Box::new(TieredState::default()),
            pieces: HashMap::new(),
        }
    }
}

/// The key of piece `n` of the deltas of group `key`.
fn piece_key(key: &[u8], n: u32) -> Vec<u8> {
    let mut piece = Vec::with_capacity(key.len() + 4);
    piece.extend_from_slice(key);
    piece.extend_from_slice(&n.to_be_bytes());
    piece
}

/// A delta piece with no change yet: a signed multiset per aggregate.
fn empty_delta(aggs: &[Agg]) -> Group {
    Group {
        rows: 0,
        states: aggs
            .iter()
            .map(|_| AggState::Values(BTreeMap::new()))
            .collect(),
        output: None,
    }
}

impl Held {
    /// Number of groups held.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Bytes the held keys cost in memory.
    pub(super) fn key_bytes(&self) -> usize {
        self.key_bytes
    }

    /// Whether changes to groups not in memory go to deltas (while holding, and only with
    /// a warm tier: without one nothing is evicted).
    pub(super) fn takes_deltas(&self, location: Option<&StateLocation>) -> bool {
        self.holding != Holding::Off && location.is_some()
    }

    pub(super) fn attach(&mut self, location: &StateLocation) {
        self.deltas.attach(location.with_prefix(&[DELTA_PREFIX]));
    }

    /// The open delta piece of group `key`, opened (adding its bytes to `bytes`) if the
    /// last one was evicted or there is none.
    pub(super) fn delta(&mut self, key: &[u8], aggs: &[Agg], bytes: &mut i64) -> &mut Group {
        let n = self.pieces.get(key).copied().unwrap_or(0);
        let last = n.checked_sub(1).map(|last| piece_key(key, last));
        let piece = match last {
            Some(last) if self.deltas.peek(&last).is_some() => last,
            _ => {
                self.pieces.insert(key.into(), n + 1);
                let piece = piece_key(key, n);
                *bytes += piece.len() as i64 + group_overhead(aggs.len());
                piece
            }
        };
        self.deltas
            .get_or_insert_with(&piece, &mut || empty_delta(aggs))
    }

    /// Remembers `touched` groups as held (each once, in order).
    pub(super) fn push(&mut self, touched: Vec<Box<[u8]>>) {
        for key in touched {
            if self.keys.insert(key.clone()) {
                self.key_bytes += key_cost(&key);
                self.queue.push_back(key);
            }
        }
    }

    /// Takes the next held group.
    pub(super) fn pop(&mut self) -> Option<Box<[u8]>> {
        let key = self.queue.pop_front()?;
        self.keys.remove(&key);
        self.key_bytes -= key_cost(&key);
        if self.queue.is_empty() && matches!(self.holding, Holding::Releasing(_)) {
            self.holding = Holding::Off;
        }
        Some(key)
    }

    /// Removes the delta pieces of group `key`, in the order they were opened, reading back
    /// those evicted. What they held leaves `bytes` (in memory) or `spilled` (evicted).
    pub(super) fn take_pieces(
        &mut self,
        key: &[u8],
        aggs: &[Agg],
        codec: Option<&GroupCodec>,
        bytes: &mut i64,
        spilled: &mut i64,
    ) -> Result<Vec<Group>> {
        let Some(n) = self.pieces.remove(key) else {
            return Ok(Vec::new());
        };
        let mut pieces = Vec::with_capacity(n as usize);
        for i in 0..n {
            let piece = piece_key(key, i);
            match self.deltas.fetch(&piece)? {
                Some(encoded) => {
                    let codec = codec.ok_or_else(|| {
                        PlanError::Internal("evicted delta without a codec".into())
                    })?;
                    let (delta, held) = codec.decode(aggs, &encoded)?;
                    let size = piece.len() as i64 + group_overhead(aggs.len()) + held;
                    *spilled = (*spilled - size).max(0);
                    self.deltas.remove(&piece);
                    pieces.push(delta);
                }
                None => {
                    if let Some(delta) = self.deltas.remove(&piece) {
                        *bytes -= group_size(&piece, &delta);
                        pieces.push(delta);
                    }
                }
            }
        }
        Ok(pieces)
    }

    /// Evicts `fraction` of the delta pieces in memory; returns the bytes freed.
    pub(super) fn evict(&mut self, fraction: f64, codec: &GroupCodec) -> Result<i64> {
        Ok(self.deltas.evict(
            fraction,
            &mut |group: &mut Group| {
                codec
                    .encode(group)
                    .map_err(|e| StorageError::StateCodec(e.to_string()))
            },
            &group_size,
        )?)
    }

    /// Writes changed pieces (in practice, removals of merged ones) to the warm tier.
    pub(super) fn flush_changes(&mut self, min: usize, codec: &GroupCodec) -> Result<u64> {
        Ok(self.deltas.flush_changes(min, &mut |group: &mut Group| {
            codec
                .encode(group)
                .map_err(|e| StorageError::StateCodec(e.to_string()))
        })?)
    }

    /// Checkpoint entries of the pieces changed since the last checkpoint: between epochs
    /// every piece is merged, so these are the removals of pieces that were evicted.
    pub(super) fn checkpoint(&mut self, codec: &GroupCodec) -> Result<Vec<crate::ops::StateEntry>> {
        let mut entries = Vec::new();
        for key in self.deltas.take_dirty() {
            let mut state_key = Vec::with_capacity(key.len() + 1);
            state_key.push(DELTA_PREFIX);
            state_key.extend_from_slice(&key);
            let value = match self.deltas.peek_mut(&key) {
                Some(group) => Some(codec.encode(group)?),
                None => None,
            };
            entries.push((state_key, value));
        }
        Ok(entries)
    }

    pub(super) fn committed(&mut self) {
        self.deltas.committed();
    }

    /// Entries in memory and counters of the pieces.
    pub(super) fn stats(&self) -> (u64, StateCounters) {
        (self.deltas.len() as u64, self.deltas.counters())
    }
}
