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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Accumulator;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_plan::PhysicalExpr;
use millrace_storage::{StateLocation, StateStore, StorageError, TieredState};

use super::codec::{Reader, Writer};
use super::{
    Operator, StateControl, StateEntry, StateStats, evaluate, evaluate_predicate, single_input,
};
use crate::changelog::{Changelog, loose, make_batch};
use crate::error::{PlanError, Result};

/// One aggregate call of the view's query, as DataFusion planned it.
#[derive(Debug, Clone)]
pub struct AggregateCall {
    /// The aggregate function with its arguments and ordering.
    pub expr: Arc<AggregateFunctionExpr>,
    /// Its `FILTER (WHERE ...)` clause.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

/// The grouping of an aggregate: the group expressions and, for GROUPING SETS / ROLLUP /
/// CUBE, which of them each set replaces by NULL and the set's grouping id.
#[derive(Debug, Clone)]
pub struct Grouping {
    /// Group expressions over the input.
    pub exprs: Vec<Arc<dyn PhysicalExpr>>,
    /// Per grouping set, `true` where the expression is NULL in that set. One all-false
    /// set for a plain GROUP BY.
    pub sets: Vec<Vec<bool>>,
    /// Type and value per set of the `__grouping_id` column, for grouping sets.
    pub grouping_id: Option<(DataType, Vec<u64>)>,
}

/// Input rows to add to and to retract from one sliding accumulator.
type SlidingRows = (Vec<u32>, Vec<u32>);

/// Bytes a group of `aggs` aggregates costs beyond its key: the hash map slot, the key's
/// allocation and place in the changed-key set, the state and output vectors, and per
/// aggregate its accumulator and last emitted value (measured, see `tests/state_bytes.rs`).
fn group_overhead(aggs: usize) -> i64 {
    520 + 96 * aggs as i64
}
/// Bytes one distinct input value (MIN, MAX, DISTINCT) costs beyond its encoding.
const VALUE_OVERHEAD: i64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// count / sum / avg: a retractable accumulator.
    Sliding,
    /// min: the first key of the value multiset.
    Min,
    /// max: the last key of the value multiset.
    Max,
    /// count(DISTINCT x): the number of distinct keys.
    CountDistinct,
    /// Anything else: a fresh accumulator over the multiset (each value once if DISTINCT).
    Generic { distinct: bool },
}

#[derive(Debug)]
struct Agg {
    call: AggregateCall,
    /// Arguments followed by ORDER BY expressions (what DataFusion feeds the accumulator).
    inputs: Vec<Arc<dyn PhysicalExpr>>,
    kind: Kind,
    /// Encoder of the inputs' values, built on the first batch.
    converter: Option<RowConverter>,
    /// string_agg is evaluated here: PostgreSQL allows any delimiter expression, DataFusion's
    /// accumulator only a literal.
    string_agg: bool,
}

#[derive(Debug)]
enum AggState {
    Sliding(Box<dyn Accumulator>),
    Values(BTreeMap<Box<[u8]>, i64>),
}

#[derive(Debug)]
struct Group {
    /// Weighted number of input rows in the group.
    rows: i64,
    states: Vec<AggState>,
    /// The aggregate values last emitted for the group.
    output: Option<Vec<ScalarValue>>,
}

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
}

/// The bytes a group accounts for in the aggregate's state figure.
fn group_size(key: &[u8], group: &Group) -> i64 {
    let held: i64 = group
        .states
        .iter()
        .map(|state| match state {
            AggState::Values(values) => {
                values.keys().map(|v| v.len() as i64 + VALUE_OVERHEAD).sum()
            }
            AggState::Sliding(_) => 0,
        })
        .sum();
    key.len() as i64 + group_overhead(group.states.len()) + held
}

/// Encodes groups for checkpoints: the emitted values as one arrow row over the output
/// types, each sliding accumulator's state as one arrow row over its state types.
#[derive(Debug)]
struct GroupCodec {
    output: ScalarCodec,
    states: Vec<Option<ScalarCodec>>,
}

/// A row of scalars of fixed types, as arrow-row bytes.
#[derive(Debug)]
struct ScalarCodec {
    converter: RowConverter,
    types: Vec<DataType>,
}

impl ScalarCodec {
    fn new(types: Vec<DataType>) -> Result<Self> {
        Ok(Self {
            converter: RowConverter::new(
                types.iter().map(|t| SortField::new(t.clone())).collect(),
            )?,
            types,
        })
    }

    fn encode(&self, values: &[ScalarValue]) -> Result<Vec<u8>> {
        if values.len() != self.types.len() {
            return Err(PlanError::Internal("aggregate state arity".into()));
        }
        if values.is_empty() {
            // NOTE: arrow rows of no columns have no rows (DISTINCT has no aggregates).
            return Ok(Vec::new());
        }
        let arrays = values
            .iter()
            .zip(&self.types)
            .map(|(v, t)| Ok(v.cast_to(t)?.to_array()?))
            .collect::<Result<Vec<ArrayRef>>>()?;
        Ok(self
            .converter
            .convert_columns(&arrays)?
            .row(0)
            .data()
            .to_vec())
    }

    fn decode(&self, bytes: &[u8]) -> Result<Vec<ArrayRef>> {
        if self.types.is_empty() {
            return Ok(Vec::new());
        }
        let parser = self.converter.parser();
        Ok(self.converter.convert_rows([parser.parse(bytes)])?)
    }
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
        let mut aggs = Vec::with_capacity(calls.len());
        for call in calls {
            let mut inputs = call.expr.expressions();
            inputs.extend(call.expr.order_bys().iter().map(|s| s.expr.clone()));
            let name = call.expr.fun().name().to_ascii_lowercase();
            let ordered = !call.expr.order_bys().is_empty();
            let kind = if call.expr.is_distinct() {
                if name == "count" && inputs.len() == 1 {
                    Kind::CountDistinct
                } else {
                    Kind::Generic { distinct: true }
                }
            } else if ordered {
                Kind::Generic { distinct: false }
            } else {
                match name.as_str() {
                    "count" | "sum" | "avg" | "mean"
                        if call
                            .expr
                            .create_sliding_accumulator()?
                            .supports_retract_batch() =>
                    {
                        Kind::Sliding
                    }
                    "min" if inputs.len() == 1 => Kind::Min,
                    "max" if inputs.len() == 1 => Kind::Max,
                    _ => Kind::Generic { distinct: false },
                }
            };
            aggs.push(Agg {
                converter: None,
                string_agg: name == "string_agg" && inputs.len() >= 2,
                inputs,
                kind,
                call,
            });
        }
        let codec = group_codec(&schema, key_fields, &aggs).ok();
        Ok(Self {
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

    fn encode_group(codec: &GroupCodec, group: &mut Group) -> Result<Vec<u8>> {
        let mut w = Writer::new();
        w.i64(group.rows);
        match &group.output {
            Some(values) => w.u64(1).bytes(&codec.output.encode(values)?),
            None => w.u64(0),
        };
        w.u64(group.states.len() as u64);
        for (state, state_codec) in group.states.iter_mut().zip(&codec.states) {
            match (state, state_codec) {
                (AggState::Sliding(acc), Some(c)) => {
                    w.u64(0).bytes(&c.encode(&acc.state()?)?);
                }
                (AggState::Values(values), _) => {
                    w.u64(1).u64(values.len() as u64);
                    for (value, count) in values.iter() {
                        w.bytes(value).i64(*count);
                    }
                }
                (AggState::Sliding(_), None) => {
                    return Err(PlanError::Internal("no codec for an accumulator".into()));
                }
            }
        }
        Ok(w.finish())
    }

    fn decode_group(&self, codec: &GroupCodec, bytes: &[u8]) -> Result<(Group, i64)> {
        let mut r = Reader::new(bytes);
        let rows = r.i64()?;
        let output = match r.u64()? {
            0 => None,
            _ => {
                let arrays = codec.output.decode(r.bytes()?)?;
                Some(
                    arrays
                        .iter()
                        .map(|a| Ok(ScalarValue::try_from_array(a, 0)?))
                        .collect::<Result<Vec<_>>>()?,
                )
            }
        };
        let n = r.u64()? as usize;
        let mut states = Vec::with_capacity(n);
        let mut bytes_held = 0i64;
        for j in 0..n {
            match r.u64()? {
                0 => {
                    let (Some(agg), Some(Some(c))) = (self.aggs.get(j), codec.states.get(j)) else {
                        return Err(PlanError::Internal(
                            "accumulator state without codec".into(),
                        ));
                    };
                    let mut acc = agg.call.expr.create_sliding_accumulator()?;
                    acc.merge_batch(&c.decode(r.bytes()?)?)?;
                    states.push(AggState::Sliding(acc));
                }
                _ => {
                    let mut values = BTreeMap::new();
                    for _ in 0..r.u64()? {
                        let value: Box<[u8]> = r.bytes()?.into();
                        bytes_held += value.len() as i64 + VALUE_OVERHEAD;
                        values.insert(value, r.i64()?);
                    }
                    states.push(AggState::Values(values));
                }
            }
        }
        Ok((
            Group {
                rows,
                states,
                output,
            },
            bytes_held,
        ))
    }

    /// Brings the group under `key` back from the warm tier if it was evicted.
    fn fault_in(&mut self, key: &[u8]) -> Result<()> {
        if let Some(value) = self.groups.fetch(key)? {
            let codec = self
                .codec
                .as_ref()
                .ok_or_else(|| PlanError::Internal("evicted group without a codec".into()))?;
            let (group, held) = self.decode_group(codec, &value)?;
            let size = key.len() as i64 + group_overhead(self.aggs.len()) + held;
            self.bytes += size;
            self.spilled = (self.spilled - size).max(0);
            self.groups.restore(key.into(), group);
        }
        Ok(())
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

    /// The current values of every aggregate of a group.
    fn evaluate_group(aggs: &[Agg], group: &mut Group) -> Result<(Vec<ScalarValue>, u64)> {
        let mut out = Vec::with_capacity(aggs.len());
        let mut reads = 0u64;
        for (agg, state) in aggs.iter().zip(group.states.iter_mut()) {
            let value = match state {
                AggState::Sliding(acc) => acc.evaluate()?,
                AggState::Values(values) => {
                    let picked: Vec<&[u8]> = match agg.kind {
                        Kind::CountDistinct => {
                            out.push(ScalarValue::Int64(Some(values.len() as i64)));
                            continue;
                        }
                        Kind::Min => values
                            .keys()
                            .next()
                            .map(|k| k.as_ref())
                            .into_iter()
                            .collect(),
                        Kind::Max => values
                            .keys()
                            .next_back()
                            .map(|k| k.as_ref())
                            .into_iter()
                            .collect(),
                        Kind::Generic { distinct } => {
                            let mut picked = Vec::new();
                            for (k, &count) in values.iter() {
                                if count < 0 {
                                    return Err(PlanError::Internal(
                                        "aggregate input count below zero".into(),
                                    ));
                                }
                                let copies = if distinct { 1 } else { count };
                                for _ in 0..copies {
                                    picked.push(k.as_ref());
                                }
                            }
                            picked
                        }
                        Kind::Sliding => Vec::new(),
                    };
                    reads += picked.len() as u64;
                    if agg.string_agg {
                        let arrays = match (&agg.converter, picked.is_empty()) {
                            (Some(converter), false) => {
                                let parser = converter.parser();
                                converter.convert_rows(picked.iter().map(|k| parser.parse(k)))?
                            }
                            _ => Vec::new(),
                        };
                        let value = string_agg(&arrays, agg.call.expr.order_bys())?;
                        out.push(value.cast_to(agg.call.expr.field().data_type())?);
                        continue;
                    }
                    let mut acc = agg.call.expr.create_accumulator()?;
                    if let (false, Some(converter)) = (picked.is_empty(), &agg.converter) {
                        let parser = converter.parser();
                        let arrays =
                            converter.convert_rows(picked.iter().map(|k| parser.parse(k)))?;
                        acc.update_batch(&arrays)?;
                    }
                    acc.evaluate()?
                }
            };
            out.push(value);
        }
        Ok((out, reads))
    }
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
        StateStats {
            entries: self.groups.len() as u64,
            bytes: self.bytes.max(0) as u64,
            spilled_bytes: self.spilled.max(0) as u64,
            counters: self.groups.counters(),
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
                Some(group) => Some(Self::encode_group(codec, group)?),
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
                let (group, held) = self.decode_group(&codec, &value)?;
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
                let freed = self.groups.evict(
                    fraction,
                    &mut |group: &mut Group| {
                        Self::encode_group(codec, group)
                            .map_err(|e| StorageError::StateCodec(e.to_string()))
                    },
                    &group_size,
                )?;
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
                Ok(self.groups.flush_changes(min, &mut |group: &mut Group| {
                    Self::encode_group(codec, group)
                        .map_err(|e| StorageError::StateCodec(e.to_string()))
                })?)
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
            let mut agg_inputs = Vec::with_capacity(self.aggs.len());
            for agg in &mut self.aggs {
                let arrays = evaluate(&agg.inputs, &input.batch)?;
                let mask = match &agg.call.filter {
                    Some(f) => Some(evaluate_predicate(f, &input.batch)?),
                    None => None,
                };
                let rows = if agg.kind == Kind::Sliding {
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
                    self.fault_in(key)?;
                    let mut fresh = match self.groups.get(key) {
                        Some(_) => None,
                        None => {
                            self.bytes += key.len() as i64 + group_overhead(self.aggs.len());
                            Some(new_group(&self.aggs)?)
                        }
                    };
                    let group = self
                        .groups
                        .get_or_insert_with(key, &mut || fresh.take().unwrap_or_else(empty_group));
                    group.rows += w;
                    for (j, agg) in self.aggs.iter().enumerate() {
                        let (arrays, mask, rows) = &agg_inputs[j];
                        if mask.as_ref().is_some_and(|m| !m.value(i)) {
                            continue;
                        }
                        match (&agg.kind, &mut group.states[j]) {
                            (Kind::Sliding, _) => {
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
        let mut emitted_keys: Vec<&[u8]> = Vec::new();
        let mut emitted_values: Vec<Vec<ScalarValue>> = Vec::new();
        let mut weights: Vec<i64> = Vec::new();
        let mut reads = 0u64;
        for key in &touched {
            self.fault_in(key)?;
            let global = self.always.contains(key);
            let mut fresh = match self.groups.get(key) {
                Some(_) => None,
                None => Some(new_group(&self.aggs)?),
            };
            let group = self
                .groups
                .get_or_insert_with(key, &mut || fresh.take().unwrap_or_else(empty_group));
            if group.rows < 0 {
                return Err(PlanError::Internal(
                    "a group's row count went below zero".into(),
                ));
            }
            let new = if group.rows > 0 || global {
                let (values, r) = Self::evaluate_group(&self.aggs, group)?;
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

/// PostgreSQL's string_agg(value, delimiter [ORDER BY ...]) over decoded input rows: the
/// non-NULL values in order, each after the first preceded by its own row's delimiter.
fn string_agg(
    arrays: &[ArrayRef],
    order: &[datafusion::physical_expr::PhysicalSortExpr],
) -> Result<ScalarValue> {
    let (Some(values), Some(delimiters)) = (arrays.first(), arrays.get(1)) else {
        return Ok(ScalarValue::Utf8(None));
    };
    let values = datafusion::arrow::compute::cast(values, &DataType::Utf8)?;
    let delimiters = datafusion::arrow::compute::cast(delimiters, &DataType::Utf8)?;
    let values = datafusion::arrow::array::as_string_array(&values);
    let delimiters = datafusion::arrow::array::as_string_array(&delimiters);
    let indices: Vec<u32> = if order.is_empty() || arrays.len() < 2 + order.len() {
        (0..values.len() as u32).collect()
    } else {
        let columns: Vec<datafusion::arrow::compute::SortColumn> = order
            .iter()
            .zip(&arrays[2..])
            .map(|(o, a)| datafusion::arrow::compute::SortColumn {
                values: a.clone(),
                options: Some(o.options),
            })
            .collect();
        datafusion::arrow::compute::lexsort_to_indices(&columns, None)?
            .values()
            .to_vec()
    };
    let mut out: Option<String> = None;
    for i in indices {
        let i = i as usize;
        if values.is_null(i) {
            continue;
        }
        match &mut out {
            None => out = Some(values.value(i).to_string()),
            Some(s) => {
                if !delimiters.is_null(i) {
                    s.push_str(delimiters.value(i));
                }
                s.push_str(values.value(i));
            }
        }
    }
    Ok(ScalarValue::Utf8(out))
}

/// The checkpoint codec of an aggregate's groups, if every sliding accumulator's state has
/// types arrow rows can encode.
fn group_codec(schema: &SchemaRef, key_fields: usize, aggs: &[Agg]) -> Result<GroupCodec> {
    let output = ScalarCodec::new(
        schema.fields()[key_fields..]
            .iter()
            .map(|f| f.data_type().clone())
            .collect(),
    )?;
    let mut states = Vec::with_capacity(aggs.len());
    for agg in aggs {
        states.push(match agg.kind {
            // NOTE: a sliding accumulator's state can differ from the plain one's
            // (state_fields): take the types from a fresh one.
            Kind::Sliding => Some(ScalarCodec::new(
                agg.call
                    .expr
                    .create_sliding_accumulator()?
                    .state()?
                    .iter()
                    .map(|v| v.data_type())
                    .collect(),
            )?),
            _ => None,
        });
    }
    Ok(GroupCodec { output, states })
}

fn new_group(aggs: &[Agg]) -> Result<Group> {
    let mut states = Vec::with_capacity(aggs.len());
    for agg in aggs {
        states.push(match agg.kind {
            Kind::Sliding => AggState::Sliding(agg.call.expr.create_sliding_accumulator()?),
            _ => AggState::Values(BTreeMap::new()),
        });
    }
    Ok(Group {
        rows: 0,
        states,
        output: None,
    })
}

fn empty_group() -> Group {
    Group {
        rows: 0,
        states: Vec::new(),
        output: None,
    }
}

fn take_all(arrays: &[ArrayRef], indices: Vec<u32>) -> Result<Vec<ArrayRef>> {
    let indices = UInt32Array::from(indices);
    arrays
        .iter()
        .map(|a| Ok(take(a.as_ref(), &indices, None)?))
        .collect()
}
