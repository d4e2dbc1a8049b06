//! Millrace planner: SQL to DataFusion plans over Millrace's catalog and tables.
//!
//! The server hands SQL text here; DataFusion parses, plans and optimises it against the
//! [`Catalog`], whose tables are [`MillraceTable`] providers over the storage layer's
//! columnar cache. (The incremental plan of materialized views will be built here as well.)
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod catalog;
pub mod correlated;
pub mod error;
pub mod lookup;
pub mod pg_casts;
pub mod rewrite;
pub mod row_id;
pub mod table;

pub use catalog::Catalog;
pub use error::{PlanError, Result};
pub use row_id::{ROW_ID_COLUMN, RowIdTable};
pub use table::{MillraceTable, TableDef};
