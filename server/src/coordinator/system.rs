//! `millrace_views`: one row per materialized view with its status, epoch, size, state and
//! throughput figures, and backfill progress. Computed when scanned.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use millrace_planner::Catalog;
use millrace_planner::pipeline::PipelineStats;
use millrace_planner::system_table::SystemTableBuilder;
use millrace_planner::view_table::ViewStatus;
use millrace_storage::CatalogRecord;

use super::Coordinator;
use crate::coordinator::entry::{Backfill, EpochFigures, ViewEntry};

/// One view as `millrace_views` shows it, read under one look at its figures.
struct Row {
    view: Arc<ViewEntry>,
    record: Option<CatalogRecord>,
    status: ViewStatus,
    last: EpochFigures,
    stats: PipelineStats,
    rows: i64,
    contents_bytes: i64,
    last_change: Option<SystemTime>,
    backfill: Backfill,
    published: u64,
    workers: usize,
}

/// Registers `millrace_views` in the catalog.
pub fn register(catalog: &Arc<Catalog>, coordinator: &Arc<Coordinator>) {
    let views = coordinator.clone();
    let records = catalog.clone();
    let table = SystemTableBuilder::new()
        .text("name", |r: &Row| r.view.provider.name.clone())
        .text("schema", |r| {
            r.record
                .as_ref()
                .map(|r| r.schema.clone())
                .unwrap_or_default()
        })
        .text("database", |r| {
            r.record
                .as_ref()
                .map(|r| r.database.clone())
                .unwrap_or_default()
        })
        .text("status", |r| r.status.label().to_string())
        .text_or_null("error", |r| match &r.status {
            ViewStatus::Failed(reason) | ViewStatus::Recovering(reason) => Some(reason.clone()),
            _ => None,
        })
        .int("restarts", |r| {
            r.view.restarts.load(Ordering::SeqCst) as i64
        })
        .unsigned("epoch", |r| r.last.epoch)
        .unsigned("published_epoch", |r| r.published)
        .int("rows", |r| r.rows)
        .int("contents_bytes", |r| r.contents_bytes)
        .int("state_entries", |r| r.stats.state.entries as i64)
        .int("state_bytes", |r| r.stats.state.bytes as i64)
        .int("rows_processed", |r| r.stats.rows_in as i64)
        .int("rows_emitted", |r| r.stats.rows_out as i64)
        .int("state_reads", |r| r.stats.state.counters.reads as i64)
        .int("last_epoch_rows", |r| r.last.rows_in as i64)
        .int("last_epoch_state_reads", |r| r.last.state_reads as i64)
        .time_or_null("last_change", |r| r.last_change)
        .int("backfill_rows_done", |r| r.backfill.rows_done as i64)
        .int("backfill_rows_total", |r| r.backfill.rows_total as i64)
        .float("backfill_percent", |r| match r.backfill.rows_total {
            0 => 100.0,
            total => 100.0 * r.backfill.rows_done as f64 / total as f64,
        })
        .float_or_null("backfill_rows_per_sec", |r| {
            let b = &r.backfill;
            b.started.map(|s| {
                let secs = b
                    .finished
                    .map(|f| f.duration_since(s))
                    .unwrap_or_else(|| s.elapsed())
                    .as_secs_f64();
                b.rows_done as f64 / secs.max(1e-6)
            })
        })
        .int("workers", |r| r.workers as i64)
        .text("worker_rows", |r| {
            let rows: Vec<String> = r.stats.worker_rows.iter().map(|n| n.to_string()).collect();
            rows.join(",")
        })
        .text("sql", |r| r.view.provider.sql.clone())
        .build(move || {
            let published = views.published_epoch();
            let all = records.records();
            views
                .views()
                .into_iter()
                .map(|view| {
                    let (rows, contents_bytes) = view
                        .provider
                        .contents
                        .read()
                        .map(|c| (c.num_rows() as i64, c.memory_bytes() as i64))
                        .unwrap_or((0, 0));
                    Row {
                        record: all.iter().find(|r| r.id == view.id).cloned(),
                        status: view.status(),
                        last: view
                            .last_epoch
                            .lock()
                            .map(|l| l.clone())
                            .unwrap_or_default(),
                        stats: view.stats.lock().map(|s| s.clone()).unwrap_or_default(),
                        rows,
                        contents_bytes,
                        last_change: view.last_change.lock().ok().and_then(|t| *t),
                        backfill: view.backfill.lock().map(|b| b.clone()).unwrap_or_default(),
                        published,
                        workers: views.workers,
                        view,
                    }
                })
                .collect()
        });
    catalog.register_system_table("millrace_views", Arc::new(table));
}
