//! `millrace_events`: what happened to the server's pipelines, newest last — a view's task
//! failing and its cause, each restart attempt and its outcome, a view given up on, and the
//! progress of start-up recovery (views restored from the checkpoint or rebuilt). Every
//! event is logged too; the table keeps the latest [`CAPACITY`] in memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use millrace_planner::Catalog;
use millrace_planner::system_table::SystemTableBuilder;
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
    let log = log.clone();
    let table = SystemTableBuilder::new()
        .int("seq", |e: &Event| e.seq as i64)
        .time("time", |e| e.time)
        .text("kind", |e| e.kind.to_string())
        .text_or_null("object", |e| e.object.clone())
        .int_or_null("attempt", |e| e.attempt.map(i64::from))
        .text("detail", |e| e.detail.clone())
        .build(move || log.events());
    catalog.register_system_table("millrace_events", Arc::new(table));
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
