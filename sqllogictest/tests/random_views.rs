//! Random materialized views against PostgreSQL 15 (`random_sql`). For each of
//! `RANDOM_VIEWS_DATABASES` random databases (default 6) of a fresh seed, up to
//! `RANDOM_VIEWS` generated queries (default 40) become `CREATE MATERIALIZED VIEW`s, and
//! their rows are compared with PostgreSQL's answer to the query; then
//! `RANDOM_VIEWS_ROUNDS` rounds (default 8) of random INSERT, UPDATE and DELETE run on both
//! servers, and every view is compared again after each. Queries with LIMIT or OFFSET are
//! left out (which of tied rows a view keeps is not defined), and so are queries
//! PostgreSQL refuses.
//!
//! Fails on a view whose rows differ from PostgreSQL's answer, a change that one server
//! takes and the other refuses, a lost connection, and more failed views (views Millrace
//! cannot read where PostgreSQL answers) than the `view_failure_ceiling` of
//! `random-cases.txt`. Prints the seed (`RANDOM_VIEWS_SEED=n` replays it; with
//! `RANDOM_VIEWS_VERBOSE=1` the changes too), how many queries Millrace took as views and why
//! it refused the others. View `rv_S_I` is query `1000000 + I - 1` of database `S`
//! (`RANDOM_SQL_DUMP=S RANDOM_SQL_QUERY=..` of random_queries prints it).

use std::process::ExitCode;

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::postgres::Postgres;
use millrace_sqllogictest::random_sql::compare::{Outcome, Tally, check_view, load};
use millrace_sqllogictest::random_sql::dml;
use millrace_sqllogictest::random_sql::query::{Gaps, Generator, Query};
use millrace_sqllogictest::random_sql::tables::Database;
use tokio_postgres::Client;

/// A number from the environment, or `default`.
fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The share of views (percent) that may fail in a run while known causes remain: the
/// `view_failure_ceiling` line of `sqllogictest/random-cases.txt` (0 without one).
fn view_failure_ceiling() -> f64 {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join("random-cases.txt"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("view_failure_ceiling"), Some(v)) => v.parse().ok(),
                _ => None,
            }
        })
        .unwrap_or(0.0)
}

/// What a run found.
#[derive(Default)]
struct Run {
    /// View contents compared, by outcome (an error reading a view counts as a failure).
    reads: Tally,
    /// Queries Millrace took as views.
    views: usize,
    /// Queries it refused, by reason (digits blanked).
    refused: Tally,
    /// Changes one server took and the other refused.
    diverged: Vec<String>,
    /// Views that failed (could not be read where PostgreSQL answers): name and error.
    failed: std::collections::BTreeMap<String, String>,
}

/// Up to `wanted` views over `db`, created on Millrace: `(name, query)`.
async fn create_views(
    pg: &Client,
    mr: &Client,
    db: &Database,
    seed: u64,
    wanted: usize,
    run: &mut Run,
) -> Result<Vec<(String, Query)>, String> {
    let gaps = Gaps::default();
    let mut views = Vec::new();
    let mut index = 0;
    while views.len() < wanted && index < wanted as u64 * 4 {
        // NOTE: indexes apart from random_queries' own, so that these are other queries.
        let query = Generator::query(db, seed, 1_000_000 + index, &gaps);
        index += 1;
        if query.sql.contains(" LIMIT ") || query.sql.contains(" OFFSET ") {
            continue;
        }
        if pg.simple_query(&query.sql).await.is_err() {
            continue;
        }
        let name = format!("rv_{seed}_{index}");
        let create = format!("CREATE MATERIALIZED VIEW {name} AS {}", query.sql);
        match mr.simple_query(&create).await {
            Ok(_) => {
                run.views += 1;
                views.push((name, query));
            }
            Err(_) if mr.is_closed() => {
                return Err(format!("millrace was lost creating {name}: {create}"));
            }
            Err(e) => {
                let reason = match e.as_db_error() {
                    Some(db) => format!("{}: {}", db.code().code(), db.message()),
                    None => e.to_string(),
                };
                run.refused
                    .add(seed, index, &query, &Outcome::MillraceError(reason));
            }
        }
    }
    Ok(views)
}

/// Compares every view with PostgreSQL's answer to its query.
async fn compare_views(
    pg: &Client,
    mr: &Client,
    seed: u64,
    round: u64,
    views: &[(String, Query)],
    run: &mut Run,
) -> Result<(), String> {
    for (name, query) in views {
        let outcome = match check_view(pg, mr, query, name).await {
            Outcome::MillraceError(e) => {
                // NOTE: a failed view stays failed; counted once, against its own ceiling.
                if !run.failed.contains_key(name) {
                    println!(
                        "view {name} failed after round {round}: {e}\n  {}",
                        query.sql
                    );
                    run.failed.insert(name.clone(), e);
                }
                continue;
            }
            Outcome::Lost(e) => return Err(format!("{e} (view {name}, round {round})")),
            Outcome::Wrong { postgres, millrace } => {
                println!("view {name} after round {round} differs");
                Outcome::Wrong { postgres, millrace }
            }
            other => other,
        };
        run.reads.add(seed, round, query, &outcome);
    }
    Ok(())
}

/// Runs one round of changes on both servers.
async fn change(pg: &Client, mr: &Client, db: &Database, seed: u64, round: u64, run: &mut Run) {
    for sql in dml::round(db, seed, round) {
        if std::env::var("RANDOM_VIEWS_VERBOSE").is_ok() {
            println!("round {round}: {sql};");
        }
        let on_pg = pg
            .simple_query(&sql)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let on_mr = mr
            .simple_query(&sql)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        if on_pg.is_ok() != on_mr.is_ok() {
            run.diverged.push(format!(
                "seed {seed} round {round}: {sql}\n  postgres: {on_pg:?}\n  millrace: {on_mr:?}"
            ));
        }
    }
}

async fn main_async() -> Result<bool, String> {
    let seed = setting(
        "RANDOM_VIEWS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 1_000_000_000)
            .unwrap_or(1),
    );
    let databases = setting("RANDOM_VIEWS_DATABASES", 6);
    let wanted = setting("RANDOM_VIEWS", 40) as usize;
    let rounds = setting("RANDOM_VIEWS_ROUNDS", 8);
    println!("random-views: seed {seed} (RANDOM_VIEWS_SEED={seed} replays)");
    let postgres = Postgres::start().map_err(|e| e.to_string())?;
    let server = TestServer::start(&[]).map_err(|e| e.to_string())?;
    let pg = postgres.connect().await.map_err(|e| e.to_string())?;
    let mr = server
        .connect("millrace")
        .await
        .map_err(|e| e.to_string())?;
    for client in [&pg, &mr] {
        client
            .simple_query("SET statement_timeout = '20s'")
            .await
            .map_err(|e| e.to_string())?;
    }
    let started = std::time::Instant::now();
    let mut run = Run::default();
    for d in 0..databases {
        let db_seed = seed + d;
        let db = Database::generate(db_seed);
        load(&pg, &mr, &db).await?;
        let views = create_views(&pg, &mr, &db, db_seed, wanted, &mut run).await?;
        compare_views(&pg, &mr, db_seed, 0, &views, &mut run).await?;
        for round in 1..=rounds {
            change(&pg, &mr, &db, db_seed, round, &mut run).await;
            compare_views(&pg, &mr, db_seed, round, &views, &mut run).await?;
        }
        for (name, _) in &views {
            mr.simple_query(&format!("DROP MATERIALIZED VIEW {name}"))
                .await
                .map_err(|e| format!("DROP MATERIALIZED VIEW {name}: {e}"))?;
        }
    }
    println!(
        "random-views: seed {seed} in {:.0} s: {} views of {} queries PostgreSQL answers; \
         reads: {}",
        started.elapsed().as_secs_f64(),
        run.views,
        run.views + run.refused.answered(),
        run.reads.report()
    );
    println!("refused as views: {}", run.refused.report());
    for d in &run.diverged {
        println!("DIVERGED {d}");
    }
    let failed = run.failed.len() as f64 * 100.0 / run.views.max(1) as f64;
    let ceiling = view_failure_ceiling();
    println!(
        "random-views: {} views failed ({failed:.2}%, ceiling {ceiling}% in random-cases.txt)",
        run.failed.len()
    );
    Ok(run.reads.failures.is_empty() && run.diverged.is_empty() && failed <= ceiling)
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("random-views: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("random-views: {e}");
            ExitCode::FAILURE
        }
    }
}
