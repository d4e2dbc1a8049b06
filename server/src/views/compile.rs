//! Compiling a view: its query planned and optimized by DataFusion exactly like a SELECT,
//! then translated into an incremental plan (`millrace_planner::incremental`), with the
//! output columns named as PostgreSQL names them and the relations it reads.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{self, Statement};
use millrace_planner::changelog::loose;
use millrace_planner::incremental::{PlanNode, compile};
use millrace_planner::view_table::MaterializedView;
use millrace_planner::{MillraceTable, PlanError};

use crate::error::{Result, ServerError};
use crate::sql::fold;

/// A view's query, planned, optimized and compiled.
pub struct Compiled {
    pub plan: PlanNode,
    pub schema: SchemaRef,
    pub depends_on: Vec<u64>,
}

/// Plans and compiles the query of a CREATE MATERIALIZED VIEW statement.
pub async fn compile_view(ctx: &SessionContext, view: &ast::CreateView) -> Result<Compiled> {
    let mut rewritten = millrace_planner::rewrite::rewrite(Statement::Query(view.query.clone()));
    let state = ctx.state();
    millrace_planner::using_joins::merge_using_columns(&state, &mut rewritten.statement).await;
    let logical = state
        .statement_to_plan(DFStatement::Statement(Box::new(rewritten.statement)))
        .await?;
    let depends_on = dependencies(&logical);
    millrace_planner::incremental::check_deterministic(&logical)?;
    let optimized = state.optimize(&logical)?;
    let plan = compile(&optimized, state.execution_props())?;
    let out = optimized.schema();
    let mut fields: Vec<Field> = out
        .fields()
        .iter()
        .enumerate()
        .map(
            |(i, f)| match rewritten.renames.iter().find(|(p, _)| *p == i) {
                Some((_, name)) => f.as_ref().clone().with_name(name),
                None => f.as_ref().clone(),
            },
        )
        .collect();
    if !view.columns.is_empty() {
        if view.columns.len() > fields.len() {
            return Err(ServerError::Plan(PlanError::DataFusion(
                datafusion::error::DataFusionError::Plan(
                    "CREATE MATERIALIZED VIEW specifies more column names than columns".into(),
                ),
            )));
        }
        for (field, column) in fields.iter_mut().zip(&view.columns) {
            *field = field.clone().with_name(fold(&column.name));
        }
    }
    let mut seen = HashSet::new();
    for f in &fields {
        if !seen.insert(f.name().clone()) {
            return Err(ServerError::DuplicateColumn(f.name().clone()));
        }
    }
    let schema = loose(&Arc::new(Schema::new(fields)));
    Ok(Compiled {
        plan,
        schema,
        depends_on,
    })
}

/// Ids of the tables and materialized views a plan reads.
fn dependencies(plan: &LogicalPlan) -> Vec<u64> {
    let mut ids = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = source_as_provider(&scan.source)
        {
            if let Some(t) = provider.downcast_ref::<MillraceTable>() {
                ids.push(t.id);
            } else if let Some(v) = provider.downcast_ref::<MaterializedView>() {
                ids.push(v.id);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    ids.sort_unstable();
    ids.dedup();
    ids
}
