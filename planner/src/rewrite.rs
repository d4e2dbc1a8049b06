//! SQL rewrites that make DataFusion accept what PostgreSQL accepts, applied to the parsed
//! statement before planning.
//!
//! PostgreSQL allows two unnamed output columns with the same derived name (for example two
//! scalar subqueries); DataFusion requires unique names, so repeated ones get an alias.

use std::collections::HashMap;
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr, Ident, Query, SelectItem, SetExpr, Statement, VisitMut, VisitorMut,
};

/// Applies every rewrite to a statement.
pub fn rewrite(mut statement: Statement) -> Statement {
    let _ = statement.visit(&mut DedupOutputNames);
    statement
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
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    #[test]
    fn repeated_subqueries_get_aliases() -> Result<(), Box<dyn std::error::Error>> {
        let sql = "SELECT (SELECT 1), a, (SELECT 2), a + 1, a + 1 FROM t";
        let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql)?;
        let out = rewrite(stmts.remove(0)).to_string();
        assert!(out.contains("(SELECT 2) AS"), "{out}");
        assert!(out.contains("a + 1 AS"), "{out}");
        assert!(out.starts_with("SELECT (SELECT 1), a,"), "{out}");
        Ok(())
    }
}
