//! Connector-fed tables end to end over the real protocol: datagen and nexmark tables ingest
//! at their rate, views over them match the batch oracle, `millrace_sources` reports them,
//! a `kill -9` mid-stream resumes from the committed offset with no gap and no duplicate
//! (checked against a reference table generated without a crash), and bad options are
//! refused with the right SQLSTATE before anything is created.

use std::time::Duration;

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::rows::{exec, one, rows};
use tokio_postgres::Client;

/// A result row of non-NULL text values.
fn row(values: &[&str]) -> Vec<Option<String>> {
    values.iter().map(|v| Some(v.to_string())).collect()
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
            row(&["bid", "nexmark", "3000", "0", "1500"]),
            row(&["bid_reference", "nexmark", "3000", "0", "1500"]),
            row(&["g", "datagen", "6000", "0", "4000"]),
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
    // NOTE: no checkpoints, so that the injected failures hit the source's commits only.
    let server =
        TestServer::start(&["--failpoints", "--checkpoint-interval-ms", "0"]).expect("start");
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

/// Polls until `sql` returns `want` (bounded).
async fn wait_for(client: &Client, sql: &str, want: &str) {
    let mut last = String::new();
    for _ in 0..500 {
        last = one(client, sql).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{sql}: {last}, want {want}");
}

fn write_file(dir: &std::path::Path, name: &str, bytes: &[u8]) {
    // Written aside and renamed into place, as the connector's docs ask of writers.
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sources_read_each_file_once_and_list_bad_records() {
    let files = tempfile::tempdir().expect("tempdir");
    let json = files.path().join("json");
    let csv = files.path().join("csv");
    std::fs::create_dir(&json).expect("mkdir");
    let mut first = Vec::new();
    first.extend_from_slice(b"{\"id\": 1, \"url\": \"a\", \"n\": 3}\n");
    first.extend_from_slice(b"{\"id\": 2, \"url\": \"b\"}\n");
    first.extend_from_slice(b"{bad json\n");
    first.extend_from_slice(b"{\"id\": \"x\", \"url\": \"c\"}\n");
    first.extend_from_slice(b"{\"url\": \"no id\"}\n");
    first.extend_from_slice(b"{\"id\": 5, \"url\": \"\xff\xfe\"}\n");
    first.extend_from_slice(
        format!("{{\"id\": 6, \"url\": \"{}\"}}\n", "z".repeat(3000)).as_bytes(),
    );
    first.extend_from_slice(b"{\"id\": 7, \"url\": [1, 2]}\n");
    first.extend_from_slice(b"\n{\"id\": 9, \"url\": \"a\", \"n\": 1}\n");
    write_file(&json, "001.jsonl", &first);

    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(
        &client,
        &format!(
            "CREATE TABLE ev (id BIGINT NOT NULL, url TEXT, n INT) WITH (connector = 'file', path = '{}', format = 'json', max_record_bytes = 2000, poll_interval_ms = 20)",
            json.display()
        ),
    )
    .await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW per_url AS SELECT url, count(*) AS c, sum(n) AS total FROM ev GROUP BY url",
    )
    .await;
    // The CSV source starts before its directory exists: unhealthy, then fine.
    exec(
        &client,
        &format!(
            "CREATE TABLE pts (x INT NOT NULL, label TEXT) WITH (connector = 'file', path = '{}', format = 'csv', csv.header = 'true', poll_interval_ms = 20)",
            csv.display()
        ),
    )
    .await;
    wait_for(
        &client,
        "SELECT \"offset\" FROM millrace_sources WHERE name = 'ev'",
        "1",
    )
    .await;
    assert_eq!(
        rows(&client, "SELECT id, url, n FROM ev").await,
        vec![
            vec![Some("1".into()), Some("a".into()), Some("3".into())],
            vec![Some("2".into()), Some("b".into()), None],
            vec![Some("9".into()), Some("a".into()), Some("1".into())],
        ]
    );
    let bad = rows(
        &client,
        "SELECT partition, \"offset\", reason FROM millrace_source_errors WHERE source = 'ev'",
    )
    .await;
    let lines: Vec<_> = bad
        .iter()
        .map(|r| r[1].clone().unwrap_or_default())
        .collect();
    assert_eq!(lines, ["3", "4", "5", "6", "7", "8"], "{bad:?}");
    for (row, needle) in bad.iter().zip([
        "malformed JSON",
        "is not a Int64",
        "missing required field \"id\"",
        "invalid UTF-8",
        "exceeds max_record_bytes",
        "is not a Utf8",
    ]) {
        assert_eq!(row[0].as_deref(), Some("001.jsonl"));
        assert!(
            row[2].as_deref().is_some_and(|r| r.contains(needle)),
            "{row:?} should say {needle}"
        );
    }
    let status = rows(
        &client,
        "SELECT status, reason LIKE '%cannot list%' FROM millrace_sources WHERE name = 'pts'",
    )
    .await;
    assert_eq!(
        status,
        vec![vec![Some("unhealthy".into()), Some("t".into())]]
    );
    std::fs::create_dir(&csv).expect("mkdir");
    write_file(
        &csv,
        "a.csv",
        b"x,label\n1,one\n2,\"two, quoted\"\nthree,3\n4\n5,\n",
    );
    wait_for(
        &client,
        "SELECT status FROM millrace_sources WHERE name = 'pts'",
        "running",
    )
    .await;
    wait_for(
        &client,
        "SELECT \"offset\" FROM millrace_sources WHERE name = 'pts'",
        "1",
    )
    .await;
    assert_eq!(
        rows(&client, "SELECT x, label FROM pts").await,
        vec![
            vec![Some("1".into()), Some("one".into())],
            vec![Some("2".into()), Some("two, quoted".into())],
            vec![Some("5".into()), None],
        ]
    );
    assert_eq!(
        one(&client, "SELECT string_agg(CAST(\"offset\" AS TEXT), ',' ORDER BY \"offset\") FROM millrace_source_errors WHERE source = 'pts'").await,
        "4,5"
    );

    // A new file is picked up; then kill -9 and restart: no file is read twice.
    write_file(
        &json,
        "002.jsonl",
        b"{\"id\": 10, \"url\": \"b\", \"n\": 4}\n",
    );
    wait_for(
        &client,
        "SELECT \"offset\" FROM millrace_sources WHERE name = 'ev'",
        "2",
    )
    .await;
    drop(client);
    server.kill();
    write_file(
        &json,
        "003.jsonl",
        b"{\"id\": 11, \"url\": \"c\", \"n\": 5}\n",
    );
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    wait_for(
        &client,
        "SELECT \"offset\" FROM millrace_sources WHERE name = 'ev'",
        "3",
    )
    .await;
    assert_eq!(
        rows(&client, "SELECT id FROM ev").await,
        ["1", "10", "11", "2", "9"]
            .iter()
            .map(|v| vec![Some(v.to_string())])
            .collect::<Vec<_>>()
    );
    assert_eq!(one(&client, "SELECT count(*) FROM pts").await, "3");
    assert_eq!(
        rows(&client, "SELECT * FROM per_url").await,
        rows(&client, "SELECT url, count(*), sum(n) FROM ev GROUP BY url").await
    );
}

/// Rows a source may have committed ahead of its views with `--epoch-queue 4`: the epochs the
/// coordinator merged into the step it is running (at most 4, the queue's capacity), the 4
/// queued behind them, and the one whose writer waits for room; each at most a batch of 8192
/// rows. Without back-pressure it would be most of the 200,000 rows.
const AHEAD_BOUND: i64 = (2 * 4 + 1) * 8192;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_view_slows_its_source_instead_of_queueing_rows() {
    let server = TestServer::start(&["--failpoints", "--epoch-queue", "4"]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    // Views take 20 µs per input row: at most 50k rows/s, far below what datagen produces.
    exec(&client, "SET millrace.slow_views_us_per_row = 20").await;
    // Reads must see the view behind its table, not wait until it caught up.
    exec(&client, "SET real_time_recency = off").await;
    exec(
        &client,
        "CREATE TABLE fast (id BIGINT) WITH (connector = 'datagen', rows_per_second = 10000000, total_rows = 200000)",
    )
    .await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW slow AS SELECT count(*) AS n FROM fast",
    )
    .await;
    let mut most_ahead = 0i64;
    let mut samples = 0;
    loop {
        // One statement: the table's committed rows against the view's count.
        let r = rows(
            &client,
            "SELECT (SELECT count(*) FROM fast), (SELECT coalesce(max(n), 0) FROM slow)",
        )
        .await;
        let table: i64 = r[0][0].as_deref().unwrap_or("0").parse().unwrap_or(0);
        let view: i64 = r[0][1].as_deref().unwrap_or("0").parse().unwrap_or(0);
        most_ahead = most_ahead.max(table - view);
        samples += 1;
        if view == 200_000 {
            break;
        }
        assert!(
            samples < 3000,
            "the view never caught up: {table} vs {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("the source ran at most {most_ahead} rows ahead of its view ({samples} samples)");
    assert!(
        most_ahead <= AHEAD_BOUND,
        "the source ran {most_ahead} rows ahead of its view; back-pressure should hold it to {AHEAD_BOUND}"
    );
    assert!(
        samples > 5,
        "the run was too short to observe back-pressure"
    );
    assert_eq!(one(&client, "SELECT count(*) FROM fast").await, "200000");
}
