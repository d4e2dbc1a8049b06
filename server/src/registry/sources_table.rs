//! `millrace_sources`: one row per connector-fed table with its status (and since when and
//! why), offset, rows ingested, measured and target rate, failed commits and bad records;
//! `millrace_source_errors`: the most recent bad records, each with where it was and why;
//! `millrace_source_partitions`: the same figures per partition, with offsets and lag.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use millrace_planner::Catalog;
use millrace_planner::system_table::SystemTable;

use super::Sources;

/// Registers `millrace_sources` in the catalog.
pub fn register(catalog: &Arc<Catalog>, sources: &Arc<Sources>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("connector", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new(
            "status_since",
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            false,
        ),
        Field::new("offset", DataType::Int64, false),
        Field::new("rows_ingested", DataType::Int64, false),
        Field::new("rows_per_second", DataType::Float64, false),
        Field::new("max_rows_per_second", DataType::Int64, true),
        Field::new("lag", DataType::Int64, true),
        Field::new("errors", DataType::Int64, false),
        Field::new("bad_records", DataType::Int64, false),
        Field::new("bad_records_evicted", DataType::Int64, false),
    ]));
    register_errors(catalog, sources);
    register_partitions(catalog, sources);
    let sources = sources.clone();
    let table_schema = schema.clone();
    let fill = Arc::new(move || {
        let mut all = sources.stats();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let read = |m: &std::sync::Mutex<u64>| m.lock().map(|v| *v as i64).unwrap_or(0);
        let statuses: Vec<_> = all
            .iter()
            .map(|s| s.status.lock().map(|st| st.clone()).ok())
            .collect();
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                all.iter().map(|s| s.name.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                all.iter().map(|s| s.connector.as_str()),
            )),
        ];
        columns.extend(status_columns(&statuses));
        columns.extend::<[ArrayRef; 8]>([
            Arc::new(Int64Array::from_iter_values(
                all.iter().map(|s| read(&s.offset)),
            )),
            Arc::new(Int64Array::from_iter_values(
                all.iter().map(|s| read(&s.rows)),
            )),
            Arc::new(Float64Array::from_iter_values(
                all.iter().map(|s| s.rate.lock().map(|r| *r).unwrap_or(0.0)),
            )),
            Arc::new(Int64Array::from_iter(all.iter().map(|s| {
                let limit = s.limit.load(std::sync::atomic::Ordering::Relaxed);
                (limit != super::UNLIMITED).then_some(limit as i64)
            }))),
            Arc::new(Int64Array::from_iter(all.iter().map(|s| s.lag()))),
            Arc::new(Int64Array::from_iter_values(
                all.iter().map(|s| read(&s.errors)),
            )),
            Arc::new(Int64Array::from_iter_values(
                all.iter().map(|s| read(&s.bad_records)),
            )),
            Arc::new(Int64Array::from_iter_values(
                all.iter().map(|s| read(&s.bad_evicted)),
            )),
        ]);
        Ok(RecordBatch::try_new(table_schema.clone(), columns)?)
    });
    catalog.register_system_table("millrace_sources", Arc::new(SystemTable::new(schema, fill)));
}

/// Registers `millrace_source_partitions`: per partition of each source, the committed
/// reader it is assigned to, the committed offset, the broker's high watermark, the lag between them, rows and bytes read, the rate
/// and the bad records.
fn register_partitions(catalog: &Arc<Catalog>, sources: &Arc<Sources>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("partition", DataType::Utf8, false),
        Field::new("reader", DataType::Int32, true),
        Field::new("offset", DataType::Int64, false),
        Field::new("high_watermark", DataType::Int64, true),
        Field::new("lag", DataType::Int64, true),
        Field::new("rows_ingested", DataType::Int64, false),
        Field::new("bytes_ingested", DataType::Int64, false),
        Field::new("rows_per_second", DataType::Float64, false),
        Field::new("bad_records", DataType::Int64, false),
    ]));
    let sources = sources.clone();
    let table_schema = schema.clone();
    let fill = Arc::new(move || {
        let mut all = sources.stats();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let mut parts = Vec::new();
        for s in &all {
            if let Ok(p) = s.partitions.lock() {
                for (name, figures) in p.iter() {
                    parts.push((s.name.clone(), name.clone(), figures.clone()));
                }
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                parts.iter().map(|p| p.0.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                parts.iter().map(|p| p.1.as_str()),
            )),
            Arc::new(Int32Array::from_iter(parts.iter().map(|p| p.2.reader))),
            Arc::new(Int64Array::from_iter_values(
                parts.iter().map(|p| p.2.offset),
            )),
            Arc::new(Int64Array::from_iter(
                parts.iter().map(|p| p.2.high_watermark),
            )),
            Arc::new(Int64Array::from_iter(
                parts
                    .iter()
                    .map(|p| p.2.high_watermark.map(|h| (h - p.2.offset).max(0))),
            )),
            Arc::new(Int64Array::from_iter_values(
                parts.iter().map(|p| p.2.rows as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                parts.iter().map(|p| p.2.bytes as i64),
            )),
            Arc::new(Float64Array::from_iter_values(
                parts.iter().map(|p| p.2.rate),
            )),
            Arc::new(Int64Array::from_iter_values(
                parts.iter().map(|p| p.2.bad_records as i64),
            )),
        ];
        Ok(RecordBatch::try_new(table_schema.clone(), columns)?)
    });
    catalog.register_system_table(
        "millrace_source_partitions",
        Arc::new(SystemTable::new(schema, fill)),
    );
}

/// The `status`, `reason` and `status_since` columns of sources or sinks.
pub fn status_columns(statuses: &[Option<super::SourceStatus>]) -> Vec<ArrayRef> {
    vec![
        Arc::new(StringArray::from_iter_values(
            statuses
                .iter()
                .map(|s| s.as_ref().map_or("unknown", |s| s.state)),
        )),
        Arc::new(StringArray::from_iter(
            statuses
                .iter()
                .map(|s| s.as_ref().and_then(|s| s.reason.clone())),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(statuses.iter().map(|s| {
                s.as_ref()
                    .and_then(|s| s.since.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_micros() as i64)
            }))
            .with_timezone("+00:00"),
        ),
    ]
}

/// Registers `millrace_source_errors`.
fn register_errors(catalog: &Arc<Catalog>, sources: &Arc<Sources>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("partition", DataType::Utf8, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("payload", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            false,
        ),
    ]));
    let sources = sources.clone();
    let table_schema = schema.clone();
    let fill = Arc::new(move || {
        let bad = sources.bad_records();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                bad.iter().map(|b| b.source.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                bad.iter().map(|b| b.partition.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(
                bad.iter().map(|b| b.offset as i64),
            )),
            Arc::new(StringArray::from_iter_values(
                bad.iter().map(|b| b.payload.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                bad.iter().map(|b| b.reason.as_str()),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(bad.iter().map(|b| {
                    b.time
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros() as i64)
                }))
                .with_timezone("+00:00"),
            ),
        ];
        Ok(RecordBatch::try_new(table_schema.clone(), columns)?)
    });
    catalog.register_system_table(
        "millrace_source_errors",
        Arc::new(SystemTable::new(schema, fill)),
    );
}
