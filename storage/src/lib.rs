//! Millrace storage: the durable side of every write and the in-memory columnar cache.
//!
//! DML and DDL reach this crate as one [`WriteSet`] per statement (or per COMMIT); it is
//! synced to RocksDB's WAL before the statement is acknowledged. Tables are read through the
//! [`ColumnarTable`] cache, which is rebuilt from the durable table logs on start.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod catalog_record;
mod chunk_ids;
pub mod cold;
pub mod columnar;
pub mod db;
pub mod error;
pub mod index;
pub mod key_index;
pub mod log_entry;
pub mod rows;
pub mod state;
mod state_recovery;
pub mod state_tier;
pub mod stored_rows;
#[cfg(test)]
mod test_util;
pub mod view_contents;

pub use catalog_record::{CatalogRecord, ObjectKind};
pub use cold::{ColdFile, ColdStore, RowFilter};
pub use columnar::ColumnarTable;
pub use columnar::snapshot::{CacheStats, LogPart, SnapshotPart, TableSnapshot, TieredSnapshot};
pub use db::Store;
pub use db::write_set::WriteSet;
pub use error::{Result, StorageError};
pub use index::SecondaryIndex;
pub use log_entry::LogEntry;
pub use rows::RowId;
pub use state::{EncodeFn, SizeFn, StateCounters, StateKey, StateStore, TieredState};
pub use state_tier::{StateLocation, StateTier};
pub use stored_rows::StoredRows;
pub use view_contents::ViewContents;
