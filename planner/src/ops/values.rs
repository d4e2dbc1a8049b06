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

    fn step(&mut self, _inputs: Vec<Changelog>) -> Result<Changelog> {
        match self.rows.take() {
            Some(rows) => Changelog::inserts(rows).with_schema(&self.schema),
            None => Ok(Changelog::empty(self.schema.clone())),
        }
    }
}
