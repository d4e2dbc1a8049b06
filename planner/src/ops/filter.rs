//! Filter: keeps the changelog rows whose predicate is true (stateless).

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::physical_plan::PhysicalExpr;

use super::{Operator, evaluate_predicate, single_input};
use crate::changelog::Changelog;
use crate::error::Result;

/// `WHERE` / `HAVING`: a delete passes exactly when the insert it cancels passed.
#[derive(Debug)]
pub struct FilterOp {
    schema: SchemaRef,
    predicate: Arc<dyn PhysicalExpr>,
}

impl FilterOp {
    /// A filter on rows of `schema`.
    pub fn new(schema: SchemaRef, predicate: Arc<dyn PhysicalExpr>) -> Self {
        Self { schema, predicate }
    }
}

impl Operator for FilterOp {
    fn describe(&self) -> String {
        format!("Filter: {}", self.predicate)
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    crate::stateless_checkpoint!();

    fn step(&mut self, inputs: Vec<Changelog>) -> Result<Changelog> {
        let input = single_input(inputs, "filter")?;
        if input.is_empty() {
            return Ok(input);
        }
        let mask = evaluate_predicate(&self.predicate, &input.batch)?;
        input.filter(&mask)
    }
}
