//! `connector = 'kafka'`: a topic's partitions read with librdkafka (rdkafka), each message
//! one JSON, CSV or Avro record.
//!
//! The source's session runs on its own blocking thread. It splits the topic's partitions
//! over its readers (`readers = n`, by default one per pipeline worker; see
//! [`reader`]), each decoding on its own thread, in parallel with the others,
//! the messages a consumer in a child process fetches for it ([`fetch`]; bad
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

pub mod fetch;
pub mod options;
mod reader;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use millrace_storage::WriteSet;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::connector::decode::BatchBuilder;
use crate::connector::ingest::{Pacer, SourceTask};
use crate::connector::kafka::options::{KafkaOptions, Offsets, Startup, kafka_error};
use crate::connector::kafka::reader::{PartitionReader, ReadBatch};
use crate::error::{Result, ServerError};
use crate::registry::sources::BadRecord;

/// Time allowed for one metadata or watermark request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Time between broker probes.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A running Kafka source.
pub struct KafkaSource {
    /// The table it feeds, its figures and its switch.
    pub task: SourceTask,
    /// Settings.
    pub options: KafkaOptions,
    /// The runtime commits run on.
    pub tokio: Handle,
    /// Readers the partitions are split over (each its own consumer and thread).
    pub readers: usize,
}

impl KafkaSource {
    /// Reads the topic until stopped (call on a blocking thread).
    pub fn run(mut self) {
        let mut committed: Offsets = match self.task.engine.store().source_state(self.task.table.id)
        {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
            _ => Offsets::new(),
        };
        self.show_offsets(&committed);
        let mut backoff = Duration::from_millis(100);
        loop {
            if *self.task.stopped.borrow() {
                self.task.stats.set_status("stopped", None);
                return;
            }
            match self.session(&mut committed, &mut backoff) {
                Ok(()) => {}
                Err(e) => {
                    let wait = self.task.stats.failed(&self.task.name, &e, &mut backoff);
                    let mut stopped = self.task.stopped.clone();
                    self.tokio.block_on(async {
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
        let consumer = self.options.consumer(self.task.table.id)?;
        let Some(partitions) = self.partitions(&consumer)? else {
            self.topic_gone(committed)?;
            return Err(missing_topic(&self.options.topic));
        };
        self.start_offsets(&consumer, &partitions, committed)?;
        let shares = reader::split(committed, self.readers);
        let halt = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel(shares.len());
        let pacer = Arc::new(Mutex::new(Pacer::new(
            self.task.stats.limit.load(Ordering::Relaxed),
        )));
        let options = Arc::new(self.options.clone());
        let mut threads = Vec::new();
        for share in &shares {
            let reader = PartitionReader {
                options: options.clone(),
                name: self.task.name.clone(),
                table_id: self.task.table.id,
                next: share.clone(),
                halt: halt.clone(),
                stats: self.task.stats.clone(),
                pacer: pacer.clone(),
                out: tx.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("kafka-{}", self.task.name))
                .spawn(move || reader.run())
                .map_err(|e| ServerError::Internal(format!("kafka reader thread: {e}")))?;
            threads.push(spawned);
        }
        drop(tx);
        self.show_readers(&shares);
        info!(source = %self.task.name, topic = %self.options.topic, partitions = partitions.len(), readers = shares.len(), "kafka source assigned");
        self.task.stats.set_status("running", None);
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
            if *self.task.stopped.borrow() {
                return Ok(());
            }
            if probed.elapsed() >= PROBE_EVERY {
                let now = self
                    .partitions(consumer)?
                    .ok_or_else(|| missing_topic(&self.options.topic))?;
                if now.len() != partitions {
                    info!(source = %self.task.name, "kafka partitions changed; reassigning");
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
            self.commit(read.batch, &next, read.bad)?;
            *committed = next;
            *backoff = Duration::from_millis(100);
            self.task.stats.set_status("running", None);
            self.show_offsets(committed);
            if let Ok(mut parts) = self.task.stats.partitions.lock() {
                for (p, (rows, bytes, bad)) in &read.per_partition {
                    let part = parts.entry(p.to_string()).or_default();
                    part.rows += rows;
                    part.bytes += bytes;
                    part.bad_records += bad;
                }
            }
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
        warn!(source = %self.task.name, topic = %self.options.topic, "kafka topic deleted; a topic created again under its name will be read from its beginning");
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
            warn!(source = %self.task.name, topic = %self.options.topic, partition = p, committed = at, high, "kafka partition ends before the committed offset (the topic was created again or truncated); reading it from its beginning");
            Some(low)
        } else if at < low {
            warn!(source = %self.task.name, topic = %self.options.topic, partition = p, committed = at, low, skipped = low - at, "kafka messages were deleted by the broker before they were read; reading on at the oldest");
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
        if let Ok(mut parts) = self.task.stats.partitions.lock() {
            for (p, high) in highs {
                let part = parts.entry(p.to_string()).or_default();
                part.high_watermark = Some(high);
                part.tick();
            }
        }
        Ok(())
    }

    /// Commits rows with the offsets after them and the bad records read beside them.
    fn commit(&self, batch: RecordBatch, next: &Offsets, bad: Vec<BadRecord>) -> Result<()> {
        let state = serde_json::to_vec(next)
            .map_err(|e| ServerError::Internal(format!("source state: {e}")))?;
        let mut set = WriteSet::new();
        set.put_source_state(self.task.table.id, state);
        self.tokio.block_on(self.task.commit(batch, set, bad))
    }

    /// Publishes which reader owns each partition.
    fn show_readers(&self, shares: &[Offsets]) {
        if let Ok(mut parts) = self.task.stats.partitions.lock() {
            for (reader, share) in shares.iter().enumerate() {
                for p in share.keys() {
                    parts.entry(p.to_string()).or_default().reader = Some(reader as i32);
                }
            }
        }
    }

    /// Publishes committed offsets: per partition, and their sum as the source's offset.
    fn show_offsets(&self, committed: &Offsets) {
        if let Ok(mut o) = self.task.stats.offset.lock() {
            *o = committed.values().map(|v| (*v).max(0) as u64).sum();
        }
        if let Ok(mut parts) = self.task.stats.partitions.lock() {
            for (p, next) in committed {
                parts.entry(p.to_string()).or_default().offset = *next;
            }
        }
    }
}

fn missing_topic(topic: &str) -> ServerError {
    ServerError::Connector(format!("kafka topic {topic} does not exist"))
}
