//! Queries (SELECT, EXPLAIN): planned and run by DataFusion over the catalog's providers.

use std::sync::Arc;

use datafusion::common::ParamValues;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement;
use millrace_planner::MillraceTable;
use millrace_planner::using_joins;
use millrace_storage::ObjectKind;

use crate::error::{Result, ServerError};
use crate::exec::output::Output;
use crate::session::Session;

/// Plans a statement with DataFusion in the session's context.
pub async fn plan_statement(session: &Session, mut statement: Statement) -> Result<LogicalPlan> {
    let state = session.state();
    using_joins::merge_using_columns(&state, &mut statement).await;
    Ok(state
        .statement_to_plan(DFStatement::Statement(Box::new(statement)))
        .await?)
}

/// Substitutes bound parameter values into a prepared plan.
///
/// NOTE: DataFusion types a VALUES column holding only placeholders as NOT NULL; once a NULL
/// is bound the node's schema is wrong, so VALUES nodes are rebuilt from the bound literals.
pub fn bind(plan: LogicalPlan, params: Option<ParamValues>) -> Result<LogicalPlan> {
    let Some(p) = params else {
        return Ok(plan);
    };
    let bound = plan.with_param_values(p)?;
    let rebuilt = bound.transform_up(|node| match node {
        LogicalPlan::Values(values) => {
            let fresh = LogicalPlanBuilder::values(values.values.clone())?.build()?;
            Ok(Transformed::yes(fresh))
        }
        other => Ok(Transformed::yes(other.recompute_schema()?)),
    })?;
    Ok(rebuilt.data)
}

/// Refuses to read tables this session's open transaction has written: its staged writes
/// are not visible to its own reads yet, and a silently stale answer would be wrong.
pub fn check_reads(session: &Session, plan: &LogicalPlan) -> Result<()> {
    let Some(txn) = &session.txn else {
        return Ok(());
    };
    if txn.written.is_empty() {
        return Ok(());
    }
    if relation_dependencies(session, plan)
        .iter()
        .any(|id| txn.written.contains(id))
    {
        return Err(ServerError::NotSupported(
            "reading a table written earlier in the same transaction block".into(),
        ));
    }
    Ok(())
}

/// Runs a query and collects its rows.
pub async fn run(
    session: &mut Session,
    statement: Statement,
    plan: Option<LogicalPlan>,
    params: Option<datafusion::common::ParamValues>,
) -> Result<Output> {
    let plan = match plan {
        Some(p) => p,
        None => plan_statement(session, statement).await?,
    };
    let plan = bind(plan, params)?;
    check_reads(session, &plan)?;
    let state = session.state();
    let schema = Arc::new(plan.schema().as_arrow().clone());
    // Real-time recency: a read of a view sees every write acknowledged before it, by any
    // session (the views first reach the last committed epoch). A table shows a write as
    // soon as it commits, so a read of tables alone waits at most for this session's own;
    // so does every read with `real_time_recency` off.
    let views = session.engine.views.clone();
    let reads = relation_dependencies(session, &plan);
    if views.any_busy() {
        views.wait_ready(&reads).await;
    }
    let engine = &session.engine;
    let reads_views = reads.iter().any(|id| engine.catalog.table(*id).is_none());
    let epoch = match reads_views && session.settings.real_time_recency() {
        true => views.committed_epoch(),
        false => session.write_epoch,
    };
    views.wait_published(epoch.max(views.read_floor())).await;
    let physical = {
        // All views a query reads are snapshotted at one epoch.
        let _epoch = views.read_lock.read().await;
        state.create_physical_plan(&plan).await?
    };
    // A small result is computed in full before it is sent, so that an error fails the
    // statement before any row goes out; a large one streams, holding a batch at a time.
    let mut stream = engine.compute.execute(physical, state.task_ctx());
    let mut batches = Vec::new();
    let mut bytes = 0;
    while let Some(batch) = futures::StreamExt::next(&mut stream).await {
        let batch = crate::exec::output::conform(batch?, &schema)?;
        bytes += batch.get_array_memory_size();
        batches.push(batch);
        if bytes > STREAM_AFTER_BYTES {
            return Ok(Output::Stream {
                head: batches,
                rest: crate::exec::output::RowStream(stream).conformed(schema.clone()),
                schema,
            });
        }
    }
    Ok(Output::Rows { schema, batches })
}

/// Runs a DataFrame's plan on the compute runtime (`compute.rs`); its batches.
pub async fn execute_stream(
    session: &Session,
    df: datafusion::prelude::DataFrame,
) -> Result<datafusion::execution::SendableRecordBatchStream> {
    let context = Arc::new(df.task_ctx());
    let physical = df.create_physical_plan().await?;
    Ok(session.engine.compute.execute(physical, context))
}

/// Results larger than this are streamed to the client rather than computed in full first.
const STREAM_AFTER_BYTES: usize = 8 << 20;

/// Catalog ids of the tables and views a plan scans (with subqueries).
pub fn relation_dependencies(session: &Session, plan: &LogicalPlan) -> Vec<u64> {
    let mut ids = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            if let Ok(provider) = source_as_provider(&scan.source)
                && let Some(t) = provider.downcast_ref::<MillraceTable>()
            {
                ids.push(t.id);
            } else {
                let r = scan
                    .table_name
                    .clone()
                    .resolve(&session.database, &session.current_schema());
                if let Some(rec) = session.engine.catalog.find(
                    &[
                        ObjectKind::View,
                        ObjectKind::Table,
                        ObjectKind::MaterializedView,
                    ],
                    &r.catalog,
                    &r.schema,
                    &r.table,
                ) {
                    ids.push(rec.id);
                }
            }
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    ids.sort_unstable();
    ids.dedup();
    ids
}
