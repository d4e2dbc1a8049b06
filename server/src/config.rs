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
