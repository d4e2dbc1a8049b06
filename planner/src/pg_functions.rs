//! SQL functions PostgreSQL clients expect that DataFusion and pg_catalog lack.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, create_udf,
};
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

/// The name PostgreSQL's `format_type` gives the type a value of `ty` has in Millrace.
pub fn pg_type_name(ty: &DataType) -> String {
    match ty {
        DataType::Null => "unknown".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => "smallint".into(),
        DataType::Int32 | DataType::UInt16 => "integer".into(),
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => "bigint".into(),
        DataType::Float16 | DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Decimal32(..)
        | DataType::Decimal64(..)
        | DataType::Decimal128(..)
        | DataType::Decimal256(..) => "numeric".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "bytea".into(),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Time32(_) | DataType::Time64(_) => "time without time zone".into(),
        DataType::Timestamp(_, None) => "timestamp without time zone".into(),
        DataType::Timestamp(_, Some(_)) => "timestamp with time zone".into(),
        DataType::Interval(_) | DataType::Duration(_) => "interval".into(),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            format!("{}[]", pg_type_name(f.data_type()))
        }
        DataType::Dictionary(_, value) => pg_type_name(value),
        _ => "unknown".into(),
    }
}

/// `pg_typeof(any)`: the name of its argument's type.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PgTypeof {
    /// Any one argument.
    signature: Signature,
}

impl ScalarUDFImpl for PgTypeof {
    fn name(&self) -> &str {
        "pg_typeof"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let name = args.arg_fields.first().map(|f| pg_type_name(f.data_type()));
        Ok(ColumnarValue::Scalar(ScalarValue::Utf8(name)))
    }
}

/// `pg_cast_tag(value, 'type')`: `value`. The SQL rewrite (rewrite.rs) wraps a cast
/// inside an aggregate's arguments in it, so that the aggregate's name says the type cast to:
/// DataFusion names a cast after its operand alone, and `min(CAST(x AS TEXT))` beside
/// `min(x)` or `min(CAST(x AS NUMERIC))` were aggregates of one name, which it refused.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PgCastTag {
    /// The value and the type's name.
    signature: Signature,
}

impl ScalarUDFImpl for PgCastTag {
    fn name(&self) -> &str {
        CAST_TAG
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> datafusion::error::Result<DataType> {
        args.first().cloned().ok_or_else(|| {
            datafusion::error::DataFusionError::Plan(format!("{CAST_TAG} takes a value"))
        })
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        args.args.into_iter().next().ok_or_else(|| {
            datafusion::error::DataFusionError::Execution(format!("{CAST_TAG} takes a value"))
        })
    }
}

/// The name of [`PgCastTag`], for the SQL rewrite.
pub const CAST_TAG: &str = "pg_cast_tag";

/// Registers Millrace's extra functions on a session context.
pub fn register(ctx: &SessionContext) {
    crate::pg_window::register(ctx);
    crate::pg_string_agg::register(ctx);
    crate::pg_avg::register(ctx);
    crate::pg_nullif::register(ctx);
    ctx.register_udf(ScalarUDF::new_from_impl(PgCastTag {
        signature: Signature::any(2, Volatility::Immutable),
    }));
    ctx.register_udf(ScalarUDF::new_from_impl(PgTypeof {
        signature: Signature::any(1, Volatility::Immutable),
    }));
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
