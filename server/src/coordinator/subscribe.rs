//! SUBSCRIBE: a live feed of one view's committed changes, fed by the epoch coordinator at
//! the moment it publishes them.
//!
//! Every view has one broadcast channel of per-epoch deltas; a subscriber is a receiver on
//! it, so a thousand subscribers share the one pipeline that maintains the view. A
//! subscription starts from a snapshot of the contents taken under the coordinator's read lock
//! together with its receiver, so the snapshot's epoch and the first delta it receives meet
//! with no gap and no overlap.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use millrace_planner::view_table::ViewStatus;
use tokio::sync::broadcast;

use crate::coordinator::Coordinator;
use crate::coordinator::feed::{EpochDelta, feed_schema, with_epoch_and_diff};
use crate::error::{Result, ServerError};

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

impl Coordinator {
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
