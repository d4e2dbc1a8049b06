//! One durable catalog object (database, schema, table, view, index) as stored in RocksDB.
//!
//! The record keeps the object's canonical SQL; on start the server re-plans that SQL to
//! rebuild schemas, defaults and constraints, so the planner stays the one source of types.

use serde::{Deserialize, Serialize};

/// What kind of object a catalog record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectKind {
    /// A database (a DataFusion catalog).
    Database,
    /// A schema inside a database.
    Schema,
    /// A table whose rows live in the table log.
    Table,
    /// A plain (non-materialized) view.
    View,
    /// A secondary index on a table.
    Index,
    /// A materialized view: an incrementally maintained query result.
    MaterializedView,
    /// A sink: a view's changes delivered to an external system.
    Sink,
}

/// A durable catalog object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogRecord {
    /// Stable id, unique across all objects; table logs are keyed by it.
    pub id: u64,
    /// The object's kind.
    pub kind: ObjectKind,
    /// Database the object belongs to (its own name for a database).
    pub database: String,
    /// Schema the object belongs to (empty for a database).
    pub schema: String,
    /// Object name.
    pub name: String,
    /// Canonical SQL that recreates the object (CREATE TABLE / VIEW / INDEX ...).
    pub sql: String,
    /// The schema unqualified names in `sql` resolved to when the object was created.
    #[serde(default)]
    pub search_schema: Option<String>,
    /// Ids of the objects this one depends on (a view's tables, an index's table).
    #[serde(default)]
    pub depends_on: Vec<u64>,
}
