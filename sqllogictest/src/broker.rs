//! A real Kafka broker for tests: the Rust broker `tansu` with in-memory storage on a free
//! loopback port, with topic creation and deletion, and pause / resume (SIGSTOP / SIGCONT)
//! to make it unreachable mid-stream.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::server::free_port;

/// Path of the `tansu` binary: `$TANSU_BIN`, else the CI tool cache, else `tansu` on PATH.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let cached = std::env::var("HOME")
        .map(|h| PathBuf::from(h).join(".cache/millrace/tools/bin/tansu"))
        .unwrap_or_default();
    if cached.exists() {
        return cached;
    }
    PathBuf::from("tansu")
}

/// A running broker, killed on drop.
pub struct Broker {
    child: Child,
    /// Port it listens on.
    pub port: u16,
    log_path: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Broker {
    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> std::io::Result<Broker> {
        let tmp = tempfile::tempdir()?;
        let port = free_port();
        let log_path = tmp.path().join("tansu.log");
        let log = std::fs::File::create(&log_path)?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_bin())
            .arg("broker")
            .arg("--listener-url")
            .arg(&url)
            .arg("--advertised-listener-url")
            .arg(&url)
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| {
                std::io::Error::other(format!(
                    "cannot start the test broker {} ({e}); run .ci/install-deps",
                    tansu_bin().display()
                ))
            })?;
        let broker = Broker {
            child,
            port,
            log_path,
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "tansu did not start listening; log:\n{}",
                    broker.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(broker)
    }

    /// `127.0.0.1:port`, as clients' bootstrap servers.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn topic_command(&self, args: &[&str]) -> std::io::Result<()> {
        let out = Command::new(tansu_bin())
            .arg("topic")
            .args(args)
            .arg("--broker")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "tansu topic {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Creates a topic with `partitions` partitions.
    pub fn create_topic(&self, name: &str, partitions: u32) -> std::io::Result<()> {
        self.topic_command(&["create", "--partitions", &partitions.to_string(), name])
    }

    /// Deletes a topic.
    pub fn delete_topic(&self, name: &str) -> std::io::Result<()> {
        self.topic_command(&["delete", name])
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Freezes the broker: it keeps its connections but answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws a paused broker.
    pub fn resume(&self) {
        self.signal("CONT");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
