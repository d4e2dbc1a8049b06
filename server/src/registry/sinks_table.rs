//! `millrace_sinks`: one row per sink with its view, status (and since when and why), the
//! circuit breaker, the last sequence number given and delivered, rows delivered and errors.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use millrace_planner::Catalog;
use millrace_planner::system_table::SystemTable;

use super::Sinks;
use crate::connector::system::status_columns;

/// Registers `millrace_sinks` in the catalog.
pub fn register(catalog: &Arc<Catalog>, sinks: &Arc<Sinks>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("view", DataType::Utf8, false),
        Field::new("connector", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new(
            "status_since",
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            false,
        ),
        Field::new("circuit", DataType::Utf8, false),
        Field::new("circuit_opened", DataType::Int64, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("delivered_seq", DataType::Int64, false),
        Field::new("rows_delivered", DataType::Int64, false),
        Field::new("errors", DataType::Int64, false),
        Field::new("consecutive_failures", DataType::Int64, false),
    ]));
    let sinks = sinks.clone();
    let table_schema = schema.clone();
    let fill = Arc::new(move || {
        let mut all = sinks.stats();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let statuses: Vec<_> = all
            .iter()
            .map(|s| s.status.lock().map(|st| st.clone()).ok())
            .collect();
        let state = |i: usize| statuses[i].as_ref().map_or("unknown", |s| s.state);
        let counter = |f: fn(&super::SinkStats) -> &std::sync::atomic::AtomicU64| {
            Arc::new(Int64Array::from_iter_values(
                all.iter().map(|s| f(s).load(Ordering::Relaxed) as i64),
            )) as ArrayRef
        };
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                all.iter().map(|s| s.name.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                all.iter().map(|s| s.view.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                all.iter().map(|s| s.connector.as_str()),
            )),
        ];
        columns.extend(status_columns(&statuses));
        columns.extend([
            Arc::new(StringArray::from_iter_values((0..all.len()).map(
                |i| match state(i) {
                    "circuit_open" => "open",
                    "half_open" => "half_open",
                    _ => "closed",
                },
            ))),
            counter(|s| &s.circuit_opened),
            counter(|s| &s.seq),
            counter(|s| &s.delivered),
            counter(|s| &s.rows),
            counter(|s| &s.errors),
            counter(|s| &s.consecutive_failures),
        ]);
        Ok(RecordBatch::try_new(table_schema.clone(), columns)?)
    });
    catalog.register_system_table("millrace_sinks", Arc::new(SystemTable::new(schema, fill)));
}
