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
}

/// Result type of the planner crate.
pub type Result<T, E = PlanError> = std::result::Result<T, E>;
