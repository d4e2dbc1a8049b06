//! An epoch pushed through a view in parts (`Pipeline::step_bounded`, which bounds the memory
//! of a large UPDATE's step) must produce exactly the change the whole epoch produces in one
//! step. Two pipelines of each query get the same seeded epochs (inserts, then updates and
//! deletes given as separate parts, as the engine sends them); one takes each epoch whole,
//! the other a few rows, or a single row, per step. Their changes must be equal, epoch by
//! epoch, as multisets; the bounded one's change is spilled to files (its threshold is a few
//! steps), and must also be equal as the views downstream read it, in slices.
//!
//! As in the engine, deleted rows are handed over as references into the tables' columnar
//! cache (`EpochPart::Stored`), some in chunks evicted to Parquet files, and read only when
//! the pipelines take them, after the tables have changed further.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{Error, schema, table};
use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::execution::disk_manager::DiskManagerBuilder;
use datafusion::prelude::SessionContext;
use millrace_planner::EpochPart;
use millrace_planner::changelog::Changelog;
use millrace_planner::incremental::compile;
use millrace_planner::pipeline::Pipeline;
use millrace_planner::spilled_change::ViewChange;
use millrace_storage::{ColdStore, ColumnarTable, LogEntry, RowId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const QUERIES: &[&str] = &[
    "SELECT l.k % 7 AS g, count(*) AS n, sum(length(l.pad) + length(r.pad)) AS chars \
     FROM l JOIN r ON l.k = r.k GROUP BY 1",
    "SELECT k, min(id) AS lo, max(id) AS hi, count(DISTINCT pad) AS pads FROM l GROUP BY k",
    "SELECT l.id, r.id AS rid FROM l LEFT JOIN r ON l.k = r.k AND r.id % 3 = 0",
    "SELECT k, id, row_number() OVER (PARTITION BY k ORDER BY id) AS rn FROM r",
    "SELECT id, pad FROM l ORDER BY pad DESC, id LIMIT 5",
    // Results held back to the epoch's end (`StateControl::Hold`), also where one held
    // aggregate feeds another, and a join.
    "SELECT k % 3 AS g, string_agg(pad, ',' ORDER BY id) AS s, array_agg(id ORDER BY id) AS ids \
     FROM l GROUP BY 1",
    "SELECT length(s) % 5 AS b, string_agg(CAST(g AS TEXT), ';' ORDER BY g) AS gs \
     FROM (SELECT k % 4 AS g, string_agg(pad, ',' ORDER BY id) AS s FROM l GROUP BY 1) x GROUP BY 1",
    "SELECT l.id, a.s FROM l JOIN (SELECT k, string_agg(pad, '' ORDER BY id) AS s FROM r GROUP BY k) a \
     ON l.k = a.k",
];

fn batch(rows: &[(i64, i64, String)]) -> Result<RecordBatch, Error> {
    Ok(RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.2))),
        ],
    )?)
}

/// A change as a sorted multiset of (row, weight).
fn multiset(change: &Changelog) -> Result<Vec<(String, i64)>, Error> {
    let mut out = Vec::with_capacity(change.len());
    for (i, weight) in change.weights.iter().enumerate() {
        let mut row = Vec::new();
        for column in change.batch.columns() {
            row.push(array_value_to_string(column, i)?);
        }
        out.push((row.join("|"), *weight));
    }
    out.sort();
    Ok(out)
}

/// One epoch per table: deleted rows and inserted rows, as separate parts.
type Epoch = HashMap<u64, Vec<EpochPart>>;

/// Seeded epochs over tables 1 and 2: inserts, updates (a delete and an insert of rows
/// with the same id) and deletes. The rows are kept in a columnar table per table (some
/// chunks evicted to files in `dir`); deleted rows are referred to there.
/// Returns the epochs and the number of chunks evicted.
fn epochs(seed: u64, count: usize, dir: &std::path::Path) -> Result<(Vec<Epoch>, usize), Error> {
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
    let cold = ColdStore::try_new(Arc::new(fs), "cache", "test")?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut live: HashMap<u64, Vec<(i64, i64, String)>> = HashMap::new();
    let mut stored: HashMap<u64, (ColumnarTable, HashMap<i64, RowId>)> = HashMap::new();
    let mut next_id = 0;
    let mut evicted = 0;
    let mut out = Vec::new();
    for _ in 0..count {
        let mut epoch = Epoch::new();
        for table in [1u64, 2] {
            let rows = live.entry(table).or_default();
            let (data, row_ids) = match stored.entry(table) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert((ColumnarTable::try_new(schema(), None)?, HashMap::new()))
                }
            };
            let mut deleted = Vec::new();
            let mut inserted = Vec::new();
            for _ in 0..rng.random_range(0..rows.len().min(12) + 1) {
                let victim = rows.swap_remove(rng.random_range(0..rows.len()));
                if rng.random_bool(0.5) {
                    inserted.push((victim.0, victim.1, format!("u{}", rng.random_range(0..50))));
                }
                deleted.push(victim);
            }
            for _ in 0..rng.random_range(0..40) {
                next_id += 1;
                let pad = format!("p{}", rng.random_range(0..30));
                inserted.push((next_id, rng.random_range(0..15), pad));
            }
            rows.extend(inserted.iter().cloned());
            let mut parts = Vec::new();
            if !deleted.is_empty() {
                let ids: Vec<RowId> = deleted
                    .iter()
                    .filter_map(|(id, _, _)| row_ids.remove(id))
                    .collect();
                assert_eq!(ids.len(), deleted.len(), "every deleted row is stored");
                parts.push(EpochPart::deleted(data.stored_rows(&ids)));
                data.apply(&LogEntry::Delete {
                    row_ids: ids.into(),
                })?;
            }
            if !inserted.is_empty() {
                let batch = batch(&inserted)?;
                let ids = data.allocate_row_ids(inserted.len());
                for ((id, _, _), row_id) in inserted.iter().zip(ids.values()) {
                    row_ids.insert(*id, *row_id);
                }
                data.apply(&LogEntry::Insert {
                    row_ids: ids,
                    batch: batch.clone(),
                })?;
                parts.push(Changelog::inserts(batch).into());
            }
            for (chunk, _, _) in data.eviction_candidates() {
                if rng.random_bool(0.3) {
                    data.evict(chunk, "t", &cold)?;
                    evicted += 1;
                }
            }
            if !parts.is_empty() {
                epoch.insert(table, parts);
            }
        }
        out.push(epoch);
    }
    Ok((out, evicted))
}

async fn pipeline(sql: &str, workers: usize) -> Result<Pipeline, Error> {
    let ctx = SessionContext::new();
    ctx.register_table("l", table(1)?)?;
    ctx.register_table("r", table(2)?)?;
    let state = ctx.state();
    let plan = state.optimize(&state.create_logical_plan(sql).await?)?;
    let mut pipeline = Pipeline::start(compile(&plan, state.execution_props())?, workers, None)?;
    pipeline.step(&HashMap::new()).await?;
    Ok(pipeline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_in_parts_makes_the_same_change_as_in_one_step() -> Result<(), Error> {
    let seed: u64 = std::env::var("MILLRACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let dir = tempfile::tempdir()?;
    let (epochs, evicted) = epochs(seed, 30, dir.path())?;
    assert!(evicted > 5, "chunks evicted: {evicted}");
    let cold: usize = epochs
        .iter()
        .flat_map(|e| e.values().flatten())
        .filter(|p| matches!(p, EpochPart::Stored { .. }))
        .count();
    assert!(cold > 10, "deleted rows are handed over as stored rows");
    let disk = Arc::new(DiskManagerBuilder::default().build()?);
    let mut spilled = 0;
    for sql in QUERIES {
        let mut changed = 0;
        for (workers, max_bytes) in [(1, 1), (2, 1), (2, 600)] {
            let mut whole = pipeline(sql, workers).await?;
            let mut bounded = pipeline(sql, workers).await?;
            for (n, epoch) in epochs.iter().enumerate() {
                let one = whole.step_bounded(epoch, usize::MAX, None).await?;
                let one = one.into_rows()?;
                let rows_before = bounded.stats().rows_in;
                let change = bounded.step_bounded(epoch, max_bytes, Some(&disk)).await?;
                spilled += usize::from(matches!(change, ViewChange::Spilled(_)));
                // As a view downstream reads it: the partitions as written, in slices.
                let mut read = Vec::new();
                for part in EpochPart::of_view(&change) {
                    let half = part.len() / 2;
                    read.push(part.slice(0, half).read()?);
                    read.push(part.slice(half, part.len() - half).read()?);
                }
                let read = Changelog::concat(&one.schema(), read)?.consolidate()?;
                assert_eq!(
                    multiset(&one)?,
                    multiset(&read)?,
                    "seed {seed}, {sql}, {workers} workers, {max_bytes} bytes a step: epoch {n} read downstream"
                );
                let parts = change.into_rows()?;
                let rows: u64 = epoch.values().flatten().map(|c| c.len() as u64).sum();
                assert_eq!(bounded.stats().rows_in - rows_before, rows);
                changed += usize::from(!one.is_empty());
                assert_eq!(
                    multiset(&one)?,
                    multiset(&parts)?,
                    "seed {seed}, {sql}, {workers} workers, {max_bytes} bytes a step: epoch {n}"
                );
            }
        }
        assert!(
            changed > 10,
            "{sql}: only {changed} epochs changed the view"
        );
    }
    assert!(spilled > 100, "bounded changes were spilled: {spilled}");
    Ok(())
}

/// A large epoch into a few string_agg groups, taken in many steps, evaluates each group once
/// (at the epoch's end), not once per step: the state it reads stays what the epoch taken in
/// one step reads, where per-step results read the growing groups at every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_epoch_evaluates_each_string_agg_group_once() -> Result<(), Error> {
    let rows: Vec<(i64, i64, String)> = (0..20_000)
        .map(|i| (i, i % 10, format!("pad{i}")))
        .collect();
    let epoch = Epoch::from([(1, vec![Changelog::inserts(batch(&rows)?).into()])]);
    let sql = "SELECT k, length(string_agg(pad, ',')) AS l, cardinality(array_agg(id)) AS c \
               FROM l GROUP BY k";
    let reads = |p: &Pipeline| p.stats().state.counters.reads;
    let mut whole = pipeline(sql, 2).await?;
    let before = reads(&whole);
    let one = whole
        .step_bounded(&epoch, usize::MAX, None)
        .await?
        .into_rows()?;
    let whole_reads = reads(&whole) - before;
    let mut bounded = pipeline(sql, 2).await?;
    let before = reads(&bounded);
    let change = bounded
        .step_bounded(&epoch, 20_000, None)
        .await?
        .into_rows()?;
    let bounded_reads = reads(&bounded) - before;
    assert_eq!(multiset(&one)?, multiset(&change)?);
    assert_eq!(
        change.len(),
        10,
        "one row per group: {:?}",
        multiset(&change)?
    );
    // NOTE: each step also reads its touched groups once (10 a step).
    assert!(
        bounded_reads <= whole_reads + 2_000,
        "state read: {bounded_reads} in steps, {whole_reads} in one step"
    );
    Ok(())
}
