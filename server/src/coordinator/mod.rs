//! The epoch coordinator: drives every materialized view's pipeline epoch by epoch.
//!
//! Flow: a committed DML statement hands its changelogs (one per table, rows with weights)
//! to [`Coordinator::send_epoch`] while it still holds the write lock, so epochs are in commit
//! order. One coordinator task takes whatever epochs are queued (coalescing them under load:
//! the barrier between two batches is the point where all views are consistent), pushes the
//! changes through each running view in creation order (a view's output is the input of the
//! views built on it), and then publishes all views' changes at once under `read_lock`.
//! SELECTs hold `read_lock` shared while they snapshot views, so one query never sees two
//! views at different epochs. A session waits for the epoch of its own last write before it
//! reads ([`Coordinator::wait_published`]).
//!
//! A view whose pipeline fails (an operator error or panic) is not lost: its pipeline is
//! dropped, the view turns `recovering`, and the supervisor (`supervisor.rs`) rebuilds it from
//! snapshots of its inputs with backoff; the difference between the old and the rebuilt
//! contents goes out as the view's change of the next epoch, so views built on it, SUBSCRIBE
//! and sinks see exactly the changes they missed. After `max_restarts` failures in a row the
//! view is marked failed. Meanwhile the other views go on. A view being backfilled (see
//! `backfill.rs`) is skipped too and its inputs are queued until it catches up. Failures,
//! restarts and their outcome are listed in `millrace_events` (`events.rs`).

pub mod backlog;
pub mod checkpoint;
pub mod entry;
pub mod events;
pub mod feed;
pub mod manifest;
pub mod subscribe;
pub mod system;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use datafusion::execution::disk_manager::DiskManager;
use millrace_planner::pipeline::PipelineStats;
use millrace_planner::spilled_change::ViewChange;
use millrace_planner::view_table::ViewStatus;
use millrace_planner::{Changelog, EpochPart};
use millrace_storage::{Store, ViewContents};
use tokio::sync::{RwLock, mpsc, watch};
use tracing::{info, warn};

use crate::coordinator::entry::{EpochChanges, ViewEntry};
use crate::coordinator::events::EventLog;
use crate::coordinator::feed::EpochDelta;
use crate::coordinator::manifest::{Barrier, Checkpoints};
use crate::error::Result;
use millrace_storage::error::LockResultExt;

/// Epochs merged into one step at most.
const MAX_COALESCE: usize = 64;

/// The first epoch after a restart: the table changes committed after the last checkpoint,
/// which the views restored from it process before anything else.
#[derive(Debug, Clone, Copy)]
pub struct CatchUp {
    pub epoch: u64,
    /// Changed rows in it.
    pub rows: usize,
    /// The checkpoint's epoch (of the previous run).
    pub checkpoint_epoch: u64,
}

enum Command {
    /// An epoch's changes and the bytes they hold (released from the backlog when done).
    Epoch(u64, EpochChanges, u64),
    BackfillDone(Arc<ViewEntry>),
    Checkpoint(Barrier),
}

/// A view's rows changed since its last checkpoint are written ahead of it past this many
/// times the step size (see [`Coordinator::flush_changed_rows`]).
const DIRTY_STEPS: usize = 8;

/// The registry of running views and the epoch coordinator's handle.
#[derive(Debug)]
pub struct Coordinator {
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
    /// Bytes of changes waiting for the coordinator, bounded under a memory limit.
    backlog: backlog::Backlog,
    /// Input bytes one pipeline step takes at most; a larger epoch goes through a view in
    /// several steps (`Pipeline::step_bounded`).
    step_bytes: usize,
    /// Where a view's change too large to hold goes until it is published (the queries'
    /// temporary files).
    disk: Arc<DiskManager>,
    /// Failures in a row after which a view is marked failed instead of restarted.
    pub max_restarts: u32,
    /// Failures, restarts and recovery, for `millrace_events`.
    pub events: Arc<EventLog>,
    /// Ids of failed views, for the supervisor to restart.
    failed: mpsc::UnboundedSender<u64>,
    failed_rx: Mutex<Option<mpsc::UnboundedReceiver<u64>>>,
    /// Fault injection: the next n steps of a view (by name) fail
    /// (`SET millrace.fail_view_steps = 'view:n'`, tests of recovery only).
    fail_steps: Mutex<HashMap<String, u32>>,
    /// Where checkpoints are written.
    store: Arc<Store>,
    /// The first epoch after a restart: the changes since the checkpoint.
    catch_up: Mutex<Option<CatchUp>>,
    /// See [`Coordinator::read_floor`].
    read_floor: AtomicU64,
    /// Checkpoints taken, for `millrace_checkpoints`.
    pub checkpoints: Checkpoints,
    /// See [`Coordinator::set_room`].
    room: std::sync::OnceLock<RoomHook>,
}

/// Makes room in the cache for bytes about to be added to a view's contents; true when it
/// did (the cache manager's `make_room`, set by the engine).
pub struct RoomHook(Box<dyn Fn(u64) -> bool + Send + Sync>);

impl std::fmt::Debug for RoomHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoomHook")
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Epoch(e, _, _) => write!(f, "Epoch({e})"),
            Command::BackfillDone(v) => write!(f, "BackfillDone({})", v.id),
            Command::Checkpoint(b) => write!(f, "Checkpoint({})", b.log_seq),
        }
    }
}

impl Coordinator {
    /// A coordinator whose task is started by [`Coordinator::start`]; at most
    /// `epoch_queue` committed epochs wait for it before committing writers block
    /// (back-pressure).
    pub fn new(
        workers: usize,
        epoch_queue: usize,
        max_restarts: u32,
        store: Arc<Store>,
        max_backlog_bytes: Option<u64>,
        step_bytes: Option<u64>,
        disk: Arc<DiskManager>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(epoch_queue.max(1));
        let (published, _) = watch::channel(0);
        let (failed, failed_rx) = mpsc::unbounded_channel();
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
            backlog: backlog::Backlog::new(max_backlog_bytes),
            // NOTE: by default a step takes what the coordinator merges at most.
            step_bytes: step_bytes
                .or(max_backlog_bytes.map(|b| b / 2))
                .map_or(usize::MAX, |b| usize::try_from(b).unwrap_or(usize::MAX)),
            disk,
            room: std::sync::OnceLock::new(),
            max_restarts,
            events: Arc::new(EventLog::default()),
            failed,
            failed_rx: Mutex::new(Some(failed_rx)),
            fail_steps: Mutex::new(HashMap::new()),
            store,
            catch_up: Mutex::new(None),
            read_floor: AtomicU64::new(0),
            checkpoints: Checkpoints::default(),
        })
    }

    /// Sets how the coordinator makes room in the cache before it adds a large change to a
    /// view's contents (a spilled change is applied a partition at a time, faster than the
    /// cache manager's ticks evict).
    pub fn set_room(&self, hook: impl Fn(u64) -> bool + Send + Sync + 'static) {
        let _ = self.room.set(RoomHook(Box::new(hook)));
    }

    /// Notes the epoch holding the changes committed after the checkpoint; no read is
    /// answered before it is published.
    pub fn set_catch_up(&self, catch_up: CatchUp) {
        self.read_floor.store(catch_up.epoch, Ordering::SeqCst);
        if let Ok(mut c) = self.catch_up.lock() {
            *c = Some(catch_up);
        }
    }

    /// The first epoch a read may see: the catch-up epoch after a restart (views restored
    /// from a checkpoint run before it is processed, but their contents are behind).
    pub fn read_floor(&self) -> u64 {
        self.read_floor.load(Ordering::SeqCst)
    }

    /// The catch-up epoch, once.
    pub fn take_catch_up(&self) -> Option<CatchUp> {
        self.catch_up.lock().ok().and_then(|mut c| c.take())
    }

    /// Queues a checkpoint barrier behind the epochs queued so far; `log_seq` is the log
    /// position they reached. The caller holds the engine's write lock.
    pub async fn queue_checkpoint(&self, barrier: Barrier) {
        let _ = self.commands.send(Command::Checkpoint(barrier)).await;
    }

    /// The ids of failed views to restart (taken once, by the supervisor).
    pub fn take_failed(&self) -> Option<mpsc::UnboundedReceiver<u64>> {
        self.failed_rx.lock().ok().and_then(|mut r| r.take())
    }

    /// Makes the next `n` steps of view `name` fail (fault injection).
    pub fn inject_step_failures(&self, name: &str, n: u32) {
        if let Ok(mut f) = self.fail_steps.lock() {
            f.insert(name.to_string(), n);
        }
    }

    /// An injected failure for this step of `view`, if one is due.
    pub fn injected_failure(&self, view: &ViewEntry) -> Option<String> {
        let mut f = self.fail_steps.lock().ok()?;
        let left = f.get_mut(&view.provider.name)?;
        if *left == 0 {
            return None;
        }
        *left -= 1;
        Some("injected operator failure (millrace.fail_view_steps)".into())
    }

    /// A view's pipeline failed with `cause`: drops the pipeline and has the supervisor
    /// rebuild it, or marks the view failed after `max_restarts` failures in a row.
    pub async fn task_failed(&self, view: &Arc<ViewEntry>, cause: String) {
        if self.view(view.id).is_none() {
            return;
        }
        let name = view.provider.name.clone();
        let failures = view.failures_in_a_row.fetch_add(1, Ordering::SeqCst) + 1;
        self.events
            .record("task_failed", Some(&name), Some(failures), cause.clone());
        if let Ok(mut r) = view.rebuild.lock() {
            *r = None;
        }
        if let Ok(mut c) = view.carried.lock() {
            *c = None;
        }
        if let Ok(mut p) = view.pending.lock() {
            p.clear();
        }
        if failures > self.max_restarts {
            let reason = format!("{cause} (given up after {} restarts)", self.max_restarts);
            self.events
                .record("view_failed", Some(&name), Some(failures), reason.clone());
            view.fail(reason).await;
            return;
        }
        view.set_status(ViewStatus::Recovering(cause));
        *view.pipeline.lock().await = None;
        view.signal_ready();
        let _ = self.failed.send(view.id);
    }

    /// Starts the coordinator task (once).
    pub fn start(self: &Arc<Self>) {
        let rx = self.commands_rx.lock().ok().and_then(|mut r| r.take());
        if let Some(rx) = rx {
            let coordinator = self.clone();
            tokio::spawn(async move { coordinator.coordinate(rx).await });
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
        if let Ok(mut d) = self.checkpoints.dropped.lock() {
            d.push(id);
        }
        if let Some(entry) = entry {
            entry.signal_ready();
            tokio::spawn(async move {
                *entry.pipeline.lock().await = None;
            });
        }
    }

    /// Whether any view is being built, restored or restarted (cheap; checked before
    /// working out which views a query reads).
    pub fn any_busy(&self) -> bool {
        self.views
            .lock()
            .map(|v| v.values().any(|e| e.status().is_busy()))
            .unwrap_or(false)
    }

    /// Waits while any of the views among `ids` is being built, restored or restarted,
    /// so that a read after a restart or a failure answers once the view is back (or has
    /// failed for good) instead of failing.
    pub async fn wait_ready(&self, ids: &[u64]) {
        loop {
            let busy = ids
                .iter()
                .filter_map(|id| self.view(*id))
                .any(|v| v.status().is_busy());
            if !busy {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Bytes of committed changes queued for or going through the views.
    pub fn changes_in_flight(&self) -> u64 {
        self.backlog.queued()
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
        let bytes: u64 = changes.values().flatten().map(|c| c.bytes() as u64).sum();
        tokio::task::block_in_place(|| self.backlog.reserve(bytes));
        let epoch = self.committed.fetch_add(1, Ordering::SeqCst) + 1;
        let tx = self.commands.clone();
        let command = Command::Epoch(epoch, changes, bytes);
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
            let bytes_of = |c: &Command| match c {
                Command::Epoch(_, _, bytes) => *bytes,
                _ => 0,
            };
            let mut bytes = bytes_of(&first);
            let mut commands = vec![first];
            // NOTE: a checkpoint barrier ends the batch: it must see exactly the epochs
            // queued before it.
            while commands.len() < self.coalesce
                && bytes < self.backlog.max() / 2
                && !matches!(commands.last(), Some(Command::Checkpoint(_)))
            {
                match rx.try_recv() {
                    Ok(c) => {
                        bytes += bytes_of(&c);
                        commands.push(c);
                    }
                    Err(_) => break,
                }
            }
            let mut epoch = None;
            let mut merged = EpochChanges::new();
            let mut done = Vec::new();
            let mut barrier = None;
            for command in commands {
                match command {
                    Command::Epoch(e, changes, _) => {
                        epoch = Some(e);
                        for (id, parts) in changes {
                            merged.entry(id).or_default().extend(parts);
                        }
                    }
                    Command::BackfillDone(view) => done.push(view),
                    Command::Checkpoint(b) => barrier = Some(b),
                }
            }
            if let Some(epoch) = epoch {
                self.process_epoch(epoch, merged).await;
            }
            self.backlog.release(bytes);
            for view in done {
                self.finish_backfill(view).await;
            }
            if let Some(barrier) = barrier {
                self.checkpoint(barrier).await;
            }
        }
    }

    async fn process_epoch(&self, epoch: u64, mut changes: EpochChanges) {
        // NOTE: a source's parts that fit in one step are merged (and its stored rows read)
        // once here, not by each view.
        for (id, parts) in changes.iter_mut() {
            let bytes: usize = parts.iter().map(EpochPart::bytes_when_read).sum();
            let stored = (parts.iter())
                .any(|p| matches!(p, EpochPart::Stored { .. } | EpochPart::Spilled { .. }));
            if (parts.len() > 1 || stored)
                && bytes <= self.step_bytes
                && let Some(schema) = parts.first().map(EpochPart::schema)
            {
                match EpochPart::concat(&schema, parts) {
                    Ok(c) => *parts = vec![c.into()],
                    Err(e) => warn!(source = id, error = %e, "cannot merge epoch changes"),
                }
            }
        }
        // (view, its change, whether it is a rebuilt view published now)
        let mut staged: Vec<(Arc<ViewEntry>, ViewChange, bool)> = Vec::new();
        for view in self.views() {
            let carried = view.carried.lock().ok().and_then(|mut c| c.take());
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
                // NOTE: the rebuild's snapshots, taken later, include what it misses now.
                ViewStatus::Recovering(_) if carried.is_none() => continue,
                ViewStatus::Recovering(_) | ViewStatus::Running => {}
            }
            let inputs = view.inputs_of(&changes);
            if inputs.is_empty() && carried.is_none() {
                continue;
            }
            let slow = self.slow_us_per_row.load(Ordering::Relaxed);
            if slow > 0 {
                let rows: usize = inputs.values().flatten().map(|c| c.len()).sum();
                tokio::time::sleep(std::time::Duration::from_micros(slow * rows as u64)).await;
            }
            let before = view.stats.lock().map(|s| s.clone()).unwrap_or_default();
            let result = if inputs.is_empty() {
                Ok(None)
            } else if let Some(cause) = self.injected_failure(&view) {
                Err(cause)
            } else {
                let mut guard = view.pipeline.lock().await;
                match guard.as_mut() {
                    Some(p) => p
                        .step_bounded(&inputs, self.step_bytes, Some(&self.disk))
                        .await
                        .map(Some)
                        .map_err(|e| e.to_string()),
                    None => continue,
                }
            };
            let out = match result {
                Ok(out) => out,
                Err(cause) => {
                    self.task_failed(&view, cause).await;
                    continue;
                }
            };
            if out.is_some() && carried.is_none() {
                view.failures_in_a_row.store(0, Ordering::SeqCst);
            }
            let recovered = carried.is_some();
            let out = match (carried, out) {
                (None, Some(out)) => Ok(out),
                (Some(carried), None) => Ok(ViewChange::Rows(carried)),
                // NOTE: rare (a rebuilt view's first epoch): the two are merged in memory.
                (Some(carried), Some(out)) => out.into_rows().and_then(|out| {
                    let schema = view.provider.schema.clone();
                    Ok(ViewChange::Rows(
                        Changelog::concat(&schema, vec![carried, out])?.consolidate()?,
                    ))
                }),
                (None, None) => continue,
            };
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    self.task_failed(&view, format!("cannot merge a rebuilt view's change: {e}"))
                        .await;
                    continue;
                }
            };
            view.record_stats(epoch, &before).await;
            changes.insert(view.id, EpochPart::of_view(&out));
            staged.push((view, out, recovered));
        }
        let _guard = self.read_lock.write().await;
        for (view, out, recovered) in staged {
            // NOTE: a spilled change is applied a consolidated partition at a time, the
            // cache making room as the contents grow.
            let mut added = 0u64;
            let applied: Result<()> = out.for_each_consolidated(|part| {
                if let (ViewChange::Spilled(_), Some(room)) = (&out, self.room.get()) {
                    added += part.slice_bytes() as u64;
                    if (room.0)(added) {
                        added = 0;
                    }
                }
                view.apply(&part)?;
                // NOTE: the changed rows a checkpoint writes stay within a bound too.
                self.flush_changed_rows(&view, self.step_bytes.saturating_mul(DIRTY_STEPS));
                Ok(())
            });
            if let Err(e) = applied {
                self.task_failed(&view, e.to_string()).await;
                continue;
            }
            if recovered {
                view.set_status(ViewStatus::Running);
                let failures = view.failures_in_a_row.load(Ordering::SeqCst);
                let rows = view
                    .provider
                    .contents
                    .read()
                    .map(|c| c.num_rows())
                    .unwrap_or(0);
                let (kind, attempt) = match failures {
                    0 => ("view_restored", None),
                    n => ("view_restarted", Some(n)),
                };
                self.events.record(
                    kind,
                    Some(&view.provider.name),
                    attempt,
                    format!(
                        "running at epoch {epoch} with {rows} rows ({} rows changed)",
                        out.len()
                    ),
                );
            }
            // NOTE: sending fails only when nobody subscribes, which is fine.
            if view.feed.receiver_count() > 0 && !out.is_empty() {
                let _ = view.feed.send(Arc::new(EpochDelta::new(epoch, out)));
            }
        }
        self.published.send_replace(epoch);
    }

    /// Replays the epochs a view missed while backfilling, then lets it run. A rebuilt view
    /// instead carries the change from its old contents to the new into the next epoch.
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
            let result = match self.injected_failure(&view) {
                Some(cause) => Err(cause),
                None => {
                    let mut guard = view.pipeline.lock().await;
                    match guard.as_mut() {
                        Some(p) => p
                            .step_bounded(&inputs, self.step_bytes, Some(&self.disk))
                            .await
                            .map_err(|e| e.to_string()),
                        None => return,
                    }
                }
            };
            let applied = |out: ViewChange| {
                out.for_each_consolidated(|part| view.apply(&part))
                    .map_err(|e| e.to_string())
            };
            if let Err(cause) = result.and_then(applied) {
                if view.is_rebuilding() {
                    self.task_failed(&view, cause).await;
                } else {
                    view.fail(cause).await;
                }
                return;
            }
        }
        view.record_stats(self.published_epoch(), &PipelineStats::default())
            .await;
        let rebuilt = view.rebuild.lock().ok().and_then(|mut r| r.take());
        if let Some(rebuilt) = rebuilt {
            match contents_change(&view, &rebuilt) {
                Ok(change) => {
                    if let Ok(mut c) = view.carried.lock() {
                        *c = Some(change);
                    }
                    view.set_status(ViewStatus::Recovering(
                        "publishing the rebuilt contents".into(),
                    ));
                    info!(view = %view.provider.name, caught_up_epochs = queued, "materialized view rebuilt");
                }
                Err(e) => self.task_failed(&view, e.to_string()).await,
            }
            view.signal_ready();
            return;
        }
        view.set_status(ViewStatus::Running);
        info!(view = %view.provider.name, caught_up_epochs = queued, "materialized view running");
        view.signal_ready();
    }

    /// Tells the coordinator a backfill has pushed its snapshot through.
    pub(crate) async fn backfill_done(&self, view: Arc<ViewEntry>) {
        let _ = self.commands.send(Command::BackfillDone(view)).await;
    }
}

/// The change that turns a view's current contents into `rebuilt`: every current row
/// deleted and every rebuilt row inserted, consolidated, so only the difference remains.
fn contents_change(view: &ViewEntry, rebuilt: &ViewContents) -> Result<Changelog> {
    let old = view
        .provider
        .contents
        .read()
        .or_poisoned("view contents")?
        .snapshot()?;
    let new = rebuilt.snapshot()?;
    let schema = view.provider.schema.clone();
    let parts: Vec<Changelog> = old
        .batches
        .into_iter()
        .map(Changelog::deletes)
        .chain(new.batches.into_iter().map(Changelog::inserts))
        .collect();
    if parts.is_empty() {
        return Ok(Changelog::empty(schema));
    }
    Ok(Changelog::concat(&schema, parts)?.consolidate()?)
}
