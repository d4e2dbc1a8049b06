//! Benchmark client: runs the same workload against Millrace and PostgreSQL (both already
//! listening on loopback) and prints the figures side by side. `bench/run` starts both
//! servers; see `bench/README.md`.
//!
//! Usage: `millrace-bench point-select|copy|view-latency NAME=PORT...` with options from the environment:
//! `BENCH_ROWS` (table size), `BENCH_SECONDS`, `BENCH_CLIENTS`, `BENCH_COPY_ROWS`.

use std::time::{Duration, Instant};

use futures::SinkExt;
use millrace_bench::{cpu_seconds, env_usize};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, NoTls};

async fn connect(port: u16, user: &str, db: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={user} dbname={db}"),
        NoTls,
    )
    .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A server under test: a name and how to connect.
#[derive(Clone)]
struct Target {
    name: String,
    port: u16,
    user: String,
    db: String,
}

fn text_rows(from: usize, to: usize) -> bytes::Bytes {
    let mut s = String::with_capacity((to - from) * 40);
    for i in from..to {
        s.push_str(&format!("{i}\t{}\t0\tfiller-{i:08}\n", i % 100));
    }
    bytes::Bytes::from(s)
}

async fn copy_rows(
    client: &Client,
    table: &str,
    rows: usize,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let sink = client.copy_in(&format!("COPY {table} FROM STDIN")).await?;
    futures::pin_mut!(sink);
    let chunk = 50_000;
    let mut i = 0;
    while i < rows {
        let end = (i + chunk).min(rows);
        sink.send(text_rows(i, end)).await?;
        i = end;
    }
    sink.finish().await?;
    Ok(started.elapsed())
}

async fn setup_accounts(
    t: &Target,
    table: &str,
    rows: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let c = connect(t.port, &t.user, &t.db).await?;
    c.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await?;
    c.batch_execute(&format!(
        "CREATE TABLE {table} (aid INT PRIMARY KEY, bid INT, abalance INT, filler TEXT)"
    ))
    .await?;
    copy_rows(&c, table, rows).await?;
    Ok(())
}

async fn point_select(
    t: &Target,
    rows: usize,
    seconds: u64,
    clients: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    setup_accounts(t, "bench_accounts", rows).await?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for client_no in 0..clients {
        let c = connect(t.port, &t.user, &t.db).await?;
        tasks.push(tokio::spawn(async move {
            let stmt = c
                .prepare("SELECT abalance FROM bench_accounts WHERE aid = $1")
                .await?;
            let mut n = 0u64;
            let mut rng = StdRng::seed_from_u64(client_no as u64);
            while Instant::now() < deadline {
                let aid: i32 = rng.random_range(0..rows as i32);
                let row = c.query_one(&stmt, &[&aid]).await?;
                let _: i32 = row.get(0);
                n += 1;
            }
            Ok::<u64, tokio_postgres::Error>(n)
        }));
    }
    let mut total = 0u64;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / seconds as f64)
}

async fn copy_bench(t: &Target, rows: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let c = connect(t.port, &t.user, &t.db).await?;
    c.batch_execute("DROP TABLE IF EXISTS bench_copy").await?;
    c.batch_execute("CREATE TABLE bench_copy (aid INT, bid INT, abalance INT, filler TEXT)")
        .await?;
    let took = copy_rows(&c, "bench_copy", rows).await?;
    let n: i64 = c
        .query_one("SELECT count(*) FROM bench_copy", &[])
        .await?
        .get(0);
    if n as usize != rows {
        return Err(format!("{}: expected {rows} rows after COPY, found {n}", t.name).into());
    }
    Ok(rows as f64 / took.as_secs_f64())
}

fn parse_targets(args: &[String]) -> Vec<Target> {
    args.iter()
        .filter_map(|a| {
            let (name, rest) = a.split_once('=')?;
            let mut parts = rest.split(':');
            let port = parts.next()?.parse().ok()?;
            let user = parts.next().unwrap_or("millrace").to_string();
            let db = parts.next().unwrap_or("millrace").to_string();
            Some(Target {
                name: name.to_string(),
                port,
                user,
                db,
            })
        })
        .collect()
}

/// Ack-to-visible latency of a single-row INSERT in a GROUP BY materialized view: the time
/// from sending the INSERT until a SELECT on the view shows the new row's effect. Millrace
/// maintains the view incrementally (its SELECT waits for the write's epoch); PostgreSQL has
/// to `REFRESH MATERIALIZED VIEW`, recomputing it. Returns the sorted latencies.
async fn view_latency(
    t: &Target,
    rows: usize,
    changes: usize,
) -> Result<Vec<Duration>, Box<dyn std::error::Error>> {
    setup_accounts(t, "bench_view_src", rows).await?;
    let c = connect(t.port, &t.user, &t.db).await?;
    c.batch_execute("DROP MATERIALIZED VIEW IF EXISTS bench_view")
        .await?;
    c.batch_execute(
        "CREATE MATERIALIZED VIEW bench_view AS SELECT bid, count(*) AS n, sum(aid) AS s FROM bench_view_src GROUP BY bid",
    )
    .await?;
    let refresh = t.name.starts_with("postgres");
    let mut latencies = Vec::with_capacity(changes);
    for i in 0..changes {
        let aid = (rows + i) as i32;
        let bid = (i % 100) as i32;
        let started = Instant::now();
        c.execute(
            "INSERT INTO bench_view_src VALUES ($1, $2, 0, 'x')",
            &[&aid, &bid],
        )
        .await?;
        if refresh {
            c.batch_execute("REFRESH MATERIALIZED VIEW bench_view")
                .await?;
        }
        let row = c
            .query_one("SELECT n FROM bench_view WHERE bid = $1", &[&bid])
            .await?;
        latencies.push(started.elapsed());
        let n: i64 = row.get(0);
        if n < 1 {
            return Err("the view does not show the insert".into());
        }
    }
    latencies.sort();
    Ok(latencies)
}

/// Nexmark bids from the `nexmark` connector into a view of query `view` (or into the table
/// alone when `view` is None): wall seconds and server CPU seconds until all `events` are
/// in and the view has caught up.
async fn nexmark_run(
    t: &Target,
    pid: u32,
    name: &str,
    view: Option<&str>,
    events: usize,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let c = connect(t.port, &t.user, &t.db).await?;
    c.batch_execute(&format!("DROP TABLE IF EXISTS {name} CASCADE"))
        .await?;
    let table = format!(
        "CREATE TABLE {name} (auction BIGINT, bidder BIGINT, price BIGINT, channel TEXT, url TEXT, date_time TIMESTAMP, extra TEXT) \
         WITH (connector = 'nexmark', nexmark.table.type = 'Bid', rows_per_second = 10000000, total_rows = {events})"
    );
    // NOTE: the view is created right after the table: events that arrive before it are
    // taken in by its backfill, all later ones by incremental maintenance.
    let cpu0 = cpu_seconds(pid)?;
    let started = Instant::now();
    if let Some(query) = view {
        c.batch_execute(&table).await?;
        c.batch_execute(&format!(
            "CREATE MATERIALIZED VIEW {name}_view AS {}",
            query.replace("FROM bid", &format!("FROM {name}"))
        ))
        .await?;
    } else {
        c.batch_execute(&table).await?;
    }
    loop {
        let row = c
            .query_one(
                "SELECT status FROM millrace_sources WHERE name = $1",
                &[&name],
            )
            .await?;
        let status: String = row.get(0);
        if status == "finished" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.batch_execute("FLUSH").await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu0;
    let n: i64 = c
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .await?
        .get(0);
    if n as usize != events {
        return Err(format!("{name} holds {n} events, not {events}").into());
    }
    c.batch_execute(&format!("DROP TABLE {name} CASCADE"))
        .await?;
    Ok((wall, cpu))
}

/// Produces `rows` JSON click records to `topic` (partitions chosen by key); returns the
/// seconds it took.
async fn kafka_produce(
    brokers: &str,
    topic: &str,
    rows: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    use futures::StreamExt;
    let started = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..rows {
        let key = (i % 1000).to_string();
        let payload = format!(
            r#"{{"user_id": {}, "url": "/page/{}", "ts": "2026-01-01T00:00:00Z"}}"#,
            i % 100_000,
            i % 1000
        );
        let mut record = FutureRecord::to(topic).key(&key).payload(&payload);
        // NOTE: librdkafka copies the message; a full local queue is drained, then retried.
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    while pending.len() > 1000 {
                        if let Some(Ok(Err((e, _)))) = pending.next().await {
                            return Err(e.into());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        if pending.len() >= 100_000 {
            while pending.len() > 10_000 {
                if let Some(Ok(Err((e, _)))) = pending.next().await {
                    return Err(e.into());
                }
            }
        }
    }
    while let Some(sent) = pending.next().await {
        if let Ok(Err((e, _))) = sent {
            return Err(e.into());
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// A Kafka source reading the whole `topic` into a table (and a view of `view`, if any):
/// wall seconds and server CPU seconds until all `rows` are in and the view caught up.
async fn kafka_run(
    t: &Target,
    pid: u32,
    brokers: &str,
    topic: &str,
    name: &str,
    view: Option<&str>,
    rows: usize,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let c = connect(t.port, &t.user, &t.db).await?;
    let cpu0 = cpu_seconds(pid)?;
    let started = Instant::now();
    c.batch_execute(&format!(
        "CREATE SOURCE {name} (user_id BIGINT, url TEXT, ts TIMESTAMPTZ) \
         WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', scan.startup.mode = 'earliest') FORMAT JSON"
    ))
    .await?;
    if let Some(query) = view {
        c.batch_execute(&format!(
            "CREATE MATERIALIZED VIEW {name}_view AS {}",
            query.replace("FROM clicks", &format!("FROM {name}"))
        ))
        .await?;
    }
    loop {
        let row = c
            .query_one(
                "SELECT rows_ingested FROM millrace_sources WHERE name = $1",
                &[&name],
            )
            .await?;
        let n: i64 = row.get(0);
        if n as usize >= rows {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.batch_execute("FLUSH").await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu0;
    let n: i64 = c
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .await?
        .get(0);
    if n as usize != rows {
        return Err(format!("{name} holds {n} rows, not {rows}").into());
    }
    c.batch_execute(&format!("DROP SOURCE {name} CASCADE"))
        .await?;
    Ok((wall, cpu))
}

/// `subscribers` feeds of one view (`COPY (SUBSCRIBE TO v) TO STDOUT`) while one writer
/// inserts `changes` rows one at a time: for each insert, the time from its ack until every
/// subscriber has received its change (p50, p99), and server CPU seconds per change.
async fn subscribe_fanout(
    t: &Target,
    pid: u32,
    subscribers: usize,
    changes: usize,
) -> Result<(Vec<Duration>, f64), Box<dyn std::error::Error>> {
    use futures::StreamExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let c = connect(t.port, &t.user, &t.db).await?;
    c.batch_execute("DROP TABLE IF EXISTS fan CASCADE").await?;
    c.batch_execute("CREATE TABLE fan (id INT, g INT)").await?;
    c.batch_execute(
        "CREATE MATERIALIZED VIEW fan_view AS SELECT g, count(*) AS n FROM fan GROUP BY g",
    )
    .await?;
    // received[i] = how many subscribers have seen the change of insert i.
    let received: Arc<Vec<AtomicUsize>> =
        Arc::new((0..changes).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let s = connect(t.port, &t.user, &t.db).await?;
        let received = received.clone();
        let stream = s.copy_out("COPY (SUBSCRIBE TO fan_view) TO STDOUT").await?;
        tasks.push(tokio::spawn(async move {
            let _keep = s;
            let mut stream = Box::pin(stream);
            while let Some(Ok(chunk)) = stream.next().await {
                for line in String::from_utf8_lossy(&chunk).lines() {
                    // epoch, diff, g, n: the insert of row i makes group g = i count i / 100 + 1.
                    let f: Vec<&str> = line.split('\t').collect();
                    if f.len() == 4 && f[1] == "1" {
                        let (Ok(g), Ok(n)) = (f[2].parse::<usize>(), f[3].parse::<usize>()) else {
                            continue;
                        };
                        let i = (n - 1) * 100 + g;
                        if let Some(r) = received.get(i) {
                            r.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    let cpu0 = cpu_seconds(pid)?;
    let mut latencies = Vec::with_capacity(changes);
    for i in 0..changes {
        c.execute(
            "INSERT INTO fan VALUES ($1, $2)",
            &[&(i as i32), &((i % 100) as i32)],
        )
        .await?;
        let acked = Instant::now();
        while received[i].load(Ordering::Relaxed) < subscribers {
            if acked.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "change {i} reached {} of {subscribers} subscribers",
                    received[i].load(Ordering::Relaxed)
                )
                .into());
            }
            tokio::task::yield_now().await;
        }
        latencies.push(acked.elapsed());
    }
    let cpu = cpu_seconds(pid)? - cpu0;
    c.batch_execute("DROP TABLE fan CASCADE").await?;
    for task in tasks {
        let _ = task.await;
    }
    latencies.sort();
    Ok((latencies, cpu / changes as f64))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(what) = args.first() else {
        eprintln!("usage: millrace-bench point-select|copy|view-latency NAME=PORT[:USER[:DB]]...");
        std::process::exit(2);
    };
    let targets = parse_targets(&args[1..]);
    match what.as_str() {
        "point-select" => {
            let rows = env_usize("BENCH_ROWS", 100_000);
            let seconds = env_usize("BENCH_SECONDS", 10) as u64;
            let clients = env_usize("BENCH_CLIENTS", 4);
            println!(
                "point SELECT by primary key: {rows} rows, {clients} clients, {seconds} s each"
            );
            for t in &targets {
                let tps = point_select(t, rows, seconds, clients).await?;
                println!("  {:<12} {:>10.0} tps", t.name, tps);
            }
        }
        "copy" => {
            let rows = env_usize("BENCH_COPY_ROWS", 1_000_000);
            println!("COPY FROM STDIN (text), {rows} rows of (int, int, int, text)");
            for t in &targets {
                let rps = copy_bench(t, rows).await?;
                println!("  {:<12} {:>10.0} rows/s", t.name, rps);
            }
        }
        "view-latency" => {
            let rows = env_usize("BENCH_ROWS", 100_000);
            let changes = env_usize("BENCH_CHANGES", 200);
            println!(
                "single-row INSERT until visible in a GROUP BY materialized view: {rows} rows, {changes} changes"
            );
            for t in &targets {
                let l = view_latency(t, rows, changes).await?;
                let p = |q: f64| l[((l.len() as f64 * q) as usize).min(l.len() - 1)];
                println!(
                    "  {:<12} p50 {:>9.2} ms   p99 {:>9.2} ms",
                    t.name,
                    p(0.50).as_secs_f64() * 1e3,
                    p(0.99).as_secs_f64() * 1e3
                );
            }
        }
        "subscribe" => {
            let changes = env_usize("BENCH_CHANGES", 200);
            let pid: u32 = std::env::var("MILLRACE_PID")?.parse()?;
            let Some(t) = targets.iter().find(|t| t.name == "millrace") else {
                return Err("subscribe needs the millrace target".into());
            };
            println!(
                "SUBSCRIBE fan-out: {changes} single-row inserts into a GROUP BY view, ack until every subscriber has the change"
            );
            for subscribers in [1, env_usize("BENCH_SUBSCRIBERS", 1000)] {
                let (l, cpu) = subscribe_fanout(t, pid, subscribers, changes).await?;
                let p = |q: f64| l[((l.len() as f64 * q) as usize).min(l.len() - 1)];
                println!(
                    "  {:>5} subscribers   p50 {:>8.2} ms   p99 {:>8.2} ms   server {:>7.3} ms CPU per change",
                    subscribers,
                    p(0.50).as_secs_f64() * 1e3,
                    p(0.99).as_secs_f64() * 1e3,
                    cpu * 1e3
                );
            }
        }
        "nexmark" => {
            let events = env_usize("BENCH_EVENTS", 1_000_000);
            let pid: u32 = std::env::var("MILLRACE_PID")?.parse()?;
            let Some(t) = targets.iter().find(|t| t.name == "millrace") else {
                return Err("nexmark needs the millrace target".into());
            };
            println!(
                "nexmark bids -> views, {events} events each (server CPU from /proc; generator, ingest and view share it)"
            );
            let runs = [
                ("ingest only (baseline)", None),
                (
                    "q0 passthrough",
                    Some("SELECT auction, bidder, price, date_time FROM bid"),
                ),
                (
                    "q1 projection",
                    Some("SELECT auction, bidder, 0.908 * price AS price, date_time FROM bid"),
                ),
                (
                    "q2 filter",
                    Some("SELECT auction, price FROM bid WHERE auction % 123 = 0"),
                ),
            ];
            for (i, (label, view)) in runs.iter().enumerate() {
                let (wall, cpu) = nexmark_run(t, pid, &format!("nx{i}"), *view, events).await?;
                println!(
                    "  {:<24} {:>10.0} events/s   {:>10.0} events per CPU-second   ({:.2} CPU-s per million)",
                    label,
                    events as f64 / wall,
                    events as f64 / cpu.max(1e-9),
                    cpu * 1e6 / events as f64
                );
            }
        }
        "kafka" => {
            let rows = env_usize("BENCH_ROWS", 1_000_000);
            let pid: u32 = std::env::var("MILLRACE_PID")?.parse()?;
            let brokers = std::env::var("KAFKA_BROKERS")?;
            let Some(t) = targets.iter().find(|t| t.name == "millrace") else {
                return Err("kafka needs the millrace target".into());
            };
            let produce = kafka_produce(&brokers, "bench_clicks", rows).await?;
            println!(
                "Kafka JSON ingest, {rows} rows in topic bench_clicks (2 partitions; produced at {:.0} rows/s). Server CPU from /proc; broker and server share the 2 cores",
                rows as f64 / produce
            );
            let runs = [
                ("source only (baseline)", None),
                (
                    "passthrough view",
                    Some("SELECT user_id, url, ts FROM clicks"),
                ),
                (
                    "GROUP BY view",
                    Some("SELECT url, count(*) AS n FROM clicks GROUP BY url"),
                ),
            ];
            let broker_pid: Option<u32> =
                std::env::var("TANSU_PID").ok().and_then(|p| p.parse().ok());
            for (i, (label, view)) in runs.iter().enumerate() {
                let broker0 = broker_pid.map(cpu_seconds).transpose()?;
                let (wall, cpu) = kafka_run(
                    t,
                    pid,
                    &brokers,
                    "bench_clicks",
                    &format!("kc{i}"),
                    *view,
                    rows,
                )
                .await?;
                let broker = match (broker_pid, broker0) {
                    (Some(pid), Some(c0)) => cpu_seconds(pid)? - c0,
                    _ => f64::NAN,
                };
                println!(
                    "  {:<24} {:>10.0} rows/s   {:>6.2} server CPU-s per million rows   (broker {:.2} CPU-s per million)",
                    label,
                    rows as f64 / wall,
                    cpu * 1e6 / rows as f64,
                    broker * 1e6 / rows as f64
                );
            }
        }
        other => {
            eprintln!("unknown benchmark {other}");
            std::process::exit(2);
        }
    }
    Ok(())
}
