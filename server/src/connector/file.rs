//! `connector = 'file'`: a local directory or an S3 prefix (`path = 's3://bucket/prefix'`)
//! of JSON-lines, CSV, Parquet or Avro object container files, each file read once.
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
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use millrace_storage::WriteSet;
use tracing::info;

use crate::catalog::options::ConnectorOptions;
use crate::connector::decode::{BatchBuilder, RecordDecoder, bad_record};
use crate::connector::format::Format;
use crate::connector::format::avro;
use crate::connector::ingest::SourceTask;
use crate::connector::location::Location;
use crate::error::{Result, ServerError};
use crate::registry::sources::BadRecord;

/// The file connector's settings, checked at CREATE.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// The directory read.
    location: Location,
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
        Ok(Self {
            location: Location::try_new(options)?,
            decoder: RecordDecoder::try_new(options, schema.fields().iter().cloned().collect())?,
            poll: Duration::from_millis(options.number("poll_interval_ms")?.unwrap_or(200).max(10)),
            schema: schema.clone(),
        })
    }
}

/// A running file source.
pub struct FileSource {
    /// The table it feeds, its figures and its switch.
    pub task: SourceTask,
    /// Settings.
    pub options: FileOptions,
}

impl FileSource {
    /// Reads new files until stopped.
    pub async fn run(mut self) {
        let mut read: BTreeSet<String> =
            match self.task.engine.store().source_state(self.task.table.id) {
                Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
                _ => BTreeSet::new(),
            };
        self.set_offset(read.len());
        let mut backoff = Duration::from_millis(100);
        loop {
            if *self.task.stopped.borrow() {
                self.task.stats.set_status("stopped", None);
                return;
            }
            let wait = match self.poll_once(&mut read).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    self.task.stats.set_status("running", None);
                    self.options.poll
                }
                Err(e) => self.task.stats.failed(&self.task.name, &e, &mut backoff),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.task.stopped.changed() => {}
            }
        }
    }

    fn set_offset(&self, files: usize) {
        if let Ok(mut o) = self.task.stats.offset.lock() {
            *o = files as u64;
        }
    }

    /// Reads every file not read yet, one commit per file.
    async fn poll_once(&mut self, read: &mut BTreeSet<String>) -> Result<()> {
        let mut new: Vec<String> = self
            .options
            .location
            .list()
            .await?
            .into_iter()
            .filter(|name| {
                !(name.starts_with('.') || name.ends_with(".tmp") || read.contains(name))
            })
            .collect();
        new.sort();
        for name in new {
            if *self.task.stopped.borrow() {
                return Ok(());
            }
            let bytes = self.options.location.read(&name).await?;
            let (batch, bad) = match self.options.decoder.format() {
                Format::Parquet => crate::connector::format::parquet::rows(
                    &self.task.name,
                    &name,
                    bytes,
                    &self.options.schema,
                )?,
                Format::Avro => self.parse_avro(&name, &bytes)?,
                _ => self.parse(&name, &bytes)?,
            };
            let rows = batch.num_rows() as u64;
            let mut after = read.clone();
            after.insert(name.clone());
            let state = serde_json::to_vec(&after)
                .map_err(|e| ServerError::Internal(format!("source state: {e}")))?;
            let mut set = WriteSet::new();
            set.put_source_state(self.task.table.id, state);
            self.task.commit(batch, set, bad).await?;
            *read = after;
            self.set_offset(read.len());
            info!(source = %self.task.name, file = %name, rows, "file ingested");
        }
        Ok(())
    }

    /// The good rows of one Avro object container file (fields matched by name), and its
    /// bad records: records that do not fit the table, the rest of the file from a corrupt
    /// block on, or the whole file (line 0) when its header or schema does not fit.
    fn parse_avro(&self, file: &str, bytes: &[u8]) -> Result<(RecordBatch, Vec<BadRecord>)> {
        let decoder = &self.options.decoder;
        let mut rows = BatchBuilder::new(self.options.schema.clone());
        let mut bad = Vec::new();
        let records = match avro::container_records(bytes, decoder.fields()) {
            Ok(records) => records,
            Err(reason) => {
                let prefix = &bytes[..bytes.len().min(16)];
                bad.push(bad_record(
                    &self.task.name,
                    file.to_string(),
                    0,
                    prefix,
                    reason,
                ));
                return Ok((rows.finish()?, bad));
            }
        };
        for (index, record) in records.into_iter().enumerate() {
            match record.and_then(|values| decoder.typed(values)) {
                Ok(values) => rows.push(values),
                Err(reason) => bad.push(bad_record(
                    &self.task.name,
                    file.to_string(),
                    index as u64 + 1,
                    b"",
                    reason,
                )),
            }
        }
        Ok((rows.finish()?, bad))
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
                    &self.task.name,
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
