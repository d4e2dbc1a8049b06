//! File sources on object storage end to end: JSON-lines and Parquet files uploaded to a real
//! S3-compatible server on loopback (s3s-fs) land exactly once in their sources and views
//! (checked against the records uploaded and against the batch query), bad records and
//! unreadable files are listed with file, line and reason, a frozen server and refused
//! credentials turn the source unhealthy, and new files are picked up after recovery and
//! across a `kill -9`.

use std::sync::Arc;

use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::rows::{exec, one, rows, wait_for};
use millrace_sqllogictest::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

fn bucket(s3: &S3Server) -> impl ObjectStore {
    AmazonS3Builder::new()
        .with_bucket_name("lake")
        .with_endpoint(s3.endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .build()
        .expect("S3 client")
}

async fn put(store: &impl ObjectStore, path: &str, bytes: Vec<u8>) {
    store
        .put(&Path::from(path), bytes.into())
        .await
        .unwrap_or_else(|e| panic!("upload {path}: {e}"));
}

/// A Parquet file of (id, name) rows.
fn parquet(ids: Vec<Option<i64>>, names: Vec<&str>) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(StringArray::from(names)),
        ],
    )
    .expect("batch");
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    out
}

fn source(name: &str, prefix: &str, format: &str, s3: &S3Server, secret: &str) -> String {
    format!(
        "CREATE SOURCE {name} (id BIGINT NOT NULL, name TEXT) WITH (connector = 'file', \
         path = 's3://lake/{prefix}', s3.endpoint = '{}', s3.region = 'us-east-1', \
         s3.access_key_id = '{ACCESS_KEY}', s3.secret_access_key = '{secret}', poll_interval_ms = 100) \
         FORMAT {format}",
        s3.endpoint()
    )
}

fn text_rows(pairs: &[(i64, &str)]) -> Vec<Vec<Option<String>>> {
    let mut v: Vec<Vec<Option<String>>> = pairs
        .iter()
        .map(|(i, n)| vec![Some(i.to_string()), Some(n.to_string())])
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_files_are_read_exactly_once_with_bad_records_listed() {
    let s3 = S3Server::start(&["lake"]).expect("start s3s-fs");
    let store = bucket(&s3);
    put(
        &store,
        "json/001.jsonl",
        b"{\"id\": 1, \"name\": \"a\"}\n{\"id\": 2, \"name\": \"b\"}\n{broken\n{\"id\": 3, \"name\": \"a\"}\n{\"name\": \"no id\"}\n"
            .to_vec(),
    )
    .await;
    put(
        &store,
        "pq/001.parquet",
        parquet(vec![Some(10), None, Some(12)], vec!["x", "null id", "y"]),
    )
    .await;
    put(
        &store,
        "pq/002.parquet",
        b"PAR1 this is not parquet".to_vec(),
    )
    .await;

    let mut server = TestServer::start(&[]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, &source("ev", "json", "JSON", &s3, SECRET_KEY)).await;
    exec(&client, &source("pq", "pq", "PARQUET", &s3, SECRET_KEY)).await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW per_name AS SELECT name, count(*) AS n FROM ev GROUP BY name",
    )
    .await;
    wait_for(&client, "SELECT count(*) FROM ev", "3", "json files").await;
    wait_for(&client, "SELECT count(*) FROM pq", "2", "parquet files").await;
    assert_eq!(
        rows(&client, "SELECT id, name FROM ev").await,
        text_rows(&[(1, "a"), (2, "b"), (3, "a")])
    );
    assert_eq!(
        rows(&client, "SELECT id, name FROM pq").await,
        text_rows(&[(10, "x"), (12, "y")])
    );
    assert_eq!(
        rows(&client, "SELECT * FROM per_name").await,
        rows(&client, "SELECT name, count(*) FROM ev GROUP BY name").await
    );
    // The unreadable file can be listed after the readable one was committed.
    wait_for(
        &client,
        "SELECT count(*) FROM millrace_source_errors",
        "4",
        "bad records listed",
    )
    .await;
    let bad = rows(
        &client,
        "SELECT source, partition, \"offset\", reason FROM millrace_source_errors",
    )
    .await;
    let summary: Vec<(String, String, String)> = bad
        .iter()
        .map(|r| {
            (
                r[1].clone().unwrap_or_default(),
                r[2].clone().unwrap_or_default(),
                r[3].clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(summary.len(), 4, "{summary:?}");
    assert!(
        summary
            .iter()
            .any(|(f, l, r)| f == "001.jsonl" && l == "3" && r.contains("malformed JSON")),
        "{summary:?}"
    );
    assert!(
        summary.iter().any(|(f, l, r)| f == "001.jsonl"
            && l == "5"
            && r.contains("missing required field \"id\"")),
        "{summary:?}"
    );
    assert!(
        summary.iter().any(|(f, l, r)| f == "001.parquet"
            && l == "2"
            && r.contains("missing required field \"id\"")),
        "{summary:?}"
    );
    assert!(
        summary
            .iter()
            .any(|(f, l, r)| f == "002.parquet" && l == "0" && r.contains("unreadable Parquet")),
        "{summary:?}"
    );

    // Refused credentials: the source says so and ingests nothing.
    exec(
        &client,
        &source("denied", "json", "JSON", &s3, "wrong-secret"),
    )
    .await;
    wait_for(
        &client,
        "SELECT status FROM millrace_sources WHERE name = 'denied'",
        "unhealthy",
        "refused credentials",
    )
    .await;
    assert_eq!(one(&client, "SELECT count(*) FROM denied").await, "0");

    // The server freezes: unhealthy; it comes back and a new file is read once.
    s3.pause();
    wait_for(
        &client,
        "SELECT status FROM millrace_sources WHERE name = 'ev'",
        "unhealthy",
        "frozen S3 server",
    )
    .await;
    s3.resume();
    put(
        &store,
        "json/002.jsonl",
        b"{\"id\": 4, \"name\": \"c\"}\n".to_vec(),
    )
    .await;
    wait_for(&client, "SELECT count(*) FROM ev", "4", "after the outage").await;
    wait_for(
        &client,
        "SELECT status FROM millrace_sources WHERE name = 'ev'",
        "running",
        "recovered",
    )
    .await;

    // kill -9; a file uploaded meanwhile is read after the restart, the old ones not again.
    server.kill();
    put(
        &store,
        "json/003.jsonl",
        b"{\"id\": 5, \"name\": \"a\"}\n".to_vec(),
    )
    .await;
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    wait_for(&client, "SELECT count(*) FROM ev", "5", "after kill -9").await;
    assert_eq!(
        rows(&client, "SELECT id, name FROM ev").await,
        text_rows(&[(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "a")])
    );
    wait_for(
        &client,
        "SELECT count(*) FROM per_name",
        "3",
        "view rebuilt",
    )
    .await;
    assert_eq!(
        rows(&client, "SELECT * FROM per_name").await,
        rows(&client, "SELECT name, count(*) FROM ev GROUP BY name").await
    );
    assert!(server.is_running());
}
