//! What reads of a table get: snapshots of its live rows (whole, or tiered with cold chunks
//! left on object storage), the parts of a log rewrite, and the cache's figures.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::array::{BooleanArray, RecordBatch, UInt64Array};
use arrow::datatypes::SchemaRef;

use crate::cold::ColdFile;
use crate::columnar::ColumnarTable;
use crate::error::Result;
use crate::log_entry::LogEntry;
use crate::rows::{RowId, Rows};

/// A consistent, immutable view of a table's live rows.
#[derive(Debug, Clone)]
pub struct TableSnapshot {
    /// The table schema.
    pub schema: SchemaRef,
    /// Live rows, chunk by chunk.
    pub batches: Vec<RecordBatch>,
    /// Row ids aligned with `batches`.
    pub row_ids: Vec<UInt64Array>,
}

impl TableSnapshot {
    /// Total number of live rows.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// One part of a tiered snapshot.
#[derive(Debug, Clone)]
pub enum SnapshotPart {
    /// Live rows in memory.
    Hot(RecordBatch),
    /// Rows in a cold file: the live positions (all rows when `None`).
    Cold {
        /// The file (kept alive by the snapshot).
        file: Arc<ColdFile>,
        /// Ascending positions of the live rows, or `None` when every row is live.
        rows: Option<Arc<[usize]>>,
        /// Row ids of the live rows, appended to what is read as a last column (for DML,
        /// see [`ColumnarTable::tiered_snapshot_with_ids`]).
        ids: Option<UInt64Array>,
    },
}

impl SnapshotPart {
    /// Number of live rows.
    pub fn num_rows(&self) -> usize {
        match self {
            SnapshotPart::Hot(b) => b.num_rows(),
            SnapshotPart::Cold { file, rows, .. } => rows.as_ref().map_or(file.rows, |r| r.len()),
        }
    }
}

/// A snapshot whose cold chunks stay on object storage until the scan reads them.
#[derive(Debug, Clone)]
pub struct TieredSnapshot {
    /// The table schema.
    pub schema: SchemaRef,
    /// Hot batches and cold files, in chunk order.
    pub parts: Vec<SnapshotPart>,
}

/// Cache figures of one table or view, for `millrace_cache`.
#[derive(Debug, Clone, Default)]
pub struct CacheStats {
    /// Bytes held in memory (hot columns, row ids, liveness, indexes).
    pub memory_bytes: u64,
    /// Bytes of cold files on object storage.
    pub object_store_bytes: u64,
    /// Chunks in memory.
    pub hot_chunks: u64,
    /// Chunks on object storage.
    pub cold_chunks: u64,
    /// Reads served from memory (chunks read).
    pub hits: u64,
    /// Reads that went to object storage (chunks read).
    pub misses: u64,
    /// Chunks evicted so far.
    pub evictions: u64,
    /// Cold files held: those of cold chunks and those the durable log refers to.
    pub files: u64,
    /// Cold files the durable log refers to (a restart opens them instead of reading rows).
    pub log_files: u64,
}

impl ColumnarTable {
    /// Cache figures: bytes in memory and on object storage, chunks, hits, misses, evictions.
    pub fn cache_stats(&self) -> CacheStats {
        let mut stats = CacheStats {
            memory_bytes: self.memory_bytes() as u64,
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            ..CacheStats::default()
        };
        let mut read: HashSet<&str> = HashSet::new();
        for chunk in self.chunks.values() {
            match &chunk.rows {
                Rows::Hot(_) => stats.hot_chunks += 1,
                Rows::Cold(file) => {
                    stats.cold_chunks += 1;
                    stats.object_store_bytes += file.bytes;
                    read.insert(file.path());
                }
            }
        }
        for (path, file) in &self.log_files {
            if !read.contains(path.as_str()) {
                stats.object_store_bytes += file.bytes;
                stats.files += 1;
            }
        }
        stats.files += read.len() as u64;
        stats.log_files = self.log_files.len() as u64;
        stats
    }

    /// Bytes a row takes in memory, averaged over the chunks (cold ones by their files'
    /// uncompressed sizes): about what reading rows back costs.
    pub fn bytes_per_row(&self) -> u64 {
        let (mut bytes, mut rows) = (0u64, 0u64);
        for chunk in self.chunks.values() {
            match &chunk.rows {
                Rows::Hot(b) => {
                    bytes += b.get_array_memory_size() as u64;
                    rows += b.num_rows() as u64;
                }
                Rows::Cold(file) => {
                    let groups = file.metadata.row_groups().iter();
                    bytes += groups
                        .map(|g| g.total_byte_size().max(0) as u64)
                        .sum::<u64>();
                    rows += file.rows as u64;
                }
            }
        }
        bytes.checked_div(rows).unwrap_or(0)
    }

    /// Hot chunks that could be evicted: (chunk id, last read, bytes in memory).
    pub fn eviction_candidates(&self) -> Vec<(u64, u64, usize)> {
        self.chunks
            .iter()
            .filter_map(|(id, c)| match &c.rows {
                Rows::Hot(b) => Some((
                    *id,
                    c.last_used.load(Ordering::Relaxed),
                    b.get_array_memory_size(),
                )),
                Rows::Cold(_) => None,
            })
            .collect()
    }

    /// A consistent snapshot of the live rows; cold chunks are read into it.
    pub fn snapshot(&self) -> Result<TableSnapshot> {
        let mut batches = Vec::with_capacity(self.chunks.len());
        let mut row_ids = Vec::with_capacity(self.chunks.len());
        for chunk in self.chunks.values() {
            let (b, r) = chunk.visible(&self.counters)?;
            batches.push(b);
            row_ids.push(r);
        }
        Ok(TableSnapshot {
            schema: self.schema.clone(),
            batches,
            row_ids,
        })
    }

    /// A consistent snapshot that leaves cold chunks on object storage: a scan reads each
    /// with the columns it needs (counted as a miss here).
    pub fn tiered_snapshot(&self) -> Result<TieredSnapshot> {
        let mut parts = Vec::with_capacity(self.chunks.len());
        for chunk in self.chunks.values() {
            match &chunk.rows {
                Rows::Hot(_) => {
                    let (b, _) = chunk.visible(&self.counters)?;
                    parts.push(SnapshotPart::Hot(b));
                }
                Rows::Cold(file) => {
                    chunk.touch();
                    self.counters.misses.fetch_add(1, Ordering::Relaxed);
                    let rows = (!chunk.all_live()).then(|| chunk.live_positions().into());
                    parts.push(SnapshotPart::Cold {
                        file: file.clone(),
                        rows,
                        ids: None,
                    });
                }
            }
        }
        Ok(TieredSnapshot {
            schema: self.schema.clone(),
            parts,
        })
    }

    /// [`ColumnarTable::tiered_snapshot`] with the row ids of every part: hot batches carry
    /// them as a last column (`schema` is the table's plus that column), cold parts as
    /// `ids`. DML reads a table larger than memory this way, a file at a time.
    pub fn tiered_snapshot_with_ids(&self, schema: SchemaRef) -> Result<TieredSnapshot> {
        let mut snapshot = self.tiered_snapshot()?;
        for (part, chunk) in snapshot.parts.iter_mut().zip(self.chunks.values()) {
            let live = chunk.visible_row_ids()?;
            match part {
                SnapshotPart::Hot(batch) => {
                    let mut columns = batch.columns().to_vec();
                    columns.push(Arc::new(live));
                    *batch = RecordBatch::try_new(schema.clone(), columns)?;
                }
                SnapshotPart::Cold { ids, .. } => *ids = Some(live),
            }
        }
        snapshot.schema = schema;
        Ok(snapshot)
    }

    /// The live contents, a part per chunk, for rewriting a table's log: each part becomes an
    /// insert entry when read ([`LogPart::read`]), a cold chunk's file only then, or a
    /// reference to its cold file ([`LogPart::entry`]).
    pub fn log_parts(&self) -> Result<Vec<LogPart>> {
        let snapshot = self.tiered_snapshot()?;
        snapshot
            .parts
            .into_iter()
            .zip(self.chunks.values())
            .map(|(rows, chunk)| {
                Ok(LogPart {
                    file_rows: chunk
                        .logged_file()
                        .map(|_| (chunk.row_ids.to_array(), chunk.live.clone())),
                    rows,
                    row_ids: chunk.visible_row_ids()?,
                })
            })
            .collect()
    }

    /// The ids of every live row (cold chunks are not read).
    pub fn live_row_ids(&self) -> Result<Vec<RowId>> {
        let mut ids = Vec::with_capacity(self.live_rows);
        for chunk in self.chunks.values() {
            ids.extend_from_slice(chunk.visible_row_ids()?.values());
        }
        Ok(ids)
    }
}

/// One chunk's live rows as a future insert entry of a rewritten log.
#[derive(Debug)]
pub struct LogPart {
    rows: SnapshotPart,
    row_ids: UInt64Array,
    /// A cold chunk's row ids and liveness of every row of its file.
    file_rows: Option<(UInt64Array, Vec<bool>)>,
}

impl LogPart {
    /// Rows in the part.
    pub fn num_rows(&self) -> usize {
        self.row_ids.len()
    }

    /// The insert entry (reads a cold chunk's live rows from its file).
    pub fn read(self) -> Result<LogEntry> {
        let batch = match self.rows {
            SnapshotPart::Hot(batch) => batch,
            SnapshotPart::Cold { file, rows, .. } => file.read(None, rows.as_deref())?,
        };
        Ok(LogEntry::Insert {
            row_ids: self.row_ids,
            batch,
        })
    }

    /// The cold file [`LogPart::entry`] refers to, if it does.
    pub fn cold_file(&self) -> Option<&Arc<ColdFile>> {
        match (&self.rows, &self.file_rows) {
            (SnapshotPart::Cold { file, .. }, Some(_)) => Some(file),
            _ => None,
        }
    }

    /// The entry of a rewritten log: a hot chunk's rows as an insert, a cold chunk's as a
    /// reference to its file (nothing is read; but a chunk with fewer than half its rows
    /// live is read and written as an insert). The log must then keep the file (see
    /// [`ColumnarTable::set_log_files`]).
    pub fn entry(self) -> Result<LogEntry> {
        match (self.rows, self.file_rows) {
            (SnapshotPart::Cold { file, .. }, Some((row_ids, live))) => Ok(LogEntry::Cold {
                path: file.path().to_string(),
                row_ids,
                live: BooleanArray::from(live),
            }),
            (rows, _) => LogPart {
                rows,
                row_ids: self.row_ids,
                file_rows: None,
            }
            .read(),
        }
    }
}
