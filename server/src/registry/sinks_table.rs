//! `millrace_sinks`: one row per sink with its view, status (and since when and why), the
//! circuit breaker, the last sequence number given and delivered, rows delivered and errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use millrace_planner::Catalog;
use millrace_planner::system_table::SystemTableBuilder;

use crate::registry::sinks::{SinkStats, Sinks};
use crate::registry::status::{SourceStatus, status_rows, with_status};

/// Registers `millrace_sinks` in the catalog.
pub fn register(catalog: &Arc<Catalog>, sinks: &Arc<Sinks>) {
    type Row = (Arc<SinkStats>, Option<SourceStatus>);
    let table = SystemTableBuilder::<Row>::new()
        .text("name", |(s, _)| s.name.clone())
        .text("view", |(s, _)| s.view.clone())
        .text("connector", |(s, _)| s.connector.clone());
    let count = |a: &AtomicU64| a.load(Ordering::Relaxed) as i64;
    let table = with_status(table, |(_, status)| status.as_ref())
        .text("circuit", |(_, status)| {
            match status.as_ref().map(|s| s.state) {
                Some("circuit_open") => "open",
                Some("half_open") => "half_open",
                _ => "closed",
            }
            .to_string()
        })
        .int("circuit_opened", move |(s, _)| count(&s.circuit_opened))
        .int("seq", move |(s, _)| count(&s.seq))
        .int("delivered_seq", move |(s, _)| count(&s.delivered))
        .int("rows_delivered", move |(s, _)| count(&s.rows))
        .int("errors", move |(s, _)| count(&s.errors))
        .int("consecutive_failures", move |(s, _)| {
            count(&s.consecutive_failures)
        });
    let sinks = sinks.clone();
    let table = table.build(move || status_rows(sinks.stats(), |s| &s.status, |s| &s.name));
    catalog.register_system_table("millrace_sinks", Arc::new(table));
}
