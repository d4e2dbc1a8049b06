//! Tables the planner's integration tests build pipelines over: `(id, k, pad)`, empty, with
//! no primary key (the pipelines are fed changelogs directly).

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::Constraints;
use millrace_planner::{MillraceTable, TableDef};
use millrace_storage::ColumnarTable;

pub type Error = Box<dyn std::error::Error>;

/// `(id BIGINT, k BIGINT, pad TEXT)`.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("k", DataType::Int64, true),
        Field::new("pad", DataType::Utf8, true),
    ]))
}

/// An empty table of [`schema`] with catalog id `id`.
pub fn table(id: u64) -> Result<Arc<MillraceTable>, Error> {
    Ok(Arc::new(MillraceTable {
        id,
        def: TableDef {
            schema: schema(),
            primary_key: None,
            defaults: HashMap::new(),
            constraints: Constraints::default(),
        },
        rows: Arc::new(RwLock::new(ColumnarTable::try_new(schema(), None)?)),
        sql: String::new(),
        log_entries: AtomicUsize::new(0),
    }))
}
