//! Runs a generated query on Millrace and on PostgreSQL and compares the answers: as
//! multisets of rows, or as lists when the query orders them; numbers of approximate types
//! compared to nine significant digits (a float sum depends on the order of its terms, and
//! numeric prints its scale), everything else as PostgreSQL's text.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::Client;

use super::SqlType;
use super::query::Query;
use super::tables::Database;
use crate::rows::{TextRow, text_rows};

/// How one query went.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Both gave the same answer.
    Agree,
    /// PostgreSQL refused the query (a generator mistake or an error both should give):
    /// not counted.
    PostgresError(String),
    /// Millrace failed where PostgreSQL answered: counts against the agreement rate.
    MillraceError(String),
    /// Both answered, differently: a bug.
    Wrong {
        /// PostgreSQL's rows (normalized).
        postgres: Vec<TextRow>,
        /// Millrace's rows (normalized).
        millrace: Vec<TextRow>,
    },
    /// Millrace's connection broke: the server crashed or dropped the session.
    Lost(String),
}

/// The rows of `sql`, or the error's message; `Err(None)` when the connection broke.
async fn run(client: &Client, sql: &str) -> Result<Vec<TextRow>, Option<String>> {
    let call = client.simple_query(sql);
    let messages = match tokio::time::timeout(Duration::from_secs(60), call).await {
        Err(_) => return Err(Some("no answer within 60 s".into())),
        Ok(Err(e)) => {
            return match e.as_db_error() {
                Some(db) => Err(Some(format!("{}: {}", db.code().code(), db.message()))),
                None if client.is_closed() => Err(None),
                None => Err(Some(e.to_string())),
            };
        }
        Ok(Ok(m)) => m,
    };
    Ok(text_rows(messages))
}

/// Drops `db`'s tables and creates and fills them again, on both servers.
pub async fn load(postgres: &Client, millrace: &Client, db: &Database) -> Result<(), String> {
    for client in [postgres, millrace] {
        for sql in db.teardown_sql().iter().chain(&db.setup_sql()) {
            client
                .simple_query(sql)
                .await
                .map_err(|e| format!("{sql}: {e}"))?;
        }
    }
    Ok(())
}

/// A value as compared: approximate numbers to nine significant digits.
fn normalize_value(value: Option<String>, ty: SqlType) -> Option<String> {
    let v = value?;
    if !ty.is_approximate() {
        return Some(v);
    }
    Some(match v.parse::<f64>() {
        Ok(f) if f.is_nan() => "NaN".into(),
        Ok(0.0) => "0".into(),
        Ok(f) if f.is_infinite() => v,
        Ok(f) => format!("{f:.8e}"),
        Err(_) => v,
    })
}

/// A row as compared.
pub fn normalize(row: TextRow, types: &[SqlType]) -> TextRow {
    row.into_iter()
        .enumerate()
        .map(|(i, v)| normalize_value(v, types.get(i).copied().unwrap_or(SqlType::Text)))
        .collect()
}

/// Runs `query` on both servers and compares the answers.
pub async fn check(postgres: &Client, millrace: &Client, query: &Query) -> Outcome {
    compare(postgres, &query.sql, millrace, &query.sql, query).await
}

/// Compares what PostgreSQL answers to `query` with the rows of Millrace's view `view` of it
/// (as multisets: a view has no order).
pub async fn check_view(
    postgres: &Client,
    millrace: &Client,
    query: &Query,
    view: &str,
) -> Outcome {
    let unordered = Query {
        ordered: false,
        ..query.clone()
    };
    let read = format!("SELECT * FROM {view}");
    compare(postgres, &query.sql, millrace, &read, &unordered).await
}

/// Runs `expected` on PostgreSQL and `actual` on Millrace and compares the answers as
/// `query` (its types and order) says.
async fn compare(
    postgres: &Client,
    expected: &str,
    millrace: &Client,
    actual: &str,
    query: &Query,
) -> Outcome {
    let expected = match run(postgres, expected).await {
        Ok(rows) => rows,
        Err(e) => return Outcome::PostgresError(e.unwrap_or_else(|| "connection lost".into())),
    };
    let actual = match run(millrace, actual).await {
        Ok(rows) => rows,
        Err(Some(e)) => return Outcome::MillraceError(e),
        Err(None) => return Outcome::Lost("the connection to millrace broke".into()),
    };
    let mut expected: Vec<TextRow> = expected
        .into_iter()
        .map(|r| normalize(r, &query.types))
        .collect();
    let mut actual: Vec<TextRow> = actual
        .into_iter()
        .map(|r| normalize(r, &query.types))
        .collect();
    if !query.ordered {
        expected.sort();
        actual.sort();
    }
    if expected == actual || nearly_equal(&expected, &actual, &query.types) {
        Outcome::Agree
    } else {
        Outcome::Wrong {
            postgres: expected,
            millrace: actual,
        }
    }
}

/// Whether two answers differ only in approximate numbers that agree to within a few units
/// of their ninth significant digit: rounding to nine digits splits values that straddle a
/// rounding boundary (a float sum in another order gave `-21.397502250000002` against
/// `-21.39750225`, printed `-2.13975023e1` and `-2.13975022e1`: seed 91 query 5982).
fn nearly_equal(expected: &[TextRow], actual: &[TextRow], types: &[SqlType]) -> bool {
    expected.len() == actual.len()
        && expected.iter().zip(actual).all(|(e, a)| {
            e.len() == a.len()
                && e.iter().zip(a).enumerate().all(|(i, (x, y))| {
                    let approximate = types.get(i).is_some_and(|t| t.is_approximate());
                    match (x, y) {
                        (Some(x), Some(y)) if x != y && approximate => {
                            match (x.parse::<f64>(), y.parse::<f64>()) {
                                (Ok(x), Ok(y)) => (x - y).abs() <= 1e-8 * x.abs().max(y.abs()),
                                _ => false,
                            }
                        }
                        _ => x == y,
                    }
                })
        })
}

/// Counts of outcomes over a run, with the errors grouped by message.
#[derive(Debug, Default)]
pub struct Tally {
    /// Queries both answered alike.
    pub agree: usize,
    /// Queries PostgreSQL refused.
    pub postgres_errors: usize,
    /// Millrace errors where PostgreSQL answered, by message (digits blanked).
    pub millrace_errors: BTreeMap<String, usize>,
    /// Wrong answers and lost connections: `(seed, index, what)`.
    pub failures: Vec<(u64, u64, String)>,
}

impl Tally {
    /// Adds one outcome.
    pub fn add(&mut self, seed: u64, index: u64, query: &Query, outcome: &Outcome) {
        match outcome {
            Outcome::Agree => self.agree += 1,
            Outcome::PostgresError(_) => self.postgres_errors += 1,
            Outcome::MillraceError(e) => {
                let key: String = e
                    .chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .take(160)
                    .collect();
                *self.millrace_errors.entry(key).or_default() += 1;
            }
            Outcome::Wrong { postgres, millrace } => self.failures.push((
                seed,
                index,
                format!(
                    "wrong answer\n  query: {}\n  postgres: {:?}\n  millrace: {:?}",
                    query.sql,
                    &postgres[..postgres.len().min(10)],
                    &millrace[..millrace.len().min(10)]
                ),
            )),
            Outcome::Lost(e) => {
                self.failures
                    .push((seed, index, format!("{e}\n  query: {}", query.sql)))
            }
        }
    }

    /// Queries PostgreSQL answered.
    pub fn answered(&self) -> usize {
        self.agree + self.millrace_errors.values().sum::<usize>() + self.failures.len()
    }

    /// The share of queries PostgreSQL answered on which Millrace agreed.
    pub fn rate(&self) -> f64 {
        if self.answered() == 0 {
            return 1.0;
        }
        self.agree as f64 / self.answered() as f64
    }

    /// A report: the counts, the most common errors, every failure.
    pub fn report(&self) -> String {
        let mut out = format!(
            "{} of {} answered queries agree ({:.2}%); {} Millrace errors, {} wrong or lost, {} refused by PostgreSQL\n",
            self.agree,
            self.answered(),
            self.rate() * 100.0,
            self.millrace_errors.values().sum::<usize>(),
            self.failures.len(),
            self.postgres_errors
        );
        let mut errors: Vec<_> = self.millrace_errors.iter().collect();
        errors.sort_by(|a, b| b.1.cmp(a.1));
        for (message, n) in errors.iter().take(15) {
            out.push_str(&format!("  {n:5} x {message}\n"));
        }
        for (seed, index, what) in &self.failures {
            out.push_str(&format!("FAILED seed {seed} query {index}: {what}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{SqlType, nearly_equal, normalize};

    fn row(values: &[&str]) -> Vec<Option<String>> {
        values.iter().map(|v| Some(v.to_string())).collect()
    }

    #[test]
    fn approximate_values_across_a_rounding_boundary_agree() {
        let types = [SqlType::Double, SqlType::Text];
        let pg = vec![normalize(row(&["-21.397502250000002", "a"]), &types)];
        let ours = vec![normalize(row(&["-21.39750225", "a"]), &types)];
        assert_ne!(pg, ours);
        assert!(nearly_equal(&pg, &ours, &types));
        let other_text = vec![normalize(row(&["-21.39750225", "b"]), &types)];
        assert!(!nearly_equal(&pg, &other_text, &types));
        let far = vec![normalize(row(&["-21.3975", "a"]), &types)];
        assert!(!nearly_equal(&pg, &far, &types));
    }
}
