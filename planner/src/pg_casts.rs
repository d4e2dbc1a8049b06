//! PostgreSQL cast semantics DataFusion lacks, as an analyzer rule: a text literal cast to
//! `bytea` is read as PostgreSQL reads it (`'\x0102'` is two bytes, not six characters),
//! and a number cast to an integer is rounded as PostgreSQL rounds it (numeric half away
//! from zero, floats half to even) where DataFusion truncates (`-12.61` is -13, not -12).

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{ArrayRef, AsArray, Decimal128Array};
use datafusion::arrow::datatypes::{DataType, Float32Type, Float64Type};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, DataFusionError, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::logical_expr::ExprSchemable;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{
    Cast, ColumnarValue, Expr, LogicalPlan, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, Volatility,
};
use datafusion::optimizer::AnalyzerRule;

/// Rewrites PostgreSQL-specific literal casts.
#[derive(Debug, Default)]
pub struct PgCasts;

impl AnalyzerRule for PgCasts {
    fn analyze(
        &self,
        plan: LogicalPlan,
        _config: &ConfigOptions,
    ) -> datafusion::error::Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| {
            // NOTE: a rewritten expression keeps its name (an aggregate's output is referred
            // to by the name of its expression above it).
            let names = NamePreserver::new(&node);
            let inputs = match &node {
                LogicalPlan::Join(_) => Some(node.schema().clone()),
                _ => match node.inputs().as_slice() {
                    [input] => Some(input.schema().clone()),
                    _ => None,
                },
            };
            node.map_expressions(|expr| {
                let saved = names.save(&expr);
                let rewritten = expr.transform_up(|e| rewrite_expr(e, inputs.as_deref()))?;
                Ok(rewritten.update_data(|e| saved.restore(e)))
            })
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "millrace_pg_casts"
    }
}

fn rewrite_expr(
    expr: Expr,
    inputs: Option<&DFSchema>,
) -> datafusion::error::Result<Transformed<Expr>> {
    match &expr {
        Expr::Cast(Cast { expr: inner, field })
            if field.data_type().is_integer() && may_have_fraction(inner, inputs) =>
        {
            let rounded = Expr::ScalarFunction(ScalarFunction::new_udf(
                ROUND_FOR_INTEGER.clone(),
                vec![inner.as_ref().clone()],
            ));
            Ok(Transformed::yes(Expr::Cast(Cast {
                expr: Box::new(rounded),
                field: field.clone(),
            })))
        }
        Expr::Cast(Cast { expr: inner, field }) if is_binary(field.data_type()) => {
            if let Expr::Literal(
                ScalarValue::Utf8(s) | ScalarValue::Utf8View(s) | ScalarValue::LargeUtf8(s),
                _,
            ) = inner.as_ref()
            {
                let bytes = match s {
                    None => None,
                    Some(s) => Some(parse_bytea(s).ok_or_else(|| {
                        DataFusionError::Execution(format!(
                            "invalid input syntax for type bytea: \"{s}\""
                        ))
                    })?),
                };
                let value = ScalarValue::Binary(bytes).cast_to(field.data_type())?;
                return Ok(Transformed::yes(Expr::Literal(value, None)));
            }
            Ok(Transformed::no(expr))
        }
        _ => Ok(Transformed::no(expr)),
    }
}

/// Whether a cast of `expr` to an integer may need rounding first: not for integer literals,
/// nor for what this rule already rounded, nor for what has a type without fractions over
/// the node's input columns (when they are known).
fn may_have_fraction(expr: &Expr, inputs: Option<&DFSchema>) -> bool {
    match expr {
        Expr::Literal(value, _) => !value.data_type().is_integer() && !value.is_null(),
        Expr::ScalarFunction(f) if f.func.name() == ROUND_NAME => false,
        _ => match inputs.map(|schema| expr.get_type(schema)) {
            Some(Ok(ty)) => matches!(
                ty,
                DataType::Float16
                    | DataType::Float32
                    | DataType::Float64
                    | DataType::Decimal32(_, _)
                    | DataType::Decimal64(_, _)
                    | DataType::Decimal128(_, _)
                    | DataType::Decimal256(_, _)
            ),
            _ => true,
        },
    }
}

const ROUND_NAME: &str = "pg_round_for_integer";

static ROUND_FOR_INTEGER: LazyLock<Arc<ScalarUDF>> =
    LazyLock::new(|| Arc::new(ScalarUDF::new_from_impl(RoundForInteger::default())));

/// Rounds a number to a whole one of the same type, as PostgreSQL does before it makes an
/// integer of it: numeric half away from zero, floats half to even (`rint`). Other types
/// pass through (their cast is DataFusion's).
#[derive(Debug, PartialEq, Eq, Hash)]
struct RoundForInteger {
    signature: Signature,
}

impl Default for RoundForInteger {
    fn default() -> Self {
        Self {
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for RoundForInteger {
    fn name(&self) -> &str {
        ROUND_NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(arg_types.first().cloned().unwrap_or(DataType::Null))
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let Some(arg) = args.args.into_iter().next() else {
            return Err(DataFusionError::Plan(format!(
                "{ROUND_NAME} takes one argument"
            )));
        };
        Ok(match arg {
            ColumnarValue::Array(a) => ColumnarValue::Array(round_whole(&a)?),
            ColumnarValue::Scalar(s) => {
                let rounded = round_whole(&s.to_array()?)?;
                ColumnarValue::Scalar(ScalarValue::try_from_array(&rounded, 0)?)
            }
        })
    }
}

/// [`RoundForInteger`] over an array.
fn round_whole(array: &ArrayRef) -> datafusion::error::Result<ArrayRef> {
    Ok(match array.data_type() {
        DataType::Float64 => Arc::new(
            array
                .as_primitive::<Float64Type>()
                .unary::<_, Float64Type>(f64::round_ties_even),
        ) as ArrayRef,
        DataType::Float32 => Arc::new(
            array
                .as_primitive::<Float32Type>()
                .unary::<_, Float32Type>(f32::round_ties_even),
        ),
        DataType::Decimal128(precision, scale) if *scale > 0 => {
            let unit = 10i128.pow(*scale as u32);
            let values: &Decimal128Array = array.as_primitive();
            // NOTE: wrapping, because `unary` also runs over the slots of NULLs, whose
            // values are arbitrary (a view's rebuild panicked on one); a valid value of 38
            // digits rounds to at most 10^38, far from the i128 limit.
            let rounded: Decimal128Array = values.unary(|v| {
                let whole = v / unit;
                let rest = v % unit;
                let away = if rest.unsigned_abs() >= unit.unsigned_abs().div_ceil(2) {
                    rest.signum()
                } else {
                    0
                };
                whole.wrapping_add(away).wrapping_mul(unit)
            });
            Arc::new(rounded.with_precision_and_scale(*precision, *scale)?)
        }
        _ => array.clone(),
    })
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

/// bytea input: `\x` followed by hex digits, or the text's own bytes.
pub fn parse_bytea(s: &str) -> Option<Vec<u8>> {
    if let Some(hex) = s.strip_prefix("\\x") {
        if hex.len() % 2 != 0 {
            return None;
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect()
    } else {
        Some(s.as_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, PrimitiveArray};

    use super::*;

    #[test]
    fn numbers_round_as_postgresql_rounds_them_into_integers() {
        let floats: ArrayRef = Arc::new(PrimitiveArray::<Float64Type>::from(vec![
            2.5, 3.5, -2.5, -12.61, 0.49,
        ]));
        let rounded = round_whole(&floats).unwrap();
        assert_eq!(
            rounded.as_primitive::<Float64Type>().values().to_vec(),
            vec![2.0, 4.0, -2.0, -13.0, 0.0]
        );
        let numerics: ArrayRef = Arc::new(
            Decimal128Array::from(vec![250, 350, -250, -1261, 49, -1750])
                .with_precision_and_scale(10, 2)
                .unwrap(),
        );
        let rounded = round_whole(&numerics).unwrap();
        let rounded: &Decimal128Array = rounded.as_primitive();
        assert_eq!(
            rounded.values().to_vec(),
            vec![300, 400, -300, -1300, 0, -1800]
        );
        assert!(rounded.is_valid(0));
    }

    #[test]
    fn bytea_hex_literals() {
        assert_eq!(parse_bytea("\\x0aff"), Some(vec![10, 255]));
        assert_eq!(parse_bytea("\\x0"), None);
        assert_eq!(parse_bytea("\\xzz"), None);
        assert_eq!(parse_bytea("ab"), Some(b"ab".to_vec()));
    }
}
