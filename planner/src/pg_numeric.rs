//! Products of numerics DataFusion would cap at 38 digits, planned by
//! [`crate::pg_intervals::PgIntervals`] while SQL becomes a plan.
//!
//! PostgreSQL's numeric has no scale limit: `a * b` is exact with scale `s1 + s2`. DataFusion's
//! decimals stop at 38 digits: it refused a product whose scale passed 38 at planning ("Output
//! scale of Decimal128(38, 20) * Decimal128(38, 20) would exceed max scale of 38"), and one
//! whose scale came near it left too few integer digits (`(38, 30)` holds values below 10^8),
//! which a chain of three or four multiplications of unconstrained numerics (scale 10 here)
//! reaches. Such a product is computed exactly in 256 bits and rounded (half away from zero,
//! as PostgreSQL rounds) to scale 20, or its operands' larger scale when that is more: 18
//! integer digits, and exact for any operands with 20 significant decimals between them. A
//! result that still does not fit 38 digits is "numeric field overflow" (22003).

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Decimal128Array};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, i256};
use datafusion::common::{DFSchema, DataFusionError, Result, exec_err};
use datafusion::logical_expr::ExprSchemable;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The widest decimal the product is held in.
const MAX_DIGITS: u8 = 38;

/// The scale a product is rounded to, unless an operand's is larger.
const PRODUCT_SCALE: i8 = 20;

static NUMERIC_MUL: LazyLock<Arc<ScalarUDF>> =
    LazyLock::new(|| Arc::new(ScalarUDF::new_from_impl(NumericMul::new())));

/// Whether the product of decimals of these types is [`NumericMul`]'s: DataFusion's type for
/// it, `Decimal128(min(p1 + p2 + 1, 38), s1 + s2)`, cannot hold its scale, or is capped at 38
/// digits. A product DataFusion holds exactly (two short literals, say) stays its own.
///
/// NOTE: capped products are all taken, not only those past [`PRODUCT_SCALE`]: the types
/// seen while SQL is planned can be narrower than those after coercion (a derived table's
/// `CASE WHEN .. THEN a ELSE a * a END` column is typed by its first branch, scale 10, and
/// coerced to its second's, 20), and `x * x` of it failed at coercion ("Output scale of
/// Decimal128(38, 20) * Decimal128(38, 20) would exceed max scale of 38", random SQL seed
/// 62 query 165). [`NumericMul`] takes its operands' types as coerced.
pub fn takes_product(left_type: &DataType, right_type: &DataType) -> bool {
    let (DataType::Decimal128(p1, s1), DataType::Decimal128(p2, s2)) = (left_type, right_type)
    else {
        return false;
    };
    let scale = i16::from(*s1) + i16::from(*s2);
    let precision = i16::from(*p1) + i16::from(*p2) + 1;
    let max = i16::from(MAX_DIGITS);
    scale > max || precision > max
}

/// `left * right` as [`NumericMul`].
pub fn multiply(left: Expr, right: Expr) -> Expr {
    Expr::ScalarFunction(ScalarFunction::new_udf(
        Arc::clone(&NUMERIC_MUL),
        vec![left, right],
    ))
}

/// The type `e` has once DataFusion's type coercion has run, where `planned` (the type
/// `get_type` gave) may differ: a CASE's decimal branches are coerced to their largest scale,
/// where `get_type` gives the first branch's.
pub fn coerced_type(e: &Expr, schema: &DFSchema, planned: DataType) -> DataType {
    let (Expr::Case(case), DataType::Decimal128(p, s)) = (e, &planned) else {
        return planned;
    };
    let branches = case
        .when_then_expr
        .iter()
        .map(|(_, then)| then.as_ref())
        .chain(case.else_expr.as_deref());
    let mut scale = *s;
    for branch in branches {
        if let Ok(t) = branch.get_type(schema)
            && let DataType::Decimal128(_, bs) = coerced_type(branch, schema, t)
        {
            scale = scale.max(bs);
        }
    }
    DataType::Decimal128(*p, scale)
}

/// `numeric_mul(a, b)`: the exact product, rounded to [`product_scale`].
#[derive(Debug, PartialEq, Eq, Hash)]
struct NumericMul {
    signature: Signature,
}

impl NumericMul {
    fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

/// The scales of two decimal types.
fn scales(args: &[DataType]) -> Result<(i8, i8)> {
    match args {
        [DataType::Decimal128(_, s1), DataType::Decimal128(_, s2)] => Ok((*s1, *s2)),
        other => exec_err!("numeric_mul of {other:?}"),
    }
}

/// The scale of the product of decimals of scales `s1` and `s2`: exact up to
/// [`PRODUCT_SCALE`], and rounded there (or to the larger operand's scale) past it.
fn product_scale(s1: i8, s2: i8) -> i8 {
    let exact = i16::from(s1) + i16::from(s2);
    let rounded = PRODUCT_SCALE.max(s1).max(s2);
    i8::try_from(exact).map_or(rounded, |exact| exact.min(rounded))
}

impl ScalarUDFImpl for NumericMul {
    fn name(&self) -> &str {
        "numeric_mul"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        let (s1, s2) = scales(args)?;
        Ok(DataType::Decimal128(MAX_DIGITS, product_scale(s1, s2)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let types: Vec<DataType> = args.args.iter().map(|a| a.data_type()).collect();
        let (s1, s2) = scales(&types)?;
        let scale = product_scale(s1, s2);
        // NOTE: negative only for a decimal of negative scale, whose product is scaled up.
        let shift = i32::from(s1) + i32::from(s2) - i32::from(scale);
        let ten = i256::from_i128(10);
        let (divisor, multiplier) = if shift >= 0 {
            (ten.wrapping_pow(shift.unsigned_abs()), i256::ONE)
        } else {
            (i256::ONE, ten.wrapping_pow(shift.unsigned_abs()))
        };
        let limit = i256::from_i128(10).wrapping_pow(u32::from(MAX_DIGITS));
        let arrays: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| a.to_array(n))
            .collect::<Result<_>>()?;
        let a = arrays[0].as_primitive::<Decimal128Type>();
        let b = arrays[1].as_primitive::<Decimal128Type>();
        let mut out: Vec<Option<i128>> = Vec::with_capacity(n);
        for row in 0..n {
            if a.is_null(row) || b.is_null(row) {
                out.push(None);
                continue;
            }
            let product = i256::from_i128(a.value(row)) * i256::from_i128(b.value(row));
            let rounded = round_div(product, divisor)
                .checked_mul(multiplier)
                .filter(|r| r.wrapping_abs() < limit)
                .ok_or_else(|| DataFusionError::Execution("numeric field overflow".into()))?;
            out.push(rounded.to_i128());
        }
        let result = Decimal128Array::from(out).with_precision_and_scale(MAX_DIGITS, scale)?;
        Ok(ColumnarValue::Array(Arc::new(result)))
    }
}

/// `value / divisor`, rounded half away from zero.
fn round_div(value: i256, divisor: i256) -> i256 {
    if divisor == i256::ONE {
        return value;
    }
    let quotient = value.wrapping_div(divisor);
    let remainder = value.wrapping_rem(divisor);
    if remainder.wrapping_abs().wrapping_mul(i256::from_i128(2)) >= divisor {
        if value.is_negative() {
            quotient.wrapping_sub(i256::ONE)
        } else {
            quotient.wrapping_add(i256::ONE)
        }
    } else {
        quotient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_away_from_zero() {
        let ten = i256::from_i128(10);
        assert_eq!(round_div(i256::from_i128(15), ten), i256::from_i128(2));
        assert_eq!(round_div(i256::from_i128(-15), ten), i256::from_i128(-2));
        assert_eq!(round_div(i256::from_i128(14), ten), i256::from_i128(1));
        assert_eq!(round_div(i256::from_i128(-14), ten), i256::from_i128(-1));
    }

    #[test]
    fn capped_products_are_taken() {
        let d = |s| DataType::Decimal128(38, s);
        assert!(takes_product(&d(10), &d(10)));
        assert_eq!(product_scale(10, 10), 20);
        assert_eq!(product_scale(2, 3), 5);
        assert_eq!(product_scale(20, 20), 20);
        assert_eq!(product_scale(30, 2), 30);
        assert!(takes_product(&d(10), &d(20)));
        assert!(takes_product(&d(20), &d(20)));
        assert!(!takes_product(&DataType::Int64, &d(38)));
        // Two literals whose product DataFusion holds exactly keep every digit.
        assert!(!takes_product(
            &DataType::Decimal128(12, 11),
            &DataType::Decimal128(13, 13)
        ));
        assert!(takes_product(
            &DataType::Decimal128(30, 25),
            &DataType::Decimal128(30, 15)
        ));
    }
}
