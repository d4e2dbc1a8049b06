//! Statement execution: routes each parsed statement to DDL, DML, queries, COPY, settings
//! or transaction control, and produces an [`Output`] for the wire layer to encode.

pub mod copy;
pub mod ddl;
pub mod dml;
pub mod matview;
pub mod names;
pub mod query;
pub mod set_show;
pub mod sink;
pub mod txn;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::Statement;

use crate::error::{Result, ServerError};
use crate::session::Session;

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

/// A statement as received, with its plan when it was prepared through the extended protocol.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The parsed statement (None for an empty query).
    pub statement: Option<Statement>,
    /// The DataFusion plan of a query or DML statement, with placeholders.
    pub plan: Option<LogicalPlan>,
    /// Output columns renamed back to the names the user wrote.
    pub renames: Vec<(usize, String)>,
    /// The view of a SUBSCRIBE (whose `statement` is None).
    pub subscribe: Option<crate::wire::sql::SubscribeTarget>,
    /// A command the SQL parser does not know (CREATE / DROP SINK).
    pub command: Option<Box<crate::wire::sql::Parsed>>,
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

/// Runs one statement in a session.
pub async fn execute(
    session: &mut Session,
    statement: Statement,
    plan: Option<LogicalPlan>,
    params: Option<ParamValues>,
) -> Result<Output> {
    if let Some(txn) = &session.txn
        && txn.failed
        && !matches!(
            statement,
            Statement::Commit { .. } | Statement::Rollback { .. }
        )
    {
        return Err(ServerError::InFailedTransaction);
    }
    let result = dispatch(session, statement, plan, params).await;
    if result.is_err() {
        session.fail_transaction();
    }
    result
}

async fn dispatch(
    session: &mut Session,
    statement: Statement,
    plan: Option<LogicalPlan>,
    params: Option<ParamValues>,
) -> Result<Output> {
    if let Statement::Explain { statement, .. } = &statement
        && let Statement::CreateView(view) = statement.as_ref()
        && view.materialized
    {
        let lines = matview::explain(session, view).await?;
        return Ok(Output::text_column("QUERY PLAN", lines));
    }
    match statement {
        Statement::Query(_) | Statement::Explain { .. } | Statement::ExplainTable { .. } => {
            query::run(session, statement, plan, params).await
        }
        Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) => {
            dml::run(session, statement, plan, params).await
        }
        Statement::Truncate(truncate) => dml::truncate(session, truncate).await,
        Statement::CreateTable(_)
        | Statement::CreateView(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateIndex(_)
        | Statement::Drop { .. }
        | Statement::AlterTable(_) => {
            if session.in_transaction() {
                return Err(ServerError::NotSupported(
                    "DDL inside a transaction block".into(),
                ));
            }
            ddl::run(session, statement).await
        }
        Statement::StartTransaction { .. } => txn::begin(session),
        Statement::Commit { .. } => txn::commit(session).await,
        Statement::Rollback {
            savepoint: None, ..
        } => txn::rollback(session),
        Statement::Rollback {
            savepoint: Some(name),
            ..
        } => txn::rollback_to(session, &names::fold(&name)),
        Statement::Savepoint { name } => txn::savepoint(session, &names::fold(&name)),
        Statement::ReleaseSavepoint { name } => txn::release(session, &names::fold(&name)),
        Statement::Set(_)
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::Reset(_)
        | Statement::Discard { .. } => set_show::run(session, statement),
        Statement::Copy {
            source,
            to,
            target,
            options,
            legacy_options,
            ..
        } => copy::start(session, source, to, target, options, legacy_options).await,
        Statement::Deallocate { .. } => Ok(Output::command("DEALLOCATE")),
        other => Err(ServerError::NotSupported(format!(
            "statement {}",
            ddl::first_words(&other.to_string())
        ))),
    }
}
