//! Catalog records the server writes itself: the records of a new database (with its default
//! schema), and the schema a stored record's SQL was planned in.

use millrace_storage::{CatalogRecord, ObjectKind, Store};

/// Name of the database every server starts with.
pub const DEFAULT_DATABASE: &str = "millrace";
/// Name of the default schema of every database.
pub const DEFAULT_SCHEMA: &str = "public";

/// The records of a new database: the database and its `public` schema.
pub fn database_records(store: &Store, name: &str) -> Vec<CatalogRecord> {
    vec![
        CatalogRecord {
            id: store.allocate_object_id(),
            kind: ObjectKind::Database,
            database: name.to_string(),
            schema: String::new(),
            name: name.to_string(),
            sql: format!("CREATE DATABASE \"{name}\""),
            depends_on: vec![],
            search_schema: None,
        },
        CatalogRecord {
            id: store.allocate_object_id(),
            kind: ObjectKind::Schema,
            database: name.to_string(),
            schema: DEFAULT_SCHEMA.to_string(),
            name: DEFAULT_SCHEMA.to_string(),
            sql: format!("CREATE SCHEMA {DEFAULT_SCHEMA}"),
            depends_on: vec![],
            search_schema: None,
        },
    ]
}

/// The schema a record's SQL was planned in when it was created.
pub fn replay_schema(record: &CatalogRecord) -> &str {
    record.search_schema.as_deref().unwrap_or(&record.schema)
}
