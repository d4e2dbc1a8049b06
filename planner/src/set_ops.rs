//! INTERSECT ALL and EXCEPT ALL with PostgreSQL's multiset semantics, as an analyzer rule.
//!
//! DataFusion plans `a INTERSECT ALL b` as a semi join of `a` with `b` on every column
//! (NULLs equal) and `a EXCEPT ALL b` as the anti join: a row of `a` present twice in `b`
//! and three times in `a` comes out three times, where PostgreSQL gives it min(3, 2) = 2
//! times (and EXCEPT ALL max(3 - 2, 0) = 1 time, where the anti join gives none). Here each
//! side numbers the copies of each distinct row (`row_number()` over a partition by every
//! column) and the join also matches the copy number: copy k of a row in `a` meets copy k
//! in `b` only if `b` has at least k copies.

use std::sync::Arc;

use datafusion::common::Column;
use datafusion::common::tree_node::Transformed;
use datafusion::config::ConfigOptions;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{
    Expr, ExprFunctionExt, Join, JoinType, LogicalPlan, LogicalPlanBuilder,
};
use datafusion::optimizer::AnalyzerRule;

/// Rewrites the joins DataFusion plans for INTERSECT ALL / EXCEPT ALL.
#[derive(Debug, Default)]
pub struct MultisetSetOps;

impl AnalyzerRule for MultisetSetOps {
    fn analyze(
        &self,
        plan: LogicalPlan,
        _config: &ConfigOptions,
    ) -> datafusion::error::Result<LogicalPlan> {
        plan.transform_up_with_subqueries(rewrite).map(|t| t.data)
    }

    fn name(&self) -> &str {
        "millrace_multiset_set_ops"
    }
}

/// Whether `join` is how DataFusion plans INTERSECT ALL or EXCEPT ALL: a semi or anti join
/// on every column of its left input, NULLs equal, no filter, left input not made distinct
/// (that is INTERSECT / EXCEPT without ALL). SQL has no other way to a semi or anti join
/// before the optimizer turns subqueries into joins, and this rule runs before it.
fn is_all_set_op(join: &Join) -> bool {
    matches!(join.join_type, JoinType::LeftSemi | JoinType::LeftAnti)
        && join.null_equality == datafusion::common::NullEquality::NullEqualsNull
        && join.filter.is_none()
        && !join.null_aware
        && join.on.len() == join.left.schema().fields().len()
        && join.on.len() == join.right.schema().fields().len()
        && !matches!(join.left.as_ref(), LogicalPlan::Distinct(_))
}

/// `plan` with a column numbering the copies of each distinct row.
fn numbered(plan: LogicalPlan, name: &str) -> datafusion::error::Result<LogicalPlan> {
    let columns: Vec<Expr> = plan
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    let copy = row_number().partition_by(columns).build()?.alias(name);
    LogicalPlanBuilder::from(plan).window(vec![copy])?.build()
}

fn rewrite(plan: LogicalPlan) -> datafusion::error::Result<Transformed<LogicalPlan>> {
    let LogicalPlan::Join(join) = &plan else {
        return Ok(Transformed::no(plan));
    };
    if !is_all_set_op(join) {
        return Ok(Transformed::no(plan));
    }
    let output: Vec<Expr> = join
        .left
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    let left = numbered(join.left.as_ref().clone(), "__millrace_copy_left")?;
    let right = numbered(join.right.as_ref().clone(), "__millrace_copy_right")?;
    let mut on = join.on.clone();
    on.push((
        Expr::Column(Column::from_name("__millrace_copy_left")),
        Expr::Column(Column::from_name("__millrace_copy_right")),
    ));
    let numbered_join = Join::try_new(
        Arc::new(left),
        Arc::new(right),
        on,
        None,
        join.join_type,
        join.join_constraint,
        join.null_equality,
        false,
    )?;
    let projected = LogicalPlanBuilder::from(LogicalPlan::Join(numbered_join))
        .project(output)?
        .build()?;
    Ok(Transformed::yes(projected))
}
