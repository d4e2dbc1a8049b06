//! `RowIdTable`: a table as DML sees it, with the hidden `__rowid` column appended.
//!
//! UPDATE and DELETE plans are rewritten to scan this provider instead of the table, so that
//! DataFusion evaluates any WHERE clause (subqueries, joins of UPDATE ... FROM) and returns
//! the row ids to change. Filters that pin the primary key or pin or bound an indexed
//! column read just those rows, as a query's scan does (see `table.rs`).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::DataFusionError;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

use crate::lookup::LookupExec;
use crate::table::MillraceTable;
use millrace_storage::error::LockResultExt;

/// Name of the hidden row-id column.
pub const ROW_ID_COLUMN: &str = "__rowid";

/// A table plus its row ids.
#[derive(Debug)]
pub struct RowIdTable {
    /// The table being changed.
    table: Arc<MillraceTable>,
    /// The table's columns followed by `__rowid`.
    schema: SchemaRef,
}

impl RowIdTable {
    /// Wraps a table.
    pub fn new(table: Arc<MillraceTable>) -> Self {
        let mut fields: Vec<Arc<Field>> = table.def.schema.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(ROW_ID_COLUMN, DataType::UInt64, false)));
        Self {
            table,
            schema: Arc::new(Schema::new(fields)),
        }
    }
}

#[async_trait]
impl TableProvider for RowIdTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        if let Some((description, rows, ids)) = self.table.index_lookup(filters)? {
            let mut columns: Vec<ArrayRef> = rows.columns().to_vec();
            columns.push(Arc::new(UInt64Array::from(ids)));
            let rows = RecordBatch::try_new(self.schema.clone(), columns)?;
            let rows = match projection {
                Some(p) => rows.project(p)?,
                None => rows,
            };
            return Ok(Arc::new(LookupExec::new(description, rows)));
        }
        // Cold chunks are read a file at a time (no pruning: every row's id must line up).
        let snapshot = {
            let data = self
                .table
                .rows
                .read()
                .or_poisoned("table")
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
            data.tiered_snapshot_with_ids(self.schema.clone())
                .map_err(|e| DataFusionError::External(Box::new(e)))?
        };
        crate::tiered_scan::scan(state, snapshot, projection, &[])
    }
}
