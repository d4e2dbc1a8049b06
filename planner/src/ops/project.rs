//! Projection: computes the output columns of each changelog row (stateless).

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::physical_plan::PhysicalExpr;

use super::{Operator, evaluate, single_input};
use crate::changelog::{Changelog, loose, make_batch};
use crate::error::Result;

/// `SELECT expr, ...`: every row keeps its weight.
#[derive(Debug)]
pub struct ProjectOp {
    schema: SchemaRef,
    exprs: Vec<Arc<dyn PhysicalExpr>>,
}

impl ProjectOp {
    /// A projection producing `schema` from `exprs`.
    pub fn new(schema: SchemaRef, exprs: Vec<Arc<dyn PhysicalExpr>>) -> Self {
        Self {
            schema: loose(&schema),
            exprs,
        }
    }
}

impl Operator for ProjectOp {
    fn describe(&self) -> String {
        let exprs: Vec<String> = self.exprs.iter().map(|e| e.to_string()).collect();
        format!("Project: {}", exprs.join(", "))
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    crate::stateless_checkpoint!();

    fn step(&mut self, inputs: Vec<Changelog>) -> Result<Changelog> {
        let input = single_input(inputs, "projection")?;
        if input.is_empty() {
            return Ok(Changelog::empty(self.schema.clone()));
        }
        let columns = evaluate(&self.exprs, &input.batch)?;
        let batch = make_batch(&self.schema, columns, input.len())?;
        Ok(Changelog::new(batch, input.weights))
    }
}
