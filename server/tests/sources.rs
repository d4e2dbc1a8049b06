//! Connector-fed tables end to end over the real protocol: datagen and nexmark tables ingest
//! at their rate, views over them match the batch oracle, `millrace_sources` reports them,
//! a `kill -9` mid-stream resumes from the committed offset with no gap and no duplicate
//! (checked against a reference table generated without a crash), and bad options are
//! refused with the right SQLSTATE before anything is created.

use std::time::Duration;

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::rows::sorted_rows;
use tokio_postgres::Client;

async fn rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    sorted_rows(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn exec(client: &Client, sql: &str) {
    if let Err(e) = client.simple_query(sql).await {
        panic!("{sql}: {e:?}");
    }
}

async fn one(client: &Client, sql: &str) -> String {
    rows(client, sql)
        .await
        .first()
        .and_then(|r| r[0].clone())
        .unwrap_or_else(|| panic!("{sql}: no value"))
}

/// Polls until every source is finished (bounded, so a stuck source fails the test).
async fn wait_finished(client: &Client, sources: usize) {
    for _ in 0..600 {
        let done = one(
            client,
            "SELECT count(*) FROM millrace_sources WHERE status = 'finished'",
        )
        .await;
        if done == sources.to_string() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "sources did not finish: {:?}",
        rows(
            client,
            "SELECT name, status, reason, \"offset\" FROM millrace_sources"
        )
        .await
    );
}

const DATAGEN: &str = "CREATE TABLE g (id BIGINT, name TEXT, score INT, at TIMESTAMP) WITH (connector = 'datagen', rows_per_second = 4000, total_rows = 6000, fields.score.kind = 'random', fields.score.max = 9, fields.name.length = 6)";

fn nexmark(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (auction BIGINT, bidder BIGINT, price BIGINT, channel TEXT, url TEXT, date_time TIMESTAMP, extra TEXT) WITH (connector = 'nexmark', nexmark.table.type = 'Bid', rows_per_second = 1500, total_rows = 3000)"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_resume_exactly_after_kill_9() {
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, DATAGEN).await;
    exec(&client, &nexmark("bid")).await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW per_score AS SELECT score, count(*) AS n, max(id) AS top FROM g GROUP BY score",
    )
    .await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW by_channel AS SELECT channel, count(*) AS n, sum(price) AS total FROM bid GROUP BY channel",
    )
    .await;
    // Kill mid-stream: some rows are in, not all.
    let mut ingested = 0;
    for _ in 0..200 {
        ingested = one(&client, "SELECT count(*) FROM g")
            .await
            .parse()
            .unwrap_or(0);
        if ingested >= 1500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        (1500..6000).contains(&ingested),
        "expected a partly ingested table at the kill, got {ingested} rows"
    );
    drop(client);
    server.kill();
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    let resumed = one(&client, "SELECT count(*) FROM g").await;
    assert!(
        resumed.parse::<i64>().unwrap_or(0) >= 1500,
        "committed rows lost at the kill: {resumed}"
    );
    // A reference generated start to finish without a crash.
    exec(&client, &nexmark("bid_reference")).await;
    wait_finished(&client, 3).await;

    // datagen: every offset exactly once.
    assert_eq!(
        rows(
            &client,
            "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM g"
        )
        .await,
        vec![vec![
            Some("6000".into()),
            Some("6000".into()),
            Some("0".into()),
            Some("5999".into())
        ]]
    );
    // nexmark: the same 3000 bids as the uninterrupted reference, none twice.
    for (a, b) in [("bid", "bid_reference"), ("bid_reference", "bid")] {
        let sql =
            format!("SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) AS d");
        assert_eq!(one(&client, &sql).await, "0", "{a} has rows {b} lacks");
    }
    assert_eq!(one(&client, "SELECT count(*) FROM bid").await, "3000");
    // Views equal their queries over exactly the ingested rows.
    assert_eq!(
        rows(&client, "SELECT * FROM per_score").await,
        rows(
            &client,
            "SELECT score, count(*), max(id) FROM g GROUP BY score"
        )
        .await
    );
    assert_eq!(
        rows(&client, "SELECT * FROM by_channel").await,
        rows(
            &client,
            "SELECT channel, count(*), sum(price) FROM bid GROUP BY channel"
        )
        .await
    );
    assert_eq!(rows(&client, "SELECT score FROM per_score").await.len(), 10);
    let status = rows(
        &client,
        "SELECT name, connector, \"offset\", errors, max_rows_per_second FROM millrace_sources",
    )
    .await;
    assert_eq!(
        status,
        vec![
            vec![
                Some("bid".into()),
                Some("nexmark".into()),
                Some("3000".into()),
                Some("0".into()),
                Some("1500".into())
            ],
            vec![
                Some("bid_reference".into()),
                Some("nexmark".into()),
                Some("3000".into()),
                Some("0".into()),
                Some("1500".into())
            ],
            vec![
                Some("g".into()),
                Some("datagen".into()),
                Some("6000".into()),
                Some("0".into()),
                Some("4000".into())
            ],
        ]
    );
    // Dropping a source's table stops it and removes it from millrace_sources.
    exec(&client, "DROP TABLE bid_reference").await;
    assert_eq!(
        one(
            &client,
            "SELECT count(*) FROM millrace_sources WHERE name = 'bid_reference'"
        )
        .await,
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_connector_options_are_refused() {
    let server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    let cases = [
        ("CREATE TABLE x (a INT) WITH (connector = 'nope')", "0A000"),
        (
            "CREATE TABLE x (a INT, oops TEXT) WITH (connector = 'nexmark', nexmark.table.type = 'Bid')",
            "0A000",
        ),
        (
            "CREATE TABLE x (a INT) WITH (connector = 'nexmark', nexmark.table.type = 'Nope')",
            "22023",
        ),
        (
            "CREATE TABLE x (a BYTEA) WITH (connector = 'datagen')",
            "0A000",
        ),
        (
            "CREATE TABLE x (a INT) WITH (connector = 'datagen', rows_per_second = 'fast')",
            "22023",
        ),
        (
            "CREATE TABLE x (a INT) WITH (connector = 'datagen', fields.a.kind = 'sideways')",
            "22023",
        ),
        ("CREATE TABLE x (a INT) WITH (fillfactor = 70)", "0A000"),
    ];
    for (sql, state) in cases {
        let err = client
            .simple_query(sql)
            .await
            .err()
            .unwrap_or_else(|| panic!("{sql} was accepted"));
        let code = err.code().map(|c| c.code().to_string());
        assert_eq!(code.as_deref(), Some(state), "{sql}: {err:?}");
    }
    // Nothing was created by the refused statements.
    assert_eq!(
        one(
            &client,
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'x'"
        )
        .await,
        "0"
    );
    assert_eq!(
        one(&client, "SELECT count(*) FROM millrace_sources").await,
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_source_turns_unhealthy_and_resumes_without_gap() {
    let server = TestServer::start(&["--failpoints"]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(
        &client,
        "CREATE TABLE f (id BIGINT, v INT) WITH (connector = 'datagen', rows_per_second = 2000, total_rows = 4000)",
    )
    .await;
    for _ in 0..200 {
        if one(&client, "SELECT count(*) FROM f").await != "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The next five durable commits fail: the source retries with backoff (0.1 s .. 1.6 s).
    exec(&client, "SET millrace.inject_write_failures = 5").await;
    let mut seen = None;
    for _ in 0..300 {
        let status = rows(
            &client,
            "SELECT status, reason, status_since IS NOT NULL, errors FROM millrace_sources",
        )
        .await;
        if status[0][0].as_deref() == Some("unhealthy") {
            seen = Some(status[0].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.expect("the source never turned unhealthy while its commits failed");
    assert!(
        seen[1]
            .as_deref()
            .is_some_and(|r| r.contains("write refused")),
        "unhealthy without the cause: {seen:?}"
    );
    assert_eq!(seen[2].as_deref(), Some("t"));
    assert!(
        server.log().contains("source unhealthy"),
        "no warning logged:\n{}",
        server.log()
    );
    wait_finished(&client, 1).await;
    assert_eq!(
        rows(
            &client,
            "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM f"
        )
        .await,
        vec![vec![
            Some("4000".into()),
            Some("4000".into()),
            Some("0".into()),
            Some("3999".into())
        ]]
    );
    assert_eq!(
        one(&client, "SELECT errors FROM millrace_sources").await,
        "5",
        "every failed commit is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_changes_the_rate_live_and_durably() {
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(
        &client,
        "CREATE TABLE r (id BIGINT) WITH (connector = 'datagen', rows_per_second = 1)",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let slow: i64 = one(&client, "SELECT count(*) FROM r")
        .await
        .parse()
        .unwrap_or(-1);
    assert!((0..=3).contains(&slow), "1 row/s gave {slow} rows in 1.5 s");
    exec(&client, "ALTER TABLE r SET (rows_per_second = 2000)").await;
    assert_eq!(
        one(&client, "SELECT max_rows_per_second FROM millrace_sources").await,
        "2000"
    );
    let mut fast = 0;
    for _ in 0..100 {
        fast = one(&client, "SELECT count(*) FROM r")
            .await
            .parse()
            .unwrap_or(0);
        if fast >= 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fast >= 1000, "the new rate did not apply: {fast} rows");
    let err = client
        .simple_query("ALTER TABLE r SET (connector = 'nexmark')")
        .await
        .err()
        .map(|e| e.code().map(|c| c.code().to_string()));
    assert_eq!(err, Some(Some("0A000".into())));
    // The new rate is part of the table's definition after a restart.
    drop(client);
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    assert_eq!(
        one(&client, "SELECT max_rows_per_second FROM millrace_sources").await,
        "2000"
    );
    let ids = rows(
        &client,
        "SELECT count(*) = count(DISTINCT id), min(id) FROM r",
    )
    .await;
    assert_eq!(ids, vec![vec![Some("t".into()), Some("0".into())]]);
}
