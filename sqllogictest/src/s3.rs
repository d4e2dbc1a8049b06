//! A real S3-compatible server for tests: `s3s-fs` serving a temporary directory on a free
//! loopback port (a bucket is a sub-directory), with pause / resume (SIGSTOP / SIGCONT) to
//! make it unreachable.

use std::path::PathBuf;

use crate::server::free_port;
use crate::service::{Service, tool_bin};

/// The access key the test server accepts.
pub const ACCESS_KEY: &str = "millrace-test";
/// The secret key the test server accepts.
pub const SECRET_KEY: &str = "millrace-test-secret";

/// A running S3 server, killed on drop.
pub struct S3Server {
    service: Service,
    /// The directory it serves.
    pub root: PathBuf,
    _tmp: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server with the given buckets and waits until it accepts connections.
    pub fn start(buckets: &[&str]) -> std::io::Result<S3Server> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("root");
        for bucket in buckets {
            std::fs::create_dir_all(root.join(bucket))?;
        }
        let port = free_port();
        let args = [
            "--host".to_string(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--access-key".into(),
            ACCESS_KEY.into(),
            "--secret-key".into(),
            SECRET_KEY.into(),
            root.display().to_string(),
        ];
        let service = Service::start(tool_bin("S3S_FS_BIN", "s3s-fs"), &args, port, tmp.path())?;
        Ok(S3Server {
            service,
            root,
            _tmp: tmp,
        })
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.service.port)
    }

    /// Freezes the server: connections hang.
    pub fn pause(&self) {
        self.service.pause();
    }

    /// Thaws a paused server.
    pub fn resume(&self) {
        self.service.resume();
    }
}
