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

/// Runs a client program, given the port of a fresh server as its last argument, and checks
/// that it succeeds and prints its success line.
fn client_program(program: &str, args: &[&std::ffi::OsStr], ok_line: &str) {
    let server = TestServer::start(&[]).expect("start millrace");
    let out = Command::new(program)
        .args(args)
        .arg(server.port.to_string())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(ok_line),
        "{program} {args:?} failed:\n{stdout}\n{stderr}\n{}",
        server.log()
    );
}

fn python_client(script: &str, ok_line: &str) {
    let path = clients_dir().join("python").join(script);
    client_program("python3", &[path.as_os_str()], ok_line);
}

#[test]
fn psycopg_round_trip() {
    python_client("test_psycopg.py", "psycopg: ok");
}

#[test]
fn psycopg_subscribe_feeds() {
    python_client("test_subscribe.py", "subscribe: ok");
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
    let path = clients_dir().join("node/test_pg.js");
    client_program("node", &[path.as_os_str()], "node-pg: ok");
}

#[test]
fn jdbc_round_trip() {
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
    let classpath = format!("{}:{jar}", classes.path().display());
    client_program(
        "java",
        &["-cp".as_ref(), classpath.as_ref(), "JdbcTest".as_ref()],
        "jdbc: ok",
    );
}
