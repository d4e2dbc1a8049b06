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

/// Built-in type names and their PostgreSQL oids, for `to_regtype`.
const TYPE_OIDS: &[(&str, i32)] = &[
    ("bool", 16),
    ("boolean", 16),
    ("bytea", 17),
    ("int8", 20),
    ("bigint", 20),
    ("int2", 21),
    ("smallint", 21),
    ("int4", 23),
    ("integer", 23),
    ("int", 23),
    ("text", 25),
    ("oid", 26),
    ("json", 114),
    ("float4", 700),
    ("real", 700),
    ("float8", 701),
    ("double precision", 701),
    ("varchar", 1043),
    ("character varying", 1043),
    ("date", 1082),
    ("time", 1083),
    ("timestamp", 1114),
    ("timestamptz", 1184),
    ("timestamp with time zone", 1184),
    ("interval", 1186),
    ("numeric", 1700),
    ("decimal", 1700),
    ("uuid", 2950),
    ("jsonb", 3802),
];

/// `to_regtype(name)`: the type's oid, or NULL when there is no such type (drivers probe
/// for optional types such as hstore this way).
fn to_regtype(args: &[ColumnarValue]) -> datafusion::error::Result<ColumnarValue> {
    let lookup = |name: Option<&str>| -> Option<i32> {
        let name = name?
            .trim()
            .trim_start_matches("pg_catalog.")
            .to_ascii_lowercase();
        TYPE_OIDS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, oid)| *oid)
    };
    match args.first() {
        Some(ColumnarValue::Scalar(ScalarValue::Utf8(v))) => Ok(ColumnarValue::Scalar(
            ScalarValue::Int32(lookup(v.as_deref())),
        )),
        Some(ColumnarValue::Array(a)) => {
            let strings = datafusion::arrow::compute::cast(a, &DataType::Utf8)?;
            let strings = datafusion::common::cast::as_string_array(&strings)?;
            let out: datafusion::arrow::array::Int32Array = strings.iter().map(lookup).collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }
        _ => Ok(ColumnarValue::Scalar(ScalarValue::Int32(None))),
    }
}

/// Registers Millrace's extra functions on a session context.
pub fn register(ctx: &SessionContext) {
    ctx.register_udf(create_udf(
        "to_regtype",
        vec![DataType::Utf8],
        DataType::Int32,
        Volatility::Stable,
        Arc::new(to_regtype),
    ));
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
