//! Helpers shared by the benchmark binaries: sizes from the environment, the CPU time a
//! process used (servers and brokers share the cores, so CPU time is the fair figure), and a
//! millrace server process to start, kill and restart.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// Error type of the benchmark binaries.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A millrace server started by a benchmark, killed on drop.
pub struct Server {
    bin: String,
    port: u16,
    dir: std::path::PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Server {
    /// Starts `bin serve` on `port` with data directory `dir` and extra `args`; its log goes
    /// next to `dir`.
    pub fn start(
        bin: &str,
        port: u16,
        dir: std::path::PathBuf,
        args: &[String],
    ) -> Result<Self, Error> {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut s = Server {
            bin: bin.into(),
            port,
            dir,
            args: args.to_vec(),
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    /// Starts the process (again, after [`Server::kill`]).
    pub fn spawn(&mut self) -> Result<(), Error> {
        let child = Command::new(&self.bin)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--data-dir",
                &self.dir.display().to_string(),
            ])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.with_extension("log"))?)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// The process id (0 when not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Kills the process with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Connects, retrying while the server starts.
    pub async fn connect(&self) -> Result<Client, Error> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match tokio_postgres::connect(
                &format!(
                    "host=127.0.0.1 port={} user=millrace dbname=millrace",
                    self.port
                ),
                NoTls,
            )
            .await
            {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    return Ok(client);
                }
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident set size of process `pid` now and at its peak, in bytes (VmRSS, VmHWM).
pub fn rss(pid: u32) -> std::io::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> std::io::Result<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| std::io::Error::other(format!("/proc/{pid}/status: no {name}")))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The number in environment variable `name`, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) the process `pid` and its children have used, from
/// `/proc/<pid>/stat`: its own, its ended children's, and its running children's (a Kafka
/// source's fetch processes).
pub fn cpu_seconds(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = |what: &str| std::io::Error::other(format!("/proc/{pid}/stat: {what}"));
    // NOTE: fields after the parenthesised command name; utime, stime, cutime and cstime
    // are the 12th to 15th of them, in clock ticks (100 per second on Linux).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| bad("no command name"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> std::io::Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("no utime or stime"))
    };
    let mut ticks = field(11)? + field(12)? + field(13)? + field(14)?;
    for child in children(pid) {
        // NOTE: a child that ended in between counts in cutime once its parent reaps it.
        ticks += cpu_seconds(child).map(|s| s * 100.0).unwrap_or(0.0);
    }
    Ok(ticks / 100.0)
}

/// The running children of process `pid`, from `/proc/<pid>/task/*/children`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}
