//! The incremental operator library: each operator consumes one epoch's changelog on each of
//! its inputs and returns the changelog of its output (DBSP-style, Z-set weights).
//!
//! Operators are pure: no I/O, no clocks. Stateful ones (aggregate, join, TopN, window) keep
//! their state in a [`millrace_storage::StateStore`]. The compiler (`incremental.rs`) builds
//! them from a DataFusion `LogicalPlan`; the pipeline (`pipeline.rs`) runs them, several
//! hash-partitioned instances at a time.

pub mod aggregate;
pub mod bucket;
pub mod codec;
pub mod filter;
mod held;
pub mod join;
pub mod project;
pub mod topn;
pub mod union;
pub mod unnest;
pub mod values;
pub mod window;

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::physical_plan::PhysicalExpr;
use millrace_storage::{StateCounters, StateLocation};

use crate::changelog::Changelog;
use crate::error::{PlanError, Result};

/// What an operator holds and has read, for `millrace_views`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StateStats {
    /// Entries (groups, keys, rows) held.
    pub entries: u64,
    /// Approximate bytes of the state held in memory.
    pub bytes: u64,
    /// Approximate bytes of the state evicted to the warm tier (as they counted in memory)
    /// since the pipeline started.
    pub spilled_bytes: u64,
    /// Reads and writes since the operator was built.
    pub counters: StateCounters,
}

impl StateStats {
    /// Adds another operator's figures to these.
    pub fn add(&mut self, other: StateStats) {
        self.entries += other.entries;
        self.bytes += other.bytes;
        self.spilled_bytes += other.spilled_bytes;
        self.counters.reads += other.counters.reads;
        self.counters.writes += other.counters.writes;
        self.counters.evicted += other.counters.evicted;
        self.counters.fetched += other.counters.fetched;
    }
}

/// One incremental operator.
pub trait Operator: Send + std::fmt::Debug {
    /// One line describing the operator, for EXPLAIN.
    fn describe(&self) -> String;
    /// Schema of the output changelog.
    fn schema(&self) -> SchemaRef;
    /// Consumes one epoch's changes, one changelog per input in input order, and returns
    /// the change to the output. The first call of a pipeline may carry empty inputs: it
    /// lets constant relations and global aggregates emit their initial rows.
    fn step(&mut self, inputs: Vec<Changelog>) -> Result<Changelog>;
    /// State held and touched.
    fn state(&self) -> StateStats {
        StateStats::default()
    }
    /// The state changed since the last call, for a checkpoint: each changed key with its
    /// encoded entry, or None where the entry was removed. `Ok(None)` means the operator
    /// cannot be checkpointed, and its view is rebuilt from its inputs after a restart.
    fn checkpoint(&mut self) -> Result<Option<Vec<StateEntry>>> {
        Ok(None)
    }
    /// Loads what [`Operator::checkpoint`] wrote (the latest entry of every live key) into
    /// a fresh operator that has not stepped, which then behaves as the checkpointed one.
    fn restore(&mut self, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        let _ = entries;
        Err(PlanError::Internal(format!(
            "{} cannot be restored from a checkpoint",
            self.describe()
        )))
    }
    /// Gives the operator its place in its view's warm tier (called once, before the first
    /// step). An operator whose state can be evicted keeps it.
    fn attach(&mut self, location: &StateLocation) {
        let _ = location;
    }
    /// Handles a [`StateControl`]; returns the bytes freed by an eviction, and for
    /// `RestoreLazily` 1 if the operator continues its checkpoint lazily (0: restore it
    /// eagerly with [`Operator::restore`]).
    fn control(&mut self, control: StateControl) -> Result<u64> {
        let _ = control;
        Ok(0)
    }
}

/// What a pipeline asks of every operator instance between epochs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StateControl {
    /// Continue the checkpoint in the warm tier, reading entries as they are used.
    RestoreLazily,
    /// Evict this fraction of the state held in memory.
    Evict(f64),
    /// The last checkpoint committed.
    Committed,
    /// Write the entries changed since the last checkpoint to the warm tier ahead of the
    /// checkpoint when there are at least this many (so that the checkpoint's own write
    /// stays small).
    FlushChanges(usize),
    /// A large epoch begins, in many steps: an operator whose output for a key costs as
    /// much as the key's whole state (string_agg, array_agg) holds back the keys' new
    /// results instead of emitting them after every step.
    Hold,
    /// The epoch's input is all in: the next steps emit the held results, each step those
    /// of keys holding about this many bytes of state (at least one key).
    Release(usize),
    /// How many keys' results are still held (answer).
    Held,
}

/// A changed state entry: key, and the encoded entry (None: removed).
pub type StateEntry = (Vec<u8>, Option<Vec<u8>>);

/// Implements checkpoint and restore for an operator without state.
#[macro_export]
macro_rules! stateless_checkpoint {
    () => {
        fn checkpoint(&mut self) -> $crate::error::Result<Option<Vec<$crate::ops::StateEntry>>> {
            Ok(Some(Vec::new()))
        }
        fn restore(&mut self, _entries: Vec<(Vec<u8>, Vec<u8>)>) -> $crate::error::Result<()> {
            Ok(())
        }
    };
}

/// Evaluates physical expressions over a batch into arrays of its length.
pub fn evaluate(exprs: &[Arc<dyn PhysicalExpr>], batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
    exprs
        .iter()
        .map(|e| Ok(e.evaluate(batch)?.into_array(batch.num_rows())?))
        .collect()
}

/// Evaluates a predicate into a mask where NULL counts as false.
pub fn evaluate_predicate(
    expr: &Arc<dyn PhysicalExpr>,
    batch: &RecordBatch,
) -> Result<BooleanArray> {
    let value = expr.evaluate(batch)?.into_array(batch.num_rows())?;
    let mask = value
        .as_any()
        .downcast_ref::<BooleanArray>()
        .ok_or_else(|| PlanError::Internal(format!("predicate returned {}", value.data_type())))?;
    if mask.null_count() == 0 {
        return Ok(mask.clone());
    }
    Ok(mask.iter().map(|v| Some(v.unwrap_or(false))).collect())
}

/// The input at `index`, or an error naming the operator.
pub fn single_input(mut inputs: Vec<Changelog>, what: &str) -> Result<Changelog> {
    if inputs.len() != 1 {
        return Err(PlanError::Internal(format!(
            "{what} expects one input, got {}",
            inputs.len()
        )));
    }
    inputs
        .pop()
        .ok_or_else(|| PlanError::Internal(format!("{what} has no input")))
}
