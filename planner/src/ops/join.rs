//! Equi-join with residual conditions, for every join type DataFusion plans: inner, left,
//! right and full outer, semi and anti (IN / EXISTS / NOT EXISTS / INTERSECT / EXCEPT).
//!
//! Both sides are kept indexed by join key: key -> (row -> weight, degree). The degree of a
//! row is the weighted number of rows of the other side it joins with (residual included);
//! outer, semi and anti joins turn a degree's move from or to zero into the retraction or
//! insertion of the NULL-padded or filtered row. One epoch joins the left changes with the
//! old right side, applies them, then joins the right changes with the new left side:
//! Δ(L⋈R) = ΔL⋈R + (L+ΔL)⋈ΔR. Work is proportional to the changes and the rows sharing
//! their keys, never to the sides' sizes.

#[cfg(test)]
mod tests;

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::JoinType;
use datafusion::physical_plan::PhysicalExpr;
use millrace_storage::{StateLocation, StateStore, TieredState};

use super::StateEntry;
use super::codec::{Reader, Writer};

use super::{Operator, StateControl, StateStats, evaluate, evaluate_predicate};
use crate::changelog::{Changelog, RowCodec, loose, make_batch};
use crate::error::{PlanError, Result};

/// How a join is keyed and filtered.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    /// DataFusion's join type.
    pub join_type: JoinType,
    /// Key expressions over the left and the right input, pairwise equal.
    pub keys: [Vec<Arc<dyn PhysicalExpr>>; 2],
    /// Whether NULL keys match each other (IS NOT DISTINCT FROM, INTERSECT, EXCEPT).
    pub nulls_equal: bool,
    /// Residual condition over left columns followed by right columns.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    /// Schemas of the left and right inputs.
    pub inputs: [SchemaRef; 2],
    /// Left columns followed by right columns (what `filter` is evaluated on).
    pub combined: SchemaRef,
    /// The join's output schema.
    pub output: SchemaRef,
}

use super::bucket::{Bucket, Entry};

/// Bytes a key's bucket costs beyond the key itself: the hash map slot at its load factor,
/// the key's allocation and its place in the changed-key set (measured, see
/// `tests/state_bytes.rs`).
const BUCKET_OVERHEAD: i64 = 160;

/// Bytes the rows of a bucket of `len` rows cost beyond their encodings: a single row is
/// inline (only its allocation rounds up); B-tree nodes cost about 95 bytes a row.
fn rows_overhead(len: usize) -> i64 {
    match len {
        0 => 0,
        1 => 8,
        n => 95 * n as i64,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// Joined pairs, NULL-padded for preserved sides.
    Pairs { preserve: [bool; 2] },
    /// Rows of side `.0` that have a match.
    Semi(usize),
    /// Rows of side `.0` that have no match.
    Anti(usize),
}

/// The incremental join.
#[derive(Debug)]
pub struct JoinOp {
    spec: JoinSpec,
    output: Output,
    keys: RowCodec,
    rows: [RowCodec; 2],
    null_rows: [Box<[u8]>; 2],
    sides: [Box<dyn StateStore<Bucket>>; 2],
    /// Approximate bytes held by both sides in memory, and evicted to the warm tier.
    bytes: i64,
    spilled: i64,
}

/// One change to emit: left row, right row (None = NULLs), weight.
type Emit = (Option<Box<[u8]>>, Option<Box<[u8]>>, i64);

impl JoinOp {
    /// A join as described by `spec`.
    pub fn try_new(spec: JoinSpec) -> Result<Self> {
        let output = match spec.join_type {
            JoinType::Inner => Output::Pairs {
                preserve: [false, false],
            },
            JoinType::Left => Output::Pairs {
                preserve: [true, false],
            },
            JoinType::Right => Output::Pairs {
                preserve: [false, true],
            },
            JoinType::Full => Output::Pairs {
                preserve: [true, true],
            },
            JoinType::LeftSemi => Output::Semi(0),
            JoinType::RightSemi => Output::Semi(1),
            JoinType::LeftAnti => Output::Anti(0),
            JoinType::RightAnti => Output::Anti(1),
            other => return Err(PlanError::Unsupported(format!("{other} join"))),
        };
        let left_schema = spec.inputs[0].clone();
        let key_types: Vec<datafusion::arrow::datatypes::DataType> = spec.keys[0]
            .iter()
            .map(|e| Ok(e.data_type(&left_schema)?))
            .collect::<Result<_>>()?;
        let keys = RowCodec::new(key_types)?;
        let rows = [
            RowCodec::for_schema(&spec.inputs[0])?,
            RowCodec::for_schema(&spec.inputs[1])?,
        ];
        let null_rows = [null_row(&rows[0])?, null_row(&rows[1])?];
        Ok(Self {
            spec,
            output,
            keys,
            rows,
            null_rows,
            sides: [
                Box::new(TieredState::default()),
                Box::new(TieredState::default()),
            ],
            bytes: 0,
            spilled: 0,
        })
    }

    /// Brings the bucket under `key` of `side` back from the warm tier if it was evicted.
    fn fault_in(&mut self, side: usize, key: &[u8]) -> Result<()> {
        if let Some(value) = self.sides[side].fetch(key)? {
            let bucket = decode_bucket(&value)?;
            let size = bucket_size(key, &bucket);
            self.bytes += size;
            self.spilled = (self.spilled - size).max(0);
            self.sides[side].restore(key.into(), bucket);
        }
        Ok(())
    }

    /// Joins one side's changes with the other side's state, emits the output changes and
    /// applies the changes to this side's state.
    fn process(&mut self, side: usize, delta: &Changelog, out: &mut Vec<Emit>) -> Result<()> {
        if delta.is_empty() {
            return Ok(());
        }
        let other = 1 - side;
        let key_arrays = evaluate(&self.spec.keys[side], &delta.batch)?;
        let has_null: Vec<bool> = (0..delta.len())
            .map(|i| key_arrays.iter().any(|a| a.is_null(i)))
            .collect();
        let keys = self.keys.encode(&key_arrays, delta.len())?;
        for i in 0..delta.len() {
            self.fault_in(side, keys.row(i))?;
            self.fault_in(other, keys.row(i))?;
        }
        let rows = self.rows[side].encode(delta.batch.columns(), delta.len())?;

        // Candidate pairs: (delta row, other row, other weight).
        let mut pairs: Vec<(u32, Box<[u8]>, i64)> = Vec::new();
        let mut scanned = 0u64;
        for (i, &null_key) in has_null.iter().enumerate() {
            if null_key && !self.spec.nulls_equal {
                continue;
            }
            if let Some(bucket) = self.sides[other].get(keys.row(i)) {
                scanned += bucket.len() as u64;
                for (row, entry) in bucket.iter() {
                    pairs.push((i as u32, Box::from(row), entry.weight));
                }
            }
        }
        self.sides[other].count_reads(scanned);
        let matched = match &self.spec.filter {
            Some(filter) if !pairs.is_empty() => {
                let this_cols = take_columns(&delta.batch, pairs.iter().map(|p| p.0))?;
                let other_cols = self.rows[other].decode(pairs.iter().map(|p| p.1.as_ref()))?;
                let columns = if side == 0 {
                    [this_cols, other_cols].concat()
                } else {
                    [other_cols, this_cols].concat()
                };
                let batch = make_batch(&self.spec.combined, columns, pairs.len())?;
                let mask = evaluate_predicate(filter, &batch)?;
                pairs
                    .into_iter()
                    .enumerate()
                    .filter(|(p, _)| mask.value(*p))
                    .map(|(_, pair)| pair)
                    .collect()
            }
            _ => pairs,
        };

        let mut degrees = vec![0i64; delta.len()];
        let pair = |this: Box<[u8]>, that: Box<[u8]>, w: i64| -> Emit {
            if side == 0 {
                (Some(this), Some(that), w)
            } else {
                (Some(that), Some(this), w)
            }
        };
        let padded = |row: Box<[u8]>, row_side: usize, w: i64| -> Emit {
            if row_side == 0 {
                (Some(row), None, w)
            } else {
                (None, Some(row), w)
            }
        };
        for (i, other_row, other_weight) in matched {
            let i = i as usize;
            let w = delta.weights[i];
            degrees[i] += other_weight;
            let this_row: Box<[u8]> = rows.row(i).into();
            if let Output::Pairs { .. } = self.output {
                out.push(pair(this_row.clone(), other_row.clone(), w * other_weight));
            }
            // The other row's degree moves by w.
            let key = keys.row(i);
            let bucket = self.sides[other].get_or_insert_with(key, &mut Bucket::default);
            let Some(entry) = bucket.get_mut(&other_row) else {
                continue;
            };
            let before = entry.degree;
            entry.degree += w;
            let after = entry.degree;
            let copies = entry.weight;
            let crossed_to_zero = before != 0 && after == 0;
            let crossed_from_zero = before == 0 && after != 0;
            match self.output {
                Output::Pairs { preserve } if preserve[other] => {
                    if crossed_from_zero {
                        out.push(padded(other_row, other, -copies));
                    } else if crossed_to_zero {
                        out.push(padded(other_row, other, copies));
                    }
                }
                Output::Semi(s) if s == other => {
                    if crossed_from_zero {
                        out.push((Some(other_row), None, copies));
                    } else if crossed_to_zero {
                        out.push((Some(other_row), None, -copies));
                    }
                }
                Output::Anti(s) if s == other => {
                    if crossed_from_zero {
                        out.push((Some(other_row), None, -copies));
                    } else if crossed_to_zero {
                        out.push((Some(other_row), None, copies));
                    }
                }
                _ => {}
            }
        }
        for (i, &degree) in degrees.iter().enumerate() {
            let w = delta.weights[i];
            let this_row: Box<[u8]> = rows.row(i).into();
            match self.output {
                Output::Pairs { preserve } if preserve[side] && degree == 0 => {
                    out.push(padded(this_row.clone(), side, w));
                }
                Output::Semi(s) if s == side && degree != 0 => {
                    out.push((Some(this_row.clone()), None, w));
                }
                Output::Anti(s) if s == side && degree == 0 => {
                    out.push((Some(this_row.clone()), None, w));
                }
                _ => {}
            }
            let key = keys.row(i);
            let mut fresh_bucket = false;
            let bucket = self.sides[side].get_or_insert_with(key, &mut || {
                fresh_bucket = true;
                Bucket::default()
            });
            if fresh_bucket {
                self.bytes += key.len() as i64 + BUCKET_OVERHEAD;
            }
            let before = bucket.len();
            let entry = bucket.entry_or_insert_with(this_row.clone(), Entry::default);
            entry.weight += w;
            entry.degree = degree;
            if entry.weight == 0 {
                bucket.remove(&this_row);
            }
            let after = bucket.len();
            if after != before {
                let row = this_row.len() as i64 * (after as i64 - before as i64);
                self.bytes += row + rows_overhead(after) - rows_overhead(before);
            }
            if bucket.is_empty() {
                self.sides[side].remove(key);
                self.bytes -= key.len() as i64 + BUCKET_OVERHEAD;
            }
        }
        Ok(())
    }

    fn emit(&self, out: Vec<Emit>) -> Result<Changelog> {
        let schema = loose(&self.spec.output);
        if out.is_empty() {
            return Ok(Changelog::empty(schema));
        }
        let weights: Vec<i64> = out.iter().map(|e| e.2).collect();
        let columns = match self.output {
            Output::Pairs { .. } => {
                let mut columns = self.decode(0, out.iter().map(|e| e.0.as_deref()))?;
                columns.extend(self.decode(1, out.iter().map(|e| e.1.as_deref()))?);
                columns
            }
            Output::Semi(s) | Output::Anti(s) => {
                self.decode(s, out.iter().map(|e| e.0.as_deref()))?
            }
        };
        let batch = make_batch(&schema, columns, weights.len())?;
        Changelog::new(batch, weights).consolidate()
    }

    fn decode<'a>(
        &self,
        side: usize,
        rows: impl Iterator<Item = Option<&'a [u8]>>,
    ) -> Result<Vec<ArrayRef>> {
        let null = &self.null_rows[side];
        self.rows[side].decode(rows.map(|r| r.unwrap_or(null)))
    }
}

impl Operator for JoinOp {
    fn describe(&self) -> String {
        let keys: Vec<String> = self.spec.keys[0]
            .iter()
            .zip(&self.spec.keys[1])
            .map(|(l, r)| format!("{l} = {r}"))
            .collect();
        let filter = match &self.spec.filter {
            Some(f) => format!(" filter={f}"),
            None => String::new(),
        };
        let nulls = if self.spec.nulls_equal {
            " nulls_equal"
        } else {
            ""
        };
        format!(
            "HashJoin: type={} on=[{}]{filter}{nulls}",
            self.spec.join_type,
            keys.join(", ")
        )
    }

    fn schema(&self) -> SchemaRef {
        loose(&self.spec.output)
    }

    fn state(&self) -> StateStats {
        let mut stats = StateStats::default();
        for side in &self.sides {
            stats.add(StateStats {
                entries: side.len() as u64,
                counters: side.counters(),
                ..StateStats::default()
            });
        }
        stats.bytes = self.bytes.max(0) as u64;
        stats.spilled_bytes = self.spilled.max(0) as u64;
        stats
    }

    fn checkpoint(&mut self) -> Result<Option<Vec<StateEntry>>> {
        let mut entries = Vec::new();
        for (side, store) in self.sides.iter_mut().enumerate() {
            for key in store.take_dirty() {
                let mut state_key = Vec::with_capacity(key.len() + 1);
                state_key.push(side as u8);
                state_key.extend_from_slice(&key);
                entries.push((state_key, store.peek(&key).map(encode_bucket)));
            }
        }
        Ok(Some(entries))
    }

    fn restore(&mut self, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        for (key, value) in entries {
            let (&side, join_key) = key
                .split_first()
                .ok_or_else(|| PlanError::Internal("empty join state key".into()))?;
            let side = usize::from(side).min(1);
            let bucket = decode_bucket(&value)?;
            self.bytes += bucket_size(join_key, &bucket);
            self.sides[side].restore(join_key.into(), bucket);
        }
        Ok(())
    }

    fn attach(&mut self, location: &StateLocation) {
        for (side, store) in self.sides.iter_mut().enumerate() {
            store.attach(location.with_prefix(&[side as u8]));
        }
    }

    fn control(&mut self, control: StateControl) -> Result<u64> {
        match control {
            StateControl::RestoreLazily => {
                let mut lazy = true;
                for store in &mut self.sides {
                    lazy &= store.restore_lazily();
                }
                Ok(u64::from(lazy))
            }
            StateControl::Evict(fraction) => {
                let mut freed = 0;
                for store in &mut self.sides {
                    freed += store.evict(
                        fraction,
                        &mut |bucket: &mut Bucket| Ok(encode_bucket(bucket)),
                        &bucket_size,
                    )?;
                }
                self.bytes -= freed;
                self.spilled += freed;
                Ok(freed.max(0) as u64)
            }
            StateControl::Committed => {
                for store in &mut self.sides {
                    store.committed();
                }
                Ok(0)
            }
            StateControl::FlushChanges(min) => {
                let mut written = 0;
                for store in &mut self.sides {
                    written += store
                        .flush_changes(min, &mut |bucket: &mut Bucket| Ok(encode_bucket(bucket)))?;
                }
                Ok(written)
            }
            StateControl::Hold | StateControl::Release(_) | StateControl::Held => Ok(0),
        }
    }

    fn step(&mut self, inputs: Vec<Changelog>) -> Result<Changelog> {
        let [left, right]: [Changelog; 2] = inputs
            .try_into()
            .map_err(|_| PlanError::Internal("join expects two inputs".into()))?;
        let mut out = Vec::new();
        self.process(0, &left, &mut out)?;
        self.process(1, &right, &mut out)?;
        self.emit(out)
    }
}

/// A bucket as checkpoints and the warm tier hold it: each row with its weight and degree.
fn encode_bucket(bucket: &Bucket) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(bucket.len() as u64);
    for (row, entry) in bucket.iter() {
        w.bytes(row).i64(entry.weight).i64(entry.degree);
    }
    w.finish()
}

fn decode_bucket(value: &[u8]) -> Result<Bucket> {
    let mut r = Reader::new(value);
    let mut bucket = Bucket::default();
    for _ in 0..r.u64()? {
        let row: Box<[u8]> = r.bytes()?.into();
        let weight = r.i64()?;
        let degree = r.i64()?;
        bucket.insert(row, Entry { weight, degree });
    }
    Ok(bucket)
}

/// The bytes a bucket accounts for in the join's state figure.
fn bucket_size(key: &[u8], bucket: &Bucket) -> i64 {
    key.len() as i64
        + BUCKET_OVERHEAD
        + rows_overhead(bucket.len())
        + bucket.iter().map(|(row, _)| row.len() as i64).sum::<i64>()
}

fn take_columns(batch: &RecordBatch, indices: impl Iterator<Item = u32>) -> Result<Vec<ArrayRef>> {
    let indices = UInt32Array::from(indices.collect::<Vec<_>>());
    batch
        .columns()
        .iter()
        .map(|c| Ok(take(c.as_ref(), &indices, None)?))
        .collect()
}

fn null_row(codec: &RowCodec) -> Result<Box<[u8]>> {
    let columns: Vec<ArrayRef> = codec
        .types()
        .iter()
        .map(|t| datafusion::arrow::array::new_null_array(t, 1))
        .collect();
    Ok(codec.encode(&columns, 1)?.row(0).into())
}
