//! Uncorrelated scalar subqueries in a view's filters and projections, lifted into joins.
//!
//! DataFusion 55 runs `WHERE x > (SELECT max(y) FROM t)` as a subquery evaluated once per
//! query; a view must instead maintain the subquery's result and react when it changes.
//! Each such subquery becomes the right side of a key-less LEFT JOIN (so an empty subquery
//! still yields NULL), its value a column, and the original columns are projected back:
//! `Filter(p(sub))` over `I` becomes `Project(I.*)` over `Filter(p(sq.value))` over
//! `I LEFT JOIN sq`. The incremental join then maintains it like any other join.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, JoinType};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, Projection};

use crate::error::Result;

/// Rewrites every filter and projection holding uncorrelated scalar subqueries.
pub fn lift(plan: LogicalPlan) -> Result<LogicalPlan> {
    let mut counter = 0usize;
    let rewritten = plan.transform_up(|node| {
        let (exprs, input, is_filter) = match &node {
            LogicalPlan::Filter(f) => (vec![f.predicate.clone()], f.input.clone(), true),
            LogicalPlan::Projection(p) => (p.expr.clone(), p.input.clone(), false),
            _ => return Ok(Transformed::no(node)),
        };
        let mut subqueries = Vec::new();
        for e in &exprs {
            let _ = e.apply(|x| {
                if let Expr::ScalarSubquery(sq) = x
                    && sq.outer_ref_columns.is_empty()
                {
                    subqueries.push(sq.clone());
                }
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            });
        }
        if subqueries.is_empty() {
            return Ok(Transformed::no(node));
        }
        let original: Vec<Expr> = input
            .schema()
            .columns()
            .into_iter()
            .map(Expr::Column)
            .collect();
        let mut builder = LogicalPlanBuilder::from(input.as_ref().clone());
        let mut replacements = Vec::new();
        for sq in &subqueries {
            counter += 1;
            let alias = format!("__millrace_sq{counter}");
            let sub = sq.subquery.as_ref().clone();
            let Some(first) = sub.schema().columns().into_iter().next() else {
                continue;
            };
            let sub = LogicalPlanBuilder::from(sub)
                .project(vec![Expr::Column(first).alias("value")])?
                .alias(alias.as_str())?
                .build()?;
            builder =
                builder.join_on(sub, JoinType::Left, [datafusion::logical_expr::lit(true)])?;
            replacements.push((sq.clone(), Column::new(Some(alias.as_str()), "value")));
        }
        let replace = |e: Expr| -> datafusion::error::Result<Expr> {
            Ok(e.transform_up(|x| {
                if let Expr::ScalarSubquery(sq) = &x
                    && let Some((_, c)) = replacements.iter().find(|(s, _)| s == sq)
                {
                    return Ok(Transformed::yes(Expr::Column(c.clone())));
                }
                Ok(Transformed::no(x))
            })?
            .data)
        };
        let new_exprs = exprs
            .into_iter()
            .map(replace)
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let plan = if is_filter {
            let mut predicate = new_exprs;
            let Some(p) = predicate.pop() else {
                return Ok(Transformed::no(node));
            };
            builder.filter(p)?.project(original)?.build()?
        } else {
            let LogicalPlan::Projection(p) = &node else {
                return Ok(Transformed::no(node));
            };
            // Keep the projection's output names.
            let named: Vec<Expr> = new_exprs
                .into_iter()
                .zip(p.schema.columns())
                .map(|(e, c)| match e {
                    Expr::Alias(_) => e,
                    other => other.alias_qualified(c.relation.clone(), c.name.clone()),
                })
                .collect();
            let input = builder.build()?;
            LogicalPlan::Projection(Projection::try_new(named, Arc::new(input))?)
        };
        Ok(Transformed::yes(plan))
    })?;
    Ok(rewritten.data)
}
