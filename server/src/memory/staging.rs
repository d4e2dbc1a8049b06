//! Rows a statement writes, gathered before it commits (a COPY's parsed parts, the result of
//! an INSERT ... SELECT): held in memory, reserved in the session's statement memory, until
//! they pass the staging threshold (an eighth of the cache's share of `--memory-limit`, at
//! least 4 MiB; 256 MiB without a limit) or the pool refuses more; then staged, written as
//! cold files that the commit refers to (`engine.rs`), so that a statement larger than
//! memory streams and its rows still become visible at once.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use millrace_storage::ColdFile;
use tracing::warn;

use crate::error::Result;
use crate::memory::cache::CacheManager;

/// Rows of a staged file at most (a cold chunk of the table).
const STAGED_FILE_ROWS: usize = 65_536;

/// Held rows before staging at least (a file of fewer rows than this is not worth it).
const STAGE_BYTES_MIN: usize = 4 << 20;

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
    /// Whether staging failed (the object store refused a write): the rest is held.
    unstageable: bool,
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
            unstageable: false,
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
            .map_or(STAGE_BYTES_UNLIMITED, |share| (share / 8) as usize)
            .max(STAGE_BYTES_MIN);
        let fits = self.unstageable
            || self.held_bytes + bytes <= threshold && self.reservation.try_grow(bytes).is_ok();
        self.held.push(batch);
        if fits {
            if !self.unstageable {
                self.held_bytes += bytes;
            }
            return Ok(());
        }
        // NOTE: one copy of what is held (at most the threshold), cut into whole files.
        let held = std::mem::take(&mut self.held);
        let all = concat_batches(&held[0].schema(), &held)?;
        drop(held);
        let mut kept = Vec::new();
        for start in (0..all.num_rows()).step_by(STAGED_FILE_ROWS) {
            let rows = all.slice(start, STAGED_FILE_ROWS.min(all.num_rows() - start));
            if !self.unstageable {
                match self.cache.stage(self.table_id, &rows) {
                    Ok(file) => {
                        self.staged.push(file);
                        continue;
                    }
                    // NOTE: as an eviction that fails: the rows stay in memory, and the
                    // statement is not refused for the object store's sake.
                    Err(e) => {
                        warn!(error = %e, "staging rows in the object store failed; holding them in memory");
                        self.unstageable = true;
                    }
                }
            }
            kept.push(rows);
        }
        // NOTE: rows held after a refused write are slices of larger batches, whose sizes
        // would count their parents' buffers again and again: they are held unreserved.
        self.held = kept;
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
