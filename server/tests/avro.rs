//! Avro records end to end: a Kafka source of Avro datums (schema from a file, kept in the
//! catalog), a Kafka source whose columns come from an inline schema, and a file source of
//! Avro object container files. Good records land once each and the views equal their
//! queries run in batch; every bad record (truncated, padded, not Avro, null in a NOT NULL
//! column, oversize, out of range) is listed with its position and reason; a restart
//! resumes with the schema from the catalog after the schema file is gone.

use std::collections::BTreeMap;

use apache_avro::types::Value;
use apache_avro::{Decimal, Schema};
use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::broker::Broker;
use millrace_sqllogictest::rows::{exec, number, one, rows, source_errors, wait_for};
use rdkafka::producer::FutureProducer;
use support::{produce, producer};
use tokio_postgres::Client;

mod support;

const SCHEMA: &str = r#"{"type": "record", "name": "click", "namespace": "test", "fields": [
    {"name": "user_id", "type": "long"},
    {"name": "url", "type": ["null", "string"]},
    {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "kind", "type": {"type": "enum", "name": "kind", "symbols": ["view", "buy"]}},
    {"name": "score", "type": "int"}
]}"#;

/// What the test knows of a good record: (user_id, url, price in cents, kind).
type Good = BTreeMap<(i32, i64), (i64, String, i64, &'static str)>;

fn click(user: i64, url: Option<&str>, cents: i64, kind: u32, score: i32) -> Value {
    Value::Record(vec![
        ("user_id".into(), Value::Long(user)),
        (
            "url".into(),
            match url {
                Some(u) => Value::Union(1, Box::new(Value::String(u.into()))),
                None => Value::Union(0, Box::new(Value::Null)),
            },
        ),
        (
            "price".into(),
            Value::Decimal(Decimal::from(cents.to_be_bytes())),
        ),
        (
            "ts".into(),
            Value::TimestampMicros(1_767_225_600_000_000 + user),
        ),
        (
            "kind".into(),
            Value::Enum(kind, ["view", "buy"][kind as usize].into()),
        ),
        ("score".into(), Value::Int(score)),
    ])
}

fn datum(schema: &Schema, value: Value) -> Vec<u8> {
    apache_avro::to_avro_datum(schema, value).expect("encode datum")
}

async fn produce_good(
    producer: &FutureProducer,
    schema: &Schema,
    range: std::ops::Range<i64>,
    good: &mut Good,
) {
    for i in range {
        let partition = (i % 2) as i32;
        let url = format!("/p/{}", i % 5);
        let cents = i * 37 - 500;
        let kind = (i % 3 == 0) as u32;
        let payload = datum(schema, click(i, Some(&url), cents, kind, i as i32));
        let offset = produce(producer, "avro_clicks", partition, &payload).await;
        good.insert(
            (partition, offset),
            (i, url, cents, ["view", "buy"][kind as usize]),
        );
    }
}

/// The source holds exactly the good records, and the view equals its query in batch.
async fn check(client: &Client, good: &Good) {
    let got = rows(
        client,
        "SELECT _partition, _offset, user_id, url, price, kind FROM clicks",
    )
    .await;
    let mut want: Vec<Vec<Option<String>>> = good
        .iter()
        .map(|((p, o), (u, url, cents, kind))| {
            let sign = if *cents < 0 { "-" } else { "" };
            vec![
                Some(p.to_string()),
                Some(o.to_string()),
                Some(u.to_string()),
                Some(url.clone()),
                Some(format!(
                    "{sign}{}.{:02}",
                    cents.abs() / 100,
                    cents.abs() % 100
                )),
                Some(kind.to_string()),
            ]
        })
        .collect();
    want.sort();
    assert_eq!(got.len(), want.len(), "row count of the source");
    assert_eq!(got, want, "the source holds exactly the good records");
    let view = rows(client, "SELECT url, kind, n, total FROM per_url").await;
    let batch = rows(
        client,
        "SELECT url, kind, count(*), sum(price) FROM clicks GROUP BY url, kind",
    )
    .await;
    assert_eq!(view, batch, "the view equals its query run in batch");
    assert!(!view.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_avro_records_land_once_and_bad_ones_are_listed() {
    let broker = Broker::start().expect("start tansu");
    broker.create_topic("avro_clicks", 2).expect("create topic");
    let producer = producer(&broker);
    let schema = Schema::parse_str(SCHEMA).expect("schema");
    let mut good = Good::new();
    produce_good(&producer, &schema, 0..80, &mut good).await;

    // Bad records: (partition, payload, reason it must be listed with).
    let whole = datum(&schema, click(1000, Some("/x"), 1, 0, 1));
    let mut padded = whole.clone();
    padded.extend_from_slice(&[2, 4]);
    let bad_payloads: Vec<(i32, Vec<u8>, &str)> = vec![
        (0, whole[..whole.len() - 4].to_vec(), "malformed Avro"),
        (1, padded, "2 bytes after the record"),
        (0, br#"{"user_id": 1}"#.to_vec(), "malformed Avro"),
        (
            1,
            datum(&schema, click(1001, None, 1, 0, 1)),
            "missing required field \"url\"",
        ),
        (
            0,
            datum(&schema, click(1002, Some(&"u".repeat(3000)), 1, 0, 1)),
            "exceeds max_record_bytes",
        ),
        (
            1,
            datum(&schema, click(1003, Some("/x"), 1, 0, 70_000)),
            "field \"score\"",
        ),
    ];
    let mut bad = BTreeMap::new();
    for (partition, payload, reason) in &bad_payloads {
        let offset = produce(&producer, "avro_clicks", *partition, payload).await;
        bad.insert((partition.to_string(), offset.to_string()), *reason);
    }
    produce_good(&producer, &schema, 80..100, &mut good).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let schema_file = dir.path().join("click.avsc");
    std::fs::write(&schema_file, SCHEMA).expect("write schema");
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    let address = broker.address();
    exec(
        &client,
        &format!(
            "CREATE SOURCE clicks (user_id BIGINT NOT NULL, url TEXT NOT NULL, price NUMERIC(9, 2), kind TEXT, ts TIMESTAMPTZ, score SMALLINT, _partition INT, _offset BIGINT) \
             WITH (connector = 'kafka', brokers = '{address}', topic = 'avro_clicks', max_record_bytes = 1000) \
             FORMAT PLAIN ENCODE AVRO (schema.location = 'file://{}')",
            schema_file.display()
        ),
    )
    .await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW per_url AS SELECT url, kind, count(*) AS n, sum(price) AS total FROM clicks GROUP BY url, kind",
    )
    .await;
    let total = good.len().to_string();
    wait_for(
        &client,
        "SELECT count(*) FROM clicks",
        &total,
        "good records",
    )
    .await;
    wait_for(
        &client,
        "SELECT count(*) FROM millrace_source_errors WHERE source = 'clicks'",
        &bad.len().to_string(),
        "bad records",
    )
    .await;
    check(&client, &good).await;
    let listed = source_errors(&client, "clicks").await;
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        bad.keys().collect::<Vec<_>>(),
        "exactly the bad records are listed: {listed:?}"
    );
    for (at, reason) in &bad {
        assert!(
            listed[at].contains(reason),
            "{at:?}: {} lacks {reason}",
            listed[at]
        );
    }
    assert_eq!(
        one(
            &client,
            "SELECT ts = '2026-01-01 00:00:00.000007+00'::timestamptz FROM clicks WHERE user_id = 7"
        )
        .await,
        "t"
    );

    // The schema is kept in the catalog: the file can go, and a restart reads on.
    std::fs::remove_file(&schema_file).expect("remove schema");
    server.kill();
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    produce_good(&producer, &schema, 100..140, &mut good).await;
    let total = good.len().to_string();
    wait_for(
        &client,
        "SELECT count(*) FROM clicks",
        &total,
        "after restart",
    )
    .await;
    check(&client, &good).await;

    // Columns from an inline schema (Materialize's spelling), in the Confluent framing.
    exec(
        &client,
        &format!(
            "CREATE SOURCE framed WITH (connector = 'kafka', brokers = '{address}', topic = 'avro_clicks', avro.wire_format = 'confluent') \
             FORMAT AVRO USING SCHEMA '{}'",
            SCHEMA.replace('\'', "''")
        ),
    )
    .await;
    let statement = client
        .prepare("SELECT * FROM framed")
        .await
        .expect("prepare");
    let columns: Vec<String> = statement
        .columns()
        .iter()
        .map(|c| format!("{} {}", c.name(), c.type_().name()))
        .collect();
    assert_eq!(
        columns,
        [
            "user_id int8",
            "url text",
            "price numeric",
            "ts timestamptz",
            "kind text",
            "score int4",
        ]
    );
    assert_eq!(
        rows(
            &client,
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'framed' AND is_nullable = 'YES'",
        )
        .await,
        vec![vec![Some("url".to_string())]],
        "only the union with null is nullable"
    );
    // Every message so far lacks the Confluent header: all of them are listed, none read
    // (most for the missing magic byte; a raw datum that starts with 0 fails to decode).
    let seen = (good.len() + bad.len()).to_string();
    wait_for(
        &client,
        "SELECT count(*) FROM millrace_source_errors WHERE source = 'framed'",
        &seen,
        "unframed messages refused",
    )
    .await;
    assert!(
        number(
            &client,
            "SELECT count(*) FROM millrace_source_errors WHERE source = 'framed' AND reason LIKE '%Confluent wire format%'"
        )
        .await
            > 100
    );
    let mut framed = vec![0, 0, 0, 0, 1];
    framed.extend_from_slice(&datum(&schema, click(5000, Some("/framed"), 250, 1, 3)));
    produce(&producer, "avro_clicks", 0, &framed).await;
    wait_for(
        &client,
        "SELECT count(*) FROM framed",
        "1",
        "framed message",
    )
    .await;
    assert_eq!(
        rows(
            &client,
            "SELECT user_id, url, price, kind, score FROM framed"
        )
        .await,
        vec![vec![
            Some("5000".into()),
            Some("/framed".into()),
            Some("2.50".into()),
            Some("buy".into()),
            Some("3".into()),
        ]]
    );
    assert!(server.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_options_are_checked_before_anything_is_created() {
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    let kafka = "connector = 'kafka', brokers = '127.0.0.1:1', topic = 't'";
    for (sql, code) in [
        (
            format!("CREATE SOURCE s (a INT) WITH ({kafka}) FORMAT AVRO"),
            "22023",
        ),
        (
            format!("CREATE SOURCE s WITH ({kafka}) FORMAT AVRO"),
            "22023",
        ),
        (
            format!(
                "CREATE SOURCE s (a INT) WITH ({kafka}) FORMAT PLAIN ENCODE AVRO (schema.location = '/nonexistent/x.avsc')"
            ),
            "22023",
        ),
        (
            format!(
                "CREATE SOURCE s (a INT) WITH ({kafka}) FORMAT AVRO USING SCHEMA '{{\"type\": \"nope\"}}'"
            ),
            "22023",
        ),
        (
            format!(
                "CREATE SOURCE s (referrer TEXT) WITH ({kafka}) FORMAT AVRO USING SCHEMA '{}'",
                SCHEMA
            ),
            "22023",
        ),
        (
            format!(
                "CREATE SOURCE s (ts BOOLEAN) WITH ({kafka}) FORMAT AVRO USING SCHEMA '{}'",
                SCHEMA
            ),
            "22023",
        ),
        (
            format!(
                "CREATE SOURCE s (a INT) WITH ({kafka}, avro.wire_format = 'weird') FORMAT AVRO USING SCHEMA '{}'",
                SCHEMA
            ),
            "22023",
        ),
    ] {
        let err = client.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(err.code().map(|c| c.code()), Some(code), "{sql}: {err:?}");
    }
    assert_eq!(
        one(&client, "SELECT count(*) FROM millrace_sources").await,
        "0"
    );
    assert!(server.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_container_files_are_read_record_by_record() {
    let schema = Schema::parse_str(SCHEMA).expect("schema");
    let files = tempfile::tempdir().expect("tempdir");
    let encode = |records: Vec<Value>| -> Vec<u8> {
        let mut writer = apache_avro::Writer::new(&schema, Vec::new());
        for r in records {
            writer.append(r).expect("append");
        }
        writer.into_inner().expect("flush")
    };
    // Written aside and renamed into place, as the connector's docs ask of writers.
    let put = |name: &str, bytes: &[u8]| {
        let tmp = files.path().join(format!("{name}.tmp"));
        std::fs::write(&tmp, bytes).expect("write");
        std::fs::rename(&tmp, files.path().join(name)).expect("rename");
    };
    put(
        "001.avro",
        &encode(vec![
            click(1, Some("/a"), 100, 0, 1),
            click(2, None, 200, 1, 2),
            click(3, Some("/b"), -50, 1, 3),
        ]),
    );
    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(
        &client,
        &format!(
            "CREATE TABLE ev (user_id BIGINT NOT NULL, url TEXT, price NUMERIC(9, 2) NOT NULL, kind TEXT) \
             WITH (connector = 'file', path = '{}', poll_interval_ms = 20) FORMAT AVRO",
            files.path().display()
        ),
    )
    .await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW spend AS SELECT kind, count(*) AS n, sum(price) AS total FROM ev GROUP BY kind",
    )
    .await;
    wait_for(
        &client,
        "SELECT \"offset\" FROM millrace_sources WHERE name = 'ev'",
        "1",
        "first file",
    )
    .await;
    assert_eq!(
        rows(&client, "SELECT user_id, url, price, kind FROM ev").await,
        vec![
            vec![
                Some("1".into()),
                Some("/a".into()),
                Some("1.00".into()),
                Some("view".into())
            ],
            vec![
                Some("2".into()),
                None,
                Some("2.00".into()),
                Some("buy".into())
            ],
            vec![
                Some("3".into()),
                Some("/b".into()),
                Some("-0.50".into()),
                Some("buy".into())
            ],
        ]
    );
    // A corrupt tail: the records before it are read, the rest of the file is one bad
    // record. A file that is not Avro is one bad record at line 0.
    let mut cut = encode((10..400).map(|i| click(i, Some("/c"), i, 0, 1)).collect());
    cut.truncate(cut.len() - 40);
    put("002.avro", &cut);
    put("003.avro", b"{\"not\": \"avro\"}");
    wait_for(
        &client,
        "SELECT \"offset\" FROM millrace_sources WHERE name = 'ev'",
        "3",
        "three files",
    )
    .await;
    let bad = rows(
        &client,
        "SELECT partition, reason FROM millrace_source_errors WHERE source = 'ev' ORDER BY partition",
    )
    .await;
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert_eq!(bad[0][0].as_deref(), Some("002.avro"));
    assert!(
        bad[0][1]
            .as_deref()
            .unwrap_or_default()
            .contains("malformed Avro block"),
        "{bad:?}"
    );
    assert_eq!(bad[1][0].as_deref(), Some("003.avro"));
    assert!(
        bad[1][1]
            .as_deref()
            .unwrap_or_default()
            .contains("unreadable Avro file"),
        "{bad:?}"
    );
    let read: i64 = one(&client, "SELECT count(*) FROM ev WHERE url = '/c'")
        .await
        .parse()
        .expect("count");
    assert!(
        read < 390,
        "the corrupt block's records are not read: {read}"
    );
    assert_eq!(
        rows(&client, "SELECT kind, n, total FROM spend").await,
        rows(
            &client,
            "SELECT kind, count(*), sum(price) FROM ev GROUP BY kind"
        )
        .await,
        "the view equals its query run in batch"
    );
    assert!(server.is_running());
}
