//! Sinks end to end: a view's changes delivered to files and to a Kafka topic (tansu on
//! loopback), read back and replayed, must equal the view (and its query run in batch) after
//! seeded random DML with `kill -9` at random moments; a failing target opens the circuit
//! breaker without holding back other views, and recovers; bad sink DDL gets the right
//! SQLSTATE.

use std::collections::BTreeMap;
use std::time::Duration;

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::broker::Broker;
use millrace_sqllogictest::rows::{exec, one, rows};
use millrace_sqllogictest::sink_output::{
    Multiset, apply_line, assert_replays_to, replay_files, view_state, wait_delivered,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_postgres::Client;

const VIEW: &str = "CREATE MATERIALIZED VIEW agg AS SELECT k % 5 AS g, count(*) AS n, sum(v) AS s FROM t GROUP BY k % 5";
const COLUMNS: [&str; 3] = ["g", "n", "s"];

fn seed() -> u64 {
    std::env::var("MILLRACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
}

/// One random write to `t`.
fn random_dml(rng: &mut StdRng) -> String {
    let k = rng.random_range(0..40);
    match rng.random_range(0..4) {
        0 | 1 => format!(
            "INSERT INTO t VALUES ({k}, {}), ({}, {})",
            rng.random_range(0..100),
            rng.random_range(0..40),
            rng.random_range(0..100)
        ),
        2 => format!("DELETE FROM t WHERE k = {k}"),
        _ => format!(
            "UPDATE t SET v = v + {} WHERE k = {k}",
            rng.random_range(1..10)
        ),
    }
}

/// Runs random DML until `steps` writes were acknowledged or the server goes away.
async fn write_until_killed(client: Client, mut rng: StdRng, steps: usize) {
    for _ in 0..steps {
        if client.batch_execute(&random_dml(&mut rng)).await.is_err() {
            return;
        }
    }
}

/// Random DML with `kill -9` at random moments, then checks the sink's delivered history
/// (read back with `read_back`) replays to exactly the view.
async fn crash_cycles<F>(server: &mut TestServer, sink: &str, cycles: usize, read_back: F)
where
    F: Fn() -> Multiset,
{
    let mut rng = StdRng::seed_from_u64(seed());
    for cycle in 0..cycles {
        let client = server.connect("millrace").await.expect("connect");
        let writer = tokio::spawn(write_until_killed(
            client,
            StdRng::seed_from_u64(seed() * 100 + cycle as u64),
            10_000,
        ));
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        server.kill();
        let _ = writer.await;
        server.restart().expect("restart");
    }
    let client = server.connect("millrace").await.expect("connect");
    for _ in 0..20 {
        client
            .batch_execute(&random_dml(&mut rng))
            .await
            .expect("dml");
    }
    wait_delivered(&client, sink).await;
    let view = view_state(&client, "SELECT g, n, s FROM agg").await;
    let batch = view_state(
        &client,
        "SELECT k % 5, count(*), sum(v) FROM t GROUP BY k % 5",
    )
    .await;
    assert_eq!(view, batch, "the view equals its query run in batch");
    assert!(!view.is_empty(), "the test wrote rows");
    assert_replays_to(&client, &view, read_back).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_delivers_each_change_once_across_kill_9() {
    let out = tempfile::tempdir().expect("tmp");
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE t (k INT NOT NULL, v INT NOT NULL)").await;
    exec(&client, "INSERT INTO t VALUES (1, 10), (2, 20), (6, 60)").await;
    exec(&client, VIEW).await;
    exec(
        &client,
        &format!(
            "CREATE SINK out FROM agg WITH (connector = 'file', path = '{}') FORMAT JSON",
            out.path().display()
        ),
    )
    .await;
    wait_delivered(&client, "out").await;
    // The first change is the snapshot.
    let (first, files) = replay_files(out.path(), &COLUMNS);
    assert_eq!(files, 1);
    assert_eq!(first, view_state(&client, "SELECT g, n, s FROM agg").await);
    crash_cycles(&mut server, "out", 4, || {
        replay_files(out.path(), &COLUMNS).0
    })
    .await;

    // Sinks are catalog objects that depend on their view.
    let client = server.connect("millrace").await.expect("connect");
    let err = client
        .batch_execute("DROP MATERIALIZED VIEW agg")
        .await
        .expect_err("view with a sink");
    assert_eq!(err.code().map(|c| c.code()), Some("2BP01"), "{err:?}");
    exec(&client, "DROP SINK out").await;
    assert_eq!(
        one(&client, "SELECT count(*) FROM millrace_sinks").await,
        "0"
    );
    let files = replay_files(out.path(), &COLUMNS).1;
    exec(&client, "INSERT INTO t VALUES (3, 3)").await;
    exec(&client, "FLUSH").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        replay_files(out.path(), &COLUMNS).1,
        files,
        "a dropped sink writes no more"
    );
    exec(&client, "DROP MATERIALIZED VIEW agg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_sink_opens_its_circuit_and_never_blocks_other_views() {
    let root = tempfile::tempdir().expect("tmp");
    let out = root.path().join("later");
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE t (k INT NOT NULL, v INT NOT NULL)").await;
    exec(&client, VIEW).await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW total AS SELECT count(*) AS n FROM t",
    )
    .await;
    exec(
        &client,
        &format!(
            "CREATE SINK out FROM agg WITH (connector = 'file', path = '{}', sink.retry.max_failures = 3, sink.retry.open_ms = 300) FORMAT JSON",
            out.display()
        ),
    )
    .await;
    for i in 0..50 {
        exec(&client, &format!("INSERT INTO t VALUES ({i}, {i})")).await;
    }
    // The target directory does not exist: deliveries fail and the circuit opens.
    for _ in 0..300 {
        let opened = one(
            &client,
            "SELECT circuit_opened FROM millrace_sinks WHERE name = 'out'",
        )
        .await;
        if opened != "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = rows(
        &client,
        "SELECT circuit_opened > 0, errors >= 3, reason LIKE '%file sink%' FROM millrace_sinks WHERE name = 'out'",
    )
    .await;
    assert_eq!(
        r,
        vec![vec![Some("t".into()), Some("t".into()), Some("t".into())]],
        "{:?}",
        rows(&client, "SELECT * FROM millrace_sinks").await
    );
    // Meanwhile other views, and the sink's own view, stay fresh.
    exec(&client, "INSERT INTO t VALUES (100, 1)").await;
    assert_eq!(one(&client, "SELECT n FROM total").await, "51");
    assert_eq!(
        one(&client, "SELECT sum(n) FROM agg").await,
        "51",
        "the sink's view is not held back"
    );
    // The target appears: the half-open probe succeeds and the sink catches up exactly.
    std::fs::create_dir_all(&out).expect("mkdir");
    wait_delivered(&client, "out").await;
    assert_eq!(
        one(
            &client,
            "SELECT circuit || ':' || consecutive_failures FROM millrace_sinks WHERE name = 'out'"
        )
        .await,
        "closed:0"
    );
    let view = view_state(&client, "SELECT g, n, s FROM agg").await;
    assert_replays_to(&client, &view, || replay_files(&out, &COLUMNS).0).await;
    assert!(server.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sink_ddl_gets_the_right_sqlstate() {
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE t (k INT NOT NULL, v INT NOT NULL)").await;
    exec(&client, VIEW).await;
    for (sql, code) in [
        (
            "CREATE SINK s FROM nope WITH (connector = 'file', path = '/tmp')",
            "42P01",
        ),
        ("CREATE SINK s FROM agg WITH (connector = 'file')", "22023"),
        (
            "CREATE SINK s FROM agg WITH (connector = 'carrier-pigeon')",
            "0A000",
        ),
        (
            "CREATE SINK s FROM agg WITH (connector = 'file', path = '/tmp') FORMAT AVRO",
            "0A000",
        ),
        ("CREATE SINK s agg", "42601"),
        ("DROP SINK nope", "42704"),
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some(code), "{sql}: {err:?}");
    }
    exec(&client, "DROP SINK IF EXISTS nope").await;
    assert_eq!(
        one(&client, "SELECT count(*) FROM millrace_sinks").await,
        "0"
    );
    assert!(server.is_running());
}

/// Reads a whole topic and replays it, keeping the first message of each (seq, index).
fn replay_topic(broker: &Broker, topic: &str) -> (Multiset, usize) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", "sink-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .expect("metadata");
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut assignment = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in &partitions {
        assignment
            .add_partition_offset(topic, *p, Offset::Beginning)
            .expect("assign");
        let (_, high) = consumer
            .fetch_watermarks(topic, *p, Duration::from_secs(5))
            .expect("watermarks");
        ends.insert(*p, high);
    }
    consumer.assign(&assignment).expect("assign");
    let mut next: BTreeMap<i32, i64> = partitions.iter().map(|p| (*p, 0)).collect();
    let mut lines: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // NOTE: tansu's high watermarks can trail the messages it serves, so reading goes on
    // past them until the topic has been quiet for a while.
    let mut quiet = 0;
    while next.iter().any(|(p, o)| *o < ends[p]) || quiet < 5 {
        assert!(std::time::Instant::now() < deadline, "topic read timed out");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet = 0;
                next.insert(m.partition(), m.offset() + 1);
                lines.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
            }
            _ => quiet += 1,
        }
    }
    let mut seen = std::collections::HashMap::new();
    let mut state = Multiset::new();
    let mut duplicates = 0;
    for line in lines {
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        let id = (value["seq"].as_u64(), value["index"].as_u64());
        if let Some(first) = seen.get(&id) {
            assert_eq!(
                first, &line,
                "a change re-sent under its number is the same change"
            );
            duplicates += 1;
            continue;
        }
        seen.insert(id, line.clone());
        apply_line(&mut state, &line, &COLUMNS);
    }
    (state, duplicates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_history_replays_to_the_view_across_kill_9() {
    let broker = Broker::start().expect("start tansu");
    broker.create_topic("agg_out", 2).expect("topic");
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE t (k INT NOT NULL, v INT NOT NULL)").await;
    exec(&client, "INSERT INTO t VALUES (1, 10), (2, 20)").await;
    exec(&client, VIEW).await;
    exec(
        &client,
        &format!(
            "CREATE SINK out FROM agg WITH (connector = 'kafka', brokers = '{}', topic = 'agg_out') FORMAT JSON",
            broker.address()
        ),
    )
    .await;
    crash_cycles(&mut server, "out", 3, || replay_topic(&broker, "agg_out").0).await;
    let (_, duplicates) = replay_topic(&broker, "agg_out");
    println!("kafka sink: {duplicates} duplicate messages dropped by (seq, index)");
}
