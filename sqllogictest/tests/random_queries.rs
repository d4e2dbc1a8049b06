//! Random SELECTs against PostgreSQL 15 (`random_sql`): first every saved case of
//! `sqllogictest/random-cases.txt` (each must agree), then a fresh seed of
//! `RANDOM_SQL_QUERIES` queries (default 2,000) over a new database every 250 queries.
//! Prints the seed, the agreement rate and every disagreement. Fails on a lost connection,
//! on any saved case that does not agree, when the agreement rate is below the `floor` of
//! `random-cases.txt`, and when wrong answers are above its `wrong_ceiling` (kept while
//! known wrong answers remain, to go to 0).
//!
//! `RANDOM_SQL_SEED=n` replays a fresh run; a failing `seed index` pair printed here goes
//! into `random-cases.txt` as a saved case once it is fixed.

use std::path::PathBuf;
use std::process::ExitCode;

use millrace_sqllogictest::TestServer;
use millrace_sqllogictest::postgres::Postgres;
use millrace_sqllogictest::random_sql::compare::{Outcome, Tally, check, load};
use millrace_sqllogictest::random_sql::query::{Gaps, Generator};
use millrace_sqllogictest::random_sql::tables::Database;
use tokio_postgres::Client;

/// Queries per random database in a fresh run.
const PER_DATABASE: u64 = 250;

struct Cases {
    /// Saved `(database seed, query index)` pairs.
    saved: Vec<(u64, u64)>,
    /// The lowest agreement rate a fresh run may have, in percent.
    floor: f64,
    /// Known bugs the generator steers clear of.
    gaps: Gaps,
    /// The most wrong answers a fresh run may give, in percent of the answered queries,
    /// while known wrong answers remain (0 once they are fixed).
    wrong_ceiling: f64,
}

fn cases(root: &std::path::Path) -> Cases {
    let text =
        std::fs::read_to_string(root.join("sqllogictest/random-cases.txt")).unwrap_or_default();
    let mut saved = Vec::new();
    let mut floor = 100.0;
    let mut gaps = Vec::new();
    let mut wrong_ceiling = 0.0;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("floor"), Some(v)) => floor = v.parse().unwrap_or(100.0),
            (Some("gap"), Some(name)) => gaps.push(name.to_string()),
            (Some("wrong_ceiling"), Some(v)) => wrong_ceiling = v.parse().unwrap_or(0.0),
            (Some(s), Some(i)) => {
                if let (Ok(s), Ok(i)) = (s.parse(), i.parse()) {
                    saved.push((s, i));
                }
            }
            _ => {}
        }
    }
    // `RANDOM_SQL_ALL=1` makes every kind of query, known bugs included (the soak does).
    let gaps = match std::env::var("RANDOM_SQL_ALL") {
        Ok(_) => Gaps::default(),
        Err(_) => Gaps::from_names(gaps.iter().map(String::as_str)),
    };
    Cases {
        saved,
        floor,
        gaps,
        wrong_ceiling,
    }
}

async fn run_seed(
    pg: &Client,
    mr: &Client,
    seed: u64,
    indexes: impl Iterator<Item = u64>,
    tally: &mut Tally,
    gaps: &Gaps,
    verbose: bool,
) -> Result<(), String> {
    let db = Database::generate(seed);
    load(pg, mr, &db).await?;
    for index in indexes {
        let query = Generator::query(&db, seed, index, gaps);
        let outcome = check(pg, mr, &query).await;
        if verbose && let Outcome::MillraceError(e) = &outcome {
            println!(
                "millrace error, seed {seed} query {index}: {e}\n  {}",
                query.sql
            );
        }
        tally.add(seed, index, &query, &outcome);
        if matches!(outcome, Outcome::Lost(_)) {
            return Err(format!("millrace was lost at seed {seed} query {index}"));
        }
    }
    Ok(())
}

async fn main_async(root: PathBuf) -> Result<bool, String> {
    // `RANDOM_SQL_DUMP=seed` prints the statements that make that database (and with
    // `RANDOM_SQL_QUERY=index` that query), to replay a disagreement by hand.
    if let Some(seed) = std::env::var("RANDOM_SQL_DUMP")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        let db = Database::generate(seed);
        for sql in db.setup_sql() {
            println!("{sql};");
        }
        if let Some(index) = std::env::var("RANDOM_SQL_QUERY")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            let gaps = cases(&root).gaps;
            println!("{};", Generator::query(&db, seed, index, &gaps).sql);
        }
        return Ok(true);
    }
    let cases = cases(&root);
    let pg = Postgres::start().map_err(|e| e.to_string())?;
    let server = TestServer::start(&[]).map_err(|e| e.to_string())?;
    let pg_client = pg.connect().await.map_err(|e| e.to_string())?;
    let mr_client = server
        .connect("millrace")
        .await
        .map_err(|e| e.to_string())?;
    for client in [&pg_client, &mr_client] {
        client
            .simple_query("SET statement_timeout = '20s'")
            .await
            .map_err(|e| e.to_string())?;
    }
    let verbose = std::env::var("RANDOM_SQL_VERBOSE").is_ok();
    let mut ok = true;

    let mut saved = Tally::default();
    let mut seeds: Vec<u64> = cases.saved.iter().map(|(s, _)| *s).collect();
    seeds.sort_unstable();
    seeds.dedup();
    for seed in seeds {
        let indexes = cases
            .saved
            .iter()
            .filter(|(s, _)| *s == seed)
            .map(|(_, i)| *i);
        run_seed(
            &pg_client,
            &mr_client,
            seed,
            indexes,
            &mut saved,
            &cases.gaps,
            true,
        )
        .await?;
    }
    println!("saved cases: {}", saved.report());
    if saved.agree != cases.saved.len() {
        println!("random-sql: a saved case does not agree");
        ok = false;
    }

    let seed: u64 = std::env::var("RANDOM_SQL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() % 1_000_000_000)
                .unwrap_or(1)
        });
    let queries: u64 = std::env::var("RANDOM_SQL_QUERIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    println!("random-sql: fresh seed {seed}, {queries} queries (RANDOM_SQL_SEED={seed} replays)");
    let started = std::time::Instant::now();
    let mut fresh = Tally::default();
    let mut done = 0;
    while done < queries {
        let n = PER_DATABASE.min(queries - done);
        let db_seed = seed + done / PER_DATABASE;
        run_seed(
            &pg_client,
            &mr_client,
            db_seed,
            done..done + n,
            &mut fresh,
            &cases.gaps,
            verbose,
        )
        .await?;
        done += n;
    }
    println!(
        "fresh seed {seed} in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        fresh.report()
    );
    let wrong = fresh.failures.len() as f64 * 100.0 / fresh.answered().max(1) as f64;
    if wrong > cases.wrong_ceiling {
        println!(
            "random-sql: {:.2}% wrong answers (see FAILED above), above the ceiling of {}%",
            wrong, cases.wrong_ceiling
        );
        ok = false;
    } else if !fresh.failures.is_empty() {
        println!(
            "random-sql: {} wrong answers (see FAILED above), within the ceiling of {}% kept \
             while known wrong answers remain",
            fresh.failures.len(),
            cases.wrong_ceiling
        );
    }
    if fresh.rate() * 100.0 < cases.floor {
        println!(
            "random-sql: {:.2}% agree, below the floor of {}%",
            fresh.rate() * 100.0,
            cases.floor
        );
        ok = false;
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let root = std::env::current_dir()
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("random-sql: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(root)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("random-sql: {e}");
            ExitCode::FAILURE
        }
    }
}
