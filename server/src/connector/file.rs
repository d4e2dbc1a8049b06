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
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use millrace_planner::MillraceTable;
use millrace_storage::WriteSet;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio::sync::watch;
use tracing::info;

use super::avro;
use super::decode::{BatchBuilder, Format, RecordDecoder, bad_record};
use super::location::Location;
use super::{BadRecord, ConnectorOptions, SourceStats, commit_rows};
use crate::engine::Engine;
use crate::error::{Result, ServerError};

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
            if *self.stopped.borrow() {
                return Ok(());
            }
            let bytes = self.options.location.read(&name).await?;
            let (batch, bad) = match self.options.decoder.format() {
                Format::Parquet => self.parse_parquet(&name, bytes)?,
                Format::Avro => self.parse_avro(&name, &bytes)?,
                _ => self.parse(&name, &bytes)?,
            };
            let rows = batch.num_rows() as u64;
            let mut after = read.clone();
            after.insert(name.clone());
            let state = serde_json::to_vec(&after)
                .map_err(|e| ServerError::Internal(format!("source state: {e}")))?;
            let mut set = WriteSet::new();
            set.put_source_state(self.table.id, state);
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
            *read = after;
            self.set_offset(read.len());
            SourceStats::count(&self.stats.rows, rows);
            self.engine.sources.publish_bad(&self.stats, staged);
            info!(source = %self.name, file = %name, rows, "file ingested");
        }
        Ok(())
    }

    /// The good rows of one Parquet file (columns matched by name and cast to the table's
    /// types), and its bad records: rows with NULL in a NOT NULL column, or the whole file
    /// (line 0) when it cannot be decoded.
    fn parse_parquet(&self, file: &str, bytes: Bytes) -> Result<(RecordBatch, Vec<BadRecord>)> {
        let schema = self.options.schema.clone();
        let whole_file = |reason: String| {
            let empty = RecordBatch::new_empty(schema.clone());
            let prefix = bytes.slice(..bytes.len().min(16));
            (
                empty,
                vec![bad_record(&self.name, file.to_string(), 0, &prefix, reason)],
            )
        };
        let reader = match ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
            .and_then(|b| b.with_batch_size(8192).build())
        {
            Ok(r) => r,
            Err(e) => return Ok(whole_file(format!("unreadable Parquet file: {e}"))),
        };
        let mut rows = BatchBuilder::new(schema.clone());
        let mut bad = Vec::new();
        let mut line = 0u64;
        for batch in reader {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => return Ok(whole_file(format!("unreadable Parquet file: {e}"))),
            };
            let mut columns = Vec::with_capacity(schema.fields().len());
            for field in schema.fields() {
                let column = match batch.column_by_name(field.name()) {
                    Some(c) => datafusion::arrow::compute::cast(c, field.data_type())
                        .map_err(|e| format!("column \"{}\": {e}", field.name())),
                    None if field.is_nullable() => Ok(datafusion::arrow::array::new_null_array(
                        field.data_type(),
                        batch.num_rows(),
                    )),
                    None => Err(format!("missing required column \"{}\"", field.name())),
                };
                match column {
                    Ok(c) => columns.push(c),
                    Err(reason) => return Ok(whole_file(reason)),
                }
            }
            for i in 0..batch.num_rows() {
                line += 1;
                let values = columns
                    .iter()
                    .map(|c| ScalarValue::try_from_array(c, i))
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                match schema
                    .fields()
                    .iter()
                    .zip(&values)
                    .find(|(f, v)| !f.is_nullable() && v.is_null())
                {
                    Some((f, _)) => bad.push(bad_record(
                        &self.name,
                        file.to_string(),
                        line,
                        format!("{values:?}").as_bytes(),
                        format!("missing required field \"{}\"", f.name()),
                    )),
                    None => rows.push(values),
                }
            }
        }
        Ok((rows.finish()?, bad))
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
                bad.push(bad_record(&self.name, file.to_string(), 0, prefix, reason));
                return Ok((rows.finish()?, bad));
            }
        };
        for (index, record) in records.into_iter().enumerate() {
            match record.and_then(|values| decoder.typed(values)) {
                Ok(values) => rows.push(values),
                Err(reason) => bad.push(bad_record(
                    &self.name,
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
