//! Sound functional dependencies for aggregates, as an optimizer rule that runs before the
//! DataFusion rules that act on them (`optimize_projections`, `replace_distinct_aggregate`,
//! `eliminate_join`).
//!
//! A primary key makes its columns depend on it, and DataFusion carries such dependencies
//! through the plan. Past a join, `r2.k` (the key of `r2`) determines `r2`'s columns only;
//! but an aggregate grouping by `r2.k, r1.c2` recorded that `r2.k` determines its whole
//! output, so an aggregate above it (`avg(DISTINCT ..)`'s two phases, or a GROUP BY over the
//! derived table) dropped `r1.c2` from its groups as redundant and merged groups PostgreSQL
//! keeps apart (the random queries' seed 16 query 1400: 16 rows where PostgreSQL has 288).
//! This rule recomputes each aggregate's dependencies soundly: a dependency whose source is
//! grouped determines the whole output only when its targets hold every grouping column;
//! otherwise it determines the grouping columns among its targets, and rows may repeat.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::{Dependency, FunctionalDependence, FunctionalDependencies};
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

/// Replaces each aggregate's functional dependencies with sound ones.
#[derive(Debug, Default)]
pub struct SoundDependencies;

impl OptimizerRule for SoundDependencies {
    fn name(&self) -> &str {
        "millrace_sound_dependencies"
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> datafusion::error::Result<Transformed<LogicalPlan>> {
        let mut unsound = false;
        plan.apply_with_subqueries(|node| {
            if let LogicalPlan::Aggregate(aggregate) = node
                && let Some(sound) = sound_dependencies(aggregate)
                && &sound != aggregate.schema.functional_dependencies()
            {
                unsound = true;
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        if !unsound {
            return Ok(Transformed::no(plan));
        }
        // Bottom up, so that each node's schema (and the dependencies it carries up) is
        // rebuilt from inputs already made sound.
        plan.transform_up_with_subqueries(|node| {
            let node = node.recompute_schema()?;
            let LogicalPlan::Aggregate(mut aggregate) = node else {
                return Ok(Transformed::yes(node));
            };
            if let Some(dependencies) = sound_dependencies(&aggregate) {
                let schema = Arc::unwrap_or_clone(aggregate.schema);
                aggregate.schema = Arc::new(schema.with_functional_dependencies(dependencies)?);
            }
            Ok(Transformed::yes(LogicalPlan::Aggregate(aggregate)))
        })
    }
}

/// The functional dependencies of `aggregate`'s output that its input's dependencies
/// justify. `None` where DataFusion's are kept (grouping sets: it gives none).
fn sound_dependencies(aggregate: &Aggregate) -> Option<FunctionalDependencies> {
    if aggregate
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return None;
    }
    let input = aggregate.input.schema();
    let input_names = input.field_names();
    let groups: Vec<String> = aggregate
        .group_expr
        .iter()
        .map(|e| e.schema_name().to_string())
        .collect();
    let outputs = aggregate.schema.fields().len();
    if groups.iter().collect::<HashSet<_>>().len() != groups.len() {
        // Grouping twice by one name: positions would not match the output; claim nothing.
        return Some(FunctionalDependencies::empty());
    }
    let mut dependencies = Vec::new();
    for dependence in input.functional_dependencies().iter() {
        let source: Option<Vec<usize>> = dependence
            .source_indices
            .iter()
            .map(|&i| groups.iter().position(|g| *g == input_names[i]))
            .collect();
        let Some(source) = source else {
            continue;
        };
        let targets: HashSet<&String> = dependence
            .target_indices
            .iter()
            .map(|&i| &input_names[i])
            .collect();
        let determined: Vec<usize> = (0..groups.len())
            .filter(|&g| targets.contains(&groups[g]))
            .collect();
        dependencies.push(if determined.len() == groups.len() {
            // The source fixes the group, so it keys the output.
            FunctionalDependence::new(source, (0..outputs).collect(), dependence.nullable)
                .with_mode(Dependency::Single)
        } else {
            FunctionalDependence::new(source, determined, dependence.nullable)
                .with_mode(Dependency::Multi)
        });
    }
    let keyed = dependencies
        .iter()
        .any(|d| d.mode == Dependency::Single && d.target_indices.len() == outputs);
    if !groups.is_empty() && !keyed {
        // One row per group: the grouping columns key the output.
        let fields = aggregate.schema.fields();
        let nullable = (0..groups.len()).any(|g| fields[g].is_nullable());
        dependencies.push(
            FunctionalDependence::new(
                (0..groups.len()).collect(),
                (0..outputs).collect(),
                nullable,
            )
            .with_mode(Dependency::Single),
        );
    }
    Some(FunctionalDependencies::new(dependencies))
}
