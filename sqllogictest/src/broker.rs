//! A real Kafka broker for tests: the Rust broker `tansu` with in-memory storage on a free
//! loopback port, with topic creation and deletion, and pause / resume (SIGSTOP / SIGCONT)
//! to make it unreachable mid-stream.

use std::process::Command;

use crate::server::free_port;
use crate::service::{Service, tool_bin};

/// A running broker, killed on drop.
pub struct Broker {
    service: Service,
    _tmp: tempfile::TempDir,
}

impl Broker {
    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> std::io::Result<Broker> {
        let tmp = tempfile::tempdir()?;
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let args = [
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ]
        .map(String::from);
        let service = Service::start(tool_bin("TANSU_BIN", "tansu"), &args, port, tmp.path())?;
        Ok(Broker { service, _tmp: tmp })
    }

    /// `127.0.0.1:port`, as clients' bootstrap servers.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.service.port)
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        self.service.log()
    }

    fn topic_command(&self, args: &[&str]) -> std::io::Result<()> {
        let out = Command::new(tool_bin("TANSU_BIN", "tansu"))
            .arg("topic")
            .args(args)
            .arg("--broker")
            .arg(format!("tcp://127.0.0.1:{}", self.service.port))
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

    /// Freezes the broker: it keeps its connections but answers nothing.
    pub fn pause(&self) {
        self.service.pause();
    }

    /// Thaws a paused broker.
    pub fn resume(&self) {
        self.service.resume();
    }
}
