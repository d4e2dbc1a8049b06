//! Parquet files, read whole: the table's columns matched by name and cast to its types.

use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::connector::decode::{BatchBuilder, bad_record};
use crate::error::Result;
use crate::registry::sources::BadRecord;

/// The good rows of one Parquet file (columns matched by name and cast to the table's
/// types), and its bad records: rows with NULL in a NOT NULL column, or the whole file
/// (line 0) when it cannot be decoded.
pub fn rows(
    source: &str,
    file: &str,
    bytes: Bytes,
    schema: &SchemaRef,
) -> Result<(RecordBatch, Vec<BadRecord>)> {
    let whole_file = |reason: String| {
        let empty = RecordBatch::new_empty(schema.clone());
        let prefix = bytes.slice(..bytes.len().min(16));
        (
            empty,
            vec![bad_record(source, file.to_string(), 0, &prefix, reason)],
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
                    source,
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
