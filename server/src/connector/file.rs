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
use std::time::{Duration, SystemTime};

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ScalarValue;
use millrace_planner::MillraceTable;
use millrace_storage::WriteSet;
use tokio::sync::watch;
use tracing::info;

use super::{BadRecord, ConnectorOptions, SourceStats, commit_rows};
use crate::engine::Engine;
use crate::error::{Result, ServerError};

/// Bytes of a bad record kept in `millrace_source_errors`.
const PAYLOAD_PREFIX: usize = 200;

/// How records are laid out in the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// One JSON object per line, fields by column name.
    Json,
    /// Comma-separated values in column order.
    Csv { header: bool },
}

/// The file connector's settings, checked at CREATE.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// The directory read.
    dir: PathBuf,
    /// Record layout.
    format: Format,
    /// Longest record accepted.
    max_record_bytes: usize,
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
        let header = matches!(
            options.values.get("csv.header").map(|s| s.as_str()),
            Some("true" | "on" | "1")
        );
        let format = match options.values.get("format").map(|s| s.to_ascii_lowercase()) {
            None => Format::Json,
            Some(f) if f == "json" || f == "jsonl" => Format::Json,
            Some(f) if f == "csv" => Format::Csv { header },
            Some(other) => {
                return Err(ServerError::NotSupported(format!("file format '{other}'")));
            }
        };
        for field in schema.fields() {
            if !matches!(
                field.data_type(),
                DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::Float32
                    | DataType::Float64
                    | DataType::Utf8
                    | DataType::Boolean
                    | DataType::Date32
                    | DataType::Timestamp(..)
                    | DataType::Decimal128(..)
            ) {
                return Err(ServerError::NotSupported(format!(
                    "file source column \"{}\" of type {}",
                    field.name(),
                    field.data_type()
                )));
            }
        }
        Ok(Self {
            dir,
            format,
            max_record_bytes: options.number("max_record_bytes")?.unwrap_or(1 << 20) as usize,
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
            .map_err(|e| ServerError::Internal(format!("cannot list {}: {e}", dir.display())))?;
        let mut new: Vec<String> = Vec::new();
        for entry in listing {
            let entry = entry.map_err(|e| {
                ServerError::Internal(format!("cannot list {}: {e}", dir.display()))
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
                ServerError::Internal(format!("cannot read {}: {e}", path.display()))
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
        let fields = self.options.schema.fields();
        let mut columns: Vec<Vec<ScalarValue>> = vec![Vec::new(); fields.len()];
        let mut bad = Vec::new();
        let mut lines = bytes.split(|b| *b == b'\n').enumerate();
        if self.options.format == (Format::Csv { header: true }) {
            lines.next();
        }
        for (index, raw) in lines {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            match self.record(raw) {
                Ok(values) => {
                    for (column, value) in columns.iter_mut().zip(values) {
                        column.push(value);
                    }
                }
                Err(reason) => bad.push(BadRecord {
                    source: self.name.clone(),
                    partition: file.to_string(),
                    offset: index as u64 + 1,
                    payload: String::from_utf8_lossy(&raw[..raw.len().min(PAYLOAD_PREFIX)])
                        .into_owned(),
                    reason,
                    time: SystemTime::now(),
                }),
            }
        }
        let arrays = columns
            .into_iter()
            .zip(fields.iter())
            .map(|(values, field)| {
                if values.is_empty() {
                    Ok(datafusion::arrow::array::new_empty_array(field.data_type()))
                } else {
                    ScalarValue::iter_to_array(values)
                }
            })
            .collect::<datafusion::error::Result<Vec<ArrayRef>>>()?;
        Ok((
            RecordBatch::try_new(self.options.schema.clone(), arrays)?,
            bad,
        ))
    }

    /// One record's values in column order, or why it is refused.
    fn record(&self, raw: &[u8]) -> std::result::Result<Vec<ScalarValue>, String> {
        if raw.len() > self.options.max_record_bytes {
            return Err(format!(
                "record of {} bytes exceeds max_record_bytes = {}",
                raw.len(),
                self.options.max_record_bytes
            ));
        }
        let text = std::str::from_utf8(raw)
            .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
        let fields = self.options.schema.fields();
        let texts: Vec<Option<String>> = match self.options.format {
            Format::Json => {
                let value: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
                let serde_json::Value::Object(object) = value else {
                    return Err("a JSON record must be an object".into());
                };
                fields
                    .iter()
                    .map(|f| match object.get(f.name()) {
                        None | Some(serde_json::Value::Null) => Ok(None),
                        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                        Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                            Ok(Some(v.to_string()))
                        }
                        Some(other) => Err(format!(
                            "field \"{}\": {} is not a {}",
                            f.name(),
                            kind(other),
                            f.data_type()
                        )),
                    })
                    .collect::<std::result::Result<_, String>>()?
            }
            Format::Csv { .. } => {
                let mut reader = csv::ReaderBuilder::new()
                    .has_headers(false)
                    .from_reader(text.as_bytes());
                let record = reader
                    .records()
                    .next()
                    .ok_or("empty CSV record")?
                    .map_err(|e| format!("malformed CSV: {e}"))?;
                if record.len() != fields.len() {
                    return Err(format!(
                        "{} CSV fields, the table has {} columns",
                        record.len(),
                        fields.len()
                    ));
                }
                record
                    .iter()
                    .map(|v| (!v.is_empty()).then(|| v.to_string()))
                    .collect()
            }
        };
        fields
            .iter()
            .zip(texts)
            .map(|(field, text)| match text {
                None if !field.is_nullable() => {
                    Err(format!("missing required field \"{}\"", field.name()))
                }
                None => ScalarValue::try_from(field.data_type()).map_err(|e| e.to_string()),
                Some(text) => {
                    let value = ScalarValue::Utf8(Some(text.clone()));
                    value.cast_to(field.data_type()).map_err(|_| {
                        format!(
                            "field \"{}\": '{}' is not a {}",
                            field.name(),
                            text.chars().take(40).collect::<String>(),
                            field.data_type()
                        )
                    })
                }
            })
            .collect()
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        _ => "a scalar",
    }
}
