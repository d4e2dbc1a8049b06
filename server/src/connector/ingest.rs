//! What every source shares: the column types a connector can fill, the generator of rows
//! by offset, the pacer that holds a source to its rate, and the commit of a batch with the
//! source's new position, like an INSERT.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use millrace_planner::MillraceTable;
use millrace_storage::WriteSet;
use tokio::sync::watch;

use crate::catalog::options::UNLIMITED;
use crate::engine::{Engine, TableChange};
use crate::error::Result;
use crate::registry::sources::{BadRecord, SourceStats};

/// Whether a connector can fill a column of type `t` (generated, or cast from record text).
pub fn column_type_supported(t: &DataType) -> bool {
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
pub const MAX_BATCH: u64 = 8192;

/// Produces the rows of a source by offset: the same offsets give the same rows.
pub trait Generator: Send {
    /// The rows at offsets `from .. from + rows`, in the table's schema.
    fn batch(&mut self, from: u64, rows: usize) -> Result<RecordBatch>;
}

/// Paces a source to a rate by a schedule (rows due = rate x time since start) rather than a
/// fixed batch per tick, so a high rate is not capped by the tick and a slow commit is caught
/// up in bigger batches.
pub struct Pacer {
    start: Instant,
    done: u64,
    rate: u64,
}

impl Pacer {
    pub fn new(rate: u64) -> Self {
        Self {
            start: Instant::now(),
            done: 0,
            rate: rate.max(1),
        }
    }

    /// Rows that may be read now (at most [`MAX_BATCH`]) under the rate `limit`.
    pub fn allowance(&mut self, limit: u64) -> u64 {
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
    pub fn consumed(&mut self, rows: u64) {
        self.done += rows;
    }

    /// Gives back rows counted by [`Pacer::consumed`] ahead of reading them but not read.
    pub fn refund(&mut self, rows: u64) {
        self.done = self.done.saturating_sub(rows);
    }

    /// Starts the schedule afresh: time spent failing is not owed as a burst afterwards.
    pub fn restart(&mut self) {
        self.start = Instant::now();
        self.done = 0;
    }

    /// How long to wait when nothing is due.
    pub fn wait(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate as f64)
            .clamp(Duration::from_millis(1), Duration::from_millis(100))
    }
}

/// What every running source holds, whatever feeds it (files, a Kafka topic, a generator):
/// the engine it commits through, the table it feeds, its name, its figures and the switch
/// that stops it.
pub struct SourceTask {
    /// Shared engine (commits, the bad-record list).
    pub engine: Arc<Engine>,
    /// The table fed.
    pub table: Arc<MillraceTable>,
    /// The table's name.
    pub name: String,
    /// Live figures.
    pub stats: Arc<SourceStats>,
    /// Set when the table is dropped.
    pub stopped: watch::Receiver<bool>,
}

impl SourceTask {
    /// Commits `batch` like an INSERT, with the source's new position (in `set`) and the bad
    /// records read beside it, in one write; then counts the rows and lists the bad records.
    pub async fn commit(
        &self,
        batch: RecordBatch,
        mut set: WriteSet,
        bad: Vec<BadRecord>,
    ) -> Result<()> {
        let rows = batch.num_rows() as u64;
        let staged = self.engine.sources.stage_bad(bad, &mut set)?;
        commit_rows(
            &self.engine,
            &self.table,
            &self.name,
            &self.stopped,
            batch,
            set,
        )
        .await?;
        SourceStats::count(&self.stats.rows, rows);
        self.stats.note_rows(rows);
        self.engine.sources.publish_bad(&self.stats, staged);
        Ok(())
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
        staged: Vec::new(),
    };
    engine.commit_changes(vec![change], set)?;
    Ok(())
}
