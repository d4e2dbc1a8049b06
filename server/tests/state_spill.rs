//! A view whose operator state is more than five times `--memory-limit`: a join of two
//! 2M-row tables under a 256 MiB limit, aggregated so that its contents stay small. The
//! join's state (every row of both sides) is evicted to the warm tier in RocksDB while the
//! tables spill to Parquet; the view must equal a model of the written rows after the load
//! and after deletes and updates that hit evicted state, and the peak resident memory must
//! stay within 1.2 x the limit plus the idle server's (both read from /proc and printed).
//!
//! The model is exact (every left row joins the right row with the same id); a batch join
//! over a key range checks the tables' reads as well. The whole-table batch join cannot be the
//! oracle here: the query pool under this limit is 64 MiB, and a hash join of 2M rows of
//! 160 bytes needs more, so DataFusion refuses it (SQLSTATE 53200).

use std::collections::BTreeMap;

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::rows::{exec, number, rows};
use tokio_postgres::Client;

const LIMIT: &str = "256MiB";
const LIMIT_BYTES: u64 = 256 << 20;
/// Rows per table (`MILLRACE_SPILL_ROWS` to change).
const ROWS: i64 = 2_000_000;
const BATCH: i64 = 20_000;
/// Warm-up rows, ids -WARM..-1, loaded before the idle figure is taken.
const WARM: i64 = 1_000;

fn rows_per_table() -> i64 {
    std::env::var("MILLRACE_SPILL_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROWS)
}

fn digits(v: i64) -> i64 {
    v.to_string().len() as i64
}

/// Pad lengths of each side's row by id (None: no row).
#[derive(Default)]
struct Model {
    left: BTreeMap<i64, i64>,
    right: BTreeMap<i64, i64>,
}

impl Model {
    /// The view's rows: g -> (n, chars).
    fn view(&self) -> BTreeMap<i64, (i64, i64)> {
        let mut out = BTreeMap::new();
        for (id, l) in &self.left {
            if let Some(r) = self.right.get(id) {
                let e = out.entry(id % 1000).or_insert((0, 0));
                e.0 += 1;
                e.1 += l + r;
            }
        }
        out
    }

    /// count and chars of the join over left ids `from..=to`.
    fn range(&self, from: i64, to: i64) -> (i64, i64) {
        let mut out = (0, 0);
        for (id, l) in self.left.range(from..=to) {
            if let Some(r) = self.right.get(id) {
                out.0 += 1;
                out.1 += l + r;
            }
        }
        out
    }
}

async fn view_rows(client: &Client) -> BTreeMap<i64, (i64, i64)> {
    rows(client, "SELECT g, n, chars FROM j")
        .await
        .into_iter()
        .map(|r| {
            let v = |i: usize| -> i64 {
                r.get(i)
                    .and_then(|v| v.as_deref())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(i64::MIN)
            };
            (v(0), (v(1), v(2)))
        })
        .collect()
}

async fn check_view(client: &Client, model: &Model, when: &str) {
    let got = view_rows(client).await;
    let want = model.view();
    assert_eq!(got.len(), want.len(), "{when}: number of groups");
    for (g, w) in &want {
        assert_eq!(got.get(g), Some(w), "{when}: group {g}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_state_five_times_the_limit_is_correct_within_the_memory_limit() {
    let n = rows_per_table();
    let server = TestServer::start(&["--memory-limit", LIMIT]).expect("start");
    let client = server.connect("millrace").await.expect("connect");
    exec(&client, "CREATE TABLE l (id BIGINT, k BIGINT, pad TEXT)").await;
    exec(&client, "CREATE TABLE r (id BIGINT, k BIGINT, pad TEXT)").await;
    exec(
        &client,
        "CREATE MATERIALIZED VIEW j AS SELECT l.k % 1000 AS g, count(*) AS n, \
         sum(length(l.pad) + length(r.pad)) AS chars FROM l JOIN r ON l.k = r.k GROUP BY 1",
    )
    .await;
    let mut model = Model::default();
    // Warm up every path the load takes, then take the idle figure.
    for side in ["l", "r"] {
        exec(
            &client,
            &format!(
                "INSERT INTO {side} SELECT v AS id, v AS k, 'x' FROM generate_series({}, -1) t(v)",
                -WARM
            ),
        )
        .await;
    }
    for id in -WARM..0 {
        model.left.insert(id, 1);
        model.right.insert(id, 1);
    }
    check_view(&client, &model, "after the warm-up").await;
    let _ = rows(&client, "SELECT * FROM millrace_cache").await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (idle, _) = server.rss().expect("rss");

    for from in (0..n).step_by(BATCH as usize) {
        let to = (from + BATCH).min(n) - 1;
        for (side, letter) in [("l", 'l'), ("r", 'r')] {
            exec(
                &client,
                &format!(
                    "INSERT INTO {side} SELECT v AS id, v AS k, repeat('{letter}', 150) || v \
                     FROM generate_series({from}, {to}) t(v)"
                ),
            )
            .await;
        }
        for id in from..=to {
            model.left.insert(id, 150 + digits(id));
            model.right.insert(id, 150 + digits(id));
        }
    }
    check_view(&client, &model, "after the load").await;
    // Each phase's peak is its own: the peak is reset after it is read.
    let phase = |what: &str| {
        let (rss, peak) = server.rss().unwrap_or((0, 0));
        println!("{what}: RSS {} MiB, peak {} MiB", rss >> 20, peak >> 20);
        server.reset_peak();
        peak
    };
    let built = phase("after the load");
    // A new view over the spilled table backfills from it a file at a time.
    exec(
        &client,
        "CREATE MATERIALIZED VIEW lsum AS SELECT count(*) AS n, sum(length(pad)) AS chars FROM l",
    )
    .await;
    let want = (
        model.left.len().to_string(),
        model.left.values().sum::<i64>().to_string(),
    );
    let got = rows(&client, "SELECT n, chars FROM lsum").await;
    assert_eq!(
        got,
        vec![vec![Some(want.0), Some(want.1)]],
        "a view backfilled from the spilled table"
    );
    let load_peak = phase("after a backfill from the spilled table").max(built);
    let state = number(
        &client,
        "SELECT state_bytes + state_spilled_bytes FROM millrace_cache WHERE name = 'j'",
    )
    .await;
    let in_memory = number(
        &client,
        "SELECT state_bytes FROM millrace_cache WHERE name = 'j'",
    )
    .await;
    println!(
        "{n} rows a side: join state {} MiB ({:.1} x the limit), {} MiB of it in memory",
        state >> 20,
        state as f64 / LIMIT_BYTES as f64,
        in_memory >> 20
    );
    if n == ROWS {
        assert!(
            state as u64 >= 5 * LIMIT_BYTES,
            "the join's state ({state} bytes) is not 5 x the limit"
        );
    }

    // Changes that hit evicted state: deletes on the left, updates of the right's pads.
    exec(&client, "DELETE FROM l WHERE id % 10 = 3").await;
    model.left.retain(|id, _| id % 10 != 3);
    let deleted = phase("after the delete");
    exec(&client, "UPDATE r SET pad = 'u' || id WHERE id % 7 = 0").await;
    for (id, len) in model.right.iter_mut() {
        if id % 7 == 0 {
            *len = 1 + digits(*id);
        }
    }
    check_view(&client, &model, "after deletes and updates").await;
    let changes_peak = phase("after the update went through the view").max(deleted);
    let (from, to) = (n / 2, n / 2 + 20_000);
    let got = rows(
        &client,
        &format!(
            "SELECT count(*), sum(length(l.pad) + length(r.pad)) FROM l JOIN r ON l.k = r.k \
             WHERE l.k BETWEEN {from} AND {to}"
        ),
    )
    .await;
    let want = model.range(from, to);
    let query_peak = phase("after the range join");
    assert_eq!(
        got,
        vec![vec![Some(want.0.to_string()), Some(want.1.to_string())]],
        "batch join over ids {from}..={to}"
    );

    let evicted = number(
        &client,
        "SELECT state_evicted FROM millrace_cache WHERE name = 'j'",
    )
    .await;
    let fetched = number(
        &client,
        "SELECT state_fetched FROM millrace_cache WHERE name = 'j'",
    )
    .await;
    assert!(
        evicted > 0 && fetched > 0,
        "evicted {evicted}, fetched {fetched}"
    );
    let bound = LIMIT_BYTES + LIMIT_BYTES / 5 + idle;
    println!(
        "memory limit {LIMIT}: idle RSS {} MiB, peak RSS while the view was built {} MiB, \
         bound 1.2 x limit + idle = {} MiB; peak over the changes {} MiB, over the batch join \
         {} MiB; state entries evicted {evicted}, read back {fetched}",
        idle >> 20,
        load_peak >> 20,
        bound >> 20,
        changes_peak >> 20,
        query_peak >> 20
    );
    if n == ROWS {
        assert!(
            load_peak <= bound,
            "peak RSS {load_peak} bytes while building is over 1.2 x the limit plus the idle RSS ({bound} bytes)"
        );
        // NOTE: the changes (a DELETE of 200k rows and an UPDATE of 286k rows of the spilled
        // tables, one epoch each) peaked at 323-342 MiB against 414 once the cache gave way
        // by what the process was over its limit off what it held (see bench/README.md);
        // before, at 377-412, and this bounded them at 1.5 x.
        assert!(
            changes_peak <= bound,
            "peak RSS {changes_peak} bytes over the changes is over 1.2 x the limit plus the idle RSS ({bound} bytes)"
        );
        assert!(
            query_peak <= bound,
            "peak RSS {query_peak} bytes over the batch join is over 1.2 x the limit plus the idle RSS ({bound} bytes)"
        );
    }
}
