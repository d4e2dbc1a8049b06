//! Random SQL checked against PostgreSQL (in the manner of SQLancer): seeded random tables
//! with NULLs and every common type, and seeded random queries over them (joins of every
//! kind, subqueries in every position, grouping, DISTINCT, set operations, CTEs, window
//! functions, CASE/COALESCE/NULLIF, casts, string and date functions, ORDER BY with
//! LIMIT/OFFSET). The same statements run on Millrace and on PostgreSQL 15 and their
//! answers are compared as multisets (as lists where ORDER BY makes them one).
//!
//! Everything is a function of a seed: the tables of database seed `s`, and query `i` of
//! it, are the same on every machine, so a disagreement is replayed from `(s, i)`.
//! `tables.rs` makes the data, `query.rs` the queries, `compare.rs` runs and compares.

pub mod compare;
pub mod dml;
pub mod query;
pub mod tables;

/// A small, fast, seeded generator (SplitMix64): the same seed gives the same SQL
/// everywhere, with no dependency whose algorithm could change under us.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The generator of query `index` of database seed `seed`.
    pub fn for_query(seed: u64, index: u64) -> Rng {
        let mut r = Rng(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % ((hi - lo + 1) as u64)) as i64
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u32) -> bool {
        self.below(100) < percent as usize
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The column types the generator uses, with PostgreSQL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SqlType {
    /// integer
    Int,
    /// bigint
    BigInt,
    /// numeric
    Numeric,
    /// double precision
    Double,
    /// text
    Text,
    /// date
    Date,
    /// timestamp (without time zone)
    Timestamp,
    /// boolean
    Bool,
}

impl SqlType {
    /// Every type.
    pub const ALL: [SqlType; 8] = [
        SqlType::Int,
        SqlType::BigInt,
        SqlType::Numeric,
        SqlType::Double,
        SqlType::Text,
        SqlType::Date,
        SqlType::Timestamp,
        SqlType::Bool,
    ];

    /// The type's name in SQL.
    pub fn sql(self) -> &'static str {
        match self {
            SqlType::Int => "INT",
            SqlType::BigInt => "BIGINT",
            SqlType::Numeric => "NUMERIC",
            SqlType::Double => "DOUBLE PRECISION",
            SqlType::Text => "TEXT",
            SqlType::Date => "DATE",
            SqlType::Timestamp => "TIMESTAMP",
            SqlType::Bool => "BOOLEAN",
        }
    }

    /// Whether answers of this type are compared as numbers (with a tolerance: a float sum
    /// depends on the order of its terms, and numeric and float print differently).
    pub fn is_approximate(self) -> bool {
        matches!(self, SqlType::Numeric | SqlType::Double)
    }

    /// Whether the type is a number.
    pub fn is_number(self) -> bool {
        matches!(
            self,
            SqlType::Int | SqlType::BigInt | SqlType::Numeric | SqlType::Double
        )
    }
}
