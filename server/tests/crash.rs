//! The crash test: the real server under continuous DML and Kafka ingest (tansu on loopback)
//! is killed with `kill -9` at random moments, again and again, and restarted. After every
//! restart the table holds exactly the acknowledged writes (the one write in flight at the
//! kill may or may not be there, never half of it) and every view over it equals its query
//! run in batch; at the end the Kafka source holds every produced record exactly once, the
//! views over it and over the join equal their queries, and the file sink's output replays
//! to exactly its view. Checkpoints are taken every second and at random, some failed by
//! an injected storage error; views restore from the last good one. The columnar cache gets
//! one byte (`--cache-bytes 1`), so chunks of the table and the views are evicted to Parquet
//! files all the time and kills land in the middle of uploads; each start removes the files
//! the killed run left. 20 cycles by default; `MILLRACE_CRASH_CYCLES` runs more and
//! `MILLRACE_SEED` picks another seed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::broker::Broker;
use millrace_sqllogictest::rows::{exec, number, one, rows};
use millrace_sqllogictest::sink_output::{
    assert_replays_to, replay_files, view_state, wait_delivered,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_postgres::Client;

mod support;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The accounts table as the test expects it: id -> (grp, bal).
type Accounts = BTreeMap<i32, (i32, i32)>;

/// One write to `acct`, applied to the model exactly as the server applies it.
#[derive(Debug, Clone)]
enum Write {
    Insert(i32, i32, i32),
    Add(i32, i32),
    AddToGroup(i32, i32),
    Delete(i32),
}

impl Write {
    fn random(rng: &mut StdRng, model: &Accounts) -> Write {
        let id = rng.random_range(0..150);
        match rng.random_range(0..10) {
            0..=4 if !model.contains_key(&id) => {
                Write::Insert(id, rng.random_range(0..6), rng.random_range(0..100))
            }
            0..=5 => Write::Add(id, rng.random_range(1..20)),
            6 => Write::AddToGroup(rng.random_range(0..6), rng.random_range(1..5)),
            _ => Write::Delete(id),
        }
    }

    fn sql(&self) -> String {
        match self {
            Write::Insert(id, g, b) => format!("INSERT INTO acct VALUES ({id}, {g}, {b})"),
            Write::Add(id, d) => format!("UPDATE acct SET bal = bal + {d} WHERE id = {id}"),
            Write::AddToGroup(g, d) => format!("UPDATE acct SET bal = bal + {d} WHERE grp = {g}"),
            Write::Delete(id) => format!("DELETE FROM acct WHERE id = {id}"),
        }
    }

    fn apply(&self, model: &mut Accounts) {
        match self {
            Write::Insert(id, g, b) => {
                model.insert(*id, (*g, *b));
            }
            Write::Add(id, d) => {
                if let Some(row) = model.get_mut(id) {
                    row.1 += d;
                }
            }
            Write::AddToGroup(g, d) => {
                for row in model.values_mut().filter(|r| r.0 == *g) {
                    row.1 += d;
                }
            }
            Write::Delete(id) => {
                model.remove(id);
            }
        }
    }
}

/// Writes until the server goes away: returns the acknowledged writes in order and the
/// one in flight when the connection broke.
async fn write_until_killed(
    client: Client,
    mut rng: StdRng,
    mut model: Accounts,
) -> (Vec<Write>, Option<Write>) {
    let mut acked = Vec::new();
    loop {
        let write = Write::random(&mut rng, &model);
        match client.batch_execute(&write.sql()).await {
            Ok(()) => {
                write.apply(&mut model);
                acked.push(write);
            }
            Err(e) if e.as_db_error().is_some() => {
                panic!("{}: the server refused a valid write: {e:?}", write.sql())
            }
            Err(_) => return (acked, Some(write)),
        }
    }
}

async fn accounts(client: &Client) -> Accounts {
    rows(client, "SELECT id, grp, bal FROM acct")
        .await
        .into_iter()
        .map(|r| {
            let n = |i: usize| -> i32 {
                r[i].as_deref()
                    .and_then(|v| v.parse().ok())
                    .expect("integer")
            };
            (n(0), (n(1), n(2)))
        })
        .collect()
}

/// Views over `acct` and the queries they must equal.
const ACCT_VIEWS: [(&str, &str); 3] = [
    (
        "by_grp",
        "SELECT grp, count(*) AS n, sum(bal) AS total FROM acct GROUP BY grp",
    ),
    (
        "rich",
        "SELECT grp, total FROM (SELECT grp, sum(bal) AS total FROM acct GROUP BY grp) q WHERE total > 500",
    ),
    (
        "top3",
        "SELECT id, bal FROM acct ORDER BY bal DESC, id LIMIT 3",
    ),
];

/// Views over the Kafka source (and the join), checked once ingest has stopped.
const EVENT_VIEWS: [(&str, &str); 2] = [
    (
        "by_bucket",
        "SELECT user_id % 10 AS b, count(*) AS n, sum(amount) AS total FROM ev GROUP BY user_id % 10",
    ),
    (
        "spend",
        "SELECT a.grp, count(*) AS n, sum(e.amount) AS total FROM acct a JOIN ev e ON a.id = e.user_id GROUP BY a.grp",
    ),
];

async fn check_views(client: &Client, views: &[(&str, &str)], when: &str) {
    for (name, query) in views {
        assert_eq!(
            view_state(client, &format!("SELECT * FROM {name}")).await,
            view_state(client, query).await,
            "{when}: view {name} equals its query run in batch"
        );
    }
}

/// Produces events until told to stop; returns (partition, offset) of each.
async fn produce_events(
    producer: FutureProducer,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> BTreeSet<(i32, i64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut produced = BTreeSet::new();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..20 {
            let partition = rng.random_range(0..2);
            let payload = format!(
                r#"{{"user_id": {}, "amount": {}}}"#,
                rng.random_range(0..150),
                rng.random_range(1..50)
            );
            let record = FutureRecord::to("ev")
                .partition(partition)
                .key("k")
                .payload(&payload);
            match producer.send(record, Duration::from_secs(10)).await {
                Ok(delivery) => {
                    produced.insert((delivery.partition, delivery.offset));
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    produced
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_doubles_nothing() {
    let seed = env_number("MILLRACE_SEED", 11);
    let cycles = env_number("MILLRACE_CRASH_CYCLES", 20);
    let broker = Broker::start().expect("start tansu");
    broker.create_topic("ev", 2).expect("create topic");
    let out = tempfile::tempdir().expect("tmp");
    let mut server = TestServer::start(&["--failpoints", "--cache-bytes", "1"]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(
        &client,
        "CREATE TABLE acct (id INT PRIMARY KEY, grp INT NOT NULL, bal INT NOT NULL)",
    )
    .await;
    exec(
        &client,
        &format!(
            "CREATE SOURCE ev (user_id BIGINT NOT NULL, amount INT NOT NULL, _partition INT, _offset BIGINT) \
             WITH (connector = 'kafka', brokers = '{}', topic = 'ev') FORMAT JSON",
            broker.address()
        ),
    )
    .await;
    for (name, query) in ACCT_VIEWS.iter().chain(EVENT_VIEWS.iter()) {
        exec(
            &client,
            &format!("CREATE MATERIALIZED VIEW {name} AS {query}"),
        )
        .await;
    }
    exec(
        &client,
        &format!(
            "CREATE SINK by_grp_out FROM by_grp WITH (connector = 'file', path = '{}') FORMAT JSON",
            out.path().display()
        ),
    )
    .await;
    drop(client);

    let stop = Arc::new(AtomicBool::new(false));
    let producer = support::producer(&broker);
    let events = tokio::spawn(produce_events(producer, stop.clone(), seed));

    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Accounts::new();
    let mut in_flight_landed = 0;
    let (mut restored, mut undone, mut failed_checkpoints, mut evictions) = (0, 0, 0, 0);
    // Restarts that opened cold files a table's rewritten log refers to.
    let mut reopened = 0;
    for cycle in 0..cycles {
        let client = server.connect("millrace").await.expect("connect");
        // A checkpoint now and then (besides the one every second), some of them failing
        // in the storage layer: a failed checkpoint must leave the last good one usable.
        match rng.random_range(0..4) {
            0 => exec(&client, "CHECKPOINT").await,
            1 => {
                exec(&client, "SET millrace.inject_write_failures = 1").await;
                let failed = client.batch_execute("CHECKPOINT").await.is_err();
                failed_checkpoints += usize::from(failed);
            }
            _ => {}
        }
        let writer = tokio::spawn(write_until_killed(
            client,
            StdRng::seed_from_u64(seed * 1000 + cycle),
            model.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        server.kill();
        let (acked, in_flight) = writer.await.expect("writer");
        for write in &acked {
            write.apply(&mut model);
        }
        server.restart().expect("restart");
        let client = server.connect("millrace").await.expect("reconnect");
        restored += number(
            &client,
            "SELECT count(*) FROM millrace_events WHERE kind = 'view_restored' AND detail LIKE 'from the checkpoint%'",
        )
        .await;
        undone += number(
            &client,
            "SELECT count(*) FROM millrace_events WHERE kind = 'view_restored' AND detail LIKE '%evicted after the checkpoint were put back%'",
        )
        .await;
        let found = accounts(&client).await;
        if found != model {
            let mut with = model.clone();
            if let Some(write) = &in_flight {
                write.apply(&mut with);
            }
            assert_eq!(
                found, with,
                "cycle {cycle}: the table holds the acknowledged writes (in flight: {in_flight:?})"
            );
            in_flight_landed += 1;
            model = with;
        }
        check_views(&client, &ACCT_VIEWS, &format!("cycle {cycle}")).await;
        evictions += one(
            &client,
            "SELECT evictions FROM millrace_cache WHERE kind = 'total'",
        )
        .await
        .parse::<u64>()
        .expect("evictions");
        reopened += usize::from(
            number(
                &client,
                "SELECT log_files FROM millrace_cache WHERE kind = 'total'",
            )
            .await
                > 0,
        );
    }

    stop.store(true, Ordering::Relaxed);
    let produced = events.await.expect("producer");
    let client = server.connect("millrace").await.expect("connect");
    let expected = produced.len().to_string();
    for _ in 0..600 {
        if one(&client, "SELECT count(*) FROM ev").await == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ingested: Vec<(i32, i64)> = rows(&client, "SELECT _partition, _offset FROM ev")
        .await
        .into_iter()
        .map(|r| {
            (
                r[0].as_deref()
                    .and_then(|v| v.parse().ok())
                    .expect("partition"),
                r[1].as_deref()
                    .and_then(|v| v.parse().ok())
                    .expect("offset"),
            )
        })
        .collect();
    let unique: BTreeSet<(i32, i64)> = ingested.iter().copied().collect();
    assert_eq!(unique.len(), ingested.len(), "no Kafka record twice");
    assert_eq!(unique, produced, "every produced Kafka record once");
    check_views(&client, &ACCT_VIEWS, "end").await;
    check_views(&client, &EVENT_VIEWS, "end").await;
    assert!(model.len() > 10, "the test wrote rows: {}", model.len());

    wait_delivered(&client, "by_grp_out").await;
    let view = view_state(&client, "SELECT grp, n, total FROM by_grp").await;
    assert_replays_to(&client, &view, || {
        replay_files(out.path(), &["grp", "n", "total"]).0
    })
    .await;
    eprintln!(
        "{cycles} kill -9 cycles: {} accounts, {} Kafka records, in-flight writes that landed: {in_flight_landed}, \
         views restored from a checkpoint: {restored} (with state evicted after it put back: {undone}), \
         checkpoints failed by injection: {failed_checkpoints}, \
         chunks evicted: {evictions}, restarts that opened cold files of a log: {reopened}",
        model.len(),
        produced.len()
    );
    assert!(restored > 0, "no view was ever restored from a checkpoint");
    assert!(
        undone > 0,
        "no view was restored over state evicted after its checkpoint"
    );
    assert!(evictions > 0, "no chunk was evicted");
    assert!(
        reopened > 0,
        "no restart opened the cold files a rewritten log refers to"
    );
    // With a one-byte share, what cannot be evicted (operator state, row indexes) is reported.
    let detail = one(
        &client,
        "SELECT detail FROM millrace_cache WHERE kind = 'total'",
    )
    .await;
    assert!(detail.contains("cannot be evicted"), "{detail}");
    assert!(
        server
            .log()
            .contains("removed cold files no table refers to"),
        "a start removed the files of a killed run that no table's log refers to"
    );
    assert!(failed_checkpoints > 0, "no checkpoint failure was injected");
}
