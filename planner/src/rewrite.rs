//! SQL rewrites that make DataFusion accept what PostgreSQL accepts, applied to the parsed
//! statement before planning.
//!
//! PostgreSQL allows output columns with the same name (two scalar subqueries, `a AS x, b AS
//! x`, an alias equal to a column's name); DataFusion requires unique names. Repeated names
//! get a unique alias, and for the statement's own output the caller renames the result
//! columns back ([`Rewritten::renames`]).

use std::collections::HashMap;
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments, Ident,
    ObjectName, Query, SelectItem, SetExpr, Statement, TableAliasColumnDef, TableFactor, Value,
    VisitMut, VisitorMut,
};

/// A rewritten statement and the result columns to rename back.
#[derive(Debug, Clone)]
pub struct Rewritten {
    /// The statement to plan.
    pub statement: Statement,
    /// (column position, name the user asked for) for output columns renamed internally.
    pub renames: Vec<(usize, String)>,
}

/// Applies every rewrite to a statement.
pub fn rewrite(mut statement: Statement) -> Rewritten {
    let mut renames = Vec::new();
    if let Statement::Query(query) = &mut statement
        && let SetExpr::Select(select) = query.body.as_mut()
    {
        renames = dedup_top_level(&mut select.projection);
    }
    if let Statement::Insert(insert) = &mut statement
        && let Some(source) = insert.source.as_mut()
    {
        name_insert_columns(source.body.as_mut());
    }
    let _ = statement.visit(&mut DedupOutputNames);
    let _ = statement.visit(&mut PgTemplates);
    let _ = statement.visit(&mut CastsInAggregates::default());
    let _ = statement.visit(&mut SetReturningFunctions);
    Rewritten { statement, renames }
}

/// An INSERT's source columns are matched to the table's by position, so their names do
/// not matter. PostgreSQL accepts repeated ones (`INSERT INTO t SELECT v, v FROM s`),
/// DataFusion does not: every unnamed source column gets a positional alias.
fn name_insert_columns(body: &mut SetExpr) {
    match body {
        SetExpr::Select(select) => {
            for (pos, item) in select.projection.iter_mut().enumerate() {
                // NOTE: an alias stays (ORDER BY may name it), and so do a wildcard's
                // columns (their names are distinct).
                let SelectItem::UnnamedExpr(expr) = item else {
                    continue;
                };
                let expr = expr.clone();
                *item = SelectItem::ExprWithAlias {
                    expr,
                    alias: Ident::with_quote('"', format!("__insert_{pos}")),
                };
            }
        }
        SetExpr::SetOperation { left, right, .. } => {
            name_insert_columns(left);
            name_insert_columns(right);
        }
        SetExpr::Query(query) => name_insert_columns(query.body.as_mut()),
        _ => {}
    }
}

fn fold(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// The output column name of a select item when it is evident from the SQL.
fn explicit_name(item: &SelectItem) -> Option<String> {
    match item {
        SelectItem::ExprWithAlias { alias, .. } => Some(fold(alias)),
        SelectItem::UnnamedExpr(Expr::Identifier(i)) => Some(fold(i)),
        SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) => parts.last().map(fold),
        _ => None,
    }
}

/// PostgreSQL's name for an unnamed output expression (its `FigureColname`): a column's
/// name, a function's name, a cast's operand or type, `case`, else `?column?`.
fn pg_column_name(expr: &Expr) -> String {
    figure_name(expr).unwrap_or_else(|| "?column?".to_string())
}

fn figure_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(i) => Some(fold(i)),
        Expr::CompoundIdentifier(parts) => parts.last().map(fold),
        Expr::Nested(inner) => figure_name(inner),
        Expr::Function(f) => f.name.0.last().and_then(|p| p.as_ident()).map(fold),
        Expr::Cast {
            expr, data_type, ..
        } => figure_name(expr).or_else(|| {
            Some(match data_type.to_string().to_lowercase().as_str() {
                "int" | "integer" => "int4".into(),
                "bigint" => "int8".into(),
                "smallint" => "int2".into(),
                "real" => "float4".into(),
                "double precision" | "double" => "float8".into(),
                "boolean" | "bool" => "bool".into(),
                other => other.split('(').next().unwrap_or(other).trim().to_string(),
            })
        }),
        Expr::Case { .. } => Some("case".into()),
        Expr::Exists { .. } => Some("exists".into()),
        Expr::Subquery(q) => match q.body.as_ref() {
            SetExpr::Select(sel) => sel.projection.first().and_then(|item| match item {
                SelectItem::ExprWithAlias { alias, .. } => Some(fold(alias)),
                SelectItem::UnnamedExpr(e) => figure_name(e),
                _ => None,
            }),
            _ => None,
        },
        Expr::Array(_) => Some("array".into()),
        _ => None,
    }
}

/// Makes the statement's own output names PostgreSQL's: every computed column gets a unique
/// internal alias and is renamed back to PostgreSQL's name for it, and repeated explicit
/// names get unique aliases and are renamed back too.
fn dedup_top_level(items: &mut [SelectItem]) -> Vec<(usize, String)> {
    if items.iter().any(|i| {
        matches!(
            i,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
        )
    }) {
        return vec![];
    }
    let mut computed = Vec::new();
    for (pos, item) in items.iter_mut().enumerate() {
        if let SelectItem::UnnamedExpr(expr) = item
            && !matches!(expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
        {
            let name = pg_column_name(expr);
            *item = SelectItem::ExprWithAlias {
                expr: expr.clone(),
                alias: Ident::with_quote('"', format!("__column_{pos}")),
            };
            computed.push((pos, name));
        }
    }
    let names: Vec<Option<String>> = items
        .iter()
        .enumerate()
        .map(|(pos, item)| {
            if computed.iter().any(|(p, _)| *p == pos) {
                None
            } else {
                explicit_name(item)
            }
        })
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut renames = Vec::new();
    for (pos, item) in items.iter_mut().enumerate() {
        let Some(name) = &names[pos] else {
            continue;
        };
        let n = seen.entry(name.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            continue;
        }
        let expr = match item {
            SelectItem::ExprWithAlias { expr, .. } | SelectItem::UnnamedExpr(expr) => expr.clone(),
            _ => continue,
        };
        *item = SelectItem::ExprWithAlias {
            expr,
            alias: Ident::with_quote('"', format!("{name}__{n}")),
        };
        renames.push((pos, name.clone()));
    }
    renames.extend(computed);
    renames.sort();
    renames
}

struct DedupOutputNames;

impl VisitorMut for DedupOutputNames {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<Self::Break> {
        dedup_set_expr(query.body.as_mut());
        ControlFlow::Continue(())
    }
}

fn dedup_set_expr(body: &mut SetExpr) {
    match body {
        SetExpr::Select(select) => dedup_projection(&mut select.projection),
        SetExpr::SetOperation { left, right, .. } => {
            dedup_set_expr(left);
            dedup_set_expr(right);
        }
        _ => {}
    }
}

/// The name DataFusion derives for an unnamed expression, up to subquery bodies (every
/// scalar subquery is named `(<subquery>)`).
fn derived_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => None,
        other => {
            let mut e = other.clone();
            let _ = e.visit(&mut BlankSubqueries);
            Some(e.to_string())
        }
    }
}

struct BlankSubqueries;

impl VisitorMut for BlankSubqueries {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Self::Break> {
        if matches!(expr, Expr::Subquery(_)) {
            *expr = Expr::Identifier(Ident::new("__subquery__"));
        }
        ControlFlow::Continue(())
    }
}

fn dedup_projection(items: &mut [SelectItem]) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for item in items.iter_mut() {
        let SelectItem::UnnamedExpr(expr) = item else {
            continue;
        };
        let Some(name) = derived_name(expr) else {
            continue;
        };
        let n = seen.entry(name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            let alias = Ident::with_quote('"', format!("{name}_{n}"));
            *item = SelectItem::ExprWithAlias {
                expr: expr.clone(),
                alias,
            };
        }
    }
}

#[cfg(test)]
mod template_tests {
    #[test]
    fn postgres_templates_become_chrono_formats() {
        assert_eq!(
            super::chrono_format("YYYY-MM-DD HH24:MI:SS"),
            "%Y-%m-%d %H:%M:%S"
        );
        assert_eq!(
            super::chrono_format("DD/MM/YY HH12:MI AM"),
            "%d/%m/%y %I:%M %p"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    #[test]
    fn repeated_subqueries_get_aliases() -> Result<(), Box<dyn std::error::Error>> {
        let sql = "SELECT x FROM (SELECT (SELECT 1), a, (SELECT 2), a + 1, a + 1 FROM t) AS s";
        let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql)?;
        let out = rewrite(stmts.remove(0)).statement.to_string();
        assert!(out.contains("(SELECT 2) AS"), "{out}");
        assert!(out.contains("a + 1 AS"), "{out}");
        assert!(out.contains("(SELECT (SELECT 1), a,"), "{out}");
        Ok(())
    }

    #[test]
    fn repeated_output_names_are_renamed_back() -> Result<(), Box<dyn std::error::Error>> {
        let sql =
            "SELECT 35 AS col2, col2, t.col2 AS x, 1 AS X, count(*), + a, CAST(1 AS INT) FROM t";
        let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql)?;
        let r = rewrite(stmts.remove(0));
        let names: Vec<(usize, &str)> = r.renames.iter().map(|(p, n)| (*p, n.as_str())).collect();
        assert_eq!(
            names,
            vec![
                (1, "col2"),
                (3, "x"),
                (4, "count"),
                (5, "?column?"),
                (6, "int4")
            ]
        );
        assert!(r.statement.to_string().contains("col2 AS \"col2__2\""));
        Ok(())
    }
}

/// In PostgreSQL `SELECT generate_series(1, x) FROM t` returns a row per element; DataFusion's
/// generate_series is a scalar function returning a list. A call at the top of a SELECT item
/// is wrapped in `unnest(...)`, which gives PostgreSQL's rows.
///
/// In FROM, PostgreSQL names the single column of `generate_series(..) AS g` after its
/// alias; DataFusion names it `value`. Such a call gets the column alias PostgreSQL would
/// give.
// NOTE: without an alias PostgreSQL's column is `generate_series`; it stays `value` here,
// which existing loads and tests use.
struct SetReturningFunctions;

impl VisitorMut for SetReturningFunctions {
    type Break = ();

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<Self::Break> {
        if let TableFactor::Table {
            name,
            args: Some(_),
            alias: Some(alias),
            ..
        } = factor
            && name.to_string().eq_ignore_ascii_case("generate_series")
            && alias.columns.is_empty()
        {
            alias.columns = vec![TableAliasColumnDef {
                name: alias.name.clone(),
                data_type: None,
            }];
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<Self::Break> {
        if let SetExpr::Select(select) = query.body.as_mut() {
            for item in &mut select.projection {
                let expr = match item {
                    SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
                    _ => continue,
                };
                if let Expr::Function(f) = expr
                    && f.name.to_string().eq_ignore_ascii_case("generate_series")
                {
                    let inner = expr.clone();
                    *expr = call("unnest", vec![inner]);
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// PostgreSQL's `to_timestamp(text, format)` takes template patterns (`YYYY-MM-DD HH24:MI:SS`);
/// DataFusion's takes chrono's (`%Y-%m-%d %H:%M:%S`). A literal PostgreSQL template is
/// translated; a template that already holds `%` is left alone.
struct PgTemplates;

/// `name(args)` as a parsed function call.
fn call(name: &str, args: Vec<Expr>) -> Expr {
    Expr::Function(Function {
        name: ObjectName::from(vec![Ident::new(name)]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args: args
                .into_iter()
                .map(|e| FunctionArg::Unnamed(FunctionArgExpr::Expr(e)))
                .collect(),
            clauses: vec![],
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: vec![],
    })
}

/// Aggregate functions whose arguments [`CastsInAggregates`] marks.
const AGGREGATES: &[&str] = &[
    "min",
    "max",
    "sum",
    "avg",
    "count",
    "string_agg",
    "array_agg",
    "bool_and",
    "bool_or",
    "every",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "bit_and",
    "bit_or",
    "bit_xor",
];

fn is_aggregate_call(e: &Expr) -> bool {
    matches!(e, Expr::Function(f) if AGGREGATES.iter().any(|a| f.name.to_string().eq_ignore_ascii_case(a)))
}

/// A cast inside an aggregate's arguments, as `pg_cast_tag(CAST(x AS t), 't')`.
///
/// DataFusion names a cast after what it casts, so `min(CAST(x AS INT))` and `min(x)` (or
/// `min(CAST(x AS TEXT))`) in one SELECT were two aggregates of one name, which it refused
/// ("Schema contains duplicate unqualified field name min(r1.x)"); PostgreSQL runs them. The
/// tag ([`crate::pg_functions`]) is the value itself, under a name that says the type. Output
/// columns are named PostgreSQL's way (`min`), so the name is never seen. Subqueries inside
/// the arguments are their own scope.
#[derive(Default)]
struct CastsInAggregates {
    /// How many aggregate calls enclose the expression being visited, per query level.
    depth: Vec<usize>,
}

impl VisitorMut for CastsInAggregates {
    type Break = ();

    fn pre_visit_query(&mut self, _query: &mut Query) -> ControlFlow<Self::Break> {
        self.depth.push(0);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &mut Query) -> ControlFlow<Self::Break> {
        self.depth.pop();
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Self::Break> {
        if is_aggregate_call(expr)
            && let Some(d) = self.depth.last_mut()
        {
            *d += 1;
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Self::Break> {
        let inside = self.depth.last().copied().unwrap_or(0);
        if is_aggregate_call(expr) {
            if let Some(d) = self.depth.last_mut() {
                *d = d.saturating_sub(1);
            }
        } else if inside > 0
            && let Expr::Cast { data_type, .. } = expr
        {
            let tag = Expr::value(Value::SingleQuotedString(data_type.to_string()));
            let cast = std::mem::replace(expr, Expr::value(Value::Null));
            *expr = call(crate::pg_functions::CAST_TAG, vec![cast, tag]);
        }
        ControlFlow::Continue(())
    }
}

impl VisitorMut for PgTemplates {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Self::Break> {
        if let Expr::Function(f) = expr
            && f.name.to_string().eq_ignore_ascii_case("to_timestamp")
            && let datafusion::sql::sqlparser::ast::FunctionArguments::List(list) = &mut f.args
            && list.args.len() == 2
            && let Some(datafusion::sql::sqlparser::ast::FunctionArg::Unnamed(
                datafusion::sql::sqlparser::ast::FunctionArgExpr::Expr(Expr::Value(v)),
            )) = list.args.get_mut(1)
            && let datafusion::sql::sqlparser::ast::Value::SingleQuotedString(template) =
                &mut v.value
            && !template.contains('%')
        {
            *template = chrono_format(template);
        }
        ControlFlow::Continue(())
    }
}

/// Translates a PostgreSQL datetime template into a chrono format string.
fn chrono_format(template: &str) -> String {
    const PATTERNS: [(&str, &str); 16] = [
        ("YYYY", "%Y"),
        ("HH24", "%H"),
        ("HH12", "%I"),
        ("MONTH", "%B"),
        ("Month", "%B"),
        ("MON", "%b"),
        ("Mon", "%b"),
        ("DDD", "%j"),
        ("YY", "%y"),
        ("MM", "%m"),
        ("DD", "%d"),
        ("HH", "%I"),
        ("MI", "%M"),
        ("SS", "%S"),
        ("MS", "%3f"),
        ("US", "%6f"),
    ];
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    'outer: while !rest.is_empty() {
        for (pattern, format) in PATTERNS {
            if let Some(tail) = rest.strip_prefix(pattern) {
                out.push_str(format);
                rest = tail;
                continue 'outer;
            }
        }
        for (pattern, format) in [("AM", "%p"), ("PM", "%p")] {
            if let Some(tail) = rest.strip_prefix(pattern) {
                out.push_str(format);
                rest = tail;
                continue 'outer;
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}
