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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use millrace_planner::Catalog;
use millrace_planner::system_table::SystemTableBuilder;
use millrace_planner::view_table::ViewStatus;
use millrace_storage::db::keys::{CONTENTS_OP, other_contents_op};
use millrace_storage::error::LockResultExt;
use millrace_storage::view_contents::RowCounts;
use millrace_storage::{StateTier, WriteSet};
use tracing::{info, warn};

use super::Coordinator;
use crate::coordinator::entry::ViewEntry;
use crate::coordinator::manifest::{Barrier, CheckpointRecord, MANIFEST_KEY, Manifest};
use crate::error::{Result, ServerError};

/// Changed entries of one operator partition from which they are written ahead of the
/// checkpoint's commit (see `Pipeline::flush_changes`).
const FLUSH_AHEAD_ENTRIES: usize = 4096;
/// Bytes written by checkpoints after which the state is flushed out of RocksDB's memtable
/// (so that a restart does not replay it from the WAL).
const FLUSH_AFTER_BYTES: u64 = 32 << 20;

impl Coordinator {
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
        let last = Manifest::load(&self.store)?;
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
        let mut contents_ops = BTreeMap::new();
        let mut written = Vec::new();
        let mut skipped = 0;
        // NOTE: rows written ahead since the last checkpoint are part of this one.
        let (mut entries, mut bytes) = self
            .checkpoints
            .ahead
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default();
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
                    Ok(ahead) => {
                        entries += ahead;
                        pipeline.checkpoint().await
                    }
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
            let current = last
                .as_ref()
                .map_or(CONTENTS_OP, |m| m.contents_op(view.id));
            let contents = match self.write_contents(&view, fresh, current, tier.as_ref()) {
                Ok(contents) => contents,
                Err(e) => {
                    // The rows changed since the last checkpoint are forgotten: leave the
                    // view out of checkpoints until it is rebuilt.
                    warn!(view = %view.provider.name, error = %e, "writing the view's rows failed; left out until rebuilt");
                    view.checkpoint_lost.store(true, Ordering::SeqCst);
                    skipped += 1;
                    continue;
                }
            };
            entries += contents.entries;
            bytes += contents.bytes;
            // NOTE: operator state evicted since the last checkpoint is already in place (a
            // fresh pipeline's first eviction deleted the earlier pipeline's state); the
            // commit makes it current: it drops the undo records and clears the stale mark.
            let spilled_fresh = tier.as_ref().is_some_and(|t| t.dropped_earlier_state());
            let ahead = contents.op != current;
            if fresh && !spilled_fresh {
                match ahead {
                    true => set.drop_view_state_except(view.id, contents.op),
                    false => set.drop_view_state(view.id),
                }
            } else if contents.full {
                // Written ahead: the earlier rows go; in this write: they are replaced.
                set.drop_view_state_op(view.id, current);
            }
            set.keep_view_spills(view.id);
            set.delete_meta(&StateTier::mark_key(view.id));
            for e in state {
                entries += 1;
                bytes += (e.key.len() + e.value.as_ref().map_or(0, |v| v.len())) as u64;
                set.put_view_state(view.id, e.op, e.partition, e.key, e.value);
            }
            for (row, n) in contents.in_commit {
                let value = (n > 0).then(|| n.to_le_bytes().to_vec());
                set.put_view_state(view.id, contents.op, 0, row.into_vec(), value);
            }
            contents_ops.insert(view.id, contents.op);
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
            contents: contents_ops,
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

/// Registers `millrace_checkpoints`: the checkpoints taken since the server started, newest
/// last, with what each wrote and how long it took.
pub fn register(catalog: &Arc<Catalog>, coordinator: &Arc<Coordinator>) {
    let coordinator = coordinator.clone();
    let table = SystemTableBuilder::new()
        .int("epoch", |r: &CheckpointRecord| r.epoch as i64)
        .int("log_seq", |r| r.log_seq as i64)
        .time("started", |r| r.started)
        .float("duration_ms", |r| r.duration.as_secs_f64() * 1e3)
        .int("views", |r| r.views as i64)
        .int("views_skipped", |r| r.skipped as i64)
        .int("entries_written", |r| r.entries as i64)
        .int("bytes_written", |r| r.bytes as i64)
        .text_or_null("error", |r| r.error.clone())
        .build(move || {
            coordinator
                .checkpoints
                .history
                .lock()
                .map(|h| h.iter().cloned().collect())
                .unwrap_or_default()
        });
    catalog.register_system_table("millrace_checkpoints", Arc::new(table));
}

/// How a checkpoint wrote a view's contents.
struct ContentsWrite {
    /// The operator number they are under (see `CONTENTS_OP_ALT`).
    op: u32,
    /// Whether they replace the checkpointed rows (all rows) or update them (changed rows).
    full: bool,
    /// Rows left for the checkpoint's commit (none when they went ahead of it).
    in_commit: RowCounts,
    /// Rows written (or left for the commit), and their bytes.
    entries: u64,
    bytes: u64,
}

impl Coordinator {
    /// Writes a view's rows for a checkpoint ahead of its commit, in bounded batches, so
    /// that the one atomic write does not hold them (twice, with RocksDB's batch): changed
    /// rows over the checkpointed ones under `current` (undo records keep those until the
    /// commit), all rows (a fresh view, or too many changed to track) under the other
    /// contents number, a chunk at a time, which the commit switches to. Without a warm tier
    /// the rows are left for the commit.
    fn write_contents(
        &self,
        view: &ViewEntry,
        fresh: bool,
        current: u32,
        tier: Option<&Arc<StateTier>>,
    ) -> Result<ContentsWrite> {
        let mut contents = view
            .provider
            .contents
            .write()
            .or_poisoned("view contents")?;
        let full = fresh || contents.overflowed();
        let mut out = ContentsWrite {
            op: current,
            full,
            in_commit: Vec::new(),
            entries: 0,
            bytes: 0,
        };
        let count = |out: &mut ContentsWrite, rows: &RowCounts| {
            out.entries += rows.len() as u64;
            out.bytes += rows
                .iter()
                .map(|(row, _)| row.len() as u64 + 8)
                .sum::<u64>();
        };
        match (tier, full) {
            (Some(tier), false) => {
                let rows = contents.take_dirty()?;
                drop(contents);
                count(&mut out, &rows);
                let location = tier.location(current, 0);
                for batch in encoded(rows).chunks(FLUSH_AHEAD_ENTRIES) {
                    tokio::task::block_in_place(|| location.spill(batch.to_vec()))?;
                }
            }
            (Some(_), true) => {
                let target = other_contents_op(current);
                out.op = target;
                let store = &self.store;
                let mut clear = WriteSet::new();
                clear.drop_view_state_op(view.id, target);
                tokio::task::block_in_place(|| store.commit(clear))?;
                contents.for_each_count(|rows| {
                    count(&mut out, &rows);
                    let mut set = WriteSet::new();
                    for (row, value) in encoded(rows) {
                        set.put_view_state(view.id, target, 0, row, value);
                    }
                    tokio::task::block_in_place(|| store.commit(set))?;
                    Ok(())
                })?;
            }
            (None, _) => {
                let rows = match full {
                    true => contents.all_counts()?,
                    false => contents.take_dirty()?,
                };
                count(&mut out, &rows);
                out.in_commit = rows;
            }
        }
        Ok(out)
    }
}

impl Coordinator {
    /// Writes a view's changed rows ahead of its next checkpoint, as that checkpoint would
    /// (to the warm tier, with undo records), once they hold more than `cap` bytes: a view
    /// of 2M rows kept up to a quarter of them, 175 MB of 300-byte rows, between two
    /// checkpoints. A view whose next checkpoint writes all its rows (a new or rebuilt view)
    /// stops tracking them instead; so does one whose write fails.
    pub(crate) fn flush_changed_rows(&self, view: &ViewEntry, cap: usize) {
        if let Err(e) = self.try_flush_changed_rows(view, cap) {
            warn!(view = %view.provider.name, error = %e, "writing changed rows ahead of the checkpoint failed; it writes all rows");
            if let Ok(mut contents) = view.provider.contents.write() {
                contents.drop_dirty();
            }
        }
    }

    fn try_flush_changed_rows(&self, view: &ViewEntry, cap: usize) -> Result<()> {
        let mut contents = view
            .provider
            .contents
            .write()
            .or_poisoned("view contents")?;
        if contents.dirty_bytes() <= cap || contents.overflowed() {
            return Ok(());
        }
        let tier = view.tier.lock().ok().and_then(|t| t.clone());
        let whole = view.checkpoint_fresh.load(Ordering::SeqCst)
            || view.checkpoint_lost.load(Ordering::SeqCst);
        let Some(tier) = tier.filter(|_| !whole) else {
            contents.drop_dirty();
            return Ok(());
        };
        let current = Manifest::load(&self.store)?.map_or(CONTENTS_OP, |m| m.contents_op(view.id));
        let rows = contents.take_dirty()?;
        drop(contents);
        let location = tier.location(current, 0);
        let rows = encoded(rows);
        let bytes: usize = rows.iter().map(|(row, _)| row.len() + 8).sum();
        for batch in rows.chunks(FLUSH_AHEAD_ENTRIES) {
            tokio::task::block_in_place(|| location.spill(batch.to_vec()))?;
        }
        if let Ok(mut ahead) = self.checkpoints.ahead.lock() {
            ahead.0 += rows.len() as u64;
            ahead.1 += bytes as u64;
        }
        Ok(())
    }
}

/// Rows with their counts as view state entries (a count of 0: the row is gone).
fn encoded(rows: RowCounts) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    rows.into_iter()
        .map(|(row, n)| (row.into_vec(), (n > 0).then(|| n.to_le_bytes().to_vec())))
        .collect()
}
