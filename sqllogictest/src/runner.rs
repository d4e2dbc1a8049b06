//! Runs `.slt` files record by record against a server, each file in its own database, and
//! counts passes and failures (a failing record does not stop the file).

use std::path::{Path, PathBuf};

use sqllogictest::{DefaultColumnType, Record, RecordOutput, Runner};

use crate::db::MillraceDb;
use crate::server::TestServer;

/// Outcome of one file.
#[derive(Debug, Default, Clone)]
pub struct FileResult {
    /// The file.
    pub path: PathBuf,
    /// Records that ran and passed.
    pub passed: usize,
    /// Records that failed, with their messages.
    pub failures: Vec<String>,
}

/// Runs one file in a fresh database named after `index`.
pub async fn run_file(server: &TestServer, path: &Path, index: usize) -> FileResult {
    let mut result = FileResult {
        path: path.to_path_buf(),
        ..Default::default()
    };
    let db_name = format!("slt_{index}");
    match server.connect("millrace").await {
        Ok(admin) => {
            let _ = admin
                .simple_query(&format!("DROP DATABASE IF EXISTS {db_name}"))
                .await;
            if let Err(e) = admin
                .simple_query(&format!("CREATE DATABASE {db_name}"))
                .await
            {
                result.failures.push(format!("create database: {e}"));
                return result;
            }
        }
        Err(e) => {
            result.failures.push(format!("connect: {e}"));
            return result;
        }
    }
    let records = match sqllogictest::parse_file::<DefaultColumnType>(path) {
        Ok(r) => r,
        Err(e) => {
            result.failures.push(format!("parse: {e}"));
            return result;
        }
    };
    let conn_str = server.conn_str(&db_name);
    let mut runner = Runner::new(move || {
        let conn_str = conn_str.clone();
        async move {
            let (client, conn) = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls)
                .await
                .map_err(crate::db::DbError)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(MillraceDb::new(client))
        }
    });
    runner.add_label("postgresql");
    runner.add_label("millrace");
    for record in records {
        let halt = matches!(record, Record::Halt { .. });
        match runner.run_async(record).await {
            Ok(RecordOutput::Nothing) => {}
            Ok(_) => result.passed += 1,
            Err(e) => result.failures.push(e.display(false).to_string()),
        }
        if halt {
            break;
        }
    }
    drop(runner);
    if let Ok(admin) = server.connect("millrace").await {
        let _ = admin
            .simple_query(&format!("DROP DATABASE IF EXISTS {db_name}"))
            .await;
    }
    result
}

/// All `.slt` files under a directory, sorted.
pub fn slt_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "slt") {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out
}
