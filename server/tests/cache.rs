//! The tiered columnar cache end to end: a server under `--memory-limit` evicts the least
//! recently read chunks of tables and views to Parquet files on the object store (the local
//! default and a real S3-compatible server on loopback), and every read (full scans, filters,
//! primary-key and index lookups, TopK sorts, aggregates, views) still answers exactly what a
//! model of the acknowledged writes says, through random deletes, updates and inserts that hit
//! evicted rows, failed object-store PUTs and a `kill -9`. The cache stays within its share
//! of the budget, files of deleted chunks and the killed run's files no table log refers to
//! are removed, and the resident memory is reported beside the idle server's.

use std::collections::BTreeMap;
use std::time::Duration;

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::rows::{TextRow, exec, one, rows};
use millrace_sqllogictest::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use millrace_sqllogictest::server::parquet_files;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

const LIMIT: &str = "96MiB";

/// The table as the test wrote it: id -> (g, s).
type Model = BTreeMap<i64, (i64, String)>;

fn seed() -> u64 {
    std::env::var("MILLRACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cac4e)
}

fn text(row: &[String]) -> TextRow {
    row.iter().map(|v| Some(v.clone())).collect()
}

fn sorted(mut rows: Vec<TextRow>) -> Vec<TextRow> {
    rows.sort();
    rows
}

/// Inserts ids `from..to` with a long text so that the rows outgrow the budget.
async fn insert_range(client: &Client, model: &mut Model, from: i64, to: i64) {
    exec(
        client,
        &format!(
            "INSERT INTO big SELECT v, v % 50, 'row ' || v || ' ' || repeat('x', 80 + CAST(v % 40 AS INT)) \
             FROM generate_series({from}, {}) t(v)",
            to - 1
        ),
    )
    .await;
    for v in from..to {
        model.insert(
            v,
            (
                v % 50,
                format!("row {v} {}", "x".repeat(80 + (v % 40) as usize)),
            ),
        );
    }
}

/// A figure of the `columnar cache` total row of `millrace_cache`.
async fn cache_total(client: &Client, column: &str) -> i64 {
    one(
        client,
        &format!("SELECT {column} FROM millrace_cache WHERE kind = 'total'"),
    )
    .await
    .parse()
    .unwrap_or(-1)
}

/// Eviction passes that failed so far (from the detail of the `columnar cache` row).
async fn failed_passes(client: &Client) -> i64 {
    let detail = one(
        client,
        "SELECT detail FROM millrace_cache WHERE kind = 'total'",
    )
    .await;
    detail
        .split(" failed eviction passes")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

/// Files and row groups that scans' filters ruled out (from the `columnar cache` row).
async fn pruned(client: &Client) -> (i64, i64) {
    let detail = one(
        client,
        "SELECT detail FROM millrace_cache WHERE kind = 'total'",
    )
    .await;
    let number_before = |what: &str| -> i64 {
        detail
            .split(what)
            .next()
            .and_then(|head| head.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1)
    };
    (number_before(" files and"), number_before(" row groups;"))
}

/// Polls until `check` holds (at most a minute); panics with `what` otherwise.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: never happened");
}

/// Every read path against the model, and the views against their queries and the model.
async fn check_reads(client: &Client, model: &Model, rng: &mut StdRng, when: &str) {
    let want: Vec<TextRow> = sorted(
        model
            .iter()
            .map(|(id, (g, s))| text(&[id.to_string(), g.to_string(), s.clone()]))
            .collect(),
    );
    let got = rows(client, "SELECT id, g, s FROM big").await;
    assert!(
        got == want,
        "{when}: full scan differs from the model ({} vs {} rows)",
        got.len(),
        want.len()
    );

    // Primary-key lookups, of present and of deleted or never written ids.
    for _ in 0..40 {
        let id = rng.random_range(0..(model.keys().last().copied().unwrap_or(0) + 10));
        let got = rows(client, &format!("SELECT g, s FROM big WHERE id = {id}")).await;
        let want: Vec<TextRow> = model
            .get(&id)
            .map(|(g, s)| vec![text(&[g.to_string(), s.clone()])])
            .unwrap_or_default();
        assert_eq!(got, want, "{when}: lookup of id {id}");
    }
    // The secondary index on g.
    let g = rng.random_range(0..50);
    let n = model.values().filter(|(mg, _)| *mg == g).count();
    assert_eq!(
        one(client, &format!("SELECT count(*) FROM big WHERE g = {g}")).await,
        n.to_string(),
        "{when}: index lookup g = {g}"
    );
    // A filter on a column of the cold files, with a projection.
    let (n, sum) = model
        .iter()
        .filter(|(_, (_, s))| s.ends_with('u'))
        .fold((0i64, 0i64), |(n, t), (id, _)| (n + 1, t + id));
    assert_eq!(
        rows(
            client,
            "SELECT count(*), sum(id) FROM big WHERE s LIKE '%u'"
        )
        .await,
        vec![vec![Some(n.to_string()), (n > 0).then(|| sum.to_string())]],
        "{when}: filtered aggregate"
    );
    // A filter no index answers, returning the wide column: cold files decode `s` only for
    // the rows the filter keeps.
    let got = sorted(
        rows(
            client,
            &format!("SELECT id, s FROM big WHERE g + 0 = {g} AND id % 2 = 0"),
        )
        .await,
    );
    let want: Vec<TextRow> = sorted(
        model
            .iter()
            .filter(|(id, (mg, _))| *mg == g && *id % 2 == 0)
            .map(|(id, (_, s))| text(&[id.to_string(), s.clone()]))
            .collect(),
    );
    assert!(
        got == want,
        "{when}: filtered scan of g = {g}: {} rows, model {}",
        got.len(),
        want.len()
    );
    // TopK over every row.
    let mut by_s: Vec<(&String, &i64)> = model.iter().map(|(id, (_, s))| (s, id)).collect();
    by_s.sort();
    let top: Vec<TextRow> = sorted(
        by_s.iter()
            .rev()
            .take(5)
            .map(|(_, id)| vec![Some(id.to_string())])
            .collect(),
    );
    assert_eq!(
        rows(client, "SELECT id FROM big ORDER BY s DESC LIMIT 5").await,
        top,
        "{when}: top 5"
    );
    // The views equal their queries run in batch, and the model.
    let per_g = rows(client, "SELECT g, n, total FROM per_g").await;
    assert_eq!(
        per_g,
        rows(client, "SELECT g, count(*), sum(id) FROM big GROUP BY g").await,
        "{when}: per_g"
    );
    let mut groups: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (id, (g, _)) in model {
        let e = groups.entry(*g).or_default();
        e.0 += 1;
        e.1 += id;
    }
    let want: Vec<TextRow> = sorted(
        groups
            .iter()
            .map(|(g, (n, t))| text(&[g.to_string(), n.to_string(), t.to_string()]))
            .collect(),
    );
    assert_eq!(per_g, want, "{when}: per_g against the model");
    let thirds = rows(client, "SELECT id, s FROM thirds").await;
    let want: Vec<TextRow> = sorted(
        model
            .iter()
            .filter(|(id, _)| *id % 3 == 0)
            .map(|(id, (_, s))| text(&[id.to_string(), s.clone()]))
            .collect(),
    );
    assert!(thirds == want, "{when}: thirds differs from the model");
}

/// Random deletes, updates and re-inserts, many of them on evicted rows.
async fn churn(client: &Client, model: &mut Model, rng: &mut StdRng) {
    let max = model.keys().last().copied().unwrap_or(0);
    for _ in 0..6 {
        match rng.random_range(0..3) {
            0 => {
                let a = rng.random_range(0..max);
                let b = a + rng.random_range(1..2_000);
                exec(
                    client,
                    &format!("DELETE FROM big WHERE id BETWEEN {a} AND {b}"),
                )
                .await;
                model.retain(|id, _| *id < a || *id > b);
            }
            1 => {
                let k = rng.random_range(0..97);
                exec(
                    client,
                    &format!("UPDATE big SET s = s || 'u', g = (g + 1) % 50 WHERE id % 97 = {k}"),
                )
                .await;
                for (id, (g, s)) in model.iter_mut() {
                    if id % 97 == k {
                        *g = (*g + 1) % 50;
                        s.push('u');
                    }
                }
            }
            _ => {
                // Ids deleted before, so that their primary keys are taken again.
                let a = rng.random_range(0..max);
                let missing: Vec<i64> = (a..(a + 3_000).min(max))
                    .filter(|id| !model.contains_key(id))
                    .take(500)
                    .collect();
                if missing.is_empty() {
                    continue;
                }
                let list = missing
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                exec(
                    client,
                    &format!(
                        "INSERT INTO big SELECT v, v % 50, 'again ' || v FROM unnest(ARRAY[{list}]) t(v)"
                    ),
                )
                .await;
                for v in missing {
                    model.insert(v, (v % 50, format!("again {v}")));
                }
            }
        }
    }
}

async fn setup(client: &Client) {
    exec(
        client,
        "CREATE TABLE big (id BIGINT PRIMARY KEY, g BIGINT NOT NULL, s TEXT NOT NULL)",
    )
    .await;
    exec(client, "CREATE INDEX big_g ON big (g)").await;
    exec(
        client,
        "CREATE MATERIALIZED VIEW per_g AS SELECT g, count(*) AS n, sum(id) AS total FROM big GROUP BY g",
    )
    .await;
    exec(
        client,
        "CREATE MATERIALIZED VIEW thirds AS SELECT id, s FROM big WHERE id % 3 = 0",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_chunks_answer_every_read_through_changes_failures_and_kill_9() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut server = TestServer::start(&["--memory-limit", LIMIT, "--failpoints"]).expect("start");
    let (idle_rss, _) = server.rss().unwrap_or((0, 0));
    let client = server.connect("millrace").await.expect("connect");
    setup(&client).await;
    let mut model = Model::new();
    for i in 0..8 {
        insert_range(&client, &mut model, i * 50_000, (i + 1) * 50_000).await;
    }
    let budget = cache_total(&client, "budget_bytes").await;
    eventually("tables and views spill to the object store", || async {
        one(&client, "SELECT count(*) FROM millrace_cache WHERE cold_chunks > 0 AND kind IN ('table', 'view')")
            .await
            == "2"
    })
    .await;
    check_reads(&client, &model, &mut rng, "after the load").await;

    // A range filter on the key skips the row groups and files whose statistics exclude it.
    let explain = rows(
        &client,
        "EXPLAIN SELECT count(*) FROM big WHERE id >= 390000",
    )
    .await;
    assert!(
        format!("{explain:?}").contains("pruning_predicate"),
        "the scan prunes by statistics: {explain:?}"
    );
    // Within the files read, the filter's columns are decoded first; a volatile filter is
    // left to the filter above the scan.
    let plan = |sql: &'static str| {
        let client = &client;
        async move { format!("{:?}", rows(client, &format!("EXPLAIN {sql}")).await) }
    };
    let late = plan("SELECT id, s FROM big WHERE g + 0 = 7").await;
    assert!(late.contains("decode_filter"), "late decoding: {late}");
    let volatile = plan("SELECT id, s FROM big WHERE random() < 2.0").await;
    assert!(
        volatile.contains("TieredScanExec") && !volatile.contains("decode_filter"),
        "a volatile filter is not evaluated while decoding: {volatile}"
    );
    let (files, groups) = pruned(&client).await;
    let want = model.range(390_000..).count().to_string();
    assert_eq!(
        one(&client, "SELECT count(*) FROM big WHERE id >= 390000").await,
        want
    );
    let (files_after, groups_after) = pruned(&client).await;
    assert!(
        files_after > files && groups_after > groups,
        "pruned files {files} -> {files_after}, row groups {groups} -> {groups_after}"
    );
    for round in 0..3 {
        churn(&client, &mut model, &mut rng).await;
        check_reads(&client, &model, &mut rng, &format!("after churn {round}")).await;
    }
    let misses: i64 = one(
        &client,
        "SELECT misses FROM millrace_cache WHERE name = 'big'",
    )
    .await
    .parse()
    .unwrap_or(0);
    assert!(misses > 0, "reads went to the object store");

    // The cache comes back within its share, and only files that cold chunks read or a
    // table's log refers to are left.
    eventually("the cache within its share and no stray files", || async {
        let used =
            cache_total(&client, "memory_bytes").await + cache_total(&client, "state_bytes").await;
        let files = cache_total(&client, "files").await;
        used <= budget && server.object_files() as i64 == files
    })
    .await;

    // Refused PUTs: eviction fails, is counted, and succeeds later; nothing is lost.
    // NOTE: a statement's own working set shrinks the cache's share while it runs; once it
    // is freed its rows may fit again. Rows are added (20k at a time, after a few ticks to
    // act on their own) until three passes failed, then until an eviction succeeds.
    exec(&client, "SET millrace.inject_object_store_failures = 3").await;
    let evictions = cache_total(&client, "evictions").await;
    // NOTE: 20k rows at a time stay below the staging threshold: a larger INSERT would
    // write its rows to the object store itself (memory/staging.rs) and take a refusal.
    for from in (400_000..500_000).step_by(20_000) {
        insert_range(&client, &mut model, from, from + 20_000).await;
    }
    let mut next = 500_000;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let failed = failed_passes(&client).await;
        assert!(failed <= 3, "{failed} failed passes for 3 refused PUTs");
        if failed == 3 {
            break;
        }
        assert_eq!(
            cache_total(&client, "evictions").await,
            evictions,
            "an eviction succeeded while PUTs were refused"
        );
        assert!(next < 800_000, "the refused PUTs never failed a pass");
        insert_range(&client, &mut model, next, next + 20_000).await;
        next += 20_000;
    }
    let failed_after = next;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        if cache_total(&client, "evictions").await > evictions {
            break;
        }
        assert!(
            next < 1_100_000,
            "evictions never resumed after the failures"
        );
        insert_range(&client, &mut model, next, next + 20_000).await;
        next += 20_000;
    }
    eprintln!(
        "three passes failed after {} more rows; evictions resumed after {} more",
        failed_after - 500_000,
        next - failed_after
    );
    assert_eq!(
        failed_passes(&client).await,
        3,
        "only the refused PUTs failed"
    );
    check_reads(&client, &model, &mut rng, "after refused PUTs").await;

    let (rss, peak) = server.rss().unwrap_or((0, 0));
    eprintln!(
        "memory limit {LIMIT} (cache share {budget} bytes): idle RSS {} MiB, RSS {} MiB, peak RSS {} MiB",
        idle_rss >> 20,
        rss >> 20,
        peak >> 20
    );

    // kill -9: the killed run's files that no table's log refers to (views' chunks, chunks
    // evicted since the last log rewrite) are orphans, removed on start; all reads agree.
    let before = server.object_files();
    assert!(before > 0);
    server.kill();
    server.restart().expect("restart");
    let client = server.connect("millrace").await.expect("reconnect");
    eventually("the restarted server evicts again", || async {
        cache_total(&client, "cold_chunks").await > 0
    })
    .await;
    assert!(
        server
            .log()
            .contains("removed cold files no table refers to"),
        "orphans of the killed run are removed"
    );
    // The replay evicted as it went: the table was partly cold before it was registered.
    let log = server.log();
    let restored = log
        .lines()
        .rev()
        .find(|l| l.contains("table restored") && l.contains("table=big"))
        .unwrap_or_default();
    let cold: i64 = restored
        .split("cold_chunks=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(cold > 0, "the replay kept the table in memory: {restored}");
    churn(&client, &mut model, &mut rng).await;
    check_reads(&client, &model, &mut rng, "after kill -9").await;
    eventually("only held files are left after the restart", || async {
        server.object_files() as i64 == cache_total(&client, "files").await
    })
    .await;
    assert!(server.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_spill_to_s3_and_survive_an_unreachable_store() {
    let mut rng = StdRng::seed_from_u64(seed() ^ 0x53);
    let s3 = S3Server::start(&["lake", "pond"]).expect("start s3s-fs");
    let endpoint = s3.endpoint();
    let mut server = TestServer::start_with_env(
        &["--memory-limit", LIMIT, "--object-store", "s3://lake/spill"],
        &[
            ("AWS_ENDPOINT", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", "us-east-1"),
        ],
    )
    .expect("start");
    let client = server.connect("millrace").await.expect("connect");
    setup(&client).await;
    let mut model = Model::new();
    for i in 0..6 {
        insert_range(&client, &mut model, i * 50_000, (i + 1) * 50_000).await;
    }
    let bucket = s3.root.join("lake").join("spill");
    eventually("chunks land in the bucket", || async {
        let cold = cache_total(&client, "cold_chunks").await;
        cold > 0 && parquet_files(&bucket) as i64 == cache_total(&client, "files").await
    })
    .await;
    assert!(
        one(
            &client,
            "SELECT detail FROM millrace_cache WHERE kind = 'total'"
        )
        .await
        .contains("s3://lake/spill")
    );
    check_reads(&client, &model, &mut rng, "spilled to S3").await;

    // The store freezes: eviction passes fail and are retried; writes are still acknowledged.
    s3.pause();
    assert_eq!(failed_passes(&client).await, 0);
    insert_range(&client, &mut model, 300_000, 500_000).await;
    eventually("failed passes while the store is unreachable", || async {
        failed_passes(&client).await > 0
    })
    .await;
    s3.resume();
    churn(&client, &mut model, &mut rng).await;
    check_reads(&client, &model, &mut rng, "after the outage").await;

    // Another bucket: once the logs refer to the spilled files instead of holding their
    // rows, the start fails, naming both stores, and changes nothing; once the files are
    // copied there, it starts and reads them from there.
    exec(&client, "CHECKPOINT").await;
    assert!(
        cache_total(&client, "log_files").await > 0,
        "the logs refer to cold files"
    );
    let other = s3.root.join("pond").join("spill");
    let err = server
        .restart_with_args(&["--memory-limit", LIMIT, "--object-store", "s3://pond/spill"])
        .expect_err("a start without the spilled files");
    let message = err.to_string();
    assert!(
        message.contains("s3://lake/spill") && message.contains("start with --object-store"),
        "the error names the last run's store: {message}"
    );
    copy_dir(&bucket, &other);
    server
        .restart_with_args(&["--memory-limit", LIMIT, "--object-store", "s3://pond/spill"])
        .expect("start from the copy");
    let client = server.connect("millrace").await.expect("connect");
    check_reads(&client, &model, &mut rng, "from the copied store").await;
    assert!(
        one(
            &client,
            "SELECT detail FROM millrace_cache WHERE kind = 'total'"
        )
        .await
        .contains("s3://pond/spill")
    );
    churn(&client, &mut model, &mut rng).await;
    check_reads(
        &client,
        &model,
        &mut rng,
        "after changes in the copied store",
    )
    .await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}
