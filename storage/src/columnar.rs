//! The in-memory columnar copy of a table: Arrow chunks plus a row-id index.
//!
//! It is a cache of the durable table log (the log in RocksDB is the source of truth): DML
//! applies the same [`LogEntry`]s here after they are committed, and scans take a cheap
//! [`TableSnapshot`] of Arc'd batches. A unique index on the primary key answers point lookups
//! and enforces uniqueness.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt64Array};
use arrow::compute::{concat_batches, filter, filter_record_batch, interleave};
use arrow::datatypes::SchemaRef;
use arrow_row::{RowConverter, SortField};

use crate::error::{Result, StorageError};
use crate::index::SecondaryIndex;
use crate::log_entry::LogEntry;

/// Identifier of a row inside one table; never reused.
pub type RowId = u64;

/// Chunks smaller than this are merged with their small neighbours.
const SMALL_CHUNK_ROWS: usize = 4096;
/// How many small chunks may pile up before they are merged.
const MAX_SMALL_CHUNKS: usize = 16;

/// A consistent, immutable view of a table's live rows.
#[derive(Debug, Clone)]
pub struct TableSnapshot {
    /// The table schema.
    pub schema: SchemaRef,
    /// Live rows, chunk by chunk.
    pub batches: Vec<RecordBatch>,
    /// Row ids aligned with `batches`.
    pub row_ids: Vec<UInt64Array>,
}

impl TableSnapshot {
    /// Total number of live rows.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

#[derive(Debug)]
struct Chunk {
    /// Rows as appended (including rows deleted since).
    batch: RecordBatch,
    /// Row ids aligned with `batch`.
    row_ids: UInt64Array,
    /// Liveness of each row of `batch`.
    live: Vec<bool>,
    /// Number of `true` entries in `live`.
    live_count: usize,
    /// Live rows and their ids, computed on first read after a change.
    visible: OnceLock<(RecordBatch, UInt64Array)>,
}

impl Chunk {
    fn visible(&self) -> Result<&(RecordBatch, UInt64Array)> {
        if let Some(v) = self.visible.get() {
            return Ok(v);
        }
        let computed = if self.live_count == self.batch.num_rows() {
            (self.batch.clone(), self.row_ids.clone())
        } else {
            let mask = BooleanArray::from(self.live.clone());
            let batch = filter_record_batch(&self.batch, &mask)?;
            let ids = filter(&self.row_ids, &mask)?;
            let ids = ids
                .as_any()
                .downcast_ref::<UInt64Array>()
                .ok_or_else(|| corrupt("row ids"))?
                .clone();
            (batch, ids)
        };
        Ok(self.visible.get_or_init(|| computed))
    }
}

/// The columnar cache of one table.
#[derive(Debug)]
pub struct ColumnarTable {
    /// Current schema of the table.
    schema: SchemaRef,
    /// Chunks by chunk id (ids only grow, so removing a chunk moves nothing).
    chunks: BTreeMap<u64, Chunk>,
    /// Where each live row sits: (chunk id, row within the chunk).
    locations: HashMap<RowId, (u64, usize)>,
    /// Next chunk id.
    next_chunk: u64,
    /// Next row id to hand out.
    next_row_id: RowId,
    /// Primary-key columns, if the table has a primary key.
    primary_key: Option<Vec<usize>>,
    /// Encoder of primary-key values into comparable bytes.
    key_converter: Option<RowConverter>,
    /// Primary-key bytes to the row holding them.
    key_index: HashMap<Box<[u8]>, RowId>,
    /// Secondary indexes (CREATE INDEX).
    indexes: Vec<SecondaryIndex>,
}

impl ColumnarTable {
    /// An empty table with the given schema and optional primary-key columns.
    pub fn try_new(schema: SchemaRef, primary_key: Option<Vec<usize>>) -> Result<Self> {
        let key_converter = match &primary_key {
            Some(cols) => Some(RowConverter::new(
                cols.iter()
                    .map(|&i| SortField::new(schema.field(i).data_type().clone()))
                    .collect(),
            )?),
            None => None,
        };
        Ok(Self {
            schema,
            chunks: BTreeMap::new(),
            locations: HashMap::new(),
            next_chunk: 0,
            next_row_id: 1,
            primary_key,
            key_converter,
            key_index: HashMap::new(),
            indexes: Vec::new(),
        })
    }

    /// The table schema.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Primary-key column indices.
    pub fn primary_key(&self) -> Option<&[usize]> {
        self.primary_key.as_deref()
    }

    /// Number of live rows.
    pub fn num_rows(&self) -> usize {
        self.locations.len()
    }

    /// Builds a secondary index over the current rows.
    pub fn add_index(&mut self, name: &str, columns: Vec<usize>) -> Result<()> {
        let mut index = SecondaryIndex::try_new(name, columns, &self.schema)?;
        for chunk in self.chunks.values() {
            let (batch, ids) = chunk.visible()?;
            index.insert(batch, ids.values())?;
        }
        self.indexes.retain(|i| i.name != name);
        self.indexes.push(index);
        Ok(())
    }

    /// Drops a secondary index.
    pub fn drop_index(&mut self, name: &str) {
        self.indexes.retain(|i| i.name != name);
    }

    /// The secondary indexes.
    pub fn indexes(&self) -> &[SecondaryIndex] {
        &self.indexes
    }

    /// Whether a live row has this id.
    pub fn contains(&self, id: RowId) -> bool {
        self.locations.contains_key(&id)
    }

    /// Approximate bytes held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.chunks
            .values()
            .map(|c| c.batch.get_array_memory_size() + c.row_ids.get_array_memory_size())
            .sum()
    }

    /// Hands out `n` fresh row ids.
    pub fn allocate_row_ids(&mut self, n: usize) -> UInt64Array {
        let start = self.next_row_id;
        self.next_row_id += n as u64;
        UInt64Array::from((start..start + n as u64).collect::<Vec<_>>())
    }

    /// Applies a committed log entry.
    pub fn apply(&mut self, entry: &LogEntry) -> Result<()> {
        match entry {
            LogEntry::Insert { row_ids, batch } => self.insert(row_ids, batch),
            LogEntry::Delete { row_ids } => {
                self.delete(row_ids.values());
                Ok(())
            }
        }
    }

    fn insert(&mut self, row_ids: &UInt64Array, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = self.conform(batch)?;
        let keys = self.encode_keys(&batch)?;
        for index in &mut self.indexes {
            index.insert(&batch, row_ids.values())?;
        }
        let chunk_id = self.next_chunk;
        self.next_chunk += 1;
        for (row, &id) in row_ids.values().iter().enumerate() {
            self.locations.insert(id, (chunk_id, row));
            self.next_row_id = self.next_row_id.max(id + 1);
            if let Some(keys) = &keys {
                self.key_index.insert(keys[row].clone(), id);
            }
        }
        self.chunks.insert(
            chunk_id,
            Chunk {
                live: vec![true; batch.num_rows()],
                live_count: batch.num_rows(),
                batch,
                row_ids: row_ids.clone(),
                visible: OnceLock::new(),
            },
        );
        self.merge_small_chunks()
    }

    fn delete(&mut self, ids: &[RowId]) {
        let mut removed_keys = Vec::new();
        for id in ids {
            let Some((chunk_id, row)) = self.locations.remove(id) else {
                continue;
            };
            let Some(chunk) = self.chunks.get_mut(&chunk_id) else {
                continue;
            };
            if chunk.live[row] {
                chunk.live[row] = false;
                chunk.live_count -= 1;
                chunk.visible = OnceLock::new();
                removed_keys.push((chunk_id, row));
            }
        }
        if self.key_converter.is_some() || !self.indexes.is_empty() {
            for (chunk_id, row) in removed_keys {
                let Some(chunk) = self.chunks.get(&chunk_id) else {
                    continue;
                };
                let one = chunk.batch.slice(row, 1);
                let id = chunk.row_ids.value(row);
                if let Ok(Some(keys)) = self.encode_keys(&one)
                    && let Some(key) = keys.into_iter().next()
                {
                    self.key_index.remove(&key);
                }
                for index in &mut self.indexes {
                    let _ = index.remove(&one, &[id]);
                }
            }
        }
        self.chunks.retain(|_, c| c.live_count > 0);
    }

    /// Brings a batch written under an older schema (fewer columns) up to the current one.
    fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        if batch.schema().fields() == self.schema.fields() {
            return Ok(batch.clone());
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for field in self.schema.fields().iter().skip(columns.len()) {
            columns.push(arrow::array::new_null_array(
                field.data_type(),
                batch.num_rows(),
            ));
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    fn merge_small_chunks(&mut self) -> Result<()> {
        let small: Vec<u64> = self
            .chunks
            .iter()
            .rev()
            .take_while(|(_, c)| c.live_count < SMALL_CHUNK_ROWS)
            .map(|(id, _)| *id)
            .collect();
        if small.len() < MAX_SMALL_CHUNKS {
            return Ok(());
        }
        let mut batches = Vec::with_capacity(small.len());
        let mut ids = Vec::new();
        for id in small.iter().rev() {
            if let Some(chunk) = self.chunks.get(id) {
                let (b, r) = chunk.visible()?;
                batches.push(b.clone());
                ids.extend_from_slice(r.values());
            }
        }
        for id in &small {
            self.chunks.remove(id);
        }
        let merged = concat_batches(&self.schema, &batches)?;
        let chunk_id = self.next_chunk;
        self.next_chunk += 1;
        for (row, id) in ids.iter().enumerate() {
            self.locations.insert(*id, (chunk_id, row));
        }
        self.chunks.insert(
            chunk_id,
            Chunk {
                live: vec![true; merged.num_rows()],
                live_count: merged.num_rows(),
                batch: merged,
                row_ids: UInt64Array::from(ids),
                visible: OnceLock::new(),
            },
        );
        Ok(())
    }

    fn encode_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<Box<[u8]>>>> {
        let (Some(cols), Some(conv)) = (&self.primary_key, &self.key_converter) else {
            return Ok(None);
        };
        let arrays: Vec<ArrayRef> = cols.iter().map(|&i| batch.column(i).clone()).collect();
        let rows = conv.convert_columns(&arrays)?;
        Ok(Some(rows.iter().map(|r| r.as_ref().into()).collect()))
    }

    /// Checks that inserting `inserted` after deleting `deleted` keeps the primary key unique.
    /// Returns the row index (within `inserted`) of the first duplicate, if any.
    pub fn find_duplicate_key(
        &self,
        deleted: &HashSet<RowId>,
        inserted: &RecordBatch,
    ) -> Result<Option<usize>> {
        let Some(keys) = self.encode_keys(inserted)? else {
            return Ok(None);
        };
        let mut seen = HashSet::with_capacity(keys.len());
        for (row, key) in keys.iter().enumerate() {
            if !seen.insert(key) {
                return Ok(Some(row));
            }
            if let Some(id) = self.key_index.get(key)
                && !deleted.contains(id)
            {
                return Ok(Some(row));
            }
        }
        Ok(None)
    }

    /// Row ids whose primary key equals the key of each row of `keys` (a batch of the key columns).
    pub fn lookup_keys(&self, keys: &[ArrayRef]) -> Result<Vec<RowId>> {
        let Some(conv) = &self.key_converter else {
            return Ok(vec![]);
        };
        let rows = conv.convert_columns(keys)?;
        Ok(rows
            .iter()
            .filter_map(|r| self.key_index.get(r.as_ref()).copied())
            .collect())
    }

    /// The live rows with the given ids, in the order given (unknown ids are skipped).
    pub fn fetch(&self, ids: &[RowId]) -> Result<RecordBatch> {
        let mut chunk_order: Vec<u64> = Vec::new();
        let mut chunk_pos: HashMap<u64, usize> = HashMap::new();
        let mut picks = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(&(chunk_id, row)) = self.locations.get(id) {
                let pos = *chunk_pos.entry(chunk_id).or_insert_with(|| {
                    chunk_order.push(chunk_id);
                    chunk_order.len() - 1
                });
                picks.push((pos, row));
            }
        }
        if picks.is_empty() {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        let batches: Vec<&RecordBatch> = chunk_order
            .iter()
            .filter_map(|id| self.chunks.get(id).map(|c| &c.batch))
            .collect();
        let mut columns = Vec::with_capacity(self.schema.fields().len());
        for col in 0..self.schema.fields().len() {
            let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(col).as_ref()).collect();
            columns.push(interleave(&arrays, &picks)?);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// A consistent snapshot of the live rows.
    pub fn snapshot(&self) -> Result<TableSnapshot> {
        let mut batches = Vec::with_capacity(self.chunks.len());
        let mut row_ids = Vec::with_capacity(self.chunks.len());
        for chunk in self.chunks.values() {
            let (b, r) = chunk.visible()?;
            batches.push(b.clone());
            row_ids.push(r.clone());
        }
        Ok(TableSnapshot {
            schema: self.schema.clone(),
            batches,
            row_ids,
        })
    }

    /// The live contents as insert entries, for rewriting a table's log.
    pub fn to_log_entries(&self) -> Result<Vec<LogEntry>> {
        let snap = self.snapshot()?;
        Ok(snap
            .batches
            .into_iter()
            .zip(snap.row_ids)
            .map(|(batch, row_ids)| LogEntry::Insert { row_ids, batch })
            .collect())
    }
}

fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt {
        what: "columnar chunk",
        detail: what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]))
    }

    fn rows(t: &mut ColumnarTable, keys: Vec<i64>) -> Result<LogEntry> {
        let n = keys.len();
        let vals: Vec<String> = keys.iter().map(|k| format!("v{k}")).collect();
        Ok(LogEntry::Insert {
            row_ids: t.allocate_row_ids(n),
            batch: RecordBatch::try_new(
                schema(),
                vec![
                    Arc::new(Int64Array::from(keys)),
                    Arc::new(StringArray::from(vals)),
                ],
            )?,
        })
    }

    #[test]
    fn insert_delete_snapshot_and_keys() -> Result<()> {
        let mut t = ColumnarTable::try_new(schema(), Some(vec![0]))?;
        let e = rows(&mut t, vec![1, 2, 3])?;
        t.apply(&e)?;
        assert_eq!(t.num_rows(), 3);
        let dup = match &e {
            LogEntry::Insert { batch, .. } => t.find_duplicate_key(&HashSet::new(), batch)?,
            _ => None,
        };
        assert_eq!(dup, Some(0));
        let found = t.lookup_keys(&[Arc::new(Int64Array::from(vec![2]))])?;
        assert_eq!(found, vec![2]);
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from(found.clone()),
        })?;
        assert_eq!(t.num_rows(), 2);
        assert!(
            t.lookup_keys(&[Arc::new(Int64Array::from(vec![2]))])?
                .is_empty()
        );
        let snap = t.snapshot()?;
        assert_eq!(snap.num_rows(), 2);
        assert_eq!(snap.row_ids[0].values().to_vec(), vec![1, 3]);
        let fetched = t.fetch(&[3, 1, 2])?;
        assert_eq!(fetched.num_rows(), 2);
        Ok(())
    }

    #[test]
    fn many_small_inserts_are_merged() -> Result<()> {
        let mut t = ColumnarTable::try_new(schema(), None)?;
        for i in 0..100 {
            let e = rows(&mut t, vec![i])?;
            t.apply(&e)?;
        }
        assert!(t.chunks.len() < MAX_SMALL_CHUNKS + 1);
        t.apply(&LogEntry::Delete {
            row_ids: UInt64Array::from(vec![5, 50]),
        })?;
        let snap = t.snapshot()?;
        assert_eq!(snap.num_rows(), 98);
        let all: Vec<u64> = snap
            .row_ids
            .iter()
            .flat_map(|r| r.values().to_vec())
            .collect();
        assert!(!all.contains(&5) && !all.contains(&50));
        Ok(())
    }
}
