//! Random changes to a random database: INSERTs of new keys, UPDATEs of a column and
//! DELETEs, each valid for PostgreSQL and Millrace alike, so that views over the tables
//! (tests/random_views.rs) can be compared with PostgreSQL after every round.

use super::Rng;
use super::tables::{Database, literal};

/// The statements of round `round` of changes to `db` (of its seed): one to five, each on
/// a random table. New keys start at 1,000 and never repeat within a run.
pub fn round(db: &Database, seed: u64, round: u64) -> Vec<String> {
    let mut rng = Rng::for_query(seed ^ 0x5eed_d111, round);
    let n = rng.range(1, 5);
    (0..n)
        .map(|i| statement(db, &mut rng, 1_000 + round * 100 + (i as u64) * 10))
        .collect()
}

/// One statement; `first_key` leaves room for ten new rows.
fn statement(db: &Database, rng: &mut Rng, first_key: u64) -> String {
    let table = rng.pick(&db.tables);
    // Keys of the generated rows are 0..25; most changes meet some of them.
    let key_filter = |rng: &mut Rng| match rng.below(4) {
        0 => format!("k = {}", rng.range(0, 25)),
        1 => format!("k % {} = {}", rng.range(2, 5), rng.range(0, 1)),
        2 => format!("k BETWEEN {} AND {}", rng.range(0, 10), rng.range(5, 30)),
        _ => format!("k >= {}", rng.range(0, 1_200)),
    };
    match rng.below(10) {
        0..=3 => {
            let rows: Vec<String> = (0..rng.range(1, 4) as u64)
                .map(|j| {
                    let mut values = vec![(first_key + j).to_string()];
                    for c in &table.columns[1..] {
                        values.push(if rng.chance(14) {
                            "NULL".into()
                        } else {
                            literal(rng, c.ty)
                        });
                    }
                    format!("({})", values.join(", "))
                })
                .collect();
            format!("INSERT INTO {} VALUES {}", table.name, rows.join(", "))
        }
        4..=7 if table.columns.len() > 1 => {
            let column = &table.columns[1 + rng.below(table.columns.len() - 1)];
            let value = if rng.chance(15) {
                "NULL".into()
            } else {
                literal(rng, column.ty)
            };
            let filter = key_filter(rng);
            format!(
                "UPDATE {} SET {} = {value} WHERE {filter}",
                table.name, column.name
            )
        }
        _ => {
            let filter = key_filter(rng);
            format!("DELETE FROM {} WHERE {filter}", table.name)
        }
    }
}
