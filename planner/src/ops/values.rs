//! Constant relations (VALUES, a FROM-less SELECT): their rows appear in the first epoch
//! and never change.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;

use super::Operator;
use crate::changelog::{Changelog, loose};
use crate::error::Result;

/// Emits its rows once.
#[derive(Debug)]
pub struct ValuesOp {
    schema: SchemaRef,
    rows: Option<RecordBatch>,
}

impl ValuesOp {
    /// A constant relation of `rows`.
    pub fn new(rows: RecordBatch) -> Self {
        Self {
            schema: loose(&rows.schema()),
            rows: Some(rows),
        }
    }
}

impl Operator for ValuesOp {
    fn describe(&self) -> String {
        "Values".into()
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    // NOTE: a view is checkpointed only after its first step, when the rows were emitted.
    fn checkpoint(&mut self) -> Result<Option<Vec<crate::ops::StateEntry>>> {
        Ok(Some(Vec::new()))
    }

    fn restore(&mut self, _entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        self.rows = None;
        Ok(())
    }

    fn step(&mut self, _inputs: Vec<Changelog>) -> Result<Changelog> {
        match self.rows.take() {
            Some(rows) => Changelog::inserts(rows).with_schema(&self.schema),
            None => Ok(Changelog::empty(self.schema.clone())),
        }
    }
}
