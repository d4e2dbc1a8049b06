//! A view's feed of committed changes: one [`EpochDelta`] per epoch, sent on the view's
//! broadcast channel as the coordinator publishes it, read by SUBSCRIBE and sinks, with the
//! `epoch` and `diff` columns their rows carry.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use millrace_planner::spilled_change::ViewChange;

use crate::error::Result;

/// Deltas a view's channel holds for its slowest subscriber before that one lags out, in
/// epochs. A subscriber's own limit (`subscribe_max_buffer`) may only be lower.
pub const FEED_CAPACITY: usize = 4096;

/// One epoch's committed change to a view.
#[derive(Debug)]
pub struct EpochDelta {
    /// The epoch whose barrier made it visible.
    pub epoch: u64,
    /// The view's rows with their weights (+n inserted, -n deleted): in memory, or spilled
    /// to files that each reader reads a consolidated partition at a time.
    pub change: ViewChange,
    /// The delta as COPY text lines (of a change in memory), encoded by the first subscriber
    /// that read it, with the output settings they depend on; subscribers with the same
    /// settings reuse them.
    pub encoded: Mutex<Option<(String, Arc<Vec<Bytes>>)>>,
}

impl EpochDelta {
    /// A delta not yet encoded.
    pub fn new(epoch: u64, change: ViewChange) -> Self {
        Self {
            epoch,
            change,
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
