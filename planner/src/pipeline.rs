//! A running incremental plan: the operators of one materialized view, with every keyed
//! operator split into hash partitions that run as tokio tasks.
//!
//! Each epoch the view runtime hands the pipeline the changelogs of its sources; changes
//! flow leaves-first. Before a partitioned operator, rows are routed by the hash of their
//! key to the instance that owns the key, over bounded channels (a busy instance makes the
//! next epoch wait instead of buffering); the instances' outputs are concatenated. Results
//! do not depend on the number of workers, since a key's state lives in one instance.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::physical_plan::PhysicalExpr;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use crate::changelog::Changelog;
use crate::error::{PlanError, Result};
use crate::incremental::PlanNode;
use crate::ops::{Operator, StateControl, StateEntry, StateStats, evaluate};
use millrace_storage::StateTier;

mod bounded;

/// Jobs a partition instance may have queued before the router waits.
const WORKER_QUEUE: usize = 2;

/// What a pipeline has done, for `millrace_views`.
#[derive(Debug, Default, Clone)]
pub struct PipelineStats {
    /// Source rows consumed.
    pub rows_in: u64,
    /// Output rows produced.
    pub rows_out: u64,
    /// State held and touched, over all operators and partitions.
    pub state: StateStats,
    /// Rows routed to each worker, summed over partitioned operators.
    pub worker_rows: Vec<u64>,
}

type Reply = Result<(Changelog, StateStats)>;

/// Work for one partition instance of an operator.
enum Job {
    Step {
        inputs: Vec<Changelog>,
        reply: oneshot::Sender<Reply>,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<Option<Vec<StateEntry>>>>,
    },
    Restore {
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        reply: oneshot::Sender<Result<()>>,
    },
    Control {
        control: StateControl,
        reply: oneshot::Sender<Result<(u64, StateStats)>>,
    },
}

/// One changed state entry of a pipeline: operator (numbered in plan order), partition,
/// key, and the encoded entry (None: removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointEntry {
    pub op: u32,
    pub partition: u32,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Restored state by (operator, partition): every live key with its entry.
pub type RestoreEntries = HashMap<(u32, u32), Vec<(Vec<u8>, Vec<u8>)>>;

struct Worker {
    jobs: mpsc::Sender<Job>,
    rows: u64,
    state: StateStats,
}

enum Stage {
    Source {
        id: u64,
        schema: SchemaRef,
    },
    Inline {
        op: Box<dyn Operator>,
        inputs: Vec<Stage>,
        /// Rows fed to a keyed operator run inline (one worker), for `worker_rows`.
        keyed_rows: Option<u64>,
    },
    Parallel {
        keys: Vec<Vec<Arc<dyn PhysicalExpr>>>,
        key_converter: Option<(RowConverter, Vec<DataType>)>,
        workers: Vec<Worker>,
        inputs: Vec<Stage>,
        schema: SchemaRef,
        started: bool,
    },
}

/// One view's running operators.
pub struct Pipeline {
    root: Stage,
    workers: usize,
    rows_in: u64,
    rows_out: u64,
    /// Where operator state is evicted to, when the view has a durable home.
    tier: Option<Arc<StateTier>>,
    /// The plan's fingerprint (`PlanNode::layout`), recorded with checkpoints.
    layout: u64,
    /// Per source, how many bytes the state in memory grew per input byte in the source's
    /// last measured step (see [`Pipeline::step_budget`]).
    growth_per_byte: HashMap<u64, f64>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("workers", &self.workers)
            .finish()
    }
}

impl Pipeline {
    /// Starts a plan with keyed operators split across `workers` tasks, their state
    /// evictable to `tier`. Must run inside a tokio runtime.
    pub fn start(plan: PlanNode, workers: usize, tier: Option<Arc<StateTier>>) -> Result<Self> {
        let workers = workers.max(1);
        let mut next_op = 0;
        let layout = plan.layout();
        Ok(Self {
            root: stage(plan, workers, &mut next_op, tier.as_ref())?,
            workers,
            rows_in: 0,
            rows_out: 0,
            tier,
            layout,
            growth_per_byte: HashMap::new(),
        })
    }

    /// The fingerprint of the plan this pipeline runs (see `PlanNode::layout`).
    pub fn layout(&self) -> u64 {
        self.layout
    }

    /// The warm tier the pipeline's state is evicted to.
    pub fn tier(&self) -> Option<&Arc<StateTier>> {
        self.tier.as_ref()
    }

    /// Sends `control` to every operator instance; returns per operator (numbered in plan
    /// order) what its instances answered, summed.
    async fn control(&mut self, control: StateControl) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::new();
        let mut next_op = 0u32;
        std::panic::AssertUnwindSafe(control_stage(
            &mut self.root,
            &mut next_op,
            control,
            &mut out,
        ))
        .catch_unwind()
        .await
        .map_err(|p| PlanError::Internal(format!("operator panicked: {}", panic_message(&p))))??;
        Ok(out)
    }

    /// Makes every operator that can continue the checkpoint in the warm tier lazily;
    /// returns the operators that must be restored eagerly with [`Pipeline::restore`].
    pub async fn restore_lazily(&mut self) -> Result<Vec<u32>> {
        // NOTE: without a tier no store is attached, so every operator answers "eager".
        let answers = self.control(StateControl::RestoreLazily).await?;
        let mut eager: Vec<u32> = Vec::new();
        for (op, lazy) in answers {
            if lazy == 0 && !eager.contains(&op) {
                eager.push(op);
            }
        }
        Ok(eager)
    }

    /// The checkpoint that last took the operators' changed state committed.
    pub async fn committed(&mut self) -> Result<()> {
        self.control(StateControl::Committed).await.map(|_| ())
    }

    /// Evicts `fraction` of every operator's state in memory; returns the bytes freed. A
    /// failed eviction keeps the state in memory and is counted in the tier.
    pub async fn evict(&mut self, fraction: f64) -> u64 {
        match self.control(StateControl::Evict(fraction)).await {
            Ok(freed) => {
                self.publish_held();
                freed.iter().map(|(_, b)| b).sum()
            }
            Err(e) => {
                tracing::warn!(error = %e, "evicting operator state failed; it stays in memory");
                if let Some(tier) = &self.tier {
                    tier.record_failure(e.to_string());
                }
                0
            }
        }
    }

    /// Writes every operator's state changed since the last checkpoint to the warm tier
    /// ahead of a checkpoint, where an operator partition holds at least `min_entries`
    /// changed entries; returns the entries written.
    pub async fn flush_changes(&mut self, min_entries: usize) -> Result<u64> {
        if self.tier.is_none() {
            return Ok(0);
        }
        let written = self
            .control(StateControl::FlushChanges(min_entries))
            .await?;
        Ok(written.iter().map(|(_, n)| n).sum())
    }

    /// Pushes one epoch's source changes through the pipeline and returns the view's change.
    pub async fn step(&mut self, sources: &HashMap<u64, Changelog>) -> Result<Changelog> {
        Ok(self.step_measured(sources, false).await?.0)
    }

    /// [`Pipeline::step`], also returning by how much the state held in memory grew during
    /// the step (before the eviction after it). With `every`, each partition instance of
    /// each operator steps, also those without input (to release held results).
    async fn step_measured(
        &mut self,
        sources: &HashMap<u64, Changelog>,
        every: bool,
    ) -> Result<(Changelog, i64)> {
        let before = self.stats().state.bytes;
        self.rows_in += sources.values().map(|c| c.len() as u64).sum::<u64>();
        // NOTE: an operator bug must fail this view, not the server.
        let out = std::panic::AssertUnwindSafe(run(&mut self.root, sources, every))
            .catch_unwind()
            .await
            .map_err(|p| PlanError::Internal(format!("operator panicked: {}", panic_message(&p))))??
            .consolidate()?;
        self.rows_out += out.len() as u64;
        let held = self.stats().state.bytes;
        let growth = held as i64 - before as i64;
        if let Some(tier) = self.tier.clone() {
            let cap = tier.cap();
            let over = (held > cap).then(|| 1.0 - 0.8 * cap as f64 / held as f64);
            if let Some(fraction) = tier
                .take_eviction()
                .into_iter()
                .chain(over)
                .reduce(f64::max)
            {
                self.evict(fraction).await;
            } else {
                tier.set_held(held);
            }
        }
        Ok((out, growth))
    }

    /// Tells the warm tier how much state the operators hold in memory now, for the cache
    /// manager (a large epoch takes many steps, and reads state back in each).
    fn publish_held(&self) {
        if let Some(tier) = &self.tier {
            tier.set_held(self.stats().state.bytes);
        }
    }

    /// Keyed operators are split over this many partitions.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The state every operator changed since the last call (all of it the first time),
    /// or None if some operator cannot be checkpointed. Call between steps.
    pub async fn checkpoint(&mut self) -> Result<Option<Vec<CheckpointEntry>>> {
        let mut entries = Vec::new();
        let mut supported = true;
        let mut next_op = 0u32;
        // NOTE: an operator bug must fail this checkpoint, not the server.
        std::panic::AssertUnwindSafe(checkpoint_stage(
            &mut self.root,
            &mut next_op,
            &mut entries,
            &mut supported,
        ))
        .catch_unwind()
        .await
        .map_err(|p| {
            PlanError::Internal(format!("checkpoint panicked: {}", panic_message(&p)))
        })??;
        Ok(supported.then_some(entries))
    }

    /// Loads checkpointed state into a freshly started pipeline (same plan, same number of
    /// workers), which then continues exactly as the checkpointed one would have.
    pub async fn restore(&mut self, mut entries: RestoreEntries) -> Result<()> {
        let mut next_op = 0u32;
        std::panic::AssertUnwindSafe(restore_stage(&mut self.root, &mut next_op, &mut entries))
            .catch_unwind()
            .await
            .map_err(|p| PlanError::Internal(format!("restore panicked: {}", panic_message(&p))))?
    }

    /// Figures for `millrace_views`.
    pub fn stats(&self) -> PipelineStats {
        let mut stats = PipelineStats {
            rows_in: self.rows_in,
            rows_out: self.rows_out,
            state: StateStats::default(),
            worker_rows: vec![0; self.workers],
        };
        collect_stats(&self.root, &mut stats);
        stats
    }
}

fn collect_stats(stage: &Stage, stats: &mut PipelineStats) {
    match stage {
        Stage::Source { .. } => {}
        Stage::Inline {
            op,
            inputs,
            keyed_rows,
        } => {
            stats.state.add(op.state());
            if let (Some(rows), Some(slot)) = (keyed_rows, stats.worker_rows.get_mut(0)) {
                *slot += *rows;
            }
            for input in inputs {
                collect_stats(input, stats);
            }
        }
        Stage::Parallel {
            workers, inputs, ..
        } => {
            for (i, w) in workers.iter().enumerate() {
                stats.state.add(w.state);
                if let Some(slot) = stats.worker_rows.get_mut(i) {
                    *slot += w.rows;
                }
            }
            for input in inputs {
                collect_stats(input, stats);
            }
        }
    }
}

fn checkpoint_stage<'a>(
    stage: &'a mut Stage,
    next_op: &'a mut u32,
    out: &'a mut Vec<CheckpointEntry>,
    supported: &'a mut bool,
) -> BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        let op_index = *next_op;
        match stage {
            Stage::Source { .. } => return Ok(()),
            Stage::Inline { op, inputs, .. } => {
                *next_op += 1;
                match op.checkpoint()? {
                    Some(entries) => {
                        out.extend(entries.into_iter().map(|(key, value)| CheckpointEntry {
                            op: op_index,
                            partition: 0,
                            key,
                            value,
                        }))
                    }
                    None => *supported = false,
                }
                for input in inputs {
                    checkpoint_stage(input, next_op, out, supported).await?;
                }
            }
            Stage::Parallel {
                workers, inputs, ..
            } => {
                *next_op += 1;
                for (partition, worker) in workers.iter().enumerate() {
                    let (reply, result) = oneshot::channel();
                    worker
                        .jobs
                        .send(Job::Checkpoint { reply })
                        .await
                        .map_err(|_| PlanError::Internal("a pipeline worker stopped".into()))?;
                    let entries = result
                        .await
                        .map_err(|_| PlanError::Internal("a pipeline worker stopped".into()))??;
                    match entries {
                        Some(entries) => {
                            out.extend(entries.into_iter().map(|(key, value)| CheckpointEntry {
                                op: op_index,
                                partition: partition as u32,
                                key,
                                value,
                            }))
                        }
                        None => *supported = false,
                    }
                }
                for input in inputs {
                    checkpoint_stage(input, next_op, out, supported).await?;
                }
            }
        }
        Ok(())
    })
}

fn control_stage<'a>(
    stage: &'a mut Stage,
    next_op: &'a mut u32,
    control: StateControl,
    out: &'a mut Vec<(u32, u64)>,
) -> BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        let op_index = *next_op;
        match stage {
            Stage::Source { .. } => return Ok(()),
            Stage::Inline { op, inputs, .. } => {
                *next_op += 1;
                out.push((op_index, op.control(control)?));
                for input in inputs {
                    control_stage(input, next_op, control, out).await?;
                }
            }
            Stage::Parallel {
                workers,
                inputs,
                started,
                ..
            } => {
                *next_op += 1;
                if control == StateControl::RestoreLazily {
                    *started = true;
                }
                let mut total = 0;
                let mut all = true;
                for worker in workers.iter_mut() {
                    let (reply, result) = oneshot::channel();
                    worker
                        .jobs
                        .send(Job::Control { control, reply })
                        .await
                        .map_err(|_| PlanError::Internal("a pipeline worker stopped".into()))?;
                    let (answer, state) = result
                        .await
                        .map_err(|_| PlanError::Internal("a pipeline worker stopped".into()))??;
                    worker.state = state;
                    total += answer;
                    all &= answer > 0;
                }
                if control == StateControl::RestoreLazily {
                    total = u64::from(all);
                }
                out.push((op_index, total));
                for input in inputs {
                    control_stage(input, next_op, control, out).await?;
                }
            }
        }
        Ok(())
    })
}

fn restore_stage<'a>(
    stage: &'a mut Stage,
    next_op: &'a mut u32,
    entries: &'a mut RestoreEntries,
) -> BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        let op_index = *next_op;
        match stage {
            Stage::Source { .. } => return Ok(()),
            Stage::Inline { op, inputs, .. } => {
                *next_op += 1;
                op.restore(entries.remove(&(op_index, 0)).unwrap_or_default())?;
                for input in inputs {
                    restore_stage(input, next_op, entries).await?;
                }
            }
            Stage::Parallel {
                workers,
                inputs,
                started,
                ..
            } => {
                *next_op += 1;
                *started = true;
                for (partition, worker) in workers.iter().enumerate() {
                    let (reply, result) = oneshot::channel();
                    let mine = entries
                        .remove(&(op_index, partition as u32))
                        .unwrap_or_default();
                    worker
                        .jobs
                        .send(Job::Restore {
                            entries: mine,
                            reply,
                        })
                        .await
                        .map_err(|_| PlanError::Internal("a pipeline worker stopped".into()))?;
                    result
                        .await
                        .map_err(|_| PlanError::Internal("a pipeline worker stopped".into()))??;
                }
                for input in inputs {
                    restore_stage(input, next_op, entries).await?;
                }
            }
        }
        Ok(())
    })
}

/// Builds the stage of `node`, numbering operators in plan order (as checkpoints do) and
/// attaching each instance to its place in `tier`.
fn stage(
    node: PlanNode,
    workers: usize,
    next_op: &mut u32,
    tier: Option<&Arc<StateTier>>,
) -> Result<Stage> {
    match node {
        PlanNode::Source { id, schema, .. } => Ok(Stage::Source { id, schema }),
        PlanNode::Operator {
            mut op,
            inputs,
            partitioning,
        } => {
            let op_index = *next_op;
            *next_op += 1;
            let inputs = inputs
                .into_iter()
                .map(|i| stage(i, workers, next_op, tier))
                .collect::<Result<Vec<_>>>()?;
            if let Some(tier) = tier {
                op.attach(&tier.location(op_index, 0));
            }
            let Some(partitioning) = partitioning else {
                return Ok(Stage::Inline {
                    op,
                    inputs,
                    keyed_rows: None,
                });
            };
            if workers == 1 {
                // NOTE: one worker needs no routing; running inline saves two task hops
                // per epoch (measured: a third of a single-row change's cost).
                return Ok(Stage::Inline {
                    op,
                    inputs,
                    keyed_rows: Some(0),
                });
            }
            let schema = op.schema();
            let mut handles = Vec::with_capacity(workers);
            for partition in 0..workers {
                let mut instance = (partitioning.factory)()?;
                if let Some(tier) = tier {
                    instance.attach(&tier.location(op_index, partition as u32));
                }
                let (tx, mut rx) = mpsc::channel::<Job>(WORKER_QUEUE);
                tokio::spawn(async move {
                    while let Some(job) = rx.recv().await {
                        match job {
                            Job::Step { inputs, reply } => {
                                let result =
                                    instance.step(inputs).map(|out| (out, instance.state()));
                                let _ = reply.send(result);
                            }
                            Job::Checkpoint { reply } => {
                                let _ = reply.send(instance.checkpoint());
                            }
                            Job::Restore { entries, reply } => {
                                let _ = reply.send(instance.restore(entries));
                            }
                            Job::Control { control, reply } => {
                                let result =
                                    instance.control(control).map(|n| (n, instance.state()));
                                let _ = reply.send(result);
                            }
                        }
                    }
                });
                handles.push(Worker {
                    jobs: tx,
                    rows: 0,
                    state: StateStats::default(),
                });
            }
            Ok(Stage::Parallel {
                keys: partitioning.keys,
                key_converter: None,
                workers: handles,
                inputs,
                schema,
                started: false,
            })
        }
    }
}

fn run<'a>(
    stage: &'a mut Stage,
    sources: &'a HashMap<u64, Changelog>,
    every: bool,
) -> BoxFuture<'a, Result<Changelog>> {
    Box::pin(async move {
        match stage {
            Stage::Source { id, schema } => Ok(match sources.get(id) {
                Some(c) => c.clone(),
                None => Changelog::empty(schema.clone()),
            }),
            Stage::Inline {
                op,
                inputs,
                keyed_rows,
            } => {
                let mut outs = Vec::with_capacity(inputs.len());
                for input in inputs.iter_mut() {
                    outs.push(run(input, sources, every).await?);
                }
                if let Some(rows) = keyed_rows {
                    *rows += outs.iter().map(|o| o.len() as u64).sum::<u64>();
                }
                op.step(outs)
            }
            Stage::Parallel {
                keys,
                key_converter,
                workers,
                inputs,
                schema,
                started,
            } => {
                let mut outs = Vec::with_capacity(inputs.len());
                for input in inputs.iter_mut() {
                    outs.push(run(input, sources, every).await?);
                }
                let n = workers.len();
                // per worker, per input: row indices
                let mut routed: Vec<Vec<Vec<u32>>> = vec![vec![Vec::new(); outs.len()]; n];
                for (j, out) in outs.iter().enumerate() {
                    if out.is_empty() {
                        continue;
                    }
                    let mut arrays = evaluate(&keys[j], &out.batch)?;
                    if key_converter.is_none() {
                        let types: Vec<DataType> =
                            arrays.iter().map(|a| a.data_type().clone()).collect();
                        *key_converter = Some((
                            RowConverter::new(
                                types.iter().map(|t| SortField::new(t.clone())).collect(),
                            )?,
                            types,
                        ));
                    }
                    let (converter, types) = key_converter
                        .as_ref()
                        .ok_or_else(|| PlanError::Internal("no key converter".into()))?;
                    for (array, want) in arrays.iter_mut().zip(types.iter()) {
                        if array.data_type() != want {
                            *array = cast(array, want)?;
                        }
                    }
                    let rows = converter.convert_columns(&arrays)?;
                    for i in 0..out.len() {
                        let mut hasher = std::collections::hash_map::DefaultHasher::new();
                        rows.row(i).data().hash(&mut hasher);
                        let w = (hasher.finish() % n as u64) as usize;
                        routed[w][j].push(i as u32);
                    }
                }
                let first = !*started;
                *started = true;
                let mut pending = Vec::with_capacity(n);
                for (w, per_input) in routed.into_iter().enumerate() {
                    if !first && !every && per_input.iter().all(|r| r.is_empty()) {
                        continue;
                    }
                    let mut parts = Vec::with_capacity(outs.len());
                    for (j, indices) in per_input.iter().enumerate() {
                        workers[w].rows += indices.len() as u64;
                        parts.push(if indices.is_empty() {
                            Changelog::empty(outs[j].schema())
                        } else {
                            outs[j].take(indices)?
                        });
                    }
                    let (reply, result) = oneshot::channel();
                    workers[w]
                        .jobs
                        .send(Job::Step {
                            inputs: parts,
                            reply,
                        })
                        .await
                        .map_err(|_| PlanError::Internal("a pipeline worker stopped".into()))?;
                    pending.push((w, result));
                }
                let mut results = Vec::with_capacity(pending.len());
                for (w, result) in pending {
                    let (out, state) = result
                        .await
                        .map_err(|_| PlanError::Internal("a pipeline worker stopped".into()))??;
                    workers[w].state = state;
                    results.push(out);
                }
                Changelog::concat(schema, results)
            }
        }
    })
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}
