//! Errors raised while planning SQL and maintaining the catalog.

use datafusion::error::DataFusionError;
use millrace_storage::StorageError;

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
        /// "table", "schema", "database", ...
        kind: &'static str,
        /// The name as the user wrote it.
        name: String,
    },
    /// An object of that name already exists.
    #[error("{kind} \"{name}\" already exists")]
    DuplicateObject {
        /// "table", "schema", "database", ...
        kind: &'static str,
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
}

/// Result type of the planner crate.
pub type Result<T, E = PlanError> = std::result::Result<T, E>;
