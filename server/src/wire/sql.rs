//! Turning query text into statements: PostgreSQL parsing, with the pg_catalog compatibility
//! rewrites applied only to statements that read the system catalogs (psql's `\d` and BI
//! tools' introspection), so user queries keep exact PostgreSQL semantics.

use std::sync::LazyLock;

use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;

use crate::error::{Result, ServerError};

static COMPAT: LazyLock<PostgresCompatibilityParser> =
    LazyLock::new(PostgresCompatibilityParser::new);

/// Words that mark a statement as system-catalog introspection.
const CATALOG_MARKERS: &[&str] = &[
    "pg_catalog",
    "pg_class",
    "pg_namespace",
    "pg_type",
    "pg_attribute",
    "pg_database",
    "pg_roles",
    "pg_proc",
    "information_schema",
    "pg_get_",
    "pg_settings",
    "pg_index",
    "pg_constraint",
    "pg_am",
    "pg_description",
    "pg_user",
    "pg_tables",
    "pg_views",
];

/// Statements FLUSH-like that we accept as no-ops before parsing (RisingWave compatibility).
fn no_op_command(sql: &str) -> Option<&'static str> {
    let s = sql.trim().trim_end_matches(';').trim();
    if s.eq_ignore_ascii_case("flush") {
        Some("FLUSH")
    } else {
        None
    }
}

/// A unit of work from the query text.
#[derive(Debug, Clone)]
pub enum Parsed {
    /// A parsed statement, with output columns to rename back after it runs.
    Statement(Box<Statement>, Vec<(usize, String)>),
    /// A no-op command answered with the given tag.
    NoOp(&'static str),
}

/// Parses query text into statements.
pub fn parse(sql: &str) -> Result<Vec<Parsed>> {
    if let Some(tag) = no_op_command(sql) {
        return Ok(vec![Parsed::NoOp(tag)]);
    }
    let lower = sql.to_ascii_lowercase();
    let statements = if CATALOG_MARKERS.iter().any(|m| lower.contains(m)) {
        COMPAT.parse(sql)?
    } else {
        Parser::parse_sql(&PostgreSqlDialect {}, sql)?
    };
    Ok(statements
        .into_iter()
        .map(|s| {
            let r = millrace_planner::rewrite::rewrite(s);
            Parsed::Statement(Box::new(r.statement), r.renames)
        })
        .collect())
}

/// Parses text expected to hold at most one statement (extended protocol).
pub fn parse_single(sql: &str) -> Result<Option<Parsed>> {
    let mut all = parse(sql)?;
    if all.len() > 1 {
        return Err(ServerError::Syntax(
            "cannot insert multiple commands into a prepared statement".into(),
        ));
    }
    Ok(all.pop())
}
