//! Rows a statement writes, gathered before it commits (a COPY's parsed parts, the result of
//! an INSERT ... SELECT): held in memory, reserved in the session's statement memory, until
//! they pass the staging threshold (an eighth of the cache's share of `--memory-limit`,
//! 256 MiB without one) or the pool refuses more; then staged, written as cold files that
//! the commit refers to (`engine.rs`), so that a statement larger than memory streams and
//! its rows still become visible at once.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use millrace_storage::ColdFile;

use crate::error::Result;
use crate::memory::cache::CacheManager;

/// Rows of a staged file at most (a cold chunk of the table).
const STAGED_FILE_ROWS: usize = 65_536;

/// Held rows before staging when the server has no memory limit.
const STAGE_BYTES_UNLIMITED: usize = 256 << 20;

/// One statement's rows for one table, in the table's schema.
#[derive(Debug)]
pub struct Staging {
    table_id: u64,
    cache: Arc<CacheManager>,
    /// Rows held in memory.
    held: Vec<RecordBatch>,
    held_bytes: usize,
    reservation: MemoryReservation,
    /// Rows written to cold files.
    staged: Vec<Arc<ColdFile>>,
    rows: usize,
}

impl Staging {
    /// Gathers rows for table `table_id`, reserving what it holds in `pool` (the session's).
    pub fn new(table_id: u64, cache: Arc<CacheManager>, pool: &Arc<dyn MemoryPool>) -> Self {
        Self {
            table_id,
            cache,
            held: Vec::new(),
            held_bytes: 0,
            reservation: MemoryConsumer::new("staged rows").register(pool),
            staged: Vec::new(),
            rows: 0,
        }
    }

    /// Rows gathered so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Adds rows: held, or with those held so far written to cold files once they pass the
    /// threshold or the pool refuses them.
    pub fn add(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.rows += batch.num_rows();
        let bytes = batch.get_array_memory_size();
        let threshold = self
            .cache
            .budget
            .cache
            .map_or(STAGE_BYTES_UNLIMITED, |share| (share / 8) as usize);
        let fits = self.held_bytes + bytes <= threshold && self.reservation.try_grow(bytes).is_ok();
        self.held.push(batch);
        if fits {
            self.held_bytes += bytes;
            return Ok(());
        }
        for batch in std::mem::take(&mut self.held) {
            for start in (0..batch.num_rows()).step_by(STAGED_FILE_ROWS) {
                let rows = batch.slice(start, STAGED_FILE_ROWS.min(batch.num_rows() - start));
                self.staged.push(self.cache.stage(self.table_id, &rows)?);
            }
        }
        self.held_bytes = 0;
        self.reservation.free();
        Ok(())
    }

    /// The rows held (as one batch of `schema`, if any) and the staged files, for the
    /// statement's commit.
    pub fn finish(
        mut self,
        schema: &SchemaRef,
    ) -> Result<(Option<RecordBatch>, Vec<Arc<ColdFile>>)> {
        let held = match self.held.len() {
            0 => None,
            1 => self.held.pop(),
            _ => Some(concat_batches(schema, &self.held)?),
        };
        Ok((held, std::mem::take(&mut self.staged)))
    }
}
