//! A physical rule of ours, run after DataFusion's: a partitioned TopK under a merge sorts by
//! the merge's whole ordering.
//!
//! DataFusion drops from a partitioned `SortExec` the sort keys that are constant within each
//! partition (the literal first column of each branch of a UNION ALL), and its TopK then shares
//! one threshold across the partitions (`TopKDynamicFilters`): a threshold taken in one branch,
//! over the remaining keys, filtered the rows of another branch whose dropped constant sorts
//! first. `(SELECT DATE '2023-01-17' AS c0, ... FROM t2) UNION ALL (SELECT DATE '2023-01-16'
//! ...) ORDER BY 1 DESC, ... LIMIT 5` answered with the 01-16 rows about one time in two
//! (random SQL seed 796655653 query 540, a wrong answer). Sorting each partition by the merge's
//! ordering keeps each partition's order and makes the shared threshold sound.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;

/// The rule.
#[derive(Debug)]
pub struct TopKMergeOrder;

impl PhysicalOptimizerRule for TopKMergeOrder {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let rewritten = plan.transform_up(|node| {
            let Some(merge) = node.downcast_ref::<SortPreservingMergeExec>() else {
                return Ok(Transformed::no(node));
            };
            let Some(sort) = merge.input().downcast_ref::<SortExec>() else {
                return Ok(Transformed::no(node));
            };
            if sort.fetch().is_none()
                || !sort.preserve_partitioning()
                || sort.expr() == merge.expr()
            {
                return Ok(Transformed::no(node));
            }
            let sort = SortExec::new(merge.expr().clone(), sort.input().clone())
                .with_preserve_partitioning(true)
                .with_fetch(sort.fetch());
            let merge = SortPreservingMergeExec::new(merge.expr().clone(), Arc::new(sort))
                .with_fetch(merge.fetch());
            Ok(Transformed::yes(Arc::new(merge) as Arc<dyn ExecutionPlan>))
        })?;
        Ok(rewritten.data)
    }

    fn name(&self) -> &str {
        "millrace_topk_merge_order"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{Arc, TopKMergeOrder};
    use datafusion::arrow::array::RecordBatch;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn a_topk_over_a_union_of_constants_sorts_by_the_whole_order() {
        let state = datafusion::execution::session_state::SessionStateBuilder::new()
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(TopKMergeOrder))
            .build();
        let ctx = SessionContext::new_with_state(state);
        let sql = "SELECT 2 AS c0, v AS c1 FROM (VALUES (true), (true)) AS a(v) \
                   UNION ALL SELECT 1 AS c0, v AS c1 FROM (VALUES (false), (false), (false)) AS b(v) \
                   ORDER BY 1 DESC, 2 LIMIT 2";
        let plan = ctx
            .sql(sql)
            .await
            .expect("plan")
            .create_physical_plan()
            .await
            .expect("physical");
        let shown = datafusion::physical_plan::displayable(plan.as_ref())
            .indent(false)
            .to_string();
        if shown.contains("TopK") {
            assert!(
                shown.contains("TopK(fetch=2), expr=[c0@0 DESC, c1@1 ASC"),
                "{shown}"
            );
        }
        for _ in 0..20 {
            let rows = ctx
                .sql(sql)
                .await
                .expect("plan")
                .collect()
                .await
                .expect("rows");
            let c0: Vec<i64> = rows.iter().flat_map(first_ints).collect();
            assert_eq!(c0, vec![2, 2], "{shown}");
        }
    }

    /// The values of a batch's first column, an Int64 one.
    fn first_ints(batch: &RecordBatch) -> Vec<i64> {
        datafusion::common::cast::as_int64_array(batch.column(0))
            .map(|a| a.values().to_vec())
            .unwrap_or_default()
    }
}
