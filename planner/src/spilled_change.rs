//! A view's change for one epoch too large to hold in memory, kept in files on local disk
//! until the coordinator publishes it.
//!
//! [`Pipeline::step_bounded`](crate::pipeline::Pipeline::step_bounded) runs a large epoch in
//! steps; the view's change of each step is written here once their sum passes a bound
//! (before, every step's change was held, then concatenated and consolidated: 440k changed
//! groups of a 300-byte text held 0.9 GB under a 256 MiB limit). Rows go to one of several
//! partitions by the hash of their encoding, as Arrow IPC files with a weight column, so
//! that identical rows meet in one partition and each partition is consolidated alone. The
//! coordinator then applies the change to the view's contents and feeds subscribers one
//! consolidated partition at a time ([`ViewChange::for_each_consolidated`]); a partition
//! that turns out larger than its share is split again, with another hash, when the writer
//! finishes. Subscribers and sinks get the change whole, as files, and read them the same
//! way, so that a subscriber that lags holds file handles, not rows.
//! Views downstream read the partitions as they are, a step's slice at a time (see
//! `EpochPart::Spilled`): within a partition the steps' order is kept, so no row is seen
//! deleted before it was inserted.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{BufReader, BufWriter};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::error::DataFusionError;
use datafusion::execution::SpillFile as TempFile;
use datafusion::execution::disk_manager::DiskManager;

use crate::changelog::{Changelog, RowCodec, loose};
use crate::error::{PlanError, Result};

/// How many times a partition may be split again.
const MAX_SPLITS: u64 = 3;

/// A view's change for one epoch: in memory, or spilled.
#[derive(Debug, Clone)]
pub enum ViewChange {
    /// The whole change, consolidated.
    Rows(Changelog),
    /// Partitions on disk, each to be consolidated when read.
    Spilled(Arc<SpilledChange>),
}

impl ViewChange {
    /// Rows written (a spilled change counts rows before consolidation).
    pub fn len(&self) -> usize {
        match self {
            ViewChange::Rows(c) => c.len(),
            ViewChange::Spilled(s) => s.len(),
        }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with the change in consolidated parts: identical rows are always in one
    /// part, so the parts together are the consolidated change. A spilled change is read a
    /// partition at a time.
    pub fn for_each_consolidated<E: From<PlanError>>(
        &self,
        mut f: impl FnMut(Changelog) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        match self {
            ViewChange::Rows(c) if c.is_empty() => Ok(()),
            ViewChange::Rows(c) => f(c.clone()),
            ViewChange::Spilled(s) => {
                for file in &s.files {
                    let part = file.consolidated()?;
                    if !part.is_empty() {
                        f(part)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// The whole change in memory, consolidated (for the rare paths that merge it with
    /// another change).
    pub fn into_rows(self) -> Result<Changelog> {
        match self {
            ViewChange::Rows(c) => Ok(c),
            ViewChange::Spilled(s) => {
                let mut parts = Vec::new();
                ViewChange::Spilled(s.clone()).for_each_consolidated(|c| {
                    parts.push(c);
                    Ok::<(), PlanError>(())
                })?;
                Changelog::concat(&s.schema, parts)
            }
        }
    }
}

/// A finished spilled change: its partition files.
#[derive(Debug)]
pub struct SpilledChange {
    schema: SchemaRef,
    files: Vec<Arc<SpillFile>>,
}

impl SpilledChange {
    /// Rows in all partitions.
    pub fn len(&self) -> usize {
        self.files.iter().map(|f| f.rows).sum()
    }

    /// Whether no row was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The partitions that hold rows, each at most about twice the writer's target.
    pub fn files(&self) -> &[Arc<SpillFile>] {
        &self.files
    }
}

/// One partition file: IPC batches of the change's columns and a weight column.
pub struct SpillFile {
    file: Arc<dyn TempFile>,
    /// The change's schema (without the weight column).
    schema: SchemaRef,
    /// Rows of each batch, in file order.
    batch_rows: Vec<usize>,
    rows: usize,
    /// Bytes the rows took in memory when written.
    bytes: usize,
}

impl std::fmt::Debug for SpillFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillFile")
            .field("path", &self.file.path())
            .field("rows", &self.rows)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl SpillFile {
    /// Rows in the file.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether the file holds no row.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The change's schema.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// About the bytes `len` of its rows take once read.
    pub fn bytes_when_read(&self, len: usize) -> usize {
        (self.bytes as u128 * len as u128 / self.rows.max(1) as u128) as usize
    }

    /// All its rows, consolidated.
    pub fn consolidated(&self) -> Result<Changelog> {
        self.read(0, self.rows)?.consolidate()
    }

    /// `len` rows from `offset` on, as written (not consolidated); only the batches that
    /// hold them are decoded.
    pub fn read(&self, offset: usize, len: usize) -> Result<Changelog> {
        let mut reader = FileReader::try_new(BufReader::new(open(&self.file)?), None)?;
        let mut parts = Vec::new();
        let (mut start, end) = (0, offset + len);
        for (i, &n) in self.batch_rows.iter().enumerate() {
            let (lo, hi) = (start.max(offset), (start + n).min(end));
            if lo < hi {
                reader.set_index(i)?;
                let batch = reader
                    .next()
                    .ok_or_else(|| PlanError::Internal("a spilled change lost a batch".into()))??;
                parts.push(split_weights(&self.schema, &batch)?.slice(lo - start, hi - lo));
            }
            start += n;
            if start >= end {
                break;
            }
        }
        Changelog::concat(&self.schema, parts)
    }
}

/// Writes a change partition by partition as it is produced.
pub struct SpillWriter {
    schema: SchemaRef,
    stored: SchemaRef,
    codec: RowCodec,
    seed: u64,
    disk: Arc<DiskManager>,
    target_bytes: usize,
    partitions: Vec<Option<Partition>>,
}

struct Partition {
    file: Arc<dyn TempFile>,
    writer: FileWriter<BufWriter<Box<dyn datafusion::execution::SpillWriter>>>,
    batch_rows: Vec<usize>,
    rows: usize,
    bytes: usize,
}

impl SpillWriter {
    /// A writer of a change with `schema` into `partitions` files, each of which should
    /// come to about `target_bytes` (a larger one is split again when the writer finishes).
    pub fn new(
        disk: Arc<DiskManager>,
        schema: &SchemaRef,
        partitions: usize,
        target_bytes: usize,
    ) -> Result<Self> {
        Self::with_seed(disk, schema, partitions, target_bytes, 0)
    }

    fn with_seed(
        disk: Arc<DiskManager>,
        schema: &SchemaRef,
        partitions: usize,
        target_bytes: usize,
        seed: u64,
    ) -> Result<Self> {
        let schema = loose(schema);
        let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new("__weight", DataType::Int64, false)));
        Ok(Self {
            codec: RowCodec::for_schema(&schema)?,
            stored: Arc::new(Schema::new(fields)),
            schema,
            seed,
            disk,
            target_bytes: target_bytes.max(1),
            partitions: (0..partitions.max(1)).map(|_| None).collect(),
        })
    }

    /// Appends `change` (rows keep their order within each partition).
    pub fn append(&mut self, change: &Changelog) -> Result<()> {
        if change.is_empty() {
            return Ok(());
        }
        let change = change.with_schema(&self.schema)?;
        let rows = self.codec.encode(change.batch.columns(), change.len())?;
        let n = self.partitions.len();
        let mut picks: Vec<Vec<u32>> = vec![Vec::new(); n];
        for i in 0..change.len() {
            let mut hasher = std::hash::DefaultHasher::new();
            self.seed.hash(&mut hasher);
            rows.row(i).hash(&mut hasher);
            picks[(hasher.finish() % n as u64) as usize].push(i as u32);
        }
        for (p, picked) in picks.into_iter().enumerate() {
            if picked.is_empty() {
                continue;
            }
            let part = if picked.len() == change.len() {
                change.clone()
            } else {
                change.take(&picked)?
            };
            self.write(p, &part)?;
        }
        Ok(())
    }

    fn write(&mut self, p: usize, part: &Changelog) -> Result<()> {
        let slot = &mut self.partitions[p];
        if slot.is_none() {
            let file = self.disk.create_tmp_file("a view's change")?;
            let writer = FileWriter::try_new(BufWriter::new(file.open_writer()?), &self.stored)?;
            *slot = Some(Partition {
                file,
                writer,
                batch_rows: Vec::new(),
                rows: 0,
                bytes: 0,
            });
        }
        let Some(partition) = slot.as_mut() else {
            return Ok(());
        };
        let mut columns: Vec<ArrayRef> = part.batch.columns().to_vec();
        columns.push(Arc::new(Int64Array::from(part.weights.clone())));
        let batch = RecordBatch::try_new(self.stored.clone(), columns)?;
        partition.writer.write(&batch)?;
        partition.batch_rows.push(part.len());
        partition.rows += part.len();
        partition.bytes += part.bytes();
        Ok(())
    }

    /// Closes the files; a partition that came out over twice the target is split again,
    /// by another hash (identical rows stay together).
    pub fn finish(self) -> Result<SpilledChange> {
        let mut files = Vec::new();
        for partition in self.partitions.into_iter().flatten() {
            let Partition {
                file,
                mut writer,
                batch_rows,
                rows,
                bytes,
            } = partition;
            writer.finish()?;
            let mut inner = writer
                .into_inner()?
                .into_inner()
                .map_err(|e| DataFusionError::External(Box::new(e.into_error())))?;
            inner.finish()?;
            let file = SpillFile {
                file,
                schema: self.schema.clone(),
                batch_rows,
                rows,
                bytes,
            };
            if file.bytes <= self.target_bytes.saturating_mul(2) || self.seed >= MAX_SPLITS {
                files.push(Arc::new(file));
                continue;
            }
            let parts = file.bytes.div_ceil(self.target_bytes);
            let mut again = SpillWriter::with_seed(
                self.disk.clone(),
                &self.schema,
                parts,
                self.target_bytes,
                self.seed + 1,
            )?;
            let reader = FileReader::try_new(BufReader::new(open(&file.file)?), None)?;
            for batch in reader {
                again.append(&split_weights(&self.schema, &batch?)?)?;
            }
            files.extend(again.finish()?.files);
        }
        Ok(SpilledChange {
            schema: self.schema,
            files,
        })
    }
}

/// A stored batch as a changelog: its last column is the weight.
fn split_weights(schema: &SchemaRef, batch: &RecordBatch) -> Result<Changelog> {
    let n = batch.num_columns();
    let weights = batch
        .column(n - 1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| PlanError::Internal("a spilled change without weights".into()))?;
    let weights = weights.values().to_vec();
    let rows = RecordBatch::try_new(schema.clone(), batch.columns()[..n - 1].to_vec())?;
    Ok(Changelog::new(rows, weights))
}

fn open(file: &Arc<dyn TempFile>) -> Result<File> {
    let path = file.path().ok_or_else(|| {
        PlanError::Internal("a view's change is spilled to local temporary files only".into())
    })?;
    File::open(path).map_err(|e| PlanError::DataFusion(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;
    use datafusion::execution::disk_manager::DiskManagerBuilder;

    fn change(keys: &[i64], texts: &[&str], weights: &[i64]) -> Changelog {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("t", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(keys.to_vec())),
                Arc::new(StringArray::from(texts.to_vec())),
            ],
        )
        .unwrap();
        Changelog::new(batch, weights.to_vec())
    }

    fn sorted(c: &Changelog) -> Vec<(i64, String, i64)> {
        let k = c
            .batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let t = c
            .batch
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let mut rows: Vec<_> = (0..c.len())
            .map(|i| (k.value(i), t.value(i).to_string(), c.weights[i]))
            .collect();
        rows.sort();
        rows
    }

    fn consolidate_all(change: &ViewChange) -> (Vec<(i64, String, i64)>, usize) {
        let mut all = Vec::new();
        let mut parts = 0;
        change
            .for_each_consolidated(|c| {
                parts += 1;
                all.extend(sorted(&c));
                Ok::<(), PlanError>(())
            })
            .unwrap();
        all.sort();
        (all, parts)
    }

    #[test]
    fn a_spilled_change_consolidates_like_the_change_in_memory() {
        let disk = Arc::new(DiskManagerBuilder::default().build().unwrap());
        // Steps of a group's change: -old +mid, then -mid +new, over 500 groups.
        let steps: Vec<Changelog> = (0..4)
            .map(|step| {
                let keys: Vec<i64> = (0..500).flat_map(|k| [k, k]).collect();
                let old: Vec<String> = (0..500).map(|k| format!("{k}-{step}")).collect();
                let new: Vec<String> = (0..500).map(|k| format!("{k}-{}", step + 1)).collect();
                let texts: Vec<&str> = (0..500)
                    .flat_map(|k| [old[k].as_str(), new[k].as_str()])
                    .collect();
                let weights: Vec<i64> = (0..500).flat_map(|_| [-1, 1]).collect();
                change(&keys, &texts, &weights)
            })
            .collect();
        let schema = steps[0].schema();
        let whole = Changelog::concat(&schema, steps.clone())
            .unwrap()
            .consolidate()
            .unwrap();
        // A tiny target: every partition is split again when read.
        let mut writer = SpillWriter::new(disk, &schema, 3, 2_000).unwrap();
        for step in &steps {
            writer.append(step).unwrap();
        }
        let spilled = ViewChange::Spilled(Arc::new(writer.finish().unwrap()));
        assert_eq!(spilled.len(), 4_000, "rows before consolidation");
        let (rows, parts) = consolidate_all(&spilled);
        assert_eq!(rows, sorted(&whole));
        assert_eq!(rows.len(), 1_000, "-k-0 and +k-4 for each group");
        assert!(parts > 3, "oversized partitions were split again: {parts}");
        let ViewChange::Spilled(s) = &spilled else {
            unreachable!()
        };
        // Reading a partition in slices gives its rows in the order written.
        for file in s.files() {
            let all = file.read(0, file.len()).unwrap();
            let mut pieces = Vec::new();
            let mut offset = 0;
            while offset < file.len() {
                let n = 7.min(file.len() - offset);
                pieces.push(file.read(offset, n).unwrap());
                offset += n;
            }
            let again = Changelog::concat(&schema, pieces).unwrap();
            assert_eq!(again.weights, all.weights);
            assert_eq!(again.batch, all.batch);
        }
    }

    #[test]
    fn rows_in_memory_stay_one_part() {
        let c = change(&[1, 1, 2], &["a", "a", "b"], &[1, 1, -1]);
        let (rows, parts) = consolidate_all(&ViewChange::Rows(c.clone().consolidate().unwrap()));
        assert_eq!(parts, 1);
        assert_eq!(rows, vec![(1, "a".into(), 2), (2, "b".into(), -1)]);
    }
}
