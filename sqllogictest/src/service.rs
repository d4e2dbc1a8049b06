//! A test service process (the Kafka broker, the S3 server): a binary found in the CI tool
//! cache, started on loopback with its log in a temporary directory, waited for until it
//! listens, frozen and thawed with SIGSTOP / SIGCONT, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of tool `name`: `$<env>`, else `~/.cache/millrace/tools/bin/<name>` (where
/// `.ci/install-deps --with-test-services` builds it), else `name` on PATH.
pub fn tool_bin(env: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let cached = std::env::var("HOME")
        .map(|h| {
            PathBuf::from(h)
                .join(".cache/millrace/tools/bin")
                .join(name)
        })
        .unwrap_or_default();
    if cached.exists() {
        return cached;
    }
    PathBuf::from(name)
}

/// A running service.
pub struct Service {
    child: Child,
    /// Port it listens on.
    pub port: u16,
    log_path: PathBuf,
}

impl Service {
    /// Starts `bin` with `args`, logging into `dir`, and waits until `port` accepts
    /// connections.
    pub fn start(
        bin: PathBuf,
        args: &[String],
        port: u16,
        dir: &std::path::Path,
    ) -> std::io::Result<Self> {
        let log_path = dir.join("service.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| {
                std::io::Error::other(format!(
                    "cannot start the test service {} ({e}); run .ci/install-deps --with-test-services",
                    bin.display()
                ))
            })?;
        let service = Service {
            child,
            port,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "{} did not start listening; log:\n{}",
                    bin.display(),
                    service.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(service)
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Freezes the service: it keeps its connections but answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws a paused service.
    pub fn resume(&self) {
        self.signal("CONT");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
