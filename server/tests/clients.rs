//! Real client programs against a real server: `psql` meta-commands (`\d`, `\dt`, `\dn`,
//! `\l`) through pg_catalog, psycopg 3, asyncpg, SQLAlchemy + pandas (clients/python),
//! node-postgres (clients/node) and the PostgreSQL JDBC driver (clients/jdbc).

use std::path::PathBuf;
use std::process::Command;

use millrace_sqllogictest::TestServer;

fn clients_dir() -> PathBuf {
    std::env::current_dir()
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../clients")
}

#[test]
fn psql_describe_commands() {
    let server = TestServer::start(&[]).expect("start millrace");
    let out = Command::new("psql")
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"])
        .arg(server.port.to_string())
        .args(["-U", "millrace", "-d", "millrace", "-f"])
        .arg(clients_dir().join("psql/describe.sql"))
        .output()
        .expect("run psql (install postgresql-client)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "psql failed:\n{stdout}\n{stderr}\n{}",
        server.log()
    );
    // \dt lists the table; \d people shows its columns and types.
    assert!(stdout.contains("people"), "{stdout}");
    assert!(
        stdout.contains("Table \"public.people\""),
        "\\d output:\n{stdout}"
    );
    for needle in ["bigint", "text", "date", "name", "born"] {
        assert!(stdout.contains(needle), "missing {needle} in:\n{stdout}");
    }
    // \dn lists schemas, \l lists databases.
    assert!(stdout.contains("crm"), "{stdout}");
    assert!(stdout.contains("millrace"), "{stdout}");
    assert!(stdout.contains("Ada"), "{stdout}");
}

/// Runs one script of clients/python against a fresh server and checks its success line.
fn python_client(script: &str, ok_line: &str) {
    let server = TestServer::start(&[]).expect("start millrace");
    let out = Command::new("python3")
        .arg(clients_dir().join("python").join(script))
        .arg(server.port.to_string())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(ok_line),
        "{script} failed:\n{stdout}\n{stderr}\n{}",
        server.log()
    );
}

#[test]
fn psycopg_round_trip() {
    python_client("test_psycopg.py", "psycopg: ok");
}

#[test]
fn asyncpg_round_trip() {
    python_client("test_asyncpg.py", "asyncpg: ok");
}

#[test]
fn sqlalchemy_and_pandas_read_sql() {
    python_client("test_sqlalchemy_pandas.py", "sqlalchemy+pandas: ok");
}

#[test]
fn node_postgres_round_trip() {
    let server = TestServer::start(&[]).expect("start millrace");
    let out = Command::new("node")
        .arg(clients_dir().join("node/test_pg.js"))
        .arg(server.port.to_string())
        .output()
        .expect("run node (install nodejs)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("node-pg: ok"),
        "node-postgres test failed:\n{stdout}\n{stderr}\n{}",
        server.log()
    );
}

#[test]
fn jdbc_round_trip() {
    let server = TestServer::start(&[]).expect("start millrace");
    let classes = tempfile::tempdir().expect("temp dir");
    let jar = "/usr/share/java/postgresql.jar";
    let compiled = Command::new("javac")
        .arg("-d")
        .arg(classes.path())
        .args(["-cp", jar])
        .arg(clients_dir().join("jdbc/JdbcTest.java"))
        .output()
        .expect("run javac (install a JDK)");
    assert!(
        compiled.status.success(),
        "javac failed:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{}:{jar}", classes.path().display()))
        .arg("JdbcTest")
        .arg(server.port.to_string())
        .output()
        .expect("run java");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("jdbc: ok"),
        "JDBC test failed:\n{stdout}\n{stderr}\n{}",
        server.log()
    );
}
