//! Unit tests of the durable store.

use super::*;
use crate::catalog_record::CatalogRecord;
use crate::catalog_record::ObjectKind;
use crate::db::write_set::WriteSet;
use crate::log_entry::LogEntry;
use arrow::array::{Int64Array, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use std::sync::Arc;

fn log_entries(store: &Store, table_id: u64) -> Result<Vec<LogEntry>> {
    Ok(store
        .table_log_with_seqs(table_id)?
        .into_iter()
        .map(|(_, e)| e)
        .collect())
}

fn record(id: u64) -> CatalogRecord {
    CatalogRecord {
        id,
        kind: ObjectKind::Table,
        database: "millrace".into(),
        schema: "public".into(),
        name: format!("t{id}"),
        sql: "CREATE TABLE t (k BIGINT)".into(),
        depends_on: vec![],
        search_schema: None,
    }
}

fn insert(rows: Vec<i64>, first_id: u64) -> Result<LogEntry> {
    let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
    let n = rows.len() as u64;
    Ok(LogEntry::Insert {
        row_ids: UInt64Array::from((first_id..first_id + n).collect::<Vec<_>>()),
        batch: RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(rows))])?,
    })
}

#[test]
fn commit_survives_reopen_and_logs_stay_apart() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
    {
        let store = Store::open(dir.path())?;
        let mut set = WriteSet::new();
        set.put_catalog(record(1));
        set.put_catalog(record(2));
        set.append(1, insert(vec![10, 20], 1)?);
        set.append(2, insert(vec![30], 1)?);
        set.append(
            1,
            LogEntry::Delete {
                row_ids: UInt64Array::from(vec![1]),
            },
        );
        store.commit(set)?;
    }
    let store = Store::open(dir.path())?;
    assert_eq!(store.catalog()?.len(), 2);
    assert_eq!(store.allocate_object_id(), 3);
    let log1 = log_entries(&store, 1)?;
    assert_eq!(log1.len(), 2);
    assert!(matches!(log1[1], LogEntry::Delete { .. }));
    assert_eq!(log_entries(&store, 2)?.len(), 1);
    let mut drop = WriteSet::new();
    drop.drop_log(1);
    drop.delete_catalog(1);
    store.commit(drop)?;
    assert!(log_entries(&store, 1)?.is_empty());
    assert_eq!(log_entries(&store, 2)?.len(), 1);
    Ok(())
}

/// The rows of a table's log, in order (inserts only).
fn logged_rows(store: &Store, table_id: u64) -> Result<Vec<i64>> {
    let mut rows = Vec::new();
    for entry in log_entries(store, table_id)? {
        if let LogEntry::Insert { batch, .. } = entry {
            let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
            rows.extend(column.map(|c| c.values().to_vec()).unwrap_or_default());
        }
    }
    Ok(rows)
}

#[test]
fn a_log_rewrite_is_invisible_until_finished_and_abandoned_by_a_restart() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
    let mut set = WriteSet::new();
    set.put_catalog(record(1));
    set.put_catalog(record(2));
    set.append(1, insert(vec![1, 2, 3], 1)?);
    set.append(2, insert(vec![9], 1)?);
    {
        let store = Store::open(dir.path())?;
        store.commit(set)?;
        // A rewrite cut short by a crash: its entries go at the next open.
        store.begin_log_rewrite(1)?;
        let mut part = WriteSet::new();
        part.append(1, insert(vec![1, 2], 1)?);
        store.commit(part)?;
    }
    let store = Store::open(dir.path())?;
    assert_eq!(logged_rows(&store, 1)?, vec![1, 2, 3]);
    assert_eq!(store.log_rebased_at(1)?, None);
    // A failed rewrite is abandoned in place.
    store.begin_log_rewrite(1)?;
    let mut part = WriteSet::new();
    part.append(1, insert(vec![7], 1)?);
    store.commit(part)?;
    assert!(store.abandon_log_rewrite(1)?);
    assert_eq!(logged_rows(&store, 1)?, vec![1, 2, 3]);
    // A finished one replaces the log, together with the writes given to it.
    let from = store.begin_log_rewrite(1)?;
    for rows in [vec![1], vec![3]] {
        let mut part = WriteSet::new();
        part.append(1, insert(rows, 1)?);
        store.commit(part)?;
    }
    let mut with = WriteSet::new();
    with.put_catalog(CatalogRecord {
        sql: "CREATE TABLE t (k BIGINT, v TEXT)".into(),
        ..record(1)
    });
    store.finish_log_rewrite(1, from, with)?;
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(logged_rows(&store, 1)?, vec![1, 3]);
    assert_eq!(logged_rows(&store, 2)?, vec![9]);
    assert_eq!(store.log_rebased_at(1)?, Some(from));
    assert!(store.catalog()?[0].sql.contains("v TEXT"));
    assert!(!store.abandon_log_rewrite(1)?);
    Ok(())
}

#[test]
fn injected_failure_writes_nothing() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
    let store = Store::open(dir.path())?;
    store.inject_write_failures(1);
    let mut set = WriteSet::new();
    set.put_catalog(record(1));
    assert!(store.commit(set.clone()).is_err());
    assert!(store.catalog()?.is_empty());
    store.commit(set)?;
    assert_eq!(store.catalog()?.len(), 1);
    Ok(())
}

#[test]
fn sink_rows_are_kept_per_sink_and_dropped_together() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
    let store = Store::open(dir.path())?;
    let mut set = WriteSet::new();
    set.put_sink_row(7, b"a".to_vec(), 2);
    set.put_sink_row(7, b"b".to_vec(), 1);
    set.put_sink_row(8, b"a".to_vec(), 5);
    store.commit(set)?;
    let mut set = WriteSet::new();
    set.put_sink_row(7, b"b".to_vec(), 0);
    set.put_sink_row(7, b"c".to_vec(), 3);
    store.commit(set)?;
    assert_eq!(
        store.sink_rows(7)?,
        vec![(b"a".to_vec(), 2), (b"c".to_vec(), 3)]
    );
    let mut set = WriteSet::new();
    set.drop_sink_rows(7);
    store.commit(set)?;
    assert!(store.sink_rows(7)?.is_empty());
    assert_eq!(store.sink_rows(8)?, vec![(b"a".to_vec(), 5)]);
    Ok(())
}

#[test]
fn bad_records_are_kept_in_order_until_deleted() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
    {
        let store = Store::open(dir.path())?;
        let mut set = WriteSet::new();
        for seq in [3u64, 1, 2, 256] {
            set.put_bad_record(seq, seq.to_string().into_bytes());
        }
        set.put_sink_row(1, b"x".to_vec(), 1);
        store.commit(set)?;
        let mut set = WriteSet::new();
        set.delete_bad_record(2);
        store.commit(set)?;
    }
    let store = Store::open(dir.path())?;
    assert_eq!(
        store.bad_records()?,
        vec![
            (1, b"1".to_vec()),
            (3, b"3".to_vec()),
            (256, b"256".to_vec())
        ]
    );
    Ok(())
}

#[test]
fn dropping_one_operators_state_keeps_the_others() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
    let store = Store::open(dir.path())?;
    let mut set = WriteSet::default();
    for (view, op) in [(7, 1), (7, u32::MAX), (7, 2), (8, 0)] {
        set.put_view_state(view, op, 0, b"k".to_vec(), Some(b"v".to_vec()));
    }
    store.commit(set)?;
    let mut set = WriteSet::default();
    set.drop_view_state_op(7, u32::MAX);
    set.drop_view_state_op(7, 1);
    store.commit(set)?;
    let ops: Vec<u32> = store.view_state(7)?.iter().map(|e| e.0).collect();
    assert_eq!(ops, vec![2]);
    assert_eq!(store.view_state(8)?.len(), 1);
    Ok(())
}
