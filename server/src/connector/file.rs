//! `connector = 'file'`: a local directory of JSON-lines or CSV files, each file read once.
//!
//! The reader lists the directory every `poll_interval_ms`, takes the files it has not read
//! in name order (skipping names starting with `.` or ending in `.tmp`, so writers can
//! rename a finished file into place), and commits each file's good rows together with the
//! file's name added to the set of files read, in one RocksDB write: after a crash every file
//! is read exactly once. A bad record (malformed JSON or CSV, wrong type, missing NOT NULL
//! field, longer than `max_record_bytes`, invalid UTF-8) is skipped, counted and listed in
//! `millrace_source_errors`; the rest of the file is read. A missing or unreadable directory
//! turns the source unhealthy until it can be read again.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use millrace_planner::MillraceTable;
use millrace_storage::WriteSet;
use tokio::sync::watch;
use tracing::info;

use super::decode::{BatchBuilder, Format, RecordDecoder, bad_record};
use super::{BadRecord, ConnectorOptions, SourceStats, commit_rows};
use crate::engine::Engine;
use crate::error::{Result, ServerError};

/// The file connector's settings, checked at CREATE.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// The directory read.
    dir: PathBuf,
    /// Decodes each line.
    decoder: RecordDecoder,
    /// Time between directory listings.
    poll: Duration,
    /// The table's schema.
    schema: SchemaRef,
}

impl FileOptions {
    /// The settings of a file source feeding a table of `schema`.
    pub fn try_new(options: &ConnectorOptions, schema: &SchemaRef) -> Result<Self> {
        let dir = options
            .values
            .get("path")
            .ok_or_else(|| ServerError::InvalidSetting {
                name: "path".into(),
                value: String::new(),
            })?;
        let dir = PathBuf::from(dir.strip_prefix("file://").unwrap_or(dir));
        Ok(Self {
            dir,
            decoder: RecordDecoder::try_new(options, schema.fields().iter().cloned().collect())?,
            poll: Duration::from_millis(options.number("poll_interval_ms")?.unwrap_or(200).max(10)),
            schema: schema.clone(),
        })
    }
}

/// A running file source.
pub struct FileSource {
    /// Shared engine (commits, the bad-record list).
    pub engine: Arc<Engine>,
    /// The table fed.
    pub table: Arc<MillraceTable>,
    /// The table's name.
    pub name: String,
    /// Settings.
    pub options: FileOptions,
    /// Live figures.
    pub stats: Arc<SourceStats>,
    /// Set when the table is dropped.
    pub stopped: watch::Receiver<bool>,
}

impl FileSource {
    /// Reads new files until stopped.
    pub async fn run(mut self) {
        let mut read: BTreeSet<String> = match self.engine.store().source_state(self.table.id) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
            _ => BTreeSet::new(),
        };
        self.set_offset(read.len());
        let mut backoff = Duration::from_millis(100);
        loop {
            if *self.stopped.borrow() {
                self.stats.set_status("stopped", None);
                return;
            }
            let wait = match self.poll_once(&mut read).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    self.stats.set_status("running", None);
                    self.options.poll
                }
                Err(e) => self.stats.failed(&self.name, &e, &mut backoff),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stopped.changed() => {}
            }
        }
    }

    fn set_offset(&self, files: usize) {
        if let Ok(mut o) = self.stats.offset.lock() {
            *o = files as u64;
        }
    }

    /// Reads every file not read yet, one commit per file.
    async fn poll_once(&mut self, read: &mut BTreeSet<String>) -> Result<()> {
        let dir = self.options.dir.clone();
        let listing = std::fs::read_dir(&dir)
            .map_err(|e| ServerError::Connector(format!("cannot list {}: {e}", dir.display())))?;
        let mut new: Vec<String> = Vec::new();
        for entry in listing {
            let entry = entry.map_err(|e| {
                ServerError::Connector(format!("cannot list {}: {e}", dir.display()))
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".tmp") || read.contains(&name) {
                continue;
            }
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                new.push(name);
            }
        }
        new.sort();
        for name in new {
            if *self.stopped.borrow() {
                return Ok(());
            }
            let path = dir.join(&name);
            let bytes = std::fs::read(&path).map_err(|e| {
                ServerError::Connector(format!("cannot read {}: {e}", path.display()))
            })?;
            let (batch, bad) = self.parse(&name, &bytes)?;
            let rows = batch.num_rows() as u64;
            let mut after = read.clone();
            after.insert(name.clone());
            let state = serde_json::to_vec(&after)
                .map_err(|e| ServerError::Internal(format!("source state: {e}")))?;
            let mut set = WriteSet::new();
            set.put_source_state(self.table.id, state);
            commit_rows(
                &self.engine,
                &self.table,
                &self.name,
                &self.stopped,
                batch,
                set,
            )
            .await?;
            *read = after;
            self.set_offset(read.len());
            SourceStats::count(&self.stats.rows, rows);
            for record in bad {
                self.engine.sources.record_bad(&self.stats, record);
            }
            info!(source = %self.name, file = %name, rows, "file ingested");
        }
        Ok(())
    }

    /// The good rows of one file, and its bad records.
    fn parse(&self, file: &str, bytes: &[u8]) -> Result<(RecordBatch, Vec<BadRecord>)> {
        let mut rows = BatchBuilder::new(self.options.schema.clone());
        let mut bad = Vec::new();
        let mut lines = bytes.split(|b| *b == b'\n').enumerate();
        if self.options.decoder.format() == (Format::Csv { header: true }) {
            lines.next();
        }
        for (index, raw) in lines {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            match self.options.decoder.decode(raw) {
                Ok(values) => rows.push(values),
                Err(reason) => bad.push(bad_record(
                    &self.name,
                    file.to_string(),
                    index as u64 + 1,
                    raw,
                    reason,
                )),
            }
        }
        Ok((rows.finish()?, bad))
    }
}
