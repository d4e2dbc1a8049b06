//! Connectors: tables fed by a generator (`CREATE TABLE ... WITH (connector = ...)`).
//!
//! Each connector-fed table has one ingest task. It asks its [`Generator`] for the rows at
//! offsets `[offset, offset + n)`, paced by `rows_per_second`, and commits them like an
//! INSERT (so views see them in the next epoch) together with the new offset, in one
//! RocksDB write: after a crash the table and the offset agree, and generation resumes at the
//! offset with no gap and no duplicate. A failing commit marks the source unhealthy, is
//! logged, and is retried with exponential backoff. `millrace_sources` shows every source.

pub mod avro;
pub mod datagen;
pub mod decode;
pub mod file;
pub mod kafka;
pub mod kafka_fetch;
mod kafka_reader;
pub mod location;
pub mod nexmark;
pub mod system;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::sql::sqlparser::ast::{CreateTableOptions, Expr, SqlOption, Value};
use millrace_planner::MillraceTable;
use millrace_storage::WriteSet;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::engine::{Engine, TableChange};
use crate::error::{Result, ServerError};

/// Whether a connector can fill a column of type `t` (generated, or cast from record text).
pub(crate) fn column_type_supported(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::Float32
            | DataType::Float64
            | DataType::Utf8
            | DataType::Boolean
            | DataType::Date32
            | DataType::Timestamp(..)
            | DataType::Decimal128(..)
    )
}

/// Rows per commit at most, whatever the rate.
pub(crate) const MAX_BATCH: u64 = 8192;
/// The rate limit of a source that has none.
pub const UNLIMITED: u64 = u64::MAX;
/// Longest wait between retries of a failing source.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Produces the rows of a source by offset: the same offsets give the same rows.
pub trait Generator: Send {
    /// The rows at offsets `from .. from + rows`, in the table's schema.
    fn batch(&mut self, from: u64, rows: usize) -> Result<RecordBatch>;
}

/// A connector's `WITH` options, keys lower-cased.
#[derive(Debug, Clone, Default)]
pub struct ConnectorOptions {
    /// Option values by key.
    pub values: BTreeMap<String, String>,
}

impl ConnectorOptions {
    /// The options of a CREATE TABLE, or `None` when it names no connector.
    pub fn from_table(options: &CreateTableOptions) -> Result<Option<Self>> {
        let CreateTableOptions::With(list) = options else {
            return Ok(None);
        };
        Self::from_options(list).map(Some)
    }

    /// Options from a `WITH (...)` list, which must name a connector.
    pub fn from_options(list: &[SqlOption]) -> Result<Self> {
        let mut values = BTreeMap::new();
        for option in list {
            let SqlOption::KeyValue { key, value } = option else {
                return Err(ServerError::NotSupported(format!("option {option}")));
            };
            let text = match value {
                Expr::Value(v) => match &v.value {
                    Value::SingleQuotedString(s) => s.clone(),
                    Value::Number(n, _) => n.clone(),
                    Value::Boolean(b) => b.to_string(),
                    other => other.to_string(),
                },
                Expr::Identifier(ident) => ident.value.clone(),
                other => other.to_string(),
            };
            values.insert(key.value.to_ascii_lowercase(), text);
        }
        if !values.contains_key("connector") {
            return Err(ServerError::NotSupported(
                "options without connector = '...'".into(),
            ));
        }
        Ok(Self { values })
    }

    /// The connector's name.
    pub fn connector(&self) -> &str {
        self.values.get("connector").map_or("", |s| s.as_str())
    }

    /// The value of the first of `keys` given; an error naming `keys[0]` when none is.
    pub fn required(&self, keys: &[&str]) -> Result<String> {
        keys.iter()
            .find_map(|k| self.values.get(*k))
            .cloned()
            .ok_or_else(|| ServerError::InvalidSetting {
                name: keys.first().copied().unwrap_or_default().into(),
                value: String::new(),
            })
    }

    /// An optional numeric option.
    pub fn number(&self, key: &str) -> Result<Option<u64>> {
        self.values
            .get(key)
            .map(|v| {
                v.trim().parse().map_err(|_| ServerError::InvalidSetting {
                    name: key.into(),
                    value: v.clone(),
                })
            })
            .transpose()
    }

    /// Checks the options against a table of `schema` before anything is stored.
    pub fn validate(&self, schema: &SchemaRef) -> Result<()> {
        match self.connector() {
            "file" => {
                file::FileOptions::try_new(self, schema)?;
            }
            "kafka" => {
                kafka::KafkaOptions::try_new(self, schema)?;
            }
            _ => {
                self.generator(schema)?;
            }
        }
        self.rate()?;
        self.total()?;
        Ok(())
    }

    /// A generator for a table of `schema` (validates the options and columns).
    pub fn generator(&self, schema: &SchemaRef) -> Result<Box<dyn Generator>> {
        match self.connector() {
            "datagen" => Ok(Box::new(datagen::Datagen::try_new(schema.clone(), self)?)),
            "nexmark" => Ok(Box::new(nexmark::Nexmark::try_new(schema.clone(), self)?)),
            other => Err(ServerError::NotSupported(format!("connector '{other}'"))),
        }
    }

    /// Rows per second (`rows_per_second`, `max_rows_per_second` or RisingWave's
    /// `datagen.rows.per.second`); default 1000 for generators, [`UNLIMITED`] for readers.
    pub fn rate(&self) -> Result<u64> {
        for key in [
            "max_rows_per_second",
            "rows_per_second",
            "datagen.rows.per.second",
        ] {
            if let Some(n) = self.number(key)? {
                return Ok(n.max(1));
            }
        }
        Ok(match self.connector() {
            "kafka" | "file" => UNLIMITED,
            _ => 1000,
        })
    }

    /// Total rows to produce (`total_rows`, `nexmark.event.num`); `None` for unbounded.
    pub fn total(&self) -> Result<Option<u64>> {
        for key in ["total_rows", "nexmark.event.num"] {
            if let Some(n) = self.number(key)? {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }
}

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
    fn failed(&self, name: &str, error: &ServerError, backoff: &mut Duration) -> Duration {
        Self::count(&self.errors, 1);
        warn!(source = %name, error = %error, retry_in_ms = backoff.as_millis() as u64, "source unhealthy");
        self.set_status("unhealthy", Some(error.to_string()));
        let wait = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        wait
    }

    /// A new source's figures, starting at `offset`.
    fn new(name: String, connector: String, offset: u64, limit: u64) -> Self {
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
    fn note_rows(&self, n: u64) {
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

    fn count(counter: &Mutex<u64>, n: u64) {
        if let Ok(mut c) = counter.lock() {
            *c += n;
        }
    }

    fn set_status(&self, state: &'static str, reason: Option<String>) {
        self.status.change(state, reason);
    }
}

/// A running source: its figures and the switch that stops it.
struct SourceHandle {
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

    /// Starts feeding `table` from its committed offset.
    pub fn start(
        &self,
        engine: Arc<Engine>,
        table: Arc<MillraceTable>,
        name: String,
        options: &ConnectorOptions,
    ) -> Result<()> {
        let id = table.id;
        let reader = match options.connector() {
            "file" => Reader::Files(file::FileOptions::try_new(options, &table.def.schema)?),
            "kafka" => Reader::Kafka(kafka::KafkaOptions::try_new(options, &table.def.schema)?),
            _ => Reader::Generator(options.generator(&table.def.schema)?),
        };
        let offset = match reader {
            // NOTE: file and Kafka sources keep their position as state, read once they run.
            Reader::Files(_) | Reader::Kafka(_) => 0,
            Reader::Generator(_) => engine.store().source_offset(id)?,
        };
        let stats = Arc::new(SourceStats::new(
            name.clone(),
            options.connector().to_string(),
            offset,
            options.rate()?,
        ));
        let (stop, stopped) = watch::channel(false);
        info!(source = %name, connector = %stats.connector, offset, "source started");
        match reader {
            Reader::Files(options) => {
                let reader = file::FileSource {
                    engine,
                    table,
                    name,
                    options,
                    stats: stats.clone(),
                    stopped,
                };
                tokio::spawn(reader.run());
            }
            Reader::Kafka(options) => {
                let readers = options.readers.unwrap_or(engine.workers);
                let reader = kafka::KafkaSource {
                    engine,
                    table,
                    name,
                    options,
                    stats: stats.clone(),
                    stopped,
                    runtime: tokio::runtime::Handle::current(),
                    readers,
                };
                tokio::task::spawn_blocking(move || reader.run());
            }
            Reader::Generator(generator) => {
                let ingest = Ingest {
                    engine,
                    table,
                    name,
                    generator,
                    stats: stats.clone(),
                    total: options.total()?,
                    stopped,
                };
                tokio::spawn(ingest.run());
            }
        }
        if let Ok(mut running) = self.running.lock() {
            let read_only = options.values.contains_key(crate::wire::sql::SOURCE_MARKER);
            running.insert(
                id,
                SourceHandle {
                    stats,
                    stop,
                    read_only,
                },
            );
        }
        Ok(())
    }
}

/// What feeds a source: files in a directory, a Kafka topic, or a generator of rows by
/// offset.
enum Reader {
    Files(file::FileOptions),
    Kafka(kafka::KafkaOptions),
    Generator(Box<dyn Generator>),
}

/// One source's ingest loop.
struct Ingest {
    engine: Arc<Engine>,
    table: Arc<MillraceTable>,
    name: String,
    generator: Box<dyn Generator>,
    stats: Arc<SourceStats>,
    total: Option<u64>,
    stopped: watch::Receiver<bool>,
}

impl Ingest {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let mut pacer = Pacer::new(self.stats.limit.load(Ordering::Relaxed));
        loop {
            if *self.stopped.borrow() {
                self.stats.set_status("stopped", None);
                return;
            }
            let offset = self.stats.offset.lock().map(|o| *o).unwrap_or(0);
            let mut rows = pacer.allowance(self.stats.limit.load(Ordering::Relaxed));
            if let Some(total) = self.total {
                if total <= offset {
                    self.stats.set_status("finished", None);
                    info!(source = %self.name, offset, "source finished");
                    let _ = self.stopped.changed().await;
                    self.stats.set_status("stopped", None);
                    return;
                }
                rows = rows.min(total - offset);
            }
            if rows == 0 {
                self.sleep(pacer.wait()).await;
                continue;
            }
            match self.commit(offset, rows).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    pacer.consumed(rows);
                    self.stats.set_status("running", None);
                    if let Ok(mut o) = self.stats.offset.lock() {
                        *o = offset + rows;
                    }
                    SourceStats::count(&self.stats.rows, rows);
                    self.stats.note_rows(rows);
                }
                Err(e) => {
                    let wait = self.stats.failed(&self.name, &e, &mut backoff);
                    self.sleep(wait).await;
                    pacer.restart();
                }
            }
        }
    }

    /// Sleeps, waking early when stopped; true if the sleep ran its course.
    async fn sleep(&mut self, wait: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = self.stopped.changed() => false,
        }
    }

    /// Generates and commits the rows at `[offset, offset + rows)` with the new offset.
    async fn commit(&mut self, offset: u64, rows: u64) -> Result<()> {
        let batch = self.generator.batch(offset, rows as usize)?;
        let mut set = WriteSet::new();
        set.put_source_offset(self.table.id, offset + rows);
        commit_rows(
            &self.engine,
            &self.table,
            &self.name,
            &self.stopped,
            batch,
            set,
        )
        .await
    }
}

/// Paces a source to a rate by a schedule (rows due = rate x time since start) rather than a
/// fixed batch per tick, so a high rate is not capped by the tick and a slow commit is caught
/// up in bigger batches.
pub(crate) struct Pacer {
    start: Instant,
    done: u64,
    rate: u64,
}

impl Pacer {
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            start: Instant::now(),
            done: 0,
            rate: rate.max(1),
        }
    }

    /// Rows that may be read now (at most [`MAX_BATCH`]) under the rate `limit`.
    pub(crate) fn allowance(&mut self, limit: u64) -> u64 {
        let limit = limit.max(1);
        if limit == UNLIMITED {
            return MAX_BATCH;
        }
        if limit != self.rate {
            self.rate = limit;
            self.restart();
        }
        let due = (self.start.elapsed().as_secs_f64() * self.rate as f64) as u64;
        due.saturating_sub(self.done).min(MAX_BATCH)
    }

    /// Counts rows read.
    pub(crate) fn consumed(&mut self, rows: u64) {
        self.done += rows;
    }

    /// Gives back rows counted by [`Pacer::consumed`] ahead of reading them but not read.
    pub(crate) fn refund(&mut self, rows: u64) {
        self.done = self.done.saturating_sub(rows);
    }

    /// Starts the schedule afresh: time spent failing is not owed as a burst afterwards.
    pub(crate) fn restart(&mut self) {
        self.start = Instant::now();
        self.done = 0;
    }

    /// How long to wait when nothing is due.
    pub(crate) fn wait(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate as f64)
            .clamp(Duration::from_millis(1), Duration::from_millis(100))
    }
}

/// Commits a source's rows together with its new position (in `set`), like an INSERT.
async fn commit_rows(
    engine: &Engine,
    table: &Arc<MillraceTable>,
    name: &str,
    stopped: &watch::Receiver<bool>,
    batch: RecordBatch,
    set: WriteSet,
) -> Result<()> {
    let _write = engine.write_lock.lock().await;
    // NOTE: a DROP TABLE may have won the write lock meanwhile.
    if *stopped.borrow() {
        return Ok(());
    }
    let change = TableChange {
        table: table.clone(),
        table_name: name.to_string(),
        deletes: vec![],
        inserts: (batch.num_rows() > 0).then_some(batch),
    };
    engine.commit_changes(vec![change], set)?;
    Ok(())
}
