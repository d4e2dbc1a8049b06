//! Materialized views end to end over the real protocol: rebuilt by backfill after a
//! `kill -9`, truly incremental on a 1M-row table (a one-row change reads a handful of state
//! entries, per `millrace_views`); a failing view's restarts are in `recovery.rs`.

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::rows::{exec, one, rows};

/// Subscribes with `sql` and reads the feed's lines until it ends.
async fn read_feed(
    client: &tokio_postgres::Client,
    sql: &str,
) -> tokio::task::JoinHandle<Vec<String>> {
    use futures::StreamExt;
    let feed = client.copy_out(sql).await.expect("subscribe");
    tokio::spawn(async move {
        let mut feed = Box::pin(feed);
        let mut lines = Vec::new();
        while let Some(chunk) = feed.next().await {
            let chunk = chunk.expect("feed chunk");
            lines.extend(String::from_utf8_lossy(&chunk).lines().map(str::to_string));
        }
        lines
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_are_rebuilt_after_kill_9_and_keep_being_maintained() {
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(
        &client,
        "CREATE TABLE o (id INT PRIMARY KEY, c TEXT, amount INT)",
    )
    .await;
    exec(
        &client,
        "INSERT INTO o VALUES (1, 'a', 10), (2, 'b', 5), (3, 'a', 7)",
    )
    .await;
    exec(&client, "CREATE MATERIALIZED VIEW per_c AS SELECT c, count(*) AS n, sum(amount) AS total FROM o GROUP BY c").await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW big AS SELECT c, total FROM per_c WHERE total > 6",
    )
    .await;
    exec(&client, "UPDATE o SET amount = 1 WHERE id = 2").await;
    let before = rows(&client, "SELECT * FROM per_c").await;
    let before_big = rows(&client, "SELECT * FROM big").await;
    assert_eq!(
        before,
        rows(&client, "SELECT c, count(*), sum(amount) FROM o GROUP BY c").await
    );
    drop(client);
    server.kill();
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    assert_eq!(rows(&client, "SELECT * FROM per_c").await, before);
    assert_eq!(rows(&client, "SELECT * FROM big").await, before_big);
    exec(&client, "INSERT INTO o VALUES (4, 'b', 100)").await;
    assert_eq!(
        rows(&client, "SELECT * FROM per_c").await,
        rows(&client, "SELECT c, count(*), sum(amount) FROM o GROUP BY c").await
    );
    assert_eq!(
        rows(&client, "SELECT * FROM big").await,
        rows(
            &client,
            "SELECT c, sum(amount) FROM o GROUP BY c HAVING sum(amount) > 6"
        )
        .await
    );
    let status = rows(
        &client,
        "SELECT name, status, backfill_percent FROM millrace_views",
    )
    .await;
    assert_eq!(
        status,
        vec![
            vec![
                Some("big".into()),
                Some("running".into()),
                Some("100".into())
            ],
            vec![
                Some("per_c".into()),
                Some("running".into()),
                Some("100".into())
            ],
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_row_change_to_a_million_row_table_reads_a_handful_of_state_rows() {
    let server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE big (id BIGINT, g INT, x INT)").await;
    exec(&client, "CREATE TABLE dim (g INT, name TEXT)").await;
    exec(
        &client,
        "INSERT INTO big SELECT value, CAST(value % 1000 AS INT), CAST(value % 7 AS INT) FROM generate_series(1, 1000000)",
    )
    .await;
    exec(&client, "INSERT INTO dim SELECT CAST(value AS INT), 'n' || CAST(value AS TEXT) FROM generate_series(0, 999)").await;
    exec(&client, "CREATE MATERIALIZED VIEW agg AS SELECT g, count(*) AS n, sum(id) AS s, max(x) AS mx FROM big GROUP BY g").await;
    exec(&client, "CREATE MATERIALIZED VIEW joined AS SELECT big.id, dim.name FROM big JOIN dim ON big.g = dim.g").await;
    assert_eq!(
        one(
            &client,
            "SELECT rows_processed FROM millrace_views WHERE name = 'agg'"
        )
        .await,
        "1000000"
    );
    assert_eq!(one(&client, "SELECT count(*) FROM joined").await, "1000000");
    exec(&client, "INSERT INTO big VALUES (2000001, 17, 3)").await;
    let figures = rows(
        &client,
        "SELECT name, last_epoch_rows, last_epoch_state_reads FROM millrace_views ORDER BY name",
    )
    .await;
    for row in &figures {
        let name = row[0].clone().unwrap_or_default();
        let rows_in: u64 = row[1].as_deref().unwrap_or("0").parse().unwrap_or(0);
        let reads: u64 = row[2].as_deref().unwrap_or("0").parse().unwrap_or(u64::MAX);
        assert_eq!(rows_in, 1, "{name}: the epoch carried one row");
        assert!(
            reads <= 16,
            "{name}: a one-row change read {reads} state rows (should be a handful)"
        );
    }
    assert_eq!(
        rows(&client, "SELECT * FROM agg WHERE g = 17").await,
        rows(
            &client,
            "SELECT g, count(*), sum(id), max(x) FROM big WHERE g = 17 GROUP BY g"
        )
        .await
    );
    assert_eq!(
        one(&client, "SELECT count(*) FROM joined WHERE id = 2000001").await,
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_does_not_hold_back_the_running_views() {
    let server = TestServer::start(&[]).expect("start");
    let creator = server.connect("millrace").await.expect("connect");
    let other = server.connect("millrace").await.expect("connect");
    exec(&creator, "CREATE TABLE small (k INT, v INT)").await;
    exec(
        &creator,
        "CREATE MATERIALIZED VIEW running AS SELECT k, sum(v) AS s FROM small GROUP BY k",
    )
    .await;
    exec(&creator, "CREATE TABLE huge (id BIGINT, g BIGINT)").await;
    exec(
        &creator,
        "INSERT INTO huge SELECT value, value % 100000 FROM generate_series(1, 2000000)",
    )
    .await;
    let create = tokio::spawn(async move {
        creator
            .simple_query("CREATE MATERIALIZED VIEW slow AS SELECT g, count(*) AS n, max(id) AS mx FROM huge GROUP BY g")
            .await
            .map(|_| ())
    });
    // Wait until the new view is backfilling (it is registered before its backfill starts).
    loop {
        let status = rows(
            &other,
            "SELECT status FROM millrace_views WHERE name = 'slow'",
        )
        .await;
        if status == vec![vec![Some("backfilling".to_string())]] {
            break;
        }
        assert!(
            status.is_empty(),
            "slow finished before it was observed: {status:?}"
        );
        tokio::task::yield_now().await;
    }
    // Meanwhile a write to another table reaches its view, and the backfill is still going.
    exec(&other, "INSERT INTO small VALUES (1, 41), (1, 1)").await;
    assert_eq!(one(&other, "SELECT s FROM running WHERE k = 1").await, "42");
    let progress = rows(
        &other,
        "SELECT status, backfill_rows_done < backfill_rows_total FROM millrace_views WHERE name = 'slow'",
    )
    .await;
    assert_eq!(
        progress,
        vec![vec![Some("backfilling".into()), Some("t".into())]],
        "the running view advanced while the backfill was still in progress"
    );
    create
        .await
        .expect("join")
        .expect("CREATE MATERIALIZED VIEW slow");
    assert_eq!(
        rows(&other, "SELECT * FROM slow WHERE g = 7").await,
        rows(
            &other,
            "SELECT g, count(*), max(id) FROM huge WHERE g = 7 GROUP BY g"
        )
        .await
    );
}

/// SUBSCRIBE through the extended query protocol (tokio-postgres prepares COPY statements):
/// the snapshot, then each change with its epoch and diff, ending when the view is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_over_the_extended_protocol() {
    let server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    let feed_client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE s (k TEXT, n INT)").await;
    exec(&client, "INSERT INTO s VALUES ('a', 1)").await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW sv AS SELECT k, sum(n) AS total FROM s GROUP BY k",
    )
    .await;
    let reader = read_feed(&feed_client, "COPY (SUBSCRIBE TO sv) TO STDOUT").await;
    exec(&client, "INSERT INTO s VALUES ('a', 2), ('b', 5)").await;
    exec(&client, "DELETE FROM s WHERE k = 'b'").await;
    // DROP waits until the writes acknowledged before it reached the view and its
    // subscribers (without, the DELETE's change was sometimes still on its way).
    exec(&client, "DROP MATERIALIZED VIEW sv").await;
    let lines = tokio::time::timeout(std::time::Duration::from_secs(20), reader)
        .await
        .expect("the feed ended when the view was dropped")
        .expect("reader");
    // Strip epochs (their values depend on other activity) but keep their order.
    let epochs: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.split('\t').next()?.parse().ok())
        .collect();
    assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
    let mut changes: Vec<Vec<String>> = lines
        .iter()
        .map(|l| l.split('\t').skip(1).map(str::to_string).collect())
        .collect();
    // Within one epoch the order of rows is free; sort each epoch's rows.
    let mut start = 0;
    for i in 1..=changes.len() {
        if i == changes.len() || epochs[i] != epochs[start] {
            changes[start..i].sort();
            start = i;
        }
    }
    let want: Vec<Vec<String>> = ["1 a 1", "-1 a 1", "1 a 3", "1 b 5", "-1 b 5"]
        .iter()
        .map(|r| r.split(' ').map(str::to_string).collect())
        .collect();
    assert_eq!(changes, want, "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_to_a_query_lives_as_long_as_its_feed() {
    use futures::StreamExt;
    let server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE q (k TEXT, n INT)").await;
    exec(&client, "INSERT INTO q VALUES ('a', 1)").await;
    let feed_client = server.connect("millrace").await.expect("connect");
    let feed = feed_client
        .copy_out("COPY (SUBSCRIBE TO (SELECT k, sum(n) AS total FROM q GROUP BY k)) TO STDOUT")
        .await
        .expect("subscribe to a query");
    assert_eq!(
        one(&client, "SELECT count(*) FROM millrace_views").await,
        "1",
        "the query is maintained by a view while the feed runs"
    );
    exec(&client, "INSERT INTO q VALUES ('a', 2), ('b', 5)").await;
    let mut feed = Box::pin(feed);
    let mut lines: Vec<String> = Vec::new();
    while lines.len() < 4 {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(20), feed.next())
            .await
            .expect("a change within 20 s")
            .expect("feed open")
            .expect("feed chunk");
        lines.extend(String::from_utf8_lossy(&chunk).lines().map(str::to_string));
    }
    let mut changes: Vec<String> = lines
        .iter()
        .map(|l| l.split('\t').skip(1).collect::<Vec<_>>().join(" "))
        .collect();
    changes[1..].sort();
    assert_eq!(changes, ["1 a 1", "-1 a 1", "1 a 3", "1 b 5"], "{lines:?}");
    // The subscriber cancels (psql's Ctrl-C): its view goes with the feed.
    feed_client
        .cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    drop(feed);
    for _ in 0..200 {
        if one(&client, "SELECT count(*) FROM millrace_views").await == "0" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        one(&client, "SELECT count(*) FROM millrace_views").await,
        "0"
    );
    exec(&client, "DROP TABLE q").await;
}

/// A read of a view from one session sees every write another session had acknowledged
/// before it (real-time recency, as in Materialize), even while the view is still working
/// through them: with `--step-bytes 1` every row of an insert is its own step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_sees_writes_acknowledged_to_other_sessions() {
    let server = TestServer::start(&["--step-bytes", "1"]).expect("start");
    let writer = server.connect("millrace").await.expect("connect");
    let reader = server.connect("millrace").await.expect("connect");
    exec(&writer, "CREATE TABLE t (k INT, v INT)").await;
    exec(
        &writer,
        "CREATE MATERIALIZED VIEW agg AS SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k",
    )
    .await;
    for round in 1..=10 {
        exec(
            &writer,
            "INSERT INTO t SELECT value % 50, value FROM generate_series(1, 300)",
        )
        .await;
        assert_eq!(
            one(&reader, "SELECT sum(n) FROM agg").await,
            (round * 300).to_string(),
            "round {round}: the other session's acknowledged insert is in the view"
        );
        // A read joining the view with its table sees both at the same epoch.
        assert_eq!(
            one(
                &reader,
                "SELECT count(*) FROM (SELECT k, count(*) AS n FROM t GROUP BY k) AS b \
                 JOIN agg USING (k) WHERE b.n <> agg.n"
            )
            .await,
            "0",
            "round {round}"
        );
    }
}

/// A view's change too large to hold goes to disk in partitions (here from 16 KiB on, with
/// `--step-bytes 4096`): the view, the view over it and a subscriber all get exactly the
/// change, consolidated within each epoch, through inserts, updates and deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spilled_view_change_is_applied_fed_and_read_downstream() {
    use std::collections::{BTreeMap, HashMap};
    let server = TestServer::start(&["--step-bytes", "4096"]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    let feed_client = server.connect("millrace").await.expect("connect");
    exec(
        &client,
        "CREATE TABLE t (id BIGINT PRIMARY KEY, k BIGINT, s TEXT)",
    )
    .await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW g AS SELECT k, count(*) AS n, max(s) AS m FROM t GROUP BY k",
    )
    .await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW h AS SELECT count(*) AS groups, sum(n) AS n FROM g",
    )
    .await;
    let reader = read_feed(&feed_client, "COPY (SUBSCRIBE TO g) TO STDOUT").await;
    let steps = [
        "INSERT INTO t SELECT value, value % 5000, 'v' || value FROM generate_series(1, 20000)",
        "UPDATE t SET s = s || 'x' WHERE id % 2 = 0",
        "DELETE FROM t WHERE id % 3 = 0",
        "INSERT INTO t SELECT value, value % 7000, 'w' || value FROM generate_series(20001, 30000)",
    ];
    for step in steps {
        exec(&client, step).await;
        assert_eq!(
            rows(&client, "SELECT k, n, m FROM g").await,
            rows(&client, "SELECT k, count(*), max(s) FROM t GROUP BY k").await,
            "the view after {step}"
        );
        assert_eq!(
            rows(&client, "SELECT groups, n FROM h").await,
            rows(&client, "SELECT count(DISTINCT k), count(*) FROM t").await,
            "the view over the view after {step}"
        );
    }
    let contents = rows(&client, "SELECT k, n, m FROM g").await;
    exec(&client, "DROP MATERIALIZED VIEW h").await;
    exec(&client, "DROP MATERIALIZED VIEW g").await;
    let lines = tokio::time::timeout(std::time::Duration::from_secs(60), reader)
        .await
        .expect("the feed ended when the view was dropped")
        .expect("reader");
    // Replayed, the feed is the view; within an epoch no row is both deleted and inserted.
    let mut replay: BTreeMap<Vec<String>, i64> = BTreeMap::new();
    let mut per_epoch: HashMap<(String, Vec<String>), (bool, bool)> = HashMap::new();
    for line in &lines {
        let fields: Vec<String> = line.split('\t').map(str::to_string).collect();
        let diff: i64 = fields[1].parse().expect("diff");
        let row = fields[2..].to_vec();
        *replay.entry(row.clone()).or_default() += diff;
        let seen = per_epoch.entry((fields[0].clone(), row)).or_default();
        if diff > 0 {
            seen.0 = true;
        } else {
            seen.1 = true;
        }
    }
    let unconsolidated = per_epoch.iter().filter(|(_, (i, d))| *i && *d).count();
    assert_eq!(unconsolidated, 0, "rows inserted and deleted in one epoch");
    let mut replayed: Vec<Vec<Option<String>>> = Vec::new();
    for (row, n) in replay {
        assert!(n >= 0, "{row:?} deleted more often than inserted");
        for _ in 0..n {
            replayed.push(row.iter().map(|v| Some(v.clone())).collect());
        }
    }
    replayed.sort();
    assert_eq!(replayed, contents, "the feed replayed");
}
