//! `millrace_sources`: one row per connector-fed table with its status (and since when and
//! why), offset, rows ingested, measured and target rate, failed commits and bad records;
//! `millrace_source_errors`: the most recent bad records, each with where it was and why;
//! `millrace_source_partitions`: the same figures per partition, with offsets and lag.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use millrace_planner::Catalog;
use millrace_planner::system_table::SystemTableBuilder;

use crate::catalog::options::UNLIMITED;
use crate::registry::sources::{PartitionStats, SourceStats, Sources};
use crate::registry::status::{SourceStatus, status_rows, with_status};

/// Registers `millrace_sources`, `millrace_source_errors` and `millrace_source_partitions`.
pub fn register(catalog: &Arc<Catalog>, sources: &Arc<Sources>) {
    let read = |m: &Mutex<u64>| m.lock().map(|v| *v as i64).unwrap_or(0);
    type Row = (Arc<SourceStats>, Option<SourceStatus>);
    let table = SystemTableBuilder::<Row>::new()
        .text("name", |(s, _)| s.name.clone())
        .text("connector", |(s, _)| s.connector.clone());
    let table = with_status(table, |(_, status)| status.as_ref())
        .int("offset", move |(s, _)| read(&s.offset))
        .int("rows_ingested", move |(s, _)| read(&s.rows))
        .float("rows_per_second", |(s, _)| {
            s.rate.lock().map(|r| *r).unwrap_or(0.0)
        })
        .int_or_null("max_rows_per_second", |(s, _)| {
            let limit = s.limit.load(Ordering::Relaxed);
            (limit != UNLIMITED).then_some(limit as i64)
        })
        .int_or_null("lag", |(s, _)| s.lag())
        .int("errors", move |(s, _)| read(&s.errors))
        .int("bad_records", move |(s, _)| read(&s.bad_records))
        .int("bad_records_evicted", move |(s, _)| read(&s.bad_evicted));
    let all = sources.clone();
    let table = table.build(move || status_rows(all.stats(), |s| &s.status, |s| &s.name));
    catalog.register_system_table("millrace_sources", Arc::new(table));
    register_errors(catalog, sources);
    register_partitions(catalog, sources);
}

/// Registers `millrace_source_partitions`: per partition of each source, the reader it is
/// assigned to, the committed offset, the broker's high watermark, the lag between them,
/// rows and bytes read, the rate and the bad records.
fn register_partitions(catalog: &Arc<Catalog>, sources: &Arc<Sources>) {
    type Row = (String, String, PartitionStats);
    let sources = sources.clone();
    let table = SystemTableBuilder::<Row>::new()
        .text("source", |(source, _, _)| source.clone())
        .text("partition", |(_, partition, _)| partition.clone())
        .int32_or_null("reader", |(_, _, p)| p.reader)
        .int("offset", |(_, _, p)| p.offset)
        .int_or_null("high_watermark", |(_, _, p)| p.high_watermark)
        .int_or_null("lag", |(_, _, p)| {
            p.high_watermark.map(|h| (h - p.offset).max(0))
        })
        .int("rows_ingested", |(_, _, p)| p.rows as i64)
        .int("bytes_ingested", |(_, _, p)| p.bytes as i64)
        .float("rows_per_second", |(_, _, p)| p.rate)
        .int("bad_records", |(_, _, p)| p.bad_records as i64)
        .build(move || {
            let mut all = sources.stats();
            all.sort_by(|a, b| a.name.cmp(&b.name));
            let mut rows = Vec::new();
            for s in &all {
                if let Ok(p) = s.partitions.lock() {
                    for (name, figures) in p.iter() {
                        rows.push((s.name.clone(), name.clone(), figures.clone()));
                    }
                }
            }
            rows
        });
    catalog.register_system_table("millrace_source_partitions", Arc::new(table));
}

/// Registers `millrace_source_errors`: the bad records kept, oldest first.
fn register_errors(catalog: &Arc<Catalog>, sources: &Arc<Sources>) {
    let sources = sources.clone();
    let table = SystemTableBuilder::new()
        .text("source", |b: &crate::registry::sources::BadRecord| {
            b.source.clone()
        })
        .text("partition", |b| b.partition.clone())
        .int("offset", |b| b.offset as i64)
        .text("payload", |b| b.payload.clone())
        .text("reason", |b| b.reason.clone())
        .time("time", |b| b.time)
        .build(move || sources.bad_records());
    catalog.register_system_table("millrace_source_errors", Arc::new(table));
}
