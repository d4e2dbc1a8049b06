//! What a checkpoint is made of: the manifest committed with it (epoch, log position,
//! views), the barrier queued behind the epochs it covers, and the record of each checkpoint
//! taken for `millrace_checkpoints`. The commit itself is in `checkpoint.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use millrace_storage::Store;
use millrace_storage::db::keys::CONTENTS_OP;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::{Result, ServerError};

/// Metadata key of the last committed manifest.
pub const MANIFEST_KEY: &[u8] = b"checkpoint/manifest";
/// Checkpoints listed in `millrace_checkpoints`.
const HISTORY: usize = 100;

/// What a committed checkpoint covers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The epoch every checkpointed view had processed.
    pub epoch: u64,
    /// Log position of that epoch: table log entries numbered from here on came after it.
    pub log_seq: u64,
    /// When it was committed (milliseconds since the Unix epoch).
    pub time_ms: u64,
    /// Checkpointed views, with the number of partitions their state is split over.
    pub views: BTreeMap<u64, usize>,
    /// Checkpointed views' plan fingerprints (`PlanNode::layout`): a view restores only
    /// into a plan with the same one.
    #[serde(default)]
    pub layouts: BTreeMap<u64, u64>,
    /// The operator number each view's contents are checkpointed under (absent:
    /// `CONTENTS_OP`); a checkpoint writing them in full alternates it.
    #[serde(default)]
    pub contents: BTreeMap<u64, u32>,
}

impl Manifest {
    /// The operator number view `view_id`'s contents are checkpointed under.
    pub fn contents_op(&self, view_id: u64) -> u32 {
        self.contents.get(&view_id).copied().unwrap_or(CONTENTS_OP)
    }

    /// The last committed manifest, if any.
    pub fn load(store: &Store) -> Result<Option<Manifest>> {
        match store.meta(MANIFEST_KEY)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                ServerError::Internal(format!("unreadable checkpoint manifest: {e}"))
            })?)),
            None => Ok(None),
        }
    }
}

/// One checkpoint, for `millrace_checkpoints`.
#[derive(Debug, Clone)]
pub struct CheckpointRecord {
    pub epoch: u64,
    pub log_seq: u64,
    pub started: SystemTime,
    pub duration: Duration,
    /// Views checkpointed, and views left out (not running, or not checkpointable).
    pub views: usize,
    pub skipped: usize,
    /// State entries and view rows written, and their bytes.
    pub entries: u64,
    pub bytes: u64,
    /// Why it did not commit, if it failed.
    pub error: Option<String>,
}

/// The checkpoints taken since start, and views whose state must be written in full.
#[derive(Debug, Default)]
pub struct Checkpoints {
    pub history: Mutex<VecDeque<CheckpointRecord>>,
    /// Views dropped since the last checkpoint (their state is deleted with the next one).
    pub dropped: Mutex<Vec<u64>>,
    /// Log position and views of the last committed checkpoint (an idle server writes no
    /// new one).
    pub(crate) last: Mutex<Option<(u64, BTreeMap<u64, usize>)>>,
    /// Bytes written since the state was last flushed to disk.
    pub(crate) unflushed: std::sync::atomic::AtomicU64,
    /// View rows written ahead of the next checkpoint since the last one (entries, bytes),
    /// counted in its figures.
    pub(crate) ahead: Mutex<(u64, u64)>,
}

impl Checkpoints {
    pub(crate) fn record(&self, record: CheckpointRecord) {
        if let Ok(mut h) = self.history.lock() {
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(record);
        }
    }
}

/// A queued checkpoint barrier.
#[derive(Debug)]
pub struct Barrier {
    /// Log position of the last epoch queued before the barrier.
    pub log_seq: u64,
    /// Told the checkpointed epoch (None if nothing was written) when it commits.
    pub done: Option<oneshot::Sender<Result<Option<u64>>>>,
    /// Whether to flush the state to disk before telling (`CHECKPOINT`), so that a restart
    /// reads it from files rather than replaying RocksDB's WAL.
    pub flush: bool,
}
