//! Tests of the warm tier (`state_tier.rs`) under a tiered state store: spills, reads back,
//! undo records and failures.

use std::sync::Arc;

use super::{StateStore, TieredState};
use crate::db::Store;
use crate::error::{Result, StorageError};
use crate::state_tier::*;

fn encode(v: &mut i64) -> Result<Vec<u8>> {
    Ok(v.to_le_bytes().to_vec())
}

fn decode(bytes: &[u8]) -> i64 {
    i64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]))
}

/// The value under `key` as an operator sees it: in memory, or read back.
fn value(s: &mut TieredState<i64>, key: &[u8]) -> Result<Option<i64>> {
    if let Some(bytes) = s.fetch(key)? {
        s.restore(key.into(), decode(&bytes));
    }
    Ok(s.get(key).copied())
}

#[test]
fn evicted_state_reads_back_and_marks_the_checkpoint_stale_until_committed() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
    let store = Arc::new(Store::open(dir.path())?);
    let tier = StateTier::new(store.clone(), 7, true);
    let mut s: TieredState<i64> = TieredState::default();
    s.attach(tier.location(1, 0).with_prefix(&[0]));
    for k in 0..100i64 {
        *s.get_or_insert_with(&k.to_be_bytes(), &mut || 0) += k;
    }
    s.remove(&5i64.to_be_bytes());
    let freed = s.evict(0.5, &mut encode, &|_, _| 10)?;
    assert_eq!((s.len(), freed), (49, 500), "half of 99, rounded up, left");
    assert!(
        StateTier::is_marked(&store, 7)?,
        "changed entries were written"
    );
    for k in 0..100i64 {
        let want = (k != 5).then_some(k);
        assert_eq!(value(&mut s, &k.to_be_bytes())?, want, "key {k}");
    }
    assert_eq!(s.counters().fetched, 50, "the evicted half was read back");
    // Entries read back are clean: a full eviction writes only the 49 never evicted,
    // and the next one writes nothing; reads still find every entry.
    let (written, _) = tier.counters();
    s.evict(1.0, &mut encode, &|_, _| 10)?;
    assert_eq!(tier.counters().0, written + 49);
    for k in [1i64, 2, 3] {
        value(&mut s, &k.to_be_bytes())?;
    }
    s.evict(1.0, &mut encode, &|_, _| 10)?;
    assert_eq!(tier.counters().0, written + 49);
    assert_eq!(value(&mut s, &42i64.to_be_bytes())?, Some(42));
    assert_eq!(value(&mut s, &5i64.to_be_bytes())?, None);
    // A change after that is dirty again; a failed write keeps it in memory.
    *s.get_or_insert_with(&42i64.to_be_bytes(), &mut || 0) += 1;
    store.inject_write_failures(1);
    assert_eq!(s.evict(1.0, &mut encode, &|_, _| 10)?, 0, "nothing freed");
    assert_eq!(s.peek(&42i64.to_be_bytes()), Some(&43));
    assert_eq!(tier.failures().0, 1, "the failed write is counted");
    s.evict(1.0, &mut encode, &|_, _| 10)?;
    assert_eq!(value(&mut s, &42i64.to_be_bytes())?, Some(43));
    // The checkpoint that includes the view clears the mark.
    let mut set = crate::db::write_set::WriteSet::new();
    set.delete_meta(&StateTier::mark_key(7));
    store.commit(set)?;
    tier.committed();
    assert!(!StateTier::is_marked(&store, 7)?);
    Ok(())
}

#[test]
fn an_eviction_over_several_writes_that_fails_midway_keeps_every_entry() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
    let store = Arc::new(Store::open(dir.path())?);
    let tier = StateTier::new(store.clone(), 11, true);
    let mut s: TieredState<Vec<u8>> = TieredState::default();
    s.attach(tier.location(2, 1));
    // 3,000 changed entries of 1 KB: an eviction of all of them takes three writes.
    let want = |k: u32| vec![(k % 251) as u8; 1000];
    for k in 0..3000u32 {
        *s.get_or_insert_with(&k.to_be_bytes(), &mut Vec::new) = want(k);
    }
    let size = |_: &[u8], v: &Vec<u8>| v.len() as i64;
    // The 1,500th encoding fails: the first write went through, the rest did not.
    let mut calls = 0;
    let mut failing = |v: &mut Vec<u8>| {
        calls += 1;
        match calls {
            1500 => Err(StorageError::Injected("encode".into())),
            _ => Ok(v.clone()),
        }
    };
    let freed = s.evict(1.0, &mut failing, &size)?;
    let written = tier.counters().0;
    assert_eq!(freed, written as i64 * 1000, "what was written left memory");
    assert_eq!(tier.failures().0, 1);
    assert!(
        written > 0 && written < 1499,
        "{written} written before the failure"
    );
    assert_eq!(
        s.len() as u64,
        3000 - written,
        "the entries not written stay"
    );
    assert_eq!(
        s.take_dirty().len() as u64,
        3000 - written,
        "and stay changed"
    );
    let mut encode = |v: &mut Vec<u8>| Ok(v.clone());
    assert_eq!(
        s.evict(1.0, &mut encode, &size)?,
        (3000 - written as i64) * 1000
    );
    assert_eq!((s.len(), tier.counters().0), (0, 3000));
    for k in 0..3000u32 {
        let bytes = s.fetch(&k.to_be_bytes())?;
        assert_eq!(bytes, Some(want(k)), "key {k}");
    }
    Ok(())
}

#[test]
fn changes_written_ahead_of_a_checkpoint_are_clean_and_stay_in_memory() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StorageError::Injected(e.to_string()))?;
    let store = Arc::new(Store::open(dir.path())?);
    let tier = StateTier::new(store.clone(), 9, false);
    let mut s: TieredState<i64> = TieredState::default();
    s.attach(tier.location(0, 3));
    for k in 0..10i64 {
        *s.get_or_insert_with(&k.to_be_bytes(), &mut || 0) += 1;
    }
    assert_eq!(s.flush_changes(100, &mut encode)?, 0, "below the threshold");
    assert_eq!(s.flush_changes(5, &mut encode)?, 10);
    assert!(s.take_dirty().is_empty(), "nothing left for the checkpoint");
    assert_eq!(s.len(), 10);
    let on_disk = store.view_state_op(9, 0)?;
    assert_eq!(on_disk.len(), 10);
    assert!(on_disk.iter().all(|(p, _, v)| *p == 3 && decode(v) == 1));
    Ok(())
}
