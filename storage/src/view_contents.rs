//! The stored result of a materialized view: a multiset of rows in the columnar cache.
//!
//! The view runtime applies each epoch's output changelog (rows with signed weights) here;
//! SELECTs read cheap snapshots of the Arrow chunks, exactly like a table's. Rows are found
//! for deletion by a hash of their arrow-row encoding, which maps to the row ids holding
//! copies of it (a [`KeyIndex`]: about 20 bytes a row, which stay in memory for cold rows
//! too). The index holds no row, so evicted chunks free their memory: when two different
//! rows share a hash, the hash is marked mixed and its copies are told apart by reading them
//! (from memory or their cold file).

use std::collections::{HashMap, HashSet};

use arrow::array::{RecordBatch, UInt32Array, UInt64Array};
use arrow::datatypes::SchemaRef;
use arrow_row::{RowConverter, Rows, SortField};

use crate::columnar::ColumnarTable;
use crate::columnar::snapshot::TableSnapshot;
use crate::error::{Result, StorageError};
use crate::key_index::KeyIndex;
use crate::log_entry::LogEntry;
use crate::rows::{RowId, take_rows};

/// Encoded rows with their number of copies, as a checkpoint writes them (0: gone).
pub type RowCounts = Vec<(Box<[u8]>, i64)>;

/// Changed rows remembered for the next checkpoint before the contents are written in full
/// instead (at least; a quarter of the rows when that is more).
const DIRTY_LIMIT: usize = 1 << 16;

/// The maintained contents of one materialized view.
#[derive(Debug)]
pub struct ViewContents {
    table: ColumnarTable,
    converter: RowConverter,
    /// Hash of the encoded row to the ids of its copies.
    copies: KeyIndex,
    /// Hashes whose copies may hold different rows (a hash collision).
    mixed: HashSet<u64>,
    /// Net change of each row's number of copies since the last checkpoint (a version of a
    /// row that came and went in between nets to zero and is not written).
    dirty: HashMap<Box<[u8]>, i64>,
    /// Bytes of the rows in `dirty` (kept as it changes, for the cache's figures).
    dirty_bytes: usize,
    hasher: ahash::RandomState,
    /// Bits of the hash used (all; tests use few to force collisions).
    hash_mask: u64,
    /// Whether more rows changed than `dirty` may hold since the last checkpoint (checkpoints
    /// off, or far apart): they are no longer tracked and the next checkpoint writes all rows.
    dirty_overflow: bool,
    /// The least number of changed rows tracked (tests lower it).
    dirty_limit: usize,
}

impl ViewContents {
    /// Empty contents with the view's schema.
    pub fn try_new(schema: SchemaRef) -> Result<Self> {
        let converter = RowConverter::new(
            schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        Ok(Self {
            table: ColumnarTable::try_new(schema, None)?,
            converter,
            copies: KeyIndex::default(),
            mixed: HashSet::new(),
            dirty: HashMap::new(),
            dirty_bytes: 0,
            hasher: ahash::RandomState::with_seeds(0x6d69, 0x6c6c, 0x7261, 0x6365),
            hash_mask: u64::MAX,
            dirty_overflow: false,
            dirty_limit: DIRTY_LIMIT,
        })
    }

    fn forget_dirty(&mut self) {
        self.dirty.clear();
        self.dirty_bytes = 0;
    }

    fn hash(&self, row: &[u8]) -> u64 {
        self.hasher.hash_one(row) & self.hash_mask
    }

    /// The encoded rows with the given ids, in that order.
    fn encoded(&self, ids: &[RowId]) -> Result<Rows> {
        let batch = self.table.fetch(ids)?;
        Ok(self.converter.convert_columns(batch.columns())?)
    }

    /// The ids of the copies of the encoded row `row`.
    fn ids_of(&self, row: &[u8]) -> Result<Vec<RowId>> {
        let hash = self.hash(row);
        let ids: Vec<RowId> = self.copies.candidates(hash).collect();
        if !self.mixed.contains(&hash) {
            return Ok(ids);
        }
        let rows = self.encoded(&ids)?;
        Ok(ids
            .iter()
            .zip(rows.iter())
            .filter(|(_, r)| r.as_ref() == row)
            .map(|(id, _)| *id)
            .collect())
    }

    /// Rows whose number of copies changed since the last call, each with its count now
    /// (0: gone), for a checkpoint.
    pub fn take_dirty(&mut self) -> Result<RowCounts> {
        let dirty = std::mem::take(&mut self.dirty);
        self.dirty_bytes = 0;
        let mut out = Vec::with_capacity(dirty.len());
        for (k, delta) in dirty {
            if delta != 0 {
                let n = self.ids_of(&k)?.len() as i64;
                out.push((k, n));
            }
        }
        Ok(out)
    }

    /// Bytes of the changed rows remembered for the next checkpoint.
    pub fn dirty_bytes(&self) -> usize {
        self.dirty_bytes
    }

    /// Stops tracking changed rows until the next checkpoint, which then writes every row
    /// (for a view whose next checkpoint writes every row anyway).
    pub fn drop_dirty(&mut self) {
        self.forget_dirty();
        self.dirty_overflow = true;
    }

    /// Whether more rows changed since the last checkpoint than are tracked: the next one
    /// writes every row.
    pub fn overflowed(&self) -> bool {
        self.dirty_overflow
    }

    /// Every row with its number of copies (a full checkpoint); forgets what was dirty.
    pub fn all_counts(&mut self) -> Result<RowCounts> {
        self.forget_dirty();
        self.dirty_overflow = false;
        let mut counts: HashMap<Box<[u8]>, i64> = HashMap::new();
        for batch in self.table.snapshot()?.batches {
            let rows = self.converter.convert_columns(batch.columns())?;
            for row in rows.iter() {
                *counts.entry(row.as_ref().into()).or_default() += 1;
            }
        }
        Ok(counts.into_iter().collect())
    }

    /// Every row with its number of copies, a chunk's rows at a time (a full checkpoint,
    /// which writes them as they come; a cold chunk is read when its turn comes): a row
    /// with several copies comes once, with its first copy. Forgets what was dirty.
    pub fn for_each_count(&mut self, mut write: impl FnMut(RowCounts) -> Result<()>) -> Result<()> {
        self.forget_dirty();
        self.dirty_overflow = false;
        for part in self.table.log_parts()? {
            let LogEntry::Insert { row_ids, batch } = part.read()? else {
                continue;
            };
            let rows = self.converter.convert_columns(batch.columns())?;
            let mut counts = Vec::new();
            for (row, &id) in rows.iter().zip(row_ids.values()) {
                let copies = self.ids_of(row.as_ref())?;
                if copies.iter().min() == Some(&id) {
                    counts.push((row.as_ref().into(), copies.len() as i64));
                }
            }
            write(counts)?;
        }
        Ok(())
    }

    /// Loads checkpointed rows (encoded, with their counts): into empty contents, or a piece
    /// at a time into contents holding only the earlier pieces.
    pub fn restore(&mut self, rows: &[(Vec<u8>, i64)]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let parser = self.converter.parser();
        let columns = self
            .converter
            .convert_rows(rows.iter().map(|(k, _)| parser.parse(k)))?;
        let batch = RecordBatch::try_new(self.table.schema(), columns)?;
        let weights: Vec<i64> = rows.iter().map(|(_, n)| *n).collect();
        self.apply(&batch, &weights)?;
        self.forget_dirty();
        self.dirty_overflow = false;
        Ok(())
    }

    /// Number of rows (copies counted).
    pub fn num_rows(&self) -> usize {
        self.table.num_rows()
    }

    /// Approximate bytes held.
    pub fn memory_bytes(&self) -> usize {
        let index = self.copies.memory_bytes() + self.mixed.capacity() * 9;
        let dirty = self.dirty_bytes + self.dirty.len() * 40;
        self.table.memory_bytes() + index + dirty
    }

    /// A consistent snapshot for a scan.
    pub fn snapshot(&self) -> Result<TableSnapshot> {
        self.table.snapshot()
    }

    /// The rows as a columnar table (for cache figures and eviction; changes go through
    /// [`ViewContents::apply`]).
    pub fn table(&self) -> &ColumnarTable {
        &self.table
    }

    /// The rows as a columnar table, for evicting chunks.
    pub fn table_mut(&mut self) -> &mut ColumnarTable {
        &mut self.table
    }

    /// Applies a changelog: each row is added `weight` times (removed when negative).
    /// Removing a row that is not present is an error: it means the view diverged.
    pub fn apply(&mut self, batch: &RecordBatch, weights: &[i64]) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let rows = self.converter.convert_columns(batch.columns())?;
        let hashes: Vec<u64> = rows.iter().map(|r| self.hash(r.as_ref())).collect();
        let mut deletes = Vec::new();
        let mut picks: Vec<u32> = Vec::new();
        for (i, &w) in weights.iter().enumerate() {
            if w != 0 && !self.dirty_overflow {
                match self.dirty.get_mut(rows.row(i).as_ref()) {
                    Some(delta) => *delta += w,
                    None => {
                        self.dirty_bytes += rows.row(i).as_ref().len();
                        self.dirty.insert(rows.row(i).as_ref().into(), w);
                    }
                }
            }
            if w < 0 {
                let h = hashes[i];
                let count = (-w) as usize;
                // NOTE: copies of one row are interchangeable; only a mixed hash needs the
                // rows read to tell which are copies of this one.
                let ids: Vec<RowId> = if self.mixed.contains(&h) {
                    self.ids_of(rows.row(i).as_ref())?
                        .into_iter()
                        .take(count)
                        .collect()
                } else {
                    self.copies.candidates(h).take(count).collect()
                };
                if ids.len() < count {
                    return Err(missing_row(w));
                }
                for id in ids {
                    if !self.copies.remove(h, id) {
                        return Err(missing_row(w));
                    }
                    deletes.push(id);
                }
                if self.copies.candidates(h).next().is_none() {
                    self.mixed.remove(&h);
                }
            } else {
                for _ in 0..w {
                    picks.push(i as u32);
                }
            }
        }
        if self.dirty.len() > self.dirty_limit.max(self.copies.len() / 4) {
            self.forget_dirty();
            self.dirty_overflow = true;
        }
        if !deletes.is_empty() {
            self.table.apply(&LogEntry::Delete {
                row_ids: UInt64Array::from(deletes),
            })?;
        }
        if picks.is_empty() {
            return Ok(());
        }
        // A hash already held by other rows, or by another row of this batch, may be a
        // collision: compare with one copy and mark the entry mixed if they differ.
        let mut first_in_batch: HashMap<u64, usize> = HashMap::new();
        let mut to_compare: Vec<(usize, RowId)> = Vec::new();
        let mut mixed_now: Vec<u64> = Vec::new();
        for &p in &picks {
            let i = p as usize;
            let h = hashes[i];
            match first_in_batch.get(&h) {
                Some(&j) => {
                    if rows.row(j) != rows.row(i) {
                        mixed_now.push(h);
                    }
                }
                None => {
                    first_in_batch.insert(h, i);
                    if !self.mixed.contains(&h)
                        && let Some(id) = self.copies.candidates(h).next()
                    {
                        to_compare.push((i, id));
                    }
                }
            }
        }
        if !to_compare.is_empty() {
            let ids: Vec<RowId> = to_compare.iter().map(|(_, id)| *id).collect();
            let held = self.encoded(&ids)?;
            for ((i, _), other) in to_compare.iter().zip(held.iter()) {
                if rows.row(*i) != other {
                    mixed_now.push(hashes[*i]);
                }
            }
        }
        let batch = take_rows(batch, &UInt32Array::from(picks.clone()))?;
        let batch = RecordBatch::try_new_with_options(
            self.table.schema(),
            batch.columns().to_vec(),
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )?;
        let ids = self.table.allocate_row_ids(batch.num_rows());
        for (&row, &id) in picks.iter().zip(ids.values()) {
            self.copies.insert(hashes[row as usize], id);
        }
        self.mixed.extend(mixed_now);
        self.table.apply(&LogEntry::Insert {
            row_ids: ids,
            batch,
        })?;
        Ok(())
    }
}

fn missing_row(weight: i64) -> StorageError {
    StorageError::Corrupt {
        what: "view contents",
        detail: format!(
            "a change removes {} copies of a row the view does not hold",
            -weight
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn multiset_inserts_and_deletes() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut v = ViewContents::try_new(schema.clone()).unwrap();
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![Some(1), None, Some(1)]))],
        )
        .unwrap();
        v.apply(&b, &[2, 1, 1]).unwrap();
        assert_eq!(v.num_rows(), 4);
        v.apply(&b.slice(0, 1), &[-3]).unwrap();
        assert_eq!(v.num_rows(), 1);
        assert!(v.apply(&b.slice(0, 1), &[-1]).is_err());
    }

    #[test]
    fn checkpointed_rows_restore_the_same_multiset() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut v = ViewContents::try_new(schema.clone()).unwrap();
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![Some(1), None, Some(2)]))],
        )
        .unwrap();
        v.apply(&b, &[2, 1, 1]).unwrap();
        let all: Vec<(Vec<u8>, i64)> = v
            .all_counts()
            .unwrap()
            .into_iter()
            .map(|(k, n)| (k.to_vec(), n))
            .collect();
        assert!(v.take_dirty().unwrap().is_empty());
        v.apply(&b.slice(2, 1), &[-1]).unwrap();
        v.apply(&b.slice(1, 1), &[1]).unwrap();
        v.apply(&b.slice(1, 1), &[-1]).unwrap();
        let dirty = v.take_dirty().unwrap();
        assert_eq!(
            dirty.len(),
            1,
            "a row that came and went is not written: {dirty:?}"
        );
        assert_eq!(dirty[0].1, 0, "the row is gone");
        let mut w = ViewContents::try_new(schema).unwrap();
        w.restore(&all).unwrap();
        assert_eq!(w.num_rows(), 4);
        assert!(w.take_dirty().unwrap().is_empty());
    }

    #[test]
    fn colliding_hashes_keep_rows_apart() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut v = ViewContents::try_new(schema.clone()).unwrap();
        v.hash_mask = 0b11;
        let batch = |vals: Vec<i64>| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vals))]).unwrap()
        };
        let mut model: std::collections::BTreeMap<i64, i64> = Default::default();
        for round in 0..20i64 {
            let vals: Vec<i64> = (0..10).map(|i| (i * 7 + round) % 13).collect();
            let weights: Vec<i64> = (0..10).map(|i| 1 + (i + round) % 2).collect();
            v.apply(&batch(vals.clone()), &weights).unwrap();
            for (x, w) in vals.iter().zip(&weights) {
                *model.entry(*x).or_default() += w;
            }
            // Remove one copy of a few rows that are held.
            let held: Vec<i64> = model
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(x, _)| *x)
                .take(3)
                .collect();
            v.apply(&batch(held.clone()), &vec![-1; held.len()])
                .unwrap();
            for x in held {
                *model.entry(x).or_default() -= 1;
            }
        }
        let mut got = crate::test_util::first_i64s(&v.snapshot().unwrap().batches);
        got.sort();
        let want: Vec<i64> = model
            .iter()
            .flat_map(|(x, n)| std::iter::repeat_n(*x, *n as usize))
            .collect();
        assert_eq!(got, want);
        let held: usize = v.dirty.keys().map(|k| k.len()).sum();
        assert_eq!(v.dirty_bytes, held, "dirty bytes follow the changed rows");
        // Counts for a checkpoint tell the colliding rows apart too.
        let mut counts: Vec<(i64, i64)> = v
            .take_dirty()
            .unwrap()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| {
                let parser = v.converter.parser();
                let cols = v.converter.convert_rows([parser.parse(&k)]).unwrap();
                let x = cols[0]
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .value(0);
                (x, n)
            })
            .collect();
        counts.sort();
        let want: Vec<(i64, i64)> = model.into_iter().filter(|(_, n)| *n > 0).collect();
        assert_eq!(counts, want);
        // Removing a row that is not held is refused.
        assert!(v.apply(&batch(vec![99]), &[-1]).is_err());
    }

    #[test]
    fn too_many_changed_rows_make_the_next_checkpoint_full() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut v = ViewContents::try_new(schema.clone()).unwrap();
        v.dirty_limit = 4;
        let batch = |vals: Vec<i64>| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vals))]).unwrap()
        };
        v.apply(&batch(vec![1, 2, 3]), &[1, 1, 1]).unwrap();
        assert!(!v.overflowed());
        assert_eq!(v.take_dirty().unwrap().len(), 3);
        v.apply(&batch((10..20).collect()), &[1; 10]).unwrap();
        v.apply(&batch(vec![1]), &[-1]).unwrap();
        assert!(v.dirty.is_empty(), "changes beyond the limit are not kept");
        assert!(v.overflowed(), "the checkpoint replaces the rows");
        let mut rows = Vec::new();
        v.for_each_count(|part| {
            rows.extend(part);
            Ok(())
        })
        .unwrap();
        assert_eq!(rows.len(), 12, "every row held, none of the removed");
        assert!(rows.iter().all(|(_, n)| *n == 1));
        assert!(!v.overflowed());
        assert!(v.take_dirty().unwrap().is_empty(), "tracking resumes");
    }

    /// A full write comes a chunk at a time and names each distinct row once, with all its
    /// copies, as the whole count does.
    #[test]
    fn full_writes_count_each_row_once() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut v = ViewContents::try_new(schema.clone()).unwrap();
        let batch = |vals: Vec<i64>| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vals))]).unwrap()
        };
        v.apply(&batch(vec![1, 2, 2, 3]), &[1, 1, 1, 1]).unwrap();
        v.apply(&batch(vec![2, 3, 4]), &[1, 1, 1]).unwrap();
        v.apply(&batch(vec![3]), &[-1]).unwrap();
        let mut streamed = Vec::new();
        v.for_each_count(|part| {
            streamed.extend(part);
            Ok(())
        })
        .unwrap();
        let mut whole = v.all_counts().unwrap();
        streamed.sort();
        whole.sort();
        assert_eq!(streamed, whole);
        let counts: Vec<i64> = whole.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts.iter().sum::<i64>(), 6);
        assert_eq!(counts.len(), 4);
        assert!(counts.contains(&3), "row 2 has three copies");
    }
}
