//! `NULLIF(a, b)` answering `a` at `a`'s own scale, as PostgreSQL prints it.
//!
//! PostgreSQL's numeric carries a scale per value: `NULLIF(98, avg(x))` is numeric, and its
//! value, 98 converted from an integer, prints as `98`. DataFusion's `nullif` converts both
//! arguments to their common type, so the integer came out at the average's scale
//! (`98.0000000000000000`). This `nullif` converts its first argument only as far as the
//! comparison's type family needs (an integer to a decimal of scale 0, where the other side
//! is a decimal; a decimal stays itself), compares both in their common type, and answers
//! the first as converted. Registered on every session by [`crate::pg_functions::register`].

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef};
use datafusion::arrow::compute::{cast, nullif};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, ScalarValue, plan_err};
use datafusion::logical_expr::type_coercion::binary::comparison_coercion;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr_common::datum::compare_with_eq;
use datafusion::prelude::SessionContext;

/// `nullif`, keeping its first argument's scale.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ScaledNullIf {
    signature: Signature,
}

/// Decimal digits an integer type needs.
fn integer_digits(t: &DataType) -> Option<u8> {
    Some(match t {
        DataType::Int8 | DataType::UInt8 => 3,
        DataType::Int16 | DataType::UInt16 => 5,
        DataType::Int32 | DataType::UInt32 => 10,
        DataType::Int64 => 19,
        DataType::UInt64 => 20,
        _ => return None,
    })
}

/// The types `nullif` takes arguments of types `a` and `b` as.
fn coerced(a: &DataType, b: &DataType) -> Result<[DataType; 2]> {
    let Some(common) = comparison_coercion(a, b) else {
        return plan_err!("For function 'nullif' {a} and {b} is not comparable");
    };
    if common.is_null() {
        return Ok([DataType::Utf8, DataType::Utf8]);
    }
    let first = match (&common, a) {
        (DataType::Decimal128(..), DataType::Decimal128(..)) => a.clone(),
        (DataType::Decimal128(..), _) => match integer_digits(a) {
            Some(digits) => DataType::Decimal128(digits, 0),
            None => common.clone(),
        },
        _ => common.clone(),
    };
    Ok([first, common])
}

impl ScalarUDFImpl for ScaledNullIf {
    fn name(&self) -> &str {
        "nullif"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [a, b] => Ok(coerced(a, b)?.to_vec()),
            _ => plan_err!("nullif takes two arguments, not {}", arg_types.len()),
        }
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types.first() {
            Some(t) => Ok(t.clone()),
            None => plan_err!("nullif takes two arguments"),
        }
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [lhs, rhs] = match <[ColumnarValue; 2]>::try_from(args.args) {
            Ok(pair) => pair,
            Err(_) => return plan_err!("nullif takes two arguments"),
        };
        let scalar = matches!(
            (&lhs, &rhs),
            (ColumnarValue::Scalar(_), ColumnarValue::Scalar(_))
        );
        let rows = if scalar { 1 } else { args.number_rows };
        let first = lhs.into_array(rows)?;
        let second = rhs.into_array(rows)?;
        let (left, right) = if first.data_type() == second.data_type() {
            (Arc::clone(&first), second)
        } else {
            let Some(common) = comparison_coercion(first.data_type(), second.data_type()) else {
                return plan_err!(
                    "For function 'nullif' {} and {} is not comparable",
                    first.data_type(),
                    second.data_type()
                );
            };
            (cast(&first, &common)?, cast(&second, &common)?)
        };
        let equal = compare_with_eq(&left, &right, left.data_type().is_nested())?;
        let answer: ArrayRef = nullif(first.as_ref(), &equal)?;
        Ok(if scalar {
            ColumnarValue::Scalar(ScalarValue::try_from_array(&answer, 0)?)
        } else {
            ColumnarValue::Array(answer)
        })
    }
}

/// Replaces DataFusion's `nullif` on `ctx` with the scale-keeping one.
pub fn register(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::new_from_impl(ScaledNullIf {
        signature: Signature::user_defined(Volatility::Immutable),
    }));
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::DataType;
    use datafusion::prelude::SessionContext;

    /// The one column of `sql`, as text (NULL as "NULL").
    async fn column(sql: &str) -> Vec<String> {
        // NOTE: `97.5` a numeric, as the server parses it.
        let mut config = datafusion::prelude::SessionConfig::new();
        config.options_mut().sql_parser.parse_float_as_decimal = true;
        let ctx = SessionContext::new_with_config(config);
        super::register(&ctx);
        crate::pg_avg::register(&ctx);
        let batches = ctx
            .sql(sql)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        let mut out = Vec::new();
        for batch in batches {
            let col =
                datafusion::arrow::compute::cast(batch.column(0), &DataType::Utf8).expect("text");
            let col = col.as_string::<i32>();
            out.extend((0..col.len()).map(|i| {
                if col.is_null(i) {
                    "NULL".to_string()
                } else {
                    col.value(i).to_string()
                }
            }));
        }
        out
    }

    #[tokio::test]
    async fn keeps_the_first_arguments_scale() {
        assert_eq!(column("SELECT NULLIF(98, avg(13)) AS n").await, vec!["98"]);
        assert_eq!(
            column("SELECT NULLIF(13, avg(13)) AS n").await,
            vec!["NULL"]
        );
        // NOTE: compared exactly: 97.5 is not 98.
        assert_eq!(
            column(
                "SELECT NULLIF(i, 97.5) AS n FROM (VALUES (97), (98), (NULL)) AS t(i) ORDER BY i"
            )
            .await,
            vec!["97", "98", "NULL"]
        );
        assert_eq!(
            column("SELECT NULLIF(1.50, i) AS n FROM (VALUES (1), (2)) AS t(i)").await,
            vec!["1.50", "1.50"]
        );
        assert_eq!(
            column("SELECT NULLIF('a', s) AS n FROM (VALUES ('a'), ('b')) AS t(s)").await,
            vec!["NULL", "a"]
        );
    }
}
