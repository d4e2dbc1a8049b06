//! Turning query text into statements: PostgreSQL parsing, with the pg_catalog compatibility
//! rewrites applied only to statements that read the system catalogs (psql's `\d` and BI
//! tools' introspection), so user queries keep exact PostgreSQL semantics; and folding names
//! as PostgreSQL does. It sits under the statement code (`exec/`) and the connectors.

use std::sync::LazyLock;

use datafusion::sql::sqlparser::ast::{Ident, ObjectName, SqlOption, Statement};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::Token;
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

/// Statements without arguments recognised before parsing: FLUSH (RisingWave
/// compatibility) and CHECKPOINT (PostgreSQL).
fn no_op_command(sql: &str) -> Option<&'static str> {
    let s = sql.trim().trim_end_matches(';').trim();
    if s.eq_ignore_ascii_case("flush") {
        Some("FLUSH")
    } else if s.eq_ignore_ascii_case("checkpoint") {
        Some("CHECKPOINT")
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
    /// `SUBSCRIBE [TO] view | (query)`, or `COPY (SUBSCRIBE ...) TO STDOUT`: a live feed.
    Subscribe(SubscribeTarget),
    /// `CREATE SINK [IF NOT EXISTS] name FROM view WITH (...) [FORMAT ...]`.
    CreateSink(Box<CreateSink>),
    /// `DROP SINK [IF EXISTS] name`.
    DropSink {
        /// The sink.
        name: ObjectName,
        /// No error when it does not exist.
        if_exists: bool,
    },
}

/// What a SUBSCRIBE follows.
#[derive(Debug, Clone)]
pub enum SubscribeTarget {
    /// A materialized view.
    View(ObjectName),
    /// A query, maintained by a view that lives as long as the subscription.
    Query(String),
}

/// A parsed `CREATE SINK`.
#[derive(Debug, Clone)]
pub struct CreateSink {
    /// The sink's name.
    pub name: ObjectName,
    /// The view it reads.
    pub from: ObjectName,
    /// Its connector options (`format` included).
    pub options: Vec<SqlOption>,
    /// No error when it exists.
    pub if_not_exists: bool,
}

/// The source option that marks a connector table made by `CREATE SOURCE`.
pub const SOURCE_MARKER: &str = "millrace.source";

/// Moves a trailing format clause of a CREATE SOURCE / TABLE / SINK into its WITH options:
/// `FORMAT JSON`, `FORMAT PLAIN ENCODE AVRO (schema.location = '...')` (RisingWave; the
/// parenthesised options join the others) or `FORMAT AVRO USING SCHEMA '...'` (Materialize;
/// the schema becomes `avro.schema`) all become `format = '...'` plus options.
fn format_clause_into_options(sql: &str) -> String {
    let body = sql.trim().trim_end_matches(';').trim_end();
    let Some((close, at)) = last_format_keyword(body) else {
        return sql.to_string();
    };
    let clause = &body[at + "format".len()..];
    let lower = clause.to_ascii_lowercase();
    let paren = clause.find('(');
    let using = lower.find(" using ");
    let (words, extra) = match (paren, using) {
        (Some(p), u) if u.is_none_or(|u| p < u) => {
            let options = clause[p..].trim();
            let Some(inner) = options
                .strip_prefix('(')
                .and_then(|o| o.strip_suffix(')'))
                .map(str::trim)
            else {
                return sql.to_string();
            };
            let extra = if inner.is_empty() {
                String::new()
            } else {
                format!(", {inner}")
            };
            (&clause[..p], extra)
        }
        (_, Some(u)) => {
            let rest = clause[u + " using ".len()..].trim_start();
            let Some(literal) = rest
                .get(..6)
                .filter(|w| w.eq_ignore_ascii_case("schema"))
                .map(|_| rest[6..].trim())
            else {
                return sql.to_string();
            };
            if !(literal.len() >= 2 && literal.starts_with('\'') && literal.ends_with('\'')) {
                return sql.to_string();
            }
            (&clause[..u], format!(", \"avro.schema\" = {literal}"))
        }
        _ => (clause, String::new()),
    };
    let words: Vec<String> = words
        .split_whitespace()
        .map(|w| w.to_ascii_lowercase())
        .collect();
    let format = match words.iter().map(|w| w.as_str()).collect::<Vec<_>>()[..] {
        [f] => f.to_string(),
        ["plain" | "upsert" | "native", "encode", f] => f.to_string(),
        _ => return sql.to_string(),
    };
    format!(
        "{}, format = '{}'{extra})",
        &body[..close],
        format.replace('\'', "")
    )
}

/// The byte positions of the last `FORMAT` keyword outside quotes and parentheses that
/// directly follows a closing parenthesis, and of that parenthesis.
fn last_format_keyword(body: &str) -> Option<(usize, usize)> {
    let bytes = body.as_bytes();
    let (mut quote, mut depth) = (None::<u8>, 0i32);
    let mut last_close = None;
    let mut last_solid = None;
    let mut found = None;
    for (i, &b) in bytes.iter().enumerate() {
        if let Some(q) = quote {
            if b == q {
                quote = None;
            }
            last_solid = Some(b);
            continue;
        }
        match b {
            b'\'' | b'"' => quote = Some(b),
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    last_close = Some(i);
                }
            }
            b'f' | b'F'
                if depth == 0
                    && last_solid == Some(b')')
                    && body
                        .get(i..i + 6)
                        .is_some_and(|w| w.eq_ignore_ascii_case("format"))
                    && bytes.get(i + 6).is_some_and(|c| c.is_ascii_whitespace()) =>
            {
                found = last_close.map(|close| (close, i));
            }
            _ => {}
        }
        if !b.is_ascii_whitespace() {
            last_solid = Some(b);
        }
    }
    found
}

/// Rewrites the source and sink DDL the SQL parser does not know into what it does:
/// `CREATE SOURCE` becomes a connector table marked as a source, `DROP SOURCE` and
/// `ALTER SOURCE` the table forms. Other text is returned as is.
fn source_ddl(sql: &str) -> String {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(2)
        .map(|w| w.to_ascii_lowercase())
        .collect();
    let swap = |sql: &str, to: &str| -> String {
        let trimmed = sql.trim_start();
        let first = trimmed.split_whitespace().next().unwrap_or("");
        let rest = trimmed[first.len()..].trim_start();
        format!("{first} {to}{}", &rest["source".len()..])
    };
    match words.iter().map(|w| w.as_str()).collect::<Vec<_>>()[..] {
        ["create", "source"] => {
            let sql = format_clause_into_options(&swap(sql, "TABLE"));
            match sql.rfind(')') {
                Some(close) if sql.to_ascii_lowercase().contains(" with") => {
                    format!("{}, \"{SOURCE_MARKER}\" = 'true')", &sql[..close])
                }
                _ => sql,
            }
        }
        ["create", "table"] => format_clause_into_options(sql),
        ["drop", "source"] | ["alter", "source"] => swap(sql, "TABLE"),
        _ => sql.to_string(),
    }
}

/// `CREATE SINK` / `DROP SINK`, parsed; `None` for other text.
fn sink_command(sql: &str) -> Option<Result<Parsed>> {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(2)
        .map(|w| w.to_ascii_lowercase())
        .collect();
    if words.get(1).map(|w| w.as_str()) != Some("sink") {
        return None;
    }
    let create = match words[0].as_str() {
        "create" => true,
        "drop" => false,
        _ => return None,
    };
    let sql = if create {
        quote_dotted_option_keys(&format_clause_into_options(sql))
    } else {
        sql.to_string()
    };
    let parse = || -> std::result::Result<Parsed, ParserError> {
        let dialect = PostgreSqlDialect {};
        let mut p = Parser::new(&dialect).try_with_sql(&sql)?;
        p.expect_keyword_is(if create {
            Keyword::CREATE
        } else {
            Keyword::DROP
        })?;
        let word = p.parse_identifier()?;
        if !word.value.eq_ignore_ascii_case("sink") {
            return p.expected("SINK", p.peek_token());
        }
        if !create {
            let if_exists = p.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
            let name = p.parse_object_name(false)?;
            let _ = p.consume_token(&Token::SemiColon);
            p.expect_token(&Token::EOF)?;
            return Ok(Parsed::DropSink { name, if_exists });
        }
        let if_not_exists = p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
        let name = p.parse_object_name(false)?;
        p.expect_keyword_is(Keyword::FROM)?;
        let from = p.parse_object_name(false)?;
        let options = p.parse_options(Keyword::WITH)?;
        let _ = p.consume_token(&Token::SemiColon);
        p.expect_token(&Token::EOF)?;
        Ok(Parsed::CreateSink(Box::new(CreateSink {
            name,
            from,
            options,
            if_not_exists,
        })))
    };
    Some(parse().map_err(ServerError::from))
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

/// The target of a `SUBSCRIBE` command, in either of its spellings; `None` for other text.
fn subscribe_command(sql: &str) -> Option<Result<SubscribeTarget>> {
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
    if let Some(inner) = name.strip_prefix('(') {
        return Some(match inner.trim_end().strip_suffix(')') {
            Some(query) if !query.trim().is_empty() => {
                Ok(SubscribeTarget::Query(query.trim().to_string()))
            }
            _ => Err(ServerError::Syntax(
                "SUBSCRIBE TO (query) needs a query in parentheses".into(),
            )),
        });
    }
    Some(
        Parser::new(&PostgreSqlDialect {})
            .try_with_sql(name)
            .and_then(|mut p| p.parse_object_name(false))
            .map(SubscribeTarget::View)
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
    if let Some(sink) = sink_command(sql) {
        return Ok(vec![sink?]);
    }
    let rewritten = source_ddl(sql);
    let sql = rewritten.as_str();
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

/// A fully qualified relation name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualifiedName {
    /// Database.
    pub database: String,
    /// Schema.
    pub schema: String,
    /// Object name.
    pub name: String,
}

impl std::fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)
    }
}

/// Folds an identifier the way PostgreSQL does.
pub fn fold(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// The folded parts of a dotted name.
pub fn parts(name: &ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|p| match p.as_ident() {
            Some(ident) => fold(ident),
            None => p.to_string(),
        })
        .collect()
}

/// Parses exactly one statement.
pub fn parse_one(sql: &str) -> Result<Statement> {
    let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql)?;
    match (stmts.pop(), stmts.is_empty()) {
        (Some(stmt), true) => Ok(stmt),
        _ => Err(ServerError::Syntax(format!(
            "expected one statement: {sql}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view_of(sql: &str) -> Option<String> {
        subscribe_command(sql).map(|r| match r {
            Ok(SubscribeTarget::View(n)) => n.to_string(),
            Ok(SubscribeTarget::Query(q)) => format!("query: {q}"),
            Err(e) => e.to_string(),
        })
    }

    #[test]
    fn source_ddl_becomes_table_ddl_with_format_in_options() {
        assert_eq!(
            source_ddl(
                "CREATE SOURCE clicks (a INT) WITH (connector = 'kafka', topic = 't') FORMAT JSON;"
            ),
            "CREATE TABLE clicks (a INT) WITH (connector = 'kafka', topic = 't', format = 'json', \"millrace.source\" = 'true')"
        );
        assert_eq!(
            source_ddl(
                "create source s (a INT) with (connector = 'kafka') FORMAT PLAIN ENCODE CSV"
            ),
            "create TABLE s (a INT) with (connector = 'kafka', format = 'csv', \"millrace.source\" = 'true')"
        );
        assert_eq!(
            source_ddl(
                "CREATE SOURCE s WITH (connector = 'kafka') FORMAT PLAIN ENCODE AVRO (schema.location = 'file:///x.avsc', avro.wire_format = 'raw');"
            ),
            "CREATE TABLE s WITH (connector = 'kafka', format = 'avro', schema.location = 'file:///x.avsc', avro.wire_format = 'raw', \"millrace.source\" = 'true')"
        );
        assert_eq!(
            source_ddl(
                "CREATE SOURCE s WITH (connector = 'kafka') FORMAT AVRO USING SCHEMA '{\"type\": \"record\", \"doc\": \") format x\"}'"
            ),
            "CREATE TABLE s WITH (connector = 'kafka', format = 'avro', \"avro.schema\" = '{\"type\": \"record\", \"doc\": \") format x\"}', \"millrace.source\" = 'true')"
        );
        assert_eq!(
            source_ddl("CREATE SOURCE s (format INT) WITH (connector = 'kafka')"),
            "CREATE TABLE s (format INT) WITH (connector = 'kafka', \"millrace.source\" = 'true')"
        );
        assert_eq!(
            source_ddl("DROP SOURCE IF EXISTS s"),
            "DROP TABLE IF EXISTS s"
        );
        assert_eq!(
            source_ddl("ALTER SOURCE s SET (max_rows_per_second = 5)"),
            "ALTER TABLE s SET (max_rows_per_second = 5)"
        );
        assert_eq!(source_ddl("SELECT 1"), "SELECT 1");
    }

    #[test]
    fn sink_commands_parse() {
        let Some(Ok(Parsed::CreateSink(sink))) = sink_command(
            "CREATE SINK out FROM v WITH (connector = 'file', path = '/tmp/x', sink.retry = 3) FORMAT JSON",
        ) else {
            panic!("CREATE SINK did not parse");
        };
        assert_eq!(sink.name.to_string(), "out");
        assert_eq!(sink.from.to_string(), "v");
        let keys: Vec<String> = sink.options.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            keys,
            [
                "connector = 'file'",
                "path = '/tmp/x'",
                "\"sink.retry\" = 3",
                "format = 'json'"
            ]
        );
        assert!(matches!(
            sink_command("DROP SINK IF EXISTS out;"),
            Some(Ok(Parsed::DropSink {
                if_exists: true,
                ..
            }))
        ));
        assert!(matches!(sink_command("CREATE SINK x v"), Some(Err(_))));
        assert!(sink_command("CREATE TABLE sink (a int)").is_none());
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
        assert_eq!(
            view_of("COPY (SUBSCRIBE TO (SELECT a, count(*) FROM t GROUP BY a)) TO STDOUT")
                .as_deref(),
            Some("query: SELECT a, count(*) FROM t GROUP BY a")
        );
        assert_eq!(
            view_of("SUBSCRIBE (SELECT 1);").as_deref(),
            Some("query: SELECT 1")
        );
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
    fn subscribe_to_a_file_or_nothing_is_refused() {
        assert!(matches!(
            subscribe_command("SUBSCRIBE TO ()"),
            Some(Err(ServerError::Syntax(_)))
        ));
        assert!(matches!(
            subscribe_command("COPY (SUBSCRIBE v) TO '/tmp/x'"),
            Some(Err(ServerError::NotSupported(_)))
        ));
    }
}
