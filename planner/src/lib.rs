//! Millrace planner: SQL to DataFusion plans over Millrace's catalog and tables.
//!
//! The server hands SQL text here; DataFusion parses, plans and optimises it against the
//! [`Catalog`], whose tables are [`MillraceTable`] providers over the storage layer's
//! columnar cache. Materialized views are compiled here into incremental plans (`incremental.rs`) of the
//! operators in `ops/`, run by `pipeline.rs`.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod catalog;
pub mod changelog;
pub mod correlated;
pub mod dependencies;
pub mod empty_subqueries;
pub mod epoch_part;
pub mod error;
pub mod exists_domain;
pub mod filter_pushdown;
pub mod incremental;
pub mod lookup;
pub mod lost_order;
pub mod not_in;
pub mod ops;
pub mod optimizer;
pub mod outer_join_constants;
pub mod pg_avg;
pub mod pg_casts;
pub mod pg_functions;
pub mod pg_intervals;
pub mod pg_nullif;
pub mod pg_numeric;
pub mod pg_string_agg;
pub mod pg_window;
pub mod pipeline;
pub mod rewrite;
pub mod row_id;
pub mod scalar_subquery;
pub mod set_ops;
pub mod spilled_change;
pub mod stop;
pub mod subquery_values;
pub mod system_table;
pub mod table;
#[cfg(test)]
mod test_util;
pub mod tiered_scan;
pub mod topk_order;
pub mod using_joins;
pub mod view_table;

pub use catalog::Catalog;
pub use changelog::Changelog;
pub use epoch_part::EpochPart;
pub use error::{PlanError, Result};
pub use row_id::{ROW_ID_COLUMN, RowIdTable};
pub use table::{MillraceTable, TableDef};
pub use view_table::MaterializedView;
