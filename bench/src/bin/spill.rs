//! Tiered-cache benchmark: two fresh Millrace servers side by side with the same table, one
//! without a memory limit (everything in memory) and one under `--memory-limit` whose
//! columnar cache is mostly evicted to Parquet files in the local object store.
//!
//! For each: how much of the table is in memory and in the object store, peak RSS, the rate
//! of primary-key point lookups (one client, one row each), and the time of a full scan with
//! a filter and of a GROUP BY over every row; then the same on a materialized view holding
//! half the rows (lookups by a filter on its id column, which prunes row groups by their
//! statistics when the view is spilled); then single-row UPDATEs until the table's log is
//! compacted: the compaction's time and the peak RSS over it; then `kill -9` and a restart:
//! the time until the server accepts a connection, until the table and the view answer, the
//! RSS then and at its peak, and what the restart wrote to the object store (the server in
//! memory replays its rows from the table log; the spilled one opens the cold files its log
//! refers to).
//!
//! Usage: `bench/run spill` (MILLRACE_BIN names the server binary; BENCH_ROWS, default
//! 1,000,000; BENCH_LIMIT, default 128MiB; BENCH_LOOKUPS, default 2000).

use std::time::{Duration, Instant};

use millrace_bench::{Error, Server, env_usize, rss};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

/// Loads `rows` rows of about 120 bytes into `big`.
async fn load(c: &Client, rows: usize) -> Result<(), Error> {
    c.batch_execute("CREATE TABLE big (id BIGINT PRIMARY KEY, g BIGINT, s TEXT)")
        .await?;
    let step = 100_000;
    for from in (0..rows).step_by(step) {
        let to = (from + step).min(rows) - 1;
        c.batch_execute(&format!(
            "INSERT INTO big SELECT value, value % 1000, 'row ' || value || ' ' || repeat('x', 100) \
             FROM generate_series({from}, {to})"
        ))
        .await?;
    }
    Ok(())
}

/// (bytes in memory, bytes in the object store, cold chunks, all chunks) of `big`.
async fn cache(c: &Client) -> Result<(i64, i64, i64, i64), Error> {
    let r = c
        .query_one(
            "SELECT memory_bytes, object_store_bytes, cold_chunks, hot_chunks + cold_chunks \
             FROM millrace_cache WHERE name = 'big'",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2), r.get(3)))
}

/// Lookups per second over `n` random ids, checking each answer.
async fn lookups(c: &Client, rows: usize, n: usize) -> Result<f64, Error> {
    let mut rng = StdRng::seed_from_u64(7);
    let stmt = c.prepare("SELECT g, s FROM big WHERE id = $1").await?;
    let start = Instant::now();
    for _ in 0..n {
        let id = rng.random_range(0..rows as i64);
        let row = c.query_one(&stmt, &[&id]).await?;
        let s: String = row.get(1);
        if !s.starts_with(&format!("row {id} ")) {
            return Err(format!("lookup of {id} answered {s:?}").into());
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Single-row UPDATEs of `big` by primary key, ids `from..to` spread over the table.
async fn updates(c: &Client, rows: usize, from: usize, to: usize) -> Result<(), Error> {
    let stmt = c.prepare("UPDATE big SET g = g + 1 WHERE id = $1").await?;
    for i in from..to {
        let id = (i * 7919 % rows) as i64;
        c.execute(&stmt, &[&id]).await?;
    }
    Ok(())
}

/// Grows `big`'s log with single-row UPDATEs by primary key (two log entries each) until it
/// is compacted (at a checkpoint, once it holds a 64th of the rows in entries), in two
/// halves: the first stays below the threshold, the second crosses it. Returns the UPDATE
/// rate, the RSS before, the peak RSS over each half (reset before each), and the
/// compaction's milliseconds and bytes from the server's log.
async fn compaction(
    c: &Client,
    rows: usize,
    pid: u32,
    log: &std::path::Path,
) -> Result<(f64, u64, u64, u64, u64, u64), Error> {
    let reset_peak = || std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let seen = |text: &str| text.matches("compacted table log").count();
    let compactions = seen(&std::fs::read_to_string(log)?);
    let (before, _) = rss(pid)?;
    let half = rows / 256;
    let start = Instant::now();
    reset_peak()?;
    updates(c, rows, 0, half).await?;
    let (_, plain_peak) = rss(pid)?;
    if seen(&std::fs::read_to_string(log)?) > compactions {
        return Err("the log was compacted during the first half".into());
    }
    reset_peak()?;
    updates(c, rows, half, 2 * half + 256).await?;
    let rate = (2 * half + 256) as f64 / start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = loop {
        let text = std::fs::read_to_string(log)?;
        if seen(&text) > compactions
            && let Some(line) = text
                .lines()
                .rev()
                .find(|l| l.contains("compacted table log"))
        {
            break line.to_string();
        }
        if Instant::now() > deadline {
            return Err("the table log was not compacted within a minute".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, compaction_peak) = rss(pid)?;
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .unwrap_or(0)
    };
    Ok((
        rate,
        before,
        plain_peak,
        compaction_peak,
        field("ms="),
        field("bytes="),
    ))
}

/// Files the object store has written so far (from `millrace_cache`'s total row).
async fn files_written(c: &Client) -> Result<u64, Error> {
    let detail: String = c
        .query_one(
            "SELECT detail FROM millrace_cache WHERE kind = 'total'",
            &[],
        )
        .await?
        .get(0);
    Ok(detail
        .split(" files written")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// `kill -9` and a restart: prints the seconds until the server accepts a connection, until
/// the table answers a count and until the view `half` does, the RSS then and its peak, the
/// files written to the object store by then and the cold files the table's log referred to.
/// Returns the sum of `big`'s `g` after the restart (checked against the other server's).
async fn restart(server: &mut Server, before: &Client, rows: usize) -> Result<i64, Error> {
    // Let a checkpoint (and the log rewrite it may make) land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // NOTE: -1 from a server without the column (a build from before it, for comparison).
    let log_files: i64 = before
        .query_one(
            "SELECT log_files FROM millrace_cache WHERE name = 'big'",
            &[],
        )
        .await
        .map_or(-1, |r| r.get(0));
    server.kill();
    let start = Instant::now();
    server.spawn()?;
    let c = server.connect().await?;
    let accepted = start.elapsed().as_secs_f64();
    let n: i64 = c.query_one("SELECT count(*) FROM big", &[]).await?.get(0);
    if n != rows as i64 {
        return Err(format!("after the restart the table has {n} rows, not {rows}").into());
    }
    let table = start.elapsed().as_secs_f64();
    let want = (rows / 2) as i64;
    while c
        .query_one("SELECT count(*) FROM half", &[])
        .await?
        .get::<_, i64>(0)
        != want
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let view = start.elapsed().as_secs_f64();
    let (now, peak) = rss(server.pid())?;
    let written = files_written(&c).await?;
    let reopened: i64 = c
        .query_one(
            "SELECT log_files FROM millrace_cache WHERE name = 'big'",
            &[],
        )
        .await
        .map_or(-1, |r| r.get(0));
    println!(
        "  {:<26} kill -9 and restart: accepts connections {accepted:.2} s, table answers {table:.2} s, view answers {view:.2} s; \
         RSS {} MiB (peak {} MiB); {written} files written by then; cold files of the table's log {log_files} before, {reopened} opened",
        "",
        now >> 20,
        peak >> 20
    );
    Ok(c.query_one("SELECT sum(g)::BIGINT FROM big", &[])
        .await?
        .get(0))
}

/// Seconds of the best of three runs of `sql`, and its first value.
async fn timed(c: &Client, sql: &str) -> Result<(f64, i64), Error> {
    let mut best = Duration::MAX;
    let mut value = 0;
    for _ in 0..3 {
        let start = Instant::now();
        let rows = c.query(sql, &[]).await?;
        best = best.min(start.elapsed());
        value = rows.first().map_or(0, |r| r.get(0));
    }
    Ok((best.as_secs_f64(), value))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Error> {
    let bin = std::env::var("MILLRACE_BIN").unwrap_or_else(|_| "millrace".into());
    let rows = env_usize("BENCH_ROWS", 1_000_000);
    let limit = std::env::var("BENCH_LIMIT").unwrap_or_else(|_| "128MiB".into());
    let n = env_usize("BENCH_LOOKUPS", 2000);
    let work = std::env::temp_dir().join(format!("millrace-spill-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "tiered cache: {rows}-row table (~120 bytes a row), in memory vs --memory-limit {limit}"
    );
    let mut answers = Vec::new();
    for (label, args) in [
        ("in memory (no limit)", vec![]),
        (
            "spilled (--memory-limit)",
            vec!["--memory-limit".to_string(), limit.clone()],
        ),
    ] {
        let mut server = Server::start(&bin, 56611, work.join(label.replace(' ', "_")), &args)?;
        let c = server.connect().await?;
        let (idle, _) = rss(server.pid())?;
        load(&c, rows).await?;
        // Let the cache manager catch up with the load.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (memory, stored, cold, chunks) = cache(&c).await?;
        let (loaded, load_peak) = rss(server.pid())?;
        let per_sec = lookups(&c, rows, n).await?;
        let (scan, matched) = timed(&c, "SELECT count(*) FROM big WHERE s LIKE 'row 7%'").await?;
        let (group, groups) = timed(
            &c,
            "SELECT count(*) FROM (SELECT g, count(*), max(s) FROM big GROUP BY g) t",
        )
        .await?;
        let (_, peak) = rss(server.pid())?;
        println!(
            "  {label:<26} table in memory {:>5} MiB, in object store {:>4} MiB ({cold}/{chunks} chunks cold); \
             RSS idle {:>4} MiB, after the load {:>4} MiB (peak {:>4} MiB), after the queries peak {:>4} MiB",
            memory >> 20,
            stored >> 20,
            idle >> 20,
            loaded >> 20,
            load_peak >> 20,
            peak >> 20
        );
        println!(
            "  {:<26} point lookups {per_sec:>7.0}/s   filtered scan {scan:>6.3} s   GROUP BY (1000 groups) {group:>6.3} s",
            ""
        );
        c.batch_execute(
            "CREATE MATERIALIZED VIEW half AS SELECT id, g, s FROM big WHERE id % 2 = 0",
        )
        .await?;
        let want = (rows / 2) as i64;
        let view_rows = loop {
            let n: i64 = c.query_one("SELECT count(*) FROM half", &[]).await?.get(0);
            if n == want {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (memory, stored): (i64, i64) = {
            let r = c
                .query_one(
                    "SELECT memory_bytes, object_store_bytes FROM millrace_cache WHERE name = 'half'",
                    &[],
                )
                .await?;
            (r.get(0), r.get(1))
        };
        let view_lookups = {
            let mut rng = StdRng::seed_from_u64(8);
            let stmt = c.prepare("SELECT s FROM half WHERE id = $1").await?;
            let start = Instant::now();
            for _ in 0..n / 4 {
                let id = rng.random_range(0..rows as i64 / 2) * 2;
                let row = c.query_one(&stmt, &[&id]).await?;
                let s: String = row.get(0);
                if !s.starts_with(&format!("row {id} ")) {
                    return Err(format!("view lookup of {id} answered {s:?}").into());
                }
            }
            (n / 4) as f64 / start.elapsed().as_secs_f64()
        };
        let (view_scan, view_matched) =
            timed(&c, "SELECT count(*) FROM half WHERE s LIKE 'row 7%'").await?;
        println!(
            "  {:<26} view of {view_rows} rows: in memory {:>4} MiB, in object store {:>3} MiB; \
             lookups by id {view_lookups:>6.0}/s   filtered scan {view_scan:>6.3} s",
            "",
            memory >> 20,
            stored >> 20
        );
        let log = work.join(label.replace(' ', "_")).with_extension("log");
        let (rate, before, plain_peak, compaction_peak, ms, bytes) =
            compaction(&c, rows, server.pid(), &log).await?;
        let sum: i64 = c
            .query_one("SELECT sum(g)::BIGINT FROM big", &[])
            .await?
            .get(0);
        println!(
            "  {:<26} {} single-row UPDATEs at {rate:>5.0}/s, the second half compacting the log: {ms} ms, {} MiB rewritten; \
             RSS before {} MiB, peak over the first half {} MiB, over the second half and the compaction {} MiB",
            "",
            2 * (rows / 256) + 256,
            bytes >> 20,
            before >> 20,
            plain_peak >> 20,
            compaction_peak >> 20
        );
        let restarted = restart(&mut server, &c, rows).await?;
        answers.push((matched, groups + view_matched + sum + restarted));
    }
    if answers.windows(2).any(|w| w[0] != w[1]) {
        return Err(format!("the two servers answered differently: {answers:?}").into());
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
