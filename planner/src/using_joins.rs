//! `FULL JOIN ... USING` and `RIGHT JOIN ... USING` with PostgreSQL's merged columns, rewritten
//! in the parsed statement before DataFusion plans it.
//!
//! PostgreSQL's `a FULL JOIN b USING (v)` has one column `v = COALESCE(a.v, b.v)`; DataFusion
//! keeps `a.v` under the name `v` (NULL for rows only `b` has) and cannot resolve `v` at all
//! after a third such join. In a FROM clause holding such a join, every `USING` becomes `ON`
//! over the merged expressions of the join tree so far, and each unqualified reference to a
//! merged column in the SELECT (and a bare `*`) becomes that expression. Qualified references
//! (`a.v`, `a.*`) keep their PostgreSQL meaning, the input column itself.

use std::collections::HashMap;
use std::ops::ControlFlow;

use datafusion::execution::session_state::SessionState;
use datafusion::sql::planner::object_name_to_table_reference;

use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList,
    FunctionArguments, GroupByExpr, Ident, JoinConstraint, JoinOperator, ObjectName,
    ObjectNamePart, Query, Select, SelectItem, SetExpr, Statement, TableFactor, TableWithJoins,
    Visit, VisitMut, Visitor, VisitorMut,
};

/// Names of the tables in FROM clauses that hold a FULL or RIGHT join with USING: the
/// tables whose columns [`rewrite`] needs. Empty for almost every statement.
pub fn tables_needed(statement: &Statement) -> Vec<ObjectName> {
    let mut collect = NeededTables(Vec::new());
    let _ = statement.visit(&mut collect);
    collect.0
}

/// Rewrites every FROM clause with a FULL or RIGHT join with USING; `columns` gives the
/// columns of each table [`tables_needed`] named, keyed by the name as written. A clause
/// with a relation whose columns are unknown (a derived table, say) is left as it is.
pub fn rewrite(statement: &mut Statement, columns: &HashMap<String, Vec<String>>) {
    let _ = statement.visit(&mut RewriteSelects {
        columns,
        ctes: Vec::new(),
    });
}

struct NeededTables(Vec<ObjectName>);

/// Names of the query's common table expressions, which shadow tables of the same name.
fn cte_names(query: &Query) -> impl Iterator<Item = String> + '_ {
    query
        .with
        .iter()
        .flat_map(|with| with.cte_tables.iter().map(|cte| fold(&cte.alias.name)))
}

impl Visitor for NeededTables {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let SetExpr::Select(select) = query.body.as_ref() {
            for from in select.from.iter().filter(|f| has_outer_using(f)) {
                let relations =
                    std::iter::once(&from.relation).chain(from.joins.iter().map(|j| &j.relation));
                for relation in relations {
                    if let TableFactor::Table { name, .. } = relation
                        && !self.0.contains(name)
                    {
                        self.0.push(name.clone());
                    }
                }
            }
        }
        ControlFlow::Continue(())
    }
}

fn has_outer_using(from: &TableWithJoins) -> bool {
    from.joins.iter().any(|j| {
        matches!(
            &j.join_operator,
            JoinOperator::FullOuter(JoinConstraint::Using(_))
                | JoinOperator::Right(JoinConstraint::Using(_))
                | JoinOperator::RightOuter(JoinConstraint::Using(_))
        )
    })
}

struct RewriteSelects<'a> {
    columns: &'a HashMap<String, Vec<String>>,
    /// Names of common table expressions seen so far: their columns are not the table's.
    ctes: Vec<String>,
}

impl VisitorMut for RewriteSelects<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        self.ctes.extend(cte_names(query));
        if let SetExpr::Select(select) = query.body.as_mut() {
            let columns: HashMap<String, Vec<String>> = self
                .columns
                .iter()
                .filter(|(name, _)| !self.ctes.contains(name))
                .map(|(n, c)| (n.clone(), c.clone()))
                .collect();
            rewrite_select(select, &columns);
        }
        ControlFlow::Continue(())
    }
}

/// One output column of a join tree: its name and the expression that computes it.
type Output = (String, Expr);

fn rewrite_select(select: &mut Select, columns: &HashMap<String, Vec<String>>) {
    let mut merged: Vec<Output> = Vec::new();
    let mut star: Vec<Output> = Vec::new();
    for from in select.from.iter_mut().filter(|f| has_outer_using(f)) {
        let Some(outputs) = rewrite_from(from, columns, &mut merged) else {
            return;
        };
        star.extend(outputs);
    }
    if merged.is_empty() {
        return;
    }
    let lookup: HashMap<String, Expr> = merged.into_iter().collect();
    let mut items = Vec::with_capacity(select.projection.len());
    for item in std::mem::take(&mut select.projection) {
        match item {
            SelectItem::Wildcard(options) if no_wildcard_options(&options) => {
                // NOTE: PostgreSQL allows repeated output names, DataFusion does not; a
                // repeat is numbered as the parse-time rewrite numbers them.
                let mut seen: HashMap<&str, usize> = HashMap::new();
                for (name, expr) in &star {
                    let n = seen.entry(name).or_insert(0);
                    *n += 1;
                    let alias = match *n {
                        1 => Ident::with_quote('"', name.clone()),
                        n => Ident::with_quote('"', format!("{name}_{n}")),
                    };
                    items.push(SelectItem::ExprWithAlias {
                        expr: expr.clone(),
                        alias,
                    });
                }
            }
            SelectItem::UnnamedExpr(Expr::Identifier(ident))
                if lookup.contains_key(&fold(&ident)) =>
            {
                let name = fold(&ident);
                items.push(SelectItem::ExprWithAlias {
                    expr: lookup[&name].clone(),
                    alias: Ident::with_quote('"', name),
                });
            }
            SelectItem::UnnamedExpr(mut expr) => {
                replace_merged(&mut expr, &lookup);
                items.push(SelectItem::UnnamedExpr(expr));
            }
            SelectItem::ExprWithAlias { mut expr, alias } => {
                replace_merged(&mut expr, &lookup);
                items.push(SelectItem::ExprWithAlias { expr, alias });
            }
            other => items.push(other),
        }
    }
    select.projection = items;
    for expr in select
        .selection
        .iter_mut()
        .chain(select.having.iter_mut())
        .chain(select.qualify.iter_mut())
    {
        replace_merged(expr, &lookup);
    }
    if let GroupByExpr::Expressions(exprs, _) = &mut select.group_by {
        for expr in exprs {
            replace_merged(expr, &lookup);
        }
    }
}

fn no_wildcard_options(
    options: &datafusion::sql::sqlparser::ast::WildcardAdditionalOptions,
) -> bool {
    options.opt_ilike.is_none()
        && options.opt_exclude.is_none()
        && options.opt_except.is_none()
        && options.opt_replace.is_none()
        && options.opt_rename.is_none()
}

/// Rewrites the joins of one FROM item and returns its output columns in PostgreSQL's
/// order, adding its merged columns to `merged`; `None` (nothing changed) when a relation's
/// columns are unknown or a join is of a kind this does not handle.
fn rewrite_from(
    from: &mut TableWithJoins,
    columns: &HashMap<String, Vec<String>>,
    merged: &mut Vec<Output>,
) -> Option<Vec<Output>> {
    let mut left = relation_outputs(&from.relation, columns)?;
    let mut plans = Vec::with_capacity(from.joins.len());
    let mut new_merged = Vec::new();
    for join in &from.joins {
        let right = relation_outputs(&join.relation, columns)?;
        let (constraint, kind) = match &join.join_operator {
            JoinOperator::Join(c) | JoinOperator::Inner(c) => (c, Kind::Inner),
            JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (c, Kind::Left),
            JoinOperator::Right(c) | JoinOperator::RightOuter(c) => (c, Kind::Right),
            JoinOperator::FullOuter(c) => (c, Kind::Full),
            JoinOperator::CrossJoin(JoinConstraint::None) => (&JoinConstraint::None, Kind::Inner),
            _ => return None,
        };
        match constraint {
            JoinConstraint::Using(names) => {
                let mut on: Option<Expr> = None;
                let mut merged_here = Vec::with_capacity(names.len());
                for name in names {
                    let [ObjectNamePart::Identifier(ident)] = name.0.as_slice() else {
                        return None;
                    };
                    let name = fold(ident);
                    let l = unique(&left, &name)?;
                    let r = unique(&right, &name)?;
                    let eq = Expr::BinaryOp {
                        left: Box::new(l.clone()),
                        op: BinaryOperator::Eq,
                        right: Box::new(r.clone()),
                    };
                    on = Some(match on {
                        Some(prev) => Expr::BinaryOp {
                            left: Box::new(prev),
                            op: BinaryOperator::And,
                            right: Box::new(eq),
                        },
                        None => eq,
                    });
                    let value = match kind {
                        Kind::Inner | Kind::Left => l,
                        Kind::Right => r,
                        Kind::Full => coalesce(l, r),
                    };
                    merged_here.push((name, value));
                }
                plans.push(Some(on?));
                let is_merged = |(n, _): &Output| merged_here.iter().any(|(m, _)| m == n);
                let mut outputs = merged_here.clone();
                outputs.extend(left.iter().filter(|o| !is_merged(o)).cloned());
                outputs.extend(right.iter().filter(|o| !is_merged(o)).cloned());
                new_merged.extend(merged_here);
                left = outputs;
            }
            JoinConstraint::On(_) | JoinConstraint::None => {
                plans.push(None);
                left.extend(right);
            }
            JoinConstraint::Natural => return None,
        }
    }
    for (join, plan) in from.joins.iter_mut().zip(plans) {
        let Some(on) = plan else { continue };
        let constraint = JoinConstraint::On(on);
        join.join_operator = match &join.join_operator {
            JoinOperator::Join(_) | JoinOperator::Inner(_) => JoinOperator::Inner(constraint),
            JoinOperator::Left(_) | JoinOperator::LeftOuter(_) => JoinOperator::Left(constraint),
            JoinOperator::Right(_) | JoinOperator::RightOuter(_) => JoinOperator::Right(constraint),
            _ => JoinOperator::FullOuter(constraint),
        };
    }
    // NOTE: a later merge of the same name supersedes an earlier one, as in the join tree.
    for (name, value) in new_merged {
        merged.retain(|(n, _)| *n != name);
        merged.push((name, value));
    }
    Some(left)
}

#[derive(Clone, Copy)]
enum Kind {
    Inner,
    Left,
    Right,
    Full,
}

/// The columns of a named table, each as `qualifier.column`.
fn relation_outputs(
    relation: &TableFactor,
    columns: &HashMap<String, Vec<String>>,
) -> Option<Vec<Output>> {
    let TableFactor::Table { name, alias, .. } = relation else {
        return None;
    };
    let known = columns.get(&name.to_string())?;
    let (qualifier, names) = match alias {
        Some(alias) if !alias.columns.is_empty() => {
            let renamed: Vec<String> = alias.columns.iter().map(|c| fold(&c.name)).collect();
            let mut names = renamed;
            names.extend(known.iter().skip(alias.columns.len()).cloned());
            (vec![alias.name.clone()], names)
        }
        Some(alias) => (vec![alias.name.clone()], known.clone()),
        None => (
            name.0
                .iter()
                .filter_map(|p| p.as_ident().cloned())
                .collect(),
            known.clone(),
        ),
    };
    Some(
        names
            .into_iter()
            .map(|c| {
                let mut parts = qualifier.clone();
                parts.push(Ident::with_quote('"', c.clone()));
                (c, Expr::CompoundIdentifier(parts))
            })
            .collect(),
    )
}

/// The expression of the one output column called `name`; `None` if there is none or several.
fn unique(outputs: &[Output], name: &str) -> Option<Expr> {
    let mut found = outputs.iter().filter(|(n, _)| n == name);
    let (_, expr) = found.next()?;
    if found.next().is_some() {
        return None;
    }
    Some(expr.clone())
}

/// `coalesce(l, r)`, flattened into `l`'s arguments when `l` is a coalesce already.
///
/// NOTE: DataFusion's nullability check visits a nested coalesce's arguments twice per level,
/// so a chain of 98 joins nested would take 2^98 steps to plan.
fn coalesce(l: Expr, r: Expr) -> Expr {
    let arg = |e| FunctionArg::Unnamed(FunctionArgExpr::Expr(e));
    let mut args = match l {
        Expr::Function(Function {
            name,
            args: FunctionArguments::List(list),
            ..
        }) if name.to_string() == "coalesce" => list.args,
        l => vec![arg(l)],
    };
    args.push(arg(r));
    Expr::Function(Function {
        name: ObjectName::from(vec![Ident::new("coalesce")]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args,
            clauses: vec![],
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: vec![],
    })
}

fn fold(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// Replaces unqualified references to merged columns in `expr`, but not inside subqueries,
/// whose names may be their own.
fn replace_merged(expr: &mut Expr, merged: &HashMap<String, Expr>) {
    let _ = expr.visit(&mut ReplaceMerged { merged, depth: 0 });
}

struct ReplaceMerged<'a> {
    merged: &'a HashMap<String, Expr>,
    depth: usize,
}

impl VisitorMut for ReplaceMerged<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, _query: &mut Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &mut Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if self.depth == 0
            && let Expr::Identifier(ident) = expr
            && let Some(value) = self.merged.get(&fold(ident))
        {
            *expr = value.clone();
        }
        ControlFlow::Continue(())
    }
}

/// Gives `FULL`/`RIGHT JOIN ... USING` PostgreSQL's merged columns
/// (see [`rewrite`]), looking up the columns of the tables they join. A
/// table that cannot be found is left for the planner to report.
pub async fn merge_using_columns(state: &SessionState, statement: &mut Statement) {
    let needed = tables_needed(statement);
    if needed.is_empty() {
        return;
    }
    let mut columns = HashMap::new();
    for name in needed {
        let Ok(reference) = object_name_to_table_reference(name.clone(), true) else {
            continue;
        };
        let Ok(schema) = state.schema_for_ref(reference.clone()) else {
            continue;
        };
        if let Ok(Some(table)) = schema.table(reference.table()).await {
            let names = table
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .filter(|n| n != crate::row_id::ROW_ID_COLUMN)
                .collect();
            columns.insert(name.to_string(), names);
        }
    }
    rewrite(statement, &columns);
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn rewritten(sql: &str) -> String {
        let mut statement = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        let columns: HashMap<String, Vec<String>> = tables_needed(&statement)
            .into_iter()
            .map(|n| {
                let cols = match n.to_string().as_str() {
                    "a" => vec!["v".to_string(), "x".to_string()],
                    _ => vec!["v".to_string(), "y".to_string()],
                };
                (n.to_string(), cols)
            })
            .collect();
        rewrite(&mut statement, &columns);
        statement.to_string()
    }

    #[test]
    fn full_join_using_merges_the_column() {
        assert_eq!(
            rewritten("SELECT * FROM a FULL JOIN b USING (v)"),
            r#"SELECT coalesce(a."v", b."v") AS "v", a."x" AS "x", b."y" AS "y" FROM a FULL JOIN b ON a."v" = b."v""#
        );
    }

    #[test]
    fn chains_coalesce_every_side_and_keep_qualified_references() {
        assert_eq!(
            rewritten(
                "SELECT v, a.v FROM a FULL JOIN b USING (v) FULL JOIN b AS c USING (v) WHERE v > 1"
            ),
            r#"SELECT coalesce(a."v", b."v", c."v") AS "v", a.v FROM a FULL JOIN b ON a."v" = b."v" FULL JOIN b AS c ON coalesce(a."v", b."v") = c."v" WHERE coalesce(a."v", b."v", c."v") > 1"#
        );
    }

    #[test]
    fn inner_and_left_using_joins_are_left_to_datafusion() {
        let sql = "SELECT * FROM a JOIN b USING(v) LEFT JOIN b AS c USING(v)";
        assert_eq!(rewritten(sql), sql);
    }
}
