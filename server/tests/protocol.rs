//! The PostgreSQL protocol end to end with a real client (tokio-postgres): extended query
//! with parameters and binary results, error recovery, COPY, cancellation, timeouts,
//! concurrent sessions, and bad input that must not take the server down.

// NOTE: its own file, in this test binary (one binary links the server once).
#[path = "protocol/fuzz.rs"]
mod fuzz;
#[path = "protocol/runaway.rs"]
mod runaway;

use std::io::{Read, Write};
use std::time::Duration;

use futures::SinkExt;
use millrace_sqllogictest::TestServer;
use tokio_postgres::error::SqlState;

async fn setup() -> (TestServer, tokio_postgres::Client) {
    let server = TestServer::start(&[]).expect("start millrace");
    let client = server.connect("millrace").await.expect("connect");
    (server, client)
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no sqlstate: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_parameters_and_typed_values() {
    let (_server, client) = setup().await;
    client
        .batch_execute(
            "CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT, price NUMERIC(10,2),
                                 at TIMESTAMP, qty INT, data BYTEA, ok BOOLEAN, score DOUBLE PRECISION)",
        )
        .await
        .expect("create");
    let insert = client
        .prepare("INSERT INTO items (id, name, qty, ok, score, at) VALUES ($1, $2, $3, $4, $5, $6)")
        .await
        .expect("prepare insert");
    let at = chrono::NaiveDate::from_ymd_opt(2024, 5, 17)
        .and_then(|d| d.and_hms_micro_opt(8, 30, 0, 125))
        .expect("date");
    for i in 0..5i64 {
        let name = if i == 3 {
            None
        } else {
            Some(format!("item-{i}"))
        };
        let n = client
            .execute(
                &insert,
                &[
                    &i,
                    &name,
                    &(i as i32 * 10),
                    &(i % 2 == 0),
                    &(i as f64 / 4.0),
                    &at,
                ],
            )
            .await
            .expect("insert");
        assert_eq!(n, 1);
    }
    client
        .execute(
            "UPDATE items SET price = 9.99, data = '\\xdeadbeef' WHERE id = $1",
            &[&2i64],
        )
        .await
        .expect("update with parameter");
    // Binary result format (tokio-postgres asks for binary) for each type.
    let row = client
        .query_one(
            "SELECT id, name, qty, ok, score, at, data, price::TEXT FROM items WHERE id = $1",
            &[&2i64],
        )
        .await
        .expect("select");
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("item-2"));
    assert_eq!(row.get::<_, i32>(2), 20);
    assert!(row.get::<_, bool>(3));
    assert_eq!(row.get::<_, f64>(4), 0.5);
    assert_eq!(row.get::<_, chrono::NaiveDateTime>(5), at);
    assert_eq!(row.get::<_, Vec<u8>>(6), vec![0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(row.get::<_, String>(7), "9.99");
    let null_name = client
        .query_one("SELECT name FROM items WHERE id = $1", &[&3i64])
        .await
        .expect("select null");
    assert_eq!(null_name.get::<_, Option<String>>(0), None);
    let count: i64 = client
        .query_one("SELECT count(*) FROM items WHERE qty >= $1", &[&20i32])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_sqlstate_and_the_session_recovers() {
    let (_server, client) = setup().await;
    client
        .batch_execute(
            "CREATE TABLE e (k INT PRIMARY KEY, v TEXT NOT NULL); INSERT INTO e VALUES (1, 'a');",
        )
        .await
        .expect("setup");
    let cases = [
        ("SELEC 1", "42601"),
        ("SELECT * FROM missing", "42P01"),
        ("SELECT nope FROM e", "42703"),
        ("INSERT INTO e VALUES (1, 'dup')", "23505"),
        ("INSERT INTO e VALUES (2, NULL)", "23502"),
        ("INSERT INTO e VALUES ('x', 'y')", "22P02"),
        (
            "CREATE MATERIALIZED VIEW m AS SELECT random() AS r",
            "0A000",
        ),
    ];
    for (sql, expected) in cases {
        // Extended protocol (prepare + execute) and simple protocol both report it.
        let e = client.query(sql, &[]).await.expect_err(sql);
        assert_eq!(code(&e), expected, "{sql} (extended)");
        let e = client.simple_query(sql).await.expect_err(sql);
        assert_eq!(code(&e), expected, "{sql} (simple)");
        // The session stays usable after the error (Sync recovery).
        let one: i64 = client
            .query_one("SELECT 1", &[])
            .await
            .expect("after error")
            .get(0);
        assert_eq!(one, 1);
    }
    let n: i64 = client
        .query_one("SELECT count(*) FROM e", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1, "failed statements changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_text_and_csv() {
    let (_server, client) = setup().await;
    client
        .batch_execute("CREATE TABLE c (id INT, name TEXT, amount NUMERIC(8,2), flag BOOLEAN)")
        .await
        .expect("create");
    let sink = client.copy_in("COPY c FROM STDIN").await.expect("copy in");
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(
        b"1\talpha\t1.50\tt\n2\t\\N\t2\tf\n",
    ))
    .await
    .expect("send");
    sink.send(bytes::Bytes::from_static(b"3\ttab\\there\t\\N\t\\N\n"))
        .await
        .expect("send");
    assert_eq!(sink.finish().await.expect("finish"), 3);
    let sink = client
        .copy_in("COPY c (id, name) FROM STDIN WITH (FORMAT csv, HEADER true)")
        .await
        .expect("copy csv");
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(
        b"id,name\n4,\"comma, quoted\"\n5,\n6,\"\"\n",
    ))
    .await
    .expect("send csv");
    assert_eq!(sink.finish().await.expect("finish csv"), 3);
    let rows = client
        .simple_query("SELECT id, name IS NULL, name FROM c ORDER BY id")
        .await
        .expect("select");
    let got: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(format!(
                "{}|{}|{}",
                r.get(0).unwrap_or(""),
                r.get(1).unwrap_or(""),
                r.get(2).unwrap_or("<null>")
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        vec![
            "1|f|alpha",
            "2|t|<null>",
            "3|f|tab\there",
            "4|f|comma, quoted",
            "5|t|<null>",
            "6|f|",
        ]
    );
    // A bad value rejects the whole COPY; nothing partial lands.
    let sink = client.copy_in("COPY c FROM STDIN").await.expect("copy in");
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(
        b"7\tok\t1\tt\nnot-a-number\tx\t1\tt\n",
    ))
    .await
    .expect("send");
    let e = sink.finish().await.expect_err("bad copy");
    assert_eq!(code(&e), "22P02");
    let sink = client.copy_in("COPY c FROM STDIN").await.expect("copy in");
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"8\t\xff\xfe\t1\tt\n"))
        .await
        .expect("send");
    let e = sink.finish().await.expect_err("invalid utf-8");
    assert_eq!(code(&e), "22021");
    let sink = client.copy_in("COPY c FROM STDIN").await.expect("copy in");
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"9\tonly-two\n"))
        .await
        .expect("send");
    let e = sink.finish().await.expect_err("missing column");
    assert_eq!(code(&e), "22P04");
    let n: i64 = client
        .query_one("SELECT count(*) FROM c", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 6);
    // COPY TO STDOUT in text and CSV.
    use futures::TryStreamExt;
    let out = client
        .copy_out("COPY (SELECT id, name FROM c WHERE id IN (2, 3) ORDER BY id) TO STDOUT")
        .await
        .expect("copy out");
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.expect("read copy");
    let text: String = chunks
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert_eq!(text, "2\t\\N\n3\ttab\\there\n");
    let out = client
        .copy_out("COPY c (id, name) TO STDOUT WITH (FORMAT csv, HEADER true)")
        .await
        .expect("copy out csv");
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.expect("read csv");
    let text: String = chunks
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(text.starts_with("id,name\n"), "{text}");
    assert!(text.contains("4,\"comma, quoted\"\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_and_statement_timeout_stop_a_long_query() {
    let (_server, client) = setup().await;
    let slow = "SELECT count(*) FROM generate_series(1, 400000000) a";
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let e = client.simple_query(slow).await.expect_err("cancelled");
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");
    canceller.await.expect("join").expect("cancel sent");
    client
        .batch_execute("SET statement_timeout = '200ms'")
        .await
        .expect("set");
    let e = client.simple_query(slow).await.expect_err("timed out");
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .expect("reset");
    let one: i64 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("usable")
        .get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_sessions() {
    let (server, client) = setup().await;
    client
        .batch_execute("CREATE TABLE hits (session INT, i INT)")
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for s in 0..16 {
        let c = server.connect("millrace").await.expect("connect");
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                c.execute("INSERT INTO hits VALUES ($1, $2)", &[&s, &i])
                    .await
                    .expect("insert");
            }
            let n: i64 = c
                .query_one("SELECT count(*) FROM hits WHERE session = $1", &[&s])
                .await
                .expect("count")
                .get(0);
            assert_eq!(n, 20);
        }));
    }
    for t in tasks {
        t.await.expect("session task");
    }
    let n: i64 = client
        .query_one("SELECT count(*) FROM hits", &[])
        .await
        .expect("total")
        .get(0);
    assert_eq!(n, 320);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_disconnects_do_not_hurt_the_server() {
    let (mut server, client) = setup().await;
    client
        .batch_execute("CREATE TABLE keep (k INT); INSERT INTO keep VALUES (1);")
        .await
        .expect("setup");
    // A garbage startup packet: the server closes that connection.
    {
        let mut raw = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("tcp");
        raw.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = raw.write_all(&[0, 0, 0, 12, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
        let mut buf = [0u8; 64];
        let _ = raw.read(&mut buf);
    }
    // A message announcing an absurd length.
    {
        let mut raw = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("tcp");
        raw.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = raw.write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]);
        let mut buf = [0u8; 64];
        let _ = raw.read(&mut buf);
    }
    // A client that disconnects in the middle of a COPY: nothing of it lands.
    {
        let c = server.connect("millrace").await.expect("connect");
        let mut sink = Box::pin(c.copy_in("COPY keep FROM STDIN").await.expect("copy"));
        sink.send(bytes::Bytes::from_static(b"2\n3\n"))
            .await
            .expect("send");
        drop(sink);
        drop(c);
    }
    // A client that disconnects in the middle of a long query.
    {
        let c = server.connect("millrace").await.expect("connect");
        let q = tokio::spawn(async move {
            let _ = c
                .simple_query("SELECT count(*) FROM generate_series(1, 300000000)")
                .await;
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        q.abort();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(server.is_running(), "server died:\n{}", server.log());
    let n: i64 = client
        .query_one("SELECT count(*) FROM keep", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
    let other = server
        .connect("millrace")
        .await
        .expect("new session still accepted");
    let one: i64 = other
        .query_one("SELECT 1", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(one, 1);
    // Unknown database at startup: a FATAL 3D000, not a crash.
    let e = server
        .connect("no_such_db")
        .await
        .expect_err("unknown database");
    assert_eq!(code(&e), "3D000");
}

/// Regression: a long OR/AND chain in a WHERE clause (a left-deep tree thousands of levels
/// deep, as in the sqlite corpus) overflowed a tokio worker's stack while it was planned, and
/// the abort took the server down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_predicates_are_planned_without_crashing() {
    let (_server, client) = setup().await;
    client
        .batch_execute("CREATE TABLE deep (a INT, b INT); INSERT INTO deep VALUES (1, 2), (3, 4)")
        .await
        .expect("setup");
    let mut predicate = String::from("a = 1");
    for i in 0..2000 {
        predicate.push_str(&format!(" OR b > {} AND a < 0", i + 3));
    }
    let sql = format!("SELECT a FROM deep WHERE {predicate} ORDER BY a");
    let rows = client.query(&sql, &[]).await.expect("deep predicate");
    let got: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, vec![1]);
    // The server is still up and answering.
    let one: i64 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("after")
        .get(0);
    assert_eq!(one, 1);
}

/// A statement over `statement_mem` fails alone with 53200 (a hash join's build side cannot
/// spill): the session carries on, and so does another; without the limit the same query
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_over_statement_mem_fails_alone_with_53200() {
    let (mut server, client) = setup().await;
    let join = "SELECT count(*) FROM generate_series(1, 300000) AS a \
                JOIN generate_series(1, 300000) AS b ON a.a = b.b";
    client
        .batch_execute("SET statement_mem = '1MB'")
        .await
        .expect("set");
    let e = client
        .simple_query(join)
        .await
        .expect_err("a 300,000-row hash join in 1 MB");
    assert_eq!(code(&e), "53200", "{e}");
    assert!(server.is_running(), "server died:\n{}", server.log());
    let other = server.connect("millrace").await.expect("another session");
    let one: i64 = other
        .query_one("SELECT 1::BIGINT", &[])
        .await
        .expect("the other session answers")
        .get(0);
    assert_eq!(one, 1);
    client
        .batch_execute("RESET statement_mem")
        .await
        .expect("reset");
    let n: i64 = client
        .query_one(join, &[])
        .await
        .expect("the same join without the limit")
        .get(0);
    assert_eq!(n, 300_000);
    let shown = client
        .simple_query("SHOW statement_mem")
        .await
        .expect("show");
    let value = shown.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("0"));
}
