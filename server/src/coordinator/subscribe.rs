//! SUBSCRIBE: a live feed of one view's committed changes, fed by the epoch coordinator at
//! the moment it publishes them.
//!
//! Every view has one broadcast channel of per-epoch deltas; a subscriber is a receiver on
//! it, so a thousand subscribers share the one pipeline that maintains the view. A
//! subscription starts from a snapshot of the contents taken under the runtime's read lock
//! together with its receiver, so the snapshot's epoch and the first delta it receives meet
//! with no gap and no overlap.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use millrace_planner::Changelog;
use millrace_planner::view_table::ViewStatus;
use tokio::sync::broadcast;

use crate::error::{Result, ServerError};
use crate::runtime::ViewRuntime;

/// Deltas a view's channel holds for its slowest subscriber before that one lags out, in
/// epochs. A subscriber's own limit (`subscribe_max_buffer`) may only be lower.
pub const FEED_CAPACITY: usize = 4096;

/// One epoch's committed change to a view.
#[derive(Debug)]
pub struct EpochDelta {
    /// The epoch whose barrier made it visible.
    pub epoch: u64,
    /// The view's rows with their weights (+n inserted, -n deleted).
    pub changes: Changelog,
    /// The delta as COPY text lines, encoded by the first subscriber that read it, with the
    /// output settings they depend on; subscribers with the same settings reuse them.
    pub encoded: Mutex<Option<(String, Arc<Vec<Bytes>>)>>,
}

impl EpochDelta {
    /// A delta not yet encoded.
    pub fn new(epoch: u64, changes: Changelog) -> Self {
        Self {
            epoch,
            changes,
            encoded: Mutex::new(None),
        }
    }

    /// The COPY lines for output settings `key`, encoding them with `encode` if no
    /// subscriber with those settings has yet.
    pub fn lines(
        &self,
        key: &str,
        encode: impl FnOnce() -> Result<Vec<Bytes>>,
    ) -> Result<Arc<Vec<Bytes>>> {
        if let Ok(cached) = self.encoded.lock()
            && let Some((k, lines)) = cached.as_ref()
            && k == key
        {
            return Ok(lines.clone());
        }
        let lines = Arc::new(encode()?);
        if let Ok(mut cached) = self.encoded.lock() {
            *cached = Some((key.to_string(), lines.clone()));
        }
        Ok(lines)
    }
}

/// A subscriber's start: the snapshot and the channel of what follows it.
#[derive(Debug)]
pub struct Subscription {
    /// `epoch`, `diff`, then the view's columns.
    pub schema: SchemaRef,
    /// The contents at `epoch`, each row with diff 1.
    pub snapshot: Vec<RecordBatch>,
    /// The epoch the snapshot was read at.
    pub epoch: u64,
    /// Deltas of the epochs after `epoch`, in order.
    pub feed: broadcast::Receiver<Arc<EpochDelta>>,
}

impl ViewRuntime {
    /// Starts a subscription to the view with catalog id `id`.
    pub async fn subscribe(&self, id: u64) -> Result<Subscription> {
        let view = self
            .view(id)
            .ok_or_else(|| ServerError::Internal(format!("view {id} is not running")))?;
        match view.provider.status() {
            ViewStatus::Running => {}
            ViewStatus::Backfilling | ViewStatus::Recovering(_) => {
                return Err(ServerError::ObjectNotReady(format!(
                    "materialized view \"{}\" is {}",
                    view.provider.name,
                    view.provider.status().label()
                )));
            }
            ViewStatus::Failed(reason) => {
                return Err(ServerError::Plan(millrace_planner::PlanError::ViewFailed {
                    view: view.provider.name.clone(),
                    reason,
                }));
            }
        }
        self.wait_published(self.read_floor()).await;
        // NOTE: the coordinator publishes (applies deltas, sends them, bumps the epoch) under
        // the write side of this lock, so snapshot, epoch and receiver are one cut.
        let _guard = self.read_lock.read().await;
        let snapshot = view.provider.snapshot()?;
        let epoch = self.published_epoch();
        let feed = view.feed.subscribe();
        drop(_guard);
        let schema = feed_schema(&snapshot.schema);
        let snapshot = snapshot
            .batches
            .iter()
            .map(|b| with_epoch_and_diff(&schema, b, epoch, &vec![1; b.num_rows()]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Subscription {
            schema,
            snapshot,
            epoch,
            feed,
        })
    }
}

/// The schema of a subscription's rows: `epoch`, `diff`, then the view's columns.
pub fn feed_schema(view: &SchemaRef) -> SchemaRef {
    let mut fields = vec![
        Arc::new(Field::new("epoch", DataType::Int64, false)),
        Arc::new(Field::new("diff", DataType::Int64, false)),
    ];
    fields.extend(view.fields().iter().cloned());
    Arc::new(Schema::new(fields))
}

/// `batch` with the `epoch` and `diff` columns in front.
pub fn with_epoch_and_diff(
    schema: &SchemaRef,
    batch: &RecordBatch,
    epoch: u64,
    diffs: &[i64],
) -> Result<RecordBatch> {
    let rows = batch.num_rows();
    let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![epoch; rows])),
        Arc::new(Int64Array::from(diffs.to_vec())),
    ];
    columns.extend(batch.columns().iter().cloned());
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}
