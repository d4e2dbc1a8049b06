//! What a source or sink is doing (running, unhealthy, retrying, circuit open...), with the
//! time it entered that state, as the system tables show it.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use millrace_planner::system_table::SystemTableBuilder;

/// What a source or sink is doing, as `millrace_sources` and `millrace_sinks` show it.
#[derive(Debug, Clone)]
pub struct SourceStatus {
    /// `running`, `unhealthy`, `finished` or `stopped` (sources); `starting`, `running`,
    /// `retrying`, `circuit_open`, `half_open` or `stopped` (sinks).
    pub state: &'static str,
    /// Why it is not running.
    pub reason: Option<String>,
    /// When it entered this state.
    pub since: SystemTime,
}

/// A status that changes its `since` only when the state or the reason changes.
pub trait StatusCell {
    /// Sets the state and reason.
    fn change(&self, state: &'static str, reason: Option<String>);
}

impl StatusCell for Mutex<SourceStatus> {
    fn change(&self, state: &'static str, reason: Option<String>) {
        if let Ok(mut s) = self.lock()
            && (s.state != state || s.reason != reason)
        {
            *s = SourceStatus {
                state,
                reason,
                since: SystemTime::now(),
            };
        }
    }
}

/// Adds the `status`, `reason` and `status_since` columns of a source or sink to a system
/// table, read off the status a row carries (`unknown` when it could not be read).
pub fn with_status<R: 'static>(
    table: SystemTableBuilder<R>,
    status: fn(&R) -> Option<&SourceStatus>,
) -> SystemTableBuilder<R> {
    table
        .text("status", move |r| {
            status(r).map_or("unknown", |s| s.state).to_string()
        })
        .text_or_null("reason", move |r| status(r).and_then(|s| s.reason.clone()))
        .time("status_since", move |r| {
            status(r).map_or(UNIX_EPOCH, |s| s.since)
        })
}

/// Each of `items` (sources' or sinks' figures) with a snapshot of its status, by name: the
/// rows of `millrace_sources` and `millrace_sinks`.
pub fn status_rows<S>(
    items: Vec<Arc<S>>,
    status: fn(&S) -> &Mutex<SourceStatus>,
    name: fn(&S) -> &str,
) -> Vec<(Arc<S>, Option<SourceStatus>)> {
    let mut rows: Vec<(Arc<S>, Option<SourceStatus>)> = items
        .into_iter()
        .map(|item| {
            let snapshot = status(&item).lock().map(|st| st.clone()).ok();
            (item, snapshot)
        })
        .collect();
    rows.sort_by(|a, b| name(&a.0).cmp(name(&b.0)));
    rows
}
