//! `millrace_views`: one row per materialized view with its status, epoch, size, state and
//! throughput figures, and backfill progress. Computed when scanned.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use millrace_planner::Catalog;
use millrace_planner::system_table::SystemTable;

use millrace_planner::view_table::ViewStatus;

use super::ViewRuntime;

/// Registers the runtime's system tables in the catalog.
pub fn register(catalog: &Arc<Catalog>, runtime: &Arc<ViewRuntime>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("schema", DataType::Utf8, false),
        Field::new("database", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("restarts", DataType::Int64, false),
        Field::new("epoch", DataType::UInt64, false),
        Field::new("published_epoch", DataType::UInt64, false),
        Field::new("rows", DataType::Int64, false),
        Field::new("contents_bytes", DataType::Int64, false),
        Field::new("state_entries", DataType::Int64, false),
        Field::new("state_bytes", DataType::Int64, false),
        Field::new("rows_processed", DataType::Int64, false),
        Field::new("rows_emitted", DataType::Int64, false),
        Field::new("state_reads", DataType::Int64, false),
        Field::new("last_epoch_rows", DataType::Int64, false),
        Field::new("last_epoch_state_reads", DataType::Int64, false),
        Field::new(
            "last_change",
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            true,
        ),
        Field::new("backfill_rows_done", DataType::Int64, false),
        Field::new("backfill_rows_total", DataType::Int64, false),
        Field::new("backfill_percent", DataType::Float64, false),
        Field::new("backfill_rows_per_sec", DataType::Float64, true),
        Field::new("workers", DataType::Int64, false),
        Field::new("worker_rows", DataType::Utf8, false),
        Field::new("sql", DataType::Utf8, false),
    ]));
    let views = runtime.clone();
    let records = catalog.clone();
    let table_schema = schema.clone();
    let fill = Arc::new(move || {
        let published = views.published_epoch();
        let entries = views.views();
        let mut name = Vec::new();
        let mut schema_name = Vec::new();
        let mut database = Vec::new();
        let mut status = Vec::new();
        let mut error = Vec::new();
        let mut restarts = Vec::new();
        let mut epoch = Vec::new();
        let mut rows = Vec::new();
        let mut contents_bytes = Vec::new();
        let mut state_entries = Vec::new();
        let mut state_bytes = Vec::new();
        let mut processed = Vec::new();
        let mut emitted = Vec::new();
        let mut reads = Vec::new();
        let mut last_rows = Vec::new();
        let mut last_reads = Vec::new();
        let mut last_change = Vec::new();
        let mut done = Vec::new();
        let mut total = Vec::new();
        let mut percent = Vec::new();
        let mut rate = Vec::new();
        let mut workers = Vec::new();
        let mut worker_rows = Vec::new();
        let mut sql = Vec::new();
        let all = records.records();
        for v in &entries {
            let record = all.iter().find(|r| r.id == v.id);
            name.push(v.provider.name.clone());
            schema_name.push(record.map(|r| r.schema.clone()).unwrap_or_default());
            database.push(record.map(|r| r.database.clone()).unwrap_or_default());
            let st = v.status();
            status.push(st.label().to_string());
            error.push(match st {
                ViewStatus::Failed(reason) | ViewStatus::Recovering(reason) => Some(reason),
                _ => None,
            });
            restarts.push(v.restarts.load(std::sync::atomic::Ordering::SeqCst) as i64);
            let last = v.last_epoch.lock().map(|l| l.clone()).unwrap_or_default();
            let stats = v.stats.lock().map(|s| s.clone()).unwrap_or_default();
            epoch.push(last.epoch);
            let (n, bytes) = v
                .provider
                .contents
                .read()
                .map(|c| (c.num_rows() as i64, c.memory_bytes() as i64))
                .unwrap_or((0, 0));
            rows.push(n);
            contents_bytes.push(bytes);
            state_entries.push(stats.state.entries as i64);
            state_bytes.push(stats.state.bytes as i64);
            processed.push(stats.rows_in as i64);
            emitted.push(stats.rows_out as i64);
            reads.push(stats.state.counters.reads as i64);
            last_rows.push(last.rows_in as i64);
            last_reads.push(last.state_reads as i64);
            last_change.push(
                v.last_change
                    .lock()
                    .ok()
                    .and_then(|t| *t)
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_micros() as i64),
            );
            let b = v.backfill.lock().map(|b| b.clone()).unwrap_or_default();
            done.push(b.rows_done as i64);
            total.push(b.rows_total as i64);
            percent.push(if b.rows_total == 0 {
                100.0
            } else {
                100.0 * b.rows_done as f64 / b.rows_total as f64
            });
            rate.push(b.started.map(|s| {
                let secs = b
                    .finished
                    .map(|f| f.duration_since(s))
                    .unwrap_or_else(|| s.elapsed())
                    .as_secs_f64();
                b.rows_done as f64 / secs.max(1e-6)
            }));
            workers.push(views.workers as i64);
            worker_rows.push(
                stats
                    .worker_rows
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            sql.push(v.provider.sql.clone());
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(name)),
            Arc::new(StringArray::from(schema_name)),
            Arc::new(StringArray::from(database)),
            Arc::new(StringArray::from(status)),
            Arc::new(StringArray::from(error)),
            Arc::new(Int64Array::from(restarts)),
            Arc::new(UInt64Array::from(epoch)),
            Arc::new(UInt64Array::from(vec![published; entries.len()])),
            Arc::new(Int64Array::from(rows)),
            Arc::new(Int64Array::from(contents_bytes)),
            Arc::new(Int64Array::from(state_entries)),
            Arc::new(Int64Array::from(state_bytes)),
            Arc::new(Int64Array::from(processed)),
            Arc::new(Int64Array::from(emitted)),
            Arc::new(Int64Array::from(reads)),
            Arc::new(Int64Array::from(last_rows)),
            Arc::new(Int64Array::from(last_reads)),
            Arc::new(TimestampMicrosecondArray::from(last_change).with_timezone("+00:00")),
            Arc::new(Int64Array::from(done)),
            Arc::new(Int64Array::from(total)),
            Arc::new(Float64Array::from(percent)),
            Arc::new(Float64Array::from(rate)),
            Arc::new(Int64Array::from(workers)),
            Arc::new(StringArray::from(worker_rows)),
            Arc::new(StringArray::from(sql)),
        ];
        Ok(RecordBatch::try_new(table_schema.clone(), columns)?)
    });
    catalog.register_system_table("millrace_views", Arc::new(SystemTable::new(schema, fill)));
}
