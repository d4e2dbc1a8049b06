//! The optimizer's rule lists, logical and physical: DataFusion's, in its order, with our
//! corrections in place. Every session's context (server `Engine::session_context`) is built
//! with them, before the rules that need a session's state (correlated subqueries) are added.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::config::ConfigOptions;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::optimizer::{Optimizer, OptimizerRule};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

use crate::correlated::CorrelatedSubqueries;
use crate::dependencies::SoundDependencies;
use crate::empty_subqueries::EmptySubqueries;
use crate::filter_pushdown::FilterPushDown;
use crate::lost_order::LostOrder;
use crate::outer_join_constants::OuterJoinConstants;
use crate::subquery_values::PredicateSubqueriesAsValues;
use crate::topk_order::TopKMergeOrder;

/// DataFusion's optimizer rules with its filter push-down replaced by
/// [`FilterPushDown`], [`SoundDependencies`] run before each rule that acts on
/// functional dependencies, [`EmptySubqueries`] before its decorrelation of subqueries, and
/// [`PredicateSubqueriesAsValues`] last.
pub fn rules() -> Vec<Arc<dyn OptimizerRule + Send + Sync>> {
    let mut rules: Vec<Arc<dyn OptimizerRule + Send + Sync>> = Vec::new();
    for rule in Optimizer::new().rules {
        match rule.name() {
            "push_down_filter" => rules.push(Arc::new(FilterPushDown::new())),
            "decorrelate_predicate_subquery" => {
                rules.push(Arc::new(EmptySubqueries));
                rules.push(rule);
            }
            "replace_distinct_aggregate"
            | "eliminate_join"
            | "eliminate_duplicated_expr"
            | "optimize_projections" => {
                if rules.last().map(|r| r.name()) != Some(SoundDependencies.name()) {
                    rules.push(Arc::new(SoundDependencies));
                }
                rules.push(rule);
            }
            _ => rules.push(rule),
        }
    }
    rules.push(Arc::new(PredicateSubqueriesAsValues));
    rules
}

/// DataFusion's physical optimizer rules with its filter push-downs guarded by
/// [`UniqueNames`], [`OuterJoinConstants`] after the first of them (before the rules that
/// place sorts and repartitions by what the plan's nodes know of their columns),
/// [`LostOrder`] before the sanity check, projection push-downs [`Optional`], and
/// [`TopKMergeOrder`] last.
pub fn physical_rules() -> Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> {
    let mut rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> = Vec::new();
    let mut outer_joins_placed = false;
    for rule in PhysicalOptimizer::new().rules {
        if rule.name().starts_with("FilterPushdown") {
            rules.push(Arc::new(UniqueNames { inner: rule }));
            if !outer_joins_placed {
                rules.push(Arc::new(OuterJoinConstants));
                outer_joins_placed = true;
            }
        } else if rule.name() == "ProjectionPushdown" {
            rules.push(Arc::new(Optional { inner: rule }));
        } else {
            if rule.name() == "SanityCheckPlan" {
                rules.push(Arc::new(LostOrder));
            }
            rules.push(rule);
        }
    }
    rules.push(Arc::new(TopKMergeOrder));
    rules
}

/// A physical rule that only improves a plan: where it fails, the plan stays as it was.
///
/// DataFusion's projection push-down checks a projection's columns against its input's by
/// name, and a plan past a swapped join holds two columns of one name (the projection that
/// restores the join's column order keeps both sides' `c1`): pushing a projection into a
/// filter that selected from it failed with "Input field name c0 does not match with the
/// projection expression c1" (random SQL seed 23 query 3197). The plan before the push-down
/// runs the same rows.
#[derive(Debug)]
struct Optional {
    inner: Arc<dyn PhysicalOptimizerRule + Send + Sync>,
}

impl PhysicalOptimizerRule for Optional {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self
            .inner
            .optimize(Arc::clone(&plan), config)
            .unwrap_or(plan))
    }

    fn optimize_with_context(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        context: &dyn datafusion::physical_optimizer::PhysicalOptimizerContext,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self
            .inner
            .optimize_with_context(Arc::clone(&plan), context)
            .unwrap_or(plan))
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn schema_check(&self) -> bool {
        self.inner.schema_check()
    }
}

/// Both rule lists on a session state under construction.
pub fn with_rules(builder: SessionStateBuilder) -> SessionStateBuilder {
    builder
        .with_optimizer_rules(rules())
        .with_physical_optimizer_rules(physical_rules())
}

/// Adds [`CorrelatedSubqueries`] to `ctx`'s rules (it needs the session's state, so it is
/// added once the session exists): before each `optimize_projections` as well as last.
///
/// `optimize_projections` merges a projection into the one below it by substituting the
/// lower one's expressions for its columns, and a subquery's outer references are not
/// columns to it: `(SELECT ... WHERE r1.c0)` over the NULL-padding projection DataFusion
/// puts in place of an outer join with an empty side (`CAST(NULL AS BOOLEAN) AS r1.c0`)
/// lost `r1.c0` ("No field named r1.c0", random SQL seed 53 query 2356). Made a call of
/// its outer columns first, the subquery's reference is a column the merge substitutes.
pub fn add_correlated_subqueries(ctx: &SessionContext) {
    let rule: Arc<dyn OptimizerRule + Send + Sync> =
        Arc::new(CorrelatedSubqueries::new(&ctx.state_ref()));
    let current = ctx.state_ref().read().optimizers().to_vec();
    let names: HashSet<String> = current.iter().map(|r| r.name().to_string()).collect();
    for name in &names {
        ctx.remove_optimizer_rule(name);
    }
    for existing in current {
        if existing.name() == "optimize_projections" {
            ctx.add_optimizer_rule(Arc::clone(&rule));
        }
        ctx.add_optimizer_rule(existing);
    }
    ctx.add_optimizer_rule(rule);
}

/// A physical rule run only on plans whose every node's columns have distinct names.
///
/// DataFusion's physical filter push-down maps a filter's columns through a projection by
/// name, and a join's output (and the projection that restores a swapped join's column
/// order) holds two `k` columns when both sides have one: a filter on the right side's `k`
/// above a RIGHT JOIN was pushed onto the left side's `k`, and rows the filter should have
/// removed came back (seed 9020 query 4997, a wrong answer). Such plans keep their filters
/// where the logical optimizer put them.
#[derive(Debug)]
struct UniqueNames {
    inner: Arc<dyn PhysicalOptimizerRule + Send + Sync>,
}

/// Whether some node of `plan` has two columns of one name.
fn has_duplicate_names(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut pending = vec![Arc::clone(plan)];
    while let Some(node) = pending.pop() {
        let schema = node.schema();
        let mut seen = HashSet::new();
        if !schema
            .fields()
            .iter()
            .all(|f| seen.insert(f.name().clone()))
        {
            return true;
        }
        pending.extend(node.children().into_iter().cloned());
    }
    false
}

impl PhysicalOptimizerRule for UniqueNames {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        if has_duplicate_names(&plan) {
            return Ok(plan);
        }
        self.inner.optimize(plan, config)
    }

    fn optimize_with_context(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        context: &dyn datafusion::physical_optimizer::PhysicalOptimizerContext,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        if has_duplicate_names(&plan) {
            return Ok(plan);
        }
        self.inner.optimize_with_context(plan, context)
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn schema_check(&self) -> bool {
        self.inner.schema_check()
    }
}

/// [`FilterPushDown`] in the rule list: filters stay above aggregates without groups.
#[cfg(test)]
mod filter_pushdown_tests {
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::prelude::SessionContext;

    /// The optimized plan of `sql` over `t(k INT)`, as text.
    async fn optimized(ctx: &SessionContext, sql: &str) -> String {
        let plan = ctx.state().create_logical_plan(sql).await.expect("plan");
        let plan = ctx.state().optimize(&plan).expect("optimize");
        format!("{}", plan.display_indent())
    }

    /// The line of `plan` that first holds `node`.
    fn line_of(plan: &str, node: &str) -> usize {
        plan.lines()
            .position(|l| l.contains(node))
            .unwrap_or_else(|| panic!("no {node} in {plan}"))
    }

    /// A context with our optimizer rules or DataFusion's.
    async fn context(ours: bool) -> SessionContext {
        let mut state = SessionStateBuilder::new().with_default_features();
        if ours {
            state = state.with_optimizer_rules(crate::optimizer::rules());
        }
        let ctx = SessionContext::new_with_state(state.build());
        ctx.sql("CREATE TABLE t (k INT) AS VALUES (1), (2)")
            .await
            .expect("create");
        ctx
    }

    /// The filter of `HAVING (SELECT false)` stays above the aggregate (DataFusion's own rule
    /// moves it below, which this test shows so that it fails once DataFusion stops doing so).
    #[tokio::test]
    async fn keeps_filter_above_global_aggregate() {
        let sql = "SELECT count(*) FROM t HAVING (SELECT false)";
        let theirs = optimized(&context(false).await, sql).await;
        let ours = optimized(&context(true).await, sql).await;
        let filter_line = |plan: &str| line_of(plan, "Filter:");
        let aggregate_line = |plan: &str| line_of(plan, "Aggregate:");
        assert!(filter_line(&theirs) > aggregate_line(&theirs), "{theirs}");
        assert!(filter_line(&ours) < aggregate_line(&ours), "{ours}");
        let rows = context(true)
            .await
            .sql(sql)
            .await
            .expect("sql")
            .collect()
            .await
            .expect("collect");
        assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    }

    /// Filters over grouping columns still go below an aggregate with groups.
    #[tokio::test]
    async fn pushes_below_grouped_aggregate() {
        let plan = optimized(
            &context(true).await,
            "SELECT k, count(*) FROM t GROUP BY k HAVING k > 1",
        )
        .await;
        let filter_line = line_of(&plan, "Filter:");
        let aggregate_line = line_of(&plan, "Aggregate:");
        assert!(filter_line > aggregate_line, "{plan}");
    }
}

/// [`SoundDependencies`] in the rule list: groups across a join stay apart.
#[cfg(test)]
mod dependencies_tests {
    use datafusion::arrow::array::{Array, Int64Array, RecordBatch};
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::prelude::SessionContext;

    async fn run(ctx: &SessionContext, sql: &str) -> Vec<RecordBatch> {
        ctx.sql(sql)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run")
    }

    /// Two tables keyed by `k`, crossed, with our optimizer rules or DataFusion's.
    async fn context(ours: bool) -> SessionContext {
        let mut state = SessionStateBuilder::new().with_default_features();
        if ours {
            state = state.with_optimizer_rules(crate::optimizer::rules());
        }
        let ctx = SessionContext::new_with_state(state.build());
        for sql in [
            "CREATE TABLE t1 (k INT NOT NULL PRIMARY KEY, c INT)",
            "CREATE TABLE t2 (k INT NOT NULL PRIMARY KEY, c INT)",
            "INSERT INTO t1 VALUES (1, 10), (2, 20)",
            "INSERT INTO t2 VALUES (1, 5), (2, 6), (3, 7)",
        ] {
            run(&ctx, sql).await;
        }
        ctx
    }

    /// `GROUP BY r2.k, r1.c` over the cross join has 3 x 2 groups. With DataFusion's
    /// dependencies the aggregate above groups by `r2.k` alone and answers 3 (shown, so that
    /// the test says when DataFusion stops doing so); with ours, 6.
    #[tokio::test]
    async fn groups_across_a_join_stay_apart() {
        let nested = "SELECT count(*) FROM (SELECT a, b FROM (SELECT r2.k AS a, r1.c AS b, \
                      count(*) FROM t1 AS r1, t2 AS r2 GROUP BY r2.k, r1.c) s GROUP BY a, b) u";
        let distinct = "SELECT avg(DISTINCT r1.k) FROM t1 AS r1, t2 AS r2 GROUP BY r2.k, r1.c";
        for (ours, groups) in [(false, 3), (true, 6)] {
            let ctx = context(ours).await;
            let counted = run(&ctx, nested).await;
            let column = counted[0].column(0);
            let counts = column
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("count is BIGINT");
            assert_eq!((counts.len(), counts.value(0)), (1, groups), "ours: {ours}");
            let rows: usize = run(&ctx, distinct).await.iter().map(|b| b.num_rows()).sum();
            assert_eq!(rows, groups as usize, "ours: {ours}");
        }
    }
}

/// Our physical rules in the rule list: [`OuterJoinConstants`] and [`LostOrder`].
#[cfg(test)]
mod physical_rule_tests {
    use datafusion::arrow::array::{AsArray, RecordBatch};
    use datafusion::arrow::datatypes::{Int32Type, Int64Type};
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::prelude::SessionContext;

    /// The answer to `sql` on a session with our rule lists, over `tables` (CREATE TABLE
    /// ... AS VALUES statements).
    async fn answer(tables: &[&str], sql: &str) -> Vec<RecordBatch> {
        let state = super::with_rules(SessionStateBuilder::new().with_default_features()).build();
        let ctx = SessionContext::new_with_state(state);
        super::add_correlated_subqueries(&ctx);
        for table in tables {
            let created = ctx.sql(table).await.expect("setup").collect().await;
            created.expect("setup");
        }
        ctx.sql(sql)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("runs")
    }

    /// A window over a FULL JOIN whose right side is a literal orders its partitions by
    /// that column too: the right side's own rows, where the literal is, come first, and
    /// the left rows padded with NULL after them.
    #[tokio::test]
    async fn a_window_orders_by_a_literal_of_a_null_padded_side() {
        let tables = [
            "CREATE TABLE a (k INT, c0 BOOLEAN, c2 DOUBLE) AS VALUES (0, NULL, 1.0), (1, NULL, 2.0)",
            "CREATE TABLE b (x BOOLEAN) AS VALUES (true), (true)",
        ];
        let sql = "SELECT min(a.k) OVER (PARTITION BY a.c0 ORDER BY r.c0) AS m, a.k \
                   FROM a FULL JOIN (SELECT 5.0 AS c0 FROM b WHERE x) AS r ON a.c2 = r.c0";
        let mut rows: Vec<(Option<i32>, Option<i32>)> = Vec::new();
        for batch in &answer(&tables, sql).await {
            let m = batch.column(0).as_primitive::<Int32Type>();
            let k = batch.column(1).as_primitive::<Int32Type>();
            rows.extend(m.iter().zip(k.iter()));
        }
        rows.sort();
        // PostgreSQL: the two rows of `r` (k NULL) rank first in the NULL partition and see
        // no k; the rows of `a` follow, peers of each other.
        let expected = vec![
            (None, None),
            (None, None),
            (Some(0), Some(0)),
            (Some(0), Some(1)),
        ];
        assert_eq!(rows, expected);
    }

    /// A projection over a filter over a swapped FULL join, whose restoring projection
    /// holds two columns of one name, runs (the projection push-down that failed on it
    /// leaves it as it was).
    #[tokio::test]
    async fn a_projection_over_a_swapped_join_with_two_columns_of_one_name() {
        let tables = [
            "CREATE TABLE a (c0 INT, c1 INT, c2 TEXT, c3 BIGINT) AS VALUES \
             (1, 10, 'x', NULL), (2, 20, 'y', 5), (3, 30, 'zz', NULL), (4, 40, 'w', NULL), \
             (5, 50, 'v', NULL), (6, 60, 'u', NULL), (7, 70, 't', NULL), (8, 80, 's', NULL)",
            "CREATE TABLE b (c1 INT, c3 BIGINT) AS VALUES (1, 2), (3, 4)",
        ];
        let sql = "SELECT b.c1 + a.c1 AS c0, CAST(8 - a.c0 AS BIGINT) AS c1, b.c3 AS c2, \
                   a.c2 || trim(a.c2) AS c3 \
                   FROM a FULL JOIN b ON false WHERE a.c3 IS NULL ORDER BY 2, 4 LIMIT 2";
        let mut rows: Vec<(Option<i64>, String)> = Vec::new();
        for batch in &answer(&tables, sql).await {
            let c1 = batch.column(1).as_primitive::<Int64Type>();
            let c3 = datafusion::arrow::compute::cast(
                batch.column(3),
                &datafusion::arrow::datatypes::DataType::Utf8,
            )
            .expect("text");
            let c3 = c3.as_string::<i32>();
            rows.extend(
                c1.iter()
                    .zip(c3.iter().map(|s| s.unwrap_or("").to_string())),
            );
        }
        assert_eq!(
            rows,
            vec![(Some(0), "ss".to_string()), (Some(1), "tt".to_string())]
        );
    }

    /// A correlated subquery reading a column of an outer join's side that DataFusion
    /// proved empty (and replaced by NULLs) reads NULL.
    #[tokio::test]
    async fn a_subquery_reads_the_null_padded_column_of_an_empty_side() {
        let tables = ["CREATE TABLE t (k INT, c BOOLEAN) AS VALUES (1, true), (2, false)"];
        let sql = "SELECT COALESCE((SELECT sum(s.k) FROM t AS s WHERE r.c), 10 * l.k) AS v \
                   FROM (SELECT FALSE AS c, 1.5 AS x FROM t WHERE FALSE) AS r \
                   RIGHT JOIN t AS l ON l.k > r.x ORDER BY v";
        let mut values: Vec<Option<i64>> = Vec::new();
        for batch in &answer(&tables, sql).await {
            values.extend(batch.column(0).as_primitive::<Int64Type>().iter());
        }
        assert_eq!(values, vec![Some(10), Some(20)]);
    }

    /// A UNION ALL whose branches meet an ORDER BY in ways the union cannot state (a
    /// constant column in one, two equal columns in the other) runs, in order.
    #[tokio::test]
    async fn a_union_of_branches_ordered_in_unstated_ways_is_sorted() {
        let tables = [
            "CREATE TABLE a (v BOOLEAN, w BOOLEAN) AS VALUES (true, false), (NULL, true), (false, NULL), (true, true)",
            "CREATE TABLE b (g INT, v BOOLEAN, x BOOLEAN) AS VALUES (1, true, false), (2, NULL, true), (3, false, true), (1, true, NULL)",
        ];
        let sql = "(SELECT a.v AS c0, TRUE AS c1, a.w AS c2 FROM a) UNION ALL \
                   (SELECT bool_and(b.v) AS c0, bool_or(b.x) AS c1, bool_or(b.x) AS c2 \
                    FROM b GROUP BY b.g) ORDER BY 1, 2 DESC, 3";
        let mut rows = Vec::new();
        for batch in &answer(&tables, sql).await {
            let column = |i: usize| batch.column(i).as_boolean().iter().collect::<Vec<_>>();
            let (c0, c1, c2) = (column(0), column(1), column(2));
            for r in 0..batch.num_rows() {
                rows.push((c0[r], c1[r], c2[r]));
            }
        }
        assert_eq!(rows.len(), 7);
        // PostgreSQL's order: false < true < NULL (ASC puts NULLs last), DESC reverses.
        let key = |v: Option<bool>| match v {
            Some(false) => 0,
            Some(true) => 1,
            None => 2,
        };
        let mut expected = rows.clone();
        expected.sort_by_key(|&(c0, c1, c2)| (key(c0), 2 - key(c1), key(c2)));
        assert_eq!(rows, expected);
    }
}
