//! `MillraceTable`: the DataFusion `TableProvider` over one table's columnar cache.
//!
//! Scans read a snapshot of the live Arrow chunks; filters that pin the primary key or pin or
//! bound an indexed column become a lookup in that index instead (see `lookup.rs`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::{Constraints, DataFusionError, ScalarValue};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use millrace_storage::{ColumnarTable, RowId, TableSnapshot};

use crate::lookup::{LookupExec, column_range, key_bounds};
use millrace_storage::error::LockResultExt;

/// Everything the planner knows about a table's shape.
#[derive(Debug, Clone)]
pub struct TableDef {
    /// Columns (nullability encodes NOT NULL).
    pub schema: SchemaRef,
    /// Primary-key column indices.
    pub primary_key: Option<Vec<usize>>,
    /// DEFAULT expressions by column name.
    pub defaults: HashMap<String, Expr>,
    /// Constraints as DataFusion sees them (primary key, unique).
    pub constraints: Constraints,
}

/// A durable table as DataFusion sees it.
#[derive(Debug)]
pub struct MillraceTable {
    /// Catalog object id; the table's log in RocksDB is keyed by it.
    pub id: u64,
    /// Shape of the table.
    pub def: TableDef,
    /// The columnar cache holding the table's rows.
    pub rows: Arc<RwLock<ColumnarTable>>,
    /// The CREATE TABLE statement (for `\d` and pg_catalog).
    pub sql: String,
    /// Entries in the table's durable log since it was last rewritten (drives compaction).
    pub log_entries: std::sync::atomic::AtomicUsize,
}

impl MillraceTable {
    /// A consistent snapshot of the table's live rows.
    pub fn snapshot(&self) -> datafusion::error::Result<TableSnapshot> {
        let data = self
            .rows
            .read()
            .or_poisoned("table")
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        data.snapshot()
            .map_err(|e| DataFusionError::External(Box::new(e)))
    }

    /// Answers the scan from the primary key or a secondary index when the filters pin or
    /// bound an indexed column: (EXPLAIN description, matching rows, their row ids). The
    /// rows may be a superset of the filters' answer; DataFusion applies the filters above
    /// the scan.
    pub(crate) fn index_lookup(
        &self,
        filters: &[Expr],
    ) -> datafusion::error::Result<Option<(String, RecordBatch, Vec<RowId>)>> {
        if filters.is_empty() {
            return Ok(None);
        }
        let data = self
            .rows
            .read()
            .or_poisoned("table")
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let Some((description, mut ids)) = self.index_row_ids(&data, filters)? else {
            return Ok(None);
        };
        // NOTE: a key listed twice (`k IN (5, 5)`) finds its row twice: once is the answer.
        // `fetch` skips rows that are not live; keeping only live ids lines the ids up with
        // the rows.
        ids.sort_unstable();
        ids.dedup();
        ids.retain(|id| data.contains(*id));
        let rows = data
            .fetch(&ids)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(Some((description, rows, ids)))
    }

    /// The row ids the primary key or a secondary index give for `filters`, with the
    /// lookup's EXPLAIN description; None when no index applies.
    fn index_row_ids(
        &self,
        data: &ColumnarTable,
        filters: &[Expr],
    ) -> datafusion::error::Result<Option<(String, Vec<RowId>)>> {
        let external = |e: millrace_storage::StorageError| DataFusionError::External(Box::new(e));
        let schema = &self.def.schema;
        if let Some(pk) = &self.def.primary_key {
            let mut per_column: Vec<Vec<ScalarValue>> = Vec::with_capacity(pk.len());
            for &c in pk {
                let f = schema.field(c);
                match column_range(filters, f.name(), f.data_type()).points {
                    Some(points) if !points.is_empty() && (pk.len() == 1 || points.len() == 1) => {
                        per_column.push(points)
                    }
                    Some(points) if points.is_empty() => {
                        return Ok(Some((
                            "PrimaryKeyLookup: no key matches".into(),
                            Vec::new(),
                        )));
                    }
                    _ => break,
                }
            }
            if per_column.len() == pk.len() {
                let mut ids = Vec::new();
                let combos = per_column.first().map(|p| p.len()).unwrap_or(0);
                for i in 0..combos {
                    let mut keys: Vec<ArrayRef> = Vec::with_capacity(pk.len());
                    for (pos, points) in per_column.iter().enumerate() {
                        let v = if pos == 0 { &points[i] } else { &points[0] };
                        keys.push(v.to_array()?);
                    }
                    ids.extend(data.lookup_keys(&keys).map_err(external)?);
                }
                let cols: Vec<&str> = pk
                    .iter()
                    .map(|&c| schema.field(c).name().as_str())
                    .collect();
                return Ok(Some((
                    format!("PrimaryKeyLookup: ({}) keys={combos}", cols.join(", ")),
                    ids,
                )));
            }
        }
        for index in data.indexes() {
            let field = schema.field(index.key_column());
            let range = column_range(filters, field.name(), field.data_type());
            if !range.is_useful() {
                continue;
            }
            let bounds = key_bounds(&range, |v| index.encode(&v.to_array()?).map_err(external))?;
            let mut ids = Vec::new();
            for (lower, upper) in bounds {
                ids.extend(index.range(lower, upper));
            }
            ids.sort_unstable();
            ids.dedup();
            return Ok(Some((
                format!("IndexScan: {} on {} {range}", index.name, field.name()),
                ids,
            )));
        }
        Ok(None)
    }
}

#[async_trait]
impl TableProvider for MillraceTable {
    fn schema(&self) -> SchemaRef {
        self.def.schema.clone()
    }

    fn constraints(&self) -> Option<&Constraints> {
        Some(&self.def.constraints)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn get_table_definition(&self) -> Option<&str> {
        Some(&self.sql)
    }

    fn get_logical_plan(&'_ self) -> Option<Cow<'_, datafusion::logical_expr::LogicalPlan>> {
        None
    }

    fn get_column_default(&self, column: &str) -> Option<&Expr> {
        self.def.defaults.get(column)
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
        if let Some((description, rows, _)) = self.index_lookup(filters)? {
            let rows = match projection {
                Some(p) => rows.project(p)?,
                None => rows,
            };
            return Ok(Arc::new(LookupExec::new(description, rows)));
        }
        let snapshot = {
            let data = self
                .rows
                .read()
                .or_poisoned("table")
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
            data.tiered_snapshot()
                .map_err(|e| DataFusionError::External(Box::new(e)))?
        };
        crate::tiered_scan::scan(state, snapshot, projection, filters)
    }
}
