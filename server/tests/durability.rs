//! Durability under `kill -9`: a writer inserts multi-row batches and bumps a counter while
//! the real server is killed at random moments. After each restart every acknowledged batch
//! is there in full, no batch is there in part, and the counter equals the acknowledged
//! updates (plus at most the one in flight). Seed: `MILLRACE_SEED` (printed on failure).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use millrace_sqllogictest::TestServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROWS_PER_BATCH: i64 = 7;
const CYCLES: usize = 20;

struct Acked {
    batches: Vec<i64>,
    attempted: i64,
    counter_acks: i64,
    counter_in_flight: bool,
}

async fn write_until_error(client: tokio_postgres::Client, first: i64) -> Acked {
    let mut acked = Acked {
        batches: vec![],
        attempted: first,
        counter_acks: 0,
        counter_in_flight: false,
    };
    let mut batch = first;
    loop {
        acked.attempted = batch;
        let values: Vec<String> = (0..ROWS_PER_BATCH)
            .map(|i| format!("({batch}, {i}, 'payload-{batch}-{i}')"))
            .collect();
        let sql = format!("INSERT INTO log VALUES {}", values.join(", "));
        if client.execute(sql.as_str(), &[]).await.is_err() {
            return acked;
        }
        acked.batches.push(batch);
        acked.counter_in_flight = true;
        if client
            .execute("UPDATE counter SET n = n + 1 WHERE id = 1", &[])
            .await
            .is_err()
        {
            return acked;
        }
        acked.counter_in_flight = false;
        acked.counter_acks += 1;
        batch += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let seed: u64 = std::env::var("MILLRACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("MILLRACE_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut server = TestServer::start(&[]).expect("start millrace");
    let setup = server.connect("millrace").await.expect("connect");
    setup
        .batch_execute(
            "CREATE TABLE log (batch BIGINT, i BIGINT, payload TEXT, PRIMARY KEY (batch, i));
             CREATE TABLE counter (id INT PRIMARY KEY, n BIGINT NOT NULL);
             INSERT INTO counter VALUES (1, 0);
             CREATE SCHEMA audit;
             CREATE VIEW audit.batches AS SELECT DISTINCT batch FROM log;",
        )
        .await
        .expect("setup");
    drop(setup);

    let mut acked: BTreeSet<i64> = BTreeSet::new();
    let mut counter_acks = 0i64;
    let mut next = 0i64;
    for cycle in 0..CYCLES {
        let client = server.connect("millrace").await.expect("connect");
        let writer = tokio::spawn(write_until_error(client, next));
        let pause = Duration::from_millis(rng.random_range(30..300));
        tokio::time::sleep(pause).await;
        server.kill();
        let result = writer.await.expect("writer task");
        acked.extend(result.batches.iter().copied());
        counter_acks += result.counter_acks;
        server.restart().expect("restart after kill -9");

        let check = server.connect("millrace").await.expect("reconnect");
        let rows = check
            .query("SELECT batch, count(*) FROM log GROUP BY batch", &[])
            .await
            .expect("read log");
        let present: BTreeMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for (batch, n) in &present {
            assert_eq!(
                *n, ROWS_PER_BATCH,
                "seed {seed} cycle {cycle}: batch {batch} is partial"
            );
            assert!(
                acked.contains(batch) || *batch == result.attempted,
                "seed {seed} cycle {cycle}: batch {batch} was never written"
            );
        }
        for batch in &acked {
            assert!(
                present.contains_key(batch),
                "seed {seed} cycle {cycle}: acknowledged batch {batch} lost"
            );
        }
        // The in-flight batch may have landed; count it as acknowledged from now on.
        if present.contains_key(&result.attempted) {
            acked.insert(result.attempted);
        }
        let n: i64 = check
            .query_one("SELECT n FROM counter WHERE id = 1", &[])
            .await
            .expect("read counter")
            .get(0);
        let in_flight = i64::from(result.counter_in_flight);
        assert!(
            n >= counter_acks && n <= counter_acks + in_flight,
            "seed {seed} cycle {cycle}: counter {n}, acknowledged {counter_acks}"
        );
        counter_acks = n;
        let distinct: i64 = check
            .query_one("SELECT count(*) FROM audit.batches", &[])
            .await
            .expect("view survives restart")
            .get(0);
        assert_eq!(
            distinct as usize,
            present.len(),
            "seed {seed}: view disagrees with table"
        );
        next = result.attempted + 1;
    }
    assert!(
        acked.len() > CYCLES,
        "seed {seed}: the writer made too little progress to test anything"
    );
}

/// SIGTERM shuts the server down cleanly (exit status 0) and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_a_clean_shutdown() {
    let mut server = TestServer::start(&[]).expect("start millrace");
    let client = server.connect("millrace").await.expect("connect");
    client
        .batch_execute("CREATE TABLE t (k INT); INSERT INTO t VALUES (1), (2), (3);")
        .await
        .expect("write");
    drop(client);
    assert!(
        server.terminate(),
        "server did not exit cleanly on SIGTERM:\n{}",
        server.log()
    );
    assert!(server.log().contains("shutdown signal received"));
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 3);
}
