//! System tables (`millrace_views`, ...): read-only relations computed when scanned, and
//! the schema provider that makes them resolvable from every schema without listing them
//! among the user's tables.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider, Session};
use datafusion::common::DataFusionError;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

/// Computes a system table's rows at scan time.
pub type Fill = Arc<dyn Fn() -> datafusion::error::Result<RecordBatch> + Send + Sync>;

/// A read-only relation whose rows are computed when it is scanned.
pub struct SystemTable {
    schema: SchemaRef,
    fill: Fill,
}

impl std::fmt::Debug for SystemTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemTable")
            .field("schema", &self.schema)
            .finish()
    }
}

impl SystemTable {
    /// A system table of `schema` filled by `fill`.
    pub fn new(schema: SchemaRef, fill: Fill) -> Self {
        Self { schema, fill }
    }
}

#[async_trait]
impl TableProvider for SystemTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let batch = (self.fill)()?;
        if batch.schema().fields() != self.schema.fields() {
            return Err(DataFusionError::Internal(
                "system table rows do not match its schema".into(),
            ));
        }
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            self.schema.clone(),
            projection.cloned(),
        )?)
    }
}

/// System tables by name, shared by every schema.
pub type SystemTables = Arc<RwLock<HashMap<String, Arc<dyn TableProvider>>>>;

/// A schema's tables, falling back to the system tables for names it does not hold.
#[derive(Debug)]
pub struct UserSchema {
    inner: MemorySchemaProvider,
    system: SystemTables,
}

impl UserSchema {
    /// An empty schema that also resolves `system` names.
    pub fn new(system: SystemTables) -> Self {
        Self {
            inner: MemorySchemaProvider::new(),
            system,
        }
    }

    fn system_table(&self, name: &str) -> Option<Arc<dyn TableProvider>> {
        self.system.read().ok()?.get(name).cloned()
    }
}

#[async_trait]
impl SchemaProvider for UserSchema {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        match self.inner.table(name).await? {
            Some(t) => Ok(Some(t)),
            None => Ok(self.system_table(name)),
        }
    }

    fn register_table(
        &self,
        name: String,
        table: Arc<dyn TableProvider>,
    ) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        self.inner.register_table(name, table)
    }

    fn deregister_table(
        &self,
        name: &str,
    ) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        self.inner.deregister_table(name)
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name) || self.system_table(name).is_some()
    }
}
