//! `avg` of integers as PostgreSQL computes it: an exact numeric, not a float.
//!
//! DataFusion's `avg` coerces integers to `Float64`, so `CAST(avg(i) AS INT)` of an average
//! of exactly 8.5 answered 8 (a float's cast rounds half to even) where PostgreSQL, whose
//! `avg(int)` is numeric, answers 9 (random SQL seed 32 query 3790). This wrapper coerces
//! integer arguments to a decimal of scale [`INPUT_SCALE`] instead, so DataFusion's decimal
//! average (sum and count, retractable, with a groups accumulator) computes it, at scale 16:
//! the scale PostgreSQL prints an average between 1 and 10,000 with
//! (`avg(1, 2)` is `1.5000000000000000` on both). Everything else is DataFusion's `avg` (same
//! name and accumulators, so the incremental planner's view of it is unchanged). Registered
//! on every session by [`crate::pg_functions::register`].

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::{Result, ScalarValue, plan_err};
use datafusion::logical_expr::expr::AggregateFunctionParams;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, GroupsAccumulator, ReversedUDAF, Signature,
    Volatility,
};
use datafusion::prelude::SessionContext;

/// The scale integers are averaged at; DataFusion's average adds 4 to it.
const INPUT_SCALE: i8 = 12;

/// DataFusion's `avg`, with integers averaged as numerics.
#[derive(Debug, PartialEq, Eq, Hash)]
struct NumericAvg {
    inner: Arc<AggregateUDF>,
    signature: Signature,
}

/// The type `avg` takes an argument of type `t` as: integers become decimals wide enough
/// for every value at [`INPUT_SCALE`], floats are `Float64`, decimals and durations are
/// themselves.
fn coerced(t: &DataType) -> Result<DataType> {
    let digits: u8 = match t {
        DataType::Int8 | DataType::UInt8 | DataType::Int16 => 5,
        DataType::UInt16 | DataType::Int32 => 10,
        DataType::UInt32 | DataType::Int64 => 19,
        DataType::UInt64 => 20,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Null => {
            return Ok(DataType::Float64);
        }
        DataType::Decimal32(..)
        | DataType::Decimal64(..)
        | DataType::Decimal128(..)
        | DataType::Decimal256(..)
        | DataType::Duration(_) => return Ok(t.clone()),
        other => return plan_err!("function avg({other}) does not exist"),
    };
    Ok(DataType::Decimal128(
        digits + INPUT_SCALE as u8,
        INPUT_SCALE,
    ))
}

impl AggregateUDFImpl for NumericAvg {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }
    fn schema_name(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner.inner().schema_name(params)
    }
    fn display_name(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner.inner().display_name(params)
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }
    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        self.inner.return_field(arg_fields)
    }
    fn is_nullable(&self) -> bool {
        self.inner.is_nullable()
    }
    fn accumulator(&self, acc_args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.inner.accumulator(acc_args)
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        self.inner.state_fields(args)
    }
    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.inner.groups_accumulator_supported(args)
    }
    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        self.inner.create_groups_accumulator(args)
    }
    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.inner.create_sliding_accumulator(args)
    }
    fn reverse_expr(&self) -> ReversedUDAF {
        // NOTE: an average is the same over its input reversed.
        ReversedUDAF::Identical
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [t] => Ok(vec![coerced(t)?]),
            _ => plan_err!("avg takes one argument, not {}", arg_types.len()),
        }
    }
    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        self.inner.default_value(data_type)
    }
}

/// Replaces DataFusion's `avg` on `ctx` with the numeric one.
pub fn register(ctx: &SessionContext) {
    if let Some(inner) = ctx.state().aggregate_functions().get("avg").cloned() {
        ctx.register_udaf(AggregateUDF::new_from_impl(NumericAvg {
            inner,
            signature: Signature::user_defined(Volatility::Immutable),
        }));
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::prelude::SessionContext;

    /// The first row's columns of `sql` as text.
    async fn row(sql: &str) -> Vec<String> {
        let ctx = SessionContext::new();
        super::register(&ctx);
        // NOTE: PostgreSQL's rounding of a numeric cast to an integer.
        ctx.add_analyzer_rule(std::sync::Arc::new(crate::pg_casts::PgCasts));
        let batches = ctx
            .sql(sql)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        (0..batches[0].num_columns())
            .map(|c| {
                let col = batches[0].column(c);
                let col =
                    datafusion::arrow::compute::cast(col, &super::DataType::Utf8).expect("text");
                assert!(!col.is_null(0));
                col.as_string::<i32>().value(0).to_string()
            })
            .collect()
    }

    #[tokio::test]
    async fn integers_average_exactly() {
        let got = row(
            "SELECT avg(i) AS a, CAST(avg(i) AS INT) AS c, avg(b) AS b, avg(f) AS f \
             FROM (VALUES (CAST(8 AS INT), CAST(9000000000000000000 AS BIGINT), 0.5::double), \
                          (CAST(9 AS INT), CAST(9000000000000000001 AS BIGINT), 1.0::double)) \
                  AS t(i, b, f)",
        )
        .await;
        assert_eq!(
            got,
            vec![
                "8.5000000000000000",
                "9",
                "9000000000000000000.5000000000000000",
                "0.75",
            ]
        );
        let window = row("SELECT avg(i) OVER (ORDER BY i ROWS 1 PRECEDING) AS w \
             FROM (VALUES (1), (2), (4)) AS t(i) ORDER BY i DESC")
        .await;
        assert_eq!(window, vec!["3.0000000000000000"]);
    }
}
