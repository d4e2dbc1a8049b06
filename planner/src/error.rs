//! Errors raised while planning SQL and maintaining the catalog.

use datafusion::error::DataFusionError;
use millrace_storage::StorageError;
use millrace_storage::error::Poisoned;

/// Errors raised by the planner and the catalog.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// DataFusion could not parse, plan or run something.
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    /// Arrow failed on a batch.
    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    /// The durable store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The named object does not exist.
    #[error("{kind} \"{name}\" does not exist")]
    UndefinedObject {
        /// What kind of object was named.
        kind: ObjectClass,
        /// The name as the user wrote it.
        name: String,
    },
    /// An object of that name already exists.
    #[error("{kind} \"{name}\" already exists")]
    DuplicateObject {
        /// What kind of object was named.
        kind: ObjectClass,
        /// The name as the user wrote it.
        name: String,
    },
    /// Other objects depend on the one being dropped.
    #[error("cannot drop {kind} {name} because other objects depend on it: {dependents}")]
    DependentObjects {
        /// Kind of the object being dropped.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Names of the dependents.
        dependents: String,
    },
    /// A construct a materialized view cannot maintain incrementally (SQLSTATE 0A000).
    #[error("{0} is not supported in materialized views")]
    Unsupported(String),
    /// A materialized view's pipeline stopped on an error; reads of it report why.
    #[error("materialized view \"{view}\" failed: {reason}")]
    ViewFailed {
        /// The view's name.
        view: String,
        /// Why its pipeline stopped.
        reason: String,
    },
    /// A materialized view is computing its contents (SQLSTATE 55000); reads may retry.
    #[error(
        "materialized view \"{view}\" is {state}; try again when millrace_views shows it running"
    )]
    ViewNotReady {
        /// The view's name.
        view: String,
        /// What it is doing.
        state: String,
    },
    /// An invariant of the planner or an operator was broken.
    #[error("internal error: {0}")]
    Internal(String),
    /// A lock whose holder panicked.
    #[error(transparent)]
    Poisoned(#[from] Poisoned),
}

/// The kinds of named objects errors speak of, as PostgreSQL's messages name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectClass {
    /// A table (or a source).
    Table,
    /// A plain view.
    View,
    /// A materialized view.
    MaterializedView,
    /// A table, view or materialized view.
    Relation,
    /// An index.
    Index,
    /// A schema.
    Schema,
    /// A database.
    Database,
    /// A column.
    Column,
    /// A sink.
    Sink,
}

impl ObjectClass {
    /// The words PostgreSQL's messages name the kind with.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectClass::Table => "table",
            ObjectClass::View => "view",
            ObjectClass::MaterializedView => "materialized view",
            ObjectClass::Relation => "relation",
            ObjectClass::Index => "index",
            ObjectClass::Schema => "schema",
            ObjectClass::Database => "database",
            ObjectClass::Column => "column",
            ObjectClass::Sink => "sink",
        }
    }
}

impl std::fmt::Display for ObjectClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result type of the planner crate.
pub type Result<T, E = PlanError> = std::result::Result<T, E>;
