//! Correlated scalar subqueries that DataFusion's decorrelation rules leave in the plan
//! (non-equality correlation such as `(SELECT count(*) FROM t1 AS x WHERE x.b < t1.b)`).
//!
//! An optimizer rule, run after DataFusion's own, replaces each remaining correlated
//! `ScalarSubquery` with a call to a [`CorrelatedScalar`] function whose arguments are the
//! outer columns. At execution the function evaluates the subquery once per distinct tuple
//! of outer values, with those values substituted as literals: a correlated apply with a
//! per-batch memo, which gives exactly PostgreSQL's row-by-row semantics.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::JoinType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DataFusionError, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
use datafusion::logical_expr::{
    ColumnarValue, Expr, Filter, Join, LogicalPlan, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, Subquery, Volatility,
};
use datafusion::optimizer::{AnalyzerRule, OptimizerConfig, OptimizerRule};
use datafusion::prelude::DataFrame;

use crate::stop::{CurrentStop, STOPPED};
use crate::subquery_values::{input_scope, predicates_as_values};
use parking_lot::RwLock;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The optimizer rule; holds the session it belongs to weakly (the session owns the rule).
#[derive(Debug)]
pub struct CorrelatedSubqueries {
    /// The session state subqueries run in.
    state: Weak<RwLock<SessionState>>,
}

impl CorrelatedSubqueries {
    /// A rule for the session whose state is `state`.
    pub fn new(state: &Arc<RwLock<SessionState>>) -> Self {
        Self {
            state: Arc::downgrade(state),
        }
    }
}

fn is_correlated_scalar(e: &Expr) -> bool {
    matches!(e, Expr::ScalarSubquery(sq) if !sq.outer_ref_columns.is_empty())
}

impl OptimizerRule for CorrelatedSubqueries {
    fn name(&self) -> &str {
        "millrace_correlated_subqueries"
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        plan.transform_up_with_subqueries(|node| {
            let mut found = false;
            for e in node.expressions() {
                found |= e.exists(|x| Ok(is_correlated_scalar(x)))?;
            }
            if !found {
                return Ok(Transformed::no(node));
            }
            let preserver = NamePreserver::new(&node);
            let rewritten = node.map_expressions(|expr| {
                let saved = preserver.save(&expr);
                let t = expr.transform_up(|e| match e {
                    Expr::ScalarSubquery(sq) if !sq.outer_ref_columns.is_empty() => {
                        Ok(Transformed::yes(self.call(sq)?))
                    }
                    other => Ok(Transformed::no(other)),
                })?;
                Ok(t.update_data(|e| saved.restore(e)))
            })?;
            Ok(rewritten)
        })
    }
}

/// The analyzer rule for subqueries where DataFusion's analyzer or physical planner refuses
/// them: correlated scalar subqueries in join conditions ("can only be used in Projection,
/// Filter, Aggregate plan nodes"), and any subquery in an outer join's condition, a window's
/// PARTITION BY or ORDER BY, or a sort key. Runs after DataFusion's analyzer rules and before
/// its invariant check. An inner join's conjuncts that hold one move to a filter above the
/// join (the same rows), where DataFusion decorrelates what it can and
/// [`CorrelatedSubqueries`] takes the rest. Elsewhere, where moving would change the rows
/// (which rows an outer join pads with NULLs), EXISTS and IN become scalar subqueries
/// ([`crate::subquery_values`]) and each correlated one a [`CorrelatedScalar`] call,
/// evaluated per row as PostgreSQL does.
#[derive(Debug)]
pub struct SubqueriesInPlace {
    calls: CorrelatedSubqueries,
}

/// Whether `e` is a subquery DataFusion cannot run outside a filter.
fn needs_rewrite(e: &Expr) -> bool {
    is_correlated_scalar(e) || matches!(e, Expr::Exists(_) | Expr::InSubquery(_))
}

fn holds(e: &Expr, test: fn(&Expr) -> bool) -> bool {
    e.exists(|x| Ok(test(x))).unwrap_or(true)
}

impl SubqueriesInPlace {
    /// A rule for the session whose state is `state`.
    pub fn new(state: &Arc<RwLock<SessionState>>) -> Self {
        Self {
            calls: CorrelatedSubqueries::new(state),
        }
    }

    fn node(&self, node: LogicalPlan) -> Result<Transformed<LogicalPlan>> {
        if !node.expressions().iter().any(|e| holds(e, needs_rewrite)) {
            return Ok(Transformed::no(node));
        }
        match node {
            LogicalPlan::Join(join) if join.join_type == JoinType::Inner => self.inner_join(join),
            LogicalPlan::Join(_) | LogicalPlan::Window(_) | LogicalPlan::Sort(_) => {
                self.in_place(node)
            }
            other => Ok(Transformed::no(other)),
        }
    }

    /// An inner join with its subquery conjuncts in a filter above it.
    fn inner_join(&self, join: Join) -> Result<Transformed<LogicalPlan>> {
        let Some(filter) = join.filter.clone() else {
            return Ok(Transformed::no(LogicalPlan::Join(join)));
        };
        let (moved, kept): (Vec<Expr>, Vec<Expr>) = split_conjunction_owned(filter)
            .into_iter()
            .partition(|c| holds(c, needs_rewrite));
        let Some(moved) = conjunction(moved) else {
            return Ok(Transformed::no(LogicalPlan::Join(join)));
        };
        let join = Join {
            filter: conjunction(kept),
            ..join
        };
        let filter = Filter::try_new(moved, Arc::new(LogicalPlan::Join(join)))?;
        Ok(Transformed::yes(LogicalPlan::Filter(filter)))
    }

    /// `node` with its predicate subqueries as values and its correlated ones as calls.
    fn in_place(&self, node: LogicalPlan) -> Result<Transformed<LogicalPlan>> {
        let scope = input_scope(&node);
        let preserver = NamePreserver::new(&node);
        let rewritten = node.map_expressions(|expr| {
            let saved = preserver.save(&expr);
            let values = predicates_as_values(expr, &scope)?;
            let calls = values.data.transform_up(|e| match e {
                Expr::ScalarSubquery(sq) if !sq.outer_ref_columns.is_empty() => {
                    Ok(Transformed::yes(self.calls.call(sq)?))
                }
                other => Ok(Transformed::no(other)),
            })?;
            Ok(Transformed::yes(saved.restore(calls.data)))
        })?;
        rewritten.map_data(|node| node.recompute_schema())
    }
}

impl AnalyzerRule for SubqueriesInPlace {
    fn name(&self) -> &str {
        "millrace_subqueries_in_place"
    }

    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        Ok(plan
            .transform_up_with_subqueries(|node| self.node(node))?
            .data)
    }
}

impl CorrelatedSubqueries {
    fn call(&self, sq: Subquery) -> Result<Expr> {
        let mut outer: Vec<(Column, DataType)> = Vec::new();
        for e in &sq.outer_ref_columns {
            if let Expr::OuterReferenceColumn(field, col) = e
                && !outer.iter().any(|(c, _)| c == col)
            {
                outer.push((col.clone(), field.data_type().clone()));
            }
        }
        let return_type = sq.subquery.schema().field(0).data_type().clone();
        let udf = CorrelatedScalar {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: format!("correlated_subquery_{}", outer.len()),
            signature: Signature::exact(
                outer.iter().map(|(_, t)| t.clone()).collect(),
                // NOTE: volatile, though its value is stable within a statement: a stable
                // call of literals would be folded by the simplifier, running the subquery
                // while planning, and a view would keep that value (and escape the refusal
                // of row-by-row subqueries in views).
                Volatility::Volatile,
            ),
            plan: sq.subquery.as_ref().clone(),
            outer: outer.iter().map(|(c, _)| c.clone()).collect(),
            return_type,
            state: self.state.clone(),
        };
        let args = outer.into_iter().map(|(c, _)| Expr::Column(c)).collect();
        Ok(Expr::ScalarFunction(ScalarFunction::new_udf(
            Arc::new(ScalarUDF::new_from_impl(udf)),
            args,
        )))
    }
}

/// A correlated scalar subquery as a function of its outer columns.
#[derive(Debug)]
pub struct CorrelatedScalar {
    /// Identity (the plan and state do not take part in equality).
    id: u64,
    /// Function name shown in plans.
    name: String,
    /// Exact argument types: those of the outer columns.
    signature: Signature,
    /// The subquery, with `OuterReferenceColumn`s still in it.
    plan: LogicalPlan,
    /// Outer columns, in argument order.
    outer: Vec<Column>,
    /// Type of the subquery's single column.
    return_type: DataType,
    /// The session to run the subquery in.
    state: Weak<RwLock<SessionState>>,
}

impl PartialEq for CorrelatedScalar {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for CorrelatedScalar {}
impl Hash for CorrelatedScalar {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl CorrelatedScalar {
    /// The subquery with the outer columns bound to `values`.
    fn bind(&self, values: &[ScalarValue]) -> Result<LogicalPlan> {
        let bound = self.plan.clone().transform_up_with_subqueries(|node| {
            let preserver = NamePreserver::new(&node);
            let t = node.map_expressions(|expr| {
                let saved = preserver.save(&expr);
                let t = expr.transform_up(|e| match &e {
                    Expr::OuterReferenceColumn(_, col) => {
                        match self.outer.iter().position(|c| c == col) {
                            Some(i) => Ok(Transformed::yes(Expr::Literal(values[i].clone(), None))),
                            None => Ok(Transformed::no(e)),
                        }
                    }
                    _ => Ok(Transformed::no(e)),
                })?;
                Ok(t.update_data(|e| saved.restore(e)))
            })?;
            if t.transformed {
                Ok(Transformed::yes(t.data.recompute_schema()?))
            } else {
                Ok(t)
            }
        })?;
        Ok(bound.data)
    }

    async fn evaluate(&self, state: &SessionState, values: &[ScalarValue]) -> Result<ScalarValue> {
        let plan = self.bind(values)?;
        let batches = DataFrame::new(state.clone(), plan).collect().await?;
        let mut found: Option<ScalarValue> = None;
        for b in &batches {
            for row in 0..b.num_rows() {
                if found.is_some() {
                    return Err(DataFusionError::Execution(
                        "more than one row returned by a subquery used as an expression".into(),
                    ));
                }
                found = Some(ScalarValue::try_from_array(b.column(0), row)?);
            }
        }
        match found {
            Some(v) if v.data_type() == self.return_type => Ok(v),
            Some(v) => v.cast_to(&self.return_type),
            None => ScalarValue::try_from(&self.return_type),
        }
    }
}

impl ScalarUDFImpl for CorrelatedScalar {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.return_type.clone())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let arrays: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| a.to_array(n))
            .collect::<Result<_>>()?;
        let mut keys: Vec<Vec<ScalarValue>> = Vec::with_capacity(n);
        let mut todo: Vec<Vec<ScalarValue>> = Vec::new();
        let mut seen: HashSet<Vec<ScalarValue>> = HashSet::new();
        let mut memo: HashMap<Vec<ScalarValue>, ScalarValue> = HashMap::new();
        for row in 0..n {
            let key = arrays
                .iter()
                .map(|a| ScalarValue::try_from_array(a, row))
                .collect::<Result<Vec<_>>>()?;
            if seen.insert(key.clone()) {
                todo.push(key.clone());
            }
            keys.push(key);
        }
        let state = self
            .state
            .upgrade()
            .ok_or_else(|| DataFusionError::Internal("session closed during a subquery".into()))?
            .read()
            .clone();
        // The statement's stop flag, read between subqueries: a batch's subqueries run in
        // this one call, out of reach of the task abort that stops the rest of the plan.
        let stop = CurrentStop::of(state.config());
        // NOTE: the subquery runs on a helper thread with its own small runtime, so evaluating
        // it never blocks (or re-enters) the runtime that is executing the outer query.
        let results: Result<Vec<ScalarValue>> = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| DataFusionError::External(Box::new(e)))?;
                    todo.iter()
                        .map(|key| match stop.is_stopped() {
                            true => Err(DataFusionError::Execution(STOPPED.into())),
                            false => rt.block_on(self.evaluate(&state, key)),
                        })
                        .collect()
                })
                .join()
                .map_err(|_| DataFusionError::Internal("subquery thread panicked".into()))?
        });
        for (key, value) in todo.into_iter().zip(results?) {
            memo.insert(key, value);
        }
        let values = keys
            .iter()
            .map(|k| memo.get(k).cloned().unwrap_or(ScalarValue::Null))
            .collect::<Vec<_>>();
        if values.is_empty() {
            return Ok(ColumnarValue::Array(
                datafusion::arrow::array::new_empty_array(&self.return_type),
            ));
        }
        Ok(ColumnarValue::Array(ScalarValue::iter_to_array(values)?))
    }
}
