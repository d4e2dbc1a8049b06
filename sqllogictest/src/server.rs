//! A real `millrace serve` process for tests: free loopback port, temp data dir, kill/restart.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the `millrace` binary: `$MILLRACE_BIN`, else next to the test executable.
pub fn millrace_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MILLRACE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target/<profile>/millrace
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    profile_dir.join("millrace")
}

/// A running server.
pub struct TestServer {
    /// The process.
    child: Option<Child>,
    /// Port it listens on.
    pub port: u16,
    /// Its data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// Keeps the temp directory alive.
    _tmp: Option<tempfile::TempDir>,
    /// Extra command-line arguments.
    args: Vec<String>,
    /// Where the server's log goes.
    pub log_path: PathBuf,
    /// Extra environment variables.
    envs: Vec<(String, String)>,
}

/// A loopback port nothing listens on (at the moment of asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl TestServer {
    /// Starts a server on a fresh temporary data directory.
    pub fn start(args: &[&str]) -> std::io::Result<TestServer> {
        Self::start_with_env(args, &[])
    }

    /// Starts a server with extra environment variables (e.g. `AWS_*` for an object store).
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> std::io::Result<TestServer> {
        let tmp = tempfile::tempdir()?;
        let data_dir = tmp.path().join("data");
        let log_path = tmp.path().join("server.log");
        let mut s = TestServer {
            child: None,
            port: free_port(),
            data_dir,
            _tmp: Some(tmp),
            args: args.iter().map(|s| s.to_string()).collect(),
            log_path,
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        // NOTE: a free port may be taken by another test's server before ours binds it;
        // then ours exits saying it cannot listen, and starts again on another port.
        let mut attempts = 0;
        loop {
            match s.spawn() {
                Err(_) if attempts < 3 && s.log().contains("cannot listen on") => {
                    attempts += 1;
                    s.port = free_port();
                }
                result => return result.map(|()| s),
            }
        }
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let ready_before = self.ready_lines();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(millrace_bin())
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env(
                "MILLRACE_LOG",
                std::env::var("MILLRACE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        self.child = Some(child);
        self.wait_ready(ready_before)
    }

    /// Waits until the child listens. The port answering is not enough: another process
    /// (a test's S3 server, say) may have taken the same free port, and then our child
    /// fails to bind and exits. Where the log shows `info`, the child's own line saying it
    /// listens (one more than before this start) must be there too.
    fn wait_ready(&mut self, ready_before: usize) -> std::io::Result<()> {
        let logs_info = std::env::var("MILLRACE_LOG")
            .map(|l| ["info", "debug", "trace"].iter().any(|w| l.contains(w)))
            .unwrap_or(true);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(std::io::Error::other(format!(
                    "millrace exited during start-up ({status}); log:\n{}",
                    self.log()
                )));
            }
            let listening = !logs_info || self.ready_lines() > ready_before;
            if listening && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("millrace did not start listening"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many times the log says a server started listening.
    fn ready_lines(&self) -> usize {
        self.log().matches("millrace is ready").count()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// libpq-style connection string for a database.
    pub fn conn_str(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=millrace dbname={database}",
            self.port
        )
    }

    /// Connects with tokio-postgres; the connection task runs on the current runtime.
    pub async fn connect(
        &self,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&self.conn_str(database), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Kills the process with SIGKILL (no clean shutdown), like `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for a clean exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }

    /// Starts the server again on the same data directory and port, with other arguments.
    pub fn restart_with_args(&mut self, args: &[&str]) -> std::io::Result<()> {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self.restart()
    }

    /// Starts the server again on the same data directory and port.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.spawn()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident set size now and at its peak, in bytes (VmRSS and VmHWM of /proc).
    pub fn rss(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Starts a new peak: VmHWM is set to the RSS now (`clear_refs` 5); false if it failed.
    pub fn reset_peak(&self) -> bool {
        self.pid()
            .is_some_and(|pid| std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
    }

    /// Parquet files in the default object store (`objects` under the data directory).
    pub fn object_files(&self) -> usize {
        parquet_files(&self.data_dir.join("objects"))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// Parquet files under `dir`, in any depth of subdirectories.
pub fn parquet_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                parquet_files(&p)
            } else {
                usize::from(p.extension().is_some_and(|x| x == "parquet"))
            }
        })
        .sum()
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}
