//! `MaterializedView`: the DataFusion `TableProvider` over a materialized view's stored
//! result. The view runtime writes the contents once per epoch; a SELECT scans a snapshot
//! of them, so reading a view never runs its query.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::DataFusionError;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use millrace_storage::{TableSnapshot, TieredSnapshot, ViewContents};

use crate::error::PlanError;
use millrace_storage::error::LockResultExt;

/// Where a materialized view is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewStatus {
    /// Computing its initial contents.
    Backfilling,
    /// Maintained every epoch.
    Running,
    /// Its pipeline failed (the cause is kept) and is being restarted; reads wait for it.
    Recovering(String),
    /// Its pipeline stopped on an error; reads report it.
    Failed(String),
}

impl ViewStatus {
    /// Whether the view is computing its contents (built, restored or restarted), so that
    /// reads wait for it.
    pub fn is_busy(&self) -> bool {
        matches!(self, ViewStatus::Backfilling | ViewStatus::Recovering(_))
    }

    /// Name shown in `millrace_views`.
    pub fn label(&self) -> &'static str {
        match self {
            ViewStatus::Backfilling => "backfilling",
            ViewStatus::Running => "running",
            ViewStatus::Recovering(_) => "recovering",
            ViewStatus::Failed(_) => "failed",
        }
    }
}

/// A materialized view as DataFusion sees it.
#[derive(Debug)]
pub struct MaterializedView {
    /// Catalog object id.
    pub id: u64,
    /// Qualified name, for messages.
    pub name: String,
    /// Row schema of the view.
    pub schema: SchemaRef,
    /// The CREATE MATERIALIZED VIEW statement.
    pub sql: String,
    /// The maintained rows.
    pub contents: Arc<RwLock<ViewContents>>,
    /// Backfilling, running or failed.
    pub status: Arc<RwLock<ViewStatus>>,
}

impl MaterializedView {
    /// A view with empty contents of `schema`, in `status`.
    pub fn new(
        id: u64,
        name: String,
        schema: SchemaRef,
        sql: String,
        status: ViewStatus,
    ) -> Result<Self, PlanError> {
        Ok(Self {
            id,
            name,
            contents: Arc::new(RwLock::new(ViewContents::try_new(schema.clone())?)),
            schema,
            sql,
            status: Arc::new(RwLock::new(status)),
        })
    }

    /// The current status.
    pub fn status(&self) -> ViewStatus {
        self.status
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|_| ViewStatus::Failed("status lock poisoned".into()))
    }

    /// A snapshot of the contents, or why there is none: the error that stopped the view,
    /// or that it is still computing its contents (after CREATE, a restart or a failure).
    pub fn snapshot(&self) -> Result<TableSnapshot, PlanError> {
        self.readable()?;
        let contents = self.contents.read().or_poisoned("view contents")?;
        Ok(contents.snapshot()?)
    }

    /// Like [`MaterializedView::snapshot`], leaving cold chunks on object storage.
    pub fn tiered_snapshot(&self) -> Result<TieredSnapshot, PlanError> {
        self.readable()?;
        let contents = self.contents.read().or_poisoned("view contents")?;
        Ok(contents.table().tiered_snapshot()?)
    }

    /// Whether the contents can be read now, or why not.
    fn readable(&self) -> Result<(), PlanError> {
        match self.status() {
            ViewStatus::Running => {}
            ViewStatus::Failed(reason) => {
                return Err(PlanError::ViewFailed {
                    view: self.name.clone(),
                    reason,
                });
            }
            ViewStatus::Backfilling => {
                return Err(PlanError::ViewNotReady {
                    view: self.name.clone(),
                    state: "being built".into(),
                });
            }
            ViewStatus::Recovering(reason) => {
                return Err(PlanError::ViewNotReady {
                    view: self.name.clone(),
                    state: format!("recovering from a failure ({reason})"),
                });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl TableProvider for MaterializedView {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    // NOTE: pg_catalog (datafusion-pg-catalog) knows relkinds 'r' and 'v' only, so a
    // materialized view is listed by `\d` and `\dv` as a view rather than as a table.
    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn get_table_definition(&self) -> Option<&str> {
        Some(&self.sql)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // Inexact: the filters prune row groups of cold chunks; DataFusion applies them.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let snapshot = self
            .tiered_snapshot()
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        crate::tiered_scan::scan(state, snapshot, projection, filters)
    }
}
