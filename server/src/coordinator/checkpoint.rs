//! Checkpoints: the state of every running view, persisted consistently at one epoch.
//!
//! Every `--checkpoint-interval` (and on `CHECKPOINT`) the checkpoint ticker takes the
//! engine's write lock, rewrites the logs of tables that grew well past their rows, and
//! queues a checkpoint barrier behind the last committed epoch together with the log
//! position that epoch reached. The coordinator handles the barrier between epochs, once
//! every view has processed everything before it (so each operator has seen the barrier on
//! all its inputs): it asks every running view's pipeline for the state its operators
//! changed since the last checkpoint, adds the rows of the view's contents whose counts
//! changed, and commits all of it with the manifest (epoch, log position, views and their
//! worker counts) as one synced RocksDB write. A view that is backfilling, recovering or
//! failed is left out and does not hold back the others; so is a view whose state cannot be
//! encoded (an aggregate whose accumulator state arrow rows cannot hold): after a restart
//! such views are rebuilt from their inputs.
//!
//! On start ([`RestorePlan`]) the manifest decides which views restore their state instead
//! of recomputing it: those in the manifest with the same worker count and plan fingerprint
//! (`PlanNode::layout`), whose tables' logs
//! still hold every entry since the checkpoint and whose upstream views restore too. Tables
//! are always replayed in full (they are the source of truth); the entries after the
//! checkpoint's log position become one epoch of changes that the restored views process
//! before the server answers. Source offsets and sink progress need no manifest entry: they
//! commit with the rows they describe.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use millrace_planner::Catalog;
use millrace_planner::pipeline::RestoreEntries;
use millrace_planner::system_table::SystemTable;
use millrace_planner::view_table::ViewStatus;
use millrace_storage::db::CONTENTS_OP;
use millrace_storage::{StateTier, Store, WriteSet};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::ViewRuntime;
use crate::error::{Result, ServerError};

/// Metadata key of the last committed manifest.
pub const MANIFEST_KEY: &[u8] = b"checkpoint/manifest";
/// Changed entries of one operator partition from which they are written ahead of the
/// checkpoint's commit (see `Pipeline::flush_changes`).
const FLUSH_AHEAD_ENTRIES: usize = 4096;
/// Checkpoints listed in `millrace_checkpoints`.
const HISTORY: usize = 100;
/// Bytes written by checkpoints after which the state is flushed out of RocksDB's memtable
/// (so that a restart does not replay it from the WAL).
const FLUSH_AFTER_BYTES: u64 = 32 << 20;

/// What a committed checkpoint covers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The epoch every checkpointed view had processed.
    pub epoch: u64,
    /// Log position of that epoch: table log entries numbered from here on came after it.
    pub log_seq: u64,
    /// When it was committed (milliseconds since the Unix epoch).
    pub time_ms: u64,
    /// Checkpointed views, with the number of partitions their state is split over.
    pub views: BTreeMap<u64, usize>,
    /// Checkpointed views' plan fingerprints (`PlanNode::layout`): a view restores only
    /// into a plan with the same one.
    #[serde(default)]
    pub layouts: BTreeMap<u64, u64>,
}

impl Manifest {
    /// The last committed manifest, if any.
    pub fn load(store: &Store) -> Result<Option<Manifest>> {
        match store.meta(MANIFEST_KEY)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                ServerError::Internal(format!("unreadable checkpoint manifest: {e}"))
            })?)),
            None => Ok(None),
        }
    }
}

/// One checkpoint, for `millrace_checkpoints`.
#[derive(Debug, Clone)]
pub struct CheckpointRecord {
    pub epoch: u64,
    pub log_seq: u64,
    pub started: SystemTime,
    pub duration: Duration,
    /// Views checkpointed, and views left out (not running, or not checkpointable).
    pub views: usize,
    pub skipped: usize,
    /// State entries and view rows written, and their bytes.
    pub entries: u64,
    pub bytes: u64,
    /// Why it did not commit, if it failed.
    pub error: Option<String>,
}

/// The checkpoints taken since start, and views whose state must be written in full.
#[derive(Debug, Default)]
pub struct Checkpoints {
    pub history: Mutex<VecDeque<CheckpointRecord>>,
    /// Views dropped since the last checkpoint (their state is deleted with the next one).
    pub dropped: Mutex<Vec<u64>>,
    /// Log position and views of the last committed checkpoint (an idle server writes no
    /// new one).
    last: Mutex<Option<(u64, BTreeMap<u64, usize>)>>,
    /// Bytes written since the state was last flushed to disk.
    unflushed: std::sync::atomic::AtomicU64,
}

impl Checkpoints {
    fn record(&self, record: CheckpointRecord) {
        if let Ok(mut h) = self.history.lock() {
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(record);
        }
    }
}

/// A queued checkpoint barrier.
#[derive(Debug)]
pub struct Barrier {
    /// Log position of the last epoch queued before the barrier.
    pub log_seq: u64,
    /// Told the checkpointed epoch (None if nothing was written) when it commits.
    pub done: Option<oneshot::Sender<Result<Option<u64>>>>,
    /// Whether to flush the state to disk before telling (`CHECKPOINT`), so that a restart
    /// reads it from files rather than replaying RocksDB's WAL.
    pub flush: bool,
}

impl ViewRuntime {
    /// Takes a checkpoint of every running view at the published epoch (called by the
    /// coordinator between epochs).
    pub(super) async fn checkpoint(&self, barrier: Barrier) {
        let mut result = self.write_checkpoint(barrier.log_seq).await;
        if barrier.flush && result.is_ok() {
            let store = self.store.clone();
            if let Err(e) = tokio::task::block_in_place(move || store.flush_view_state()) {
                result = Err(e.into());
            }
        }
        if let Err(e) = &result {
            warn!(error = %e, "checkpoint failed; its views are left out of the next ones");
        }
        if let Some(done) = barrier.done {
            let _ = done.send(result);
        }
    }

    async fn write_checkpoint(&self, log_seq: u64) -> Result<Option<u64>> {
        let started = Instant::now();
        let started_at = SystemTime::now();
        let epoch = self.published_epoch();
        let mut set = WriteSet::new();
        let dropped = self
            .checkpoints
            .dropped
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        for id in &dropped {
            set.drop_view_state(*id);
            set.delete_meta(&StateTier::mark_key(*id));
        }
        let mut views = BTreeMap::new();
        let mut layouts = BTreeMap::new();
        let mut written = Vec::new();
        let mut skipped = 0;
        let (mut entries, mut bytes) = (0u64, 0u64);
        for view in self.views() {
            if view.status() != ViewStatus::Running || view.has_carried_change() {
                skipped += 1;
                continue;
            }
            let (state, workers, layout, tier) = {
                let mut guard = view.pipeline.lock().await;
                let Some(pipeline) = guard.as_mut() else {
                    skipped += 1;
                    continue;
                };
                // A large delta goes to the warm tier in bounded batches first, so that the
                // checkpoint's one atomic write does not hold all of it in memory twice.
                let state = match pipeline.flush_changes(FLUSH_AHEAD_ENTRIES).await {
                    Ok(_) => pipeline.checkpoint().await,
                    Err(e) => Err(e),
                };
                (
                    state,
                    pipeline.workers(),
                    pipeline.layout(),
                    pipeline.tier().cloned(),
                )
            };
            let fresh = view.checkpoint_fresh.load(Ordering::SeqCst);
            let rows = match view.provider.contents.write() {
                Ok(mut c) if fresh => c.all_counts().map(|rows| (true, rows)),
                Ok(mut c) => c.take_changes(),
                Err(_) => Ok((false, Vec::new())),
            };
            let (all_rows, rows) = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    // The rows changed since the last checkpoint are forgotten: leave the
                    // view out of checkpoints until it is rebuilt.
                    warn!(view = %view.provider.name, error = %e, "reading the view's changed rows failed");
                    view.checkpoint_lost.store(true, Ordering::SeqCst);
                    skipped += 1;
                    continue;
                }
            };
            let state = match state {
                Ok(Some(state)) if !view.checkpoint_lost.load(Ordering::SeqCst) => state,
                Ok(_) => {
                    skipped += 1;
                    continue;
                }
                Err(e) => {
                    warn!(view = %view.provider.name, error = %e, "view state not checkpointed; left out until rebuilt");
                    view.checkpoint_lost.store(true, Ordering::SeqCst);
                    skipped += 1;
                    continue;
                }
            };
            // NOTE: operator state evicted since the last checkpoint is already in place (a
            // fresh pipeline's first eviction deleted the earlier pipeline's state); the
            // commit makes it current: it drops the undo records and clears the stale mark.
            let spilled_fresh = tier.as_ref().is_some_and(|t| t.dropped_earlier_state());
            if fresh && !spilled_fresh {
                set.drop_view_state(view.id);
            } else if all_rows {
                set.drop_view_state_op(view.id, CONTENTS_OP);
            }
            set.keep_view_spills(view.id);
            set.delete_meta(&StateTier::mark_key(view.id));
            for e in state {
                entries += 1;
                bytes += (e.key.len() + e.value.as_ref().map_or(0, |v| v.len())) as u64;
                set.put_view_state(view.id, e.op, e.partition, e.key, e.value);
            }
            for (row, n) in rows {
                entries += 1;
                bytes += row.len() as u64 + 8;
                let value = (n > 0).then(|| n.to_le_bytes().to_vec());
                set.put_view_state(view.id, CONTENTS_OP, 0, row.into_vec(), value);
            }
            views.insert(view.id, workers);
            layouts.insert(view.id, layout);
            written.push((view, tier));
        }
        let unchanged = entries == 0
            && dropped.is_empty()
            && self
                .checkpoints
                .last
                .lock()
                .map(|l| l.as_ref() == Some(&(log_seq, views.clone())))
                .unwrap_or(false);
        if unchanged {
            return Ok(None);
        }
        let manifest = Manifest {
            epoch,
            log_seq,
            time_ms: started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            views: views.clone(),
            layouts,
        };
        let encoded = serde_json::to_vec(&manifest)
            .map_err(|e| ServerError::Internal(format!("checkpoint manifest: {e}")))?;
        set.put_meta(MANIFEST_KEY, encoded);
        let store = self.store.clone();
        let tiers: Vec<Arc<StateTier>> = written.iter().filter_map(|(_, t)| t.clone()).collect();
        let committed = tokio::task::block_in_place(move || {
            // Evictions of the written views wait until their undo records are gone.
            let _held: Vec<_> = tiers.iter().map(|t| t.hold_spills()).collect();
            store.commit(set)
        });
        let mut record = CheckpointRecord {
            epoch,
            log_seq,
            started: started_at,
            duration: started.elapsed(),
            views: views.len(),
            skipped,
            entries,
            bytes,
            error: None,
        };
        if let Err(e) = committed {
            // NOTE: the drained deltas were not written, and the last committed manifest
            // still lists these views: leave them out from now on (after a restart they
            // are rebuilt from their inputs) until their pipelines are rebuilt.
            for (view, _) in &written {
                view.checkpoint_lost.store(true, Ordering::SeqCst);
            }
            if let Ok(mut d) = self.checkpoints.dropped.lock() {
                d.extend(dropped);
            }
            record.error = Some(e.to_string());
            self.checkpoints.record(record);
            return Err(e.into());
        }
        for (view, tier) in &written {
            view.checkpoint_fresh.store(false, Ordering::SeqCst);
            if let Some(tier) = tier {
                tier.committed();
            }
            if let Some(pipeline) = view.pipeline.lock().await.as_mut()
                && let Err(e) = pipeline.committed().await
            {
                warn!(view = %view.provider.name, error = %e, "telling the pipeline its checkpoint committed failed");
            }
        }
        if let Ok(mut last) = self.checkpoints.last.lock() {
            *last = Some((log_seq, views.clone()));
        }
        if self
            .checkpoints
            .unflushed
            .fetch_add(bytes, Ordering::SeqCst)
            + bytes
            > FLUSH_AFTER_BYTES
        {
            self.checkpoints.unflushed.store(0, Ordering::SeqCst);
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.flush_view_state() {
                    warn!(error = %e, "flushing checkpointed state failed");
                }
            });
        }
        if entries > 0 || !dropped.is_empty() {
            info!(
                epoch,
                views = views.len(),
                skipped,
                entries,
                bytes,
                ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                "checkpoint committed"
            );
        }
        self.checkpoints.record(record);
        Ok(Some(epoch))
    }
}

/// Which views restore from the last checkpoint on start, decided as the catalog replays.
#[derive(Debug, Default)]
pub struct RestorePlan {
    pub manifest: Option<Manifest>,
    /// Tables whose logs no longer hold every entry since the checkpoint.
    pub rebased_tables: HashSet<u64>,
    /// Views restored so far (an upstream view must be among them).
    pub restored: HashSet<u64>,
}

impl RestorePlan {
    /// The plan for the last committed manifest.
    pub fn load(store: &Store) -> Result<Self> {
        let manifest = Manifest::load(store)?;
        if let Some(m) = &manifest {
            info!(
                epoch = m.epoch,
                log_seq = m.log_seq,
                views = m.views.len(),
                "last checkpoint"
            );
        }
        Ok(Self {
            manifest,
            ..Self::default()
        })
    }

    /// Notes a table whose log was rewritten after the checkpoint.
    pub fn check_table(&mut self, store: &Store, table_id: u64) -> Result<()> {
        if let Some(m) = &self.manifest
            && store
                .log_rebased_at(table_id)?
                .is_some_and(|s| s >= m.log_seq)
        {
            self.rebased_tables.insert(table_id);
        }
        Ok(())
    }

    /// Whether a view reading `sources` with `workers` partitions and plan fingerprint
    /// `layout` can restore its state.
    pub fn can_restore(
        &self,
        view_id: u64,
        sources: &[u64],
        (workers, layout): (usize, u64),
        is_view: impl Fn(u64) -> bool,
    ) -> bool {
        let Some(m) = &self.manifest else {
            return false;
        };
        m.views.get(&view_id) == Some(&workers)
            && m.layouts.get(&view_id).is_none_or(|l| *l == layout)
            && sources.iter().all(|id| {
                if is_view(*id) {
                    self.restored.contains(id)
                } else {
                    !self.rebased_tables.contains(id)
                }
            })
    }
}

/// A view's checkpointed contents: encoded rows with their number of copies.
pub type ContentsRows = Vec<(Vec<u8>, i64)>;

/// The checkpointed state of operators `ops` of a view (those restored up front).
pub fn load_op_state(store: &Store, view_id: u64, ops: &[u32]) -> Result<RestoreEntries> {
    let mut state = RestoreEntries::new();
    for &op in ops {
        for (partition, key, value) in store.view_state_op(view_id, op)? {
            state.entry((op, partition)).or_default().push((key, value));
        }
    }
    Ok(state)
}

/// Calls `f` with a view's checkpointed contents rows, `piece` rows at a time, so that a
/// restore holds one piece besides what it has loaded (and can evict between pieces).
pub fn for_each_contents_piece(
    store: &Store,
    view_id: u64,
    piece: usize,
    mut f: impl FnMut(ContentsRows) -> Result<()>,
) -> Result<()> {
    let mut rows = Vec::with_capacity(piece);
    store.for_each_view_state_op(view_id, CONTENTS_OP, |_, key, value| {
        let n = value
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(i64::from_le_bytes)
            .ok_or_else(|| ServerError::Internal("corrupt checkpointed row count".into()))?;
        rows.push((key.to_vec(), n));
        if rows.len() >= piece {
            f(std::mem::replace(&mut rows, Vec::with_capacity(piece)))?;
        }
        Ok::<(), ServerError>(())
    })?;
    if !rows.is_empty() {
        f(rows)?;
    }
    Ok(())
}

/// Registers `millrace_checkpoints`: the checkpoints taken since the server started, newest
/// last, with what each wrote and how long it took.
pub fn register(catalog: &Arc<Catalog>, runtime: &Arc<ViewRuntime>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("epoch", DataType::Int64, false),
        Field::new("log_seq", DataType::Int64, false),
        Field::new(
            "started",
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            false,
        ),
        Field::new("duration_ms", DataType::Float64, false),
        Field::new("views", DataType::Int64, false),
        Field::new("views_skipped", DataType::Int64, false),
        Field::new("entries_written", DataType::Int64, false),
        Field::new("bytes_written", DataType::Int64, false),
        Field::new("error", DataType::Utf8, true),
    ]));
    let runtime = runtime.clone();
    let table_schema = schema.clone();
    let fill = Arc::new(move || {
        let records: Vec<CheckpointRecord> = runtime
            .checkpoints
            .history
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| r.epoch as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| r.log_seq as i64),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(records.iter().map(|r| {
                    r.started
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_micros() as i64)
                        .unwrap_or(0)
                }))
                .with_timezone("+00:00"),
            ),
            Arc::new(Float64Array::from_iter_values(
                records.iter().map(|r| r.duration.as_secs_f64() * 1e3),
            )),
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| r.views as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| r.skipped as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| r.entries as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| r.bytes as i64),
            )),
            Arc::new(StringArray::from_iter(
                records.iter().map(|r| r.error.as_deref()),
            )),
        ];
        Ok(RecordBatch::try_new(table_schema.clone(), columns)?)
    });
    catalog.register_system_table(
        "millrace_checkpoints",
        Arc::new(SystemTable::new(schema, fill)),
    );
}
