//! `connector = 'kafka'`: a topic's partitions read with librdkafka (rdkafka), each message
//! one JSON, CSV or Avro record.
//!
//! The source's session runs on its own blocking thread. It splits the topic's partitions
//! over its readers (`readers = n`, by default one per pipeline worker; see
//! [`super::kafka_reader`]), each decoding on its own thread, in parallel with the others,
//! the messages a consumer in a child process fetches for it ([`super::kafka_fetch`]; bad
//! records go to `millrace_source_errors`). The session's own consumer only asks for
//! metadata and watermarks.
//! The session commits each decoded batch like an INSERT together with the next offset of
//! every partition, in one RocksDB write: the offsets and the data they produced are
//! durable together, so a restart, a crash or a broker outage resumes exactly after the
//! last committed message. Consumer-group offsets in the broker are not used.
//!
//! Every second the reader probes the broker (topic metadata and each partition's high
//! watermark, which gives the lag). A failed probe, a consumer error or a failed commit ends
//! the session: the source turns unhealthy with the cause, waits with exponential backoff and
//! starts a new consumer at the committed offsets. New partitions are picked up from their
//! beginning; a deleted topic puts the committed offsets back to 0, so a topic created again
//! under the name is read from its beginning.
//!
//! Columns named `_key`, `_partition`, `_offset` or `_timestamp` are filled from the
//! message's key, partition, offset and timestamp instead of its payload.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{FieldRef, SchemaRef};
use millrace_planner::MillraceTable;
use millrace_storage::WriteSet;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::{info, warn};

use super::decode::{BatchBuilder, RecordDecoder};
use super::kafka_fetch::FetchSpec;
use super::kafka_reader::{self, PartitionReader, ReadBatch};
use super::{ConnectorOptions, Pacer, PartitionStats, SourceStats, commit_rows};
use crate::engine::Engine;
use crate::error::{Result, ServerError};

/// Time allowed for one metadata or watermark request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Time between broker probes.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Where a partition without a committed offset starts.
#[derive(Debug, Clone, Copy)]
enum Startup {
    Earliest,
    Latest,
    /// The first message at or after this time (milliseconds since the epoch).
    Timestamp(i64),
}

/// Where a table column's value comes from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Column {
    /// The n-th decoded payload field.
    Payload(usize),
    Key,
    Partition,
    Offset,
    Timestamp,
}

/// The Kafka connector's settings, checked at CREATE.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    brokers: String,
    pub(super) topic: String,
    startup: Startup,
    pub(super) decoder: RecordDecoder,
    pub(super) columns: Vec<Column>,
    pub(super) schema: SchemaRef,
    /// `properties.<name>` options, passed to librdkafka as `<name>`.
    properties: Vec<(String, String)>,
    /// `readers = n`: how many consumers the partitions are split over (default: one per
    /// pipeline worker).
    pub(super) readers: Option<usize>,
}

impl KafkaOptions {
    /// The settings of a Kafka source feeding a table of `schema`.
    pub fn try_new(options: &ConnectorOptions, schema: &SchemaRef) -> Result<Self> {
        let brokers = options.required(&["brokers", "properties.bootstrap.server"])?;
        let topic = options.required(&["topic"])?;
        let startup = match options
            .values
            .get("scan.startup.mode")
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("earliest") => Startup::Earliest,
            Some("latest") => Startup::Latest,
            Some("timestamp") => Startup::Timestamp(
                options
                    .number("scan.startup.timestamp.millis")?
                    .ok_or_else(|| ServerError::InvalidSetting {
                        name: "scan.startup.timestamp.millis".into(),
                        value: String::new(),
                    })? as i64,
            ),
            Some(other) => {
                return Err(ServerError::InvalidSetting {
                    name: "scan.startup.mode".into(),
                    value: other.into(),
                });
            }
        };
        let mut payload: Vec<FieldRef> = Vec::new();
        let columns = schema
            .fields()
            .iter()
            .map(|f| match f.name().as_str() {
                "_key" => Column::Key,
                "_partition" => Column::Partition,
                "_offset" => Column::Offset,
                "_timestamp" => Column::Timestamp,
                _ => {
                    payload.push(f.clone());
                    Column::Payload(payload.len() - 1)
                }
            })
            .collect();
        let properties = options
            .values
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("properties.")?;
                (name != "bootstrap.server").then(|| (name.to_string(), v.clone()))
            })
            .collect();
        let readers = match options.number("readers")? {
            Some(0) => {
                return Err(ServerError::InvalidSetting {
                    name: "readers".into(),
                    value: "0".into(),
                });
            }
            n => n.map(|n| n as usize),
        };
        let decoder = RecordDecoder::try_new(options, payload)?;
        match decoder.format() {
            super::decode::Format::Parquet => {
                return Err(ServerError::NotSupported(
                    "format parquet for Kafka messages".into(),
                ));
            }
            super::decode::Format::Avro if !decoder.has_avro_schema() => {
                return Err(ServerError::InvalidSetting {
                    name: "avro.schema".into(),
                    value: "FORMAT AVRO messages need a schema: avro.schema or schema.location"
                        .into(),
                });
            }
            _ => {}
        }
        Ok(Self {
            brokers,
            topic,
            startup,
            decoder,
            columns,
            schema: schema.clone(),
            properties,
            readers,
        })
    }

    /// The librdkafka settings of the source's consumers: the broker, a group of its own
    /// (offsets are kept by Millrace, never committed to the group), then the user's
    /// `properties.*`, which may override any of them.
    fn client_settings(&self, table_id: u64) -> Vec<(String, String)> {
        let mut settings: Vec<(String, String)> = [
            ("bootstrap.servers", self.brokers.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            ("socket.timeout.ms", "5000"),
            ("queued.max.messages.kbytes", "16384"),
            // NOTE: an offset the broker no longer has (a topic deleted and created again,
            // or truncated) is an error that ends the session, whose start then decides
            // where to read on and logs it; librdkafka's default would jump silently.
            ("auto.offset.reset", "error"),
            ("log_level", "3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        settings.push(("group.id".into(), format!("millrace-{table_id}")));
        settings.extend(self.properties.iter().cloned());
        settings
    }

    /// A consumer in this process, for metadata and watermarks only: it is assigned no
    /// partitions, so it never fetches (the readers' fetch processes do).
    pub(super) fn consumer(&self, table_id: u64) -> Result<BaseConsumer> {
        let mut config = ClientConfig::new();
        for (k, v) in self.client_settings(table_id) {
            config.set(k, v);
        }
        config.create().map_err(kafka_error)
    }

    /// What a reader's fetch process reads: `assignment` (partition, next offset).
    pub(super) fn fetch_spec(&self, table_id: u64, assignment: &Offsets) -> FetchSpec {
        FetchSpec {
            config: self.client_settings(table_id),
            topic: self.topic.clone(),
            assignment: assignment.iter().map(|(p, o)| (*p, *o)).collect(),
        }
    }
}

/// A running Kafka source.
pub struct KafkaSource {
    /// Shared engine (commits, the bad-record list).
    pub engine: Arc<Engine>,
    /// The table fed.
    pub table: Arc<MillraceTable>,
    /// The table's name.
    pub name: String,
    /// Settings.
    pub options: KafkaOptions,
    /// Live figures.
    pub stats: Arc<SourceStats>,
    /// Set when the table is dropped.
    pub stopped: watch::Receiver<bool>,
    /// The runtime commits run on.
    pub runtime: Handle,
    /// Readers the partitions are split over (each its own consumer and thread).
    pub readers: usize,
}

/// Next offset to read, by partition.
pub(super) type Offsets = BTreeMap<i32, i64>;

impl KafkaSource {
    /// Reads the topic until stopped (call on a blocking thread).
    pub fn run(mut self) {
        let mut committed: Offsets = match self.engine.store().source_state(self.table.id) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
            _ => Offsets::new(),
        };
        self.show_offsets(&committed);
        let mut backoff = Duration::from_millis(100);
        loop {
            if *self.stopped.borrow() {
                self.stats.set_status("stopped", None);
                return;
            }
            match self.session(&mut committed, &mut backoff) {
                Ok(()) => {}
                Err(e) => {
                    let wait = self.stats.failed(&self.name, &e, &mut backoff);
                    let mut stopped = self.stopped.clone();
                    self.runtime.block_on(async {
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stopped.changed() => {}
                        }
                    });
                }
            }
        }
    }

    /// One consumer group's life: split the partitions over the readers, then commit what
    /// they read until stopped, the partitions change (Ok) or something fails (Err).
    fn session(&mut self, committed: &mut Offsets, backoff: &mut Duration) -> Result<()> {
        let consumer = self.options.consumer(self.table.id)?;
        let Some(partitions) = self.partitions(&consumer)? else {
            self.topic_gone(committed)?;
            return Err(missing_topic(&self.options.topic));
        };
        self.start_offsets(&consumer, &partitions, committed)?;
        let shares = kafka_reader::split(committed, self.readers);
        let halt = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel(shares.len());
        let pacer = Arc::new(Mutex::new(Pacer::new(
            self.stats.limit.load(Ordering::Relaxed),
        )));
        let options = Arc::new(self.options.clone());
        let mut threads = Vec::new();
        for share in &shares {
            let reader = PartitionReader {
                options: options.clone(),
                name: self.name.clone(),
                table_id: self.table.id,
                next: share.clone(),
                halt: halt.clone(),
                stats: self.stats.clone(),
                pacer: pacer.clone(),
                out: tx.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("kafka-{}", self.name))
                .spawn(move || reader.run())
                .map_err(|e| ServerError::Internal(format!("kafka reader thread: {e}")))?;
            threads.push(spawned);
        }
        drop(tx);
        self.show_readers(&shares);
        info!(source = %self.name, topic = %self.options.topic, partitions = partitions.len(), readers = shares.len(), "kafka source assigned");
        self.stats.set_status("running", None);
        let result = self.commit_loop(&consumer, &rx, partitions.len(), committed, backoff);
        halt.store(true, Ordering::Relaxed);
        drop(rx);
        for t in threads {
            let _ = t.join();
        }
        result
    }

    /// Commits the readers' batches one at a time, probing the broker every second.
    fn commit_loop(
        &mut self,
        consumer: &BaseConsumer,
        batches: &Receiver<Result<ReadBatch>>,
        partitions: usize,
        committed: &mut Offsets,
        backoff: &mut Duration,
    ) -> Result<()> {
        let mut probed = Instant::now() - PROBE_EVERY;
        loop {
            if *self.stopped.borrow() {
                return Ok(());
            }
            if probed.elapsed() >= PROBE_EVERY {
                let now = self
                    .partitions(consumer)?
                    .ok_or_else(|| missing_topic(&self.options.topic))?;
                if now.len() != partitions {
                    info!(source = %self.name, "kafka partitions changed; reassigning");
                    return Ok(());
                }
                self.probe(consumer, committed)?;
                probed = Instant::now();
            }
            let read = match batches.recv_timeout(Duration::from_millis(100)) {
                Ok(read) => read?,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ServerError::Internal("kafka readers ended".into()));
                }
            };
            let mut next = committed.clone();
            next.extend(read.next.iter().map(|(p, o)| (*p, *o)));
            let n = read.batch.num_rows() as u64;
            let staged = self.commit(read.batch, &next, read.bad)?;
            *committed = next;
            *backoff = Duration::from_millis(100);
            self.stats.set_status("running", None);
            self.show_offsets(committed);
            SourceStats::count(&self.stats.rows, n);
            self.stats.note_rows(n);
            if let Ok(mut parts) = self.stats.partitions.lock() {
                for (p, (rows, bytes, bad)) in &read.per_partition {
                    let part = parts.entry(p.to_string()).or_default();
                    part.rows += rows;
                    part.bytes += bytes;
                    part.bad_records += bad;
                }
            }
            self.engine.sources.publish_bad(&self.stats, staged);
        }
    }

    /// The topic's partition ids, `None` if the broker says the topic does not exist, or
    /// an error if it cannot be described.
    fn partitions(&self, consumer: &BaseConsumer) -> Result<Option<Vec<i32>>> {
        let metadata = consumer
            .fetch_metadata(Some(&self.options.topic), PROBE_TIMEOUT)
            .map_err(|e| ServerError::Connector(format!("kafka broker unreachable: {e}")))?;
        let Some(topic) = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.options.topic)
        else {
            return Ok(None);
        };
        if let Some(error) = topic.error() {
            let code = RDKafkaErrorCode::from(error);
            if code == RDKafkaErrorCode::UnknownTopicOrPartition {
                return Ok(None);
            }
            return Err(ServerError::Connector(format!(
                "kafka topic {}: {code}",
                self.options.topic
            )));
        }
        if topic.partitions().is_empty() {
            return Ok(None);
        }
        Ok(Some(topic.partitions().iter().map(|p| p.id()).collect()))
    }

    /// The topic is gone after it was read: whatever topic of that name appears later is a
    /// new one, read from its beginning. Committed offsets go back to 0, durably, so that
    /// holds across a restart too (its offsets start over, and may not even reach the old
    /// ones, so the old offsets cannot tell).
    fn topic_gone(&mut self, committed: &mut Offsets) -> Result<()> {
        if committed.values().all(|o| *o == 0) {
            return Ok(());
        }
        warn!(source = %self.name, topic = %self.options.topic, "kafka topic deleted; a topic created again under its name will be read from its beginning");
        let zeros: Offsets = committed.keys().map(|p| (*p, 0)).collect();
        let empty = BatchBuilder::new(self.options.schema.clone()).finish()?;
        self.commit(empty, &zeros, Vec::new())?;
        *committed = zeros;
        self.show_offsets(committed);
        Ok(())
    }

    /// Resolves the start of partitions without a committed offset (by the startup mode,
    /// or their beginning for partitions added later) and commits them, so that a restart
    /// starts from the same place.
    fn start_offsets(
        &mut self,
        consumer: &BaseConsumer,
        partitions: &[i32],
        committed: &mut Offsets,
    ) -> Result<()> {
        let first_start = committed.is_empty();
        let mut next = committed.clone();
        // A partition of a deleted topic that its successor does not have (nothing read).
        next.retain(|p, at| *at != 0 || partitions.contains(p));
        for p in partitions {
            let (low, high) = consumer
                .fetch_watermarks(&self.options.topic, *p, PROBE_TIMEOUT)
                .map_err(|e| ServerError::Connector(format!("kafka broker unreachable: {e}")))?;
            if let Some(at) = next.get(p).copied() {
                if let Some(on) = self.out_of_range(*p, at, low, high) {
                    next.insert(*p, on);
                }
                continue;
            }
            let start = match (first_start, self.options.startup) {
                (false, _) | (true, Startup::Earliest) => low,
                (true, Startup::Latest) => high,
                (true, Startup::Timestamp(ms)) => {
                    let mut query = TopicPartitionList::new();
                    query
                        .add_partition_offset(&self.options.topic, *p, Offset::Offset(ms))
                        .map_err(kafka_error)?;
                    let found = consumer
                        .offsets_for_times(query, PROBE_TIMEOUT)
                        .map_err(kafka_error)?;
                    match found
                        .find_partition(&self.options.topic, *p)
                        .map(|e| e.offset())
                    {
                        Some(Offset::Offset(o)) => o,
                        _ => high,
                    }
                }
            };
            next.insert(*p, start);
        }
        if next != *committed {
            let empty = BatchBuilder::new(self.options.schema.clone()).finish()?;
            self.commit(empty, &next, Vec::new())?;
            *committed = next;
            self.show_offsets(committed);
        }
        Ok(())
    }

    /// Where to read on when the committed offset `at` of partition `p` is not in the
    /// broker's `low..=high`, with a warning; `None` when it is.
    ///
    /// Past the end: the topic was deleted and created again (or its log lost), so all it
    /// holds is new and is read from its beginning. Before the start: the broker deleted
    /// messages (retention) before they were read; reading goes on at the oldest it has.
    fn out_of_range(&self, p: i32, at: i64, low: i64, high: i64) -> Option<i64> {
        if at > high {
            warn!(source = %self.name, topic = %self.options.topic, partition = p, committed = at, high, "kafka partition ends before the committed offset (the topic was created again or truncated); reading it from its beginning");
            Some(low)
        } else if at < low {
            warn!(source = %self.name, topic = %self.options.topic, partition = p, committed = at, low, skipped = low - at, "kafka messages were deleted by the broker before they were read; reading on at the oldest");
            Some(low)
        } else {
            None
        }
    }

    /// Reads each partition's high watermark (for the lag) and refreshes the rates.
    fn probe(&self, consumer: &BaseConsumer, committed: &Offsets) -> Result<()> {
        let mut highs = Vec::new();
        for p in committed.keys() {
            let (_, high) = consumer
                .fetch_watermarks(&self.options.topic, *p, PROBE_TIMEOUT)
                .map_err(|e| ServerError::Connector(format!("kafka broker unreachable: {e}")))?;
            highs.push((*p, high));
        }
        if let Ok(mut parts) = self.stats.partitions.lock() {
            for (p, high) in highs {
                let part = parts.entry(p.to_string()).or_default();
                part.high_watermark = Some(high);
                part.tick();
            }
        }
        Ok(())
    }

    /// Commits rows with the offsets after them and the bad records read beside them.
    fn commit(
        &self,
        batch: RecordBatch,
        next: &Offsets,
        bad: Vec<super::BadRecord>,
    ) -> Result<super::StagedBad> {
        let state = serde_json::to_vec(next)
            .map_err(|e| ServerError::Internal(format!("source state: {e}")))?;
        let mut set = WriteSet::new();
        set.put_source_state(self.table.id, state);
        let staged = self.engine.sources.stage_bad(bad, &mut set)?;
        self.runtime.block_on(commit_rows(
            &self.engine,
            &self.table,
            &self.name,
            &self.stopped,
            batch,
            set,
        ))?;
        Ok(staged)
    }

    /// Publishes which reader owns each partition.
    fn show_readers(&self, shares: &[Offsets]) {
        if let Ok(mut parts) = self.stats.partitions.lock() {
            for (reader, share) in shares.iter().enumerate() {
                for p in share.keys() {
                    parts.entry(p.to_string()).or_default().reader = Some(reader as i32);
                }
            }
        }
    }

    /// Publishes committed offsets: per partition, and their sum as the source's offset.
    fn show_offsets(&self, committed: &Offsets) {
        if let Ok(mut o) = self.stats.offset.lock() {
            *o = committed.values().map(|v| (*v).max(0) as u64).sum();
        }
        if let Ok(mut parts) = self.stats.partitions.lock() {
            for (p, next) in committed {
                parts.entry(p.to_string()).or_default().offset = *next;
            }
        }
    }
}

impl PartitionStats {
    /// Refreshes the rate from the rows counted since the last tick.
    fn tick(&mut self) {
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

fn missing_topic(topic: &str) -> ServerError {
    ServerError::Connector(format!("kafka topic {topic} does not exist"))
}

pub(super) fn kafka_error(e: KafkaError) -> ServerError {
    ServerError::Connector(format!("kafka: {e}"))
}
