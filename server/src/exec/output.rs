//! What a statement produces for the wire layer to encode: a command tag, rows, a stream of
//! rows, or the start of a COPY; and output columns renamed back to the names a statement
//! asked for.

use std::sync::Arc;

use datafusion::arrow::array::{Array, Decimal128Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::Result;

/// What a statement produced.
#[derive(Debug)]
pub enum Output {
    /// Rows to send (SELECT, EXPLAIN, SHOW).
    Rows {
        /// Column names and types.
        schema: SchemaRef,
        /// The rows.
        batches: Vec<RecordBatch>,
    },
    /// Rows of a large result, sent as they are computed: the first batches, then the rest.
    Stream {
        /// Column names and types.
        schema: SchemaRef,
        /// Batches already computed.
        head: Vec<RecordBatch>,
        /// The remaining batches.
        rest: RowStream,
    },
    /// A command tag such as `CREATE TABLE` or `INSERT 0 3`.
    Command {
        /// The tag's words.
        tag: String,
        /// Row count appended to the tag, if any.
        rows: Option<usize>,
    },
    /// BEGIN.
    TransactionStart(String),
    /// COMMIT or ROLLBACK.
    TransactionEnd(String),
    /// COPY FROM STDIN started: the client sends data next.
    CopyIn {
        /// Number of columns being loaded.
        columns: usize,
    },
    /// COPY TO STDOUT: the data, one chunk per row.
    CopyOut {
        /// Number of columns.
        columns: usize,
        /// Encoded rows.
        chunks: Vec<Vec<u8>>,
    },
    /// An empty statement.
    Empty,
}

/// The rest of a streamed result.
pub struct RowStream(pub datafusion::execution::SendableRecordBatchStream);

impl std::fmt::Debug for RowStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowStream")
    }
}

impl Output {
    /// Computes a streamed result to the end (for COPY TO, which sends it in one piece).
    pub async fn collect(self) -> Result<Output> {
        use futures::TryStreamExt;
        match self {
            Output::Stream {
                schema,
                mut head,
                rest,
            } => {
                let rest: Vec<RecordBatch> = rest.0.try_collect().await?;
                head.extend(rest);
                Ok(Output::Rows {
                    schema,
                    batches: head,
                })
            }
            other => Ok(other),
        }
    }

    /// A command tag without a row count.
    pub fn command(tag: &str) -> Output {
        Output::Command {
            tag: tag.to_string(),
            rows: None,
        }
    }

    /// Rows of one text column (EXPLAIN output and the like).
    pub fn text_column(name: &str, lines: Vec<String>) -> Output {
        let schema = std::sync::Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
            datafusion::arrow::datatypes::Field::new(
                name,
                datafusion::arrow::datatypes::DataType::Utf8,
                false,
            ),
        ]));
        let column: datafusion::arrow::array::ArrayRef =
            std::sync::Arc::new(datafusion::arrow::array::StringArray::from(lines));
        let batches = RecordBatch::try_new(schema.clone(), vec![column])
            .map(|b| vec![b])
            .unwrap_or_default();
        Output::Rows { schema, batches }
    }

    /// A command tag with a row count.
    pub fn command_rows(tag: &str, rows: usize) -> Output {
        Output::Command {
            tag: tag.to_string(),
            rows: Some(rows),
        }
    }
}

/// The DataRows of one batch, ending at the first row that fails to encode, with its error.
/// NOTE: arrow-pg's row iterator does not move past a row it cannot encode: it returns the
/// same error for ever, and collecting them grew the server until the kernel killed it.
pub fn data_rows(
    fields: std::sync::Arc<Vec<pgwire::api::results::FieldInfo>>,
    batch: RecordBatch,
) -> impl Iterator<Item = pgwire::error::PgWireResult<pgwire::messages::data::DataRow>> {
    let mut failed = false;
    arrow_pg::datatypes::encode_recordbatch(fields, batch).take_while(move |row| {
        let go_on = !failed;
        failed |= row.is_err();
        go_on
    })
}

/// A batch with the column types the statement was described with. NOTE: a statement is
/// described by its logical plan before type coercion, whose types can differ from what the
/// physical plan computes (a CASE of a float literal and a numeric column is described as
/// float and computed as decimal); rows of another type would not match their description
/// (arrow-pg fails to encode them), so they are cast to it.
pub fn conform(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let same = batch.num_columns() == schema.fields().len()
        && batch
            .schema()
            .fields()
            .iter()
            .zip(schema.fields())
            .all(|(a, b)| a.data_type() == b.data_type());
    if same {
        return Ok(batch);
    }
    if batch.num_columns() != schema.fields().len() {
        return Err(crate::error::ServerError::Internal(format!(
            "a query computed {} columns for {} described",
            batch.num_columns(),
            schema.fields().len()
        )));
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| datafusion::arrow::compute::cast(c, f.data_type()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    let relaxed = Arc::new(Schema::new(fields));
    Ok(RecordBatch::try_new(relaxed, columns)?)
}

/// The largest unscaled numeric the wire encoder takes (rust_decimal's 96 bits), and the
/// largest scale (28 digits).
const WIRE_UNSCALED_MAX: u128 = (1 << 96) - 1;
const WIRE_SCALE_MAX: i8 = 28;

/// `batch` with each numeric column rounded to a scale its values can be sent at (by the wire
/// encoder, just before its rows are encoded: the column's type then differs from the one
/// described, which is numeric either way).
///
/// arrow-pg sends a numeric through rust_decimal, which holds 96 bits at any scale up to 28:
/// `CAST(1000000 AS NUMERIC) * CAST(1000000 AS NUMERIC)` (10^12 at scale 20, unscaled 10^32)
/// and a product of scale 30 failed to encode where PostgreSQL answers. Such a column is
/// rounded to the largest scale at which every value of the batch fits (the digits dropped
/// are beyond rust_decimal's 28 significant ones); a value above 2^96 at scale 0 still
/// fails, with 22003.
pub fn wire_decimals(batch: RecordBatch) -> Result<RecordBatch> {
    let mut columns = batch.columns().to_vec();
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut changed = false;
    for (column, field) in columns.iter_mut().zip(fields.iter_mut()) {
        let DataType::Decimal128(precision, scale) = *column.data_type() else {
            continue;
        };
        let Some(decimals) = column.as_any().downcast_ref::<Decimal128Array>() else {
            continue;
        };
        let largest = decimals
            .iter()
            .flatten()
            .map(i128::unsigned_abs)
            .max()
            .unwrap_or(0);
        let mut fitted = scale.min(WIRE_SCALE_MAX);
        let mut unscaled = largest / 10u128.pow(u32::try_from(scale - fitted).unwrap_or(0));
        // NOTE: one more digit than the bound needs, so that rounding up cannot cross it.
        while unscaled >= WIRE_UNSCALED_MAX / 10 && fitted > 0 {
            fitted -= 1;
            unscaled /= 10;
        }
        if fitted == scale {
            continue;
        }
        let target = DataType::Decimal128(precision, fitted);
        *column = datafusion::arrow::compute::cast(column, &target)?;
        *field = field.clone().with_data_type(target);
        changed = true;
    }
    if !changed {
        return Ok(batch);
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

impl RowStream {
    /// The stream with every batch conformed to `schema` (see [`conform`]).
    pub fn conformed(self, schema: SchemaRef) -> RowStream {
        use futures::StreamExt;
        let target = schema.clone();
        let rest = self.0.map(move |b| {
            b.and_then(|b| {
                conform(b, &target)
                    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))
            })
        });
        RowStream(Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema, rest),
        ))
    }
}

/// Renames output columns back to the names the statement asked for.
pub fn rename_columns(output: Output, renames: &[(usize, String)]) -> Result<Output> {
    if renames.is_empty() {
        return Ok(output);
    }
    let old_schema = match &output {
        Output::Rows { schema, .. } | Output::Stream { schema, .. } => schema.clone(),
        _ => return Ok(output),
    };
    let fields: Vec<datafusion::arrow::datatypes::Field> = old_schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| match renames.iter().find(|(p, _)| *p == i) {
            Some((_, name)) => f.as_ref().clone().with_name(name),
            None => f.as_ref().clone(),
        })
        .collect();
    let schema = std::sync::Arc::new(datafusion::arrow::datatypes::Schema::new(fields));
    let renamed = |b: RecordBatch| RecordBatch::try_new(schema.clone(), b.columns().to_vec());
    match output {
        Output::Rows { batches, .. } => {
            let batches = batches
                .into_iter()
                .map(renamed)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(Output::Rows { schema, batches })
        }
        Output::Stream { head, rest, .. } => {
            use futures::StreamExt;
            let head = head
                .into_iter()
                .map(renamed)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let target = schema.clone();
            let rest = rest.0.map(move |b| {
                b.and_then(|b| {
                    RecordBatch::try_new(target.clone(), b.columns().to_vec()).map_err(Into::into)
                })
            });
            let rest = RowStream(Box::pin(
                datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                    schema.clone(),
                    rest,
                ),
            ));
            Ok(Output::Stream { schema, head, rest })
        }
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, Decimal128Array, Float64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use pgwire::api::Type;
    use pgwire::api::results::{FieldFormat, FieldInfo};

    use super::*;

    /// Three rows of numeric(38,15), -897.49 each.
    fn decimals() -> RecordBatch {
        let values = Decimal128Array::from(vec![-897_490_000_000_000_000i128; 3])
            .with_precision_and_scale(38, 15)
            .unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new(
            "c1",
            DataType::Decimal128(38, 15),
            true,
        )]));
        RecordBatch::try_new(schema, vec![Arc::new(values) as ArrayRef]).unwrap()
    }

    /// A row that cannot be encoded (a numeric under a float8 description) gives one error
    /// and the end of the rows, not the same error for ever.
    #[test]
    fn rows_end_at_the_first_row_that_fails_to_encode() {
        let fields = Arc::new(vec![FieldInfo::new(
            "c1".into(),
            None,
            None,
            Type::FLOAT8,
            FieldFormat::Text,
        )]);
        let rows: Vec<_> = data_rows(fields, decimals()).take(10).collect();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(rows[0].is_err());
    }

    /// Rows computed with another type than described are cast to the description.
    #[test]
    fn rows_are_cast_to_the_type_they_were_described_with() {
        let described = Arc::new(Schema::new(vec![Field::new(
            "c1",
            DataType::Float64,
            false,
        )]));
        let batch = conform(decimals(), &described).unwrap();
        let values = batch
            .column(0)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(values.values().to_vec(), vec![-897.49; 3]);
        let same = conform(batch.clone(), &described).unwrap();
        assert_eq!(same.column(0).to_data(), batch.column(0).to_data());
    }

    /// Numerics beyond rust_decimal's 96 bits or 28 digits of scale are rounded to a scale
    /// they encode at: 10^12 at scale 20 (unscaled 10^32) and 1.5 at scale 30.
    #[test]
    fn numerics_are_rounded_to_a_scale_the_wire_takes() {
        let column = |scale: i8, value: i128| {
            let values = Decimal128Array::from(vec![Some(value), None, Some(-value)])
                .with_precision_and_scale(38, scale)
                .unwrap();
            let schema = Arc::new(Schema::new(vec![Field::new(
                "n",
                DataType::Decimal128(38, scale),
                true,
            )]));
            RecordBatch::try_new(schema.clone(), vec![Arc::new(values) as ArrayRef]).unwrap()
        };
        let fields = Arc::new(vec![FieldInfo::new(
            "n".into(),
            None,
            None,
            Type::NUMERIC,
            FieldFormat::Text,
        )]);
        for (batch, expected_scale) in [
            (column(20, 10i128.pow(32)), 15),
            (column(30, 15 * 10i128.pow(29)), 27),
            (column(10, 15 * 10i128.pow(9)), 10),
        ] {
            let before: Vec<_> = data_rows(fields.clone(), batch.clone()).collect();
            let fitted = wire_decimals(batch).unwrap();
            assert_eq!(
                fitted.column(0).data_type(),
                &DataType::Decimal128(38, expected_scale)
            );
            let rows: Vec<_> = data_rows(fields.clone(), fitted).collect();
            assert_eq!(rows.len(), 3);
            assert!(rows.iter().all(|r| r.is_ok()), "{rows:?}");
            // The first two did not encode as they were; the last needed no change.
            assert_eq!(before.iter().all(|r| r.is_ok()), expected_scale == 10);
        }
    }
}
