//! What a statement produces for the wire layer to encode: a command tag, rows, a stream of
//! rows, or the start of a COPY; and output columns renamed back to the names a statement
//! asked for.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;

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
