//! Unnest: expands one list column into a row per element, repeating the row's other
//! columns and its weight (stateless). Set-returning functions in a SELECT list, such as
//! `generate_series(1, x)`, are planned through it.

use datafusion::arrow::array::{Array, ArrayRef, UInt32Array, new_null_array};
use datafusion::arrow::compute::{concat, take};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::cast::as_list_array;

use super::{Operator, single_input};
use crate::changelog::{Changelog, loose, make_batch};
use crate::error::Result;

/// Unnests input column `column`; a NULL list yields one NULL row when `keep_nulls`.
#[derive(Debug)]
pub struct UnnestOp {
    schema: SchemaRef,
    column: usize,
    keep_nulls: bool,
}

impl UnnestOp {
    /// An unnest of input column `column` producing `schema` (same columns, that one
    /// replaced by its elements).
    pub fn new(schema: SchemaRef, column: usize, keep_nulls: bool) -> Self {
        Self {
            schema: loose(&schema),
            column,
            keep_nulls,
        }
    }
}

impl Operator for UnnestOp {
    fn describe(&self) -> String {
        format!("Unnest: column {}", self.column)
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    crate::stateless_checkpoint!();

    fn step(&mut self, inputs: Vec<Changelog>) -> Result<Changelog> {
        let input = single_input(inputs, "unnest")?;
        if input.is_empty() {
            return Ok(Changelog::empty(self.schema.clone()));
        }
        let lists = as_list_array(input.batch.column(self.column))?;
        let element_type = self.schema.field(self.column).data_type().clone();
        // For every output row: the input row it repeats, and where its element comes from
        // (None: a NULL row kept for a NULL list).
        let mut rows: Vec<u32> = Vec::new();
        let mut elements: Vec<ArrayRef> = Vec::new();
        let mut weights = Vec::new();
        for i in 0..lists.len() {
            if lists.is_null(i) {
                if self.keep_nulls {
                    rows.push(i as u32);
                    elements.push(new_null_array(&element_type, 1));
                    weights.push(input.weights[i]);
                }
                continue;
            }
            let values = lists.value(i);
            for _ in 0..values.len() {
                rows.push(i as u32);
                weights.push(input.weights[i]);
            }
            elements.push(values);
        }
        if rows.is_empty() {
            return Ok(Changelog::empty(self.schema.clone()));
        }
        let indices = UInt32Array::from(rows);
        let refs: Vec<&dyn Array> = elements.iter().map(|a| a.as_ref()).collect();
        let unnested = concat(&refs)?;
        let mut columns = Vec::with_capacity(input.batch.num_columns());
        for (j, column) in input.batch.columns().iter().enumerate() {
            columns.push(if j == self.column {
                unnested.clone()
            } else {
                take(column.as_ref(), &indices, None)?
            });
        }
        let batch = make_batch(&self.schema, columns, weights.len())?;
        Ok(Changelog::new(batch, weights))
    }
}
