//! `EXISTS (S)` and `x IN (S)` where DataFusion cannot run them (select lists, CASE
//! branches, join conditions, aggregate arguments), as scalar subqueries: an optimizer rule
//! that runs after DataFusion's rules and before [`crate::correlated`], which runs the
//! correlated ones row by row.
//!
//! DataFusion turns predicate subqueries into joins only inside filters (those are left to
//! it); anywhere else the physical planner refused them ("Physical plan does not support logical expression
//! InSubquery"). Each is rewritten to a scalar subquery with PostgreSQL's three-valued
//! meaning:
//! - `EXISTS (S)` is `(SELECT count(*) FROM S) > 0`;
//! - `x IN (S)` is `CASE m WHEN 2 THEN true WHEN 1 THEN NULL ELSE false END` over
//!   `m = (SELECT max(CASE WHEN s = x THEN 2 WHEN s IS NULL OR x IS NULL THEN 1 ELSE 0 END)
//!   FROM S)`: true when some `s` equals `x`, else NULL when a comparison was unknown,
//!   else false (also when S is empty, where `m` is NULL).
//!
//! `x`'s columns enter the subquery as outer references, so an IN is always correlated.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::functions_aggregate::expr_fn::{count, max};
use datafusion::logical_expr::expr::{Exists, InSubquery};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, Subquery, case, lit, when};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

/// Rewrites EXISTS and IN subqueries left in the plan into scalar subqueries.
#[derive(Debug, Default)]
pub struct PredicateSubqueriesAsValues;

fn is_predicate_subquery(e: &Expr) -> bool {
    matches!(e, Expr::Exists(_) | Expr::InSubquery(_))
}

impl OptimizerRule for PredicateSubqueriesAsValues {
    fn name(&self) -> &str {
        "millrace_predicate_subqueries_as_values"
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> datafusion::error::Result<Transformed<LogicalPlan>> {
        plan.transform_up_with_subqueries(|node| {
            // NOTE: a filter's are DataFusion's, which decorrelates them in any position (a
            // join condition's it pushes into a filter when it can, after which its next
            // pass decorrelates them; a scan's pushed-down copies stay under that filter).
            if !matches!(
                node,
                LogicalPlan::Projection(_)
                    | LogicalPlan::Aggregate(_)
                    | LogicalPlan::Join(_)
                    | LogicalPlan::Window(_)
                    | LogicalPlan::Sort(_)
            ) {
                return Ok(Transformed::no(node));
            }
            let mut found = false;
            for e in node.expressions() {
                found |= e.exists(|x| Ok(is_predicate_subquery(x)))?;
            }
            if !found {
                return Ok(Transformed::no(node));
            }
            let scope = input_scope(&node);
            let preserver = NamePreserver::new(&node);
            let rewritten = node.map_expressions(|expr| {
                let saved = preserver.save(&expr);
                let t = predicates_as_values(expr, &scope)?;
                Ok(t.update_data(|e| saved.restore(e)))
            })?;
            rewritten.map_data(|node| node.recompute_schema())
        })
    }
}

/// The schema `node`'s expressions read: its inputs', side by side.
pub fn input_scope(node: &LogicalPlan) -> DFSchema {
    let mut scope = DFSchema::empty();
    for input in node.inputs() {
        scope.merge(input.schema());
    }
    scope
}

/// `expr` with each EXISTS and IN subquery in it as a scalar subquery; the columns of an IN's
/// probe are read from `scope`.
pub fn predicates_as_values(
    expr: Expr,
    scope: &DFSchema,
) -> datafusion::error::Result<Transformed<Expr>> {
    expr.transform_up(|e| match e {
        Expr::Exists(exists) => Ok(Transformed::yes(exists_value(exists)?)),
        Expr::InSubquery(in_subquery) => Ok(Transformed::yes(in_value(in_subquery, scope)?)),
        other => Ok(Transformed::no(other)),
    })
}

/// `EXISTS (S)` (or `NOT EXISTS`) as a count.
fn exists_value(exists: Exists) -> datafusion::error::Result<Expr> {
    let Exists { subquery, negated } = exists;
    let counted = LogicalPlanBuilder::from(subquery.subquery.as_ref().clone())
        .aggregate(Vec::<Expr>::new(), vec![count(lit(1)).alias("n")])?
        .build()?;
    let n = Expr::ScalarSubquery(Subquery {
        subquery: Arc::new(counted),
        outer_ref_columns: subquery.outer_ref_columns,
        spans: subquery.spans,
    });
    Ok(if negated {
        n.eq(lit(0i64))
    } else {
        n.gt(lit(0i64))
    })
}

/// `x IN (S)` (or `NOT IN`) as the largest of its comparisons, `x` read from `scope`.
fn in_value(in_subquery: InSubquery, scope: &DFSchema) -> datafusion::error::Result<Expr> {
    let InSubquery {
        expr,
        subquery,
        negated,
    } = in_subquery;
    let plan = subquery.subquery.as_ref().clone();
    let Some(value) = plan.schema().columns().into_iter().next() else {
        return Err(datafusion::error::DataFusionError::Plan(
            "an IN subquery has no column".into(),
        ));
    };
    let value = Expr::Column(value);
    let mut outer_ref_columns = subquery.outer_ref_columns.clone();
    let probe = (*expr)
        .transform(|e| match e {
            Expr::Column(column) => {
                let reference = outer_reference(column, scope)?;
                if !outer_ref_columns.contains(&reference) {
                    outer_ref_columns.push(reference.clone());
                }
                Ok(Transformed::yes(reference))
            }
            other => Ok(Transformed::no(other)),
        })?
        .data;
    let comparison = when(value.clone().eq(probe.clone()), lit(2i32))
        .when(value.is_null().or(probe.is_null()), lit(1i32))
        .otherwise(lit(0i32))?;
    let largest = LogicalPlanBuilder::from(plan)
        .aggregate(Vec::<Expr>::new(), vec![max(comparison).alias("m")])?
        .build()?;
    let m = Expr::ScalarSubquery(Subquery {
        subquery: Arc::new(largest),
        outer_ref_columns,
        spans: subquery.spans,
    });
    let found = case(m)
        .when(lit(2i32), lit(true))
        .when(lit(1i32), lit(ScalarValue::Boolean(None)))
        .otherwise(lit(false))?;
    Ok(if negated {
        Expr::Not(Box::new(found))
    } else {
        found
    })
}

/// `column` of the outer row, as seen from inside a subquery.
fn outer_reference(column: Column, scope: &DFSchema) -> datafusion::error::Result<Expr> {
    let (_, field) = scope.qualified_field_from_column(&column)?;
    Ok(Expr::OuterReferenceColumn(field.clone(), column))
}
