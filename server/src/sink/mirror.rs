//! What a sink has delivered so far: the view's rows as of its last delivered epoch, as
//! encoded rows with their number of copies, in memory and in RocksDB.
//!
//! A sink that (re)starts, or that fell behind its view's feed, compares the mirror with a
//! snapshot of the view; the difference is exactly the change downstream has not seen, so a
//! restart neither repeats nor skips a change whatever happened in between.

use std::collections::HashMap;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use millrace_planner::Changelog;
use millrace_planner::changelog::RowCodec;
use millrace_storage::Store;

use crate::error::{Result, ServerError};

/// The delivered contents of one sink's view.
#[derive(Debug)]
pub struct Mirror {
    schema: SchemaRef,
    codec: RowCodec,
    rows: HashMap<Vec<u8>, i64>,
}

impl Mirror {
    /// The mirror sink `id` committed, for a view of `schema`.
    pub fn load(store: &Store, id: u64, schema: SchemaRef) -> Result<Self> {
        let codec = RowCodec::for_schema(&schema).map_err(plan)?;
        let rows = store.sink_rows(id)?.into_iter().collect();
        Ok(Self {
            schema,
            codec,
            rows,
        })
    }

    /// Rows delivered (with copies).
    pub fn len(&self) -> i64 {
        self.rows.values().sum()
    }

    /// True when nothing is delivered.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The change that turns what was delivered into `contents`.
    pub fn diff(&self, contents: &[RecordBatch]) -> Result<Changelog> {
        let mut want: HashMap<Vec<u8>, i64> = HashMap::new();
        for batch in contents {
            let encoded = self
                .codec
                .encode(batch.columns(), batch.num_rows())
                .map_err(plan)?;
            for i in 0..batch.num_rows() {
                *want.entry(encoded.row(i).to_vec()).or_default() += 1;
            }
        }
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut weights: Vec<i64> = Vec::new();
        for (key, n) in &want {
            let w = n - self.rows.get(key).copied().unwrap_or(0);
            if w != 0 {
                keys.push(key.clone());
                weights.push(w);
            }
        }
        for (key, n) in &self.rows {
            if !want.contains_key(key) {
                keys.push(key.clone());
                weights.push(-n);
            }
        }
        self.changelog(&keys, weights)
    }

    /// Applies a delivered change; returns every touched row with its new number of copies.
    pub fn apply(&mut self, changes: &Changelog) -> Result<Vec<(Vec<u8>, i64)>> {
        let batch = &changes.batch;
        let encoded = self
            .codec
            .encode(batch.columns(), batch.num_rows())
            .map_err(plan)?;
        let mut touched: HashMap<Vec<u8>, i64> = HashMap::new();
        for (i, w) in changes.weights.iter().enumerate() {
            let key = encoded.row(i).to_vec();
            let count = self.rows.entry(key.clone()).or_default();
            *count += w;
            if *count < 0 {
                return Err(ServerError::Internal(
                    "sink would delete a row it never delivered".into(),
                ));
            }
            touched.insert(key, *count);
        }
        self.rows.retain(|_, n| *n != 0);
        Ok(touched.into_iter().collect())
    }

    fn changelog(&self, keys: &[Vec<u8>], weights: Vec<i64>) -> Result<Changelog> {
        if keys.is_empty() {
            return Ok(Changelog::empty(self.schema.clone()));
        }
        let columns = self
            .codec
            .decode(keys.iter().map(|k| k.as_slice()))
            .map_err(plan)?;
        let batch = RecordBatch::try_new(self.schema.clone(), columns)?;
        Ok(Changelog::new(batch, weights))
    }
}

fn plan(e: millrace_planner::PlanError) -> ServerError {
    ServerError::Plan(e)
}
