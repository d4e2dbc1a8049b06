//! Command-line and environment configuration of `millrace serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Settings of a running server (`millrace serve --help`).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address the PostgreSQL protocol listens on.
    #[arg(long, env = "MILLRACE_LISTEN", default_value = "127.0.0.1:6566")]
    pub listen: SocketAddr,
    /// Directory holding the durable state (RocksDB).
    #[arg(long, env = "MILLRACE_DATA_DIR", default_value = "./millrace-data")]
    pub data_dir: PathBuf,
    /// Worker threads for query execution (default: number of cores).
    #[arg(long, env = "MILLRACE_WORKERS")]
    pub workers: Option<usize>,
    /// Lets sessions inject faults (`SET millrace.inject_write_failures = n`), for tests.
    #[arg(long, env = "MILLRACE_FAILPOINTS", hide = true)]
    pub failpoints: bool,
    /// Committed epochs that may wait for the views before writers and sources block
    /// (back-pressure); small values are for tests.
    #[arg(long, env = "MILLRACE_EPOCH_QUEUE", default_value_t = 256, hide = true)]
    pub epoch_queue: usize,
    /// Failures in a row after which a materialized view is marked failed instead of being
    /// restarted from its inputs.
    #[arg(long, env = "MILLRACE_VIEW_MAX_RESTARTS", default_value_t = 3)]
    pub view_max_restarts: u32,
    /// Milliseconds between checkpoints of the views' state (0: none; views are then
    /// rebuilt from their inputs after a restart).
    #[arg(long, env = "MILLRACE_CHECKPOINT_INTERVAL_MS", default_value_t = 1000)]
    pub checkpoint_interval_ms: u64,
    /// Memory the server may use, e.g. `2GiB` or `512MiB` (default: no limit). RocksDB,
    /// query execution and the columnar cache share it; when the cache is over its share the
    /// least recently used chunks of tables and views move to the object store.
    #[arg(long, env = "MILLRACE_MEMORY_LIMIT", value_parser = parse_bytes)]
    pub memory_limit: Option<u64>,
    /// Where evicted chunks go: `s3://bucket/prefix` (endpoint and credentials from the
    /// `AWS_*` environment) or a local directory (default: `objects` under the data dir).
    #[arg(long, env = "MILLRACE_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// Bytes the columnar cache may hold, overriding its share of `--memory-limit`; chunks of
    /// any size are then evicted (tests use a tiny value to make every chunk cold).
    #[arg(long, env = "MILLRACE_CACHE_BYTES", value_parser = parse_bytes, hide = true)]
    pub cache_bytes: Option<u64>,
    /// Bytes of input changes a view takes in one step; a larger epoch goes through the
    /// view in several (default: a 128th of `--memory-limit`, unbounded without a limit;
    /// tests use a tiny value to split every epoch).
    #[arg(long, env = "MILLRACE_STEP_BYTES", value_parser = parse_bytes, hide = true)]
    pub step_bytes: Option<u64>,
}

/// Parses a size: bytes, or a number with a unit (kB, MB, GB, KiB, MiB, GiB, TB, TiB).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 512MiB or 2GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    let bytes = number * scale;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is not a usable size"));
    }
    Ok(bytes as u64)
}

impl ServeConfig {
    /// Number of workers to use.
    pub fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            })
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5 GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("MiB").is_err());
    }
}
