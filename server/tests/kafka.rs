//! The Kafka source end to end against a real broker (tansu on loopback): records produced
//! with rdkafka, good and bad, land exactly once in a `CREATE SOURCE` and the views over it
//! (checked against the records the test produced and against the batch query); every bad
//! record is listed with its partition, offset and reason; a frozen broker turns the source
//! unhealthy and back with no gap and no duplicate; a `kill -9` mid-stream resumes from the
//! committed offsets; a missing topic is reported until it appears; a topic deleted while
//! it is read (which crashes librdkafka 2.12 in its fetch process) or while the server is
//! down leaves the server up, and the topic created again is read from its beginning.

use std::collections::{BTreeMap, BTreeSet};

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::broker::Broker;
use millrace_sqllogictest::rows::{exec, one, rows, source_errors, wait_for};
use rdkafka::producer::FutureProducer;
use support::{produce, producer};
use tokio_postgres::Client;

mod support;

/// The good records produced so far, by (partition, offset): (user_id, url).
type Good = BTreeMap<(i32, i64), (i64, String)>;

/// Produces `n` good records per partition from `start`, returning them.
async fn produce_good(
    producer: &FutureProducer,
    topic: &str,
    start: usize,
    n: usize,
    good: &mut Good,
) {
    for i in start..start + n {
        for partition in 0..2 {
            let user = (i * 2 + partition as usize) as i64;
            let url = format!("/page/{}", user % 7);
            let payload = format!(
                r#"{{"user_id": {user}, "url": "{url}", "ts": "2026-01-01T00:00:{:02}Z"}}"#,
                i % 60
            );
            let offset = produce(producer, topic, partition, payload.as_bytes()).await;
            good.insert((partition, offset), (user, url));
        }
    }
}

/// Checks the source holds exactly the good records, once each, and the view equals both the
/// expected counts and its query run in batch.
async fn check_exact(client: &Client, good: &Good) {
    let got = rows(
        client,
        "SELECT _partition, _offset, user_id, url FROM clicks",
    )
    .await;
    let mut want: Vec<Vec<Option<String>>> = good
        .iter()
        .map(|((p, o), (u, url))| {
            vec![
                Some(p.to_string()),
                Some(o.to_string()),
                Some(u.to_string()),
                Some(url.clone()),
            ]
        })
        .collect();
    want.sort();
    assert_eq!(got.len(), want.len(), "row count of the source");
    assert_eq!(got, want, "the source holds exactly the good records");
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for (_, url) in good.values() {
        *counts.entry(url.clone()).or_default() += 1;
    }
    let want: Vec<Vec<Option<String>>> = counts
        .iter()
        .map(|(u, n)| vec![Some(u.clone()), Some(n.to_string())])
        .collect();
    let view = rows(client, "SELECT url, n FROM top_urls").await;
    assert_eq!(view, want, "the view counts the good records");
    let batch = rows(client, "SELECT url, count(*) FROM clicks GROUP BY url").await;
    assert_eq!(view, batch, "the view equals its query run in batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_reads_exactly_once_through_outages_and_crashes() {
    let broker = Broker::start().expect("start tansu");
    broker.create_topic("clicks", 2).expect("create topic");
    let producer = producer(&broker);
    let mut good = Good::new();
    produce_good(&producer, "clicks", 0, 60, &mut good).await;
    // Bad records, one of each kind, on both partitions.
    let bad_payloads: Vec<(i32, Vec<u8>, &str)> = vec![
        (0, b"{not json".to_vec(), "malformed JSON"),
        (
            1,
            br#"{"user_id": "abc", "url": "/x"}"#.to_vec(),
            "is not a",
        ),
        (
            0,
            br#"{"url": "/no-user"}"#.to_vec(),
            "missing required field",
        ),
        (
            1,
            format!(r#"{{"user_id": 1, "url": "{}"}}"#, "x".repeat(600)).into_bytes(),
            "exceeds max_record_bytes",
        ),
        (
            0,
            b"{\"user_id\": 2, \"url\": \"\xff\xfe\"}".to_vec(),
            "invalid UTF-8",
        ),
    ];
    let mut bad = BTreeMap::new();
    for (partition, payload, reason) in &bad_payloads {
        let offset = produce(&producer, "clicks", *partition, payload).await;
        bad.insert(
            (partition.to_string(), offset.to_string()),
            reason.to_string(),
        );
    }
    produce_good(&producer, "clicks", 60, 40, &mut good).await;

    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    let source = format!(
        "CREATE SOURCE clicks (user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMPTZ, _partition INT, _offset BIGINT) \
         WITH (connector = 'kafka', brokers = '{}', topic = 'clicks', scan.startup.mode = 'earliest', max_record_bytes = 512, readers = 2) \
         FORMAT JSON",
        broker.address()
    );
    exec(&client, &source).await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW top_urls AS SELECT url, count(*) AS n FROM clicks GROUP BY url",
    )
    .await;
    wait_for(
        &client,
        "SELECT count(*) FROM clicks",
        &good.len().to_string(),
        "first batch",
    )
    .await;
    check_exact(&client, &good).await;

    // Every bad record is listed, with where it was and why.
    let listed = source_errors(&client, "clicks").await;
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        bad.keys().collect::<Vec<_>>(),
        "exactly the bad records are listed"
    );
    for (at, reason) in &bad {
        assert!(
            listed[at].contains(reason.as_str()),
            "record at {at:?}: reason {:?} should mention {reason:?}",
            listed[at]
        );
    }
    assert_eq!(
        one(
            &client,
            "SELECT bad_records FROM millrace_sources WHERE name = 'clicks'"
        )
        .await,
        bad.len().to_string()
    );

    // Per partition: the committed offset reaches the high watermark.
    wait_for(
        &client,
        "SELECT count(*) FROM millrace_source_partitions WHERE source = 'clicks' AND lag = 0 AND \"offset\" = high_watermark",
        "2",
        "partitions caught up",
    )
    .await;
    // The two partitions are read by two readers in parallel.
    assert_eq!(
        one(
            &client,
            "SELECT count(DISTINCT reader) FROM millrace_source_partitions WHERE source = 'clicks'"
        )
        .await,
        "2"
    );
    // Each reader's fetch process is memory the limit covers: the cache counts it.
    let detail = one(
        &client,
        "SELECT detail FROM millrace_cache WHERE kind = 'total'",
    )
    .await;
    let helpers = detail
        .split("; ")
        .find_map(|part| part.strip_suffix(" bytes (counted in the limit)"))
        .and_then(|part| part.split_once(" kafka fetch processes hold "))
        .and_then(|(n, bytes)| Some((n.parse::<u32>().ok()?, bytes.parse::<u64>().ok()?)));
    println!("kafka fetch processes and their anonymous resident bytes: {helpers:?}");
    assert!(
        matches!(helpers, Some((2, bytes)) if bytes > 1 << 20),
        "two fetch processes holding more than 1 MiB counted: {detail}"
    );

    // A source is fed only by its connector.
    let err = client
        .batch_execute("INSERT INTO clicks VALUES (1, 'x', now(), 0, 0)")
        .await
        .expect_err("INSERT into a source");
    assert_eq!(err.code().map(|c| c.code()), Some("42809"), "{err:?}");

    // The broker freezes: the source turns unhealthy, then resumes with no gap.
    broker.pause();
    wait_for(
        &client,
        "SELECT status FROM millrace_sources WHERE name = 'clicks'",
        "unhealthy",
        "frozen broker detected",
    )
    .await;
    let reason = one(
        &client,
        "SELECT reason FROM millrace_sources WHERE name = 'clicks'",
    )
    .await;
    assert!(reason.contains("kafka"), "reason: {reason}");
    broker.resume();
    produce_good(&producer, "clicks", 100, 50, &mut good).await;
    wait_for(
        &client,
        "SELECT count(*) FROM clicks",
        &good.len().to_string(),
        "after the outage",
    )
    .await;
    wait_for(
        &client,
        "SELECT status FROM millrace_sources WHERE name = 'clicks'",
        "running",
        "recovered source",
    )
    .await;
    check_exact(&client, &good).await;

    // kill -9 while records stream in; the restart resumes at the committed offsets.
    produce_good(&producer, "clicks", 150, 1500, &mut good).await;
    server.kill();
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    wait_for(
        &client,
        "SELECT count(*) FROM clicks",
        &good.len().to_string(),
        "after kill -9",
    )
    .await;
    wait_for(
        &client,
        "SELECT count(*) FROM top_urls",
        "7",
        "view rebuilt",
    )
    .await;
    check_exact(&client, &good).await;
    // The bad records were committed with the rows read beside them: still listed, once.
    assert_eq!(
        source_errors(&client, "clicks").await,
        listed,
        "bad records survive kill -9"
    );

    // A source created with startup mode latest sees only what is produced after it.
    let late = source
        .replace("CREATE SOURCE clicks", "CREATE SOURCE late")
        .replace("'earliest'", "'latest'");
    exec(&client, &late).await;
    wait_for(
        &client,
        "SELECT count(*) FROM millrace_source_partitions WHERE source = 'late' AND lag = 0",
        "2",
        "late source assigned",
    )
    .await;
    let before = good.clone();
    produce_good(&producer, "clicks", 1650, 5, &mut good).await;
    wait_for(&client, "SELECT count(*) FROM late", "10", "late source").await;
    let late_offsets: BTreeSet<Vec<Option<String>>> =
        rows(&client, "SELECT _partition, _offset FROM late")
            .await
            .into_iter()
            .collect();
    let fresh: BTreeSet<Vec<Option<String>>> = good
        .keys()
        .filter(|k| !before.contains_key(k))
        .map(|(p, o)| vec![Some(p.to_string()), Some(o.to_string())])
        .collect();
    assert_eq!(late_offsets, fresh, "latest starts after what was there");

    // A source on a topic that does not exist says so, and starts reading when it appears.
    exec(
        &client,
        &source
            .replace("CREATE SOURCE clicks", "CREATE SOURCE later")
            .replace("topic = 'clicks'", "topic = 'later'"),
    )
    .await;
    wait_for(
        &client,
        "SELECT count(*) FROM millrace_sources WHERE name = 'later' AND status = 'unhealthy' AND reason LIKE '%topic later does not exist%'",
        "1",
        "missing topic detected",
    )
    .await;
    broker.create_topic("later", 1).expect("create topic");
    let offset = produce(&producer, "later", 0, br#"{"user_id": 5, "url": "/later"}"#).await;
    wait_for(&client, "SELECT count(*) FROM later", "1", "topic appeared").await;
    assert_eq!(
        rows(&client, "SELECT _offset, user_id, url FROM later").await,
        vec![vec![
            Some(offset.to_string()),
            Some("5".into()),
            Some("/later".into())
        ]]
    );
    wait_for(
        &client,
        "SELECT status FROM millrace_sources WHERE name = 'later'",
        "running",
        "source on the new topic",
    )
    .await;

    // The topic deleted while it is read: the server stays up (librdkafka 2.12 crashes on
    // tansu's answer for a deleted topic; it runs in a fetch process of its own), the source
    // says the topic is gone, and reads the topic created again from its beginning, whose
    // offsets start over below the committed one.
    broker.delete_topic("later").expect("delete topic");
    wait_for(
        &client,
        "SELECT count(*) FROM millrace_sources WHERE name = 'later' AND status = 'unhealthy' AND reason LIKE '%topic later does not exist%'",
        "1",
        "deleted topic detected",
    )
    .await;
    assert!(server.is_running(), "a deleted topic took the server down");
    assert!(
        server.log().contains("kafka topic deleted"),
        "the deletion is logged as a warning"
    );
    produce_good(&producer, "clicks", 1655, 3, &mut good).await;
    wait_for(
        &client,
        "SELECT count(*) FROM clicks",
        &good.len().to_string(),
        "other sources read on",
    )
    .await;
    check_exact(&client, &good).await;
    broker.create_topic("later", 1).expect("create topic again");
    let again = produce(&producer, "later", 0, br#"{"user_id": 6, "url": "/again"}"#).await;
    assert!(again < offset + 1, "the new topic's offsets start over");
    wait_for(
        &client,
        "SELECT count(*) FROM later",
        "2",
        "topic created again",
    )
    .await;
    assert_eq!(
        rows(
            &client,
            "SELECT _offset, user_id, url FROM later ORDER BY user_id"
        )
        .await,
        vec![
            vec![
                Some(offset.to_string()),
                Some("5".into()),
                Some("/later".into())
            ],
            vec![
                Some(again.to_string()),
                Some("6".into()),
                Some("/again".into())
            ],
        ]
    );
    wait_for(
        &client,
        "SELECT status FROM millrace_sources WHERE name = 'later'",
        "running",
        "source on the topic created again",
    )
    .await;

    // The topic deleted and created again while the server is down: the committed offset
    // is past the new topic's end, which the restart notices (with a warning), reading the
    // new topic from its beginning.
    server.kill();
    broker.delete_topic("later").expect("delete topic");
    broker.create_topic("later", 1).expect("create topic");
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("connect");
    wait_for(
        &client,
        "SELECT \"offset\" FROM millrace_source_partitions WHERE source = 'later'",
        "0",
        "committed offset back at the new topic's start",
    )
    .await;
    let third = produce(&producer, "later", 0, br#"{"user_id": 7, "url": "/third"}"#).await;
    wait_for(
        &client,
        "SELECT count(*) FROM later",
        "3",
        "topic created while down",
    )
    .await;
    assert_eq!(
        rows(&client, "SELECT _offset, url FROM later WHERE user_id = 7").await,
        vec![vec![Some(third.to_string()), Some("/third".into())]]
    );
    assert!(
        server.log().contains("reading it from its beginning"),
        "the committed offset past the end is logged"
    );
    assert!(server.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_options_are_checked_before_anything_is_created() {
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    for (sql, code) in [
        (
            "CREATE SOURCE s (a INT) WITH (connector = 'kafka', topic = 't') FORMAT JSON",
            "22023",
        ),
        (
            "CREATE SOURCE s (a INT) WITH (connector = 'kafka', brokers = '127.0.0.1:1', topic = 't', scan.startup.mode = 'sometime')",
            "22023",
        ),
        (
            "CREATE SOURCE s (a INT) WITH (connector = 'kafka', brokers = '127.0.0.1:1', topic = 't', readers = 0)",
            "22023",
        ),
        (
            "CREATE SOURCE s (a INT) WITH (connector = 'kafka', brokers = '127.0.0.1:1', topic = 't') FORMAT PROTOBUF",
            "0A000",
        ),
        (
            "CREATE SOURCE s (a INT[]) WITH (connector = 'kafka', brokers = '127.0.0.1:1', topic = 't')",
            "0A000",
        ),
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some(code), "{sql}: {err:?}");
    }
    assert_eq!(
        one(&client, "SELECT count(*) FROM millrace_sources").await,
        "0"
    );
    // An unreachable broker is a runtime condition, not a DDL error: the source is created
    // and reports it.
    exec(
        &client,
        "CREATE SOURCE s (a INT) WITH (connector = 'kafka', brokers = '127.0.0.1:1', topic = 't') FORMAT JSON",
    )
    .await;
    wait_for(
        &client,
        "SELECT status FROM millrace_sources WHERE name = 's'",
        "unhealthy",
        "unreachable broker",
    )
    .await;
    exec(&client, "DROP SOURCE s").await;
    assert_eq!(
        one(&client, "SELECT count(*) FROM millrace_sources").await,
        "0"
    );
    assert!(server.is_running());
}
