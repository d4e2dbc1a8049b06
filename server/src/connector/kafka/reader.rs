//! The readers of a Kafka source: each owns a share of the topic's partitions, fetched by
//! its own consumer in a child process ([`super::fetch`]), and decodes the messages
//! into Arrow batches on its own thread.
//!
//! Flow: the source's session ([`super::kafka`]) splits the partitions over its readers,
//! which run in parallel (one per pipeline worker by default) and hand each decoded batch,
//! with the next offset of every partition it covers, over a bounded channel to the
//! session, which commits them one at a time. A full channel stops the readers polling, so
//! a slow commit or a slow view slows the broker reads instead of growing memory. Rows under
//! a rate limit are reserved from one shared [`Pacer`] before they are read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::common::ScalarValue;

use crate::connector::decode::{BatchBuilder, bad_record};
use crate::connector::ingest::{MAX_BATCH, Pacer};
use crate::connector::kafka::fetch::{FetchProcess, Frame};
use crate::connector::kafka::options::{Column, KafkaOptions, Offsets};
use crate::error::Result;
use crate::registry::sources::{BadRecord, SourceStats};

/// What one reader read in one round: the rows, the bad records, and the next offset of
/// each partition it read from.
pub(super) struct ReadBatch {
    pub batch: RecordBatch,
    pub bad: Vec<BadRecord>,
    /// Good rows, bytes and bad records by partition.
    pub per_partition: BTreeMap<i32, (u64, u64, u64)>,
    pub next: Offsets,
}

/// One reader: a consumer assigned a share of the partitions.
pub(super) struct PartitionReader {
    pub options: Arc<KafkaOptions>,
    pub name: String,
    pub table_id: u64,
    /// Next offset of each partition this reader owns.
    pub next: Offsets,
    /// Set by the session when it ends; the reader returns at its next poll.
    pub halt: Arc<AtomicBool>,
    /// The source's rate limit (rows per second) and the schedule shared by its readers.
    pub stats: Arc<SourceStats>,
    pub pacer: Arc<Mutex<Pacer>>,
    pub out: SyncSender<Result<ReadBatch>>,
}

impl PartitionReader {
    /// Reads until halted or the session stops listening; a failure is sent, then ends it.
    pub fn run(mut self) {
        let mut fetch =
            match FetchProcess::start(&self.options.fetch_spec(self.table_id, &self.next)) {
                Ok(f) => f,
                Err(e) => {
                    let _ = self.out.send(Err(e));
                    return;
                }
            };
        while !self.halt.load(Ordering::Relaxed) {
            let allowance = self.reserve();
            if allowance == 0 {
                std::thread::sleep(self.wait());
                continue;
            }
            let read = self.read_batch(&mut fetch, allowance);
            let (rows, failed) = match &read {
                Ok(r) => (r.batch.num_rows() as u64, false),
                Err(_) => (0, true),
            };
            self.refund(allowance - rows.min(allowance));
            let empty = matches!(&read, Ok(r) if r.next == self.next);
            if empty {
                continue;
            }
            if let Ok(r) = &read {
                self.next = r.next.clone();
            }
            if self.out.send(read).is_err() || failed {
                return;
            }
        }
    }

    /// Rows this reader may read now under the rate limit.
    fn reserve(&self) -> u64 {
        let limit = self.stats.limit.load(Ordering::Relaxed);
        match self.pacer.lock() {
            Ok(mut pacer) => {
                let n = pacer.allowance(limit);
                pacer.consumed(n);
                n
            }
            Err(_) => MAX_BATCH,
        }
    }

    /// Gives back rows reserved but not read.
    fn refund(&self, unused: u64) {
        if let Ok(mut pacer) = self.pacer.lock() {
            pacer.refund(unused);
        }
    }

    fn wait(&self) -> Duration {
        self.pacer
            .lock()
            .map(|p| p.wait())
            .unwrap_or(Duration::from_millis(10))
    }

    /// Reads messages until `limit` rows, a short pause in arrivals, or 100 ms.
    fn read_batch(&self, fetch: &mut FetchProcess, limit: u64) -> Result<ReadBatch> {
        let options = &self.options;
        let mut next = self.next.clone();
        let mut rows = BatchBuilder::new(options.schema.clone());
        let mut bad = Vec::new();
        let mut per_partition: BTreeMap<i32, (u64, u64, u64)> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_millis(100);
        while (rows.len() as u64) < limit.min(MAX_BATCH) && Instant::now() < deadline {
            if self.halt.load(Ordering::Relaxed) {
                break;
            }
            let Frame::Message {
                partition: p,
                offset,
                timestamp: ms,
                key,
                payload,
            } = fetch.next()?
            else {
                if rows.is_empty() && next == self.next {
                    continue;
                }
                break;
            };
            match next.get(&p) {
                Some(n) if offset >= *n => {}
                _ => continue,
            }
            next.insert(p, offset + 1);
            let figures = per_partition.entry(p).or_default();
            figures.1 += payload.len() as u64;
            match options.decoder.decode(payload) {
                Ok(values) => {
                    figures.0 += 1;
                    let row = options
                        .columns
                        .iter()
                        .zip(options.schema.fields())
                        .map(|(column, field)| {
                            let raw = match column {
                                Column::Payload(i) => return values[*i].clone(),
                                Column::Key => ScalarValue::Utf8(
                                    key.map(|k| String::from_utf8_lossy(k).into_owned()),
                                ),
                                Column::Partition => ScalarValue::Int32(Some(p)),
                                Column::Offset => ScalarValue::Int64(Some(offset)),
                                Column::Timestamp => {
                                    ScalarValue::TimestampMillisecond(ms, Some("+00:00".into()))
                                }
                            };
                            raw.cast_to(field.data_type()).unwrap_or_else(|_| {
                                ScalarValue::try_from(field.data_type())
                                    .unwrap_or(ScalarValue::Null)
                            })
                        })
                        .collect();
                    rows.push(row);
                }
                Err(reason) => {
                    figures.2 += 1;
                    bad.push(bad_record(
                        &self.name,
                        p.to_string(),
                        offset as u64,
                        payload,
                        reason,
                    ));
                }
            }
        }
        Ok(ReadBatch {
            batch: rows.finish()?,
            bad,
            per_partition,
            next,
        })
    }
}

/// Splits partitions (with their next offsets) into at most `readers` shares, round robin.
pub(super) fn split(offsets: &Offsets, readers: usize) -> Vec<Offsets> {
    let readers = readers.clamp(1, offsets.len().max(1));
    let mut shares = vec![Offsets::new(); readers];
    for (i, (p, next)) in offsets.iter().enumerate() {
        shares[i % readers].insert(*p, *next);
    }
    shares.retain(|s| !s.is_empty());
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_partition_once() {
        let offsets: Offsets = (0..5).map(|p| (p, p as i64 * 10)).collect();
        let shares = split(&offsets, 2);
        assert_eq!(shares.len(), 2);
        let mut all: Vec<_> = shares.iter().flatten().map(|(p, o)| (*p, *o)).collect();
        all.sort();
        assert_eq!(all, offsets.into_iter().collect::<Vec<_>>());
        assert_eq!(split(&Offsets::new(), 4).len(), 0);
        assert_eq!(split(&[(0, 0)].into_iter().collect(), 4).len(), 1);
    }
}
