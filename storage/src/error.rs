//! Errors raised by the storage layer (RocksDB, log encoding, the columnar cache).

/// Errors raised while reading or writing durable state.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB refused an open, read or write.
    #[error("rocksdb: {0}")]
    RocksDb(#[from] rocksdb::Error),
    /// An Arrow batch could not be encoded, decoded or assembled.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A catalog record could not be (de)serialized.
    #[error("catalog record {key}: {source}")]
    CatalogRecord {
        /// The RocksDB key of the record.
        key: String,
        /// The serde error.
        source: serde_json::Error,
    },
    /// A stored value is not in the format this version writes.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// Which kind of value was bad.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// The object store holding cold chunks refused a read, write or delete.
    #[error("object store {0}")]
    ObjectStore(String),
    /// A cold chunk's Parquet file could not be written or read.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// An operator could not encode a state entry for the warm tier.
    #[error("state entry encoding: {0}")]
    StateCodec(String),
    /// A fault injected by a test (see `Store::inject_write_failures`).
    #[error("injected storage fault: {0}")]
    Injected(String),
    /// A lock whose holder panicked.
    #[error(transparent)]
    Poisoned(#[from] Poisoned),
}

/// A lock whose holder panicked, named by what it guards: every crate's error converts from
/// it, so one helper ([`LockResultExt::or_poisoned`]) serves every lock.
#[derive(Debug, thiserror::Error)]
#[error("{0} lock poisoned")]
pub struct Poisoned(pub &'static str);

/// Turns a poisoned lock's result into a [`Poisoned`] error naming what the lock guards.
pub trait LockResultExt<G> {
    /// The guard, or the error that the lock guarding `what` is poisoned.
    fn or_poisoned(self, what: &'static str) -> std::result::Result<G, Poisoned>;
}

impl<G> LockResultExt<G> for std::sync::LockResult<G> {
    fn or_poisoned(self, what: &'static str) -> std::result::Result<G, Poisoned> {
        self.map_err(|_| Poisoned(what))
    }
}

impl From<object_store::Error> for StorageError {
    fn from(e: object_store::Error) -> Self {
        StorageError::ObjectStore(e.to_string())
    }
}

/// Result type of the storage crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
