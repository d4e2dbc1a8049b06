//! The registry of running sinks: each sink's live figures (sequence numbers given and
//! delivered, rows, errors, circuit breaker, status) and the switch that stops its delivery
//! task. `sink::start` starts the tasks and registers them here.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::registry::status::{SourceStatus, StatusCell};

/// Live figures of one sink.
#[derive(Debug)]
pub struct SinkStats {
    /// Sink name.
    pub name: String,
    /// The view it reads.
    pub view: String,
    /// Connector name.
    pub connector: String,
    /// Last sequence number given to a change.
    pub seq: AtomicU64,
    /// Last sequence number delivered.
    pub delivered: AtomicU64,
    /// Row changes (copies) delivered since the server started.
    pub rows: AtomicU64,
    /// Failed deliveries since the server started.
    pub errors: AtomicU64,
    /// Failed deliveries since the last success.
    pub consecutive_failures: AtomicU64,
    /// Times the circuit opened.
    pub circuit_opened: AtomicU64,
    /// Current state.
    pub status: Mutex<SourceStatus>,
}

impl SinkStats {
    pub fn set_status(&self, state: &'static str, reason: Option<String>) {
        self.status.change(state, reason);
    }
}

pub(crate) struct SinkHandle {
    stats: Arc<SinkStats>,
    stop: watch::Sender<bool>,
}

/// Every running sink.
#[derive(Default)]
pub struct Sinks {
    running: Mutex<HashMap<u64, SinkHandle>>,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks").finish()
    }
}

impl Sinks {
    /// Figures of every sink.
    pub fn stats(&self) -> Vec<Arc<SinkStats>> {
        self.running
            .lock()
            .map(|r| r.values().map(|h| h.stats.clone()).collect())
            .unwrap_or_default()
    }

    /// Stops sink `id`, if running.
    pub fn stop(&self, id: u64) {
        if let Ok(mut running) = self.running.lock()
            && let Some(handle) = running.remove(&id)
        {
            let _ = handle.stop.send(true);
        }
    }

    /// Lists a started sink's handle (`sink::start`), replacing a stopped one.
    pub fn register(&self, id: u64, stats: Arc<SinkStats>, stop: watch::Sender<bool>) {
        if let Ok(mut running) = self.running.lock() {
            running.insert(id, SinkHandle { stats, stop });
        }
    }
}
