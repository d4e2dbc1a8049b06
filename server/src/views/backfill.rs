//! Backfill: computes a new view's initial contents from snapshots of its sources.
//!
//! The snapshots are taken when the view is registered, at the epoch every source had then
//! reached; changes after that epoch queue up for the view meanwhile. The backfill runs in
//! its own task and pushes the snapshot through the view's pipeline in bounded chunks,
//! yielding between them, so the views already running keep their epochs. Chunks of a source
//! that were evicted to the object store are read one file at a time as the backfill reaches
//! them, so a source larger than memory is never held whole. Progress (rows
//! done, rows/s, percent) is logged and shown in `millrace_views`. At the end the
//! coordinator replays the queued changes and the view starts running.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace_planner::Changelog;
use millrace_storage::{SnapshotPart, TieredSnapshot};
use tracing::info;

use crate::coordinator::Coordinator;
use crate::coordinator::entry::ViewEntry;
use crate::error::{Result, ServerError};

/// Source rows pushed through the pipeline per step.
pub const CHUNK_ROWS: usize = 8192;
/// How often progress is logged.
const LOG_EVERY: Duration = Duration::from_secs(2);

/// Runs a view's backfill over `snapshots` (source id, rows) and hands it to the coordinator.
pub async fn run(
    coordinator: Arc<Coordinator>,
    view: Arc<ViewEntry>,
    snapshots: Vec<(u64, TieredSnapshot)>,
) {
    let total: usize = snapshots
        .iter()
        .map(|(_, s)| s.parts.iter().map(SnapshotPart::num_rows).sum::<usize>())
        .sum();
    if let Ok(mut b) = view.backfill.lock() {
        b.rows_total = total as u64;
        b.started = Some(Instant::now());
    }
    info!(view = %view.provider.name, rows = total, "backfill started");
    if let Err(e) = push(&view, snapshots, total).await {
        if view.is_rebuilding() {
            coordinator
                .task_failed(&view, format!("backfill: {e}"))
                .await;
        } else {
            view.fail(format!("backfill: {e}")).await;
        }
    }
    if let Ok(mut b) = view.backfill.lock() {
        b.finished = Some(Instant::now());
    }
    coordinator.backfill_done(view).await;
}

async fn push(view: &ViewEntry, snapshots: Vec<(u64, TieredSnapshot)>, total: usize) -> Result<()> {
    let started = Instant::now();
    let mut last_log = Instant::now();
    let mut done = 0usize;
    // The first step carries no rows: constant relations and global aggregates emit their
    // initial rows.
    step(view, HashMap::new()).await?;
    for (id, snapshot) in snapshots {
        for part in snapshot.parts {
            let batches = match part {
                SnapshotPart::Hot(batch) => vec![batch],
                SnapshotPart::Cold { file, rows, .. } => tokio::task::spawn_blocking(move || {
                    file.read_batches(None, rows.as_deref(), None)
                })
                .await
                .map_err(|e| ServerError::Internal(format!("reading a cold chunk: {e}")))??,
            };
            for batch in batches {
                let mut offset = 0;
                while offset < batch.num_rows() {
                    let len = CHUNK_ROWS.min(batch.num_rows() - offset);
                    let chunk = batch.slice(offset, len);
                    offset += len;
                    step(view, HashMap::from([(id, Changelog::inserts(chunk))])).await?;
                    done += len;
                    if let Ok(mut b) = view.backfill.lock() {
                        b.rows_done = done as u64;
                    }
                    if last_log.elapsed() >= LOG_EVERY {
                        last_log = Instant::now();
                        let secs = started.elapsed().as_secs_f64().max(1e-9);
                        info!(
                            view = %view.provider.name,
                            rows_done = done,
                            rows_total = total,
                            rows_per_sec = (done as f64 / secs) as u64,
                            percent = format!("{:.1}", 100.0 * done as f64 / total.max(1) as f64),
                            "backfill progress"
                        );
                    }
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    info!(
        view = %view.provider.name,
        rows = done,
        seconds = format!("{:.3}", started.elapsed().as_secs_f64()),
        "backfill finished"
    );
    Ok(())
}

async fn step(view: &ViewEntry, inputs: HashMap<u64, Changelog>) -> Result<()> {
    let out = {
        let mut guard = view.pipeline.lock().await;
        let pipeline = guard
            .as_mut()
            .ok_or_else(|| ServerError::Internal("view dropped during backfill".into()))?;
        pipeline.step(&inputs).await?
    };
    view.apply(&out)
}
