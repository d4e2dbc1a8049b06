//! The registry of running sources: each connector-fed table's figures (rows, rate, offsets
//! by partition, status), the switch that stops its ingest task, and the bad records kept
//! for `millrace_source_errors`. Connectors (`connector/`) start the tasks and register them
//! here; statements and system tables read it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use millrace_storage::WriteSet;
use tokio::sync::watch;
use tracing::warn;

use crate::error::{Result, ServerError};
use crate::registry::status::{SourceStatus, StatusCell};

/// Longest wait between retries of a failing source.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Live figures of one source.
#[derive(Debug)]
pub struct SourceStats {
    /// Table name.
    pub name: String,
    /// Connector name.
    pub connector: String,
    /// Next offset to generate (all before it are committed).
    pub offset: Mutex<u64>,
    /// Rows committed since the server started.
    pub rows: Mutex<u64>,
    /// Rows per second over the last second or so.
    pub rate: Mutex<f64>,
    /// Target rows per second (`ALTER TABLE ... SET (rows_per_second = n)` changes it live).
    pub limit: AtomicU64,
    /// Failed commits and unreadable inputs.
    pub errors: Mutex<u64>,
    /// Bad records skipped (each listed in `millrace_source_errors` until evicted).
    pub bad_records: Mutex<u64>,
    /// This source's bad records evicted from `millrace_source_errors`.
    pub bad_evicted: Mutex<u64>,
    /// Current state.
    pub status: Mutex<SourceStatus>,
    /// Figures by partition (Kafka partition), by name.
    pub partitions: Mutex<BTreeMap<String, PartitionStats>>,
    /// Start of the current rate window and rows counted in it.
    window: Mutex<(Instant, u64)>,
}

/// Figures of one partition of a source.
#[derive(Debug, Clone, Default)]
pub struct PartitionStats {
    /// The reader (thread and consumer) the partition is assigned to, if any.
    pub reader: Option<i32>,
    /// Next offset to read (all before it are committed).
    pub offset: i64,
    /// The broker's high watermark when last probed.
    pub high_watermark: Option<i64>,
    /// Rows committed since the server started.
    pub rows: u64,
    /// Payload bytes read since the server started.
    pub bytes: u64,
    /// Bad records.
    pub bad_records: u64,
    /// Rows per second between the last two probes.
    pub rate: f64,
    /// Time and row count of the last probe.
    window: Option<(Instant, u64)>,
}

impl SourceStats {
    /// Records a failure of source `name`: counted, logged, status unhealthy with the cause.
    /// Returns how long to wait before retrying and doubles `backoff` (up to a bound).
    pub fn failed(&self, name: &str, error: &ServerError, backoff: &mut Duration) -> Duration {
        Self::count(&self.errors, 1);
        warn!(source = %name, error = %error, retry_in_ms = backoff.as_millis() as u64, "source unhealthy");
        self.set_status("unhealthy", Some(error.to_string()));
        let wait = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        wait
    }

    /// A new source's figures, starting at `offset`.
    pub fn new(name: String, connector: String, offset: u64, limit: u64) -> Self {
        Self {
            name,
            connector,
            offset: Mutex::new(offset),
            rows: Mutex::new(0),
            rate: Mutex::new(0.0),
            limit: AtomicU64::new(limit),
            errors: Mutex::new(0),
            bad_records: Mutex::new(0),
            bad_evicted: Mutex::new(0),
            status: Mutex::new(SourceStatus {
                state: "running",
                reason: None,
                since: SystemTime::now(),
            }),
            partitions: Mutex::new(BTreeMap::new()),
            window: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Messages behind the broker's high watermarks, summed over partitions (None when no
    /// partition has a known high watermark).
    pub fn lag(&self) -> Option<i64> {
        let parts = self.partitions.lock().ok()?;
        parts
            .values()
            .filter_map(|p| p.high_watermark.map(|h| (h - p.offset).max(0)))
            .reduce(|a, b| a + b)
    }

    /// Counts `n` committed rows into the measured rate (a window of about a second).
    pub fn note_rows(&self, n: u64) {
        if let Ok(mut window) = self.window.lock() {
            window.1 += n;
            let elapsed = window.0.elapsed();
            if elapsed >= Duration::from_secs(1) {
                if let Ok(mut rate) = self.rate.lock() {
                    *rate = window.1 as f64 / elapsed.as_secs_f64();
                }
                *window = (Instant::now(), 0);
            }
        }
    }

    pub fn count(counter: &Mutex<u64>, n: u64) {
        if let Ok(mut c) = counter.lock() {
            *c += n;
        }
    }

    pub fn set_status(&self, state: &'static str, reason: Option<String>) {
        self.status.change(state, reason);
    }
}

impl PartitionStats {
    /// Refreshes the rate from the rows counted since the last tick.
    pub fn tick(&mut self) {
        let now = Instant::now();
        if let Some((at, rows)) = self.window {
            let secs = now.duration_since(at).as_secs_f64();
            if secs > 0.0 {
                self.rate = (self.rows - rows) as f64 / secs;
            }
        }
        self.window = Some((now, self.rows));
    }
}

/// A running source: its figures and the switch that stops it.
pub(crate) struct SourceHandle {
    stats: Arc<SourceStats>,
    stop: watch::Sender<bool>,
    /// Made by CREATE SOURCE: fed only by its connector, never by DML.
    read_only: bool,
}

/// Bad records kept in `millrace_source_errors`, oldest evicted first.
pub const BAD_RECORDS_KEPT: usize = 10_000;

/// One bad record: where it was and why it was refused.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BadRecord {
    /// The table the source feeds.
    pub source: String,
    /// Partition or file.
    pub partition: String,
    /// Offset or line number (1-based).
    pub offset: u64,
    /// The record's first bytes, decoded lossily.
    pub payload: String,
    /// Why it was refused.
    pub reason: String,
    /// When it was seen.
    pub time: SystemTime,
}

/// Bad records staged with a commit, published once it is durable.
#[derive(Debug, Default)]
pub struct StagedBad {
    records: Vec<(u64, BadRecord)>,
}

/// Every connector-fed table's ingest task.
#[derive(Default)]
pub struct Sources {
    running: Mutex<HashMap<u64, SourceHandle>>,
    /// The most recent bad records of all sources, by number, oldest first.
    bad: Mutex<VecDeque<(u64, BadRecord)>>,
    /// Number of the next bad record.
    next_bad: AtomicU64,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish()
    }
}

impl Sources {
    /// Loads the bad records kept in the store (at start, before any source runs).
    pub fn load_bad_records(&self, store: &millrace_storage::Store) -> Result<()> {
        let mut kept = VecDeque::new();
        let mut last = 0;
        for (seq, bytes) in store.bad_records()? {
            last = seq;
            match serde_json::from_slice::<BadRecord>(&bytes) {
                Ok(record) => kept.push_back((seq, record)),
                Err(e) => warn!(seq, error = %e, "unreadable stored bad record skipped"),
            }
        }
        let mut set = WriteSet::new();
        while kept.len() > BAD_RECORDS_KEPT {
            if let Some((seq, _)) = kept.pop_front() {
                set.delete_bad_record(seq);
            }
        }
        store.commit(set)?;
        self.next_bad.store(last + 1, Ordering::SeqCst);
        if let Ok(mut bad) = self.bad.lock() {
            *bad = kept;
        }
        Ok(())
    }

    /// Numbers `records` and adds them to `set`, with the eviction of the oldest kept ones
    /// beyond [`BAD_RECORDS_KEPT`], so they become durable with the rows read beside them.
    pub fn stage_bad(&self, records: Vec<BadRecord>, set: &mut WriteSet) -> Result<StagedBad> {
        let mut staged = StagedBad::default();
        for record in records {
            let seq = self.next_bad.fetch_add(1, Ordering::SeqCst);
            let bytes = serde_json::to_vec(&record)
                .map_err(|e| ServerError::Internal(format!("bad record: {e}")))?;
            set.put_bad_record(seq, bytes);
            staged.records.push((seq, record));
        }
        if let Ok(bad) = self.bad.lock() {
            let over = (bad.len() + staged.records.len()).saturating_sub(BAD_RECORDS_KEPT);
            for (seq, _) in bad.iter().take(over) {
                set.delete_bad_record(*seq);
            }
        }
        Ok(staged)
    }

    /// Lists committed bad records of source `stats`, evicting the oldest beyond
    /// [`BAD_RECORDS_KEPT`] (counted against the source they came from).
    pub fn publish_bad(&self, stats: &Arc<SourceStats>, staged: StagedBad) {
        SourceStats::count(&stats.bad_records, staged.records.len() as u64);
        let mut evicted: Vec<String> = Vec::new();
        if let Ok(mut bad) = self.bad.lock() {
            bad.extend(staged.records);
            while bad.len() > BAD_RECORDS_KEPT {
                if let Some((_, record)) = bad.pop_front() {
                    evicted.push(record.source);
                }
            }
        }
        if evicted.is_empty() {
            return;
        }
        for owner in self.stats() {
            let n = evicted.iter().filter(|s| **s == owner.name).count() as u64;
            if n > 0 {
                SourceStats::count(&owner.bad_evicted, n);
            }
        }
    }

    /// The bad records kept, oldest first.
    pub fn bad_records(&self) -> Vec<BadRecord> {
        self.bad
            .lock()
            .map(|b| b.iter().map(|(_, r)| r.clone()).collect())
            .unwrap_or_default()
    }

    /// Figures of every source, by table id.
    pub fn stats(&self) -> Vec<Arc<SourceStats>> {
        self.running
            .lock()
            .map(|r| r.values().map(|h| h.stats.clone()).collect())
            .unwrap_or_default()
    }

    /// Refuses a write to `name` (table id `id`) if it is a source made by CREATE SOURCE.
    pub fn check_writable(&self, id: u64, name: &str) -> Result<()> {
        let read_only = self
            .running
            .lock()
            .map(|r| r.get(&id).is_some_and(|h| h.read_only))
            .unwrap_or(false);
        if read_only {
            return Err(ServerError::WrongObjectType(format!(
                "cannot change source \"{name}\": a source is fed only by its connector"
            )));
        }
        Ok(())
    }

    /// Sets the rate of the source feeding table `id`, if any.
    pub fn set_rate(&self, id: u64, rows_per_second: u64) {
        if let Ok(running) = self.running.lock()
            && let Some(handle) = running.get(&id)
        {
            handle
                .stats
                .limit
                .store(rows_per_second.max(1), Ordering::Relaxed);
        }
    }

    /// Stops the source feeding table `id`, if any.
    pub fn stop(&self, id: u64) {
        if let Ok(mut running) = self.running.lock()
            && let Some(handle) = running.remove(&id)
        {
            let _ = handle.stop.send(true);
        }
    }

    /// Lists a started source's handle (`connector::start`), replacing a stopped one.
    pub fn register(
        &self,
        id: u64,
        stats: Arc<SourceStats>,
        stop: watch::Sender<bool>,
        read_only: bool,
    ) {
        if let Ok(mut running) = self.running.lock() {
            running.insert(
                id,
                SourceHandle {
                    stats,
                    stop,
                    read_only,
                },
            );
        }
    }
}
