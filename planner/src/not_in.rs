//! `constant NOT IN (subquery)` in a WHERE clause with PostgreSQL's three-valued logic, as
//! an analyzer rule.
//!
//! DataFusion turns `5 NOT IN (SELECT v FROM b)` into a null-aware anti join and its
//! optimizer then moves the join's only key, `b.v = 5`, into the subquery as a filter: the
//! NULLs of `b.v` are gone before the join can see them, and the query answers every row
//! where PostgreSQL (for which `5 NOT IN (1, NULL)` is NULL) answers none. Where NULL and
//! false mean the same (a conjunct of a filter), `c NOT IN (S)` is rewritten to what it
//! means: `NOT EXISTS (S WHERE s = c OR s IS NULL) AND (c IS NOT NULL OR NOT EXISTS (S))`
//! (true when S is empty; else only for a non-NULL `c` that meets neither its own value nor
//! a NULL in S). Only constant `c` is rewritten: it needs no outer reference inside S.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::logical_expr::expr::{Exists, InSubquery};
use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
use datafusion::logical_expr::{Expr, Filter, LogicalPlan, LogicalPlanBuilder, Subquery};
use datafusion::optimizer::AnalyzerRule;

/// Rewrites `constant NOT IN (subquery)` conjuncts of filters.
#[derive(Debug, Default)]
pub struct NotInOverNulls;

impl AnalyzerRule for NotInOverNulls {
    fn analyze(
        &self,
        plan: LogicalPlan,
        _config: &ConfigOptions,
    ) -> datafusion::error::Result<LogicalPlan> {
        plan.transform_up_with_subqueries(rewrite_filter)
            .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "millrace_not_in_over_nulls"
    }
}

/// Whether `expr` is the same for every row: no columns, no subqueries.
fn is_constant(expr: &Expr) -> bool {
    !expr.any_column_refs()
        && !expr
            .exists(|e| {
                Ok(matches!(
                    e,
                    Expr::ScalarSubquery(_)
                        | Expr::Exists(_)
                        | Expr::InSubquery(_)
                        | Expr::OuterReferenceColumn(..)
                ))
            })
            .unwrap_or(true)
}

/// The `constant NOT IN (subquery)` of a conjunct, if it is one.
fn not_in(conjunct: &Expr) -> Option<(&Expr, &Subquery)> {
    match conjunct {
        Expr::InSubquery(InSubquery {
            expr,
            subquery,
            negated: true,
        }) if is_constant(expr) => Some((expr, subquery)),
        Expr::Not(inner) => match inner.as_ref() {
            Expr::InSubquery(InSubquery {
                expr,
                subquery,
                negated: false,
            }) if is_constant(expr) => Some((expr, subquery)),
            _ => None,
        },
        _ => None,
    }
}

/// `c NOT IN (S)` as two NOT EXISTS.
fn rewrite_not_in(constant: &Expr, subquery: &Subquery) -> datafusion::error::Result<Expr> {
    let plan = subquery.subquery.as_ref().clone();
    let Some(value) = plan.schema().columns().into_iter().next() else {
        return Err(datafusion::error::DataFusionError::Plan(
            "a NOT IN subquery has no column".into(),
        ));
    };
    let value = Expr::Column(value);
    let meets = value.clone().eq(constant.clone()).or(value.is_null());
    let meeting = LogicalPlanBuilder::from(plan).filter(meets)?.build()?;
    let none_meets = Expr::Exists(Exists {
        subquery: Subquery {
            subquery: Arc::new(meeting),
            outer_ref_columns: subquery.outer_ref_columns.clone(),
            spans: subquery.spans.clone(),
        },
        negated: true,
    });
    let empty = Expr::Exists(Exists {
        subquery: subquery.clone(),
        negated: true,
    });
    Ok(none_meets.and(constant.clone().is_not_null().or(empty)))
}

fn rewrite_filter(plan: LogicalPlan) -> datafusion::error::Result<Transformed<LogicalPlan>> {
    let LogicalPlan::Filter(filter) = &plan else {
        return Ok(Transformed::no(plan));
    };
    let conjuncts = split_conjunction_owned(filter.predicate.clone());
    if !conjuncts.iter().any(|c| not_in(c).is_some()) {
        return Ok(Transformed::no(plan));
    }
    let mut rewritten = Vec::with_capacity(conjuncts.len());
    for conjunct in conjuncts {
        rewritten.push(match not_in(&conjunct) {
            Some((constant, subquery)) => rewrite_not_in(constant, subquery)?,
            None => conjunct,
        });
    }
    let Some(predicate) = conjunction(rewritten) else {
        return Ok(Transformed::no(plan));
    };
    Ok(Transformed::yes(LogicalPlan::Filter(Filter::try_new(
        predicate,
        filter.input.clone(),
    )?)))
}
