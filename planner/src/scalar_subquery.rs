//! Uncorrelated scalar subqueries in a view's filters and projections, lifted into joins.
//!
//! DataFusion 55 runs `WHERE x > (SELECT max(y) FROM t)` as a subquery evaluated once per
//! query; a view must instead maintain the subquery's result and react when it changes.
//! Each such subquery becomes the right side of a key-less LEFT JOIN (so an empty subquery
//! still yields NULL), its value a column, and the original columns are projected back:
//! `Filter(p(sub))` over `I` becomes `Project(I.*)` over `Filter(p(sq.value))` over
//! `I LEFT JOIN sq`. The incremental join then maintains it like any other join.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::datatypes::DataType;
use datafusion::common::exec_err;
use datafusion::functions_aggregate::expr_fn::{count, max};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, lit,
};

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, JoinType};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, Projection};

use crate::error::Result;

static SINGLE_ROW: LazyLock<Arc<ScalarUDF>> =
    LazyLock::new(|| Arc::new(ScalarUDF::new_from_impl(SingleRow::new())));

/// `single_row(rows, value)`: `value`, or the error PostgreSQL raises when a scalar subquery
/// returns more than one row.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SingleRow {
    /// The row count and the value, of any type.
    signature: Signature,
}

impl SingleRow {
    fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for SingleRow {
    fn name(&self) -> &str {
        "single_row"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(args.get(1).cloned().unwrap_or(DataType::Null))
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let [rows, value] = args.args.as_slice() else {
            return exec_err!("single_row takes a count and a value");
        };
        let rows = rows.to_array(args.number_rows)?;
        let rows = datafusion::common::cast::as_int64_array(&rows)?;
        if rows.iter().any(|n| n.is_some_and(|n| n > 1)) {
            return exec_err!("more than one row returned by a subquery used as an expression");
        }
        Ok(value.clone())
    }
}

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
            // NOTE: a scalar subquery yields at most one row. The global aggregate keeps
            // the count beside the value, and `single_row` fails the view (as PostgreSQL
            // fails the query) once the subquery holds more than one row.
            let sub = LogicalPlanBuilder::from(sub)
                .aggregate(
                    Vec::<Expr>::new(),
                    vec![
                        max(Expr::Column(first)).alias("__value"),
                        count(lit(1)).alias("__rows"),
                    ],
                )?
                .project(vec![
                    Expr::ScalarFunction(ScalarFunction::new_udf(
                        Arc::clone(&SINGLE_ROW),
                        vec![
                            Expr::Column(Column::from_name("__rows")),
                            Expr::Column(Column::from_name("__value")),
                        ],
                    ))
                    .alias("value"),
                ])?
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
