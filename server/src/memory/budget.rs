//! How `--memory-limit` is shared out (RocksDB, queries, the columnar cache), and the object
//! store the cache evicts to.

use std::sync::Arc;
use std::time::Duration;

use millrace_storage::ColdStore;

use crate::error::{Result, ServerError};

/// How the memory limit is shared out.
#[derive(Debug, Clone, Copy)]
pub struct MemoryBudget {
    /// The whole limit, if any.
    pub limit: Option<u64>,
    /// RocksDB memtables and block cache.
    pub rocksdb: Option<u64>,
    /// DataFusion's memory pool for queries.
    pub queries: Option<u64>,
    /// Tables' and views' chunks and operator state.
    pub cache: Option<u64>,
    /// Whether the cache share was set on its own (`--cache-bytes`): chunks of any size are
    /// evicted.
    pub cache_only: bool,
}

impl MemoryBudget {
    /// The shares of `limit` (without a limit, only queries have a share: of the machine's
    /// memory); `cache` overrides the cache's.
    pub fn new(limit: Option<u64>, cache: Option<u64>) -> Self {
        let Some(limit) = limit else {
            return Self {
                limit: None,
                rocksdb: None,
                queries: default_query_pool(),
                cache,
                cache_only: cache.is_some(),
            };
        };
        let rocksdb = (limit / 8).max(8 << 20);
        let queries = (limit / 4).max(16 << 20);
        Self {
            limit: Some(limit),
            rocksdb: Some(rocksdb),
            queries: Some(queries),
            cache: cache.or(Some(limit.saturating_sub(rocksdb + queries).max(16 << 20))),
            cache_only: cache.is_some(),
        }
    }
}

/// The default size of the engine's query pool without `--memory-limit`: a quarter of the
/// machine's memory (or of the cgroup's limit, when lower), so that one runaway query
/// cannot take the process down; `None` where neither can be read.
pub fn default_query_pool() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let machine = match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    };
    machine.map(|m| (m / 4).max(64 << 20))
}

/// The object store chunks are evicted to: `s3://bucket/prefix` (with the `AWS_*`
/// environment) or a local directory; `objects` under the data dir by default.
pub fn cold_store(setting: Option<&str>, data_dir: &std::path::Path) -> Result<Arc<ColdStore>> {
    let invalid = |detail: String| ServerError::InvalidSetting {
        name: "object-store".into(),
        value: detail,
    };
    match setting {
        Some(url) if url.starts_with("s3://") => {
            let rest = &url["s3://".len()..];
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid(url.to_string()));
            }
            // NOTE: an unreachable store should fail an eviction pass in seconds (it is
            // retried on the next tick), not after object_store's three minutes of retries.
            let retry = object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
                ..object_store::RetryConfig::default()
            };
            let mut client = object_store::ClientOptions::new()
                .with_timeout(Duration::from_secs(10))
                .with_connect_timeout(Duration::from_secs(2));
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry);
            if let Ok(endpoint) = std::env::var("AWS_ENDPOINT")
                && endpoint.starts_with("http://")
            {
                client = client.with_allow_http(true);
            }
            builder = builder.with_client_options(client);
            if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err()
            {
                builder = builder.with_region("us-east-1");
            }
            let store = builder
                .build()
                .map_err(|e| invalid(format!("{url}: {e}")))?;
            let prefix = format!("{}/cache", prefix.trim_matches('/'));
            Ok(ColdStore::try_new(
                Arc::new(store),
                prefix.trim_start_matches('/'),
                url,
            )?)
        }
        _ => {
            let dir = setting
                .map(|s| std::path::PathBuf::from(s.strip_prefix("file://").unwrap_or(s)))
                .unwrap_or_else(|| data_dir.join("objects"));
            std::fs::create_dir_all(&dir)
                .map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
            Ok(ColdStore::try_new(
                Arc::new(fs),
                "cache",
                &dir.display().to_string(),
            )?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_limit_queries_get_a_share_of_the_machine() {
        let pool = default_query_pool().expect("/proc/meminfo on Linux");
        assert!(pool >= 64 << 20);
        assert_eq!(MemoryBudget::new(None, None).queries, Some(pool));
        assert_eq!(
            MemoryBudget::new(Some(1 << 30), None).queries,
            Some(256 << 20)
        );
    }
}
