//! `millrace_events`: what happened to the server's pipelines, newest last — a view's task
//! failing and its cause, each restart attempt and its outcome, a view given up on, and the
//! progress of start-up recovery (views restored from the checkpoint or rebuilt). Every event is logged too; the table keeps the latest
//! [`CAPACITY`] in memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use datafusion::arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use millrace_planner::Catalog;
use millrace_planner::system_table::SystemTable;
use tracing::{info, warn};

/// Events kept for `millrace_events`.
pub const CAPACITY: usize = 10_000;

/// One event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Numbered from 1 since the server started.
    pub seq: u64,
    pub time: SystemTime,
    /// What happened: `task_failed`, `view_restarting`, `view_restarted`, `view_failed`,
    /// `view_restored`, `checkpoint_replayed`, `recovery_started`, `recovery_finished`.
    pub kind: &'static str,
    /// The object it happened to (a view's name), if any.
    pub object: Option<String>,
    /// Restart attempt, for the restart events.
    pub attempt: Option<u32>,
    /// The cause or outcome.
    pub detail: String,
}

/// The bounded list of recent events.
#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<(u64, VecDeque<Event>)>,
}

impl EventLog {
    /// Records (and logs) an event; failures log as warnings.
    pub fn record(
        &self,
        kind: &'static str,
        object: Option<&str>,
        attempt: Option<u32>,
        detail: impl Into<String>,
    ) {
        let detail = detail.into();
        let object_name = object.unwrap_or("");
        if matches!(kind, "task_failed" | "view_failed" | "view_restarting") {
            warn!(event = kind, object = object_name, attempt, %detail, "pipeline event");
        } else {
            info!(event = kind, object = object_name, attempt, %detail, "pipeline event");
        }
        if let Ok(mut events) = self.events.lock() {
            events.0 += 1;
            let seq = events.0;
            if events.1.len() == CAPACITY {
                events.1.pop_front();
            }
            events.1.push_back(Event {
                seq,
                time: SystemTime::now(),
                kind,
                object: object.map(str::to_string),
                attempt,
                detail,
            });
        }
    }

    /// The events kept, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .map(|e| e.1.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Registers `millrace_events`.
pub fn register(catalog: &Arc<Catalog>, log: &Arc<EventLog>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("seq", DataType::Int64, false),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            false,
        ),
        Field::new("kind", DataType::Utf8, false),
        Field::new("object", DataType::Utf8, true),
        Field::new("attempt", DataType::Int64, true),
        Field::new("detail", DataType::Utf8, false),
    ]));
    let log = log.clone();
    let table_schema = schema.clone();
    let fill = Arc::new(move || {
        let events = log.events();
        let micros = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0)
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(
                events.iter().map(|e| e.seq as i64),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(events.iter().map(|e| micros(e.time)))
                    .with_timezone("+00:00"),
            ),
            Arc::new(StringArray::from_iter_values(events.iter().map(|e| e.kind))),
            Arc::new(StringArray::from_iter(
                events.iter().map(|e| e.object.as_deref()),
            )),
            Arc::new(Int64Array::from_iter(
                events.iter().map(|e| e.attempt.map(i64::from)),
            )),
            Arc::new(StringArray::from_iter_values(
                events.iter().map(|e| e.detail.as_str()),
            )),
        ];
        Ok(RecordBatch::try_new(table_schema.clone(), columns)?)
    });
    catalog.register_system_table("millrace_events", Arc::new(SystemTable::new(schema, fill)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_events_numbered() {
        let log = EventLog::default();
        for i in 0..(CAPACITY + 5) {
            log.record("view_restarted", Some("v"), Some(1), format!("{i}"));
        }
        let events = log.events();
        assert_eq!(events.len(), CAPACITY);
        assert_eq!(events[0].seq, 6);
        assert_eq!(events[0].detail, "5");
        assert_eq!(events.last().map(|e| e.seq), Some(CAPACITY as u64 + 5));
    }
}
