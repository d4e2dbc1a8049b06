//! `x NOT IN (subquery)` in a WHERE clause with PostgreSQL's three-valued logic, as an
//! analyzer rule.
//!
//! DataFusion turns `x NOT IN (SELECT v FROM b)` into a null-aware anti join. Its optimizer
//! then moved a constant probe's only key, `b.v = 5`, into the subquery as a filter: the
//! NULLs of `b.v` were gone before the join could see them, and the query answered every
//! row where PostgreSQL (for which `5 NOT IN (1, NULL)` is NULL) answers none. For a column
//! probe with a correlated subquery the join looked for NULLs among all of `b`, not among
//! the rows each outer row sees, and answered no row where PostgreSQL answers some (seed 5
//! query 71); with two correlated keys it refused the query. Where NULL and false mean the
//! same (a conjunct of a filter), `x NOT IN (S)` is rewritten to what it means:
//! `NOT EXISTS (S WHERE s = x) AND NOT EXISTS (S WHERE s IS NULL) AND (x IS NOT NULL OR NOT
//! EXISTS (S))` (true when S is empty; else only for a non-NULL `x` that meets neither its
//! own value nor a NULL in S). The first is an equality, so it plans as a hash anti join;
//! `x`'s columns enter it as outer references. An IN or NOT IN inside a larger condition
//! (`v > 20 OR k NOT IN (S)`), where NULL and false differ, becomes a CASE of EXISTS with
//! its three values (DataFusion's mark join answered false for NULL).

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::logical_expr::expr::{Exists, InSubquery};
use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
use datafusion::logical_expr::{
    Expr, Filter, JoinType, LogicalPlan, LogicalPlanBuilder, Subquery, lit, when,
};
use datafusion::optimizer::AnalyzerRule;

/// Rewrites `x NOT IN (subquery)` conjuncts of filters.
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

/// Whether `expr` can be evaluated inside the subquery in place of its outer row: no
/// subqueries, no outer references of its own, the same value each time.
fn is_probe(expr: &Expr) -> bool {
    !expr.is_volatile()
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

/// The `x NOT IN (subquery)` of a conjunct, if it is one.
fn not_in(conjunct: &Expr) -> Option<(&Expr, &Subquery)> {
    match conjunct {
        Expr::InSubquery(InSubquery {
            expr,
            subquery,
            negated: true,
        }) if is_probe(expr) => Some((expr, subquery)),
        Expr::Not(inner) => match inner.as_ref() {
            Expr::InSubquery(InSubquery {
                expr,
                subquery,
                negated: false,
            }) if is_probe(expr) => Some((expr, subquery)),
            _ => None,
        },
        _ => None,
    }
}

/// `[NOT] EXISTS` of `subquery` keeping only the rows where `predicate` holds, with `outer`
/// as further outer references.
fn restricted(
    subquery: &Subquery,
    predicate: Expr,
    outer: &[Expr],
    negated: bool,
) -> datafusion::error::Result<Expr> {
    let plan = subquery.subquery.as_ref().clone();
    let plan = LogicalPlanBuilder::from(plan).filter(predicate)?.build()?;
    let mut outer_ref_columns = subquery.outer_ref_columns.clone();
    for reference in outer {
        if !outer_ref_columns.contains(reference) {
            outer_ref_columns.push(reference.clone());
        }
    }
    Ok(Expr::Exists(Exists {
        subquery: Subquery {
            subquery: Arc::new(plan),
            outer_ref_columns,
            spans: subquery.spans.clone(),
        },
        negated,
    }))
}

/// The subquery's value column, the probe as the subquery sees it (its columns the outer
/// row's, from `outer`) and those outer references.
fn inside(
    probe: &Expr,
    subquery: &Subquery,
    outer: &DFSchema,
) -> datafusion::error::Result<(Expr, Expr, Vec<Expr>)> {
    let Some(value) = subquery.subquery.schema().columns().into_iter().next() else {
        return Err(datafusion::error::DataFusionError::Plan(
            "an IN subquery has no column".into(),
        ));
    };
    let mut references = Vec::new();
    let inner_probe = probe
        .clone()
        .transform(|e| match e {
            Expr::Column(column) => {
                let (_, field) = outer.qualified_field_from_column(&column)?;
                let reference = Expr::OuterReferenceColumn(field.clone(), column);
                references.push(reference.clone());
                Ok(Transformed::yes(reference))
            }
            other => Ok(Transformed::no(other)),
        })?
        .data;
    Ok((Expr::Column(value), inner_probe, references))
}

/// `probe NOT IN (S)` as three NOT EXISTS, `probe` over the rows of `outer`.
fn rewrite_not_in(
    probe: &Expr,
    subquery: &Subquery,
    outer: &DFSchema,
) -> datafusion::error::Result<Expr> {
    let (value, inner_probe, references) = inside(probe, subquery, outer)?;
    let none_equal = restricted(subquery, value.clone().eq(inner_probe), &references, true)?;
    let no_null = restricted(subquery, value.is_null(), &[], true)?;
    let empty = Expr::Exists(Exists {
        subquery: subquery.clone(),
        negated: true,
    });
    Ok(none_equal
        .and(no_null)
        .and(probe.clone().is_not_null().or(empty)))
}

/// `probe [NOT] IN (S)` inside a larger expression, with its three values:
/// `CASE WHEN EXISTS (S WHERE s = probe) THEN true WHEN probe IS NULL AND EXISTS (S) THEN
/// NULL WHEN EXISTS (S WHERE s IS NULL) THEN NULL ELSE false END` (DataFusion's mark join
/// gave false where the answer is NULL, so `v > 20 OR k NOT IN (1, NULL)` kept rows).
fn in_with_nulls(in_subquery: &InSubquery, outer: &DFSchema) -> datafusion::error::Result<Expr> {
    let InSubquery {
        expr: probe,
        subquery,
        negated,
    } = in_subquery;
    let (value, inner_probe, references) = inside(probe, subquery, outer)?;
    let equal = restricted(subquery, value.clone().eq(inner_probe), &references, false)?;
    let nulls = restricted(subquery, value.is_null(), &[], false)?;
    let any = Expr::Exists(Exists {
        subquery: subquery.clone(),
        negated: false,
    });
    let unknown = lit(ScalarValue::Boolean(None));
    let found = when(equal, lit(true))
        .when(probe.as_ref().clone().is_null().and(any), unknown.clone())
        .when(nulls, unknown)
        .otherwise(lit(false))?;
    Ok(if *negated {
        Expr::Not(Box::new(found))
    } else {
        found
    })
}

/// Whether `conjunct` holds an IN subquery that is not the whole conjunct (a plain
/// `x IN (S)` conjunct is a semi join, where NULL and false mean the same).
fn has_nested_in(conjunct: &Expr) -> bool {
    let nested = |e: &Expr| {
        e.exists(|x| Ok(matches!(x, Expr::InSubquery(i) if is_probe(&i.expr))))
            .unwrap_or(false)
    };
    match conjunct {
        Expr::InSubquery(i) => nested(&i.expr),
        other => nested(other),
    }
}

/// The conjuncts of a condition with its NOT IN and nested IN subqueries rewritten (only
/// those whose probe reads no column, with `constant_only`), or `None` if there are none.
fn rewrite_conjuncts(
    predicate: &Expr,
    outer: &DFSchema,
    constant_only: bool,
) -> datafusion::error::Result<Option<Expr>> {
    let wanted = |probe: &Expr| !constant_only || !probe.any_column_refs();
    let nested = |c: &Expr| {
        c.exists(|x| Ok(matches!(x, Expr::InSubquery(i) if is_probe(&i.expr) && wanted(&i.expr))))
            .unwrap_or(false)
            && has_nested_in(c)
    };
    let conjuncts = split_conjunction_owned(predicate.clone());
    let not_in_here = |c: &Expr| not_in(c).is_some_and(|(probe, _)| wanted(probe));
    if !conjuncts.iter().any(|c| not_in_here(c) || nested(c)) {
        return Ok(None);
    }
    let mut rewritten = Vec::with_capacity(conjuncts.len());
    for conjunct in conjuncts {
        rewritten.push(match not_in(&conjunct) {
            Some((probe, subquery)) if wanted(probe) => rewrite_not_in(probe, subquery, outer)?,
            _ if nested(&conjunct) => {
                conjunct
                    .transform_up(|e| match e {
                        Expr::InSubquery(i) if is_probe(&i.expr) && wanted(&i.expr) => {
                            Ok(Transformed::yes(in_with_nulls(&i, outer)?))
                        }
                        other => Ok(Transformed::no(other)),
                    })?
                    .data
            }
            _ => conjunct,
        });
    }
    Ok(conjunction(rewritten))
}

/// Rewrites a filter's condition, and a join's (where NULL and false reject a pair alike;
/// only probes that read no column there, which need no outer reference to either side).
/// An inner join's NOT IN conjuncts move to a filter above it first (seed 69 query 525:
/// `r1.c0 NOT IN (S WHERE r2.c2)` in an inner join's condition was left to DataFusion's
/// anti join, which dropped the pairs whose `r1.c0` is NULL and whose S is empty).
fn rewrite_filter(plan: LogicalPlan) -> datafusion::error::Result<Transformed<LogicalPlan>> {
    match plan {
        LogicalPlan::Filter(filter) => {
            match rewrite_conjuncts(&filter.predicate, filter.input.schema(), false)? {
                Some(predicate) => Ok(Transformed::yes(LogicalPlan::Filter(Filter::try_new(
                    predicate,
                    filter.input,
                )?))),
                None => Ok(Transformed::no(LogicalPlan::Filter(filter))),
            }
        }
        LogicalPlan::Join(mut join) => {
            let Some(condition) = &join.filter else {
                return Ok(Transformed::no(LogicalPlan::Join(join)));
            };
            if join.join_type == JoinType::Inner {
                // NOTE: an inner join's conjuncts filter its pairs as a filter above it would.
                let (moved, kept): (Vec<Expr>, Vec<Expr>) =
                    split_conjunction_owned(condition.clone())
                        .into_iter()
                        .partition(|c| not_in(c).is_some() || has_nested_in(c));
                if let Some(moved) = conjunction(moved) {
                    join.filter = conjunction(kept);
                    let join = LogicalPlan::Join(join);
                    let moved = rewrite_conjuncts(&moved, join.schema(), false)?.unwrap_or(moved);
                    return Ok(Transformed::yes(LogicalPlan::Filter(Filter::try_new(
                        moved,
                        Arc::new(join),
                    )?)));
                }
            }
            match rewrite_conjuncts(condition, &join.schema, true)? {
                Some(condition) => {
                    join.filter = Some(condition);
                    Ok(Transformed::yes(LogicalPlan::Join(join)))
                }
                None => Ok(Transformed::no(LogicalPlan::Join(join))),
            }
        }
        other => Ok(Transformed::no(other)),
    }
}
