//! One materialized view as the coordinator holds it: its pipeline, contents, status, feed
//! and figures, and the changes of an epoch that reach it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use millrace_planner::pipeline::{Pipeline, PipelineStats};
use millrace_planner::view_table::{MaterializedView, ViewStatus};
use millrace_planner::{Changelog, EpochPart};
use millrace_storage::{StateTier, ViewContents};
use tokio::sync::{broadcast, oneshot};
use tracing::warn;

use crate::coordinator::feed::{EpochDelta, FEED_CAPACITY};
use crate::error::{Result, ServerError};
use millrace_storage::error::LockResultExt;

/// Changes of one epoch, by source id (table or view): the parts in the order they apply
/// (kept apart: concatenating a large UPDATE's deleted and inserted rows copied them all;
/// deleted rows stay where the table stores them until a view step reads them).
pub type EpochChanges = HashMap<u64, Vec<EpochPart>>;

/// Progress of a view's backfill.
#[derive(Debug, Clone, Default)]
pub struct Backfill {
    /// Source rows pushed through the pipeline so far.
    pub rows_done: u64,
    /// Source rows the backfill reads in total.
    pub rows_total: u64,
    /// When it started.
    pub started: Option<Instant>,
    /// When it finished.
    pub finished: Option<Instant>,
}

/// Figures of the last epoch a view processed.
#[derive(Debug, Clone, Default)]
pub struct EpochFigures {
    /// The epoch.
    pub epoch: u64,
    /// Source rows the pipeline consumed in it.
    pub rows_in: u64,
    /// State entries the pipeline read in it.
    pub state_reads: u64,
    /// Changed output rows.
    pub rows_out: u64,
}

/// One materialized view as the coordinator holds it.
#[derive(Debug)]
pub struct ViewEntry {
    /// Catalog id.
    pub id: u64,
    /// The provider SELECTs read (contents and status).
    pub provider: Arc<MaterializedView>,
    /// Ids of the tables and views it reads.
    pub sources: Vec<u64>,
    /// The incremental plan, as EXPLAIN prints it.
    pub plan: Vec<String>,
    /// The running operators (None once failed or dropped).
    pub pipeline: tokio::sync::Mutex<Option<Pipeline>>,
    /// The warm tier the current pipeline evicts operator state to (the cache manager asks
    /// for evictions through it without waiting for the pipeline).
    pub tier: Mutex<Option<Arc<StateTier>>>,
    /// Inputs that arrived while backfilling, replayed when it ends.
    pub(crate) pending: Mutex<Vec<EpochChanges>>,
    /// Backfill progress.
    pub backfill: Mutex<Backfill>,
    /// Last processed epoch's figures.
    pub last_epoch: Mutex<EpochFigures>,
    /// Time of the last change to the contents.
    pub last_change: Mutex<Option<SystemTime>>,
    /// Pipeline figures after the last epoch.
    pub stats: Mutex<PipelineStats>,
    /// Told when the backfill has caught up (or failed).
    pub(crate) ready: Mutex<Option<oneshot::Sender<()>>>,
    /// Each published epoch's delta, for SUBSCRIBE (`subscribe.rs`).
    pub feed: broadcast::Sender<Arc<EpochDelta>>,
    /// Failures since the view last processed an epoch after a restart.
    pub failures_in_a_row: AtomicU32,
    /// Restarts since the server started.
    pub restarts: AtomicU32,
    /// While rebuilding after a failure: the new contents being computed beside the old.
    pub(crate) rebuild: Mutex<Option<ViewContents>>,
    /// After a rebuild: the old contents' change into the new, published with the next epoch.
    pub(crate) carried: Mutex<Option<Changelog>>,
    /// Whether the next checkpoint must write this view's state in full (a new or rebuilt
    /// pipeline, or a checkpoint that failed to commit).
    pub checkpoint_fresh: AtomicBool,
    /// Whether changes of this pipeline were drained but never written (a failed
    /// checkpoint): it is left out of checkpoints until it is rebuilt.
    pub checkpoint_lost: AtomicBool,
    /// Whether the view loads its state from the last checkpoint on start (else it is
    /// rebuilt from its inputs).
    pub restore_pending: AtomicBool,
}

impl ViewEntry {
    /// A view about to be backfilled.
    pub fn new(
        provider: Arc<MaterializedView>,
        sources: Vec<u64>,
        plan: Vec<String>,
        pipeline: Pipeline,
    ) -> (Arc<Self>, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let entry = Arc::new(Self {
            id: provider.id,
            provider,
            sources,
            plan,
            tier: Mutex::new(pipeline.tier().cloned()),
            pipeline: tokio::sync::Mutex::new(Some(pipeline)),
            pending: Mutex::new(Vec::new()),
            backfill: Mutex::new(Backfill::default()),
            last_epoch: Mutex::new(EpochFigures::default()),
            last_change: Mutex::new(None),
            stats: Mutex::new(PipelineStats::default()),
            ready: Mutex::new(Some(tx)),
            feed: broadcast::channel(FEED_CAPACITY).0,
            failures_in_a_row: AtomicU32::new(0),
            restarts: AtomicU32::new(0),
            rebuild: Mutex::new(None),
            carried: Mutex::new(None),
            checkpoint_fresh: AtomicBool::new(true),
            checkpoint_lost: AtomicBool::new(false),
            restore_pending: AtomicBool::new(false),
        });
        (entry, rx)
    }

    /// Starts rebuilding a failed view with a fresh `pipeline`: new contents are computed
    /// beside the old ones (which stay until the rebuilt view is published), and inputs
    /// queue up from now on. The returned receiver is told when the backfill has caught up.
    pub fn begin_rebuild(&self, pipeline: Pipeline) -> Result<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        let contents = ViewContents::try_new(self.provider.schema.clone())?;
        if let Ok(mut r) = self.rebuild.lock() {
            *r = Some(contents);
        }
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
        if let Ok(mut b) = self.backfill.lock() {
            *b = Backfill::default();
        }
        if let Ok(mut ready) = self.ready.lock() {
            *ready = Some(tx);
        }
        if let Ok(mut tier) = self.tier.lock() {
            *tier = pipeline.tier().cloned();
        }
        if let Ok(mut p) = self.pipeline.try_lock() {
            *p = Some(pipeline);
        } else {
            return Err(ServerError::Internal("view pipeline busy".into()));
        }
        self.checkpoint_fresh.store(true, Ordering::SeqCst);
        self.checkpoint_lost.store(false, Ordering::SeqCst);
        self.set_status(ViewStatus::Backfilling);
        Ok(rx)
    }

    /// Whether the view is being rebuilt after a failure (rather than built at CREATE or
    /// start-up).
    pub fn is_rebuilding(&self) -> bool {
        self.rebuild.lock().map(|r| r.is_some()).unwrap_or(false)
    }

    /// Whether a rebuilt view waits for an epoch to publish its change.
    pub fn has_carried_change(&self) -> bool {
        self.carried.lock().map(|c| c.is_some()).unwrap_or(false)
    }

    /// Current status.
    pub fn status(&self) -> ViewStatus {
        self.provider.status()
    }

    /// Sets the status.
    pub fn set_status(&self, status: ViewStatus) {
        if let Ok(mut s) = self.provider.status.write() {
            *s = status;
        }
    }

    /// Marks the view failed with `reason` and stops its pipeline.
    pub async fn fail(&self, reason: String) {
        warn!(view = %self.provider.name, %reason, "materialized view failed");
        self.set_status(ViewStatus::Failed(reason));
        *self.pipeline.lock().await = None;
        self.signal_ready();
    }

    pub(crate) fn signal_ready(&self) {
        if let Ok(mut ready) = self.ready.lock()
            && let Some(tx) = ready.take()
        {
            let _ = tx.send(());
        }
    }

    /// Applies an output change to the stored contents.
    pub(crate) fn apply(&self, change: &Changelog) -> Result<()> {
        if change.is_empty() {
            return Ok(());
        }
        if let Ok(mut rebuild) = self.rebuild.lock()
            && let Some(contents) = rebuild.as_mut()
        {
            contents.apply(&change.batch, &change.weights)?;
            return Ok(());
        }
        let mut contents = self
            .provider
            .contents
            .write()
            .or_poisoned("view contents")?;
        contents.apply(&change.batch, &change.weights)?;
        if let Ok(mut t) = self.last_change.lock() {
            *t = Some(SystemTime::now());
        }
        Ok(())
    }

    /// The inputs of this view within an epoch's changes.
    pub(crate) fn inputs_of(&self, changes: &EpochChanges) -> EpochChanges {
        changes
            .iter()
            .filter(|(id, parts)| self.sources.contains(id) && parts.iter().any(|c| !c.is_empty()))
            .map(|(id, c)| (*id, c.clone()))
            .collect()
    }

    pub(crate) async fn record_stats(&self, epoch: u64, before: &PipelineStats) {
        let guard = self.pipeline.lock().await;
        let Some(pipeline) = guard.as_ref() else {
            return;
        };
        let now = pipeline.stats();
        if let Ok(mut last) = self.last_epoch.lock() {
            *last = EpochFigures {
                epoch,
                rows_in: now.rows_in - before.rows_in,
                state_reads: now.state.counters.reads - before.state.counters.reads,
                rows_out: now.rows_out - before.rows_out,
            };
        }
        if let Ok(mut s) = self.stats.lock() {
            *s = now;
        }
    }
}
