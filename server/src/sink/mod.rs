//! Sinks: `CREATE SINK s FROM view WITH (connector = 'file' | 'kafka', ...) FORMAT JSON`
//! delivers every committed change of a materialized view, epoch by epoch, to a directory or
//! a Kafka topic.
//!
//! Each sink is one task reading the view's SUBSCRIBE feed (so it never holds back the view,
//! other views or other sinks). Every change it delivers gets the next sink sequence number
//! and is encoded as JSON lines `{"op": "insert" | "delete", "seq": n, "index": i, "row":
//! {...}}`, one line per copy of a row. Delivery is write-ahead: the encoded change, its
//! sequence number and the updated [`mirror::Mirror`] (what downstream has after it) commit
//! to RocksDB first, then the change is delivered, then the delivery is recorded. After a
//! crash the pending change is delivered again under the same sequence number: a file sink
//! rewrites the same file (exactly once); a Kafka sink re-sends messages with the same
//! `seq` and `index`, so a consumer drops the duplicates (see `kafka.rs`). A sink that
//! (re)starts or falls behind the feed catches up with the difference between the view and
//! its mirror.
//!
//! A failing delivery is retried with exponential backoff behind a circuit breaker: after
//! `sink.retry.max_failures` consecutive failures it opens for `sink.retry.open_ms`, then a
//! single half-open attempt closes it again or re-opens it. `millrace_sinks` shows it all.

pub mod file;
pub mod kafka;
pub mod mirror;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use millrace_planner::Changelog;
use millrace_planner::spilled_change::ViewChange;
use millrace_storage::{CatalogRecord, WriteSet};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::catalog::options::ConnectorOptions;
use crate::engine::Engine;
use crate::error::{Result, ServerError};
use crate::registry::sinks::SinkStats;
use crate::registry::status::SourceStatus;
use mirror::Mirror;

/// Longest wait between retries while the circuit is closed.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where a sink delivers.
pub enum Target {
    /// One file per change in a directory.
    File(file::FileTarget),
    /// Messages on a Kafka topic.
    Kafka(kafka::KafkaTarget),
}

impl Target {
    /// The target named by `options` (validated; nothing is contacted yet).
    pub fn try_new(options: &ConnectorOptions) -> Result<Self> {
        match options.values.get("format").map(|f| f.to_ascii_lowercase()) {
            None => {}
            Some(f) if f == "json" => {}
            Some(other) => {
                return Err(ServerError::NotSupported(format!("sink format '{other}'")));
            }
        }
        match options.connector() {
            "file" => Ok(Target::File(file::FileTarget::try_new(options)?)),
            "kafka" => Ok(Target::Kafka(kafka::KafkaTarget::try_new(options)?)),
            other => Err(ServerError::NotSupported(format!(
                "sink connector '{other}'"
            ))),
        }
    }

    async fn deliver(&mut self, seq: u64, payload: &str) -> Result<()> {
        match self {
            Target::File(t) => t.deliver(seq, payload).await,
            Target::Kafka(t) => t.deliver(seq, payload).await,
        }
    }
}

/// The circuit breaker's settings.
#[derive(Debug, Clone, Copy)]
struct Breaker {
    max_failures: u64,
    open_for: Duration,
}

impl Breaker {
    fn try_new(options: &ConnectorOptions) -> Result<Self> {
        Ok(Self {
            max_failures: options
                .number("sink.retry.max_failures")?
                .unwrap_or(5)
                .max(1),
            open_for: Duration::from_millis(
                options
                    .number("sink.retry.open_ms")?
                    .unwrap_or(5000)
                    .max(10),
            ),
        })
    }
}

/// A sink's durable position, next to its mirror.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Progress {
    /// The last sequence number given to a change.
    seq: u64,
    /// The last sequence number delivered.
    delivered: u64,
    /// The change with number `seq`, encoded, while it is not delivered.
    pending: Option<String>,
}

/// Starts the sink of `record` on `view` from its committed progress.
pub fn start(
    engine: Arc<Engine>,
    record: &CatalogRecord,
    view: &CatalogRecord,
    options: &ConnectorOptions,
) -> Result<()> {
    let (id, name, view) = (record.id, record.name.clone(), (view.id, view.name.clone()));
    let target = Target::try_new(options)?;
    let breaker = Breaker::try_new(options)?;
    let progress: Progress = match engine.store().source_state(id)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| ServerError::Internal(format!("sink {name} progress: {e}")))?,
        None => Progress::default(),
    };
    let stats = Arc::new(SinkStats {
        name: name.clone(),
        view: view.1.clone(),
        connector: options.connector().to_string(),
        seq: AtomicU64::new(progress.seq),
        delivered: AtomicU64::new(progress.delivered),
        rows: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        consecutive_failures: AtomicU64::new(0),
        circuit_opened: AtomicU64::new(0),
        status: Mutex::new(SourceStatus {
            state: "starting",
            reason: None,
            since: SystemTime::now(),
        }),
    });
    let (stop, stopped) = watch::channel(false);
    let sinks = engine.sinks.clone();
    let task = SinkTask {
        engine,
        id,
        view_id: view.0,
        target,
        breaker,
        progress,
        stats: stats.clone(),
        stopped,
    };
    info!(sink = %name, view = %view.1, "sink started");
    tokio::spawn(task.run());
    sinks.register(id, stats, stop);
    Ok(())
}

/// One sink's delivery loop.
struct SinkTask {
    engine: Arc<Engine>,
    id: u64,
    view_id: u64,
    target: Target,
    breaker: Breaker,
    progress: Progress,
    stats: Arc<SinkStats>,
    stopped: watch::Receiver<bool>,
}

/// Why delivery stopped.
enum Halt {
    /// The sink was dropped.
    Stopped,
    /// Something failed that a fresh start fixes.
    Failed(ServerError),
}

impl From<ServerError> for Halt {
    fn from(e: ServerError) -> Self {
        Halt::Failed(e)
    }
}

impl SinkTask {
    async fn run(mut self) {
        loop {
            match self.session().await {
                Ok(()) | Err(Halt::Stopped) => {
                    self.stats.set_status("stopped", None);
                    info!(sink = %self.stats.name, "sink stopped");
                    return;
                }
                Err(Halt::Failed(e)) => {
                    warn!(sink = %self.stats.name, error = %e, "sink restarting");
                    self.stats.set_status("starting", Some(e.to_string()));
                    if !self.sleep(Duration::from_millis(500)).await {
                        self.stats.set_status("stopped", None);
                        return;
                    }
                }
            }
        }
    }

    /// Delivers what is pending, catches up with the view, then follows its feed. Ends when
    /// the view is dropped (Ok), the sink is stopped, or it fell behind (a new session
    /// catches up).
    async fn session(&mut self) -> std::result::Result<(), Halt> {
        if let Some(pending) = self.progress.pending.clone() {
            info!(sink = %self.stats.name, seq = self.progress.seq, "delivering the pending change again");
            self.deliver(self.progress.seq, &pending).await?;
        }
        let mut subscription = loop {
            match self.engine.views.subscribe(self.view_id).await {
                Ok(s) => break s,
                Err(e) if e.sqlstate() == "55000" => {
                    if !self.sleep(Duration::from_millis(200)).await {
                        return Err(Halt::Stopped);
                    }
                }
                Err(e) => return Err(Halt::Failed(e)),
            }
        };
        let mut mirror = Mirror::load(
            self.engine.store(),
            self.id,
            view_schema(&subscription.schema),
        )?;
        let contents = subscription
            .snapshot
            .iter()
            .map(strip_epoch_and_diff)
            .collect::<Result<Vec<_>>>()?;
        let catch_up = mirror.diff(&contents)?;
        if !catch_up.is_empty() {
            info!(sink = %self.stats.name, rows = catch_up.len(), delivered_rows = mirror.len(), "sink catching up with its view");
        }
        self.emit(&mut mirror, catch_up).await?;
        self.stats.set_status("running", None);
        loop {
            let delta = tokio::select! {
                d = subscription.feed.recv() => d,
                _ = self.stopped.changed() => return Err(Halt::Stopped),
            };
            match delta {
                // NOTE: a change spilled to files is delivered a consolidated partition at
                // a time, each its own numbered change.
                Ok(delta) => match &delta.change {
                    ViewChange::Rows(changes) => self.emit(&mut mirror, changes.clone()).await?,
                    ViewChange::Spilled(spilled) => {
                        for file in spilled.files() {
                            let part = file.consolidated().map_err(ServerError::Plan)?;
                            self.emit(&mut mirror, part).await?;
                        }
                    }
                },
                Err(RecvError::Lagged(missed)) => {
                    info!(sink = %self.stats.name, missed, "sink fell behind its view; catching up");
                    return Err(Halt::Failed(ServerError::Internal(format!(
                        "fell {missed} epochs behind the view"
                    ))));
                }
                Err(RecvError::Closed) => return Ok(()),
            }
        }
    }

    /// Numbers, records (write-ahead) and delivers one change.
    async fn emit(
        &mut self,
        mirror: &mut Mirror,
        changes: Changelog,
    ) -> std::result::Result<(), Halt> {
        let changes = changes.consolidate().map_err(ServerError::Plan)?;
        if changes.is_empty() {
            return Ok(());
        }
        let seq = self.progress.seq + 1;
        let payload = encode(seq, &changes)?;
        let touched = mirror.apply(&changes)?;
        let progress = Progress {
            seq,
            delivered: self.progress.delivered,
            pending: Some(payload.clone()),
        };
        let mut set = WriteSet::new();
        for (row, count) in touched {
            set.put_sink_row(self.id, row, count);
        }
        set.put_source_state(self.id, encode_progress(&progress)?);
        self.engine.commit_write_set(set)?;
        self.progress = progress;
        self.stats.seq.store(seq, Ordering::Relaxed);
        self.deliver(seq, &payload).await?;
        let copies: i64 = changes.weights.iter().map(|w| w.abs()).sum();
        self.stats.rows.fetch_add(copies as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Delivers change `seq` until it succeeds or the sink is stopped, behind the breaker;
    /// then records it as delivered.
    async fn deliver(&mut self, seq: u64, payload: &str) -> std::result::Result<(), Halt> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.target.deliver(seq, payload).await {
                Ok(()) => {
                    self.stats.consecutive_failures.store(0, Ordering::Relaxed);
                    self.stats.set_status("running", None);
                    break;
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    let failures = self
                        .stats
                        .consecutive_failures
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    let wait = if failures >= self.breaker.max_failures {
                        if failures == self.breaker.max_failures {
                            self.stats.circuit_opened.fetch_add(1, Ordering::Relaxed);
                        }
                        warn!(sink = %self.stats.name, error = %e, failures, open_ms = self.breaker.open_for.as_millis() as u64, "sink circuit open");
                        self.stats.set_status("circuit_open", Some(e.to_string()));
                        self.breaker.open_for
                    } else {
                        warn!(sink = %self.stats.name, error = %e, failures, "sink delivery failed; retrying");
                        self.stats.set_status("retrying", Some(e.to_string()));
                        let wait = backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        wait
                    };
                    if !self.sleep(wait).await {
                        return Err(Halt::Stopped);
                    }
                    if failures >= self.breaker.max_failures {
                        self.stats.set_status("half_open", Some(e.to_string()));
                    }
                }
            }
        }
        let progress = Progress {
            seq,
            delivered: seq,
            pending: None,
        };
        let mut set = WriteSet::new();
        set.put_source_state(self.id, encode_progress(&progress)?);
        self.engine.commit_write_set(set)?;
        self.progress = progress;
        self.stats.delivered.store(seq, Ordering::Relaxed);
        Ok(())
    }

    /// Sleeps; false if the sink was stopped meanwhile.
    async fn sleep(&mut self, wait: Duration) -> bool {
        if *self.stopped.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => !*self.stopped.borrow(),
            _ = self.stopped.changed() => false,
        }
    }
}

fn encode_progress(progress: &Progress) -> Result<Vec<u8>> {
    serde_json::to_vec(progress).map_err(|e| ServerError::Internal(format!("sink progress: {e}")))
}

/// The view's schema from a subscription's (`epoch`, `diff`, columns...).
fn view_schema(feed: &SchemaRef) -> SchemaRef {
    Arc::new(datafusion::arrow::datatypes::Schema::new(
        feed.fields().iter().skip(2).cloned().collect::<Vec<_>>(),
    ))
}

fn strip_epoch_and_diff(batch: &RecordBatch) -> Result<RecordBatch> {
    let columns: Vec<usize> = (2..batch.num_columns()).collect();
    Ok(batch.project(&columns)?)
}

/// One change as JSON lines: one line per copy of a changed row, in a stable order.
pub fn encode(seq: u64, changes: &Changelog) -> Result<String> {
    let mut rows_json = Vec::new();
    {
        let mut writer = datafusion::arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, datafusion::arrow::json::writer::LineDelimited>(&mut rows_json);
        writer.write(&changes.batch)?;
        writer.finish()?;
    }
    let text = String::from_utf8(rows_json)
        .map_err(|e| ServerError::Internal(format!("sink JSON: {e}")))?;
    let mut out = String::new();
    let mut index = 0u64;
    for (row, weight) in text.lines().zip(&changes.weights) {
        let op = if *weight > 0 { "insert" } else { "delete" };
        for _ in 0..weight.unsigned_abs() {
            out.push_str(&format!(
                "{{\"op\":\"{op}\",\"seq\":{seq},\"index\":{index},\"row\":{row}}}\n"
            ));
            index += 1;
        }
    }
    Ok(out)
}
