//! `CREATE SINK ... WITH (connector = 'file', path = '/dir')`: one file per change, named by
//! its sequence number (`00000000000000000042.jsonl`), written to a hidden temporary name,
//! synced, then renamed into place. A reader never sees half a file, and delivering the same
//! change again after a crash rewrites the same file with the same bytes: exactly once.

use std::path::PathBuf;

use crate::catalog::options::ConnectorOptions;
use crate::error::{Result, ServerError};

/// A directory receiving a sink's changes.
#[derive(Debug, Clone)]
pub struct FileTarget {
    dir: PathBuf,
}

impl FileTarget {
    /// The target named by `path`.
    pub fn try_new(options: &ConnectorOptions) -> Result<Self> {
        let dir = options.required(&["path"])?;
        Ok(Self {
            dir: PathBuf::from(dir.strip_prefix("file://").unwrap_or(&dir)),
        })
    }

    /// Writes change `seq` atomically.
    pub async fn deliver(&self, seq: u64, payload: &str) -> Result<()> {
        let dir = self.dir.clone();
        let payload = payload.to_string();
        tokio::task::spawn_blocking(move || write_atomically(&dir, seq, &payload))
            .await
            .map_err(|e| ServerError::Internal(format!("file sink task: {e}")))?
    }
}

fn write_atomically(dir: &std::path::Path, seq: u64, payload: &str) -> Result<()> {
    use std::io::Write;
    let fail = |what: &str, e: std::io::Error| {
        ServerError::Connector(format!("file sink {}: {what}: {e}", dir.display()))
    };
    let name = format!("{seq:020}.jsonl");
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(|e| fail("create", e))?;
    file.write_all(payload.as_bytes())
        .map_err(|e| fail("write", e))?;
    file.sync_all().map_err(|e| fail("sync", e))?;
    std::fs::rename(&tmp, dir.join(&name)).map_err(|e| fail("rename", e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("sync directory", e))
}
