//! A real PostgreSQL 15 on loopback, the oracle of SQL semantics: a fresh cluster in a
//! temporary directory (C collation and UTF-8, so text orders by bytes as in Millrace), on a
//! free port, stopped and removed on drop. Found at `$PG_BIN`, else Debian's
//! `/usr/lib/postgresql/15/bin` (`.ci/install-deps` installs the package). PostgreSQL will
//! not run as root: as root the cluster runs as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::server::free_port;

/// A running PostgreSQL cluster.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// Port it listens on (127.0.0.1).
    pub port: u16,
    as_postgres: bool,
}

/// Where PostgreSQL's server binaries are: `$PG_BIN`, else Debian's PostgreSQL 15.
pub fn pg_bin() -> PathBuf {
    std::env::var("PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Postgres {
    /// Creates a cluster and starts it; the error says what is missing.
    pub fn start() -> std::io::Result<Postgres> {
        let bin = pg_bin();
        if !bin.join("postgres").exists() {
            return Err(std::io::Error::other(format!(
                "PostgreSQL 15 is not installed at {} (run .ci/install-deps, or set PG_BIN)",
                bin.display()
            )));
        }
        let dir = tempfile::tempdir()?;
        let as_postgres = is_root();
        let pg = Postgres {
            bin,
            port: free_port(),
            dir,
            as_postgres,
        };
        if as_postgres {
            pg.run_plain("chown", &["-R", "postgres", &pg.path().to_string_lossy()])?;
        }
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--locale=C",
                "--encoding=UTF8",
            ],
        )?;
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off \
             -c synchronous_commit=off -c max_connections=50",
            pg.port,
            pg.path().display()
        );
        let log = pg.path().join("postgres.log");
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-o",
                &options,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", pg.port)).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "PostgreSQL did not start listening; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(pg)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn data_dir(&self) -> String {
        self.path().join("data").to_string_lossy().into_owned()
    }

    fn run_plain(&self, program: &str, args: &[&str]) -> std::io::Result<()> {
        let out = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Runs one of PostgreSQL's programs, as the `postgres` user when we are root.
    fn run(&self, program: &str, args: &[&str]) -> std::io::Result<()> {
        let path = self.bin.join(program).to_string_lossy().into_owned();
        if self.as_postgres {
            let mut full = vec!["-u", "postgres", "--", path.as_str()];
            full.extend_from_slice(args);
            self.run_plain("runuser", &full)
        } else {
            self.run_plain(&path, args)
        }
    }

    /// A connection string for tokio-postgres.
    pub fn conn_str(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// Connects, driving the connection on the current tokio runtime.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.conn_str(), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}
