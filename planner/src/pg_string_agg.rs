//! `string_agg(x, d ORDER BY o)` beside other ordered aggregates, as PostgreSQL runs them.
//!
//! DataFusion's `string_agg` declares its ORDER BY a hard requirement on its input's order,
//! so a SELECT with two of them over different orders (`string_agg(a, ',' ORDER BY a)`,
//! `string_agg(b, ',' ORDER BY b)`) was refused ("Conflicting ordering requirements in
//! aggregate functions is not supported"). Its ordered accumulator is `array_agg`'s, which
//! sorts what it gathered whatever order it came in, so the requirement is a soft one: this
//! wrapper says so, and otherwise is DataFusion's `string_agg` (same name, same accumulators,
//! so the incremental planner's view of it is unchanged). Registered on every session by
//! [`crate::pg_functions::register`].

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::expr::AggregateFunctionParams;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, GroupsAccumulator, ReversedUDAF, Signature,
};
use datafusion::prelude::SessionContext;

/// DataFusion's `string_agg` with its ORDER BY a soft requirement.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SoftStringAgg {
    inner: Arc<AggregateUDF>,
}

impl AggregateUDFImpl for SoftStringAgg {
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
        self.inner.signature()
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
    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        match self.inner.order_sensitivity() {
            AggregateOrderSensitivity::HardRequirement => {
                AggregateOrderSensitivity::SoftRequirement
            }
            other => other,
        }
    }
    fn with_beneficial_ordering(
        self: Arc<Self>,
        _beneficial_ordering: bool,
    ) -> Result<Option<Arc<dyn AggregateUDFImpl>>> {
        // NOTE: the ordered accumulator sorts whether or not its input came sorted.
        Ok(Some(self))
    }
    fn reverse_expr(&self) -> ReversedUDAF {
        match self.inner.reverse_udf() {
            ReversedUDAF::Reversed(udf) => {
                ReversedUDAF::Reversed(Arc::new(AggregateUDF::new_from_impl(SoftStringAgg {
                    inner: udf,
                })))
            }
            other => other,
        }
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }
    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        self.inner.default_value(data_type)
    }
    fn supports_null_handling_clause(&self) -> bool {
        self.inner.supports_null_handling_clause()
    }
    fn is_descending(&self) -> Option<bool> {
        self.inner.is_descending()
    }
}

/// Replaces DataFusion's `string_agg` on `ctx` with the soft-ordered one.
pub fn register(ctx: &SessionContext) {
    if let Some(inner) = ctx.state().aggregate_functions().get("string_agg").cloned() {
        ctx.register_udaf(AggregateUDF::new_from_impl(SoftStringAgg { inner }));
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn two_orders_in_one_select() {
        let ctx = SessionContext::new();
        super::register(&ctx);
        let batches = ctx
            .sql(
                "SELECT string_agg(a, ',' ORDER BY a), string_agg(b, ',' ORDER BY b DESC), \
                 string_agg(a, ',' ORDER BY b) \
                 FROM (VALUES ('x', 'p'), ('z', 'q'), ('y', 'r')) AS t(a, b)",
            )
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        let row: Vec<String> = (0..3)
            .map(|c| {
                let col = batches[0].column(c);
                let col =
                    datafusion::arrow::compute::cast(col, &super::DataType::Utf8).expect("text");
                assert!(!col.is_null(0));
                col.as_string::<i32>().value(0).to_string()
            })
            .collect();
        assert_eq!(row, vec!["x,y,z", "r,q,p", "x,z,y"]);
    }
}
