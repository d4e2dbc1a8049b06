//! Subqueries the optimizer has proved empty, folded to their values: a logical rule run
//! before DataFusion's subquery decorrelation in each of its passes.
//!
//! DataFusion's `propagate_empty_relation` replaces a subquery that can have no rows (`SELECT
//! DATE '2023-01-05' FROM t2 WHERE FALSE`) with an empty relation, which has no output
//! expression; on its next pass the decorrelation of `x IN (S)` asks `S` for its output
//! expression and failed the whole query with "single expression required." (random SQL
//! seed 21 query 1684). Over no rows the answers are known:
//! - `EXISTS (S)` and `x IN (S)` are false (also for a NULL `x`), their negations true;
//! - a scalar subquery is NULL.

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::logical_expr::expr::{Exists, InSubquery};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{Expr, LogicalPlan, Subquery, lit};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

/// Folds subqueries over an empty relation.
#[derive(Debug, Default)]
pub struct EmptySubqueries;

/// Whether `plan` is a relation of no rows, under its aliases.
fn is_empty(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::EmptyRelation(empty) => !empty.produce_one_row,
        LogicalPlan::SubqueryAlias(alias) => is_empty(&alias.input),
        _ => false,
    }
}

/// The subquery of `e` when `e` is a subquery expression over no rows.
fn empty_subquery(e: &Expr) -> Option<&Subquery> {
    let subquery = match e {
        Expr::Exists(Exists { subquery, .. })
        | Expr::InSubquery(InSubquery { subquery, .. })
        | Expr::ScalarSubquery(subquery) => subquery,
        _ => return None,
    };
    is_empty(&subquery.subquery).then_some(subquery)
}

/// `e` with its subqueries over no rows replaced by their values.
fn fold(e: Expr) -> datafusion::error::Result<Transformed<Expr>> {
    e.transform_up(|e| {
        if empty_subquery(&e).is_none() {
            return Ok(Transformed::no(e));
        }
        let value = match &e {
            Expr::Exists(Exists { negated, .. }) | Expr::InSubquery(InSubquery { negated, .. }) => {
                lit(*negated)
            }
            Expr::ScalarSubquery(subquery) => {
                let schema = subquery.subquery.schema();
                let ty = schema.field(0).data_type();
                lit(ScalarValue::try_from(ty)?)
            }
            _ => return Ok(Transformed::no(e)),
        };
        Ok(Transformed::yes(value))
    })
}

impl OptimizerRule for EmptySubqueries {
    fn name(&self) -> &str {
        "millrace_empty_subqueries"
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
            let mut found = false;
            for e in node.expressions() {
                found |= e.exists(|x| Ok(empty_subquery(x).is_some()))?;
            }
            if !found {
                return Ok(Transformed::no(node));
            }
            let preserver = NamePreserver::new(&node);
            let rewritten = node.map_expressions(|expr| {
                let saved = preserver.save(&expr);
                Ok(fold(expr)?.update_data(|e| saved.restore(e)))
            })?;
            rewritten.map_data(|node| node.recompute_schema())
        })
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, BooleanArray, Int64Array};
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::prelude::SessionContext;

    use super::EmptySubqueries;
    use std::sync::Arc;

    /// IN, NOT IN, EXISTS and a scalar subquery over a subquery proved empty, in a filter
    /// under a join (where the decorrelation meets it on its second pass).
    #[tokio::test]
    async fn subqueries_over_no_rows_answer_their_values() {
        let mut rules = datafusion::optimizer::Optimizer::new().rules;
        let at = rules
            .iter()
            .position(|r| r.name() == "decorrelate_predicate_subquery")
            .expect("rule");
        rules.insert(at, Arc::new(EmptySubqueries));
        let state = SessionStateBuilder::new()
            .with_default_features()
            .with_optimizer_rules(rules)
            .build();
        let ctx = SessionContext::new_with_state(state);
        ctx.sql("CREATE TABLE a (k INT) AS VALUES (1), (2), (NULL)")
            .await
            .expect("setup")
            .collect()
            .await
            .expect("setup");
        let empty = "SELECT 5 FROM a AS e WHERE FALSE";
        let sql = format!(
            "SELECT count(*), \
               bool_and(r.x), bool_and(r.y), bool_and(r.z), count(r.s) \
             FROM a JOIN (SELECT (a.k IN ({empty})) AS x, (a.k NOT IN ({empty})) AS y, \
                                 EXISTS ({empty}) AS z, ({empty}) AS s FROM a) AS r \
             ON TRUE WHERE NOT r.x AND r.y"
        );
        let batches = ctx
            .sql(&sql)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("runs");
        let batch = &batches[0];
        let count = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("count");
        assert_eq!(count.value(0), 9, "every pair of rows passes NOT x AND y");
        let flag = |i: usize| {
            let a = batch
                .column(i)
                .as_any()
                .downcast_ref::<BooleanArray>()
                .expect("bool");
            (!a.is_null(0)).then(|| a.value(0))
        };
        assert_eq!(
            (flag(1), flag(2), flag(3)),
            (Some(false), Some(true), Some(false))
        );
        let scalars = batch
            .column(4)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("count");
        assert_eq!(scalars.value(0), 0, "the scalar subquery is NULL");
    }
}
