//! TopN: `ORDER BY ... LIMIT n [OFFSET m]`, maintained.
//!
//! State is every input row ordered by (sort key, row); the output is the rows at positions
//! m..m+n. After each epoch the new top is read from the front of the order (m+n entries)
//! and compared with the last emitted top, so deletes of rows in the top pull the next rows
//! up. Rows that tie on the sort key are ordered by their encoding, so the choice among
//! ties is deterministic (SQL leaves it unspecified).

use std::collections::{BTreeMap, HashMap};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::RowConverter;
use datafusion::physical_expr::PhysicalSortExpr;

use super::{Operator, StateStats, evaluate, single_input};
use crate::changelog::{Changelog, loose, make_batch, row_converter, sort_converter};
use crate::error::Result;

/// (sort key, row) encodings: the order rows are ranked in.
type OrderedRow = (Box<[u8]>, Box<[u8]>);

/// The maintained TopN.
#[derive(Debug)]
pub struct TopNOp {
    schema: SchemaRef,
    order: Vec<PhysicalSortExpr>,
    sort_converter: RowConverter,
    rows: RowConverter,
    skip: usize,
    fetch: usize,
    /// (sort key, row) -> copies.
    state: BTreeMap<OrderedRow, i64>,
    /// Rows last emitted as the top, with their copies.
    top: HashMap<Box<[u8]>, i64>,
    reads: u64,
    bytes: i64,
}

impl TopNOp {
    /// Rows `skip..skip+fetch` of the input ordered by `order`.
    pub fn try_new(
        schema: SchemaRef,
        order: Vec<PhysicalSortExpr>,
        skip: usize,
        fetch: usize,
    ) -> Result<Self> {
        let schema = loose(&schema);
        let sort_converter = sort_converter(&order, &schema)?;
        Ok(Self {
            rows: row_converter(&schema)?,
            schema,
            order,
            sort_converter,
            skip,
            fetch,
            state: BTreeMap::new(),
            top: HashMap::new(),
            reads: 0,
            bytes: 0,
        })
    }
}

impl Operator for TopNOp {
    fn describe(&self) -> String {
        let order: Vec<String> = self.order.iter().map(|s| s.to_string()).collect();
        format!(
            "TopN: order=[{}] skip={} fetch={}",
            order.join(", "),
            self.skip,
            self.fetch
        )
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn state(&self) -> StateStats {
        StateStats {
            entries: self.state.len() as u64,
            bytes: self.bytes.max(0) as u64,
            counters: millrace_storage::StateCounters {
                reads: self.reads,
                writes: 0,
            },
        }
    }

    fn step(&mut self, inputs: Vec<Changelog>) -> Result<Changelog> {
        let input = single_input(inputs, "topn")?;
        if input.is_empty() {
            return Ok(Changelog::empty(self.schema.clone()));
        }
        let sort_exprs: Vec<_> = self.order.iter().map(|s| s.expr.clone()).collect();
        let sort_cols = evaluate(&sort_exprs, &input.batch)?;
        let keys = if sort_cols.is_empty() {
            None
        } else {
            Some(self.sort_converter.convert_columns(&sort_cols)?)
        };
        let rows = self.rows.convert_columns(input.batch.columns())?;
        for i in 0..input.len() {
            let key: Box<[u8]> = match &keys {
                Some(k) => k.row(i).data().into(),
                None => Box::from(&[][..]),
            };
            let entry = (key, Box::<[u8]>::from(rows.row(i).data()));
            let entry_bytes = (entry.0.len() + entry.1.len()) as i64 + 48;
            let count = self.state.entry(entry.clone()).or_insert_with(|| {
                self.bytes += entry_bytes;
                0
            });
            *count += input.weights[i];
            if *count == 0 {
                self.state.remove(&entry);
                self.bytes -= entry_bytes;
            }
        }
        let mut new_top: HashMap<Box<[u8]>, i64> = HashMap::new();
        let mut position = 0usize;
        let end = self.skip.saturating_add(self.fetch);
        for ((_, row), &count) in &self.state {
            if position >= end {
                break;
            }
            self.reads += 1;
            let count = count.max(0) as usize;
            let start = position.max(self.skip);
            let stop = (position + count).min(end);
            if stop > start {
                *new_top.entry(row.clone()).or_insert(0) += (stop - start) as i64;
            }
            position += count;
        }
        let mut changes: Vec<(Box<[u8]>, i64)> = Vec::new();
        for (row, &count) in &new_top {
            let old = self.top.get(row).copied().unwrap_or(0);
            if count != old {
                changes.push((row.clone(), count - old));
            }
        }
        for (row, &old) in &self.top {
            if !new_top.contains_key(row) {
                changes.push((row.clone(), -old));
            }
        }
        self.top = new_top;
        if changes.is_empty() {
            return Ok(Changelog::empty(self.schema.clone()));
        }
        let parser = self.rows.parser();
        let columns = self
            .rows
            .convert_rows(changes.iter().map(|(r, _)| parser.parse(r)))?;
        let weights: Vec<i64> = changes.iter().map(|(_, w)| *w).collect();
        let batch = make_batch(&self.schema, columns, weights.len())?;
        Ok(Changelog::new(batch, weights))
    }
}
