//! A physical rule of ours, run last before DataFusion's plan sanity check: an input whose
//! order DataFusion cannot prove, where its consumer requires one, is sorted.
//!
//! DataFusion's sort enforcement decides per input of a UNION ALL that each branch meets
//! the ORDER BY above (one branch through a constant column, the other through two columns
//! it knows are equal), and places no sort; the union then states only the order common to
//! what the branches state, shorter than the requirement, and the sanity check refused the
//! plan it had made (`(SELECT .., TRUE AS c1, ..) UNION ALL (SELECT .., bool_or(..) AS c1,
//! bool_or(..) AS c2, ..) ORDER BY 1, 2 DESC, 3, 4`, random SQL seed 23 query 2378). A sort
//! of rows already in order is correct, and costs one pass over them where DataFusion has
//! lost track of an order.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::physical_expr::LexOrdering;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, ExecutionPlan, ExecutionPlanProperties, ReplaceChildrenOptions,
};

/// The rule.
#[derive(Debug)]
pub struct LostOrder;

impl PhysicalOptimizerRule for LostOrder {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let rewritten = plan.transform_up(|node| {
            let requirements = node.required_input_ordering();
            let children: Vec<Arc<dyn ExecutionPlan>> =
                node.children().into_iter().cloned().collect();
            let mut changed = false;
            let mut sorted = Vec::with_capacity(children.len());
            for (child, requirement) in children.into_iter().zip(requirements) {
                let Some(requirement) = requirement else {
                    sorted.push(child);
                    continue;
                };
                let requirement = requirement.into_single();
                if child
                    .equivalence_properties()
                    .ordering_satisfy_requirement(requirement.clone())?
                {
                    sorted.push(child);
                    continue;
                }
                changed = true;
                let ordering = LexOrdering::from(requirement);
                let sort = SortExec::new(ordering, child).with_preserve_partitioning(true);
                sorted.push(Arc::new(sort) as Arc<dyn ExecutionPlan>);
            }
            if !changed {
                return Ok(Transformed::no(node));
            }
            let node = node.replace_children(
                sorted,
                ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
            )?;
            Ok(Transformed::yes(node))
        })?;
        Ok(rewritten.data)
    }

    fn name(&self) -> &str {
        "millrace_lost_order"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
