//! The view runtime: drives every materialized view's pipeline epoch by epoch.
//!
//! Flow: a committed DML statement hands its changelogs (one per table, rows with weights)
//! to [`ViewRuntime::send_epoch`] while it still holds the write lock, so epochs are in commit
//! order. One coordinator task takes whatever epochs are queued (coalescing them under load:
//! the barrier between two batches is the point where all views are consistent), pushes the
//! changes through each running view in creation order (a view's output is the input of the
//! views built on it), and then publishes all views' changes at once under `read_lock`.
//! SELECTs hold `read_lock` shared while they snapshot views, so one query never sees two
//! views at different epochs. A session waits for the epoch of its own last write before it
//! reads ([`ViewRuntime::wait_published`]).
//!
//! A view whose pipeline fails is marked failed and skipped; the others go on. A view being
//! backfilled (see `backfill.rs`) is skipped too and its inputs are queued until it catches up.

pub mod backfill;
pub mod subscribe;
pub mod system;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use millrace_planner::Changelog;
use millrace_planner::pipeline::{Pipeline, PipelineStats};
use millrace_planner::view_table::{MaterializedView, ViewStatus};
use tokio::sync::{RwLock, broadcast, mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::error::{Result, ServerError};
use crate::runtime::subscribe::{EpochDelta, FEED_CAPACITY};

/// Epochs merged into one step at most.
const MAX_COALESCE: usize = 64;

/// Changes of one epoch, by source id (table or view).
pub type EpochChanges = HashMap<u64, Changelog>;

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

/// One materialized view as the runtime holds it.
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
    /// Inputs that arrived while backfilling, replayed when it ends.
    pending: Mutex<Vec<EpochChanges>>,
    /// Backfill progress.
    pub backfill: Mutex<Backfill>,
    /// Last processed epoch's figures.
    pub last_epoch: Mutex<EpochFigures>,
    /// Time of the last change to the contents.
    pub last_change: Mutex<Option<SystemTime>>,
    /// Pipeline figures after the last epoch.
    pub stats: Mutex<PipelineStats>,
    /// Told when the backfill has caught up (or failed).
    ready: Mutex<Option<oneshot::Sender<()>>>,
    /// Each published epoch's delta, for SUBSCRIBE (`subscribe.rs`).
    pub feed: broadcast::Sender<Arc<EpochDelta>>,
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
            pipeline: tokio::sync::Mutex::new(Some(pipeline)),
            pending: Mutex::new(Vec::new()),
            backfill: Mutex::new(Backfill::default()),
            last_epoch: Mutex::new(EpochFigures::default()),
            last_change: Mutex::new(None),
            stats: Mutex::new(PipelineStats::default()),
            ready: Mutex::new(Some(tx)),
            feed: broadcast::channel(FEED_CAPACITY).0,
        });
        (entry, rx)
    }

    /// Current status.
    pub fn status(&self) -> ViewStatus {
        self.provider.status()
    }

    fn set_status(&self, status: ViewStatus) {
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

    fn signal_ready(&self) {
        if let Ok(mut ready) = self.ready.lock()
            && let Some(tx) = ready.take()
        {
            let _ = tx.send(());
        }
    }

    /// Applies an output change to the stored contents.
    fn apply(&self, change: &Changelog) -> Result<()> {
        if change.is_empty() {
            return Ok(());
        }
        let mut contents = self
            .provider
            .contents
            .write()
            .map_err(|_| ServerError::Internal("view contents lock poisoned".into()))?;
        contents.apply(&change.batch, &change.weights)?;
        if let Ok(mut t) = self.last_change.lock() {
            *t = Some(SystemTime::now());
        }
        Ok(())
    }

    /// The inputs of this view within an epoch's changes.
    fn inputs_of(&self, changes: &EpochChanges) -> EpochChanges {
        changes
            .iter()
            .filter(|(id, c)| self.sources.contains(id) && !c.is_empty())
            .map(|(id, c)| (*id, c.clone()))
            .collect()
    }

    async fn record_stats(&self, epoch: u64, before: &PipelineStats) {
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

enum Command {
    Epoch(u64, EpochChanges),
    BackfillDone(Arc<ViewEntry>),
}

/// The registry of running views and the epoch coordinator's handle.
#[derive(Debug)]
pub struct ViewRuntime {
    commands: mpsc::Sender<Command>,
    commands_rx: Mutex<Option<mpsc::Receiver<Command>>>,
    /// Last epoch handed to the coordinator.
    committed: AtomicU64,
    /// Last epoch whose changes are visible in every running view.
    published: watch::Sender<u64>,
    /// Held shared by readers while they snapshot views, exclusively while publishing.
    pub read_lock: RwLock<()>,
    views: Mutex<BTreeMap<u64, Arc<ViewEntry>>>,
    /// Workers per keyed operator.
    pub workers: usize,
    /// Fault injection: microseconds each input row of a view step is held up
    /// (`SET millrace.slow_views_us_per_row`, tests of back-pressure only).
    pub slow_us_per_row: AtomicU64,
    /// Epochs merged into one step at most: [`MAX_COALESCE`], or the queue's capacity if
    /// smaller, so that what waits for the views stays within two queues' worth.
    coalesce: usize,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Epoch(e, _) => write!(f, "Epoch({e})"),
            Command::BackfillDone(v) => write!(f, "BackfillDone({})", v.id),
        }
    }
}

impl ViewRuntime {
    /// A runtime whose coordinator is started by [`ViewRuntime::start`]; at most
    /// `epoch_queue` committed epochs wait for it before committing writers block
    /// (back-pressure).
    pub fn new(workers: usize, epoch_queue: usize) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(epoch_queue.max(1));
        let (published, _) = watch::channel(0);
        Arc::new(Self {
            commands: tx,
            commands_rx: Mutex::new(Some(rx)),
            committed: AtomicU64::new(0),
            published,
            read_lock: RwLock::new(()),
            views: Mutex::new(BTreeMap::new()),
            workers: workers.max(1),
            slow_us_per_row: AtomicU64::new(0),
            coalesce: MAX_COALESCE.min(epoch_queue.max(1)),
        })
    }

    /// Starts the coordinator task (once).
    pub fn start(self: &Arc<Self>) {
        let rx = self.commands_rx.lock().ok().and_then(|mut r| r.take());
        if let Some(rx) = rx {
            let runtime = self.clone();
            tokio::spawn(async move { runtime.coordinate(rx).await });
        }
    }

    /// Whether any view reads source `id` (so DML on it needs a changelog).
    pub fn has_readers(&self, id: u64) -> bool {
        self.views
            .lock()
            .map(|v| v.values().any(|e| e.sources.contains(&id)))
            .unwrap_or(false)
    }

    /// The views, in creation order.
    pub fn views(&self) -> Vec<Arc<ViewEntry>> {
        self.views
            .lock()
            .map(|v| v.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The view with catalog id `id`.
    pub fn view(&self, id: u64) -> Option<Arc<ViewEntry>> {
        self.views.lock().ok().and_then(|v| v.get(&id).cloned())
    }

    /// Registers a view (backfilling). The caller holds the engine's write lock, so no
    /// epoch is in flight and every later epoch reaches the view's queue.
    pub fn register(&self, entry: Arc<ViewEntry>) {
        if let Ok(mut views) = self.views.lock() {
            views.insert(entry.id, entry);
        }
    }

    /// Forgets a dropped view; its pipeline's tasks end with it.
    pub fn deregister(&self, id: u64) {
        let entry = self.views.lock().ok().and_then(|mut v| v.remove(&id));
        if let Some(entry) = entry {
            entry.signal_ready();
            tokio::spawn(async move {
                *entry.pipeline.lock().await = None;
            });
        }
    }

    /// Last epoch handed to the coordinator.
    pub fn committed_epoch(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Last epoch visible in every running view.
    pub fn published_epoch(&self) -> u64 {
        *self.published.borrow()
    }

    /// Hands one commit's changes to the coordinator. Called under the engine's write lock
    /// (epochs are numbered in commit order); waits while the queue is full.
    pub fn send_epoch(&self, changes: EpochChanges) -> u64 {
        let epoch = self.committed.fetch_add(1, Ordering::SeqCst) + 1;
        let tx = self.commands.clone();
        let command = Command::Epoch(epoch, changes);
        let sent = match tx.try_send(command) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(command)) => {
                tokio::task::block_in_place(|| tx.blocking_send(command).is_ok())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        if !sent {
            warn!(epoch, "view coordinator stopped; epoch dropped");
            self.published.send_replace(epoch);
        }
        epoch
    }

    /// Waits until `epoch` is visible in every running view.
    pub async fn wait_published(&self, epoch: u64) {
        if self.published_epoch() >= epoch {
            return;
        }
        let mut rx = self.published.subscribe();
        let _ = rx.wait_for(|e| *e >= epoch).await;
    }

    async fn coordinate(self: Arc<Self>, mut rx: mpsc::Receiver<Command>) {
        info!(workers = self.workers, "view coordinator started");
        while let Some(first) = rx.recv().await {
            let mut commands = vec![first];
            while commands.len() < self.coalesce {
                match rx.try_recv() {
                    Ok(c) => commands.push(c),
                    Err(_) => break,
                }
            }
            let mut epoch = None;
            let mut merged: HashMap<u64, Vec<Changelog>> = HashMap::new();
            let mut done = Vec::new();
            for command in commands {
                match command {
                    Command::Epoch(e, changes) => {
                        epoch = Some(e);
                        for (id, c) in changes {
                            merged.entry(id).or_default().push(c);
                        }
                    }
                    Command::BackfillDone(view) => done.push(view),
                }
            }
            if let Some(epoch) = epoch {
                let mut changes = EpochChanges::new();
                for (id, parts) in merged {
                    let Some(schema) = parts.first().map(|p| p.schema()) else {
                        continue;
                    };
                    match Changelog::concat(&schema, parts) {
                        Ok(c) => {
                            changes.insert(id, c);
                        }
                        Err(e) => warn!(source = id, error = %e, "cannot merge epoch changes"),
                    }
                }
                self.process_epoch(epoch, changes).await;
            }
            for view in done {
                self.finish_backfill(view).await;
            }
        }
    }

    async fn process_epoch(&self, epoch: u64, mut changes: EpochChanges) {
        let mut staged: Vec<(Arc<ViewEntry>, Changelog)> = Vec::new();
        for view in self.views() {
            match view.status() {
                ViewStatus::Failed(_) => continue,
                ViewStatus::Backfilling => {
                    let inputs = view.inputs_of(&changes);
                    if !inputs.is_empty()
                        && let Ok(mut pending) = view.pending.lock()
                    {
                        pending.push(inputs);
                    }
                    continue;
                }
                ViewStatus::Running => {}
            }
            let inputs = view.inputs_of(&changes);
            if inputs.is_empty() {
                continue;
            }
            let slow = self.slow_us_per_row.load(Ordering::Relaxed);
            if slow > 0 {
                let rows: usize = inputs.values().map(|c| c.len()).sum();
                tokio::time::sleep(std::time::Duration::from_micros(slow * rows as u64)).await;
            }
            let before = view.stats.lock().map(|s| s.clone()).unwrap_or_default();
            let result = {
                let mut guard = view.pipeline.lock().await;
                match guard.as_mut() {
                    Some(p) => p.step(&inputs).await,
                    None => continue,
                }
            };
            match result {
                Ok(out) => {
                    view.record_stats(epoch, &before).await;
                    changes.insert(view.id, out.clone());
                    staged.push((view, out));
                }
                Err(e) => view.fail(e.to_string()).await,
            }
        }
        let _guard = self.read_lock.write().await;
        for (view, out) in staged {
            if let Err(e) = view.apply(&out) {
                view.fail(e.to_string()).await;
                continue;
            }
            // NOTE: sending fails only when nobody subscribes, which is fine.
            if view.feed.receiver_count() > 0 && !out.is_empty() {
                let _ = view.feed.send(Arc::new(EpochDelta::new(epoch, out)));
            }
        }
        self.published.send_replace(epoch);
    }

    /// Replays the epochs a view missed while backfilling, then lets it run.
    async fn finish_backfill(&self, view: Arc<ViewEntry>) {
        if view.status() != ViewStatus::Backfilling {
            view.signal_ready();
            return;
        }
        let pending = view
            .pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        let queued = pending.len();
        for inputs in pending {
            let result = {
                let mut guard = view.pipeline.lock().await;
                match guard.as_mut() {
                    Some(p) => p.step(&inputs).await,
                    None => return,
                }
            };
            match result.map_err(ServerError::from).and_then(|out| {
                view.apply(&out)?;
                Ok(())
            }) {
                Ok(()) => {}
                Err(e) => {
                    view.fail(e.to_string()).await;
                    return;
                }
            }
        }
        view.record_stats(self.published_epoch(), &PipelineStats::default())
            .await;
        view.set_status(ViewStatus::Running);
        info!(view = %view.provider.name, caught_up_epochs = queued, "materialized view running");
        view.signal_ready();
    }

    /// Tells the coordinator a backfill has pushed its snapshot through.
    async fn backfill_done(&self, view: Arc<ViewEntry>) {
        let _ = self.commands.send(Command::BackfillDone(view)).await;
    }
}
