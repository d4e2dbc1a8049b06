//! `MillraceTable`: the DataFusion `TableProvider` over one table's columnar cache.
//!
//! Scans read a snapshot of the live Arrow chunks; an equality filter on every primary-key
//! column becomes a point lookup in the key index instead of a scan.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::{Constraints, DataFusionError, ScalarValue};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use millrace_storage::{ColumnarTable, TableSnapshot};

/// Rows per scan partition above which a scan is split across partitions.
const ROWS_PER_PARTITION: usize = 65_536;

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
    pub data: Arc<RwLock<ColumnarTable>>,
    /// The CREATE TABLE statement (for `\d` and pg_catalog).
    pub sql: String,
    /// Entries in the table's durable log since it was last rewritten (drives compaction).
    pub log_entries: std::sync::atomic::AtomicUsize,
}

impl MillraceTable {
    /// A consistent snapshot of the table's live rows.
    pub fn snapshot(&self) -> datafusion::error::Result<TableSnapshot> {
        let data = self
            .data
            .read()
            .map_err(|_| DataFusionError::Internal("table lock poisoned".into()))?;
        data.snapshot()
            .map_err(|e| DataFusionError::External(Box::new(e)))
    }

    /// If `filters` pin every primary-key column to a literal, the matching rows.
    fn point_lookup(&self, filters: &[Expr]) -> datafusion::error::Result<Option<RecordBatch>> {
        let Some(pk) = &self.def.primary_key else {
            return Ok(None);
        };
        let mut values: Vec<Option<ScalarValue>> = vec![None; pk.len()];
        for filter in filters {
            for conjunct in split_and(filter) {
                if let Some((col, value)) = column_eq_literal(conjunct)
                    && let Ok(idx) = self.def.schema.index_of(&col)
                    && let Some(pos) = pk.iter().position(|&c| c == idx)
                {
                    values[pos] = Some(value);
                }
            }
        }
        let mut keys: Vec<ArrayRef> = Vec::with_capacity(pk.len());
        for (pos, value) in values.into_iter().enumerate() {
            let Some(value) = value else {
                return Ok(None);
            };
            let target = self.def.schema.field(pk[pos]).data_type();
            let Ok(cast) = value.cast_to(target) else {
                return Ok(None);
            };
            // NOTE: a literal that changes under the cast (1.5 -> 2) matches no key exactly;
            // leave such filters to the scan.
            if cast.cast_to(&value.data_type()).ok().as_ref() != Some(&value) {
                return Ok(None);
            }
            let value = cast;
            if value.is_null() {
                return Ok(Some(RecordBatch::new_empty(self.def.schema.clone())));
            }
            keys.push(value.to_array()?);
        }
        let data = self
            .data
            .read()
            .map_err(|_| DataFusionError::Internal("table lock poisoned".into()))?;
        let ids = data
            .lookup_keys(&keys)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let rows = data
            .fetch(&ids)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(Some(rows))
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
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let partitions = match self.point_lookup(filters)? {
            Some(rows) => vec![vec![rows]],
            None => partition(self.snapshot()?.batches),
        };
        Ok(MemorySourceConfig::try_new_exec(
            &partitions,
            self.def.schema.clone(),
            projection.cloned(),
        )?)
    }
}

/// Spreads batches over partitions so that large scans run in parallel.
fn partition(batches: Vec<RecordBatch>) -> Vec<Vec<RecordBatch>> {
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let n = (rows / ROWS_PER_PARTITION).clamp(1, 8);
    let mut out = vec![Vec::new(); n];
    for (i, b) in batches.into_iter().enumerate() {
        out[i % n].push(b);
    }
    out
}

fn split_and(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut v = split_and(left);
            v.extend(split_and(right));
            v
        }
        other => vec![other],
    }
}

fn column_eq_literal(expr: &Expr) -> Option<(String, ScalarValue)> {
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Eq,
        right,
    }) = expr
    else {
        return None;
    };
    // NOTE: only the literal side may carry a cast: a cast on the column (text to int, say)
    // can map several stored values to one key, so the lookup would miss rows.
    match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), other) | (other, Expr::Column(c)) => match strip_cast(other) {
            Expr::Literal(v, _) => Some((c.name.clone(), v.clone())),
            _ => None,
        },
        _ => None,
    }
}

fn strip_cast(expr: &Expr) -> &Expr {
    match expr {
        Expr::Cast(c) => strip_cast(&c.expr),
        Expr::TryCast(c) => strip_cast(&c.expr),
        other => other,
    }
}
