//! Resolving SQL object names against a session (PostgreSQL folding: unquoted names are
//! lower-cased, quoted names kept as written).

use datafusion::sql::sqlparser::ast::{Ident, ObjectName};

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
