//! Filter push-down that leaves filters above an aggregate without groups, as an optimizer
//! rule standing in for DataFusion's `push_down_filter`.
//!
//! DataFusion pushes a filter's conjuncts below an aggregate when every column they read is
//! a grouping column. A conjunct that reads no column at all (`HAVING (SELECT false)`, or
//! `WHERE (SELECT bool_and(x) FROM w)` over a derived table holding `min(k)`) passes that
//! test vacuously; under an aggregate with groups that is harmless, but an aggregate without
//! groups answers one row even over no input, so the pushed filter turned "no row" into
//! "one row of NULLs" (PostgreSQL: none). Grouping sets (ROLLUP, CUBE) have the same empty
//! group. This rule runs DataFusion's for every other plan and keeps a filter whose input
//! (through other filters) is such an aggregate where it is: above it. It also keeps where
//! they are the conjuncts of a filter (and the conditions of a join) that hold a correlated
//! subquery, whose outer columns DataFusion did not see, also when they sit in a filter below
//! another (DataFusion merges the two first: seed 787 query 2571), and the conjuncts of a
//! subquery's filter that read the outer query's columns.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::logical_expr::expr::{Exists, InSubquery};
use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
use datafusion::logical_expr::{Expr, Filter, LogicalPlan};
use datafusion::optimizer::push_down_filter::PushDownFilter;
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

/// DataFusion's filter push-down, stopped above aggregates without groups.
#[derive(Debug, Default)]
pub struct FilterPushDown {
    inner: PushDownFilter,
}

impl FilterPushDown {
    pub fn new() -> Self {
        Self::default()
    }
}

impl OptimizerRule for FilterPushDown {
    fn name(&self) -> &str {
        // NOTE: DataFusion's name, so the rule takes its place (and its settings).
        self.inner.name()
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        self.inner.apply_order()
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        config: &dyn OptimizerConfig,
    ) -> datafusion::error::Result<Transformed<LogicalPlan>> {
        if filters_global_aggregate(&plan) {
            return Ok(Transformed::no(plan));
        }
        match plan {
            LogicalPlan::Join(join)
                if join.filter.as_ref().is_some_and(has_correlated_subquery) =>
            {
                Ok(Transformed::no(LogicalPlan::Join(join)))
            }
            LogicalPlan::Filter(filter) => {
                // NOTE: DataFusion merges a chain of filters before it pushes, so the
                // conjuncts of the filters below this one are sorted here too.
                // The lowest filter's conjuncts first, as DataFusion's merge orders them
                // (a derived table's `x <> 0` stays ahead of the outer `10 / x`).
                let mut predicates = vec![filter.predicate.clone()];
                let mut input = Arc::clone(&filter.input);
                while let LogicalPlan::Filter(inner) = input.as_ref() {
                    predicates.push(inner.predicate.clone());
                    input = Arc::clone(&inner.input);
                }
                let conjuncts: Vec<Expr> = predicates
                    .into_iter()
                    .rev()
                    .flat_map(split_conjunction_owned)
                    .collect();
                let (kept, pushable): (Vec<Expr>, Vec<Expr>) = conjuncts
                    .into_iter()
                    .partition(|c| has_correlated_subquery(c) || is_correlated(c));
                let Some(kept) = conjunction(kept) else {
                    return self.inner.rewrite(LogicalPlan::Filter(filter), config);
                };
                let Some(pushable) = conjunction(pushable) else {
                    let merged = Filter::try_new(kept, input)?;
                    let changed = merged.predicate != filter.predicate;
                    let merged = LogicalPlan::Filter(merged);
                    return Ok(if changed {
                        Transformed::yes(merged)
                    } else {
                        Transformed::no(merged)
                    });
                };
                let below = LogicalPlan::Filter(Filter::try_new(pushable, input)?);
                let below = self.inner.rewrite(below, config)?.data;
                Ok(Transformed::yes(LogicalPlan::Filter(Filter::try_new(
                    kept,
                    Arc::new(below),
                )?)))
            }
            other => self.inner.rewrite(other, config),
        }
    }
}

/// Whether `e` holds a subquery that reads columns of the row it is evaluated for.
/// DataFusion's push-down sees only an expression's own columns, not those a subquery in it
/// reads from outside, and moved `WHERE (SELECT .. WHERE r2.c3)` below the join that makes
/// `r2` (seed 32 query 464: "No field named r2.c3").
fn has_correlated_subquery(e: &Expr) -> bool {
    e.exists(|x| {
        Ok(match x {
            Expr::ScalarSubquery(s) => !s.outer_ref_columns.is_empty(),
            Expr::Exists(Exists { subquery, .. })
            | Expr::InSubquery(InSubquery { subquery, .. }) => {
                !subquery.outer_ref_columns.is_empty()
            }
            _ => false,
        })
    })
    .unwrap_or(true)
}

/// Whether `e` reads a column of an outer query (it is a subquery's correlation). Left where
/// it is, for DataFusion's decorrelation to pull up: pushed into a scan's filters, where
/// the decorrelation does not look, it kept a subquery correlated, and an EXISTS pushed
/// from a derived table's column into a filter after the decorrelation's turn reached the
/// physical planner (seed 74 query 3449: "Physical plan does not support logical
/// expression Exists").
fn is_correlated(e: &Expr) -> bool {
    e.exists(|x| Ok(matches!(x, Expr::OuterReferenceColumn(..))))
        .unwrap_or(true)
}

/// Whether `plan` is a filter whose input, past other filters, is an aggregate that answers
/// a row for the empty group.
fn filters_global_aggregate(plan: &LogicalPlan) -> bool {
    let LogicalPlan::Filter(filter) = plan else {
        return false;
    };
    let mut input = filter.input.as_ref();
    while let LogicalPlan::Filter(inner) = input {
        input = inner.input.as_ref();
    }
    match input {
        LogicalPlan::Aggregate(aggregate) => {
            aggregate.group_expr.is_empty()
                || aggregate
                    .group_expr
                    .iter()
                    .any(|e| matches!(e, Expr::GroupingSet(_)))
        }
        _ => false,
    }
}
