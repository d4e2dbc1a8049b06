//! Statements that run away in CPU (issue 22, part 1): the query grown until its FULL
//! JOIN explodes, cross joins of large inputs counted and streamed, a nested-loop join of an
//! inequality and a correlated subquery that our own apply runs row by row. Each is stopped by
//! `statement_timeout` and by a cancel request with 57014, and then stops for real: the server's
//! CPU time over the next second (from /proc) is that of an idle server, not of a plan still
//! running in tasks the statement left behind. The session and the server carry on.

use std::time::Duration;

use futures::StreamExt;
use millrace_sqllogictest::TestServer;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// The server's CPU time so far (user + system), in clock ticks of 10 ms.
fn cpu_ticks(server: &TestServer) -> u64 {
    let pid = server.pid().expect("running");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Asserts that the server is idle a little after a statement was stopped: under 0.4
/// CPU-seconds in the next second (a plan still running uses one or two cores).
async fn assert_stopped(server: &TestServer, what: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(server);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(server) - before;
    assert!(
        used < 40,
        "{what}: the server used {used} ticks of CPU in the second after the statement \
         was stopped; its plan is still running"
    );
}

/// The message of a server error.
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// Runs `sql` to the end, counting the rows it streams without keeping them.
async fn run(client: &Client, sql: &str) -> Result<u64, tokio_postgres::Error> {
    let stream = client
        .query_raw(
            sql,
            std::iter::empty::<&(dyn tokio_postgres::types::ToSql + Sync)>(),
        )
        .await?;
    futures::pin_mut!(stream);
    let mut n = 0;
    while let Some(row) = stream.next().await {
        row?;
        n += 1;
    }
    Ok(n)
}

/// The runaway statements: (what, SQL). None finishes in minutes.
fn runaways() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "the issue's query over 40,000-row tables",
            "SELECT count(*) FROM sq_b AS r1 FULL JOIN (
               SELECT replace(r5.s, 'ta', '_') AS c0
               FROM (SELECT CAST(-43 AS INT) AS c0,
                            rank() OVER (PARTITION BY r4.n, r4.a ORDER BY r4.a) AS c1, r4.d AS c4
                     FROM sq_b AS r4 WHERE NOT (r4.a >= -14)) AS r3
               RIGHT JOIN sq_a AS r5 ON r3.c0 <> r5.a) AS r2
             ON r1.s <> r2.c0",
        ),
        (
            "a counted cross join of two 1M-row inputs",
            "SELECT count(*) FROM generate_series(1, 1000000) AS a \
             CROSS JOIN generate_series(1, 1000000) AS b",
        ),
        (
            "a cross join streamed to the client",
            "SELECT a.a, b.b FROM generate_series(1, 1000000) AS a, \
             generate_series(1, 1000000) AS b",
        ),
        (
            "a nested-loop join on an inequality",
            "SELECT count(*) FROM sq_a AS a JOIN sq_b AS b ON a.k < b.k + a.a",
        ),
        (
            "a correlated subquery in a CASE, applied row by row",
            "SELECT sum(CASE WHEN EXISTS (SELECT 1 FROM sq_b AS b WHERE b.k > o.k + b.a) \
             THEN 1 ELSE 0 END) FROM sq_a AS o",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_statements_are_stopped_by_timeout_and_cancel() {
    let server = TestServer::start(&[]).expect("start millrace");
    let client = server.connect("millrace").await.expect("connect");
    for table in ["sq_a", "sq_b"] {
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (k INT PRIMARY KEY, a INT, n NUMERIC, s TEXT, d DATE);
                 INSERT INTO {table} SELECT g, (g * 7) % 50 - 20, (g % 13) * 1.5,
                   'ta' || (g % 9), DATE '2023-01-01' + (g % 30)
                   FROM generate_series(1, 40000) AS t(g)"
            ))
            .await
            .expect("setup");
    }
    for (what, sql) in runaways() {
        client
            .batch_execute("SET statement_timeout = '400ms'")
            .await
            .expect("set");
        let started = std::time::Instant::now();
        let e = run(&client, sql).await.expect_err(what);
        assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{what}: {e}");
        assert_eq!(
            message(&e),
            "canceling statement due to statement timeout",
            "{what}: PostgreSQL's wording: {e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: the timeout took {:?}",
            started.elapsed()
        );
        assert_stopped(&server, what).await;

        client
            .batch_execute("SET statement_timeout = 0")
            .await
            .expect("reset");
        let token = client.cancel_token();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            token.cancel_query(tokio_postgres::NoTls).await
        });
        let e = run(&client, sql).await.expect_err(what);
        assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{what}: {e}");
        assert_eq!(
            message(&e),
            "canceling statement due to user request",
            "{what}: PostgreSQL's wording"
        );
        canceller.await.expect("join").expect("cancel sent");
        assert_stopped(&server, what).await;

        // The session carries on, with the tables whole.
        let n: i64 = client
            .query_one("SELECT count(*) FROM sq_a", &[])
            .await
            .expect("the session answers")
            .get(0);
        assert_eq!(n, 40_000, "{what}");
    }
}
