//! Task failure without a crash, over the real protocol: a view whose pipeline fails is
//! rebuilt from its inputs inside the running server and catches up exactly (its query run
//! in batch is the oracle, and so is a SUBSCRIBE feed replayed row by row), while the other
//! views keep running; a view that keeps failing is marked failed after `max_restarts`
//! restarts and can be dropped, also after a `kill -9`; after a `kill -9` a view restores
//! its checkpointed state and catches up instead of being recomputed; `millrace_events`
//! tells the story.

use std::collections::BTreeMap;

use futures::StreamExt;
use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::rows::{exec, one, rows, sorted_rows, wait_for};
use tokio_postgres::Client;

/// `sql` sorted, for comparing a view with its query.
async fn sorted(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    sorted_rows(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Event kinds recorded for `view`, oldest first.
async fn events(client: &Client, view: &str) -> Vec<String> {
    // NOTE: `rows` sorts as text; order by the sequence number here.
    let mut numbered: Vec<(u64, String)> = rows(
        client,
        &format!("SELECT seq, kind FROM millrace_events WHERE object = '{view}'"),
    )
    .await
    .into_iter()
    .filter_map(|r| {
        let seq = r.first()?.as_ref()?.parse().ok()?;
        Some((seq, r.get(1)?.clone()?))
    })
    .collect();
    numbered.sort();
    numbered.into_iter().map(|(_, kind)| kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_view_is_rebuilt_from_its_inputs_and_catches_up_exactly() {
    let server = TestServer::start(&["--failpoints"]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    let feed_client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE t (k INT, v INT)").await;
    exec(
        &client,
        "INSERT INTO t SELECT value, value * 3 % 17 FROM generate_series(1, 2000)",
    )
    .await;
    let agg_query = "SELECT k % 7 AS g, count(*) AS n, sum(v) AS s FROM t GROUP BY k % 7";
    exec(
        &client,
        &format!("CREATE MATERIALIZED VIEW agg AS {agg_query}"),
    )
    .await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW above AS SELECT g, s FROM agg WHERE n > 290",
    )
    .await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW other AS SELECT count(*) AS n FROM t",
    )
    .await;

    let feed = feed_client
        .copy_out("COPY (SUBSCRIBE TO agg) TO STDOUT")
        .await
        .expect("subscribe");
    let reader = tokio::spawn(async move {
        let mut feed = Box::pin(feed);
        let mut lines = Vec::new();
        while let Some(chunk) = feed.next().await {
            let Ok(chunk) = chunk else { break };
            lines.extend(String::from_utf8_lossy(&chunk).lines().map(str::to_string));
        }
        lines
    });

    // The next step of agg fails; the write that triggers it is still acknowledged, and
    // the other views take it.
    exec(&client, "SET millrace.fail_view_steps = 'agg:1'").await;
    exec(
        &client,
        "INSERT INTO t SELECT value, value % 5 FROM generate_series(2001, 2300)",
    )
    .await;
    assert_eq!(one(&client, "SELECT n FROM other").await, "2300");
    // More writes while agg recovers.
    exec(&client, "DELETE FROM t WHERE k % 11 = 0").await;
    exec(&client, "UPDATE t SET v = v + 1 WHERE k % 13 = 0").await;
    wait_for(
        &client,
        "SELECT status || ':' || restarts FROM millrace_views WHERE name = 'agg'",
        "running:1",
        "agg restarted once",
    )
    .await;
    assert_eq!(
        sorted(&client, "SELECT * FROM agg").await,
        sorted(&client, agg_query).await,
        "the rebuilt view equals its query"
    );
    assert_eq!(
        sorted(&client, "SELECT * FROM above").await,
        sorted(
            &client,
            &format!("SELECT g, s FROM ({agg_query}) q WHERE n > 290")
        )
        .await,
        "the view built on it saw exactly the change it missed"
    );
    // It keeps being maintained.
    exec(&client, "INSERT INTO t VALUES (7, 100), (8, 200)").await;
    assert_eq!(
        sorted(&client, "SELECT * FROM agg").await,
        sorted(&client, agg_query).await
    );
    assert_eq!(
        one(&client, "SELECT count(*) FROM other").await,
        "1",
        "other view has its one row"
    );
    assert_eq!(
        one(&client, "SELECT n FROM other").await,
        one(&client, "SELECT count(*) FROM t").await
    );
    let kinds = events(&client, "agg").await;
    assert_eq!(
        kinds,
        ["task_failed", "view_restarting", "view_restarted"],
        "events of agg"
    );
    let detail = one(
        &client,
        "SELECT detail FROM millrace_events WHERE object = 'agg' AND kind = 'task_failed'",
    )
    .await;
    assert!(detail.contains("injected operator failure"), "{detail}");

    // The subscriber saw the snapshot and then exactly the changes: replaying its feed
    // gives the view.
    exec(&client, "DROP MATERIALIZED VIEW above").await;
    let want = sorted(&client, "SELECT * FROM agg").await;
    exec(&client, "DROP MATERIALIZED VIEW agg").await;
    let lines = tokio::time::timeout(std::time::Duration::from_secs(60), reader)
        .await
        .expect("the feed ended when the view was dropped")
        .expect("reader");
    let mut replay: BTreeMap<Vec<Option<String>>, i64> = BTreeMap::new();
    for line in &lines {
        let fields: Vec<&str> = line.split('\t').collect();
        let diff: i64 = fields[1].parse().expect("diff");
        let row: Vec<Option<String>> = fields[2..]
            .iter()
            .map(|f| (*f != "\\N").then(|| f.to_string()))
            .collect();
        *replay.entry(row).or_default() += diff;
    }
    let mut replayed: Vec<Vec<Option<String>>> = Vec::new();
    for (row, n) in replay {
        assert!(n >= 0, "row {row:?} deleted more often than inserted");
        for _ in 0..n {
            replayed.push(row.clone());
        }
    }
    replayed.sort();
    assert_eq!(replayed, want, "the feed replays to the view");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_that_keeps_failing_is_marked_failed_and_can_be_dropped() {
    let mut server = TestServer::start(&["--view-max-restarts", "2"]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE t (a INT, b INT)").await;
    exec(&client, "INSERT INTO t VALUES (10, 2)").await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW ratio AS SELECT a / b AS r FROM t",
    )
    .await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW total AS SELECT sum(a) AS s FROM t",
    )
    .await;
    // Every rebuild reads the row that divides by zero again.
    exec(&client, "INSERT INTO t VALUES (1, 0)").await;
    exec(&client, "INSERT INTO t VALUES (5, 1)").await;
    assert_eq!(one(&client, "SELECT s FROM total").await, "16");
    wait_for(
        &client,
        "SELECT status FROM millrace_views WHERE name = 'ratio'",
        "failed",
        "ratio given up on",
    )
    .await;
    assert_eq!(
        events(&client, "ratio").await,
        [
            "task_failed",
            "view_restarting",
            "task_failed",
            "view_restarting",
            "task_failed",
            "view_failed"
        ]
    );
    assert_eq!(
        one(
            &client,
            "SELECT restarts FROM millrace_views WHERE name = 'ratio'"
        )
        .await,
        "2"
    );
    let err = client
        .simple_query("SELECT * FROM ratio")
        .await
        .expect_err("a failed view must not answer");
    let db = err.as_db_error().expect("a database error");
    let message = db.message().to_lowercase();
    assert!(
        message.contains("ratio")
            && message.contains("divide by zero")
            && message.contains("given up after 2 restarts"),
        "{message}"
    );
    exec(&client, "INSERT INTO t VALUES (4, 4)").await;
    assert_eq!(one(&client, "SELECT s FROM total").await, "20");

    // After kill -9 the server starts, the failing view is reported, the others are
    // rebuilt, and the failing one can be dropped.
    drop(client);
    server.kill();
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    assert_eq!(one(&client, "SELECT s FROM total").await, "20");
    wait_for(
        &client,
        "SELECT status FROM millrace_views WHERE name = 'ratio'",
        "failed",
        "ratio failed again after the restart",
    )
    .await;
    exec(&client, "DROP MATERIALIZED VIEW ratio").await;
    assert_eq!(
        rows(&client, "SELECT name FROM millrace_views").await,
        vec![vec![Some("total".to_string())]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_restores_views_from_the_checkpoint_instead_of_recomputing_them() {
    // NOTE: only the explicit CHECKPOINT below, so that the changes after it are known.
    let mut server = TestServer::start(&["--checkpoint-interval-ms", "3600000"]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE t (k INT, v INT)").await;
    exec(
        &client,
        "INSERT INTO t SELECT value % 100, value FROM generate_series(1, 20000)",
    )
    .await;
    let query = "SELECT k, count(*) AS n, sum(v) AS s, min(v) AS mn FROM t GROUP BY k";
    exec(&client, &format!("CREATE MATERIALIZED VIEW agg AS {query}")).await;
    exec(&client, "CHECKPOINT").await;
    let written = rows(
        &client,
        "SELECT views, entries_written > 0 FROM millrace_checkpoints WHERE error IS NULL AND views > 0",
    )
    .await;
    assert!(
        written.contains(&vec![Some("1".into()), Some("t".into())]),
        "a checkpoint wrote the view: {written:?}"
    );
    // Changes after the checkpoint: caught up from the table log after the restart.
    exec(&client, "DELETE FROM t WHERE k = 5").await;
    exec(&client, "INSERT INTO t VALUES (5, 1), (1000, 2)").await;
    // Rows inserted after the checkpoint and then deleted or updated are caught up as
    // what is left of them: nothing, and the updated row once.
    exec(&client, "INSERT INTO t VALUES (2000, 3), (2000, 4)").await;
    exec(&client, "DELETE FROM t WHERE k = 2000").await;
    exec(&client, "UPDATE t SET v = v + 1 WHERE k = 1000").await;
    drop(client);
    server.kill();
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    assert_eq!(
        sorted(&client, "SELECT * FROM agg").await,
        sorted(&client, query).await
    );
    assert_eq!(
        events(&client, "agg").await,
        ["view_restored"],
        "restored, not rebuilt"
    );
    let detail = one(
        &client,
        "SELECT detail FROM millrace_events WHERE kind = 'checkpoint_replayed'",
    )
    .await;
    assert!(detail.starts_with("202 changes"), "{detail}");
    assert_eq!(
        one(
            &client,
            "SELECT backfill_rows_total FROM millrace_views WHERE name = 'agg'"
        )
        .await,
        "0",
        "no backfill ran"
    );
    // And it keeps being maintained.
    exec(&client, "UPDATE t SET v = v + 1 WHERE k = 7").await;
    assert_eq!(
        sorted(&client, "SELECT * FROM agg").await,
        sorted(&client, query).await
    );
}
