//! SQL functions PostgreSQL clients expect that DataFusion and pg_catalog lack.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
use datafusion::prelude::SessionContext;

/// The text `version()` returns; drivers parse the leading "PostgreSQL 15.0".
pub const VERSION_TEXT: &str = concat!(
    "PostgreSQL 15.0 (Millrace ",
    env!("CARGO_PKG_VERSION"),
    ") on x86_64-pc-linux-gnu, compiled by rustc, 64-bit"
);

/// Registers Millrace's extra functions on a session context.
pub fn register(ctx: &SessionContext) {
    ctx.register_udf(create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(|_args: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(
                VERSION_TEXT.to_string(),
            ))))
        }),
    ));
}
