//! Record decoding shared by the file and Kafka sources: one JSON object, CSV line or Avro
//! datum in, the values of the table's payload columns out, or the reason the record is
//! refused.
//!
//! Sits between a connector's reader (which yields raw records with their position) and
//! [`BatchBuilder`], which turns the good rows into the Arrow batch the source commits. A
//! refused record becomes a [`BadRecord`] for `millrace_source_errors`; the source goes on.

use std::sync::Arc;
use std::time::SystemTime;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{FieldRef, SchemaRef};
use datafusion::common::ScalarValue;

use crate::catalog::options::ConnectorOptions;
use crate::connector::format::Format;
use crate::connector::format::avro::AvroCodec;
use crate::error::{Result, ServerError};
use crate::registry::sources::BadRecord;

/// Bytes of a bad record kept in `millrace_source_errors`.
const PAYLOAD_PREFIX: usize = 200;

/// Decodes records into the values of a list of columns.
#[derive(Debug, Clone)]
pub struct RecordDecoder {
    format: Format,
    fields: Vec<FieldRef>,
    max_record_bytes: usize,
    /// The Avro schema of the records (`FORMAT AVRO`; files may carry their own instead).
    avro: Option<Arc<AvroCodec>>,
}

impl RecordDecoder {
    /// A decoder for `fields` (checked to be types a record can carry).
    pub fn try_new(options: &ConnectorOptions, fields: Vec<FieldRef>) -> Result<Self> {
        for field in &fields {
            if !crate::connector::ingest::column_type_supported(field.data_type()) {
                return Err(ServerError::NotSupported(format!(
                    "source column \"{}\" of type {}",
                    field.name(),
                    field.data_type()
                )));
            }
        }
        let format = Format::from_options(options)?;
        let avro = match format {
            Format::Avro => AvroCodec::from_options(options, &fields)?,
            _ => None,
        };
        Ok(Self {
            format,
            fields,
            max_record_bytes: options.number("max_record_bytes")?.unwrap_or(1 << 20) as usize,
            avro,
        })
    }

    /// True when records are Avro and a schema was given.
    pub fn has_avro_schema(&self) -> bool {
        self.avro.is_some()
    }

    /// The payload columns.
    pub fn fields(&self) -> &[FieldRef] {
        &self.fields
    }

    /// The record layout.
    pub fn format(&self) -> Format {
        self.format
    }

    /// One record's values in column order, or why it is refused.
    pub fn decode(&self, raw: &[u8]) -> std::result::Result<Vec<ScalarValue>, String> {
        if raw.len() > self.max_record_bytes {
            return Err(format!(
                "record of {} bytes exceeds max_record_bytes = {}",
                raw.len(),
                self.max_record_bytes
            ));
        }
        let values: Vec<Option<ScalarValue>> = match self.format {
            Format::Avro => match &self.avro {
                Some(codec) => codec.decode(raw)?,
                None => return Err("Avro messages need a schema (avro.schema)".into()),
            },
            Format::Parquet => return Err("Parquet is read by whole files".into()),
            Format::Json | Format::Csv { .. } => {
                let text = std::str::from_utf8(raw)
                    .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
                let texts = match self.format {
                    Format::Json => crate::connector::format::json::fields(&self.fields, text)?,
                    _ => crate::connector::format::csv::fields(&self.fields, text)?,
                };
                texts
                    .into_iter()
                    .map(|t| t.map(|t| ScalarValue::Utf8(Some(t))))
                    .collect()
            }
        };
        self.typed(values)
    }

    /// Values cast to the columns' types; a null in a NOT NULL column or a value that does
    /// not cast refuses the record.
    pub fn typed(
        &self,
        values: Vec<Option<ScalarValue>>,
    ) -> std::result::Result<Vec<ScalarValue>, String> {
        self.fields
            .iter()
            .zip(values)
            .map(|(field, value)| match value {
                None if !field.is_nullable() => {
                    Err(format!("missing required field \"{}\"", field.name()))
                }
                None => ScalarValue::try_from(field.data_type()).map_err(|e| e.to_string()),
                Some(value) => value.cast_to(field.data_type()).map_err(|_| {
                    let text = match &value {
                        ScalarValue::Utf8(Some(s)) => s.chars().take(40).collect::<String>(),
                        other => other.to_string(),
                    };
                    format!(
                        "field \"{}\": '{}' is not a {}",
                        field.name(),
                        text,
                        field.data_type()
                    )
                }),
            })
            .collect()
    }
}

/// A refused record as `millrace_source_errors` lists it.
pub fn bad_record(
    source: &str,
    partition: String,
    offset: u64,
    raw: &[u8],
    reason: String,
) -> BadRecord {
    BadRecord {
        source: source.to_string(),
        partition,
        offset,
        payload: String::from_utf8_lossy(&raw[..raw.len().min(PAYLOAD_PREFIX)]).into_owned(),
        reason,
        time: SystemTime::now(),
    }
}

/// Collects rows of values into one Arrow batch of a schema.
#[derive(Debug)]
pub struct BatchBuilder {
    schema: SchemaRef,
    columns: Vec<Vec<ScalarValue>>,
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new(schema: SchemaRef) -> Self {
        let columns = vec![Vec::new(); schema.fields().len()];
        Self { schema, columns }
    }

    /// Adds one row (values in schema order).
    pub fn push(&mut self, values: Vec<ScalarValue>) {
        for (column, value) in self.columns.iter_mut().zip(values) {
            column.push(value);
        }
    }

    /// Rows pushed so far.
    pub fn len(&self) -> usize {
        self.columns.first().map_or(0, |c| c.len())
    }

    /// True when no row was pushed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows as a batch; the builder is left empty.
    pub fn finish(&mut self) -> Result<RecordBatch> {
        let arrays = std::mem::replace(
            &mut self.columns,
            vec![Vec::new(); self.schema.fields().len()],
        )
        .into_iter()
        .zip(self.schema.fields().iter())
        .map(|(values, field)| {
            if values.is_empty() {
                Ok(datafusion::arrow::array::new_empty_array(field.data_type()))
            } else {
                ScalarValue::iter_to_array(values)
            }
        })
        .collect::<datafusion::error::Result<Vec<ArrayRef>>>()?;
        Ok(RecordBatch::try_new(self.schema.clone(), arrays)?)
    }
}
