//! Index lookups in scans: filters that pin or bound an indexed column are answered from the
//! primary-key or a secondary index, and the scan becomes a [`LookupExec`] over just those
//! rows (visible in EXPLAIN as `PrimaryKeyLookup` or `IndexScan`).

use std::fmt;
use std::ops::Bound;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    SendableRecordBatchStream,
};

/// A bound on one column derived from the scan's filters.
#[derive(Debug, Clone, Default)]
pub struct ColumnRange {
    /// Values the column must equal one of (from `=` and `IN`), if any.
    pub points: Option<Vec<ScalarValue>>,
    /// Lower bound.
    pub lower: Option<(ScalarValue, bool)>,
    /// Upper bound.
    pub upper: Option<(ScalarValue, bool)>,
}

impl ColumnRange {
    /// Whether the range restricts anything.
    pub fn is_useful(&self) -> bool {
        self.points.is_some() || self.lower.is_some() || self.upper.is_some()
    }
}

impl fmt::Display for ColumnRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.points {
            let v: Vec<String> = p.iter().map(|x| x.to_string()).collect();
            return write!(f, "in [{}]", v.join(", "));
        }
        match &self.lower {
            Some((v, true)) => write!(f, "[{v}")?,
            Some((v, false)) => write!(f, "({v}")?,
            None => write!(f, "(-inf")?,
        }
        match &self.upper {
            Some((v, true)) => write!(f, ", {v}]"),
            Some((v, false)) => write!(f, ", {v})"),
            None => write!(f, ", +inf)"),
        }
    }
}

/// Folds the conjuncts of `filters` that constrain `column` (of type `ty`) into a range.
/// Only exact constraints are used: a literal that changes under the cast to the column's
/// type is left to the filter above the scan.
pub fn column_range(filters: &[Expr], column: &str, ty: &DataType) -> ColumnRange {
    let mut range = ColumnRange::default();
    for f in filters {
        for c in split_and(f) {
            apply(&mut range, c, column, ty);
        }
    }
    range
}

fn exact(v: &ScalarValue, ty: &DataType) -> Option<ScalarValue> {
    let cast = v.cast_to(ty).ok()?;
    if cast.cast_to(&v.data_type()).ok().as_ref() != Some(v) || cast.is_null() {
        return None;
    }
    Some(cast)
}

fn literal(e: &Expr) -> Option<&ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v),
        Expr::Cast(c) => literal(&c.expr),
        Expr::TryCast(c) => literal(&c.expr),
        _ => None,
    }
}

fn is_column(e: &Expr, column: &str) -> bool {
    matches!(e, Expr::Column(c) if c.name == column)
}

/// The values of `column = v1 OR column = v2 ...` (how DataFusion rewrites a short IN list);
/// None if any disjunct is something else.
fn or_points(e: &Expr, column: &str, ty: &DataType) -> Option<Vec<ScalarValue>> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Or,
            right,
        }) => {
            let mut points = or_points(left, column, ty)?;
            points.extend(or_points(right, column, ty)?);
            Some(points)
        }
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => {
            let value = if is_column(left, column) {
                literal(right)
            } else if is_column(right, column) {
                literal(left)
            } else {
                None
            };
            value.and_then(|v| exact(v, ty)).map(|v| vec![v])
        }
        _ => None,
    }
}

fn apply(range: &mut ColumnRange, e: &Expr, column: &str, ty: &DataType) {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            op: Operator::Or, ..
        }) => {
            if let Some(mut points) = or_points(e, column, ty) {
                points.dedup();
                narrow_points(range, points);
            }
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (op, value) = if is_column(left, column) {
                (*op, literal(right))
            } else if is_column(right, column) {
                let flipped = match op {
                    Operator::Lt => Operator::Gt,
                    Operator::LtEq => Operator::GtEq,
                    Operator::Gt => Operator::Lt,
                    Operator::GtEq => Operator::LtEq,
                    other => *other,
                };
                (flipped, literal(left))
            } else {
                return;
            };
            let Some(v) = value.and_then(|v| exact(v, ty)) else {
                return;
            };
            match op {
                Operator::Eq => narrow_points(range, vec![v]),
                Operator::Gt => tighten_lower(range, v, false),
                Operator::GtEq => tighten_lower(range, v, true),
                Operator::Lt => tighten_upper(range, v, false),
                Operator::LtEq => tighten_upper(range, v, true),
                _ => {}
            }
        }
        Expr::Between(Between {
            expr,
            negated: false,
            low,
            high,
        }) if is_column(expr, column) => {
            if let (Some(l), Some(h)) = (
                literal(low).and_then(|v| exact(v, ty)),
                literal(high).and_then(|v| exact(v, ty)),
            ) {
                tighten_lower(range, l, true);
                tighten_upper(range, h, true);
            }
        }
        Expr::InList(list) if !list.negated && is_column(&list.expr, column) => {
            let mut values = Vec::new();
            for item in &list.list {
                match literal(item) {
                    Some(v) if v.is_null() => {}
                    Some(v) => match exact(v, ty) {
                        Some(x) => values.push(x),
                        None => return,
                    },
                    None => return,
                }
            }
            narrow_points(range, values);
        }
        _ => {}
    }
}

fn narrow_points(range: &mut ColumnRange, values: Vec<ScalarValue>) {
    range.points = Some(match range.points.take() {
        None => values,
        Some(existing) => existing
            .into_iter()
            .filter(|v| values.contains(v))
            .collect(),
    });
}

fn tighten_lower(range: &mut ColumnRange, v: ScalarValue, inclusive: bool) {
    let replace = match &range.lower {
        None => true,
        Some((cur, cur_inc)) => match v.partial_cmp(cur) {
            Some(std::cmp::Ordering::Greater) => true,
            Some(std::cmp::Ordering::Equal) => *cur_inc && !inclusive,
            _ => false,
        },
    };
    if replace {
        range.lower = Some((v, inclusive));
    }
}

fn tighten_upper(range: &mut ColumnRange, v: ScalarValue, inclusive: bool) {
    let replace = match &range.upper {
        None => true,
        Some((cur, cur_inc)) => match v.partial_cmp(cur) {
            Some(std::cmp::Ordering::Less) => true,
            Some(std::cmp::Ordering::Equal) => *cur_inc && !inclusive,
            _ => false,
        },
    };
    if replace {
        range.upper = Some((v, inclusive));
    }
}

/// Splits a predicate into its AND-ed conjuncts.
pub fn split_and(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut v = split_and(left);
            v.extend(split_and(right));
            v
        }
        other => vec![other],
    }
}

/// Lower and upper bound of a range of encoded index keys.
pub type KeyRange = (Bound<Box<[u8]>>, Bound<Box<[u8]>>);

/// Converts a range into index-key bounds with `encode`.
pub fn key_bounds<E>(range: &ColumnRange, mut encode: E) -> datafusion::error::Result<Vec<KeyRange>>
where
    E: FnMut(&ScalarValue) -> datafusion::error::Result<Box<[u8]>>,
{
    if let Some(points) = &range.points {
        let mut out = Vec::new();
        for p in points {
            let in_lower = match &range.lower {
                Some((l, inc)) => p > l || (*inc && p == l),
                None => true,
            };
            let in_upper = match &range.upper {
                Some((u, inc)) => p < u || (*inc && p == u),
                None => true,
            };
            if in_lower && in_upper {
                let k = encode(p)?;
                out.push((Bound::Included(k.clone()), Bound::Included(k)));
            }
        }
        return Ok(out);
    }
    let lower = match &range.lower {
        Some((v, true)) => Bound::Included(encode(v)?),
        Some((v, false)) => Bound::Excluded(encode(v)?),
        None => Bound::Unbounded,
    };
    let upper = match &range.upper {
        Some((v, true)) => Bound::Included(encode(v)?),
        Some((v, false)) => Bound::Excluded(encode(v)?),
        None => Bound::Unbounded,
    };
    Ok(vec![(lower, upper)])
}

/// A scan answered from an index: the matching rows, fetched at planning time.
#[derive(Debug)]
pub struct LookupExec {
    /// What was looked up, for EXPLAIN.
    description: String,
    /// The rows (projected).
    batch: RecordBatch,
    /// Plan properties (one partition, bounded).
    properties: Arc<PlanProperties>,
}

impl LookupExec {
    /// A lookup returning `batch`, described as `description` in EXPLAIN.
    pub fn new(description: String, batch: RecordBatch) -> Self {
        let schema: SchemaRef = batch.schema();
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            description,
            batch,
            properties,
        }
    }
}

impl DisplayAs for LookupExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}, rows={}", self.description, self.batch.num_rows())
    }
}

impl ExecutionPlan for LookupExec {
    fn name(&self) -> &str {
        "LookupExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::error::Result<TreeNodeRecursion>,
    ) -> datafusion::error::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        _partition: usize,
        _context: Arc<TaskContext>,
    ) -> datafusion::error::Result<SendableRecordBatchStream> {
        Ok(Box::pin(MemoryStream::try_new(
            vec![self.batch.clone()],
            self.batch.schema(),
            None,
        )?))
    }
}
