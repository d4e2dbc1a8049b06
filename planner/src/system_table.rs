//! System tables (`millrace_views`, ...): read-only relations computed when scanned, the one
//! builder every system table is declared with (a column per field of a row type), and the
//! schema provider that makes them resolvable from every schema without listing them among
//! the user's tables.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
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

/// A column's value read off a row (None: NULL).
type Get<R, T> = Box<dyn Fn(&R) -> Option<T> + Send + Sync>;

/// How a column's values are read off a row.
enum Getter<R> {
    Text(Get<R, String>),
    Int(Get<R, i64>),
    Int32(Get<R, i32>),
    UInt64(Get<R, u64>),
    Float(Get<R, f64>),
    Bool(Get<R, bool>),
    Time(Get<R, SystemTime>),
}

/// Declares a system table as columns read off a row type `R`: each column a name, whether
/// it may be NULL, and a function of the row. [`SystemTableBuilder::build`] takes the
/// function that lists the rows when the table is scanned.
pub struct SystemTableBuilder<R> {
    columns: Vec<(Field, Getter<R>)>,
}

impl<R: 'static> Default for SystemTableBuilder<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: 'static> SystemTableBuilder<R> {
    /// A table with no columns yet.
    pub fn new() -> Self {
        Self {
            columns: Vec::new(),
        }
    }

    fn push(mut self, name: &str, data_type: DataType, nullable: bool, get: Getter<R>) -> Self {
        self.columns
            .push((Field::new(name, data_type, nullable), get));
        self
    }

    /// A text column, never NULL.
    pub fn text(self, name: &str, f: impl Fn(&R) -> String + Send + Sync + 'static) -> Self {
        self.push(
            name,
            DataType::Utf8,
            false,
            Getter::Text(Box::new(move |r| Some(f(r)))),
        )
    }

    /// A text column that may be NULL.
    pub fn text_or_null(
        self,
        name: &str,
        f: impl Fn(&R) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.push(name, DataType::Utf8, true, Getter::Text(Box::new(f)))
    }

    /// A bigint column, never NULL.
    pub fn int(self, name: &str, f: impl Fn(&R) -> i64 + Send + Sync + 'static) -> Self {
        self.push(
            name,
            DataType::Int64,
            false,
            Getter::Int(Box::new(move |r| Some(f(r)))),
        )
    }

    /// A bigint column that may be NULL.
    pub fn int_or_null(
        self,
        name: &str,
        f: impl Fn(&R) -> Option<i64> + Send + Sync + 'static,
    ) -> Self {
        self.push(name, DataType::Int64, true, Getter::Int(Box::new(f)))
    }

    /// An unsigned 64-bit column (numeric on the wire), never NULL.
    pub fn unsigned(self, name: &str, f: impl Fn(&R) -> u64 + Send + Sync + 'static) -> Self {
        self.push(
            name,
            DataType::UInt64,
            false,
            Getter::UInt64(Box::new(move |r| Some(f(r)))),
        )
    }

    /// An integer (int4) column that may be NULL.
    pub fn int32_or_null(
        self,
        name: &str,
        f: impl Fn(&R) -> Option<i32> + Send + Sync + 'static,
    ) -> Self {
        self.push(name, DataType::Int32, true, Getter::Int32(Box::new(f)))
    }

    /// A double precision column, never NULL.
    pub fn float(self, name: &str, f: impl Fn(&R) -> f64 + Send + Sync + 'static) -> Self {
        self.push(
            name,
            DataType::Float64,
            false,
            Getter::Float(Box::new(move |r| Some(f(r)))),
        )
    }

    /// A double precision column that may be NULL.
    pub fn float_or_null(
        self,
        name: &str,
        f: impl Fn(&R) -> Option<f64> + Send + Sync + 'static,
    ) -> Self {
        self.push(name, DataType::Float64, true, Getter::Float(Box::new(f)))
    }

    /// A boolean column, never NULL.
    pub fn boolean(self, name: &str, f: impl Fn(&R) -> bool + Send + Sync + 'static) -> Self {
        self.push(
            name,
            DataType::Boolean,
            false,
            Getter::Bool(Box::new(move |r| Some(f(r)))),
        )
    }

    /// A `timestamptz` column (microseconds, UTC), never NULL.
    pub fn time(self, name: &str, f: impl Fn(&R) -> SystemTime + Send + Sync + 'static) -> Self {
        self.push(
            name,
            timestamptz(),
            false,
            Getter::Time(Box::new(move |r| Some(f(r)))),
        )
    }

    /// A `timestamptz` column that may be NULL.
    pub fn time_or_null(
        self,
        name: &str,
        f: impl Fn(&R) -> Option<SystemTime> + Send + Sync + 'static,
    ) -> Self {
        self.push(name, timestamptz(), true, Getter::Time(Box::new(f)))
    }

    /// The table, whose rows `rows` lists each time it is scanned.
    pub fn build(self, rows: impl Fn() -> Vec<R> + Send + Sync + 'static) -> SystemTable
    where
        R: 'static,
    {
        let schema: SchemaRef = Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|(f, _)| f.clone())
                .collect::<Vec<_>>(),
        ));
        let getters: Vec<Getter<R>> = self.columns.into_iter().map(|(_, g)| g).collect();
        let table_schema = schema.clone();
        let fill: Fill = Arc::new(move || {
            let rows = rows();
            let columns: Vec<ArrayRef> = getters
                .iter()
                .map(|getter| -> ArrayRef {
                    match getter {
                        Getter::Text(f) => Arc::new(StringArray::from_iter(rows.iter().map(f))),
                        Getter::Int(f) => Arc::new(Int64Array::from_iter(rows.iter().map(f))),
                        Getter::Int32(f) => Arc::new(Int32Array::from_iter(rows.iter().map(f))),
                        Getter::UInt64(f) => Arc::new(UInt64Array::from_iter(rows.iter().map(f))),
                        Getter::Float(f) => Arc::new(Float64Array::from_iter(rows.iter().map(f))),
                        Getter::Bool(f) => Arc::new(BooleanArray::from_iter(rows.iter().map(f))),
                        Getter::Time(f) => Arc::new(
                            TimestampMicrosecondArray::from_iter(
                                rows.iter().map(|r| f(r).map(micros)),
                            )
                            .with_timezone("+00:00"),
                        ),
                    }
                })
                .collect();
            Ok(RecordBatch::try_new(table_schema.clone(), columns)?)
        });
        SystemTable::new(schema, fill)
    }
}

/// The type of a system table's time columns.
fn timestamptz() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into()))
}

/// Microseconds since the Unix epoch (negative before it).
fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use datafusion::arrow::array::Array;
    use datafusion::prelude::SessionContext;

    use super::*;

    struct Row {
        name: &'static str,
        n: i64,
        reason: Option<&'static str>,
        at: SystemTime,
    }

    #[tokio::test]
    async fn a_built_table_reads_each_column_off_the_rows_when_scanned()
    -> datafusion::error::Result<()> {
        let table = SystemTableBuilder::<Row>::new()
            .text("name", |r| r.name.to_string())
            .int("n", |r| r.n)
            .text_or_null("reason", |r| r.reason.map(str::to_string))
            .float("half", |r| r.n as f64 / 2.0)
            .boolean("even", |r| r.n % 2 == 0)
            .time("at", |r| r.at)
            .build(|| {
                vec![
                    Row {
                        name: "a",
                        n: 3,
                        reason: None,
                        at: UNIX_EPOCH + Duration::from_micros(1_500_000),
                    },
                    Row {
                        name: "b",
                        n: -4,
                        reason: Some("why"),
                        at: UNIX_EPOCH - Duration::from_micros(2),
                    },
                ]
            });
        let schema = table.schema();
        let nullable: Vec<bool> = schema.fields().iter().map(|f| f.is_nullable()).collect();
        assert_eq!(nullable, [false, false, true, false, false, false]);
        assert_eq!(schema.field(5).data_type(), &timestamptz());
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(table))?;
        let batches = ctx
            .sql("SELECT name, n, reason, half, even, at FROM t ORDER BY name")
            .await?
            .collect()
            .await?;
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)?.to_string();
        let expected = [
            "+------+----+--------+------+-------+-----------------------------+",
            "| name | n  | reason | half | even  | at                          |",
            "+------+----+--------+------+-------+-----------------------------+",
            "| a    | 3  |        | 1.5  | false | 1970-01-01T00:00:01.500Z    |",
            "| b    | -4 | why    | -2.0 | true  | 1969-12-31T23:59:59.999998Z |",
            "+------+----+--------+------+-------+-----------------------------+",
        ]
        .join("\n");
        assert_eq!(text, expected);
        assert_eq!(batches[0].column(2).null_count(), 1);
        Ok(())
    }
}
