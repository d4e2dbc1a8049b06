//! Rewriting a spilled table's log: compaction (at a checkpoint, once the log has grown well
//! past the table's rows) and `ALTER TABLE ... ADD COLUMN` read the table a chunk at a time
//! from its cold files and commit the new log in parts, invisible until one last write
//! switches to it. With every chunk cold (`--cache-bytes 1`), the test makes a table whose log
//! is mostly small changes, then:
//! - a compaction whose write is refused fails cleanly and the old log still replays;
//! - a compaction that succeeds keeps exactly the model's rows, through `kill -9`; its log
//!   refers to the cold chunks' files, which the restart opens (and keeps, removing only
//!   files nothing refers to);
//! - a refused ALTER TABLE leaves the table as it was; a successful one gives every row the
//!   new column's default, through `kill -9`;
//! - a view over the table equals its query throughout.

use std::collections::BTreeMap;

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::rows::{TextRow, exec, number, one, rows};
use tokio_postgres::Client;

/// id -> s
type Model = BTreeMap<i64, String>;

async fn check(client: &Client, model: &Model, when: &str) {
    let got = rows(client, "SELECT id, s FROM t").await;
    // NOTE: `rows` sorts the text rows.
    let mut want: Vec<TextRow> = model
        .iter()
        .map(|(id, s)| vec![Some(id.to_string()), Some(s.clone())])
        .collect();
    want.sort();
    if let Some((g, w)) = got.iter().zip(&want).find(|(g, w)| g != w) {
        panic!("{when}: row {g:?}, want {w:?}");
    }
    assert_eq!(got.len(), want.len(), "{when}: rows");
    let view = rows(client, "SELECT n, total FROM v").await;
    let total: i64 = model.keys().sum();
    assert_eq!(
        view,
        vec![vec![Some(model.len().to_string()), Some(total.to_string())]],
        "{when}: the view"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilled_logs_are_rewritten_a_chunk_at_a_time_and_atomically() {
    // NOTE: checkpoints (which compact) only when the test asks: a periodic one could
    // compact before the refused CHECKPOINT below.
    let mut server = TestServer::start(&[
        "--cache-bytes",
        "1",
        "--failpoints",
        "--checkpoint-interval-ms",
        "3600000",
    ])
    .expect("start server");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE t (id BIGINT PRIMARY KEY, s TEXT)").await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW v AS SELECT count(*) AS n, sum(id) AS total FROM t",
    )
    .await;
    let mut model = Model::new();
    exec(
        &client,
        "INSERT INTO t SELECT v, 'row ' || v FROM generate_series(1, 20000) t(v)",
    )
    .await;
    for id in 1..=20_000 {
        model.insert(id, format!("row {id}"));
    }
    // 400 one-row changes: the log holds far more entries than a 64th of the rows.
    for i in 0..400i64 {
        match i % 4 {
            0 => {
                exec(&client, &format!("DELETE FROM t WHERE id = {}", i * 37 + 1)).await;
                model.remove(&(i * 37 + 1));
            }
            1 => {
                let id = i * 41 + 2;
                exec(&client, &format!("UPDATE t SET s = 'u{i}' WHERE id = {id}")).await;
                if let Some(s) = model.get_mut(&id) {
                    *s = format!("u{i}");
                }
            }
            _ => {
                let id = 100_000 + i;
                exec(&client, &format!("INSERT INTO t VALUES ({id}, 'new {i}')")).await;
                model.insert(id, format!("new {i}"));
            }
        }
    }
    check(&client, &model, "before compaction").await;
    let cold = number(
        &client,
        "SELECT cold_chunks FROM millrace_cache WHERE name = 't'",
    )
    .await;
    assert!(cold > 0, "the table is spilled");

    // A refused write in the middle of the rewrite: the checkpoint fails, nothing changes.
    exec(&client, "SET millrace.inject_write_failures = 1").await;
    let refused = client.simple_query("CHECKPOINT").await;
    assert!(
        refused.is_err(),
        "a compaction whose write is refused fails"
    );
    assert!(
        !server.log().contains("compacted table log"),
        "nothing was compacted"
    );
    check(&client, &model, "after a refused compaction").await;
    exec(&client, "CHECKPOINT").await;
    assert!(
        server.log().contains("compacted table log"),
        "the log was compacted"
    );
    check(&client, &model, "after compaction").await;
    // The new log refers to the cold chunks' files instead of holding their rows.
    let log_files = number(
        &client,
        "SELECT log_files FROM millrace_cache WHERE name = 't'",
    )
    .await;
    assert!(log_files > 0, "the rewritten log refers to cold files");
    server.kill();
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    check(&client, &model, "after compaction and kill -9").await;
    // The restart opened those files (their rows were not read back and evicted again),
    // and removed only the files nothing refers to.
    let after = number(
        &client,
        "SELECT log_files FROM millrace_cache WHERE name = 't'",
    )
    .await;
    assert_eq!(after, log_files, "the restart opened the log's files");
    let mut on_disk = 0;
    for _ in 0..100 {
        let held = number(
            &client,
            "SELECT files FROM millrace_cache WHERE kind = 'total'",
        )
        .await;
        on_disk = server.object_files() as i64;
        if on_disk == held {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        on_disk,
        number(
            &client,
            "SELECT files FROM millrace_cache WHERE kind = 'total'"
        )
        .await,
        "every file on disk is held by a chunk or a log, and no other"
    );
    let replayed = server
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("table restored"))
        .unwrap_or_default()
        .to_string();
    let entries: usize = replayed
        .split("log_entries=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    assert!(
        entries < 10,
        "the compacted log replays a few entries: {replayed}"
    );
    assert!(
        replayed.contains(&format!("log_files={log_files}")),
        "the replay opened the files: {replayed}"
    );

    // ALTER TABLE: refused, then done.
    exec(&client, "SET millrace.inject_write_failures = 1").await;
    let refused = client
        .simple_query("ALTER TABLE t ADD COLUMN extra INT DEFAULT 7")
        .await;
    assert!(
        refused.is_err(),
        "an ALTER TABLE whose write is refused fails"
    );
    let columns = one(
        &client,
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 't'",
    )
    .await;
    assert_eq!(columns, "2", "the refused ALTER TABLE added no column");
    check(&client, &model, "after a refused ALTER TABLE").await;
    exec(&client, "ALTER TABLE t ADD COLUMN extra INT DEFAULT 7").await;
    let with_default = one(&client, "SELECT count(*) FROM t WHERE extra = 7").await;
    assert_eq!(with_default, model.len().to_string());
    check(&client, &model, "after ALTER TABLE").await;
    server.kill();
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    check(&client, &model, "after ALTER TABLE and kill -9").await;
    let with_default = one(&client, "SELECT count(*) FROM t WHERE extra = 7").await;
    assert_eq!(with_default, model.len().to_string(), "after kill -9");
    assert!(server.is_running());
}
