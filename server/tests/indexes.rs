//! CREATE INDEX is real: EXPLAIN shows point and range queries answered from the index, the
//! answers equal a full scan's (the same predicate written so no index applies), through
//! inserts, updates and deletes, and after a `kill -9` restart.

use millrace_sqllogictest::TestServer;

async fn explain(c: &tokio_postgres::Client, sql: &str) -> String {
    let rows = c
        .simple_query(&format!("EXPLAIN {sql}"))
        .await
        .expect("explain");
    rows.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(1).map(str::to_string),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Counts through the primary key (`k`) and the index on `a` equal full scans' counts.
async fn check_against_scan(c: &tokio_postgres::Client) {
    // `a + 0` defeats the index, so the second query of each pair is a full scan.
    let pairs = [
        ("a = 3", "a + 0 = 3"),
        ("a BETWEEN 2 AND 4", "a + 0 BETWEEN 2 AND 4"),
        ("a > 7", "a + 0 > 7"),
        ("a < 2 AND k > 500", "a + 0 < 2 AND k + 0 > 500"),
        ("a IN (1, 5, 9)", "a + 0 IN (1, 5, 9)"),
        ("k = 77", "k + 0 = 77"),
        ("k IN (1, 2, 3000)", "k + 0 IN (1, 2, 3000)"),
        ("k IN (11, 12, 11, 4242)", "k + 0 IN (11, 12, 11, 4242)"),
        ("k = 11 OR k = 4242", "k + 0 = 11 OR k + 0 = 4242"),
        ("k BETWEEN 1 AND 10", "k + 0 BETWEEN 1 AND 10"),
    ];
    for (indexed, scanned) in pairs {
        let a = count(c, &format!("SELECT count(*) FROM t WHERE {indexed}")).await;
        let b = count(c, &format!("SELECT count(*) FROM t WHERE {scanned}")).await;
        assert_eq!(a, b, "{indexed} vs {scanned}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_answer_point_and_range_queries() {
    let mut server = TestServer::start(&[]).expect("start millrace");
    let c = server.connect("millrace").await.expect("connect");
    c.batch_execute(
        "CREATE TABLE t (k INT PRIMARY KEY, a INT, b TEXT);
         INSERT INTO t SELECT v, v % 10, 'x' || v FROM generate_series(1, 1000) AS g(v);
         INSERT INTO t VALUES (1001, NULL, 'null a');
         CREATE INDEX t_a ON t (a);",
    )
    .await
    .expect("setup");
    let plan = explain(&c, "SELECT * FROM t WHERE k = 5").await;
    assert!(plan.contains("PrimaryKeyLookup"), "{plan}");
    let plan = explain(&c, "SELECT b FROM t WHERE a BETWEEN 3 AND 4").await;
    assert!(
        plan.contains("IndexScan: t_a on a [3, 4], rows=200"),
        "{plan}"
    );
    let plan = explain(&c, "SELECT b FROM t WHERE a + 0 = 3").await;
    assert!(
        !plan.contains("IndexScan") && !plan.contains("Lookup"),
        "{plan}"
    );
    check_against_scan(&c).await;
    c.batch_execute(
        "DELETE FROM t WHERE a = 1;
         UPDATE t SET a = 42 WHERE k BETWEEN 10 AND 30;
         INSERT INTO t VALUES (2000, 3, 'new'), (3000, NULL, 'none');",
    )
    .await
    .expect("changes");
    check_against_scan(&c).await;
    assert_eq!(count(&c, "SELECT count(*) FROM t WHERE a = 42").await, 19);
    server.restart().expect("restart after kill -9");
    let c = server.connect("millrace").await.expect("reconnect");
    let plan = explain(&c, "SELECT b FROM t WHERE a = 42").await;
    assert!(
        plan.contains("IndexScan: t_a"),
        "index not rebuilt on restart: {plan}"
    );
    check_against_scan(&c).await;
    c.batch_execute("DROP INDEX t_a").await.expect("drop index");
    let plan = explain(&c, "SELECT b FROM t WHERE a = 42").await;
    assert!(!plan.contains("IndexScan"), "{plan}");
    check_against_scan(&c).await;
}

/// Chunk reads (memory or object store) of table `t` so far.
async fn chunk_reads(c: &tokio_postgres::Client) -> i64 {
    count(
        c,
        "SELECT hits + misses FROM millrace_cache WHERE name = 't'",
    )
    .await
}

/// Regression: UPDATE and DELETE found their rows by scanning the whole table (every file of
/// a spilled one: about 5 a second by primary key on a 1M-row table), ignoring the primary
/// key and the indexes a query uses. Now a change by key reads only the chunks holding its
/// rows; one that no index helps still reads them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_and_deletes_by_key_read_only_their_rows() {
    let server = TestServer::start(&["--cache-bytes", "1"]).expect("start millrace");
    let c = server.connect("millrace").await.expect("connect");
    c.batch_execute(
        "CREATE TABLE t (k BIGINT PRIMARY KEY, a BIGINT, b TEXT);
         INSERT INTO t SELECT v, v % 1000, 'x' || v FROM generate_series(1, 100000) AS g(v);
         CREATE INDEX t_a ON t (a);",
    )
    .await
    .expect("setup");
    let chunks = count(
        &c,
        "SELECT hot_chunks + cold_chunks FROM millrace_cache WHERE name = 't'",
    )
    .await;
    assert!(chunks >= 6, "the table is cut into chunks ({chunks})");

    let before = chunk_reads(&c).await;
    let n = c
        .execute("UPDATE t SET b = 'changed' WHERE k = 4242", &[])
        .await
        .expect("update by key");
    assert_eq!(n, 1);
    let n = c
        .execute("DELETE FROM t WHERE k IN (7, 8)", &[])
        .await
        .expect("delete by key");
    assert_eq!(n, 2);
    let n = c
        .execute("UPDATE t SET b = 'twice' WHERE k IN (11, 11, 12, 13)", &[])
        .await
        .expect("update by a list of keys");
    assert_eq!(n, 3);
    let by_key = chunk_reads(&c).await - before;
    // NOTE: measured: two chunk reads per statement (its keys are in one chunk); a scan
    // reads every chunk for each.
    assert!(
        by_key <= 6,
        "three changes by key read {by_key} chunks of {chunks}"
    );

    // An indexed column: the rows with a = 5 are in every chunk, but only they are read.
    let n = c
        .execute("UPDATE t SET b = 'five' WHERE a = 5", &[])
        .await
        .expect("update by index");
    assert_eq!(n, 100);
    let before = chunk_reads(&c).await;
    let n = c
        .execute("UPDATE t SET b = b WHERE b = 'nothing'", &[])
        .await
        .expect("update by scan");
    assert_eq!(n, 0);
    let scanned = chunk_reads(&c).await - before;
    assert!(
        scanned >= chunks - 1,
        "a change by scan read {scanned} chunks of {chunks}"
    );

    // The answers equal a full scan's (`k + 0` and `a + 0` defeat the indexes).
    assert_eq!(count(&c, "SELECT count(*) FROM t").await, 99_998);
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE k + 0 IN (7, 8)").await,
        0
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM t WHERE b = 'changed' AND k + 0 = 4242"
        )
        .await,
        1
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE b = 'five' AND a + 0 = 5").await,
        100
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE b = 'five'").await,
        100
    );
    // A key listed twice is one row (it was two, from the primary-key lookup).
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE k IN (11, 11, 12, 13)").await,
        3
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE b = 'twice'").await,
        3
    );
    check_against_scan(&c).await;
}
