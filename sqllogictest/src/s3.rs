//! A real S3-compatible server for tests: `s3s-fs` serving a temporary directory on a free
//! loopback port (a bucket is a sub-directory), with pause / resume (SIGSTOP / SIGCONT) to
//! make it unreachable.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::server::free_port;

/// The access key the test server accepts.
pub const ACCESS_KEY: &str = "millrace-test";
/// The secret key the test server accepts.
pub const SECRET_KEY: &str = "millrace-test-secret";

/// Path of the `s3s-fs` binary: `$S3S_FS_BIN`, else the CI tool cache, else on PATH.
pub fn s3s_fs_bin() -> PathBuf {
    if let Ok(p) = std::env::var("S3S_FS_BIN") {
        return PathBuf::from(p);
    }
    let cached = std::env::var("HOME")
        .map(|h| PathBuf::from(h).join(".cache/millrace/tools/bin/s3s-fs"))
        .unwrap_or_default();
    if cached.exists() {
        return cached;
    }
    PathBuf::from("s3s-fs")
}

/// A running S3 server, killed on drop.
pub struct S3Server {
    child: Child,
    /// Port it listens on.
    pub port: u16,
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
        let log = std::fs::File::create(tmp.path().join("s3s.log"))?;
        let child = Command::new(s3s_fs_bin())
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(port.to_string())
            .arg("--access-key")
            .arg(ACCESS_KEY)
            .arg("--secret-key")
            .arg(SECRET_KEY)
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| {
                std::io::Error::other(format!(
                    "cannot start the test S3 server {} ({e}); run .ci/install-deps",
                    s3s_fs_bin().display()
                ))
            })?;
        let server = S3Server {
            child,
            port,
            root,
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other("s3s-fs did not start listening"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Freezes the server: connections hang.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws a paused server.
    pub fn resume(&self) {
        self.signal("CONT");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
