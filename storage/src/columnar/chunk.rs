//! One chunk of a table's columnar cache: up to 16k rows, hot (Arrow columns in memory) or
//! cold (a Parquet file on object storage), with their row ids and liveness. The table
//! (`columnar.rs`) places, reads and evicts chunks; a chunk knows only its own rows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, BooleanArray, RecordBatch, UInt64Array};
use arrow::compute::filter_record_batch;

use crate::chunk_ids::ChunkIds;
use crate::cold::ColdFile;
use crate::error::Result;
use crate::rows::{RowId, Rows, corrupt};

/// Logical clock of chunk reads and writes: the eviction order (least recent first).
static ACCESS_CLOCK: AtomicU64 = AtomicU64::new(1);

pub(crate) fn tick() -> u64 {
    ACCESS_CLOCK.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug)]
pub(crate) struct Chunk {
    /// Rows as appended (including rows deleted since).
    pub(crate) rows: Rows,
    /// Row ids aligned with the rows.
    pub(crate) row_ids: ChunkIds,
    /// Liveness of each row.
    pub(crate) live: Vec<bool>,
    /// Number of `true` entries in `live`.
    pub(crate) live_count: usize,
    /// Live rows and their ids of a hot chunk, computed on first read after a change.
    pub(crate) visible: OnceLock<(RecordBatch, UInt64Array)>,
    /// Live row ids of a cold chunk, computed on first read after a change.
    pub(crate) visible_ids: OnceLock<UInt64Array>,
    /// [`ACCESS_CLOCK`] at the last read.
    pub(crate) last_used: AtomicU64,
    /// Whether its row ids ascend and their range overlaps no other regular chunk's, so that
    /// the table finds its rows by range (else each id is in the table's `irregular` map).
    pub(crate) regular: bool,
}

impl Chunk {
    /// A hot chunk of `batch`, every row live.
    pub(crate) fn new(batch: RecordBatch, row_ids: UInt64Array) -> Self {
        let live = vec![true; batch.num_rows()];
        Self::with_rows(Rows::Hot(batch), row_ids, live)
    }

    /// A chunk of `rows` with their ids and liveness (a cold one when a log is replayed).
    pub(crate) fn with_rows(rows: Rows, row_ids: UInt64Array, live: Vec<bool>) -> Self {
        Self {
            live_count: live.iter().filter(|l| **l).count(),
            live,
            rows,
            row_ids: ChunkIds::new(row_ids),
            visible: OnceLock::new(),
            visible_ids: OnceLock::new(),
            last_used: AtomicU64::new(tick()),
            regular: false,
        }
    }

    pub(crate) fn first_id(&self) -> Option<RowId> {
        self.row_ids.first()
    }

    pub(crate) fn last_id(&self) -> Option<RowId> {
        self.row_ids.last()
    }

    pub(crate) fn changed(&mut self) {
        self.visible = OnceLock::new();
        self.visible_ids = OnceLock::new();
    }

    pub(crate) fn touch(&self) {
        self.last_used.store(tick(), Ordering::Relaxed);
    }

    pub(crate) fn all_live(&self) -> bool {
        self.live_count == self.live.len()
    }

    /// The cold file whose reference a log rewrite writes for this chunk: none for a hot
    /// chunk, or for a cold one with fewer than half its rows live (its live rows are written
    /// instead, so that the file is not kept for rows that are gone).
    pub(crate) fn logged_file(&self) -> Option<&Arc<ColdFile>> {
        match &self.rows {
            Rows::Cold(file) if self.live_count * 2 >= self.live.len() => Some(file),
            _ => None,
        }
    }

    /// Ascending positions of the live rows.
    pub(crate) fn live_positions(&self) -> Vec<usize> {
        self.live
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.then_some(i))
            .collect()
    }

    pub(crate) fn mask(&self) -> BooleanArray {
        BooleanArray::from(self.live.clone())
    }

    /// The ids of the live rows; of a cold chunk, remembered until it changes unless they
    /// are a range (then they are made on each read, instead of held 8 bytes a row).
    pub(crate) fn visible_row_ids(&self) -> Result<UInt64Array> {
        if let Rows::Hot(_) = self.rows {
            return self.visible_hot().map(|(_, ids)| ids.clone());
        }
        if let Some(ids) = self.visible_ids.get() {
            return Ok(ids.clone());
        }
        let ids = if self.all_live() {
            self.row_ids.to_array()
        } else {
            self.row_ids.filter(&self.live)
        };
        if self.row_ids.is_range() {
            return Ok(ids);
        }
        Ok(self.visible_ids.get_or_init(|| ids).clone())
    }

    pub(crate) fn visible_hot(&self) -> Result<&(RecordBatch, UInt64Array)> {
        if let Some(v) = self.visible.get() {
            return Ok(v);
        }
        let Rows::Hot(batch) = &self.rows else {
            return Err(corrupt("a cold chunk has no rows in memory"));
        };
        let computed = if self.all_live() {
            (batch.clone(), self.row_ids.to_array())
        } else {
            (
                filter_record_batch(batch, &self.mask())?,
                self.row_ids.filter(&self.live),
            )
        };
        Ok(self.visible.get_or_init(|| computed))
    }

    /// Live rows and their ids; a cold chunk's rows are read from its file.
    pub(crate) fn visible(&self, stats: &Counters) -> Result<(RecordBatch, UInt64Array)> {
        self.touch();
        match &self.rows {
            Rows::Hot(_) => {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                self.visible_hot().cloned()
            }
            Rows::Cold(file) => {
                stats.misses.fetch_add(1, Ordering::Relaxed);
                let positions = (!self.all_live()).then(|| self.live_positions());
                let batch = file.read(None, positions.as_deref())?;
                Ok((batch, self.visible_row_ids()?))
            }
        }
    }

    /// The rows at the given ascending positions (live or not).
    pub(crate) fn rows_at(&self, positions: &[usize], stats: &Counters) -> Result<RecordBatch> {
        self.touch();
        let counter = match &self.rows {
            Rows::Hot(_) => &stats.hits,
            Rows::Cold(_) => &stats.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.rows.at(positions)
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        let rows = match &self.rows {
            Rows::Hot(b) => b.get_array_memory_size(),
            Rows::Cold(_) => 0,
        };
        // NOTE: a hot chunk's visible ids are made from a range of ids, so they are memory
        // of their own.
        let visible = match (&self.rows, self.visible.get()) {
            (Rows::Hot(_), Some((_, ids))) if self.row_ids.is_range() => {
                ids.get_array_memory_size()
            }
            _ => 0,
        };
        rows + visible + self.row_ids.memory_bytes() + self.live.capacity()
    }
}

/// Hits, misses and evictions of one table.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) evictions: AtomicU64,
}
