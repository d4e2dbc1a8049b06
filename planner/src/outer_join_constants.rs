//! A physical rule of ours, run between DataFusion's filter push-down and its sort and
//! distribution enforcement: an outer join claims no constants for the columns it pads with
//! NULLs.
//!
//! DataFusion 55 keeps, through LEFT, RIGHT and FULL joins, what each side knows of its
//! columns (`EquivalenceGroup::join`), constants included. A column that is a literal on its
//! side of a FULL JOIN is NULL on the rows the join pads, so it is no constant of the join's
//! output; taken for one, it was dropped from the sort under a window: `min(r1.k) OVER
//! (PARTITION BY r1.c0 ORDER BY r2.c0)` over `t2 r1 FULL JOIN (SELECT <literal> AS c0 ...) r2`
//! ordered its partitions by `r1.c0` alone, every row was a peer of every other, and the
//! rows PostgreSQL ranks first (those of `r2` alone) got the partition's minimum (random SQL
//! seed 796682120 query 1106, a wrong answer).
//!
//! [`NullPadded`] sits over each outer join and states the join's properties without the
//! constants and orderings that read a padded column (and without equivalences); it passes
//! the join's batches on untouched, and no sort goes below it to the join.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::common::JoinType;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::config::ConfigOptions;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::utils::collect_columns;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::joins::{
    HashJoinExec, NestedLoopJoinExec, SortMergeJoinExec, SymmetricHashJoinExec,
};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};

/// The rule.
#[derive(Debug)]
pub struct OuterJoinConstants;

impl PhysicalOptimizerRule for OuterJoinConstants {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let rewritten = plan.transform_up(|node| {
            // A plan optimized twice gets one `NullPadded` over each join, not two.
            if let Some(outer) = node.downcast_ref::<NullPadded>()
                && outer.input.downcast_ref::<NullPadded>().is_some()
            {
                return Ok(Transformed::yes(Arc::clone(&outer.input)));
            }
            let padded = padded_columns(&node);
            if padded.is_empty() {
                return Ok(Transformed::no(node));
            }
            Ok(Transformed::yes(
                Arc::new(NullPadded::new(node, padded)) as Arc<dyn ExecutionPlan>
            ))
        })?;
        Ok(rewritten.data)
    }

    fn name(&self) -> &str {
        "millrace_outer_join_constants"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The output columns `node` pads with NULLs, when it is an outer join (empty otherwise).
fn padded_columns(node: &Arc<dyn ExecutionPlan>) -> HashSet<usize> {
    let (join_type, projection): (JoinType, Option<Vec<usize>>) =
        if let Some(join) = node.downcast_ref::<HashJoinExec>() {
            (join.join_type, join.projection.as_ref().map(|p| p.to_vec()))
        } else if let Some(join) = node.downcast_ref::<NestedLoopJoinExec>() {
            (
                *join.join_type(),
                join.projection().as_ref().map(|p| p.to_vec()),
            )
        } else if let Some(join) = node.downcast_ref::<SortMergeJoinExec>() {
            (join.join_type(), None)
        } else if let Some(join) = node.downcast_ref::<SymmetricHashJoinExec>() {
            (*join.join_type(), None)
        } else {
            return HashSet::new();
        };
    let (pads_left, pads_right) = match join_type {
        JoinType::Left => (false, true),
        JoinType::Right => (true, false),
        JoinType::Full => (true, true),
        _ => return HashSet::new(),
    };
    let children = node.children();
    let Some(left) = children.first() else {
        return HashSet::new();
    };
    let left_width = left.schema().fields().len();
    // Before its own projection, an outer join's output is the left side's columns and
    // then the right side's.
    let width = node.schema().fields().len();
    (0..width)
        .filter(|&out| {
            let joined = projection
                .as_ref()
                .and_then(|p| p.get(out).copied())
                .unwrap_or(out);
            if joined < left_width {
                pads_left
            } else {
                pads_right
            }
        })
        .collect()
}

/// An outer join's batches, passed on, with the join's properties minus what reads a
/// column it pads with NULLs.
#[derive(Debug)]
pub struct NullPadded {
    input: Arc<dyn ExecutionPlan>,
    padded: HashSet<usize>,
    properties: Arc<PlanProperties>,
}

impl NullPadded {
    fn new(input: Arc<dyn ExecutionPlan>, padded: HashSet<usize>) -> NullPadded {
        let properties = Arc::new(sound_properties(input.properties(), &padded));
        NullPadded {
            input,
            padded,
            properties,
        }
    }
}

/// `joined` with its constants and orderings kept only where they read no padded column
/// (an ordering up to its first key that does), and no equivalences between columns (a
/// class of them may hold a constant).
fn sound_properties(joined: &PlanProperties, padded: &HashSet<usize>) -> PlanProperties {
    let reads_padded = |expr: &Arc<dyn PhysicalExpr>| {
        collect_columns(expr)
            .iter()
            .any(|c| padded.contains(&c.index()))
    };
    let old = &joined.eq_properties;
    let mut sound = EquivalenceProperties::new(Arc::clone(old.schema()));
    let constants: Vec<_> = old
        .constants()
        .into_iter()
        .filter(|c| !reads_padded(&c.expr))
        .collect();
    // NOTE: adding constants to properties without equivalences or orderings cannot fail.
    let _ = sound.add_constants(constants);
    sound.add_orderings(old.oeq_class().iter().map(|ordering| {
        ordering
            .iter()
            .take_while(|key| !reads_padded(&key.expr))
            .cloned()
            .collect::<Vec<_>>()
    }));
    joined.clone().with_eq_properties(sound)
}

impl DisplayAs for NullPadded {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let mut padded: Vec<_> = self.padded.iter().collect();
        padded.sort();
        write!(f, "NullPadded: columns={padded:?}")
    }
}

impl ExecutionPlan for NullPadded {
    fn name(&self) -> &str {
        "NullPadded"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    /// A sort above is never pushed below: the join would take it as met by the constants
    /// it claims (a sort on a padded column went down to the join and was dropped there).
    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.len() {
            // A join swapped under it (JoinSelection) keeps its output's columns in place
            // behind a projection, so the padded columns stay the same.
            1 => Ok(Arc::new(NullPadded::new(
                children.swap_remove(0),
                self.padded.clone(),
            ))),
            n => Err(DataFusionError::Internal(format!(
                "NullPadded has one input, given {n}"
            ))),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.input.execute(partition, context)
    }
}
