//! The cold tier of the columnar cache: immutable Parquet files on object storage.
//!
//! When the process is over its memory budget, the cache manager evicts the least recently
//! used chunks of tables and view contents: each chunk's rows are written once as a Parquet
//! file (a local directory under the data dir by default, or an S3 bucket) and the chunk keeps
//! only its row ids and liveness in memory. Scans read the files back with projection and
//! row selection; point lookups read the selected rows only. A file is deleted once no chunk
//! and no running scan refer to it (its [`ColdFile`] handle is dropped). The files are a
//! cache of the durable table logs in RocksDB, so whatever a crash leaves behind is an
//! orphan, removed on the next start.
//!
//! A table's log can refer to its cold files instead of holding their rows (a log rewrite
//! writes a cold chunk as a [`crate::LogEntry::Cold`] entry): those files outlive the process,
//! are opened again on start ([`ColdStore::open`], reading only the footer) and stay until a
//! later rewrite no longer refers to them. Files are named by run, so that a start removes
//! only what earlier runs left and nothing refers to ([`ColdStore::remove_orphans`]).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowPredicateFn, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
};
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::properties::WriterProperties;

use crate::error::{Result, StorageError};

/// Rows per Parquet row group: small enough that a point lookup decodes little.
const ROW_GROUP_ROWS: usize = 8192;
/// Bytes read from the end of a file to find its footer when it is opened again (a footer
/// of a chunk's file is a few KiB; a larger one costs a second read).
const FOOTER_GUESS: u64 = 64 << 10;

/// Object-store traffic of the cold tier, for `millrace_cache`.
#[derive(Debug, Default)]
pub struct ColdCounters {
    /// Files written.
    pub files_written: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Files deleted.
    pub files_deleted: AtomicU64,
    /// Reads (GETs) of files.
    pub reads: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes held by live files now.
    pub bytes_stored: AtomicU64,
    /// Row groups a scan's filter ruled out by their statistics.
    pub row_groups_pruned: AtomicU64,
    /// Files a scan's filter ruled out entirely (not read).
    pub files_pruned: AtomicU64,
}

/// Where cold chunks go: a prefix in an object store.
pub struct ColdStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    /// Drives object-store I/O for the synchronous callers (the cache lives under locks).
    io: tokio::runtime::Handle,
    /// Files no longer referenced, deleted by [`ColdStore::collect_garbage`].
    garbage: Mutex<Vec<(Path, u64)>>,
    /// Files a handle refers to (written or opened by this process and not yet dropped).
    live: Mutex<HashSet<Path>>,
    /// This process's part of every file name it writes (unique per start).
    run: String,
    next_file: AtomicU64,
    /// Test failpoint: this many next writes fail.
    failing_writes: AtomicU64,
    /// Traffic so far.
    pub counters: ColdCounters,
}

impl std::fmt::Debug for ColdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColdStore").field("url", &self.url).finish()
    }
}

/// Whether each row of a batch is kept (a false or null result drops the row).
pub type RowPredicate =
    Box<dyn FnMut(RecordBatch) -> std::result::Result<BooleanArray, ArrowError> + Send>;

/// A predicate applied while a cold file is decoded: its columns are decoded first, and the
/// other columns read only for the rows it keeps.
pub struct RowFilter {
    /// The file's columns the predicate reads, ascending; its batches hold just these.
    pub columns: Vec<usize>,
    /// The predicate over a batch of those columns.
    pub predicate: RowPredicate,
}

impl std::fmt::Debug for RowFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowFilter")
            .field("columns", &self.columns)
            .finish_non_exhaustive()
    }
}

/// One immutable Parquet file holding a chunk's rows; deleted when the last handle goes.
#[derive(Debug)]
pub struct ColdFile {
    store: Arc<ColdStore>,
    path: Path,
    /// Rows in the file.
    pub rows: usize,
    /// Size of the file.
    pub bytes: u64,
    /// Schema of the rows.
    pub schema: SchemaRef,
    /// The file's footer: row groups with their column statistics (for pruning scans
    /// without reading the file).
    pub metadata: Arc<ParquetMetaData>,
}

impl ColdFile {
    /// The file's path in the object store (what a log entry refers to it by).
    pub fn path(&self) -> &str {
        self.path.as_ref()
    }

    /// Reads rows of the file (see [`ColdStore::read`]).
    pub fn read(
        &self,
        projection: Option<&[usize]>,
        rows: Option<&[usize]>,
    ) -> Result<RecordBatch> {
        self.store.read(self, projection, rows)
    }

    /// Reads rows of the file in batches (see [`ColdStore::read_batches`]), only from the row
    /// groups `row_groups` (ascending) when given: a scan's filter ruled the others out.
    pub fn read_batches(
        &self,
        projection: Option<&[usize]>,
        rows: Option<&[usize]>,
        row_groups: Option<&[usize]>,
    ) -> Result<Vec<RecordBatch>> {
        self.read_filtered(projection, rows, row_groups, None)
    }

    /// As [`ColdFile::read_batches`], only the rows `filter` keeps (all when `None`).
    pub fn read_filtered(
        &self,
        projection: Option<&[usize]>,
        rows: Option<&[usize]>,
        row_groups: Option<&[usize]>,
        filter: Option<RowFilter>,
    ) -> Result<Vec<RecordBatch>> {
        let Some(groups) = row_groups else {
            return Ok(self
                .store
                .read_batches(self, projection, rows, None, filter)?
                .1);
        };
        let pruned = self.metadata.num_row_groups().saturating_sub(groups.len()) as u64;
        let counters = &self.store.counters;
        counters
            .row_groups_pruned
            .fetch_add(pruned, Ordering::Relaxed);
        if groups.is_empty() {
            counters.files_pruned.fetch_add(1, Ordering::Relaxed);
            return Ok(Vec::new());
        }
        Ok(self
            .store
            .read_batches(self, projection, rows, Some(groups), filter)?
            .1)
    }

    /// First row and number of rows of each row group.
    fn row_group_ranges(&self) -> Vec<(usize, usize)> {
        let mut start = 0;
        self.metadata
            .row_groups()
            .iter()
            .map(|g| {
                let n = g.num_rows().max(0) as usize;
                let range = (start, n);
                start += n;
                range
            })
            .collect()
    }
}

impl Drop for ColdFile {
    fn drop(&mut self) {
        if let Ok(mut live) = self.store.live.lock() {
            live.remove(&self.path);
        }
        if let Ok(mut garbage) = self.store.garbage.lock() {
            garbage.push((self.path.clone(), self.bytes));
        }
    }
}

impl ColdStore {
    /// A cold tier writing under `prefix` of `store`; `url` names it in messages. Starts the
    /// I/O thread its synchronous calls run on.
    pub fn try_new(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Result<Arc<Self>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("millrace-cold-io".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("millrace-cold-io")
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = tx.send(Ok(runtime.handle().clone()));
                // The runtime lives as long as the process.
                runtime.block_on(futures::future::pending::<()>());
            })
            .map_err(|e| io_error(url, e.to_string()))?;
        let io = rx
            .recv()
            .map_err(|e| io_error(url, e.to_string()))?
            .map_err(|e| io_error(url, e))?;
        Ok(Arc::new(Self {
            store,
            prefix: Path::from(prefix),
            url: url.to_string(),
            io,
            garbage: Mutex::new(Vec::new()),
            live: Mutex::new(HashSet::new()),
            run: run_id(),
            next_file: AtomicU64::new(0),
            failing_writes: AtomicU64::new(0),
            counters: ColdCounters::default(),
        }))
    }

    /// Where the files go, for messages and `millrace_cache`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Test failpoint: the next `n` file writes fail as if the store refused the PUT.
    pub fn inject_write_failures(&self, n: u64) {
        self.failing_writes.store(n, Ordering::SeqCst);
    }

    /// Runs an object-store call on the I/O runtime and waits for it.
    fn block<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.io.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| io_error(&self.url, "the object-store I/O thread stopped".into()))
    }

    /// Writes `batch` as a new Parquet file; `owner` names the table or view in its path.
    pub fn write(self: &Arc<Self>, owner: &str, batch: &RecordBatch) -> Result<ColdFile> {
        let props = WriterProperties::builder()
            .set_compression(Compression::LZ4_RAW)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let mut buffer = Vec::with_capacity(batch.get_array_memory_size() / 2);
        let mut writer = ArrowWriter::try_new(&mut buffer, batch.schema(), Some(props))?;
        writer.write(batch)?;
        let metadata = Arc::new(writer.close()?);
        if self
            .failing_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StorageError::Injected(format!(
                "PUT to {} refused by a failpoint",
                self.url
            )));
        }
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let path = self
            .prefix
            .clone()
            .join(owner)
            .join(format!("{}-{n:08}.parquet", self.run));
        let bytes = buffer.len() as u64;
        // NOTE: listed before the PUT, so that an orphan sweep running meanwhile keeps it.
        self.track(&path);
        let store = self.store.clone();
        let target = path.clone();
        let put = self.block(async move { store.put(&target, PutPayload::from(buffer)).await });
        if let Err(e) = put.and_then(|r| r.map_err(Into::into)) {
            self.untrack(&path);
            return Err(e);
        }
        self.counters.files_written.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(bytes, Ordering::Relaxed);
        self.counters
            .bytes_stored
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(ColdFile {
            store: self.clone(),
            path,
            rows: batch.num_rows(),
            bytes,
            schema: batch.schema(),
            metadata,
        })
    }

    fn track(&self, path: &Path) {
        if let Ok(mut live) = self.live.lock() {
            live.insert(path.clone());
        }
    }

    fn untrack(&self, path: &Path) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(path);
        }
    }

    /// Opens a file an earlier run wrote (a table's log refers to it), reading only its
    /// footer; its rows must have the types of `schema`, which the handle then reports.
    pub fn open(self: &Arc<Self>, path: &str, schema: SchemaRef) -> Result<ColdFile> {
        let path = Path::from(path);
        let store = self.store.clone();
        let target = path.clone();
        let size = self.block(async move { store.head(&target).await })??.size;
        let mut reader = ParquetMetaDataReader::new();
        let mut want = FOOTER_GUESS.min(size);
        loop {
            let store = self.store.clone();
            let target = path.clone();
            let tail: Bytes =
                self.block(async move { store.get_range(&target, size - want..size).await })??;
            self.counters.reads.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_read
                .fetch_add(tail.len() as u64, Ordering::Relaxed);
            match reader.try_parse_sized(&tail, size) {
                Ok(()) => break,
                Err(ParquetError::NeedMoreData(needed)) if (needed as u64) > want => {
                    want = (needed as u64).min(size);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let metadata = reader.finish()?;
        let file_metadata = metadata.file_metadata();
        let stored = parquet::arrow::parquet_to_arrow_schema(
            file_metadata.schema_descr(),
            file_metadata.key_value_metadata(),
        )?;
        let types = |s: &arrow::datatypes::Schema| {
            s.fields()
                .iter()
                .map(|f| f.data_type().clone())
                .collect::<Vec<_>>()
        };
        if types(&stored) != types(&schema) {
            return Err(StorageError::Corrupt {
                what: "cold file",
                detail: format!(
                    "{}/{path} holds columns of other types than its table's",
                    self.url
                ),
            });
        }
        let rows =
            usize::try_from(file_metadata.num_rows()).map_err(|_| StorageError::Corrupt {
                what: "cold file",
                detail: format!("{}/{path} has a negative row count", self.url),
            })?;
        self.track(&path);
        self.counters
            .bytes_stored
            .fetch_add(size, Ordering::Relaxed);
        Ok(ColdFile {
            store: self.clone(),
            path,
            rows,
            bytes: size,
            schema,
            metadata: Arc::new(metadata),
        })
    }

    /// Reads rows of `file`: the columns in `projection` (all when `None`) of the rows at the
    /// ascending positions `rows` (all when `None`).
    pub fn read(
        &self,
        file: &ColdFile,
        projection: Option<&[usize]>,
        rows: Option<&[usize]>,
    ) -> Result<RecordBatch> {
        let (schema, batches) = self.read_batches(file, projection, rows, None, None)?;
        Ok(concat_batches(&schema, &batches)?)
    }

    /// [`ColdStore::read`] as batches of at most a row group each, for scans; only from the
    /// ascending `row_groups` when given.
    pub fn read_batches(
        &self,
        file: &ColdFile,
        projection: Option<&[usize]>,
        rows: Option<&[usize]>,
        row_groups: Option<&[usize]>,
        filter: Option<RowFilter>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let store = self.store.clone();
        let path = file.path.clone();
        let bytes: Bytes = self.block(async move { store.get(&path).await?.bytes().await })??;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
        let schema = match projection {
            Some(p) => {
                let mask = ProjectionMask::roots(builder.parquet_schema(), p.iter().copied());
                builder = builder.with_projection(mask);
                Arc::new(file.schema.project(p)?)
            }
            None => file.schema.clone(),
        };
        match (row_groups, rows) {
            (None, None) => {}
            (None, Some(rows)) => builder = builder.with_row_selection(selection(rows, file.rows)),
            (Some(groups), rows) => {
                // The selection counts only the rows of the groups read.
                let ranges = file.row_group_ranges();
                let mut rebased = Vec::new();
                let mut offset = 0;
                for &g in groups {
                    let Some(&(start, n)) = ranges.get(g) else {
                        continue;
                    };
                    match rows {
                        Some(rows) => {
                            let from = rows.partition_point(|&r| r < start);
                            let to = rows.partition_point(|&r| r < start + n);
                            rebased.extend(rows[from..to].iter().map(|r| r - start + offset));
                        }
                        None => rebased.extend(offset..offset + n),
                    }
                    offset += n;
                }
                builder = builder
                    .with_row_groups(groups.to_vec())
                    .with_row_selection(selection(&rebased, offset));
            }
        }
        if let Some(filter) = filter {
            let mask = ProjectionMask::roots(builder.parquet_schema(), filter.columns);
            let predicate = ArrowPredicateFn::new(mask, filter.predicate);
            builder = builder.with_row_filter(parquet::arrow::arrow_reader::RowFilter::new(vec![
                Box::new(predicate),
            ]));
        }
        let reader = builder.with_batch_size(ROW_GROUP_ROWS).build()?;
        let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((schema, batches))
    }

    /// Deletes the files no chunk refers to any more; returns how many.
    pub fn collect_garbage(&self) -> Result<usize> {
        let mut paths = match self.garbage.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(_) => return Ok(0),
        };
        let mut deleted = 0;
        while let Some((path, bytes)) = paths.pop() {
            let store = self.store.clone();
            let target = path.clone();
            let result = self
                .block(async move { store.delete(&target).await })
                .and_then(|r| match r {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                });
            if let Err(e) = result {
                // The files not deleted stay listed for the next call.
                paths.push((path, bytes));
                if let Ok(mut g) = self.garbage.lock() {
                    g.extend(paths);
                }
                return Err(e);
            }
            deleted += 1;
            self.counters.files_deleted.fetch_add(1, Ordering::Relaxed);
            // Only written files are listed here, each once: the sum never goes below zero.
            self.counters
                .bytes_stored
                .fetch_sub(bytes, Ordering::Relaxed);
        }
        Ok(deleted)
    }

    /// Deletes the files earlier runs left under the prefix that no handle refers to: called
    /// once the tables have opened the files their logs refer to, the rest is what a crash
    /// (or a rewrite that replaced them) left behind. Returns how many.
    pub fn remove_orphans(&self) -> Result<usize> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        let live = self.live.lock().map(|l| l.clone()).unwrap_or_default();
        let own = format!("{}-", self.run);
        self.block(async move {
            let paths: Vec<Path> = store
                .list(Some(&prefix))
                .filter_map(|m| async move { m.ok().map(|m| m.location) })
                .filter(|p| {
                    let ours = p.filename().is_some_and(|f| f.starts_with(&own));
                    std::future::ready(!ours && !live.contains(p))
                })
                .collect()
                .await;
            let n = paths.len();
            for path in paths {
                match store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(n)
        })?
        .map_err(Into::into)
    }
}

/// A name part unique to this store: the time it was made (microseconds) and a count of the
/// stores made by this process.
fn run_id() -> String {
    static STORES: AtomicU64 = AtomicU64::new(0);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("{micros:x}.{}", STORES.fetch_add(1, Ordering::Relaxed))
}

/// A row selection picking the ascending positions `rows` out of `total`.
fn selection(rows: &[usize], total: usize) -> RowSelection {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for &r in rows {
        match ranges.last_mut() {
            Some(last) if last.end == r => last.end = r + 1,
            _ => ranges.push(r..r + 1),
        }
    }
    let mut selectors = Vec::with_capacity(ranges.len() * 2 + 1);
    let mut at = 0;
    for range in ranges {
        if range.start > at {
            selectors.push(RowSelector::skip(range.start - at));
        }
        selectors.push(RowSelector::select(range.len()));
        at = range.end;
    }
    if total > at {
        selectors.push(RowSelector::skip(total - at));
    }
    RowSelection::from(selectors)
}

fn io_error(url: &str, detail: String) -> StorageError {
    StorageError::ObjectStore(format!("{url}: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use object_store::local::LocalFileSystem;

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from((0..n).collect::<Vec<_>>())),
                Arc::new(StringArray::from(
                    (0..n).map(|i| format!("v{i}")).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    #[test]
    fn write_read_select_and_collect() {
        let dir = tempfile::tempdir().unwrap();
        let fs = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let cold = ColdStore::try_new(Arc::new(fs), "cache", "test").unwrap();
        let b = batch(20_000);
        let file = cold.write("t1", &b).unwrap();
        assert_eq!(cold.read(&file, None, None).unwrap(), b);
        let picked = cold
            .read(&file, Some(&[1]), Some(&[3, 4, 9000, 19_999]))
            .unwrap();
        let v = picked
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(
            v.iter().flatten().collect::<Vec<_>>(),
            vec!["v3", "v4", "v9000", "v19999"]
        );
        // Only the second row group (rows 8192..16384): of the rows asked for, 9000 and 9001.
        let groups = file
            .read_batches(Some(&[0]), Some(&[3, 9000, 9001, 19_999]), Some(&[1]))
            .unwrap();
        assert_eq!(crate::test_util::first_i64s(&groups), vec![9000, 9001]);
        assert!(file.read_batches(None, None, Some(&[])).unwrap().is_empty());
        assert_eq!(cold.counters.files_pruned.load(Ordering::Relaxed), 1);
        // A filter on `k` (decoded first) keeps multiples of 1000 among the live rows
        // 0..=15000 of the first two row groups; `v` is read for those rows only.
        let seen = Arc::new(AtomicU64::new(0));
        let counted = seen.clone();
        let filter = RowFilter {
            columns: vec![0],
            predicate: Box::new(move |b: RecordBatch| {
                counted.fetch_add(b.num_rows() as u64, Ordering::Relaxed);
                let k = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                Ok(k.iter().map(|k| k.map(|k| k % 1000 == 0)).collect())
            }),
        };
        let live: Vec<usize> = (0..=15_000).collect();
        let kept = file
            .read_filtered(Some(&[1]), Some(&live), Some(&[0, 1]), Some(filter))
            .unwrap();
        let v: Vec<String> = kept
            .iter()
            .flat_map(|b| {
                let v = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                v.iter().flatten().map(str::to_string).collect::<Vec<_>>()
            })
            .collect();
        let want: Vec<String> = (0..=15).map(|i| format!("v{}", i * 1000)).collect();
        assert_eq!(v, want);
        assert_eq!(
            seen.load(Ordering::Relaxed),
            15_001,
            "the filter saw only the selected rows"
        );
        cold.inject_write_failures(1);
        assert!(matches!(
            cold.write("t1", &b),
            Err(StorageError::Injected(_))
        ));
        assert_eq!(cold.collect_garbage().unwrap(), 0);
        drop(file);
        assert_eq!(cold.collect_garbage().unwrap(), 1);
        assert_eq!(cold.counters.bytes_stored.load(Ordering::Relaxed), 0);
        let orphan = cold.write("t2", &b).unwrap();
        std::mem::forget(orphan);
        assert_eq!(
            cold.remove_orphans().unwrap(),
            0,
            "this run's files are kept"
        );
    }

    #[test]
    fn a_later_run_opens_referenced_files_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let first = ColdStore::try_new(fs.clone(), "cache", "test").unwrap();
        let b = batch(20_000);
        let kept = first.write("t1", &b).unwrap();
        let kept_path = kept.path().to_string();
        std::mem::forget(kept);
        std::mem::forget(first.write("t1", &b).unwrap());
        // The next start: the log refers to the first file only.
        let second = ColdStore::try_new(fs, "cache", "test").unwrap();
        let opened = second.open(&kept_path, b.schema()).unwrap();
        assert_eq!(opened.rows, 20_000);
        assert_eq!(opened.metadata.num_row_groups(), 3);
        assert_eq!(second.read(&opened, None, None).unwrap(), b);
        let picked = opened.read(Some(&[0]), Some(&[7, 19_000])).unwrap();
        assert_eq!(crate::test_util::first_i64s(&[picked]), vec![7, 19_000]);
        let other_types = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        assert!(matches!(
            second.open(&kept_path, other_types),
            Err(StorageError::Corrupt { .. })
        ));
        assert!(second.open("cache/t1/missing.parquet", b.schema()).is_err());
        assert_eq!(second.remove_orphans().unwrap(), 1, "the unreferenced file");
        assert_eq!(
            second.read(&opened, Some(&[0]), None).unwrap().num_rows(),
            20_000
        );
        drop(opened);
        assert_eq!(second.collect_garbage().unwrap(), 1);
        assert_eq!(second.remove_orphans().unwrap(), 0);
    }
}
