//! Checkpoint benchmark: two fresh Millrace servers side by side, one checkpointing every
//! second (the default) and one with checkpoints off (`--checkpoint-interval-ms 0`).
//!
//! 1. Overhead: one client inserts batches into a table under a GROUP BY view for
//!    `BENCH_SECONDS`; rows per second and server CPU-seconds per million rows.
//! 2. Recovery: `BENCH_ROWS` rows under a GROUP BY view and a join view, `CHECKPOINT`, more
//!    writes, then `kill -9` and a restart: the time until the server accepts a connection,
//!    and until a query of each view answers (restored from the checkpoint and caught up,
//!    or rebuilt from the tables when checkpoints are off). Then the same under
//!    `--memory-limit 64MiB`, where the views' state is mostly evicted and the writes after
//!    the checkpoint are an UPDATE of a tenth of the rows: their state is evicted over the
//!    checkpoint's before the kill, and put back to it on restart.
//!
//! Usage: `bench/run checkpoint` (MILLRACE_BIN names the server binary).

use std::time::{Duration, Instant};

use millrace_bench::{Error, Server, cpu_seconds, env_usize};

/// Inserts batches for `seconds` under a GROUP BY view: (rows/s, CPU-s per million rows).
async fn overhead(server: &Server, seconds: u64) -> Result<(f64, f64), Error> {
    let c = server.connect().await?;
    c.batch_execute(
        "CREATE TABLE ev (k BIGINT, v BIGINT);
         CREATE MATERIALIZED VIEW per_k AS SELECT k % 10000 AS g, count(*) AS n, sum(v) AS s FROM ev GROUP BY k % 10000",
    )
    .await?;
    let cpu0 = cpu_seconds(server.pid())?;
    let start = Instant::now();
    let mut rows = 0u64;
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        c.batch_execute(&format!(
            "INSERT INTO ev SELECT value, value % 97 FROM generate_series({}, {})",
            i * 1000,
            i * 1000 + 999
        ))
        .await?;
        rows += 1000;
        i += 1;
    }
    c.batch_execute("FLUSH").await?;
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.pid())? - cpu0;
    Ok((rows as f64 / wall, cpu * 1e6 / rows as f64))
}

/// What runs between the checkpoint and the kill.
#[derive(Clone, Copy)]
enum After {
    /// 1000 more rows.
    Insert,
    /// An UPDATE of every tenth row (their groups and join keys change).
    Update,
}

/// Loads state, kills the server and measures its way back:
/// (state bytes, accepts connections, views answer, how the views came back).
async fn recovery(
    server: &mut Server,
    rows: usize,
    checkpoints: bool,
    after: After,
) -> Result<(u64, Duration, Duration, String), Error> {
    let c = server.connect().await?;
    c.batch_execute(&format!(
        "CREATE TABLE big (id BIGINT, g BIGINT, x BIGINT);
         CREATE TABLE dim (g BIGINT, name TEXT);
         INSERT INTO dim SELECT value, 'name ' || value FROM generate_series(0, 99999);
         INSERT INTO big SELECT value, value % 100000, value % 1000 FROM generate_series(1, {rows});
         CREATE MATERIALIZED VIEW per_g AS SELECT g, count(*) AS n, sum(x) AS sx FROM big GROUP BY g;
         CREATE MATERIALIZED VIEW named AS SELECT big.id, dim.name FROM big JOIN dim ON big.g = dim.g;"
    ))
    .await?;
    if checkpoints {
        c.batch_execute("CHECKPOINT").await?;
    }
    let (sql, added) = match after {
        After::Insert => (
            "INSERT INTO big SELECT value, value % 100000, 1 FROM generate_series(1, 1000)",
            1000,
        ),
        After::Update => (
            "UPDATE big SET g = (g + 7) % 100000, x = x + 1 WHERE id % 10 = 0",
            0,
        ),
    };
    c.batch_execute(sql).await?;
    let state: i64 = c
        .query_one(
            "SELECT CAST(sum(state_bytes + contents_bytes) AS BIGINT) FROM millrace_views",
            &[],
        )
        .await?
        .get(0);
    drop(c);
    server.kill();
    let start = Instant::now();
    server.spawn()?;
    let c = server.connect().await?;
    let accepts = start.elapsed();
    let n: i64 = c.query_one("SELECT count(*) FROM named", &[]).await?.get(0);
    let m: i64 = c
        .query_one("SELECT CAST(sum(n) AS BIGINT) FROM per_g", &[])
        .await?
        .get(0);
    let answers = start.elapsed();
    if n != (rows + added) as i64 || m != (rows + added) as i64 {
        return Err(format!(
            "views after recovery: {n} and {m} rows, want {}",
            rows + added
        )
        .into());
    }
    let how: Vec<String> = c
        .query(
            "SELECT object || ' ' || kind || ': ' || detail FROM millrace_events \
             WHERE kind = 'view_restored' ORDER BY object",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok((state.max(0) as u64, accepts, answers, how.join("; ")))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Error> {
    let bin = std::env::var("MILLRACE_BIN").unwrap_or_else(|_| "millrace".into());
    let seconds = env_usize("BENCH_SECONDS", 10) as u64;
    let rows = env_usize("BENCH_ROWS", 1_000_000);
    let work = std::env::temp_dir().join(format!("millrace-ckpt-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "checkpoints every 1 s vs off; overhead: {seconds} s of 1000-row INSERTs under a GROUP BY view"
    );
    for (label, interval) in [("checkpoints every 1 s", 1000u64), ("checkpoints off", 0)] {
        let args = ["--checkpoint-interval-ms".to_string(), interval.to_string()];
        let server = Server::start(&bin, 56601, work.join(format!("o{interval}")), &args)?;
        let (rps, cpu) = overhead(&server, seconds).await?;
        println!("  {label:<24} {rps:>10.0} rows/s   {cpu:>6.2} server CPU-s per million rows");
    }
    println!(
        "recovery after kill -9: {rows}-row table (+1000 rows after the checkpoint) under a GROUP BY view (100k groups) and a join view"
    );
    let limit = ["--memory-limit".to_string(), "64MiB".to_string()];
    for (label, interval, after, memory) in [
        ("from the checkpoint", 1000u64, After::Insert, &[][..]),
        ("rebuilt (checkpoints off)", 0, After::Insert, &[][..]),
        (
            "64 MiB limit, UPDATE 10%: from the checkpoint",
            3_600_000,
            After::Update,
            &limit[..],
        ),
        (
            "64 MiB limit, UPDATE 10%: rebuilt (checkpoints off)",
            0,
            After::Update,
            &limit[..],
        ),
    ] {
        let mut args = vec!["--checkpoint-interval-ms".to_string(), interval.to_string()];
        args.extend(memory.iter().cloned());
        let dir = work.join(format!("r{interval}-{}", memory.len()));
        let mut server = Server::start(&bin, 56602, dir, &args)?;
        let (state, accepts, answers, how) =
            recovery(&mut server, rows, interval > 0, after).await?;
        println!(
            "  {label:<52} view state {:>6} MiB   accepts connections after {:>7.2} s   views answer after {:>7.2} s",
            state / (1 << 20),
            accepts.as_secs_f64(),
            answers.as_secs_f64()
        );
        println!("    {how}");
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
