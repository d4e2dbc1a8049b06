//! Ranking window functions typed as PostgreSQL types them: `row_number()`, `rank()`,
//! `dense_rank()` and `ntile()` return `bigint`, where DataFusion's return an unsigned 64-bit
//! integer. The unsigned type leaked into type coercion: a UNION of `rank()` with a bigint
//! column, or a CASE with a negative branch, was coerced to unsigned and the negatives became
//! NULL. Each function here wraps DataFusion's own (same name, same evaluator, so its planning,
//! bounded execution and the incremental planner's recognition stay as they were) and casts
//! what the evaluator returns to `Int64`. Registered on every session by
//! [`crate::pg_functions::register`].

use std::ops::Range;
use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::window_state::WindowAggState;
use datafusion::logical_expr::{
    LimitEffect, PartitionEvaluator, ReversedUDWF, Signature, WindowUDF, WindowUDFImpl,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;

/// A DataFusion window function whose unsigned result is returned as `bigint`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SignedWindow {
    inner: Arc<WindowUDF>,
}

impl WindowUDFImpl for SignedWindow {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }
    fn signature(&self) -> &Signature {
        self.inner.signature()
    }
    fn expressions(
        &self,
        expr_args: datafusion::logical_expr::function::ExpressionArgs,
    ) -> Vec<Arc<dyn PhysicalExpr>> {
        self.inner.expressions(expr_args)
    }
    fn partition_evaluator(
        &self,
        args: PartitionEvaluatorArgs,
    ) -> Result<Box<dyn PartitionEvaluator>> {
        Ok(Box::new(SignedEvaluator {
            inner: self.inner.partition_evaluator_factory(args)?,
        }))
    }
    fn field(&self, field_args: WindowUDFFieldArgs) -> Result<FieldRef> {
        let field = self.inner.field(field_args)?;
        Ok(Arc::new(Field::new(
            field.name(),
            signed(field.data_type()),
            field.is_nullable(),
        )))
    }
    fn sort_options(&self) -> Option<datafusion::arrow::compute::SortOptions> {
        self.inner.sort_options()
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }
    fn reverse_expr(&self) -> ReversedUDWF {
        match self.inner.reverse_expr() {
            ReversedUDWF::Reversed(udf) => {
                ReversedUDWF::Reversed(Arc::new(WindowUDF::new_from_impl(SignedWindow {
                    inner: udf,
                })))
            }
            other => other,
        }
    }
    fn limit_effect(&self, args: &[Arc<dyn PhysicalExpr>]) -> LimitEffect {
        self.inner.inner().limit_effect(args)
    }
}

/// `UInt64` becomes `Int64`; every other type stays.
fn signed(t: &DataType) -> DataType {
    match t {
        DataType::UInt64 => DataType::Int64,
        other => other.clone(),
    }
}

fn signed_array(a: ArrayRef) -> Result<ArrayRef> {
    match a.data_type() {
        DataType::UInt64 => Ok(cast(&a, &DataType::Int64)?),
        _ => Ok(a),
    }
}

fn signed_scalar(v: ScalarValue) -> Result<ScalarValue> {
    match v {
        ScalarValue::UInt64(n) => Ok(ScalarValue::Int64(
            n.map(|n| {
                i64::try_from(n).map_err(|_| {
                    datafusion::error::DataFusionError::Execution("bigint out of range".to_string())
                })
            })
            .transpose()?,
        )),
        other => Ok(other),
    }
}

/// DataFusion's evaluator, its results made signed.
#[derive(Debug)]
struct SignedEvaluator {
    inner: Box<dyn PartitionEvaluator>,
}

impl PartitionEvaluator for SignedEvaluator {
    fn memoize(&mut self, state: &mut WindowAggState) -> Result<()> {
        self.inner.memoize(state)
    }
    fn get_range(&self, idx: usize, n_rows: usize) -> Result<Range<usize>> {
        self.inner.get_range(idx, n_rows)
    }
    fn is_causal(&self) -> bool {
        self.inner.is_causal()
    }
    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> Result<ArrayRef> {
        signed_array(self.inner.evaluate_all(values, num_rows)?)
    }
    fn evaluate(&mut self, values: &[ArrayRef], range: &Range<usize>) -> Result<ScalarValue> {
        signed_scalar(self.inner.evaluate(values, range)?)
    }
    fn evaluate_all_with_rank(
        &self,
        num_rows: usize,
        ranks_in_partition: &[Range<usize>],
    ) -> Result<ArrayRef> {
        signed_array(
            self.inner
                .evaluate_all_with_rank(num_rows, ranks_in_partition)?,
        )
    }
    fn supports_bounded_execution(&self) -> bool {
        self.inner.supports_bounded_execution()
    }
    fn uses_window_frame(&self) -> bool {
        self.inner.uses_window_frame()
    }
    fn include_rank(&self) -> bool {
        self.inner.include_rank()
    }
}

/// Replaces DataFusion's ranking window functions on `ctx` with their `bigint` versions.
pub fn register(ctx: &SessionContext) {
    for name in ["row_number", "rank", "dense_rank", "ntile"] {
        if let Some(inner) = ctx.state().window_functions().get(name).cloned() {
            ctx.register_udwf(WindowUDF::new_from_impl(SignedWindow { inner }));
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn ranks_are_bigint_and_a_union_with_negatives_keeps_them() {
        let ctx = SessionContext::new();
        super::register(&ctx);
        let sql = "SELECT rank() OVER (ORDER BY x) AS r FROM (VALUES (1), (2)) AS t(x) \
                   UNION ALL SELECT CAST(-7 AS BIGINT) ORDER BY r";
        let batches = ctx
            .sql(sql)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        let mut got = Vec::new();
        for b in &batches {
            let col = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("bigint column");
            got.extend(col.iter());
        }
        assert_eq!(got, vec![Some(-7), Some(1), Some(2)]);
    }

    #[tokio::test]
    async fn every_ranking_function_is_bigint() {
        let ctx = SessionContext::new();
        super::register(&ctx);
        let df = ctx
            .sql(
                "SELECT row_number() OVER () a, rank() OVER (ORDER BY x) b, \
                 dense_rank() OVER (ORDER BY x) c, ntile(2) OVER (ORDER BY x) d \
                 FROM (VALUES (3), (1), (3)) AS t(x)",
            )
            .await
            .expect("plan");
        for f in df.schema().fields() {
            assert_eq!(
                f.data_type(),
                &datafusion::arrow::datatypes::DataType::Int64
            );
        }
        let rows = df.collect().await.expect("run");
        let n: usize = rows.iter().map(|b| b.num_rows()).sum();
        assert_eq!(n, 3);
    }
}
