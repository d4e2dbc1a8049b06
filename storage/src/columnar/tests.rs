//! Unit tests of the columnar cache: chunks, eviction to cold files, stored rows, log rewrites.

use super::*;
use crate::columnar::snapshot::*;
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
    let ids = t.allocate_row_ids(keys.len());
    rows_with_ids(ids, keys)
}

/// An insert of `keys` (with values `v<key>`) under the given row ids.
fn rows_with_ids(row_ids: UInt64Array, keys: Vec<i64>) -> Result<LogEntry> {
    let vals: Vec<String> = keys.iter().map(|k| format!("v{k}")).collect();
    Ok(LogEntry::Insert {
        row_ids,
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
    // Repeated and deleted ids are skipped; each chunk's rows come once.
    let by_chunk = t.stored_rows(&[60, 7, 60, 5, 7]).read()?;
    let values = |b: &RecordBatch| -> Vec<i64> {
        b.column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .map(|a| a.values().to_vec())
            .unwrap_or_default()
    };
    let mut chunked: Vec<i64> = by_chunk.iter().flat_map(values).collect();
    chunked.sort_unstable();
    let mut ordered = values(&t.fetch(&[60, 7])?);
    ordered.sort_unstable();
    assert_eq!(chunked.len(), 2);
    assert_eq!(chunked, ordered);
    Ok(())
}

#[test]
fn evicted_chunks_read_through_from_cold_files() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let cold = ColdStore::try_new(Arc::new(fs), "cache", "test")?;
    let mut t = ColumnarTable::try_new(schema(), Some(vec![0]))?;
    t.add_index("by_v", vec![1])?;
    let e = rows(&mut t, (0..10_000).collect())?;
    t.apply(&e)?;
    let before = t.snapshot()?;
    let hot_bytes = t.memory_bytes();
    let candidates = t.eviction_candidates();
    assert_eq!(candidates.len(), 1);
    let freed = t.evict(candidates[0].0, "t", &cold)?;
    assert!(freed > 0 && t.memory_bytes() + freed <= hot_bytes);
    assert_eq!(t.cache_stats().cold_chunks, 1);
    assert!(t.eviction_candidates().is_empty());
    let after = t.snapshot()?;
    assert_eq!(after.batches, before.batches);
    assert_eq!(after.row_ids, before.row_ids);
    // Point reads touch only the rows asked for, in the order asked.
    let got = t.fetch(&[9_000, 3])?;
    assert_eq!(crate::test_util::first_i64s([&got]), vec![8_999, 2]);
    // Deleting cold rows forgets their keys: the key can be inserted again.
    t.apply(&LogEntry::Delete {
        row_ids: UInt64Array::from(vec![1, 2]),
    })?;
    assert!(
        t.lookup_keys(&[Arc::new(Int64Array::from(vec![1]))])?
            .is_empty()
    );
    assert_eq!(
        t.indexes()[0]
            .range(std::ops::Bound::Unbounded, std::ops::Bound::Unbounded)
            .len(),
        9_998
    );
    let again = rows(&mut t, vec![0])?;
    if let LogEntry::Insert { batch, .. } = &again {
        assert_eq!(t.find_duplicate_key(&HashSet::new(), batch)?, None);
    }
    let tiered = t.tiered_snapshot()?;
    let live: usize = tiered.parts.iter().map(SnapshotPart::num_rows).sum();
    assert_eq!(live, 9_998);
    let stats = t.cache_stats();
    assert!(stats.misses >= 3 && stats.object_store_bytes > 0 && stats.evictions == 1);
    // The file goes when the last chunk and snapshot referring to it do.
    t.apply(&LogEntry::Delete {
        row_ids: UInt64Array::from((3..=10_000).collect::<Vec<u64>>()),
    })?;
    assert_eq!(cold.collect_garbage()?, 0);
    drop(tiered);
    assert_eq!(cold.collect_garbage()?, 1);
    Ok(())
}

#[test]
fn stored_rows_read_slices_of_hot_and_cold_chunks_as_they_were() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let cold = ColdStore::try_new(Arc::new(fs), "cache", "test")?;
    let mut t = ColumnarTable::try_new(schema(), None)?;
    for keys in [0..5_000, 5_000..10_000] {
        let e = rows(&mut t, keys.collect())?;
        t.apply(&e)?;
    }
    let (first, _, _) = t.eviction_candidates()[0];
    t.evict(first, "t", &cold)?;
    assert_eq!(t.cache_stats().cold_chunks, 1);
    // Every 7th row, asked for out of order and twice: ids are keys + 1.
    let mut ids: Vec<RowId> = (1..=10_000).filter(|id| id % 7 == 0).rev().collect();
    ids.push(7);
    let stored = t.stored_rows(&ids);
    let want: Vec<i64> = (0..10_000).filter(|k| (k + 1) % 7 == 0).collect();
    assert_eq!(stored.len(), want.len());
    assert!(stored.bytes_when_read() >= stored.len() * 16);
    let read = |s: &StoredRows| -> Result<Vec<i64>> {
        let batches = s.read()?;
        Ok(crate::test_util::first_i64s(batches.iter()))
    };
    assert_eq!(read(&stored)?, want);
    // The rows are deleted, the hot chunk evicted too: the references still read them,
    // in slices that cross the chunks' boundary and in one that is empty.
    t.apply(&LogEntry::Delete {
        row_ids: UInt64Array::from(ids[..ids.len() - 1].to_vec()),
    })?;
    let (second, _, _) = t.eviction_candidates()[0];
    t.evict(second, "t", &cold)?;
    let mut sliced = Vec::new();
    for offset in (0..stored.len()).step_by(300) {
        sliced.extend(read(&stored.slice(offset, 300))?);
    }
    assert_eq!(sliced, want);
    assert!(read(&stored.slice(stored.len(), 10))?.is_empty());
    let across = stored.slice(700, 20);
    assert_eq!(read(&across)?, want[700..720].to_vec());
    // Once every row is gone, the file of the chunk that was cold when the rows were
    // referred to stays while the references do; the other was read from memory, so
    // its later file goes with the table.
    t.apply(&LogEntry::Delete {
        row_ids: UInt64Array::from(t.live_row_ids()?),
    })?;
    assert_eq!(t.cache_stats().cold_chunks, 0);
    drop(t);
    assert_eq!(cold.collect_garbage()?, 1);
    assert_eq!(read(&across)?, want[700..720].to_vec());
    drop((stored, across));
    assert_eq!(cold.collect_garbage()?, 1);
    Ok(())
}

#[test]
fn a_rewritten_log_refers_to_cold_files_and_replays_without_their_rows() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let cold = ColdStore::try_new(fs.clone(), "cache", "test")?;
    let mut t = ColumnarTable::try_new(schema(), Some(vec![0]))?;
    for keys in [0..10_000, 10_000..10_100] {
        let e = rows(&mut t, keys.collect())?;
        t.apply(&e)?;
    }
    let (cold_chunk, _, _) = t.eviction_candidates()[0];
    t.evict(cold_chunk, "t", &cold)?;
    t.apply(&LogEntry::Delete {
        row_ids: UInt64Array::from(vec![5, 6, 10_050]),
    })?;
    assert_eq!(t.unlogged_cold_rows(), 9_998);
    let parts = t.log_parts()?;
    let files: Vec<_> = parts
        .iter()
        .filter_map(|p| p.cold_file().cloned())
        .collect();
    let entries = parts
        .into_iter()
        .map(LogPart::entry)
        .collect::<Result<Vec<_>>>()?;
    assert!(matches!(entries[0], LogEntry::Cold { .. }));
    assert!(matches!(entries[1], LogEntry::Insert { .. }));
    t.set_log_files(files);
    assert_eq!(t.unlogged_cold_rows(), 0);
    // The log keeps the file after its last row is deleted.
    let before = t.snapshot()?;
    t.apply(&LogEntry::Delete {
        row_ids: UInt64Array::from((1..=10_000).collect::<Vec<u64>>()),
    })?;
    drop(before);
    assert_eq!(
        cold.collect_garbage()?,
        0,
        "the log still refers to the file"
    );

    // A restart: a new store replays the rewritten log, reading only the file's footer
    // and its key column.
    let reopened = ColdStore::try_new(fs, "cache", "test")?;
    let mut r = ColumnarTable::try_new(schema(), Some(vec![0]))?;
    for entry in &entries {
        r.replay(entry, &reopened)?;
    }
    assert_eq!(r.num_rows(), 9_998 + 99);
    assert_eq!(r.cache_stats().cold_chunks, 1);
    assert_eq!(r.unlogged_cold_rows(), 0);
    let got = r.fetch(&[7, 9_000, 10_100])?;
    assert_eq!(crate::test_util::first_i64s([&got]), vec![6, 8_999, 10_099]);
    assert!(
        r.fetch(&[5, 6])?.num_rows() == 0,
        "deleted rows stay deleted"
    );
    assert_eq!(
        r.lookup_keys(&[Arc::new(Int64Array::from(vec![3, 5, 9_999]))])?,
        vec![4, 10_000],
        "keys of the cold rows are indexed (key 5 was deleted)"
    );
    let dup = rows_with_ids(UInt64Array::from(vec![20_000]), vec![9_999])?;
    if let LogEntry::Insert { batch, .. } = &dup {
        assert_eq!(r.find_duplicate_key(&HashSet::new(), batch)?, Some(0));
    }
    assert_eq!(r.allocate_row_ids(1).value(0), 10_101);
    // Applying a cold entry without its file is refused.
    assert!(
        ColumnarTable::try_new(schema(), None)?
            .apply(&entries[0])
            .is_err()
    );
    // Once fewer than half of a cold chunk's rows are live, a rewrite writes them as an
    // insert and no longer keeps the file for them.
    r.apply(&LogEntry::Delete {
        row_ids: UInt64Array::from((1_000..=8_000).collect::<Vec<u64>>()),
    })?;
    assert_eq!(r.cache_stats().cold_chunks, 1);
    assert_eq!(r.unlogged_cold_rows(), 0);
    let parts = r.log_parts()?;
    assert!(parts.iter().all(|p| p.cold_file().is_none()));
    match parts.into_iter().next().map(LogPart::entry).transpose()? {
        Some(LogEntry::Insert { row_ids, .. }) => assert_eq!(row_ids.len(), 9_998 - 7_001),
        other => panic!("expected the live rows as an insert, got {other:?}"),
    }
    Ok(())
}

#[test]
fn rows_are_found_when_inserts_interleave_their_ids() -> Result<()> {
    let mut t = ColumnarTable::try_new(schema(), Some(vec![0]))?;
    let insert = |ids: Vec<u64>, keys: Vec<i64>| rows_with_ids(UInt64Array::from(ids), keys);
    t.apply(&insert(vec![1, 2, 3, 10, 11], vec![1, 2, 3, 10, 11])?)?;
    // Inside the first insert's range, and out of order: found by id, not by range.
    t.apply(&insert(vec![6, 5], vec![6, 5])?)?;
    t.apply(&insert(vec![20, 21], vec![20, 21])?)?;
    assert_eq!(t.num_rows(), 9);
    assert!(t.contains(5) && t.contains(6) && t.contains(21) && !t.contains(4));
    let keys = |b: RecordBatch| crate::test_util::first_i64s([&b]);
    assert_eq!(keys(t.fetch(&[21, 5, 10, 6, 4])?), vec![21, 5, 10, 6]);
    t.apply(&LogEntry::Delete {
        row_ids: UInt64Array::from(vec![5, 10, 20, 21]),
    })?;
    assert_eq!(t.num_rows(), 5);
    assert!(!t.contains(5) && !t.contains(10) && !t.contains(21) && t.contains(6));
    assert_eq!(keys(t.fetch(&[6, 11, 1])?), vec![6, 11, 1]);
    assert_eq!(
        t.lookup_keys(&[Arc::new(Int64Array::from(vec![6, 5, 21]))])?,
        vec![6]
    );
    // The emptied chunk is gone: its range takes new rows again.
    t.apply(&insert(vec![20, 22], vec![20, 22])?)?;
    assert_eq!(keys(t.fetch(&[22, 20])?), vec![22, 20]);
    assert_eq!(
        t.key_index.len(),
        t.num_rows(),
        "the key index follows inserts and deletes"
    );
    // A row whose key hash equals another key's (forced here) is only a candidate: the
    // uniqueness check compares the keys, a lookup leaves it to the caller's filter.
    let key_99 = t.encode_key_columns(&[Arc::new(Int64Array::from(vec![99]))])?;
    let h = t.key_index.hash(&key_99[0]);
    t.key_index.insert(h, 6);
    let new_99 = rows_with_ids(UInt64Array::from(vec![30]), vec![99])?;
    let LogEntry::Insert { batch, .. } = &new_99 else {
        unreachable!()
    };
    assert_eq!(t.find_duplicate_key(&HashSet::new(), batch)?, None);
    assert_eq!(
        t.lookup_keys(&[Arc::new(Int64Array::from(vec![99]))])?,
        vec![6]
    );
    t.apply(&new_99)?;
    assert_eq!(t.find_duplicate_key(&HashSet::new(), batch)?, Some(0));
    assert!(t.key_index.remove(h, 6));
    assert_eq!(t.snapshot()?.num_rows(), 8);
    Ok(())
}

/// Staged files join the table as cold chunks; their keys are checked against the table,
/// the rows in memory and each other, for a composite key declared out of column order.
#[test]
fn staged_files_are_checked_by_key_and_added_as_cold_chunks() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let cold = ColdStore::try_new(Arc::new(fs), "cache", "test")?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("a", DataType::Int64, false),
        Field::new("b", DataType::Utf8, false),
    ]));
    let batch = |a: Vec<i64>, b: Vec<&str>| {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(a)),
                Arc::new(StringArray::from(b)),
            ],
        )
    };
    // PRIMARY KEY (b, a).
    let mut t = ColumnarTable::try_new(schema.clone(), Some(vec![1, 0]))?;
    let ids = t.allocate_row_ids(2);
    t.apply(&LogEntry::Insert {
        row_ids: ids,
        batch: batch(vec![1, 2], vec!["x", "x"])?,
    })?;
    let stage = |a: Vec<i64>, b: Vec<&str>| -> Result<Arc<ColdFile>> {
        Ok(Arc::new(cold.write("t", &batch(a, b)?)?))
    };
    let parts = vec![
        stage(vec![1, 3], vec!["y", "x"])?,
        stage(vec![2], vec!["y"])?,
    ];
    let keys = |t: &ColumnarTable, files: &[Arc<ColdFile>]| -> Result<Vec<_>> {
        files.iter().map(|f| t.staged_keys(f)).collect()
    };
    let none = HashSet::new();
    assert!(!t.key_conflicts(&none, None, &keys(&t, &parts)?)?);
    // A key the table has, another part has, or the rows in memory have.
    let taken = vec![stage(vec![4, 2], vec!["z", "x"])?];
    assert!(t.key_conflicts(&none, None, &keys(&t, &taken)?)?);
    assert!(!t.key_conflicts(&HashSet::from([2]), None, &keys(&t, &taken)?)?);
    let twice = vec![parts[0].clone(), stage(vec![3], vec!["x"])?];
    assert!(t.key_conflicts(&none, None, &keys(&t, &twice)?)?);
    let held = batch(vec![2], vec!["y"])?;
    assert!(t.key_conflicts(&none, Some(&held), &keys(&t, &parts)?)?);
    // Added: cold chunks whose keys the table knows.
    t.keep_staged(parts.iter());
    for file in parts {
        let ids = t.allocate_row_ids(file.rows);
        let keys = t.staged_keys(&file)?;
        t.add_staged(&ids, file, keys)?;
    }
    assert_eq!(t.num_rows(), 5);
    assert_eq!(t.cache_stats().cold_chunks, 2);
    let in_memory = batch(vec![3], vec!["x"])?;
    assert_eq!(t.find_duplicate_key(&none, &in_memory)?, Some(0));
    let found = t.lookup_keys(&[
        Arc::new(StringArray::from(vec!["y"])),
        Arc::new(Int64Array::from(vec![2])),
    ])?;
    assert_eq!(crate::test_util::first_i64s([&t.fetch(&found)?]), vec![2]);
    Ok(())
}
