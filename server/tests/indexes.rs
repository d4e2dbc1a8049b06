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
