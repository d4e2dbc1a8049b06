//! The memory budget (`--memory-limit`) and the cache manager that holds the process to it:
//! the shares of RocksDB, queries and the columnar cache, the eviction of chunks to the
//! object store and of operator state to the warm tier, and the resident memory of the
//! process tree it measures. It receives the catalog and the coordinator it watches; the
//! engine holds it.

pub mod budget;
pub mod cache;
pub mod resident;
pub mod staging;
pub mod statement;
pub mod system;
