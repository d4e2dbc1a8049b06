//! The state of one group of the aggregate: its row count and per aggregate a retractable
//! accumulator or the multiset of the aggregate's input values; how a group is evaluated
//! into the aggregates' current values and how it is encoded for checkpoints and the warm
//! tier. The operator itself (`aggregate.rs`) routes each epoch's rows to their groups.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Accumulator;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_plan::PhysicalExpr;

use super::exact_sum::exact_float_sum;
use crate::error::{PlanError, Result};
use crate::ops::codec::{Reader, Writer};

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
pub(super) type SlidingRows = (Vec<u32>, Vec<u32>);

/// Bytes a group of `aggs` aggregates costs beyond its key: the hash map slot, the key's
/// allocation and place in the changed-key set, the state and output vectors, and per
/// aggregate its accumulator and last emitted value (measured, see `tests/state_bytes.rs`).
pub(super) fn group_overhead(aggs: usize) -> i64 {
    520 + 96 * aggs as i64
}

/// Bytes one distinct input value (MIN, MAX, DISTINCT) costs beyond its encoding.
pub(super) const VALUE_OVERHEAD: i64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
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
pub(super) struct Agg {
    pub(super) call: AggregateCall,
    /// Arguments followed by ORDER BY expressions (what DataFusion feeds the accumulator).
    pub(super) inputs: Vec<Arc<dyn PhysicalExpr>>,
    pub(super) kind: Kind,
    /// Encoder of the inputs' values, built on the first batch.
    pub(super) converter: Option<RowConverter>,
    /// string_agg is evaluated here: PostgreSQL allows any delimiter expression, DataFusion's
    /// accumulator only a literal.
    pub(super) string_agg: bool,
    /// A sum or average kept in floats by DataFusion, kept exactly here (`exact_sum.rs`):
    /// `Some(true)` for an average.
    exact_float: Option<bool>,
}

impl Agg {
    /// A fresh retractable accumulator of a `Kind::Sliding` aggregate.
    pub(super) fn sliding_accumulator(&self) -> Result<Box<dyn Accumulator>> {
        Ok(match self.exact_float {
            Some(average) => exact_float_sum(average, self.call.expr.field().data_type().clone()),
            None => self.call.expr.create_sliding_accumulator()?,
        })
    }

    /// An aggregate call with the state kind that maintains it.
    pub(super) fn try_new(call: AggregateCall) -> Result<Self> {
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
        // NOTE: DataFusion's sum and avg keep a float running total wherever their state is
        // a float (float inputs, and avg of integers): retractions would leave rounding.
        let float_state = call
            .expr
            .state_fields()?
            .iter()
            .any(|f| matches!(f.data_type(), DataType::Float64 | DataType::Float32));
        let exact_float = match (kind, name.as_str()) {
            (Kind::Sliding, "sum") if float_state => Some(false),
            (Kind::Sliding, "avg" | "mean") if float_state => Some(true),
            _ => None,
        };
        Ok(Self {
            converter: None,
            exact_float,
            string_agg: name == "string_agg" && inputs.len() >= 2,
            inputs,
            kind,
            call,
        })
    }
}

#[derive(Debug)]
pub(super) enum AggState {
    Sliding(Box<dyn Accumulator>),
    Values(BTreeMap<Box<[u8]>, i64>),
}

#[derive(Debug)]
pub(super) struct Group {
    /// Weighted number of input rows in the group.
    pub(super) rows: i64,
    pub(super) states: Vec<AggState>,
    /// The aggregate values last emitted for the group.
    pub(super) output: Option<Vec<ScalarValue>>,
}

/// The bytes a group accounts for in the aggregate's state figure.
pub(super) fn group_size(key: &[u8], group: &Group) -> i64 {
    let held: i64 = group
        .states
        .iter()
        .map(|state| match state {
            AggState::Values(values) => {
                values.keys().map(|v| v.len() as i64 + VALUE_OVERHEAD).sum()
            }
            // NOTE: DataFusion's sliding accumulators fit in the measured overhead; an exact
            // float sum holds its limbs beyond it.
            AggState::Sliding(acc) => (acc.size() as i64 - 64).max(0),
        })
        .sum();
    key.len() as i64 + group_overhead(group.states.len()) + held
}

/// Encodes groups for checkpoints: the emitted values as one arrow row over the output
/// types, each sliding accumulator's state as one arrow row over its state types.
#[derive(Debug)]
pub(super) struct GroupCodec {
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

impl GroupCodec {
    /// The checkpoint codec of an aggregate's groups, if every sliding accumulator's state
    /// has types arrow rows can encode.
    pub(super) fn try_new(schema: &SchemaRef, key_fields: usize, aggs: &[Agg]) -> Result<Self> {
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
                    agg.sliding_accumulator()?
                        .state()?
                        .iter()
                        .map(|v| v.data_type())
                        .collect(),
                )?),
                _ => None,
            });
        }
        Ok(Self { output, states })
    }

    /// [`GroupCodec::encode`] for the state store, whose writers take its error type.
    pub(super) fn encode_stored(
        &self,
        group: &mut Group,
    ) -> std::result::Result<Vec<u8>, millrace_storage::StorageError> {
        self.encode(group)
            .map_err(|e| millrace_storage::StorageError::StateCodec(e.to_string()))
    }

    /// A group as checkpoints and the warm tier hold it.
    pub(super) fn encode(&self, group: &mut Group) -> Result<Vec<u8>> {
        let mut w = Writer::new();
        w.i64(group.rows);
        match &group.output {
            Some(values) => w.u64(1).bytes(&self.output.encode(values)?),
            None => w.u64(0),
        };
        w.u64(group.states.len() as u64);
        for (state, state_codec) in group.states.iter_mut().zip(&self.states) {
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

    /// A group back from [`GroupCodec::encode`], with the bytes its value multisets hold.
    pub(super) fn decode(&self, aggs: &[Agg], bytes: &[u8]) -> Result<(Group, i64)> {
        let mut r = Reader::new(bytes);
        let rows = r.i64()?;
        let output = match r.u64()? {
            0 => None,
            _ => {
                let arrays = self.output.decode(r.bytes()?)?;
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
                    let (Some(agg), Some(Some(c))) = (aggs.get(j), self.states.get(j)) else {
                        return Err(PlanError::Internal(
                            "accumulator state without codec".into(),
                        ));
                    };
                    let mut acc = agg.sliding_accumulator()?;
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
}

/// The current values of every aggregate of a group, and the state rows read for them.
pub(super) fn evaluate_group(aggs: &[Agg], group: &mut Group) -> Result<(Vec<ScalarValue>, u64)> {
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
                    let arrays = converter.convert_rows(picked.iter().map(|k| parser.parse(k)))?;
                    acc.update_batch(&arrays)?;
                }
                acc.evaluate()?
            }
        };
        out.push(value);
    }
    Ok((out, reads))
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

/// A group with no rows yet and fresh state for every aggregate.
pub(super) fn new_group(aggs: &[Agg]) -> Result<Group> {
    let mut states = Vec::with_capacity(aggs.len());
    for agg in aggs {
        states.push(match agg.kind {
            Kind::Sliding => AggState::Sliding(agg.sliding_accumulator()?),
            _ => AggState::Values(BTreeMap::new()),
        });
    }
    Ok(Group {
        rows: 0,
        states,
        output: None,
    })
}

/// A delta with no change yet (see `AggregateOp::held`): a signed multiset per aggregate.
pub(super) fn empty_delta(aggs: &[Agg]) -> Group {
    Group {
        rows: 0,
        states: aggs
            .iter()
            .map(|_| AggState::Values(BTreeMap::new()))
            .collect(),
        output: None,
    }
}

/// Adds a delta (a group of signed multisets, see `AggregateOp::held`) to `group`, counting the
/// values it adds to or removes from `group`'s multisets in `bytes`.
pub(super) fn merge_delta(
    aggs: &[Agg],
    group: &mut Group,
    delta: Group,
    bytes: &mut i64,
) -> Result<()> {
    group.rows += delta.rows;
    for ((agg, state), change) in aggs.iter().zip(&mut group.states).zip(delta.states) {
        let AggState::Values(change) = change else {
            return Err(PlanError::Internal("a delta holds an accumulator".into()));
        };
        match state {
            AggState::Values(values) => {
                for (value, weight) in change {
                    let value_bytes = value.len() as i64 + VALUE_OVERHEAD;
                    let count = values.entry(value.clone()).or_insert_with(|| {
                        *bytes += value_bytes;
                        0
                    });
                    *count += weight;
                    if *count == 0 {
                        values.remove(&value);
                        *bytes -= value_bytes;
                    }
                }
            }
            AggState::Sliding(acc) => {
                let Some(converter) = &agg.converter else {
                    if change.is_empty() {
                        continue;
                    }
                    return Err(PlanError::Internal("a delta without its encoder".into()));
                };
                let parser = converter.parser();
                let arrays = converter.convert_rows(change.keys().map(|v| parser.parse(v)))?;
                let (mut adds, mut retracts) = (Vec::new(), Vec::new());
                for (i, weight) in change.values().enumerate() {
                    let list = if *weight > 0 {
                        &mut adds
                    } else {
                        &mut retracts
                    };
                    list.extend(std::iter::repeat_n(
                        i as u32,
                        weight.unsigned_abs() as usize,
                    ));
                }
                // NOTE: adds first: the group's multiset after the whole delta holds every
                // retracted row, and DataFusion's counts are unsigned.
                if !adds.is_empty() {
                    acc.update_batch(&take_all(&arrays, adds)?)?;
                }
                if !retracts.is_empty() {
                    acc.retract_batch(&take_all(&arrays, retracts)?)?;
                }
            }
        }
    }
    Ok(())
}

/// A placeholder group (only used where the group is known to exist already).
pub(super) fn empty_group() -> Group {
    Group {
        rows: 0,
        states: Vec::new(),
        output: None,
    }
}

/// The rows at `indices` of each array.
pub(super) fn take_all(arrays: &[ArrayRef], indices: Vec<u32>) -> Result<Vec<ArrayRef>> {
    let indices = UInt32Array::from(indices);
    arrays
        .iter()
        .map(|a| Ok(take(a.as_ref(), &indices, None)?))
        .collect()
}
