//! Union: UNION ALL of its inputs' changelogs (stateless). UNION, INTERSECT and EXCEPT are
//! planned by DataFusion as this plus a distinct aggregate or a semi/anti join.

use datafusion::arrow::datatypes::SchemaRef;

use super::Operator;
use crate::changelog::{Changelog, loose};
use crate::error::Result;

/// Concatenates the inputs' changes under the union's schema.
#[derive(Debug)]
pub struct UnionOp {
    schema: SchemaRef,
}

impl UnionOp {
    /// A union producing `schema`.
    pub fn new(schema: SchemaRef) -> Self {
        Self {
            schema: loose(&schema),
        }
    }
}

impl Operator for UnionOp {
    fn describe(&self) -> String {
        "UnionAll".into()
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    crate::stateless_checkpoint!();

    fn step(&mut self, inputs: Vec<Changelog>) -> Result<Changelog> {
        Changelog::concat(&self.schema, inputs)
    }
}
