//! Ranking window functions (ROW_NUMBER, RANK, DENSE_RANK) over PARTITION BY ... ORDER BY,
//! maintained per partition; with a filter on the rank above, this is "top n per group".
//!
//! State per partition is its rows ordered by (sort key, row). When an epoch changes a
//! partition, that partition's numbering before and after is compared and only rows whose
//! number changed are emitted. Work is proportional to the partitions touched, never to
//! the whole input.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, UInt64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::physical_expr::PhysicalSortExpr;
use datafusion::physical_plan::PhysicalExpr;
use millrace_storage::{StateLocation, StateStore, TieredState};

use super::codec::{Reader, Writer};

use super::held::{Held, Holding, add_counters};
use super::{Operator, StateControl, StateStats, evaluate, single_input};
use crate::changelog::{Changelog, loose, make_batch, row_converter, sort_converter};
use crate::error::Result;

/// A ranking function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rank {
    /// ROW_NUMBER(): 1, 2, 3 ... (ties broken by row encoding).
    RowNumber,
    /// RANK(): ties share a number, then a gap.
    Rank,
    /// DENSE_RANK(): ties share a number, no gap.
    DenseRank,
}

type Partition = BTreeMap<(Box<[u8]>, Box<[u8]>), i64>;

/// A row of the output (encoded input row, its numbers) and its weight.
type RowChange = (Box<[u8]>, Vec<u64>, i64);

/// Bytes an entry of a partition costs beyond its sort key and row: its share of B-tree
/// nodes and the two allocations' rounding (measured, see `tests/state_bytes.rs`).
const ENTRY_OVERHEAD: i64 = 130;

/// The maintained ranking window.
#[derive(Debug)]
pub struct WindowOp {
    schema: SchemaRef,
    input_schema: SchemaRef,
    partition_by: Vec<Arc<dyn PhysicalExpr>>,
    order: Vec<PhysicalSortExpr>,
    functions: Vec<Rank>,
    partition_converter: RowConverter,
    sort_converter: RowConverter,
    rows: RowConverter,
    partitions: Box<dyn StateStore<Partition>>,
    /// Partitions held back during a large epoch, and their deltas: a partition changed by
    /// every step of an epoch would be renumbered, and its renumbered rows emitted, after
    /// each (O(partition) per step); held, all its changes go to its delta, and it is
    /// renumbered once, when released.
    held: Held<Partition>,
    /// Approximate bytes in memory, and evicted to the warm tier.
    bytes: i64,
    spilled: i64,
}

impl WindowOp {
    /// Input columns followed by one column per function.
    pub fn try_new(
        schema: SchemaRef,
        input_schema: SchemaRef,
        partition_by: Vec<Arc<dyn PhysicalExpr>>,
        order: Vec<PhysicalSortExpr>,
        functions: Vec<Rank>,
    ) -> Result<Self> {
        let input_schema = loose(&input_schema);
        let partition_converter = RowConverter::new(
            partition_by
                .iter()
                .map(|e| Ok(SortField::new(e.data_type(&input_schema)?)))
                .collect::<Result<_>>()?,
        )?;
        let sort_converter = sort_converter(&order, &input_schema)?;
        Ok(Self {
            schema: loose(&schema),
            rows: row_converter(&input_schema)?,
            input_schema,
            partition_by,
            order,
            functions,
            partition_converter,
            sort_converter,
            partitions: Box::new(TieredState::default()),
            held: Held::default(),
            bytes: 0,
            spilled: 0,
        })
    }

    /// Brings the partition under `key` back from the warm tier if it was evicted.
    fn fault_in(&mut self, key: &[u8]) -> Result<()> {
        if let Some(value) = self.partitions.fetch(key)? {
            let partition = decode_partition(&value)?;
            let size = partition_size(key, &partition);
            self.bytes += size;
            self.spilled = (self.spilled - size).max(0);
            self.partitions.restore(key.into(), partition);
        }
        Ok(())
    }

    /// Adds `delta` to the partition under `key` (in memory, or none yet), and to
    /// `changes` the rows whose numbers that changes; drops the partition if it empties.
    fn change_partition(&mut self, key: &[u8], delta: Partition, changes: &mut Vec<RowChange>) {
        let read = match self.partitions.get(key) {
            Some(p) => {
                renumber(&self.functions, p, &delta, changes);
                p.len() as u64
            }
            None => {
                renumber(&self.functions, &Partition::new(), &delta, changes);
                0
            }
        };
        self.partitions.count_reads(read);
        let partition = self.partitions.get_or_insert_with(key, &mut Partition::new);
        for (entry, weight) in delta {
            add_entry(partition, entry, weight, &mut self.bytes);
        }
        if partition.is_empty() {
            self.partitions.remove(key);
        }
    }

    /// Applies an epoch's input rows to their partitions, adding the rows whose numbers
    /// changed to `changes`; while holding, to the partitions' deltas (the partitions are
    /// renumbered when released).
    fn apply(&mut self, input: &Changelog, changes: &mut Vec<RowChange>) -> Result<()> {
        let n = input.len();
        let part_cols = evaluate(&self.partition_by, &input.batch)?;
        let part_keys = if part_cols.is_empty() {
            None
        } else {
            Some(self.partition_converter.convert_columns(&part_cols)?)
        };
        let sort_exprs: Vec<_> = self.order.iter().map(|s| s.expr.clone()).collect();
        let sort_cols = evaluate(&sort_exprs, &input.batch)?;
        let sort_keys = if sort_cols.is_empty() {
            None
        } else {
            Some(self.sort_converter.convert_columns(&sort_cols)?)
        };
        let rows = self.rows.convert_columns(input.batch.columns())?;
        let mut by_partition: Vec<(Box<[u8]>, Vec<usize>)> = Vec::new();
        let mut index: HashMap<Box<[u8]>, usize> = HashMap::new();
        for i in 0..n {
            let key: Box<[u8]> = match &part_keys {
                Some(k) => k.row(i).data().into(),
                None => Box::from(&[][..]),
            };
            let slot = *index.entry(key.clone()).or_insert_with(|| {
                by_partition.push((key, Vec::new()));
                by_partition.len() - 1
            });
            by_partition[slot].1.push(i);
        }
        let holding = self.held.holding != Holding::Off;
        for (key, members) in by_partition {
            // NOTE: the step's own delta is not counted: it is merged before the step ends.
            let mut own = (Partition::new(), 0);
            let delta = match holding {
                true => {
                    self.held
                        .delta(&key, &mut Partition::new, &partition_size, &mut self.bytes)
                }
                false => &mut own.0,
            };
            let bytes = match holding {
                true => &mut self.bytes,
                false => &mut own.1,
            };
            for i in members {
                let sort: Box<[u8]> = match &sort_keys {
                    Some(k) => k.row(i).data().into(),
                    None => Box::from(&[][..]),
                };
                let entry = (sort, Box::<[u8]>::from(rows.row(i).data()));
                add_entry(delta, entry, input.weights[i], bytes);
            }
            if holding {
                self.held.push([key]);
            } else {
                self.fault_in(&key)?;
                self.change_partition(&key, own.0, changes);
            }
        }
        Ok(())
    }

    /// While releasing, renumbers held partitions of about the release budget's bytes,
    /// each with its deltas merged, adding the rows whose numbers changed to `changes`.
    fn release(&mut self, changes: &mut Vec<RowChange>) -> Result<()> {
        let mut bytes = 0usize;
        let mut released = false;
        while self.held.releases_more(bytes) {
            let Some(key) = self.held.pop() else {
                break;
            };
            released = true;
            self.fault_in(&key)?;
            let decode = |piece: &[u8], encoded: &[u8]| {
                let delta = decode_partition(encoded)?;
                let size = partition_size(piece, &delta);
                Ok((delta, size))
            };
            let pieces = self.held.take_pieces(
                &key,
                &decode,
                &partition_size,
                &mut self.bytes,
                &mut self.spilled,
            )?;
            // NOTE: the merged pieces are not counted: they were, and they go at once.
            let mut delta = Partition::new();
            for piece in pieces {
                for (entry, weight) in piece {
                    add_entry(&mut delta, entry, weight, &mut 0);
                }
            }
            self.change_partition(&key, delta, changes);
            if let Some(partition) = self.partitions.get(&key) {
                bytes += partition_size(&key, partition).max(1) as usize;
            }
        }
        if released && self.held.len() == 0 {
            self.held
                .finish(&mut |partition: &mut Partition| Ok(encode_partition(partition)))?;
        }
        Ok(())
    }
}

/// Adds `weight` copies of `entry` to `partition` (or to a delta), counting its bytes in
/// `bytes` while it is there.
fn add_entry(
    partition: &mut Partition,
    entry: (Box<[u8]>, Box<[u8]>),
    weight: i64,
    bytes: &mut i64,
) {
    let entry_bytes = (entry.0.len() + entry.1.len()) as i64 + ENTRY_OVERHEAD;
    let count = partition.entry(entry.clone()).or_insert_with(|| {
        *bytes += entry_bytes;
        0
    });
    *count += weight;
    if *count == 0 {
        partition.remove(&entry);
        *bytes -= entry_bytes;
    }
}

impl Operator for WindowOp {
    fn describe(&self) -> String {
        let parts: Vec<String> = self.partition_by.iter().map(|e| e.to_string()).collect();
        let order: Vec<String> = self.order.iter().map(|s| s.to_string()).collect();
        format!(
            "Window: {:?} partition=[{}] order=[{}]",
            self.functions,
            parts.join(", "),
            order.join(", ")
        )
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn state(&self) -> StateStats {
        let (pieces, delta) = self.held.stats();
        StateStats {
            entries: self.partitions.len() as u64 + pieces,
            bytes: self.bytes.max(0) as u64 + self.held.key_bytes() as u64,
            spilled_bytes: self.spilled.max(0) as u64,
            counters: add_counters(self.partitions.counters(), delta),
        }
    }

    fn checkpoint(&mut self) -> Result<Option<Vec<crate::ops::StateEntry>>> {
        let mut entries = Vec::new();
        for key in self.partitions.take_dirty() {
            let value = self.partitions.peek(&key).map(encode_partition);
            entries.push((key.to_vec(), value));
        }
        Ok(Some(entries))
    }

    fn restore(&mut self, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        for (key, value) in entries {
            let partition = decode_partition(&value)?;
            self.bytes += partition_size(&key, &partition);
            self.partitions.restore(key.into(), partition);
        }
        Ok(())
    }

    fn attach(&mut self, location: &StateLocation) {
        self.partitions.attach(location.clone());
        self.held.attach(location);
    }

    fn control(&mut self, control: StateControl) -> Result<u64> {
        match control {
            StateControl::RestoreLazily => Ok(u64::from(self.partitions.restore_lazily())),
            StateControl::Evict(fraction) => {
                let mut encode = |partition: &mut Partition| Ok(encode_partition(partition));
                let freed = self
                    .partitions
                    .evict(fraction, &mut encode, &partition_size)?
                    + self.held.evict(fraction, &mut encode, &partition_size)?;
                self.bytes -= freed;
                self.spilled += freed;
                Ok(freed.max(0) as u64)
            }
            StateControl::Committed => {
                self.partitions.committed();
                Ok(0)
            }
            StateControl::FlushChanges(min) => Ok(self
                .partitions
                .flush_changes(min, &mut |partition: &mut Partition| {
                    Ok(encode_partition(partition))
                })?),
            StateControl::Hold | StateControl::Release(_) | StateControl::Held => {
                Ok(self.held.control(control, true))
            }
        }
    }

    fn step(&mut self, inputs: Vec<Changelog>) -> Result<Changelog> {
        let input = single_input(inputs, "window")?;
        let mut changes: Vec<RowChange> = Vec::new();
        if !input.is_empty() {
            self.apply(&input, &mut changes)?;
        }
        self.release(&mut changes)?;
        if changes.is_empty() {
            return Ok(Changelog::empty(self.schema.clone()));
        }
        let parser = self.rows.parser();
        let mut columns: Vec<ArrayRef> = self
            .rows
            .convert_rows(changes.iter().map(|(r, _, _)| parser.parse(r)))?;
        let base = self.input_schema.fields().len();
        for f in 0..self.functions.len() {
            let values: ArrayRef = Arc::new(UInt64Array::from(
                changes.iter().map(|c| c.1[f]).collect::<Vec<_>>(),
            ));
            columns.push(cast(&values, self.schema.field(base + f).data_type())?);
        }
        let weights: Vec<i64> = changes.iter().map(|c| c.2).collect();
        let batch = make_batch(&self.schema, columns, weights.len())?;
        Ok(Changelog::new(batch, weights))
    }
}

/// The numbers of consecutive copies of rows as a partition is walked in order.
#[derive(Default)]
struct Numberer {
    position: u64,
    rank: u64,
    dense: u64,
    last_key: Option<Box<[u8]>>,
}

impl Numberer {
    fn next(&mut self, functions: &[Rank], sort_key: &[u8]) -> Vec<u64> {
        self.position += 1;
        if self.last_key.as_deref() != Some(sort_key) {
            self.rank = self.position;
            self.dense += 1;
            self.last_key = Some(sort_key.into());
        }
        functions
            .iter()
            .map(|f| match f {
                Rank::RowNumber => self.position,
                Rank::Rank => self.rank,
                Rank::DenseRank => self.dense,
            })
            .collect()
    }
}

/// Adds to `changes` the rows of `partition` whose numbers change when `delta` (signed
/// counts) is added to it, walking both in order once: the numbering before and after is
/// never held whole (two copies of a large partition's rows were).
fn renumber(
    functions: &[Rank],
    partition: &Partition,
    delta: &Partition,
    changes: &mut Vec<RowChange>,
) {
    let (mut old, mut new) = (Numberer::default(), Numberer::default());
    let mut base = partition.iter().peekable();
    let mut change = delta.iter().peekable();
    loop {
        let (entry, before, weight) = match (base.peek().copied(), change.peek().copied()) {
            (None, None) => break,
            (Some((e, &c)), None) => {
                base.next();
                (e, c, 0)
            }
            (None, Some((e, &w))) => {
                change.next();
                (e, 0, w)
            }
            (Some((a, &c)), Some((b, &w))) => match a.cmp(b) {
                std::cmp::Ordering::Less => {
                    base.next();
                    (a, c, 0)
                }
                std::cmp::Ordering::Greater => {
                    change.next();
                    (b, 0, w)
                }
                std::cmp::Ordering::Equal => {
                    base.next();
                    change.next();
                    (a, c, w)
                }
            },
        };
        let (sort_key, row) = entry;
        let olds: Vec<Vec<u64>> = (0..before.max(0))
            .map(|_| old.next(functions, sort_key))
            .collect();
        let news: Vec<Vec<u64>> = (0..(before + weight).max(0))
            .map(|_| new.next(functions, sort_key))
            .collect();
        if olds == news {
            continue;
        }
        // The row's copies' numbers before and after, as a multiset change.
        let mut diff: Vec<(Vec<u64>, i64)> = Vec::new();
        for (numbers, w) in olds
            .into_iter()
            .map(|n| (n, -1))
            .chain(news.into_iter().map(|n| (n, 1)))
        {
            match diff.iter_mut().find(|(n, _)| *n == numbers) {
                Some((_, total)) => *total += w,
                None => diff.push((numbers, w)),
            }
        }
        for (numbers, w) in diff {
            if w != 0 {
                changes.push((row.clone(), numbers, w));
            }
        }
    }
}

/// A partition as checkpoints and the warm tier hold it: its (sort key, row) entries with
/// their counts.
fn encode_partition(partition: &Partition) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(partition.len() as u64);
    for ((sort_key, row), n) in partition {
        w.bytes(sort_key).bytes(row).i64(*n);
    }
    w.finish()
}

fn decode_partition(value: &[u8]) -> Result<Partition> {
    let mut r = Reader::new(value);
    let mut partition = Partition::new();
    for _ in 0..r.u64()? {
        let sort_key: Box<[u8]> = r.bytes()?.into();
        let row: Box<[u8]> = r.bytes()?.into();
        partition.insert((sort_key, row), r.i64()?);
    }
    Ok(partition)
}

/// The bytes a partition accounts for in the window's state figure.
fn partition_size(_key: &[u8], partition: &Partition) -> i64 {
    partition
        .keys()
        .map(|(sort_key, row)| (sort_key.len() + row.len()) as i64 + ENTRY_OVERHEAD)
        .sum()
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::compute::SortOptions;
    use datafusion::physical_expr::expressions::col;

    use super::*;
    use crate::test_util::{assert_changelog, changelog, held_epoch, raw_rows, schema, step};

    fn input() -> SchemaRef {
        schema("p:utf8 id:i64 v:i64")
    }

    /// `SELECT *, row_number() rn, rank() rk, dense_rank() dr OVER (PARTITION BY p ORDER
    /// BY v)`.
    fn window() -> WindowOp {
        let s = input();
        let order = vec![PhysicalSortExpr {
            expr: col("v", &s).unwrap(),
            options: SortOptions::default(),
        }];
        WindowOp::try_new(
            schema("p:utf8 id:i64 v:i64 rn:u64 rk:u64 dr:u64"),
            s.clone(),
            vec![col("p", &s).unwrap()],
            order,
            vec![Rank::RowNumber, Rank::Rank, Rank::DenseRank],
        )
        .unwrap()
    }

    fn feed(op: &mut WindowOp, text: &str) -> Changelog {
        step(op, changelog(&input(), text))
    }

    /// Partition a: v 10, 20, 20 (ids 2 and 3 tie), 30; partition b: v 5.
    fn seeded() -> WindowOp {
        let mut op = window();
        let out = feed(
            &mut op,
            "
            p id v  | w
            a 1  10 | +1
            a 2  20 | +1
            a 3  20 | +1
            a 4  30 | +1
            b 5  5  | +1
            ",
        );
        assert_changelog(
            &out,
            "
            p id v  rn rk dr | w
            a 1  10 1  1  1  | +1
            a 2  20 2  2  2  | +1
            a 3  20 3  2  2  | +1
            a 4  30 4  4  3  | +1
            b 5  5  1  1  1  | +1
            ",
        );
        op
    }

    /// A large epoch held (`StateControl::Hold`): each touched partition is renumbered once,
    /// when released, with the epoch's net change, whether its changes stayed in memory or
    /// went to deltas while the partitions were evicted between steps.
    #[test]
    fn a_held_epoch_renumbers_each_partition_once_with_its_net_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(millrace_storage::Store::open(dir.path()).unwrap());
        let tier = millrace_storage::StateTier::new(store, 7, true);
        let seed =
            "p id v | w\n a 1 10 | +1\n a 2 20 | +1\n a 3 20 | +1\n a 4 30 | +1\n b 5 5 | +1";
        let steps = [
            "p id v | w\n a 6 15 | +1\n b 7 1 | +1",
            "p id v | w\n a 1 10 | -1\n a 8 40 | +1\n c 9 3 | +1",
            "p id v | w\n a 6 15 | -1\n b 5 5 | -1",
        ];
        let mut released = Vec::new();
        for evicting in [false, true] {
            let mut op = window();
            if evicting {
                op.attach(&tier.location(0, 0));
            }
            assert_eq!(feed(&mut op, seed).len(), 5);
            let (out, fetched) = held_epoch(&mut op, &input(), &steps, evicting);
            // Changes to evicted partitions went to deltas: nothing was read back.
            assert_eq!(fetched, 0);
            if evicting {
                // Partitions a and b once each, and one delta piece per partition and
                // step that changed it (a 3, b 2, c 1).
                assert_eq!(op.state().counters.fetched, 2 + 6);
            }
            released.push(out);
        }
        let mut op = seeded();
        let net = "p id v | w\n a 1 10 | -1\n a 8 40 | +1\n b 5 5 | -1\n b 7 1 | +1\n c 9 3 | +1";
        let mut want = raw_rows(&feed(&mut op, net));
        want.sort();
        assert!(want.len() >= 8, "{want:?}");
        assert_eq!(released[0], want, "held in memory");
        assert_eq!(released[1], want, "held with deltas of evicted partitions");
    }

    #[test]
    fn insert_at_the_end_emits_only_the_new_row() {
        let mut op = seeded();
        let out = feed(&mut op, "p id v | w\n a 6 40 | +1");
        assert_changelog(&out, "p id v rn rk dr | w\n a 6 40 5 5 4 | +1");
    }

    #[test]
    fn delete_of_the_first_row_renumbers_the_rest_of_its_partition() {
        let mut op = seeded();
        let out = feed(&mut op, "p id v | w\n a 1 10 | -1");
        assert_changelog(
            &out,
            "
            p id v  rn rk dr | w
            a 1  10 1  1  1  | -1
            a 2  20 2  2  2  | -1
            a 2  20 1  1  1  | +1
            a 3  20 3  2  2  | -1
            a 3  20 2  1  1  | +1
            a 4  30 4  4  3  | -1
            a 4  30 3  3  2  | +1
            ",
        );
    }

    #[test]
    fn a_tie_moves_rank_but_not_row_number() {
        let mut op = seeded();
        // A third row ties at 20, after ids 2 and 3 by its encoding: 30 loses one rank.
        let out = feed(&mut op, "p id v | w\n a 7 20 | +1");
        assert_changelog(
            &out,
            "
            p id v  rn rk dr | w
            a 7  20 4  2  2  | +1
            a 4  30 4  4  3  | -1
            a 4  30 5  5  3  | +1
            ",
        );
    }

    #[test]
    fn update_moves_a_row_between_partitions() {
        let mut op = seeded();
        let out = feed(&mut op, "p id v | w\n a 2 20 | -1\n b 2 1 | +1");
        assert_changelog(
            &out,
            "
            p id v  rn rk dr | w
            a 2  20 2  2  2  | -1
            a 3  20 3  2  2  | -1
            a 3  20 2  2  2  | +1
            a 4  30 4  4  3  | -1
            a 4  30 3  3  3  | +1
            b 2  1  1  1  1  | +1
            b 5  5  1  1  1  | -1
            b 5  5  2  2  2  | +1
            ",
        );
    }

    #[test]
    fn partition_whose_rows_go_to_zero_is_retracted() {
        let mut op = seeded();
        let out = feed(&mut op, "p id v | w\n b 5 5 | -1");
        assert_changelog(&out, "p id v rn rk dr | w\n b 5 5 1 1 1 | -1");
        assert_eq!(op.state().entries, 1, "partition b is gone");
        let out = feed(&mut op, "p id v | w\n b 8 50 | +1");
        assert_changelog(&out, "p id v rn rk dr | w\n b 8 50 1 1 1 | +1");
    }

    #[test]
    fn insert_and_delete_in_one_epoch_emit_nothing() {
        let mut op = seeded();
        let out = feed(
            &mut op,
            "p id v | w\n a 9 1 | +1\n a 9 1 | -1\n c 9 1 | +1\n c 9 1 | -1",
        );
        assert!(out.is_empty(), "{:?}", raw_rows(&out));
        assert_eq!(op.state().entries, 2, "partition c was not kept");
    }

    #[test]
    fn copies_take_consecutive_numbers() {
        let mut op = window();
        let out = feed(&mut op, "p id v | w\n a 1 10 | +2\n a 2 20 | +1");
        assert_changelog(
            &out,
            "
            p id v  rn rk dr | w
            a 1  10 1  1  1  | +1
            a 1  10 2  1  1  | +1
            a 2  20 3  3  2  | +1
            ",
        );
        let out = feed(&mut op, "p id v | w\n a 1 10 | -1");
        assert_changelog(
            &out,
            "
            p id v  rn rk dr | w
            a 1  10 2  1  1  | -1
            a 2  20 3  3  2  | -1
            a 2  20 2  2  2  | +1
            ",
        );
    }

    #[test]
    fn empty_epoch_emits_nothing() {
        let mut op = seeded();
        let out = feed(&mut op, "p id v | w");
        assert!(out.is_empty(), "{:?}", raw_rows(&out));
    }
}
