//! The keys of the durable store: its column families and how each kind of key is laid out
//! (catalog ids, table log entries, source offsets, sink rows, bad records, view state and
//! undo records, metadata). Every reader and writer of the store encodes keys here.

use crate::error::{Result, StorageError};

pub(crate) const CF_CATALOG: &str = "catalog";
pub(crate) const CF_TABLE_LOG: &str = "table_log";
pub(crate) const CF_META: &str = "meta";
/// Checkpointed state of materialized views: operator state deltas and view contents.
pub(crate) const CF_VIEW_STATE: &str = "view_state";
/// Undo records of state written outside a checkpoint (see `state_recovery.rs`).
pub(crate) const CF_VIEW_UNDO: &str = "view_state_undo";
pub(crate) const COLUMN_FAMILIES: [&str; 5] = [
    CF_CATALOG,
    CF_TABLE_LOG,
    CF_META,
    CF_VIEW_STATE,
    CF_VIEW_UNDO,
];
/// Operator number under which a view's contents are checkpointed.
pub const CONTENTS_OP: u32 = u32::MAX;
/// The other operator number a view's contents alternate to when a checkpoint writes them
/// in full (ahead of its commit, which then drops the earlier ones; see the manifest).
pub const CONTENTS_OP_ALT: u32 = u32::MAX - 1;

/// The contents operator number a full write of contents checkpointed under `op` uses.
pub fn other_contents_op(op: u32) -> u32 {
    if op == CONTENTS_OP {
        CONTENTS_OP_ALT
    } else {
        CONTENTS_OP
    }
}
pub(crate) const LOG_REBASED_PREFIX: &[u8] = b"log_rebased/";
/// Meta keys of table logs being rewritten: the first sequence number of the new log.
pub(crate) const LOG_REWRITE_PREFIX: &[u8] = b"log_rewrite/";
pub(crate) const META_NEXT_SEQ: &[u8] = b"next_seq";

pub(crate) fn view_state_key(view_id: u64, op: u32, partition: u32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + key.len());
    k.extend_from_slice(&view_id.to_be_bytes());
    k.extend_from_slice(&op.to_be_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(key);
    k
}

pub(crate) fn log_rewrite_key(table_id: u64) -> Vec<u8> {
    let mut k = LOG_REWRITE_PREFIX.to_vec();
    k.extend_from_slice(&table_id.to_be_bytes());
    k
}

pub(crate) fn log_rebased_key(table_id: u64) -> Vec<u8> {
    let mut k = LOG_REBASED_PREFIX.to_vec();
    k.extend_from_slice(&table_id.to_be_bytes());
    k
}

pub(crate) fn offset_key(source_id: u64) -> Vec<u8> {
    let mut key = b"source_offset/".to_vec();
    key.extend_from_slice(&source_id.to_be_bytes());
    key
}

pub(crate) const BAD_RECORD_PREFIX: &[u8] = b"bad_record/";

pub(crate) fn bad_record_key(seq: u64) -> Vec<u8> {
    let mut key = BAD_RECORD_PREFIX.to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub(crate) fn sink_row_key(sink_id: u64, row: &[u8]) -> Vec<u8> {
    let mut key = b"sink_row/".to_vec();
    key.extend_from_slice(&sink_id.to_be_bytes());
    key.extend_from_slice(row);
    key
}

pub(crate) fn log_key(table_id: u64, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&table_id.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub(crate) fn decode_u64(bytes: &[u8], what: &'static str) -> Result<u64> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StorageError::Corrupt {
        what,
        detail: format!("expected 8 bytes, got {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}
