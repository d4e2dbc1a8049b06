//! Resolving SQL object names against a session (PostgreSQL folding: unquoted names are
//! lower-cased, quoted names kept as written).

use datafusion::sql::sqlparser::ast::ObjectName;

use std::sync::Arc;

use millrace_planner::{MillraceTable, PlanError};
use millrace_storage::{CatalogRecord, ObjectKind};

use crate::error::{Result, ServerError};
use crate::session::Session;
pub use crate::sql::{QualifiedName, fold, parts};
use millrace_planner::error::ObjectClass;

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
            kind: ObjectClass::Table,
            name: parts(name).pop().unwrap_or_default(),
        }
        .into()
    })
}

/// The table, view or materialized view with this name, if any.
pub fn relation_exists(session: &Session, name: &QualifiedName) -> Option<CatalogRecord> {
    session.engine.catalog.find(
        &[
            ObjectKind::Table,
            ObjectKind::View,
            ObjectKind::MaterializedView,
        ],
        &name.database,
        &name.schema,
        &name.name,
    )
}

/// Fails unless the schema of `name` exists (undefined schema otherwise).
pub fn require_schema(session: &Session, name: &QualifiedName) -> Result<()> {
    match session.engine.catalog.schema(&name.database, &name.schema) {
        Some(_) => Ok(()),
        None => Err(PlanError::UndefinedObject {
            kind: ObjectClass::Schema,
            name: name.schema.clone(),
        }
        .into()),
    }
}
