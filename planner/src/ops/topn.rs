//! TopN: `ORDER BY ... LIMIT n [OFFSET m]`, maintained.
//!
//! State is every input row ordered by (sort key, row); the output is the rows at positions
//! m..m+n. After each epoch the new top is read from the front of the order (m+n entries)
//! and compared with the last emitted top, so deletes of rows in the top pull the next rows
//! up. Rows that tie on the sort key are ordered by their encoding, so the choice among
//! ties is deterministic (SQL leaves it unspecified).

use std::collections::{BTreeMap, HashMap, HashSet};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::RowConverter;
use datafusion::physical_expr::PhysicalSortExpr;

use super::codec::{Reader, Writer};
use super::{Operator, StateEntry, StateStats, evaluate, single_input};
use crate::changelog::{Changelog, loose, make_batch, row_converter, sort_converter};
use crate::error::{PlanError, Result};

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
    /// Entries changed since the last checkpoint, and whether the top changed.
    dirty: HashSet<OrderedRow>,
    top_dirty: bool,
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
            dirty: HashSet::new(),
            top_dirty: false,
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
            spilled_bytes: 0,
            counters: millrace_storage::StateCounters {
                reads: self.reads,
                ..Default::default()
            },
        }
    }

    fn checkpoint(&mut self) -> Result<Option<Vec<StateEntry>>> {
        let mut entries = Vec::with_capacity(self.dirty.len() + 1);
        for entry in self.dirty.drain() {
            let mut key = Writer::new();
            key.u64(0).bytes(&entry.0).bytes(&entry.1);
            let value = self.state.get(&entry).map(|n| n.to_le_bytes().to_vec());
            entries.push((key.finish(), value));
        }
        if self.top_dirty {
            let mut top = Writer::new();
            top.u64(self.top.len() as u64);
            for (row, n) in &self.top {
                top.bytes(row).i64(*n);
            }
            let mut key = Writer::new();
            key.u64(1);
            entries.push((key.finish(), Some(top.finish())));
            self.top_dirty = false;
        }
        Ok(Some(entries))
    }

    fn restore(&mut self, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        for (key, value) in entries {
            let mut k = Reader::new(&key);
            let mut v = Reader::new(&value);
            match k.u64()? {
                0 => {
                    let entry: OrderedRow = (k.bytes()?.into(), k.bytes()?.into());
                    self.bytes += (entry.0.len() + entry.1.len()) as i64 + 48;
                    self.state.insert(entry, v.i64()?);
                }
                1 => {
                    for _ in 0..v.u64()? {
                        let row: Box<[u8]> = v.bytes()?.into();
                        self.top.insert(row, v.i64()?);
                    }
                }
                other => {
                    return Err(PlanError::Internal(format!(
                        "unknown TopN state entry {other}"
                    )));
                }
            }
        }
        Ok(())
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
            self.dirty.insert(entry);
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
        self.top_dirty |= !changes.is_empty();
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

#[cfg(test)]
mod tests {
    use datafusion::arrow::compute::SortOptions;
    use datafusion::physical_expr::expressions::col;

    use super::*;
    use crate::test_util::{assert_changelog, changelog, raw_rows, schema, step};

    /// `SELECT id, v FROM t ORDER BY v DESC LIMIT fetch OFFSET skip`.
    fn topn(skip: usize, fetch: usize) -> TopNOp {
        let s = schema("id:i64 v:i64");
        let order = vec![PhysicalSortExpr {
            expr: col("v", &s).unwrap(),
            options: SortOptions {
                descending: true,
                nulls_first: false,
            },
        }];
        TopNOp::try_new(s, order, skip, fetch).unwrap()
    }

    fn feed(op: &mut TopNOp, text: &str) -> Changelog {
        step(op, changelog(&schema("id:i64 v:i64"), text))
    }

    /// Top 2 of v = 50, 40, 30, 20.
    fn seeded() -> TopNOp {
        let mut op = topn(0, 2);
        let out = feed(
            &mut op,
            "
            id v  | w
            1  30 | +1
            2  50 | +1
            3  20 | +1
            4  40 | +1
            ",
        );
        assert_changelog(&out, "id v | w\n 2 50 | +1\n 4 40 | +1");
        op
    }

    #[test]
    fn insert_into_the_top_pushes_the_last_row_out() {
        let mut op = seeded();
        let out = feed(&mut op, "id v | w\n 5 45 | +1");
        assert_changelog(&out, "id v | w\n 5 45 | +1\n 4 40 | -1");
        // Below the top: nothing.
        let out = feed(&mut op, "id v | w\n 6 10 | +1");
        assert!(out.is_empty(), "{:?}", raw_rows(&out));
    }

    #[test]
    fn delete_of_a_top_row_pulls_the_next_one_up() {
        let mut op = seeded();
        let out = feed(&mut op, "id v | w\n 2 50 | -1");
        assert_changelog(&out, "id v | w\n 2 50 | -1\n 1 30 | +1");
        // A delete below the top changes nothing.
        let out = feed(&mut op, "id v | w\n 3 20 | -1");
        assert!(out.is_empty(), "{:?}", raw_rows(&out));
    }

    #[test]
    fn update_moves_a_row_into_and_out_of_the_top() {
        let mut op = seeded();
        let out = feed(&mut op, "id v | w\n 3 20 | -1\n 3 60 | +1");
        assert_changelog(&out, "id v | w\n 3 60 | +1\n 4 40 | -1");
        let out = feed(&mut op, "id v | w\n 3 60 | -1\n 3 5 | +1");
        assert_changelog(&out, "id v | w\n 3 60 | -1\n 4 40 | +1");
        // An update within the top.
        let out = feed(&mut op, "id v | w\n 4 40 | -1\n 4 55 | +1");
        assert_changelog(&out, "id v | w\n 4 40 | -1\n 4 55 | +1");
    }

    #[test]
    fn row_whose_weight_goes_to_zero_in_one_epoch_emits_nothing() {
        let mut op = seeded();
        let out = feed(&mut op, "id v | w\n 7 99 | +1\n 7 99 | -1");
        assert!(out.is_empty(), "{:?}", raw_rows(&out));
        assert_eq!(op.state().entries, 4);
        // It left no trace: deleting a top row pulls up 30, not 99.
        let out = feed(&mut op, "id v | w\n 4 40 | -1");
        assert_changelog(&out, "id v | w\n 4 40 | -1\n 1 30 | +1");
    }

    #[test]
    fn deleting_every_row_retracts_the_top() {
        let mut op = seeded();
        let out = feed(
            &mut op,
            "id v | w\n 1 30 | -1\n 2 50 | -1\n 3 20 | -1\n 4 40 | -1",
        );
        assert_changelog(&out, "id v | w\n 2 50 | -1\n 4 40 | -1");
        assert_eq!(op.state().entries, 0);
    }

    #[test]
    fn empty_epoch_emits_nothing() {
        let mut op = seeded();
        let out = feed(&mut op, "id v | w");
        assert!(out.is_empty(), "{:?}", raw_rows(&out));
    }

    #[test]
    fn copies_fill_several_places() {
        let mut op = topn(0, 2);
        let out = feed(&mut op, "id v | w\n 1 50 | +2\n 2 40 | +1");
        assert_changelog(&out, "id v | w\n 1 50 | +2");
        let out = feed(&mut op, "id v | w\n 1 50 | -1");
        assert_changelog(&out, "id v | w\n 1 50 | -1\n 2 40 | +1");
    }

    #[test]
    fn offset_skips_the_first_rows() {
        let mut op = topn(1, 2);
        let out = feed(
            &mut op,
            "id v | w\n 1 30 | +1\n 2 50 | +1\n 3 20 | +1\n 4 40 | +1",
        );
        assert_changelog(&out, "id v | w\n 4 40 | +1\n 1 30 | +1");
        // The first row goes: every later row moves up one place.
        let out = feed(&mut op, "id v | w\n 2 50 | -1");
        assert_changelog(&out, "id v | w\n 4 40 | -1\n 3 20 | +1");
    }
}
