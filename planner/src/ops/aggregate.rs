//! Hash aggregate with retraction: GROUP BY (with grouping sets), DISTINCT and global
//! aggregates, maintained per group.
//!
//! State per group: its row count and, per aggregate, either a retractable DataFusion
//! accumulator (count, sum, avg: inserts update it, deletes retract from it) or the multiset
//! of the aggregate's input values (min, max, DISTINCT aggregates, ordered and all other
//! aggregates). A delete of the current min or max only removes one value from the multiset;
//! the new extreme is the next key. Aggregates without a cheap update are re-evaluated by a
//! fresh DataFusion accumulator over the group's multiset when that group changes, so their
//! results are exactly DataFusion's. Only groups touched by the epoch's changes are read.
//! The group state, its evaluation and its encoding are in `aggregate/group.rs`.

mod exact_sum;
mod group;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};

use datafusion::arrow::array::{Array, ArrayRef};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::ScalarValue;
use millrace_storage::{StateLocation, StateStore, StorageError, TieredState};

use self::group::{
    Agg, AggState, Group, GroupCodec, Kind, SlidingRows, VALUE_OVERHEAD, empty_delta, empty_group,
    evaluate_group, group_overhead, group_size, merge_delta, new_group, take_all,
};
pub use self::group::{AggregateCall, Grouping};
use super::codec::{Reader, Writer};
use super::held::{Held, Holding, add_counters};
use super::{
    Operator, StateControl, StateEntry, StateStats, evaluate, evaluate_predicate, single_input,
};
use crate::changelog::{Changelog, loose, make_batch};
use crate::error::{PlanError, Result};

/// The incremental aggregate.
#[derive(Debug)]
pub struct AggregateOp {
    schema: SchemaRef,
    grouping: Grouping,
    key_converter: RowConverter,
    aggs: Vec<Agg>,
    groups: Box<dyn StateStore<Group>>,
    /// Where the groups are evicted to (their keys start with 0, the meta entry is 1).
    location: Option<StateLocation>,
    started: bool,
    /// Groups that exist even over empty input: the global aggregate, and the empty
    /// grouping set `()` of GROUPING SETS / ROLLUP / CUBE.
    always: HashSet<Box<[u8]>>,
    /// Approximate bytes of group state in memory, and evicted to the warm tier.
    bytes: i64,
    spilled: i64,
    /// Encoder of a group's last emitted values (and of sliding accumulators' states) for
    /// checkpoints; None when some accumulator's state cannot be encoded.
    codec: Option<GroupCodec>,
    /// Whether a checkpoint holds `always` already (it is fixed after the first step).
    always_saved: bool,
    /// Whether a group's evaluation reads its whole multiset (see [`Holding`]).
    costly: bool,
    /// Groups held back during a large epoch, and their deltas: a change to a held group
    /// that is not in memory goes to the group's delta (signed multisets for every
    /// aggregate, also the retractable ones, whose rows are values until the merge).
    held: Held<Group>,
}

/// Key of the entry holding the operator's own flags (group keys are arrow rows or empty,
/// and are stored after a 0 byte).
const META_KEY: &[u8] = &[1];

impl AggregateOp {
    /// An aggregate producing `schema` (group columns, grouping id if any, aggregates).
    pub fn try_new(
        schema: SchemaRef,
        grouping: Grouping,
        calls: Vec<AggregateCall>,
    ) -> Result<Self> {
        let schema = loose(&schema);
        let key_fields = grouping.exprs.len() + usize::from(grouping.grouping_id.is_some());
        let key_converter = RowConverter::new(
            schema.fields()[..key_fields]
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        let aggs = calls
            .into_iter()
            .map(Agg::try_new)
            .collect::<Result<Vec<_>>>()?;
        let codec = GroupCodec::try_new(&schema, key_fields, &aggs).ok();
        let costly = aggs.iter().any(|a| matches!(a.kind, Kind::Generic { .. }));
        Ok(Self {
            costly,
            held: Held::default(),
            schema,
            grouping,
            key_converter,
            aggs,
            groups: Box::new(TieredState::default()),
            location: None,
            started: false,
            always: HashSet::new(),
            bytes: 0,
            spilled: 0,
            codec,
            always_saved: false,
        })
    }

    /// Brings the group under `key` back from the warm tier if it was evicted.
    fn fault_in(&mut self, key: &[u8]) -> Result<()> {
        if let Some(value) = self.groups.fetch(key)? {
            let codec = self
                .codec
                .as_ref()
                .ok_or_else(|| PlanError::Internal("evicted group without a codec".into()))?;
            let (group, held) = codec.decode(&self.aggs, &value)?;
            let size = key.len() as i64 + group_overhead(self.aggs.len()) + held;
            self.bytes += size;
            self.spilled = (self.spilled - size).max(0);
            self.groups.restore(key.into(), group);
        }
        Ok(())
    }

    /// The touched groups to evaluate in this step: all of them, or while holding none
    /// (they are remembered), or while releasing a slice of the held ones, each brought
    /// back in memory with its deltas merged (see [`Held`]).
    fn hold_back(&mut self, touched: Vec<Box<[u8]>>) -> Result<Vec<Box<[u8]>>> {
        if self.held.holding == Holding::Off {
            return Ok(touched);
        }
        self.held.push(touched);
        let mut released = Vec::new();
        let mut bytes = 0usize;
        while self.held.releases_more(bytes) {
            let Some(key) = self.held.pop() else {
                break;
            };
            self.fault_in(&key)?;
            let (aggs, codec) = (&self.aggs, &self.codec);
            let decode = |piece: &[u8], encoded: &[u8]| {
                let codec = codec
                    .as_ref()
                    .ok_or_else(|| PlanError::Internal("evicted delta without a codec".into()))?;
                let (delta, held) = codec.decode(aggs, encoded)?;
                Ok((
                    delta,
                    piece.len() as i64 + group_overhead(aggs.len()) + held,
                ))
            };
            let pieces = self.held.take_pieces(
                &key,
                &decode,
                &group_size,
                &mut self.bytes,
                &mut self.spilled,
            )?;
            if !pieces.is_empty() {
                let group = group_entry(&mut *self.groups, &key, &self.aggs, &mut self.bytes)?;
                for delta in pieces {
                    merge_delta(&self.aggs, group, delta, &mut self.bytes)?;
                }
            }
            if let Some(group) = self.groups.get(&key) {
                bytes += group_size(&key, group).max(1) as usize;
            }
            released.push(key);
        }
        if !released.is_empty() && self.held.len() == 0 {
            let codec = &self.codec;
            self.held.finish(&mut |group: &mut Group| match codec {
                Some(codec) => codec.encode_stored(group),
                None => Err(StorageError::StateCodec("no codec for a delta".into())),
            })?;
        }
        Ok(released)
    }

    fn is_global(&self) -> bool {
        self.grouping.exprs.is_empty() && self.grouping.grouping_id.is_none()
    }

    /// Encoded group keys of every input row for grouping set `set`.
    fn keys(&self, set: usize, groups: &[ArrayRef], rows: usize) -> Result<Option<Rows>> {
        if self.is_global() {
            return Ok(None);
        }
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(groups.len() + 1);
        for (array, &nulled) in groups.iter().zip(&self.grouping.sets[set]) {
            columns.push(if nulled {
                datafusion::arrow::array::new_null_array(array.data_type(), rows)
            } else {
                array.clone()
            });
        }
        if let Some((data_type, ids)) = &self.grouping.grouping_id {
            let id = ScalarValue::UInt64(Some(ids[set])).cast_to(data_type)?;
            columns.push(id.to_array_of_size(rows)?);
        }
        Ok(Some(self.key_converter.convert_columns(&columns)?))
    }
}

/// The group under `key` for changing, created with fresh state (its bytes added to
/// `bytes`) if it is not in memory (the caller read it back first if it was evicted).
fn group_entry<'a>(
    groups: &'a mut dyn StateStore<Group>,
    key: &[u8],
    aggs: &[Agg],
    bytes: &mut i64,
) -> Result<&'a mut Group> {
    let mut fresh = match groups.get(key) {
        Some(_) => None,
        None => {
            *bytes += key.len() as i64 + group_overhead(aggs.len());
            Some(new_group(aggs)?)
        }
    };
    Ok(groups.get_or_insert_with(key, &mut || fresh.take().unwrap_or_else(empty_group)))
}

impl Operator for AggregateOp {
    fn describe(&self) -> String {
        let groups: Vec<String> = self.grouping.exprs.iter().map(|e| e.to_string()).collect();
        let aggs: Vec<String> = self
            .aggs
            .iter()
            .map(|a| format!("{} [{:?}]", a.call.expr.name(), a.kind))
            .collect();
        let sets = if self.grouping.grouping_id.is_some() {
            format!(" sets={}", self.grouping.sets.len())
        } else {
            String::new()
        };
        format!(
            "HashAggregate: group=[{}]{sets} aggr=[{}]",
            groups.join(", "),
            aggs.join(", ")
        )
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn state(&self) -> StateStats {
        let (pieces, delta) = self.held.stats();
        let groups = self.groups.counters();
        StateStats {
            entries: self.groups.len() as u64 + pieces,
            bytes: (self.bytes.max(0) as u64) + self.held.key_bytes() as u64,
            spilled_bytes: self.spilled.max(0) as u64,
            counters: add_counters(groups, delta),
        }
    }

    fn checkpoint(&mut self) -> Result<Option<Vec<StateEntry>>> {
        let Some(codec) = &self.codec else {
            return Ok(None);
        };
        let mut entries = Vec::new();
        if !self.always_saved {
            let mut meta = Writer::new();
            meta.u64(self.always.len() as u64);
            for key in &self.always {
                meta.bytes(key);
            }
            entries.push((META_KEY.to_vec(), Some(meta.finish())));
            self.always_saved = true;
        }
        for key in self.groups.take_dirty() {
            let mut state_key = Vec::with_capacity(key.len() + 1);
            state_key.push(0);
            state_key.extend_from_slice(&key);
            let value = match self.groups.peek_mut(&key) {
                Some(group) => Some(codec.encode(group)?),
                None => None,
            };
            entries.push((state_key, value));
        }
        Ok(Some(entries))
    }

    fn restore(&mut self, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        let codec = self
            .codec
            .take()
            .ok_or_else(|| PlanError::Internal("aggregate without a state codec".into()))?;
        let result = (|| {
            for (key, value) in entries {
                if key == META_KEY {
                    let mut r = Reader::new(&value);
                    for _ in 0..r.u64()? {
                        self.always.insert(r.bytes()?.into());
                    }
                    continue;
                }
                let group_key = key.get(1..).unwrap_or_default();
                let (group, held) = codec.decode(&self.aggs, &value)?;
                self.bytes += group_key.len() as i64 + group_overhead(self.aggs.len()) + held;
                self.groups.restore(group_key.into(), group);
            }
            Ok(())
        })();
        self.codec = Some(codec);
        self.started = true;
        self.always_saved = true;
        result
    }

    fn attach(&mut self, location: &StateLocation) {
        if self.codec.is_some() {
            self.groups.attach(location.with_prefix(&[0]));
            self.held.attach(location);
            self.location = Some(location.clone());
        }
    }

    fn control(&mut self, control: StateControl) -> Result<u64> {
        match control {
            StateControl::RestoreLazily => {
                let Some(location) = &self.location else {
                    return Ok(0);
                };
                if let Some(meta) = location.get(META_KEY)? {
                    let mut r = Reader::new(&meta);
                    for _ in 0..r.u64()? {
                        self.always.insert(r.bytes()?.into());
                    }
                }
                self.started = true;
                self.always_saved = true;
                Ok(u64::from(self.groups.restore_lazily()))
            }
            StateControl::Evict(fraction) => {
                let Some(codec) = &self.codec else {
                    return Ok(0);
                };
                let mut encode = |group: &mut Group| codec.encode_stored(group);
                let freed = self.groups.evict(fraction, &mut encode, &group_size)?
                    + self.held.evict(fraction, &mut encode, &group_size)?;
                self.bytes -= freed;
                self.spilled += freed;
                Ok(freed.max(0) as u64)
            }
            StateControl::Committed => {
                self.groups.committed();
                Ok(0)
            }
            StateControl::FlushChanges(min) => {
                let Some(codec) = &self.codec else {
                    return Ok(0);
                };
                Ok(self
                    .groups
                    .flush_changes(min, &mut |group: &mut Group| codec.encode_stored(group))?)
            }
            StateControl::Hold | StateControl::Release(_) | StateControl::Held => {
                Ok(self.held.control(control, self.costly))
            }
        }
    }

    fn step(&mut self, inputs: Vec<Changelog>) -> Result<Changelog> {
        let input = single_input(inputs, "aggregate")?;
        let n = input.len();
        let mut touched: Vec<Box<[u8]>> = Vec::new();
        let mut seen: HashSet<Box<[u8]>> = HashSet::new();
        if !self.started {
            if self.is_global() {
                self.always.insert(Box::from(&[][..]));
            } else {
                for set in 0..self.grouping.sets.len() {
                    if self.grouping.sets[set].iter().all(|nulled| *nulled) {
                        let nulls: Vec<ArrayRef> = self
                            .grouping
                            .exprs
                            .iter()
                            .map(|e| {
                                Ok(datafusion::arrow::array::new_null_array(
                                    &e.data_type(&input.schema())?,
                                    1,
                                ))
                            })
                            .collect::<Result<_>>()?;
                        if let Some(rows) = self.keys(set, &nulls, 1)? {
                            self.always.insert(rows.row(0).data().into());
                        }
                    }
                }
            }
            for key in &self.always {
                touched.push(key.clone());
                seen.insert(key.clone());
            }
        }
        self.started = true;
        if n > 0 {
            let group_arrays = evaluate(&self.grouping.exprs, &input.batch)?;
            let takes_deltas = self.held.holding != Holding::Off && self.held.attached();
            let mut agg_inputs = Vec::with_capacity(self.aggs.len());
            for agg in &mut self.aggs {
                let arrays = evaluate(&agg.inputs, &input.batch)?;
                let mask = match &agg.call.filter {
                    Some(f) => Some(evaluate_predicate(f, &input.batch)?),
                    None => None,
                };
                // NOTE: a retractable aggregate's rows are values in a delta (see `Held`).
                let rows = if agg.kind == Kind::Sliding && !takes_deltas {
                    None
                } else {
                    if agg.converter.is_none() {
                        agg.converter = Some(RowConverter::new(
                            arrays
                                .iter()
                                .map(|a| SortField::new(a.data_type().clone()))
                                .collect(),
                        )?);
                    }
                    match &agg.converter {
                        Some(c) => Some(c.convert_columns(&arrays)?),
                        None => None,
                    }
                };
                agg_inputs.push((arrays, mask, rows));
            }
            // Per group and sliding aggregate: rows to add and rows to retract.
            let mut sliding: HashMap<Box<[u8]>, Vec<SlidingRows>> = HashMap::new();
            for set in 0..self.grouping.sets.len() {
                let keys = self.keys(set, &group_arrays, n)?;
                for i in 0..n {
                    let key: &[u8] = match &keys {
                        Some(rows) => rows.row(i).data(),
                        None => &[],
                    };
                    let w = input.weights[i];
                    let group = if takes_deltas && self.groups.peek(key).is_none() {
                        let aggs = &self.aggs;
                        let fresh = &mut || empty_delta(aggs);
                        self.held.delta(key, fresh, &group_size, &mut self.bytes)
                    } else {
                        self.fault_in(key)?;
                        group_entry(&mut *self.groups, key, &self.aggs, &mut self.bytes)?
                    };
                    group.rows += w;
                    for (j, agg) in self.aggs.iter().enumerate() {
                        let (arrays, mask, rows) = &agg_inputs[j];
                        if mask.as_ref().is_some_and(|m| !m.value(i)) {
                            continue;
                        }
                        match (&agg.kind, &mut group.states[j]) {
                            (Kind::Sliding, AggState::Sliding(_)) => {
                                let slots = sliding.entry(key.into()).or_insert_with(|| {
                                    vec![(Vec::new(), Vec::new()); self.aggs.len()]
                                });
                                let list = if w > 0 {
                                    &mut slots[j].0
                                } else {
                                    &mut slots[j].1
                                };
                                for _ in 0..w.unsigned_abs() {
                                    list.push(i as u32);
                                }
                            }
                            (kind, AggState::Values(values)) => {
                                if matches!(kind, Kind::Min | Kind::Max | Kind::CountDistinct)
                                    && arrays.first().is_some_and(|a| a.is_null(i))
                                {
                                    continue;
                                }
                                let Some(rows) = rows else { continue };
                                let k = rows.row(i);
                                let value_bytes = k.data().len() as i64 + VALUE_OVERHEAD;
                                let count = values.entry(k.data().into()).or_insert_with(|| {
                                    self.bytes += value_bytes;
                                    0
                                });
                                *count += w;
                                if *count == 0 {
                                    values.remove(k.data());
                                    self.bytes -= value_bytes;
                                }
                            }
                            (_, AggState::Sliding(_)) => {
                                return Err(PlanError::Internal("aggregate state mismatch".into()));
                            }
                        }
                    }
                    if seen.insert(key.into()) {
                        touched.push(key.into());
                    }
                }
            }
            for (key, slots) in sliding {
                let group = self.groups.get_or_insert_with(&key, &mut empty_group);
                for (j, (adds, retracts)) in slots.into_iter().enumerate() {
                    let AggState::Sliding(acc) = &mut group.states[j] else {
                        continue;
                    };
                    let arrays = &agg_inputs[j].0;
                    if !adds.is_empty() {
                        acc.update_batch(&take_all(arrays, adds)?)?;
                    }
                    if !retracts.is_empty() {
                        acc.retract_batch(&take_all(arrays, retracts)?)?;
                    }
                }
            }
        }
        let touched = self.hold_back(touched)?;
        let mut emitted_keys: Vec<&[u8]> = Vec::new();
        let mut emitted_values: Vec<Vec<ScalarValue>> = Vec::new();
        let mut weights: Vec<i64> = Vec::new();
        let mut reads = 0u64;
        for key in &touched {
            self.fault_in(key)?;
            let global = self.always.contains(key);
            let group = group_entry(&mut *self.groups, key, &self.aggs, &mut self.bytes)?;
            if group.rows < 0 {
                return Err(PlanError::Internal(
                    "a group's row count went below zero".into(),
                ));
            }
            let new = if group.rows > 0 || global {
                let (values, r) = evaluate_group(&self.aggs, group)?;
                reads += r;
                Some(values)
            } else {
                None
            };
            let old = group.output.take();
            let remove = group.rows == 0 && !global;
            group.output = new.clone();
            if old != new {
                if let Some(old) = old {
                    emitted_keys.push(key);
                    emitted_values.push(old);
                    weights.push(-1);
                }
                if let Some(new) = new {
                    emitted_keys.push(key);
                    emitted_values.push(new);
                    weights.push(1);
                }
            }
            if remove {
                self.groups.remove(key);
                self.bytes -= key.len() as i64 + group_overhead(self.aggs.len());
            }
        }
        self.groups.count_reads(reads);
        if weights.is_empty() {
            return Ok(Changelog::empty(self.schema.clone()));
        }
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        if !self.is_global() {
            let parser = self.key_converter.parser();
            columns.extend(
                self.key_converter
                    .convert_rows(emitted_keys.iter().map(|k| parser.parse(k)))?,
            );
        }
        for j in 0..self.aggs.len() {
            columns.push(ScalarValue::iter_to_array(
                emitted_values.iter().map(|v| v[j].clone()),
            )?);
        }
        let batch = make_batch(&self.schema, columns, weights.len())?;
        Ok(Changelog::new(batch, weights))
    }
}
