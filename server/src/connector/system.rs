//! `millrace_sources`: one row per connector-fed table with its status (and since when and
//! why), offset, rows ingested, measured and target rate, and failed commits.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
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
        Field::new("max_rows_per_second", DataType::Int64, false),
        Field::new("errors", DataType::Int64, false),
    ]));
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
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                all.iter().map(|s| s.name.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                all.iter().map(|s| s.connector.as_str()),
            )),
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
            Arc::new(Int64Array::from_iter_values(
                all.iter().map(|s| read(&s.offset)),
            )),
            Arc::new(Int64Array::from_iter_values(
                all.iter().map(|s| read(&s.rows)),
            )),
            Arc::new(Float64Array::from_iter_values(
                all.iter().map(|s| s.rate.lock().map(|r| *r).unwrap_or(0.0)),
            )),
            Arc::new(Int64Array::from_iter_values(all.iter().map(|s| {
                s.limit.load(std::sync::atomic::Ordering::Relaxed) as i64
            }))),
            Arc::new(Int64Array::from_iter_values(
                all.iter().map(|s| read(&s.errors)),
            )),
        ];
        Ok(RecordBatch::try_new(table_schema.clone(), columns)?)
    });
    catalog.register_system_table("millrace_sources", Arc::new(SystemTable::new(schema, fill)));
}
