//! `EXISTS` / `NOT EXISTS` subqueries whose outer references sit where DataFusion's
//! decorrelation cannot reach them, such as inside a `LEFT JOIN ... ON` of the subquery.
//!
//! An analyzer rule, run before DataFusion's optimizer (which refuses them), decorrelates
//! them over the *domain* of the outer references: `D = SELECT DISTINCT <outer columns> FROM <outer input>` is cross-joined
//! into the subquery at the lowest point of its left spine that covers every outer reference,
//! the references become columns of `D`, and the filter becomes a semi (or anti) join of the
//! outer input with the rewritten subquery on the outer columns, NULLs matching NULLs. Each
//! domain row carries its own copy of the subquery, so the result is PostgreSQL's row-by-row
//! meaning, and the plan is an ordinary join tree that views maintain incrementally. The
//! optimizer then turns the cross join into an equi-join wherever a predicate links `D` to the
//! subquery's tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, NullEquality};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::logical_expr::expr::Exists;
use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
use datafusion::logical_expr::{
    Expr, Filter, Join, JoinType, LogicalPlan, LogicalPlanBuilder, Projection,
};
use datafusion::optimizer::AnalyzerRule;

static NEXT_DOMAIN: AtomicU64 = AtomicU64::new(1);

/// The optimizer rule.
#[derive(Debug, Default)]
pub struct ExistsOverDomain;

impl AnalyzerRule for ExistsOverDomain {
    fn name(&self) -> &str {
        "millrace_exists_over_domain"
    }

    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up(|node| match node {
            LogicalPlan::Filter(filter) => rewrite_filter(filter),
            other => Ok(Transformed::no(other)),
        })
        .map(|t| t.data)
    }
}

/// Replaces each top-level `[NOT] EXISTS` conjunct of `filter` that can be decorrelated over
/// its domain with a semi (anti) join; leaves the filter unchanged otherwise.
fn rewrite_filter(filter: Filter) -> Result<Transformed<LogicalPlan>> {
    let conjuncts = split_conjunction_owned(filter.predicate.clone());
    if !conjuncts.iter().any(is_correlated_exists) {
        return Ok(Transformed::no(LogicalPlan::Filter(filter)));
    }
    let mut input = Arc::unwrap_or_clone(filter.input.clone());
    let mut rest = Vec::new();
    let mut changed = false;
    for conjunct in conjuncts {
        match conjunct {
            Expr::Exists(exists) if needs_domain(&exists.subquery.subquery) => {
                match semi_join(&input, &exists)? {
                    Some(joined) => {
                        input = joined;
                        changed = true;
                    }
                    None => rest.push(Expr::Exists(exists)),
                }
            }
            other => rest.push(other),
        }
    }
    if !changed {
        return Ok(Transformed::no(LogicalPlan::Filter(filter)));
    }
    let plan = match conjunction(rest) {
        Some(predicate) => LogicalPlanBuilder::from(input).filter(predicate)?.build()?,
        None => input,
    };
    Ok(Transformed::yes(plan))
}

fn is_correlated_exists(e: &Expr) -> bool {
    matches!(e, Expr::Exists(ex) if needs_domain(&ex.subquery.subquery))
}

/// Whether the subquery refers to the outer query from a join condition: DataFusion's own
/// decorrelation handles references in filters, and its optimizer refuses these.
fn needs_domain(subquery: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = subquery.apply(|node| {
        if let LogicalPlan::Join(join) = node {
            let conditions = join
                .on
                .iter()
                .flat_map(|(l, r)| [l, r])
                .chain(join.filter.as_ref());
            found = conditions.into_iter().any(Expr::contains_outer);
        }
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// `input` semi-joined (anti-joined when negated) with the subquery decorrelated over the
/// domain of its outer references, or `None` when the subquery's shape is not supported.
fn semi_join(input: &LogicalPlan, exists: &Exists) -> Result<Option<LogicalPlan>> {
    let mut outer: Vec<Column> = Vec::new();
    for e in &exists.subquery.outer_ref_columns {
        let Expr::OuterReferenceColumn(_, column) = e else {
            return Ok(None);
        };
        if !outer.contains(column) {
            outer.push(column.clone());
        }
    }
    // NOTE: a reference to a query further out is not a column of this input.
    if outer.iter().any(|c| !input.schema().has_column(c)) {
        return Ok(None);
    }
    let id = NEXT_DOMAIN.fetch_add(1, Ordering::Relaxed);
    let names: Vec<String> = (0..outer.len())
        .map(|i| format!("__domain_{id}_{i}"))
        .collect();
    let domain = LogicalPlanBuilder::from(input.clone())
        .project(
            outer
                .iter()
                .zip(&names)
                .map(|(c, n)| Expr::Column(c.clone()).alias(n)),
        )?
        .distinct()?
        .build()?;
    let subquery = Arc::unwrap_or_clone(exists.subquery.subquery.clone());
    let Some(attached) = attach(subquery, &domain, &outer, &names)? else {
        return Ok(None);
    };
    let correlated = LogicalPlanBuilder::from(attached)
        .project(names.iter().map(|n| Expr::Column(Column::from_name(n))))?
        .build()?;
    let join_type = if exists.negated {
        JoinType::LeftAnti
    } else {
        JoinType::LeftSemi
    };
    let right_keys: Vec<Column> = names.iter().map(Column::from_name).collect();
    let joined = LogicalPlanBuilder::from(input.clone())
        .join_detailed(
            correlated,
            join_type,
            (outer, right_keys),
            None,
            NullEquality::NullEqualsNull,
        )?
        .build()?;
    Ok(Some(joined))
}

/// Rebuilds `plan` with the domain cross-joined in at the lowest node of its left spine
/// below which no outer reference occurs, each outer reference replaced by its domain column
/// and the domain columns carried up to the top. `None` for a node the rewrite does not keep
/// correct (aggregates, limits, the null-supplying side of an outer join, ...).
fn attach(
    plan: LogicalPlan,
    domain: &LogicalPlan,
    outer: &[Column],
    names: &[String],
) -> Result<Option<LogicalPlan>> {
    if !has_outer_refs(&plan)? {
        let crossed = LogicalPlanBuilder::from(domain.clone())
            .cross_join(plan)?
            .build()?;
        return Ok(Some(crossed));
    }
    let local = |e: Expr| to_domain(e, outer, names);
    let rebuilt = match plan {
        LogicalPlan::Filter(filter) => {
            let Some(input) = attach(Arc::unwrap_or_clone(filter.input), domain, outer, names)?
            else {
                return Ok(None);
            };
            LogicalPlanBuilder::from(input)
                .filter(local(filter.predicate)?)?
                .build()?
        }
        LogicalPlan::Projection(Projection { expr, input, .. }) => {
            let Some(input) = attach(Arc::unwrap_or_clone(input), domain, outer, names)? else {
                return Ok(None);
            };
            let mut exprs = expr.into_iter().map(local).collect::<Result<Vec<_>>>()?;
            exprs.extend(names.iter().map(|n| Expr::Column(Column::from_name(n))));
            LogicalPlanBuilder::from(input).project(exprs)?.build()?
        }
        LogicalPlan::Join(join)
            if matches!(
                join.join_type,
                JoinType::Inner | JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti
            ) && !has_outer_refs(&join.right)? =>
        {
            let Some(left) = attach(Arc::unwrap_or_clone(join.left), domain, outer, names)? else {
                return Ok(None);
            };
            let on = join
                .on
                .into_iter()
                .map(|(l, r)| Ok((local(l)?, local(r)?)))
                .collect::<Result<Vec<_>>>()?;
            let filter = join.filter.map(local).transpose()?;
            LogicalPlan::Join(Join::try_new(
                Arc::new(left),
                join.right,
                on,
                filter,
                join.join_type,
                join.join_constraint,
                join.null_equality,
                join.null_aware,
            )?)
        }
        _ => return Ok(None),
    };
    Ok(Some(rebuilt))
}

/// Whether any expression of `plan` or its inputs refers to an outer query.
fn has_outer_refs(plan: &LogicalPlan) -> Result<bool> {
    let mut found = false;
    plan.apply(|node| {
        node.apply_expressions(|e| {
            e.apply(|sub| {
                if matches!(sub, Expr::OuterReferenceColumn(..)) {
                    found = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })?;
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    Ok(found)
}

/// `e` with each outer reference to `outer[i]` replaced by the domain column `names[i]`.
fn to_domain(e: Expr, outer: &[Column], names: &[String]) -> Result<Expr> {
    e.transform(|sub| match sub {
        Expr::OuterReferenceColumn(_, ref column) => match outer.iter().position(|c| c == column) {
            Some(i) => Ok(Transformed::yes(Expr::Column(Column::from_name(&names[i])))),
            None => Ok(Transformed::no(sub)),
        },
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}
