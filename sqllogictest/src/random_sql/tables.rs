//! The random database of a seed: three to four tables `t0..` with a key and three to six
//! columns of random types, five to twenty-five rows each, about one value in seven NULL.
//! Values come from small domains so that joins, groups and IN lists meet often.

use super::{Rng, SqlType};

/// One column of a random table.
#[derive(Debug, Clone)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Its type.
    pub ty: SqlType,
}

/// One random table.
#[derive(Debug, Clone)]
pub struct Table {
    /// Its name.
    pub name: String,
    /// Its columns, the key `k` first.
    pub columns: Vec<Column>,
    /// Its rows as SQL literals.
    pub rows: Vec<Vec<String>>,
}

/// The random database of a seed.
#[derive(Debug, Clone)]
pub struct Database {
    /// Its tables.
    pub tables: Vec<Table>,
}

const WORDS: [&str; 10] = ["a", "b", "ab", "ta", "ba", "x y", "", "B", "Ab", "tat"];

/// A literal of `ty` from the small domain the tables use (never NULL).
pub fn literal(rng: &mut Rng, ty: SqlType) -> String {
    match ty {
        SqlType::Int => {
            let v = rng.range(-5, 20);
            if v < 0 {
                format!("({v})")
            } else {
                v.to_string()
            }
        }
        SqlType::BigInt => {
            let v = if rng.chance(15) {
                rng.range(-3_000_000_000, 3_000_000_000)
            } else {
                rng.range(-1000, 1000)
            };
            format!("CAST({v} AS BIGINT)")
        }
        SqlType::Numeric => {
            let v = rng.range(-5000, 5000);
            let sign = if v < 0 { "-" } else { "" };
            let v = v.abs();
            format!("CAST({sign}{}.{:02} AS NUMERIC)", v / 100, v % 100)
        }
        SqlType::Double => {
            let v = *rng.pick(&[
                "0.5", "-2.25", "1e10", "3.75", "0.1", "-0.3", "100", "2", "-7.5", "1e-5",
            ]);
            format!("CAST({v} AS DOUBLE PRECISION)")
        }
        SqlType::Text => format!("'{}'", rng.pick(&WORDS)),
        SqlType::Date => format!("DATE '2023-01-{:02}'", rng.range(1, 28)),
        SqlType::Timestamp => format!(
            "TIMESTAMP '2023-01-{:02} {:02}:{:02}:00'",
            rng.range(1, 28),
            rng.range(0, 23),
            *rng.pick(&[0, 15, 30])
        ),
        SqlType::Bool => rng.pick(&["TRUE", "FALSE"]).to_string(),
    }
}

impl Database {
    /// The database of `seed`.
    pub fn generate(seed: u64) -> Database {
        let mut rng = Rng::new(seed);
        let n = rng.range(3, 4) as usize;
        let tables = (0..n).map(|i| table(&mut rng, i)).collect();
        Database { tables }
    }

    /// The statements that create and fill it (valid for PostgreSQL and Millrace alike).
    pub fn setup_sql(&self) -> Vec<String> {
        let mut out = Vec::new();
        for t in &self.tables {
            let columns: Vec<String> = t
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let key = if i == 0 { " PRIMARY KEY" } else { "" };
                    format!("{} {}{key}", c.name, c.ty.sql())
                })
                .collect();
            out.push(format!("CREATE TABLE {} ({})", t.name, columns.join(", ")));
            if !t.rows.is_empty() {
                let rows: Vec<String> = t
                    .rows
                    .iter()
                    .map(|r| format!("({})", r.join(", ")))
                    .collect();
                out.push(format!("INSERT INTO {} VALUES {}", t.name, rows.join(", ")));
            }
        }
        out
    }

    /// The statements that drop it.
    pub fn teardown_sql(&self) -> Vec<String> {
        self.tables
            .iter()
            .map(|t| format!("DROP TABLE IF EXISTS {}", t.name))
            .collect()
    }
}

fn table(rng: &mut Rng, index: usize) -> Table {
    let mut columns = vec![Column {
        name: "k".into(),
        ty: SqlType::Int,
    }];
    for i in 0..rng.range(3, 6) {
        columns.push(Column {
            name: format!("c{i}"),
            ty: *rng.pick(&SqlType::ALL),
        });
    }
    let rows = (0..rng.range(5, 25))
        .map(|k| {
            let mut row = vec![k.to_string()];
            for c in &columns[1..] {
                row.push(if rng.chance(14) {
                    "NULL".into()
                } else {
                    literal(rng, c.ty)
                });
            }
            row
        })
        .collect();
    Table {
        name: format!("t{index}"),
        columns,
        rows,
    }
}
