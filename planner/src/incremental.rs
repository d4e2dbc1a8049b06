//! The incremental planner: a DataFusion `LogicalPlan` (already analyzed and optimized, so
//! subqueries are decorrelated into joins and DISTINCT into aggregates) translated into a
//! tree of incremental operators. Anything without an incremental operator is refused here,
//! at CREATE time, with SQLSTATE 0A000 naming the construct.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::common::tree_node::TreeNode;
use datafusion::common::{DFSchema, JoinType, NullEquality};
use datafusion::datasource::source_as_provider;
use datafusion::execution::context::ExecutionProps;
use datafusion::logical_expr::expr::{WindowFunction, WindowFunctionParams};
use datafusion::logical_expr::logical_plan::{FetchType, SkipType};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Aggregate, Distinct, Expr, GroupingSet, Join, LogicalPlan, Volatility, WindowFunctionDefinition,
};
use datafusion::physical_expr::{
    PhysicalSortExpr, create_physical_expr, create_physical_sort_exprs,
};
use datafusion::physical_plan::PhysicalExpr;
#[allow(deprecated)]
// NOTE: deprecated in favour of LoweredAggregateBuilder, which needs a planning context
// we do not have outside DataFusion's physical planner; this helper still does the same.
use datafusion::physical_planner::create_aggregate_expr_and_maybe_filter;

use crate::changelog::loose;
use crate::error::{PlanError, Result};
use crate::ops::aggregate::{AggregateCall, AggregateOp, Grouping};
use crate::ops::filter::FilterOp;
use crate::ops::join::{JoinOp, JoinSpec};
use crate::ops::project::ProjectOp;
use crate::ops::topn::TopNOp;
use crate::ops::union::UnionOp;
use crate::ops::values::ValuesOp;
use crate::ops::window::{Rank, WindowOp};
use crate::ops::{Operator, evaluate};
use crate::table::MillraceTable;
use crate::view_table::MaterializedView;

/// Builds fresh instances of a stateful operator, one per worker.
pub type OperatorFactory = Arc<dyn Fn() -> Result<Box<dyn Operator>> + Send + Sync>;

/// How a stateful operator is split across workers: rows are routed by the hash of these
/// key expressions (one list per input), so each key lives in exactly one instance.
#[derive(Clone)]
pub struct Partitioning {
    /// Key expressions per input.
    pub keys: Vec<Vec<Arc<dyn PhysicalExpr>>>,
    /// Builds one instance.
    pub factory: OperatorFactory,
}

impl std::fmt::Debug for Partitioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partitioning")
            .field("keys", &self.keys)
            .finish()
    }
}

/// A node of an incremental plan.
#[derive(Debug)]
pub enum PlanNode {
    /// The changes of a table or of another materialized view.
    Source {
        /// Catalog id of the table or view.
        id: u64,
        /// Its name, for EXPLAIN.
        name: String,
        /// Its full row schema.
        schema: SchemaRef,
    },
    /// An operator over the changes of its inputs.
    Operator {
        /// The operator (the instance used when it runs as one).
        op: Box<dyn Operator>,
        /// Its inputs.
        inputs: Vec<PlanNode>,
        /// How to run it hash-partitioned, when it is keyed.
        partitioning: Option<Partitioning>,
    },
}

impl PlanNode {
    /// Output schema of the node.
    pub fn schema(&self) -> SchemaRef {
        match self {
            PlanNode::Source { schema, .. } => loose(schema),
            PlanNode::Operator { op, .. } => op.schema(),
        }
    }

    /// Ids of every source the plan reads, without duplicates.
    pub fn sources(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.collect_sources(&mut out);
        out
    }

    fn collect_sources(&self, out: &mut Vec<u64>) {
        match self {
            PlanNode::Source { id, .. } => {
                if !out.contains(id) {
                    out.push(*id);
                }
            }
            PlanNode::Operator { inputs, .. } => {
                for input in inputs {
                    input.collect_sources(out);
                }
            }
        }
    }

    /// A fingerprint of the plan's operators and of their output schemas. Checkpointed
    /// state is restored only into a plan with the same one: the state's encoding follows
    /// the rows' layout, and the same SQL can compile to another layout after
    /// `ALTER TABLE ... ADD COLUMN` (`SELECT *`, a join keeping whole rows). A source's own
    /// schema is left out: an operator keeping its rows whole outputs them, and one that
    /// does not reads its columns by position, which a new last column does not move.
    pub fn layout(&self) -> u64 {
        let mut text = self.explain(1).join("\n");
        self.describe_schemas(&mut text);
        // FNV-1a: stable across builds, unlike std's hasher.
        text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    fn describe_schemas(&self, out: &mut String) {
        let PlanNode::Operator { op, inputs, .. } = self else {
            return;
        };
        for field in op.schema().fields() {
            out.push_str(&format!("\n{}: {}", field.name(), field.data_type()));
        }
        for input in inputs {
            out.push_str("\n(");
            input.describe_schemas(out);
            out.push(')');
        }
    }

    /// The plan as indented lines, for EXPLAIN.
    pub fn explain(&self, workers: usize) -> Vec<String> {
        let mut lines = Vec::new();
        self.explain_into(0, workers, &mut lines);
        lines
    }

    fn explain_into(&self, depth: usize, workers: usize, lines: &mut Vec<String>) {
        let indent = "  ".repeat(depth);
        match self {
            PlanNode::Source { name, .. } => {
                lines.push(format!("{indent}Source: {name}"));
            }
            PlanNode::Operator {
                op,
                inputs,
                partitioning,
            } => {
                let parallel = match partitioning {
                    Some(p) => {
                        let keys: Vec<String> = p
                            .keys
                            .iter()
                            .map(|k| {
                                k.iter()
                                    .map(|e| e.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            })
                            .collect();
                        format!(
                            " [hash-partitioned by ({}) across {workers} workers]",
                            keys.join(") / (")
                        )
                    }
                    None => String::new(),
                };
                lines.push(format!("{indent}{}{parallel}", op.describe()));
                for input in inputs {
                    input.explain_into(depth + 1, workers, lines);
                }
            }
        }
    }
}

/// Refuses plans whose result would depend on when they are maintained (now(), random()).
/// Run on the plan before optimization, which folds now() into a constant.
pub fn check_deterministic(plan: &LogicalPlan) -> Result<()> {
    let mut result = Ok(());
    let _ = plan.apply_with_subqueries(|node| {
        for e in node.expressions() {
            if let Err(err) = check_expr_with(&e, false) {
                result = Err(err);
                return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
            }
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    result
}

/// Translates an optimized logical plan into an incremental plan.
pub fn compile(plan: &LogicalPlan, props: &ExecutionProps) -> Result<PlanNode> {
    let plan = crate::scalar_subquery::lift(plan.clone())?;
    Compiler { props }.node(&plan)
}

struct Compiler<'a> {
    props: &'a ExecutionProps,
}

fn unsupported(what: impl Into<String>) -> PlanError {
    PlanError::Unsupported(what.into())
}

fn arrow_schema(schema: &DFSchema) -> SchemaRef {
    Arc::new(schema.as_arrow().clone())
}

fn single(op: Box<dyn Operator>, input: PlanNode) -> PlanNode {
    PlanNode::Operator {
        op,
        inputs: vec![input],
        partitioning: None,
    }
}

impl Compiler<'_> {
    fn expr(&self, e: &Expr, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
        check_expr(e)?;
        Ok(create_physical_expr(
            e,
            schema,
            self.props,
            &PhysicalPlanningContext::default(),
        )?)
    }

    fn exprs(&self, es: &[Expr], schema: &DFSchema) -> Result<Vec<Arc<dyn PhysicalExpr>>> {
        es.iter().map(|e| self.expr(e, schema)).collect()
    }

    fn node(&self, plan: &LogicalPlan) -> Result<PlanNode> {
        match plan {
            LogicalPlan::Projection(p) => {
                let input = self.node(&p.input)?;
                let exprs = self.exprs(&p.expr, p.input.schema())?;
                let op = ProjectOp::new(arrow_schema(&p.schema), exprs);
                Ok(single(Box::new(op), input))
            }
            LogicalPlan::Filter(f) => {
                let input = self.node(&f.input)?;
                let predicate = self.expr(&f.predicate, f.input.schema())?;
                let op = FilterOp::new(input.schema(), predicate);
                Ok(single(Box::new(op), input))
            }
            LogicalPlan::SubqueryAlias(a) => self.node(&a.input),
            LogicalPlan::TableScan(scan) => self.scan(scan),
            LogicalPlan::Join(join) => self.join(join),
            LogicalPlan::Aggregate(agg) => self.aggregate(agg),
            LogicalPlan::Distinct(Distinct::All(input)) => {
                let node = self.node(input)?;
                let exprs: Vec<Expr> = input
                    .schema()
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .collect();
                let groups = self.exprs(&exprs, input.schema())?;
                self.keyed_aggregate(node, input.schema().inner().clone(), groups, Vec::new())
            }
            LogicalPlan::Distinct(Distinct::On(_)) => Err(unsupported("DISTINCT ON")),
            LogicalPlan::Union(u) => {
                let inputs = u
                    .inputs
                    .iter()
                    .map(|i| self.node(i))
                    .collect::<Result<Vec<_>>>()?;
                Ok(PlanNode::Operator {
                    op: Box::new(UnionOp::new(arrow_schema(&u.schema))),
                    inputs,
                    partitioning: None,
                })
            }
            LogicalPlan::Sort(sort) => match sort.fetch {
                Some(fetch) => self.topn(&sort.input, &sort.expr, 0, fetch),
                // An ORDER BY without LIMIT does not change a view's rows.
                None => self.node(&sort.input),
            },
            LogicalPlan::Limit(limit) => {
                let skip = match limit.get_skip_type()? {
                    SkipType::Literal(s) => s,
                    SkipType::UnsupportedExpr => return Err(unsupported("a non-constant OFFSET")),
                };
                let fetch = match limit.get_fetch_type()? {
                    FetchType::Literal(Some(f)) => f,
                    FetchType::Literal(None) => {
                        return Err(unsupported("OFFSET without LIMIT"));
                    }
                    FetchType::UnsupportedExpr => return Err(unsupported("a non-constant LIMIT")),
                };
                match limit.input.as_ref() {
                    LogicalPlan::Sort(sort) => {
                        let fetch = sort
                            .fetch
                            .map_or(fetch, |f| f.saturating_sub(skip).min(fetch));
                        self.topn(&sort.input, &sort.expr, skip, fetch)
                    }
                    other => self.topn(other, &[], skip, fetch),
                }
            }
            LogicalPlan::Window(w) => self.window(w),
            LogicalPlan::EmptyRelation(e) => {
                let schema = arrow_schema(&e.schema);
                let rows = usize::from(e.produce_one_row);
                let batch = RecordBatch::try_new_with_options(
                    schema.clone(),
                    schema
                        .fields()
                        .iter()
                        .map(|f| datafusion::arrow::array::new_null_array(f.data_type(), rows))
                        .collect(),
                    &RecordBatchOptions::new().with_row_count(Some(rows)),
                )?;
                Ok(PlanNode::Operator {
                    op: Box::new(ValuesOp::new(batch)),
                    inputs: vec![],
                    partitioning: None,
                })
            }
            LogicalPlan::Values(v) => {
                let schema = arrow_schema(&v.schema);
                let one = RecordBatch::try_new_with_options(
                    Arc::new(Schema::empty()),
                    vec![],
                    &RecordBatchOptions::new().with_row_count(Some(1)),
                )?;
                let empty = DFSchema::empty();
                let mut columns: Vec<Vec<ArrayRef>> = vec![Vec::new(); schema.fields().len()];
                for row in &v.values {
                    for (c, e) in row.iter().enumerate() {
                        let expr = self.expr(e, &empty)?;
                        let value = evaluate(&[expr], &one)?;
                        let array = datafusion::arrow::compute::cast(
                            &value[0],
                            schema.field(c).data_type(),
                        )?;
                        columns[c].push(array);
                    }
                }
                let arrays = columns
                    .iter()
                    .map(|parts| {
                        let refs: Vec<&dyn datafusion::arrow::array::Array> =
                            parts.iter().map(|a| a.as_ref()).collect();
                        Ok(datafusion::arrow::compute::concat(&refs)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let batch = RecordBatch::try_new_with_options(
                    loose(&schema),
                    arrays,
                    &RecordBatchOptions::new().with_row_count(Some(v.values.len())),
                )?;
                Ok(PlanNode::Operator {
                    op: Box::new(ValuesOp::new(batch)),
                    inputs: vec![],
                    partitioning: None,
                })
            }
            LogicalPlan::Repartition(r) => self.node(&r.input),
            LogicalPlan::Extension(e) => Err(unsupported(e.node.name().to_string())),
            LogicalPlan::Subquery(_) => Err(unsupported("this subquery")),
            LogicalPlan::RecursiveQuery(_) => Err(unsupported("WITH RECURSIVE")),
            LogicalPlan::Unnest(u) => self.unnest(u),
            other => Err(unsupported(other.display().to_string())),
        }
    }

    fn scan(&self, scan: &datafusion::logical_expr::TableScan) -> Result<PlanNode> {
        let provider = source_as_provider(&scan.source)?;
        let (id, schema) = if let Some(table) = provider.downcast_ref::<MillraceTable>() {
            (table.id, table.def.schema.clone())
        } else if let Some(view) = provider.downcast_ref::<MaterializedView>() {
            (view.id, view.schema.clone())
        } else {
            return Err(unsupported(format!(
                "reading {} (only tables and materialized views can feed a materialized view)",
                scan.table_name
            )));
        };
        let mut node = PlanNode::Source {
            id,
            name: scan.table_name.to_string(),
            schema: schema.clone(),
        };
        // NOTE: filters pushed into the scan are not applied here: our providers accept them
        // as Inexact (tables) or not at all (views), so DataFusion keeps the Filter above.
        if let Some(projection) = &scan.projection {
            let exprs: Vec<Arc<dyn PhysicalExpr>> = projection
                .iter()
                .map(|&i| {
                    Arc::new(datafusion::physical_expr::expressions::Column::new(
                        schema.field(i).name(),
                        i,
                    )) as Arc<dyn PhysicalExpr>
                })
                .collect();
            node = single(
                Box::new(ProjectOp::new(arrow_schema(&scan.projected_schema), exprs)),
                node,
            );
        }
        Ok(node)
    }

    fn unnest(&self, u: &datafusion::logical_expr::Unnest) -> Result<PlanNode> {
        let [(column, list)] = u.list_type_columns.as_slice() else {
            return Err(unsupported("UNNEST of several lists at once"));
        };
        if !u.struct_type_columns.is_empty() || list.depth != 1 {
            return Err(unsupported("UNNEST of structs or nested lists"));
        }
        let identity = u
            .dependency_indices
            .iter()
            .copied()
            .eq(0..u.input.schema().fields().len());
        if !identity || u.options.recursions.iter().any(|r| r.depth != 1) {
            return Err(unsupported(format!(
                "this UNNEST (columns {:?}, recursions {})",
                u.dependency_indices,
                u.options.recursions.len()
            )));
        }
        let keep_nulls = !matches!(
            u.options.null_handling,
            datafusion::common::NullHandling::Drop
        );
        if matches!(
            u.options.null_handling,
            datafusion::common::NullHandling::PreserveAndExpandEmpty
        ) {
            return Err(unsupported("UNNEST expanding empty lists"));
        }
        let input = self.node(&u.input)?;
        let op = crate::ops::unnest::UnnestOp::new(arrow_schema(&u.schema), *column, keep_nulls);
        Ok(single(Box::new(op), input))
    }

    fn join(&self, join: &Join) -> Result<PlanNode> {
        if join.null_aware {
            return Err(unsupported("NOT IN (subquery)"));
        }
        let left = self.node(&join.left)?;
        let right = self.node(&join.right)?;
        let (lkeys, rkeys): (Vec<Expr>, Vec<Expr>) = join.on.iter().cloned().unzip();
        let keys = [
            self.exprs(&lkeys, join.left.schema())?,
            self.exprs(&rkeys, join.right.schema())?,
        ];
        let combined_df = join.left.schema().join(join.right.schema())?;
        let filter = match &join.filter {
            Some(f) => Some(self.expr(f, &combined_df)?),
            None => None,
        };
        let spec = JoinSpec {
            join_type: join.join_type,
            keys: keys.clone(),
            nulls_equal: join.null_equality == NullEquality::NullEqualsNull,
            filter,
            inputs: [left.schema(), right.schema()],
            combined: loose(&arrow_schema(&combined_df)),
            output: arrow_schema(&join.schema),
        };
        if matches!(join.join_type, JoinType::LeftMark | JoinType::RightMark) {
            return Err(unsupported("EXISTS or IN combined with OR"));
        }
        let op = JoinOp::try_new(spec.clone())?;
        let partitioning = (!keys[0].is_empty()).then(|| Partitioning {
            keys: keys.to_vec(),
            factory: Arc::new(move || {
                Ok(Box::new(JoinOp::try_new(spec.clone())?) as Box<dyn Operator>)
            }),
        });
        Ok(PlanNode::Operator {
            op: Box::new(op),
            inputs: vec![left, right],
            partitioning,
        })
    }

    fn aggregate(&self, agg: &Aggregate) -> Result<PlanNode> {
        let input = self.node(&agg.input)?;
        let in_df = agg.input.schema();
        let in_arrow = in_df.inner().clone();
        let mut calls = Vec::with_capacity(agg.aggr_expr.len());
        for e in &agg.aggr_expr {
            check_expr(e)?;
            #[allow(deprecated)]
            let (expr, filter, _order) =
                create_aggregate_expr_and_maybe_filter(e, in_df, &in_arrow, self.props)?;
            calls.push(AggregateCall { expr, filter });
        }
        let out_schema = arrow_schema(&agg.schema);
        if let [Expr::GroupingSet(set)] = agg.group_expr.as_slice() {
            let all: Vec<Expr> = set.distinct_expr().into_iter().cloned().collect();
            let lists: Vec<Vec<Expr>> = match set {
                GroupingSet::Rollup(exprs) => (0..=exprs.len())
                    .rev()
                    .map(|n| exprs[..n].to_vec())
                    .collect(),
                GroupingSet::Cube(exprs) => {
                    let n = exprs.len();
                    (0..(1usize << n))
                        .map(|mask| {
                            (0..n)
                                .filter(|i| mask & (1 << (n - 1 - i)) == 0)
                                .map(|i| exprs[i].clone())
                                .collect()
                        })
                        .collect()
                }
                GroupingSet::GroupingSets(lists) => lists.clone(),
            };
            let mut sets: Vec<Vec<bool>> = Vec::with_capacity(lists.len());
            let mut ids = Vec::with_capacity(lists.len());
            for list in &lists {
                let mask: Vec<bool> = all.iter().map(|e| !list.contains(e)).collect();
                let ordinal = sets.iter().filter(|s| **s == mask).count() as u64;
                let semantic = mask
                    .iter()
                    .fold(0u64, |acc, &null| (acc << 1) | u64::from(null));
                ids.push(semantic | (ordinal << all.len()));
                sets.push(mask);
            }
            let id_type = out_schema.field(all.len()).data_type().clone();
            let grouping = Grouping {
                exprs: self.exprs(&all, in_df)?,
                sets,
                grouping_id: Some((id_type, ids)),
            };
            let op = AggregateOp::try_new(out_schema, grouping, calls)?;
            return Ok(single(Box::new(op), input));
        }
        let groups = self.exprs(&agg.group_expr, in_df)?;
        self.keyed_aggregate(input, out_schema, groups, calls)
    }

    fn keyed_aggregate(
        &self,
        input: PlanNode,
        out_schema: SchemaRef,
        groups: Vec<Arc<dyn PhysicalExpr>>,
        calls: Vec<AggregateCall>,
    ) -> Result<PlanNode> {
        let grouping = Grouping {
            exprs: groups.clone(),
            sets: vec![vec![false; groups.len()]],
            grouping_id: None,
        };
        let op = AggregateOp::try_new(out_schema.clone(), grouping.clone(), calls.clone())?;
        let partitioning = (!groups.is_empty()).then(|| Partitioning {
            keys: vec![groups],
            factory: Arc::new(move || {
                Ok(Box::new(AggregateOp::try_new(
                    out_schema.clone(),
                    grouping.clone(),
                    calls.clone(),
                )?) as Box<dyn Operator>)
            }),
        });
        Ok(PlanNode::Operator {
            op: Box::new(op),
            inputs: vec![input],
            partitioning,
        })
    }

    fn topn(
        &self,
        input: &LogicalPlan,
        order: &[datafusion::logical_expr::SortExpr],
        skip: usize,
        fetch: usize,
    ) -> Result<PlanNode> {
        let node = self.node(input)?;
        for s in order {
            check_expr(&s.expr)?;
        }
        let order: Vec<PhysicalSortExpr> = create_physical_sort_exprs(
            order,
            input.schema(),
            self.props,
            &PhysicalPlanningContext::default(),
        )?;
        let op = TopNOp::try_new(node.schema(), order, skip, fetch)?;
        Ok(single(Box::new(op), node))
    }

    fn window(&self, w: &datafusion::logical_expr::Window) -> Result<PlanNode> {
        let input = self.node(&w.input)?;
        let mut functions = Vec::new();
        let mut shape: Option<(Vec<Expr>, Vec<datafusion::logical_expr::SortExpr>)> = None;
        for e in &w.window_expr {
            let inner = match e {
                Expr::Alias(a) => a.expr.as_ref(),
                other => other,
            };
            let Expr::WindowFunction(wf) = inner else {
                return Err(unsupported(format!("window expression {e}")));
            };
            let WindowFunction { fun, params } = wf.as_ref();
            let WindowFunctionParams {
                partition_by,
                order_by,
                filter,
                ..
            } = params;
            let name = match fun {
                WindowFunctionDefinition::WindowUDF(udf) => udf.name().to_ascii_lowercase(),
                WindowFunctionDefinition::AggregateUDF(udf) => {
                    return Err(unsupported(format!(
                        "aggregate window function {}",
                        udf.name()
                    )));
                }
            };
            let rank = match name.as_str() {
                "row_number" => Rank::RowNumber,
                "rank" => Rank::Rank,
                "dense_rank" => Rank::DenseRank,
                other => return Err(unsupported(format!("window function {other}"))),
            };
            if filter.is_some() {
                return Err(unsupported("FILTER on a window function"));
            }
            match &shape {
                None => shape = Some((partition_by.clone(), order_by.clone())),
                Some((p, o)) if p == partition_by && o == order_by => {}
                Some(_) => {
                    return Err(unsupported(
                        "window functions over different windows in one SELECT",
                    ));
                }
            }
            functions.push(rank);
        }
        let (partition_by, order_by) = shape.unwrap_or_default();
        let in_df = w.input.schema();
        let parts = self.exprs(&partition_by, in_df)?;
        let order = create_physical_sort_exprs(
            &order_by,
            in_df,
            self.props,
            &PhysicalPlanningContext::default(),
        )?;
        let out_schema = arrow_schema(&w.schema);
        let in_schema = input.schema();
        let op = WindowOp::try_new(
            out_schema.clone(),
            in_schema.clone(),
            parts.clone(),
            order.clone(),
            functions.clone(),
        )?;
        let partitioning = (!parts.is_empty()).then(|| Partitioning {
            keys: vec![parts.clone()],
            factory: Arc::new(move || {
                Ok(Box::new(WindowOp::try_new(
                    out_schema.clone(),
                    in_schema.clone(),
                    parts.clone(),
                    order.clone(),
                    functions.clone(),
                )?) as Box<dyn Operator>)
            }),
        });
        Ok(PlanNode::Operator {
            op: Box::new(op),
            inputs: vec![input],
            partitioning,
        })
    }
}

/// Refuses expressions whose value is not a function of the row: they would make the view
/// depend on when it is maintained.
fn check_expr(e: &Expr) -> Result<()> {
    check_expr_with(e, true)
}

fn check_expr_with(e: &Expr, strict_subqueries: bool) -> Result<()> {
    let mut bad: Option<String> = None;
    let _ = e.apply(|node| {
        match node {
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
                if strict_subqueries =>
            {
                bad = Some("this subquery".into());
            }
            // NOTE: checked before the analyzer rewrites it (not_in.rs) into NOT EXISTS
            // joined by OR, which would be refused in terms the query does not use.
            Expr::InSubquery(i) if i.negated => {
                bad = Some("NOT IN (subquery)".into());
            }
            Expr::Not(inner) if matches!(inner.as_ref(), Expr::InSubquery(_)) => {
                bad = Some("NOT IN (subquery)".into());
            }
            Expr::ScalarFunction(f) => {
                let name = f.func.name().to_ascii_lowercase();
                if matches!(
                    name.as_str(),
                    "now"
                        | "random"
                        | "uuid"
                        | "current_timestamp"
                        | "current_time"
                        | "current_date"
                ) {
                    bad = Some(format!("the non-deterministic function {name}()"));
                } else if name.starts_with("correlated_subquery") {
                    // NOTE: a subquery run row by row (crate::correlated) sees its tables
                    // when the row changes, not when they do.
                    bad = Some("this correlated subquery".into());
                } else if f.func.signature().volatility == Volatility::Volatile {
                    bad = Some(format!("the volatile function {name}()"));
                }
            }
            _ => {}
        }
        Ok(if bad.is_some() {
            datafusion::common::tree_node::TreeNodeRecursion::Stop
        } else {
            datafusion::common::tree_node::TreeNodeRecursion::Continue
        })
    });
    match bad {
        Some(what) => Err(unsupported(what)),
        None => Ok(()),
    }
}
