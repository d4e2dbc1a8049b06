//! PostgreSQL interval arithmetic at SQL planning time: `timestamp - timestamp` is an interval
//! of days and time, and intervals compare by their total span (30-day months, 24-hour days).
//!
//! DataFusion gives `timestamp - timestamp` as a `Duration` and compares `IntervalMonthDayNano`
//! values field by field, so `interval '36 hours' > interval '1 day'` is false there. This
//! [`ExprPlanner`] rewrites both while the SQL is planned, for queries and views alike, and
//! with them `date ± integer` and the numeric products of [`crate::pg_numeric`].

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{
    Array, ArrayRef, Date32Array, Date32Builder, Decimal128Array, Int64Array,
    IntervalMonthDayNanoArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, IntervalMonthDayNano, IntervalUnit, TimeUnit};
use datafusion::common::{DFSchema, Result, exec_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawBinaryExpr};

use crate::pg_numeric;
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Expr, ExprSchemable, Operator, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};
use datafusion::sql::sqlparser::ast::BinaryOperator;

const NANOS_PER_DAY: i128 = 86_400_000_000_000;

/// Rewrites `timestamp - timestamp` and comparisons of intervals to PostgreSQL's meaning.
#[derive(Debug, Default)]
pub struct PgIntervals;

impl ExprPlanner for PgIntervals {
    fn plan_binary_op(
        &self,
        expr: RawBinaryExpr,
        schema: &DFSchema,
    ) -> Result<PlannerResult<RawBinaryExpr>> {
        if !matches!(
            expr.op,
            BinaryOperator::Plus
                | BinaryOperator::Minus
                | BinaryOperator::Multiply
                | BinaryOperator::Lt
                | BinaryOperator::LtEq
                | BinaryOperator::Gt
                | BinaryOperator::GtEq
                | BinaryOperator::Eq
                | BinaryOperator::NotEq
        ) || !small(&expr.left)
            || !small(&expr.right)
        {
            return Ok(PlannerResult::Original(expr));
        }
        // NOTE: a type that cannot be resolved here (a placeholder, say) leaves the expression
        // to DataFusion's own planning.
        let (Ok(left), Ok(right)) = (expr.left.get_type(schema), expr.right.get_type(schema))
        else {
            return Ok(PlannerResult::Original(expr));
        };
        let comparison = match expr.op {
            BinaryOperator::Plus if left == DataType::Date32 && right.is_integer() => {
                return Ok(PlannerResult::Planned(call(
                    &DATE_PLUS_DAYS,
                    vec![expr.left, expr.right],
                )));
            }
            BinaryOperator::Plus if left.is_integer() && right == DataType::Date32 => {
                return Ok(PlannerResult::Planned(call(
                    &DATE_PLUS_DAYS,
                    vec![expr.right, expr.left],
                )));
            }
            BinaryOperator::Minus if left == DataType::Date32 && right.is_integer() => {
                return Ok(PlannerResult::Planned(call(
                    &DATE_MINUS_DAYS,
                    vec![expr.left, expr.right],
                )));
            }
            BinaryOperator::Minus if is_timestamp(&left) && is_timestamp(&right) => {
                return Ok(PlannerResult::Planned(call(
                    &TIMESTAMP_DIFF,
                    vec![expr.left, expr.right],
                )));
            }
            BinaryOperator::Multiply => {
                let left = pg_numeric::coerced_type(&expr.left, schema, left);
                let right = pg_numeric::coerced_type(&expr.right, schema, right);
                return Ok(if pg_numeric::takes_product(&left, &right) {
                    PlannerResult::Planned(pg_numeric::multiply(expr.left, expr.right))
                } else {
                    PlannerResult::Original(expr)
                });
            }
            BinaryOperator::Lt => Operator::Lt,
            BinaryOperator::LtEq => Operator::LtEq,
            BinaryOperator::Gt => Operator::Gt,
            BinaryOperator::GtEq => Operator::GtEq,
            BinaryOperator::Eq => Operator::Eq,
            BinaryOperator::NotEq => Operator::NotEq,
            _ => return Ok(PlannerResult::Original(expr)),
        };
        if !(is_span(&left) && is_span(&right)) {
            return Ok(PlannerResult::Original(expr));
        }
        Ok(PlannerResult::Planned(Expr::BinaryExpr(BinaryExpr::new(
            Box::new(call(&INTERVAL_SPAN, vec![expr.left])),
            comparison,
            Box::new(call(&INTERVAL_SPAN, vec![expr.right])),
        ))))
    }
}

/// Whether `e` has at most a few dozen nodes. Typing an operand recurses through it outside
/// the SQL planner's stack growth, and every level of a long AND/OR chain would type the
/// whole chain below it: only small operands are typed (timestamps and intervals are).
fn small(e: &Expr) -> bool {
    let mut pending = vec![e];
    let mut seen = 0;
    while let Some(e) = pending.pop() {
        seen += 1;
        if seen > 64 {
            return false;
        }
        match e {
            Expr::BinaryExpr(b) => {
                pending.push(&b.left);
                pending.push(&b.right);
            }
            Expr::Cast(c) => pending.push(&c.expr),
            Expr::TryCast(c) => pending.push(&c.expr),
            Expr::Alias(a) => pending.push(&a.expr),
            Expr::Negative(x) | Expr::Not(x) => pending.push(x),
            Expr::ScalarFunction(f) => pending.extend(f.args.iter()),
            Expr::Case(case) => {
                pending.extend(case.expr.as_deref());
                for (when, then) in &case.when_then_expr {
                    pending.push(when);
                    pending.push(then);
                }
                pending.extend(case.else_expr.as_deref());
            }
            // NOTE: leaves here, subqueries and IN lists among them: typed without
            // recursing (a subquery by its plan's one column, IN by its being boolean).
            _ => {}
        }
    }
    true
}

fn is_timestamp(t: &DataType) -> bool {
    matches!(t, DataType::Timestamp(..))
}

fn is_span(t: &DataType) -> bool {
    matches!(t, DataType::Interval(_) | DataType::Duration(_))
}

fn call(udf: &Arc<ScalarUDF>, args: Vec<Expr>) -> Expr {
    Expr::ScalarFunction(ScalarFunction::new_udf(Arc::clone(udf), args))
}

static TIMESTAMP_DIFF: LazyLock<Arc<ScalarUDF>> =
    LazyLock::new(|| Arc::new(ScalarUDF::new_from_impl(TimestampDiff::new())));
static INTERVAL_SPAN: LazyLock<Arc<ScalarUDF>> =
    LazyLock::new(|| Arc::new(ScalarUDF::new_from_impl(IntervalSpan::new())));
static DATE_PLUS_DAYS: LazyLock<Arc<ScalarUDF>> =
    LazyLock::new(|| Arc::new(ScalarUDF::new_from_impl(DateShift::new(false))));
static DATE_MINUS_DAYS: LazyLock<Arc<ScalarUDF>> =
    LazyLock::new(|| Arc::new(ScalarUDF::new_from_impl(DateShift::new(true))));

/// Days since 1970-01-01 of PostgreSQL's first and last dates (4714-11-24 BC, 5874897-12-31).
const FIRST_DAY: i64 = -2_440_588;
const LAST_DAY: i64 = 2_145_042_906;

/// `pg_date_plus_days(date, n)` and `pg_date_minus_days(date, n)`: PostgreSQL's
/// `date + integer` and `date - integer`, a date `n` days later or earlier.
#[derive(Debug, PartialEq, Eq, Hash)]
struct DateShift {
    /// `date - n` rather than `date + n`.
    subtract: bool,
    /// A date and any integer.
    signature: Signature,
}

impl DateShift {
    fn new(subtract: bool) -> Self {
        Self {
            subtract,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for DateShift {
    fn name(&self) -> &str {
        if self.subtract {
            "pg_date_minus_days"
        } else {
            "pg_date_plus_days"
        }
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Date32)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let [date, days] = args.args.as_slice() else {
            return exec_err!("{} takes a date and a number of days", self.name());
        };
        let dates = cast(&date.to_array(rows)?, &DataType::Date32)?;
        let days = cast(&days.to_array(rows)?, &DataType::Int64)?;
        let (Some(dates), Some(days)) = (
            dates.as_any().downcast_ref::<Date32Array>(),
            days.as_any().downcast_ref::<Int64Array>(),
        ) else {
            return exec_err!("{} takes a date and a number of days", self.name());
        };
        let mut shifted = Date32Builder::with_capacity(rows);
        for (date, days) in dates.iter().zip(days.iter()) {
            let (Some(date), Some(days)) = (date, days) else {
                shifted.append_null();
                continue;
            };
            let day = if self.subtract {
                i64::from(date).checked_sub(days)
            } else {
                i64::from(date).checked_add(days)
            };
            match day {
                Some(day) if (FIRST_DAY..=LAST_DAY).contains(&day) => {
                    shifted.append_value(day as i32)
                }
                _ => return exec_err!("date out of range"),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(shifted.finish())))
    }
}

/// `pg_timestamp_diff(a, b)`: `a - b` as an interval of whole days plus the remaining time,
/// as PostgreSQL's `timestamp - timestamp` gives it (`21 days 23:59:59`).
#[derive(Debug, PartialEq, Eq, Hash)]
struct TimestampDiff {
    /// Any two timestamps, of any unit and time zone.
    signature: Signature,
}

impl TimestampDiff {
    fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for TimestampDiff {
    fn name(&self) -> &str {
        "pg_timestamp_diff"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Interval(IntervalUnit::MonthDayNano))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let [a, b] = args.args.as_slice() else {
            return exec_err!("pg_timestamp_diff takes two timestamps");
        };
        let a = epoch_nanos(&a.to_array(rows)?)?;
        let b = epoch_nanos(&b.to_array(rows)?)?;
        let out: IntervalMonthDayNanoArray = a
            .iter()
            .zip(b.iter())
            .map(|(a, b)| {
                let diff = i128::from(a?) - i128::from(b?);
                let days = i32::try_from(diff / NANOS_PER_DAY).ok()?;
                let nanos = i64::try_from(diff % NANOS_PER_DAY).ok()?;
                Some(IntervalMonthDayNano::new(0, days, nanos))
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// A timestamp column as nanoseconds since the epoch (UTC for zoned timestamps, wall time for
/// plain ones).
fn epoch_nanos(array: &ArrayRef) -> Result<Int64Array> {
    let DataType::Timestamp(unit, _) = array.data_type() else {
        return exec_err!(
            "pg_timestamp_diff takes timestamps, not {}",
            array.data_type()
        );
    };
    let scale: i64 = match unit {
        TimeUnit::Second => 1_000_000_000,
        TimeUnit::Millisecond => 1_000_000,
        TimeUnit::Microsecond => 1_000,
        TimeUnit::Nanosecond => 1,
    };
    let raw = cast(array, &DataType::Int64)?;
    let raw = datafusion::common::cast::as_int64_array(&raw)?;
    Ok(raw.iter().map(|v| v?.checked_mul(scale)).collect())
}

/// `pg_interval_span(x)`: the total length of an interval or duration in nanoseconds, with
/// PostgreSQL's 30-day months and 24-hour days, as the key intervals compare by.
#[derive(Debug, PartialEq, Eq, Hash)]
struct IntervalSpan {
    /// One interval or duration.
    signature: Signature,
}

impl IntervalSpan {
    fn new() -> Self {
        Self {
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for IntervalSpan {
    fn name(&self) -> &str {
        "pg_interval_span"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Decimal128(38, 0))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let [x] = args.args.as_slice() else {
            return exec_err!("pg_interval_span takes one interval");
        };
        let x = x.to_array(rows)?;
        let intervals = cast(&x, &DataType::Interval(IntervalUnit::MonthDayNano))?;
        let intervals = intervals
            .as_any()
            .downcast_ref::<IntervalMonthDayNanoArray>()
            .map(|a| a.iter().map(|v| v.map(span)).collect::<Decimal128Array>());
        let Some(spans) = intervals else {
            return exec_err!("pg_interval_span takes an interval, not {}", x.data_type());
        };
        Ok(ColumnarValue::Array(Arc::new(
            spans.with_precision_and_scale(38, 0)?,
        )))
    }
}

fn span(v: IntervalMonthDayNano) -> i128 {
    (i128::from(v.months) * 30 + i128::from(v.days)) * NANOS_PER_DAY + i128::from(v.nanoseconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_count_months_as_thirty_days() {
        let hours_36 = IntervalMonthDayNano::new(0, 0, 36 * 3_600_000_000_000);
        let one_day = IntervalMonthDayNano::new(0, 1, 0);
        let one_month = IntervalMonthDayNano::new(1, 0, 0);
        assert!(span(hours_36) > span(one_day));
        assert_eq!(span(one_month), span(IntervalMonthDayNano::new(0, 30, 0)));
        assert!(span(IntervalMonthDayNano::new(0, -1, 0)) < 0);
    }
}
