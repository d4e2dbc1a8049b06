//! PostgreSQL cast semantics DataFusion lacks, as an analyzer rule: a text literal cast to
//! `bytea` is read as PostgreSQL reads it (`'\x0102'` is two bytes, not six characters).

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::logical_expr::{Cast, Expr, LogicalPlan};
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
            node.map_expressions(|expr| expr.transform_up(rewrite_expr))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "millrace_pg_casts"
    }
}

fn rewrite_expr(expr: Expr) -> datafusion::error::Result<Transformed<Expr>> {
    match &expr {
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
    use super::*;

    #[test]
    fn bytea_hex_literals() {
        assert_eq!(parse_bytea("\\x0aff"), Some(vec![10, 255]));
        assert_eq!(parse_bytea("\\x0"), None);
        assert_eq!(parse_bytea("\\xzz"), None);
        assert_eq!(parse_bytea("ab"), Some(b"ab".to_vec()));
    }
}
