//! Tables and views from their definitions: a stored CREATE TABLE or CREATE VIEW record
//! planned into a live [`MillraceTable`] (an empty cache, filled by replay or DML) or a
//! DataFusion view. Used by DDL statements and by the replay at start alike.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::catalog::view::ViewTable;
use datafusion::common::Constraint;
use datafusion::logical_expr::{CreateMemoryTable, DdlStatement, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{self, ColumnOption, Statement};
use millrace_planner::{MillraceTable, TableDef};
use millrace_storage::{CatalogRecord, ColumnarTable};

use crate::error::{Result, ServerError};

/// Maps PostgreSQL column types DataFusion does not know onto ones it does.
pub(crate) fn rewrite_column_types(columns: &mut [ast::ColumnDef]) {
    for column in columns {
        if matches!(column.data_type, ast::DataType::JSON | ast::DataType::JSONB) {
            column.data_type = ast::DataType::Text;
        }
    }
}

/// Plans a CREATE TABLE statement and derives the table's definition.
pub(crate) async fn plan_table(
    ctx: &SessionContext,
    create: &ast::CreateTable,
) -> Result<(CreateMemoryTable, TableDef)> {
    // NOTE: connector options are ours; DataFusion plans only the columns.
    let mut columns_only = create.clone();
    columns_only.table_options = ast::CreateTableOptions::None;
    let plan = ctx
        .state()
        .statement_to_plan(DFStatement::Statement(Box::new(Statement::CreateTable(
            columns_only,
        ))))
        .await?;
    let LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(cmt)) = plan else {
        return Err(ServerError::Internal(
            "CREATE TABLE did not plan to a table".into(),
        ));
    };
    let input_schema = cmt.input.schema().as_arrow().clone();
    let mut primary_key = None;
    for constraint in cmt.constraints.iter() {
        if let Constraint::PrimaryKey(cols) = constraint {
            primary_key = Some(cols.clone());
        }
    }
    let not_null: Vec<bool> = create
        .columns
        .iter()
        .map(|c| {
            c.options
                .iter()
                .any(|o| matches!(o.option, ColumnOption::NotNull))
        })
        .collect();
    let fields: Vec<Field> = input_schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let required = primary_key.as_ref().is_some_and(|pk| pk.contains(&i))
                || not_null.get(i).copied().unwrap_or(false)
                || !f.is_nullable() && create.query.is_none();
            Field::new(f.name(), storage_type(f.data_type()), !required)
        })
        .collect();
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    let def = TableDef {
        schema,
        primary_key,
        defaults: cmt
            .column_defaults
            .iter()
            .cloned()
            .collect::<HashMap<_, _>>(),
        constraints: cmt.constraints.clone(),
    };
    Ok((cmt, def))
}

/// Types as stored: views of strings become plain strings.
fn storage_type(t: &DataType) -> DataType {
    match t {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        DataType::Null => DataType::Utf8,
        other => other.clone(),
    }
}

/// Rebuilds a table (empty cache) from its durable record.
pub async fn build_table(
    ctx: &SessionContext,
    record: &CatalogRecord,
) -> Result<Arc<MillraceTable>> {
    let stmt = crate::sql::parse_one(&record.sql)?;
    let Statement::CreateTable(mut create) = stmt else {
        return Err(ServerError::Internal(format!(
            "record {} is not CREATE TABLE",
            record.id
        )));
    };
    rewrite_column_types(&mut create.columns);
    let (_, def) = plan_table(ctx, &create).await?;
    new_table(record.id, def, record.sql.clone())
}

pub(crate) fn new_table(id: u64, def: TableDef, sql: String) -> Result<Arc<MillraceTable>> {
    let data = ColumnarTable::try_new(def.schema.clone(), def.primary_key.clone())?;
    Ok(Arc::new(MillraceTable {
        id,
        def,
        rows: Arc::new(RwLock::new(data)),
        sql,
        log_entries: Default::default(),
    }))
}

/// Rebuilds a view from its durable record.
pub async fn build_view(
    ctx: &SessionContext,
    record: &CatalogRecord,
) -> Result<Arc<dyn TableProvider>> {
    let plan = ctx
        .state()
        .statement_to_plan(DFStatement::Statement(Box::new(crate::sql::parse_one(
            &record.sql,
        )?)))
        .await?;
    let LogicalPlan::Ddl(DdlStatement::CreateView(view)) = plan else {
        return Err(ServerError::Internal(format!(
            "record {} is not CREATE VIEW",
            record.id
        )));
    };
    Ok(Arc::new(ViewTable::new(
        view.input.as_ref().clone(),
        Some(record.sql.clone()),
    )))
}
