//! Resolving SQL object names against a session (PostgreSQL folding: unquoted names are
//! lower-cased, quoted names kept as written).

use datafusion::sql::sqlparser::ast::{Ident, ObjectName};

use std::sync::Arc;

use millrace_planner::{MillraceTable, PlanError};
use millrace_storage::{CatalogRecord, ObjectKind};

use crate::error::{Result, ServerError};
use crate::session::Session;

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

/// Resolves `[db.][schema.]name` against the session's database and current schema.
pub fn resolve(session: &Session, name: &ObjectName) -> Result<QualifiedName> {
    let p = parts(name);
    let (database, schema, name) = match p.as_slice() {
        [n] => (
            session.database.clone(),
            session.current_schema(),
            n.clone(),
        ),
        [s, n] => (session.database.clone(), s.clone(), n.clone()),
        [d, s, n] => (d.clone(), s.clone(), n.clone()),
        _ => {
            return Err(ServerError::Syntax(format!(
                "improper qualified name: {name}"
            )));
        }
    };
    if database != session.database {
        return Err(ServerError::NotSupported(format!(
            "cross-database reference to \"{database}\""
        )));
    }
    Ok(QualifiedName {
        database,
        schema,
        name,
    })
}

/// A table found by name: its qualified name, catalog record and data.
pub struct ResolvedTable {
    /// The qualified name.
    pub name: QualifiedName,
    /// Its catalog record.
    pub record: CatalogRecord,
    /// The table and its columnar cache.
    pub table: Arc<MillraceTable>,
}

/// Resolves a table name; `Ok(None)` when no table has that name.
pub fn find_table(session: &Session, name: &ObjectName) -> Result<Option<ResolvedTable>> {
    let name = resolve(session, name)?;
    let catalog = &session.engine.catalog;
    let Some(record) = catalog.find(
        &[ObjectKind::Table],
        &name.database,
        &name.schema,
        &name.name,
    ) else {
        return Ok(None);
    };
    let table = catalog
        .table(record.id)
        .ok_or_else(|| ServerError::Internal(format!("table {} has no data", name.name)))?;
    Ok(Some(ResolvedTable {
        name,
        record,
        table,
    }))
}

/// Resolves a table name that must exist (42P01 otherwise).
pub fn require_table(session: &Session, name: &ObjectName) -> Result<ResolvedTable> {
    find_table(session, name)?.ok_or_else(|| {
        PlanError::UndefinedObject {
            kind: "table",
            name: parts(name).pop().unwrap_or_default(),
        }
        .into()
    })
}
