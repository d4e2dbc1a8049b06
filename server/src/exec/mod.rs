//! Statement execution: routes each parsed statement to DDL, DML, queries, COPY, settings
//! or transaction control, and produces an [`Output`] for the wire layer to encode.

pub mod copy;
pub mod copy_from;
pub mod ddl;
pub mod dml;
pub mod matview;
pub mod names;
pub mod output;
pub mod query;
pub mod set_show;
pub mod sink;
pub mod txn;

use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::Statement;

use crate::error::{Result, ServerError};
use crate::session::Session;
pub use output::Output;

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
    pub subscribe: Option<crate::sql::SubscribeTarget>,
    /// A command the SQL parser does not know (CREATE / DROP SINK).
    pub command: Option<Box<crate::sql::Parsed>>,
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
    session.hold_statement_memory();
    // NOTE: a panic inside DataFusion (its planner has some, e.g. interval arithmetic over a
    // date plus an integer) fails the statement with XX000 instead of dropping the session.
    let result = match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(dispatch(
        session, statement, plan, params,
    )))
    .await
    {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            tracing::error!(
                panic = message,
                "statement panicked; the session carries on"
            );
            Err(ServerError::Internal(format!(
                "statement failed: {message}"
            )))
        }
    };
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
