//! Turning query text into statements: PostgreSQL parsing, with the pg_catalog compatibility
//! rewrites applied only to statements that read the system catalogs (psql's `\d` and BI
//! tools' introspection), so user queries keep exact PostgreSQL semantics.

use std::sync::LazyLock;

use datafusion::sql::sqlparser::ast::{ObjectName, Statement};
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
    /// `SUBSCRIBE [TO] view`, or `COPY (SUBSCRIBE [TO] view) TO STDOUT`: a live feed.
    Subscribe(ObjectName),
}

/// Quotes dotted option keys (`WITH (scan.startup.mode = 'earliest')`, as RisingWave writes
/// connector options), which the SQL parser takes only as quoted identifiers. A key is a
/// dotted word right after `(` or `,` and right before `=`, outside string literals.
fn quote_dotted_option_keys(sql: &str) -> String {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len() + 8);
    let mut i = 0;
    let mut in_string = false;
    let mut after_separator = false;
    while i < chars.len() {
        let c = chars[i];
        if in_string {
            out.push(c);
            in_string = c != '\'';
            i += 1;
            continue;
        }
        if after_separator && (c.is_ascii_alphabetic() || c == '_') {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if word.contains('.') && next == Some(&'=') {
                out.push('"');
                out.push_str(&word);
                out.push('"');
            } else {
                out.push_str(&word);
            }
            after_separator = false;
            continue;
        }
        match c {
            '\'' => in_string = true,
            '(' | ',' => after_separator = true,
            c if c.is_whitespace() => {}
            _ => after_separator = false,
        }
        out.push(c);
        i += 1;
    }
    out
}

/// The view of a `SUBSCRIBE` command, in either of its spellings; `None` for other text.
fn subscribe_command(sql: &str) -> Option<Result<ObjectName>> {
    let mut s = sql.trim().trim_end_matches(';').trim();
    let lower = s.to_ascii_lowercase();
    if let Some(open) = lower.strip_prefix("copy") {
        let inner_lower = open.trim_start().strip_prefix('(')?.trim_start();
        if !inner_lower.starts_with("subscribe") {
            return None;
        }
        let close = lower.rfind(')')?;
        let tail = lower[close + 1..].split_whitespace().collect::<Vec<_>>();
        if tail != ["to", "stdout"] {
            return Some(Err(ServerError::NotSupported(
                "COPY (SUBSCRIBE ...) to anything but STDOUT".into(),
            )));
        }
        let start = lower.find('(')? + 1;
        s = s[start..close].trim();
    }
    let lower = s.to_ascii_lowercase();
    let rest = lower.strip_prefix("subscribe")?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let mut name = s["subscribe".len()..].trim_start();
    if let Some(after) = name.get(..3).filter(|to| to.eq_ignore_ascii_case("to ")) {
        name = name[after.len()..].trim_start();
    }
    if name.starts_with('(') {
        return Some(Err(ServerError::NotSupported(
            "SUBSCRIBE to a query; create a materialized view and subscribe to it".into(),
        )));
    }
    Some(
        Parser::new(&PostgreSqlDialect {})
            .try_with_sql(name)
            .and_then(|mut p| p.parse_object_name(false))
            .map_err(ServerError::from),
    )
}

/// Parses query text into statements.
pub fn parse(sql: &str) -> Result<Vec<Parsed>> {
    if let Some(tag) = no_op_command(sql) {
        return Ok(vec![Parsed::NoOp(tag)]);
    }
    if let Some(view) = subscribe_command(sql) {
        return Ok(vec![Parsed::Subscribe(view?)]);
    }
    let quoted;
    let sql = if sql
        .trim_start()
        .get(..6)
        .is_some_and(|w| w.eq_ignore_ascii_case("create"))
    {
        quoted = quote_dotted_option_keys(sql);
        quoted.as_str()
    } else {
        sql
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn view_of(sql: &str) -> Option<String> {
        subscribe_command(sql).map(|r| r.map(|n| n.to_string()).unwrap_or_else(|e| e.to_string()))
    }

    #[test]
    fn subscribe_spellings_name_the_view() {
        assert_eq!(
            view_of("SUBSCRIBE TO top_urls;").as_deref(),
            Some("top_urls")
        );
        assert_eq!(view_of("subscribe s.v").as_deref(), Some("s.v"));
        assert_eq!(
            view_of("COPY (SUBSCRIBE TO v) TO STDOUT").as_deref(),
            Some("v")
        );
        assert_eq!(view_of("COPY t TO STDOUT"), None);
        assert_eq!(view_of("SELECT subscribe FROM t"), None);
        assert_eq!(view_of("subscriber"), None);
    }

    #[test]
    fn dotted_option_keys_are_quoted() {
        assert_eq!(
            quote_dotted_option_keys(
                "CREATE TABLE t (a INT, b TEXT) WITH (connector = 'datagen', fields.a.kind = 'x.y = z', rows_per_second = 5)"
            ),
            "CREATE TABLE t (a INT, b TEXT) WITH (connector = 'datagen', \"fields.a.kind\" = 'x.y = z', rows_per_second = 5)"
        );
    }

    #[test]
    fn subscribe_to_a_query_or_a_file_is_refused() {
        assert!(matches!(
            subscribe_command("SUBSCRIBE TO (SELECT 1)"),
            Some(Err(ServerError::NotSupported(_)))
        ));
        assert!(matches!(
            subscribe_command("COPY (SUBSCRIBE v) TO '/tmp/x'"),
            Some(Err(ServerError::NotSupported(_)))
        ));
    }
}
