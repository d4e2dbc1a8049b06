//! How a source's records are laid out (JSON, CSV, Parquet, Avro), as its options name it,
//! and the decoding particular to each layout.

pub mod avro;
pub mod csv;
pub mod json;
pub mod parquet;

use crate::catalog::options::ConnectorOptions;
use crate::error::{Result, ServerError};

/// How records are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per record, fields by column name.
    Json,
    /// Comma-separated values in column order.
    Csv {
        /// The first line of each file names the columns (files only).
        header: bool,
    },
    /// Whole Parquet files, columns by name (files only).
    Parquet,
    /// One Avro datum per message, fields by column name (Kafka), or object container
    /// files read whole (files).
    Avro,
}

impl Format {
    /// The format named by the `format` option (`FORMAT JSON` sets it too); JSON by default.
    pub fn from_options(options: &ConnectorOptions) -> Result<Self> {
        let header = matches!(
            options.values.get("csv.header").map(|s| s.as_str()),
            Some("true" | "on" | "1")
        );
        match options
            .values
            .get("format")
            .or_else(|| options.values.get("encode"))
            .map(|s| s.to_ascii_lowercase())
        {
            None => Ok(Format::Json),
            Some(f) if f == "json" || f == "jsonl" => Ok(Format::Json),
            Some(f) if f == "csv" => Ok(Format::Csv { header }),
            Some(f) if f == "parquet" => Ok(Format::Parquet),
            Some(f) if f == "avro" => Ok(Format::Avro),
            Some(other) => Err(ServerError::NotSupported(format!("format '{other}'"))),
        }
    }
}
