//! DDL: CREATE / DROP / ALTER of databases, schemas, tables, views and indexes.
//!
//! Each statement commits its catalog records (and any table-log rewrite) as one write set
//! before the in-memory catalog changes, so a crash never leaves half an object behind.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::view::ViewTable;
use datafusion::logical_expr::{DdlStatement, ExprSchemable, LogicalPlan};
use datafusion::prelude::DataFrame;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    self, AlterTableOperation, ObjectType, SchemaName, Statement,
};
use millrace_planner::view_table::ViewStatus;
use millrace_planner::{PlanError, TableDef};
use millrace_storage::{CatalogRecord, ObjectKind, WriteSet};
use tracing::info;

use crate::catalog::index::{attach_indexes, index_columns};
use crate::catalog::options::ConnectorOptions;
use crate::catalog::records::database_records;
use crate::catalog::relation::{new_table, plan_table, rewrite_column_types};
use crate::engine::TableChange;
use crate::error::{Result, ServerError};
use crate::exec::names::{self, relation_exists, require_schema};
use crate::exec::output::Output;
use crate::exec::query::relation_dependencies;
use crate::session::Session;
use crate::sql::parse_one;
use millrace_planner::error::ObjectClass;
use millrace_storage::error::LockResultExt;

/// Runs a DDL statement.
pub async fn run(session: &mut Session, stmt: Statement) -> Result<Output> {
    match stmt {
        Statement::CreateTable(create) => create_table(session, create).await,
        Statement::CreateView(view) => create_view(session, view).await,
        Statement::CreateSchema {
            schema_name,
            if_not_exists,
            ..
        } => create_schema(session, schema_name, if_not_exists),
        Statement::CreateDatabase {
            db_name,
            if_not_exists,
            ..
        } => create_database(session, &db_name, if_not_exists),
        Statement::CreateIndex(index) => create_index(session, index).await,
        Statement::Drop {
            object_type,
            if_exists,
            names,
            cascade,
            ..
        } => drop_objects(session, object_type, if_exists, &names, cascade).await,
        Statement::AlterTable(alter) => alter_table(session, alter).await,
        other => Err(ServerError::NotSupported(format!(
            "statement {}",
            first_words(&other.to_string())
        ))),
    }
}

/// The first two words of a statement, for error messages.
pub fn first_words(sql: &str) -> String {
    sql.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

async fn create_table(session: &mut Session, mut create: ast::CreateTable) -> Result<Output> {
    let name = names::resolve(session, &create.name)?;
    require_schema(session, &name)?;
    if relation_exists(session, &name).is_some() {
        if create.if_not_exists {
            return Ok(Output::command("CREATE TABLE"));
        }
        return Err(PlanError::DuplicateObject {
            kind: ObjectClass::Relation,
            name: name.name,
        }
        .into());
    }
    crate::connector::format::avro::prepare_table(&mut create)?;
    rewrite_column_types(&mut create.columns);
    let (cmt, def) = plan_table(&session.ctx, &create).await?;
    let connector = ConnectorOptions::from_table(&create.table_options)?;
    if let Some(options) = &connector {
        if create.query.is_some() {
            return Err(ServerError::NotSupported(
                "CREATE TABLE ... AS with a connector".into(),
            ));
        }
        // NOTE: validates the options against the columns before anything is stored.
        crate::connector::validate(options, &def.schema)?;
    }
    let sql = if create.query.is_some() {
        column_ddl(&name.name, &def.schema)?
    } else {
        create.to_string()
    };
    let id = session.engine.store().allocate_object_id();
    let record = CatalogRecord {
        id,
        kind: ObjectKind::Table,
        database: name.database.clone(),
        schema: name.schema.clone(),
        name: name.name.clone(),
        sql: sql.clone(),
        depends_on: vec![],
        search_schema: Some(session.current_schema()),
    };
    let table = new_table(id, def, sql)?;
    let mut rows = None;
    let _write = session.engine.write_lock.lock().await;
    let mut set = WriteSet::new();
    set.put_catalog(record.clone());
    if create.query.is_some() {
        let batches = DataFrame::new(session.state(), cmt.input.as_ref().clone())
            .collect()
            .await?;
        let schema = cmt.input.schema().as_arrow().clone();
        let batch = datafusion::arrow::compute::concat_batches(&Arc::new(schema), &batches)?;
        let batch = rename_columns(&batch, &table.def.schema)?;
        rows = Some(batch.num_rows());
        let change = TableChange {
            table: table.clone(),
            table_name: name.name.clone(),
            deletes: vec![],
            inserts: Some(batch),
            staged: Vec::new(),
        };
        session.engine.commit_changes(vec![change], set)?;
        session.write_epoch = session.engine.views.committed_epoch();
    } else {
        session.engine.commit_write_set(set)?;
    }
    session
        .engine
        .catalog
        .register_relation(record, table.clone(), Some(table.clone()))?;
    if let Some(options) = &connector {
        crate::connector::start(session.engine.clone(), table, name.name.clone(), options)?;
    }
    info!(table = %name.name, "created table");
    Ok(match rows {
        Some(n) => Output::command_rows("SELECT", n),
        None => Output::command("CREATE TABLE"),
    })
}

fn rename_columns(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = batch.columns().to_vec();
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(batch.schema().fields())
        .map(|(t, b)| Field::new(t.name(), b.data_type().clone(), true))
        .collect();
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// CREATE TABLE text for a schema (used for CREATE TABLE AS, whose query is not replayed).
fn column_ddl(name: &str, schema: &SchemaRef) -> Result<String> {
    let mut cols = Vec::new();
    for f in schema.fields() {
        let ty = sql_type(f.data_type()).ok_or_else(|| {
            ServerError::NotSupported(format!("column type {} in CREATE TABLE AS", f.data_type()))
        })?;
        let null = if f.is_nullable() { "" } else { " NOT NULL" };
        cols.push(format!("\"{}\" {ty}{null}", f.name().replace('"', "\"\"")));
    }
    Ok(format!(
        "CREATE TABLE \"{}\" ({})",
        name.replace('"', "\"\""),
        cols.join(", ")
    ))
}

/// The SQL spelling of an Arrow type, for the types tables can hold.
pub fn sql_type(t: &DataType) -> Option<String> {
    Some(match t {
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => "SMALLINT".into(),
        DataType::Int32 | DataType::UInt16 => "INTEGER".into(),
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => "BIGINT".into(),
        DataType::Float16 | DataType::Float32 => "REAL".into(),
        DataType::Float64 => "DOUBLE PRECISION".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("NUMERIC({p},{s})"),
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 | DataType::Null => "TEXT".into(),
        DataType::Binary | DataType::BinaryView | DataType::LargeBinary => "BYTEA".into(),
        DataType::Date32 | DataType::Date64 => "DATE".into(),
        DataType::Timestamp(TimeUnit::Nanosecond | TimeUnit::Microsecond, None) => {
            "TIMESTAMP".into()
        }
        DataType::Timestamp(_, Some(_)) => "TIMESTAMPTZ".into(),
        DataType::Interval(_) => "INTERVAL".into(),
        DataType::Time64(_) | DataType::Time32(_) => "TIME".into(),
        _ => return None,
    })
}

async fn create_view(session: &mut Session, view: ast::CreateView) -> Result<Output> {
    let name = names::resolve(session, &view.name)?;
    require_schema(session, &name)?;
    if view.materialized {
        return crate::exec::matview::create(session, view).await;
    }
    let existing = relation_exists(session, &name);
    if let Some(existing) = &existing
        && !(view.or_replace && existing.kind == ObjectKind::View)
    {
        return Err(PlanError::DuplicateObject {
            kind: ObjectClass::Relation,
            name: name.name,
        }
        .into());
    }
    let sql = Statement::CreateView(view.clone()).to_string();
    let plan = session
        .state()
        .statement_to_plan(DFStatement::Statement(Box::new(Statement::CreateView(
            view,
        ))))
        .await?;
    let LogicalPlan::Ddl(DdlStatement::CreateView(created)) = plan else {
        return Err(ServerError::Internal(
            "CREATE VIEW did not plan to a view".into(),
        ));
    };
    let depends_on = relation_dependencies(session, &created.input);
    let record = CatalogRecord {
        id: existing
            .as_ref()
            .map(|e| e.id)
            .unwrap_or_else(|| session.engine.store().allocate_object_id()),
        kind: ObjectKind::View,
        database: name.database,
        schema: name.schema,
        name: name.name,
        sql: sql.clone(),
        depends_on,
        search_schema: Some(session.current_schema()),
    };
    let provider = Arc::new(ViewTable::new(created.input.as_ref().clone(), Some(sql)));
    let mut set = WriteSet::new();
    set.put_catalog(record.clone());
    session.engine.commit_write_set(set)?;
    session
        .engine
        .catalog
        .register_relation(record, provider, None)?;
    Ok(Output::command("CREATE VIEW"))
}

fn create_schema(
    session: &mut Session,
    schema_name: SchemaName,
    if_not_exists: bool,
) -> Result<Output> {
    let name = match &schema_name {
        SchemaName::Simple(n) | SchemaName::NamedAuthorization(n, _) => names::parts(n)
            .pop()
            .ok_or_else(|| ServerError::Syntax("missing schema name".into()))?,
        SchemaName::UnnamedAuthorization(ident) => names::fold(ident),
    };
    if session
        .engine
        .catalog
        .schema(&session.database, &name)
        .is_some()
    {
        if if_not_exists {
            return Ok(Output::command("CREATE SCHEMA"));
        }
        return Err(PlanError::DuplicateObject {
            kind: ObjectClass::Schema,
            name,
        }
        .into());
    }
    let record = CatalogRecord {
        id: session.engine.store().allocate_object_id(),
        kind: ObjectKind::Schema,
        database: session.database.clone(),
        schema: name.clone(),
        name: name.clone(),
        sql: format!("CREATE SCHEMA \"{name}\""),
        depends_on: vec![],
        search_schema: None,
    };
    let mut set = WriteSet::new();
    set.put_catalog(record.clone());
    session.engine.commit_write_set(set)?;
    session.engine.catalog.register_schema(record)?;
    session.sync_settings();
    Ok(Output::command("CREATE SCHEMA"))
}

fn create_database(
    session: &mut Session,
    db_name: &ast::ObjectName,
    if_not_exists: bool,
) -> Result<Output> {
    let name = names::parts(db_name)
        .pop()
        .ok_or_else(|| ServerError::Syntax("missing database name".into()))?;
    if session.engine.catalog.database(&name).is_some() {
        if if_not_exists {
            return Ok(Output::command("CREATE DATABASE"));
        }
        return Err(PlanError::DuplicateObject {
            kind: ObjectClass::Database,
            name,
        }
        .into());
    }
    let records = database_records(session.engine.store(), &name);
    let mut set = WriteSet::new();
    for r in &records {
        set.put_catalog(r.clone());
    }
    session.engine.commit_write_set(set)?;
    for r in records {
        match r.kind {
            ObjectKind::Database => {
                session.engine.catalog.register_database(r);
            }
            _ => session.engine.catalog.register_schema(r)?,
        }
    }
    info!(database = %name, "created database");
    Ok(Output::command("CREATE DATABASE"))
}

async fn create_index(session: &mut Session, index: ast::CreateIndex) -> Result<Output> {
    let names::ResolvedTable {
        name: table,
        record: table_record,
        table: table_data,
    } = names::require_table(session, &index.table_name)?;
    let index_name = match &index.name {
        Some(n) => names::parts(n)
            .pop()
            .ok_or_else(|| ServerError::Syntax("missing index name".into()))?,
        None => format!(
            "{}_idx{}",
            table.name,
            session.engine.store().allocate_object_id()
        ),
    };
    let columns = index_columns(&table_data.def.schema, &index)?;
    if session
        .engine
        .catalog
        .find(
            &[ObjectKind::Index],
            &table.database,
            &table.schema,
            &index_name,
        )
        .is_some()
    {
        if index.if_not_exists {
            return Ok(Output::command("CREATE INDEX"));
        }
        return Err(PlanError::DuplicateObject {
            kind: ObjectClass::Relation,
            name: index_name,
        }
        .into());
    }
    let record = CatalogRecord {
        id: session.engine.store().allocate_object_id(),
        kind: ObjectKind::Index,
        database: table.database,
        schema: table.schema,
        name: index_name,
        sql: Statement::CreateIndex(index).to_string(),
        depends_on: vec![table_record.id],
        search_schema: None,
    };
    let _write = session.engine.write_lock.lock().await;
    let mut set = WriteSet::new();
    set.put_catalog(record.clone());
    session.engine.commit_write_set(set)?;
    table_data
        .rows
        .write()
        .or_poisoned("table")?
        .add_index(&record.name, columns)?;
    session.engine.catalog.register_index(record);
    Ok(Output::command("CREATE INDEX"))
}

async fn drop_objects(
    session: &mut Session,
    object_type: ObjectType,
    if_exists: bool,
    object_names: &[ast::ObjectName],
    cascade: bool,
) -> Result<Output> {
    let (kinds, kind_name, tag): (&[ObjectKind], ObjectClass, &'static str) = match object_type {
        ObjectType::Table => (&[ObjectKind::Table], ObjectClass::Table, "DROP TABLE"),
        ObjectType::View => (&[ObjectKind::View], ObjectClass::View, "DROP VIEW"),
        ObjectType::MaterializedView => (
            &[ObjectKind::MaterializedView],
            ObjectClass::MaterializedView,
            "DROP MATERIALIZED VIEW",
        ),
        ObjectType::Index => (&[ObjectKind::Index], ObjectClass::Index, "DROP INDEX"),
        ObjectType::Schema => (&[ObjectKind::Schema], ObjectClass::Schema, "DROP SCHEMA"),
        ObjectType::Database => (
            &[ObjectKind::Database],
            ObjectClass::Database,
            "DROP DATABASE",
        ),
        other => return Err(ServerError::NotSupported(format!("DROP {other}"))),
    };
    let catalog = session.engine.catalog.clone();
    let mut doomed: Vec<CatalogRecord> = Vec::new();
    for object_name in object_names {
        let record = match object_type {
            ObjectType::Database => {
                let name = names::parts(object_name).pop().unwrap_or_default();
                if name == session.database {
                    return Err(ServerError::ObjectInUse(
                        "cannot drop the currently open database".into(),
                    ));
                }
                catalog.find(kinds, &name, "", &name).map(|r| (r, name))
            }
            ObjectType::Schema => {
                let name = names::parts(object_name).pop().unwrap_or_default();
                catalog
                    .find(kinds, &session.database, &name, &name)
                    .map(|r| (r, name))
            }
            _ => {
                let q = names::resolve(session, object_name)?;
                if let Some(other) = catalog.find(
                    &[
                        ObjectKind::Table,
                        ObjectKind::View,
                        ObjectKind::MaterializedView,
                        ObjectKind::Index,
                    ],
                    &q.database,
                    &q.schema,
                    &q.name,
                ) && !kinds.contains(&other.kind)
                {
                    return Err(ServerError::NotSupported(format!(
                        "DROP {kind_name} on \"{}\", which is not a {kind_name}",
                        q.name
                    )));
                }
                catalog
                    .find(kinds, &q.database, &q.schema, &q.name)
                    .map(|r| (r, q.name))
            }
        };
        let Some((record, _)) = record else {
            if if_exists {
                continue;
            }
            let name = names::parts(object_name).pop().unwrap_or_default();
            return Err(PlanError::UndefinedObject {
                kind: kind_name,
                name,
            }
            .into());
        };
        let mut inside = match record.kind {
            ObjectKind::Database => catalog.contents(&record.name, None),
            ObjectKind::Schema => catalog.contents(&record.database, Some(&record.name)),
            _ => vec![],
        };
        inside.retain(|r| r.id != record.id);
        let mut dependents = catalog.dependents(record.id);
        for r in &inside {
            for d in catalog.dependents(r.id) {
                if !inside.iter().any(|i| i.id == d.id) {
                    dependents.push(d);
                }
            }
        }
        // NOTE: a table's indexes go with it, as in PostgreSQL; only other relations block.
        let blocking: Vec<&CatalogRecord> = dependents
            .iter()
            .chain(inside.iter())
            .filter(|d| d.kind != ObjectKind::Index || record.kind != ObjectKind::Table)
            .filter(|_| record.kind != ObjectKind::Database)
            .collect();
        if !blocking.is_empty() && !cascade {
            return Err(PlanError::DependentObjects {
                kind: kind_name.as_str(),
                name: record.name.clone(),
                dependents: blocking
                    .iter()
                    .map(|d| d.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into());
        }
        for d in dependents.into_iter().chain(inside) {
            if !doomed.iter().any(|x| x.id == d.id) {
                doomed.push(d);
            }
        }
        if !doomed.iter().any(|x| x.id == record.id) {
            doomed.push(record);
        }
    }
    // A running view first shows (and sends its subscribers) every write acknowledged
    // before the DROP, as a read would.
    let views = session.engine.views.clone();
    let running = doomed.iter().any(|r| {
        r.kind == ObjectKind::MaterializedView
            && views
                .view(r.id)
                .is_some_and(|v| v.status() == ViewStatus::Running)
    });
    if running {
        views.wait_published(views.committed_epoch()).await;
    }
    let mut set = WriteSet::new();
    for r in &doomed {
        set.delete_catalog(r.id);
        if r.kind == ObjectKind::Table {
            set.drop_log(r.id);
            set.delete_source_offset(r.id);
            session.engine.sources.stop(r.id);
        }
        if r.kind == ObjectKind::Sink {
            crate::exec::sink::forget(&mut set, r);
            session.engine.sinks.stop(r.id);
        }
    }
    session.engine.commit_write_set(set)?;
    for r in &doomed {
        if r.kind == ObjectKind::Index
            && let Some(table) = r.depends_on.first().and_then(|id| catalog.table(*id))
            && let Ok(mut data) = table.rows.write()
        {
            data.drop_index(&r.name);
        }
        catalog.deregister(r)?;
        if r.kind == ObjectKind::MaterializedView {
            session.engine.views.deregister(r.id);
        }
    }
    Ok(Output::command(tag))
}

/// `ALTER TABLE t SET (rows_per_second = n, ...)` on a connector-fed table: the options are
/// stored with the table and the rate applies at once to the running source.
async fn set_connector_options(
    session: &mut Session,
    record: CatalogRecord,
    mut create: ast::CreateTable,
    operations: Vec<AlterTableOperation>,
) -> Result<Output> {
    let ast::CreateTableOptions::With(current) = &mut create.table_options else {
        return Err(ServerError::NotSupported(
            "ALTER TABLE ... SET (...) on a table without a connector".into(),
        ));
    };
    for op in operations {
        let AlterTableOperation::SetOptionsParens { options } = op else {
            continue;
        };
        for option in options {
            let ast::SqlOption::KeyValue { key, .. } = &option else {
                return Err(ServerError::NotSupported(format!("table option {option}")));
            };
            let key = key.value.to_ascii_lowercase();
            if !["rows_per_second", "max_rows_per_second"].contains(&key.as_str()) {
                return Err(ServerError::NotSupported(format!(
                    "changing connector option {key}"
                )));
            }
            current.retain(|o| {
                !matches!(o, ast::SqlOption::KeyValue { key: k, .. }
                    if ["rows_per_second", "max_rows_per_second"].contains(&k.value.to_ascii_lowercase().as_str()))
            });
            current.push(option);
        }
    }
    let options = ConnectorOptions::from_table(&create.table_options)?
        .ok_or_else(|| ServerError::Internal("connector options vanished".into()))?;
    let rate = options.rate()?;
    let record = CatalogRecord {
        sql: create.to_string(),
        ..record
    };
    let id = record.id;
    let _write = session.engine.write_lock.lock().await;
    let mut set = WriteSet::new();
    set.put_catalog(record.clone());
    session.engine.commit_write_set(set)?;
    session.engine.catalog.update_record(record);
    session.engine.sources.set_rate(id, rate);
    Ok(Output::command("ALTER TABLE"))
}

async fn alter_table(session: &mut Session, alter: ast::AlterTable) -> Result<Output> {
    let Some(names::ResolvedTable {
        name,
        record,
        table: old,
    }) = names::find_table(session, &alter.name)?
    else {
        if alter.if_exists {
            return Ok(Output::command("ALTER TABLE"));
        }
        return Err(PlanError::UndefinedObject {
            kind: ObjectClass::Table,
            name: names::parts(&alter.name).pop().unwrap_or_default(),
        }
        .into());
    };
    let Statement::CreateTable(mut create) = parse_one(&record.sql)? else {
        return Err(ServerError::Internal(
            "stored table SQL is not CREATE TABLE".into(),
        ));
    };
    if alter
        .operations
        .iter()
        .all(|op| matches!(op, AlterTableOperation::SetOptionsParens { .. }))
    {
        return set_connector_options(session, record, create, alter.operations).await;
    }
    let mut added = 0;
    for op in alter.operations {
        match op {
            AlterTableOperation::AddColumn {
                if_not_exists,
                column_def,
                ..
            } => {
                let col = names::fold(&column_def.name);
                if create.columns.iter().any(|c| names::fold(&c.name) == col) {
                    if if_not_exists {
                        continue;
                    }
                    return Err(PlanError::DuplicateObject {
                        kind: ObjectClass::Column,
                        name: col,
                    }
                    .into());
                }
                create.columns.push(column_def);
                added += 1;
            }
            other => {
                return Err(ServerError::NotSupported(format!(
                    "ALTER TABLE {}",
                    first_words(&other.to_string())
                )));
            }
        }
    }
    if added == 0 {
        return Ok(Output::command("ALTER TABLE"));
    }
    create.if_not_exists = false;
    rewrite_column_types(&mut create.columns);
    let (_, def) = plan_table(&session.ctx, &create).await?;
    let sql = create.to_string();
    let engine = session.engine.clone();
    let _write = engine.write_lock.lock().await;
    let old_width = old.def.schema.fields().len();
    let parts = old.rows.read().or_poisoned("table")?.log_parts()?;
    let table = new_table(record.id, def.clone(), sql.clone())?;
    let new_record = CatalogRecord { sql, ..record };
    // NOTE: the log is rewritten a chunk at a time (a spilled table is read a file at a
    // time), and the new table is kept within the cache's share as a restart keeps it; the
    // new catalog record and the end of the old log are one write.
    let store = engine.store().clone();
    let from = store.begin_log_rewrite(new_record.id)?;
    let rewritten = async {
        let mut budget = engine.cache.replay_budget(new_record.id);
        let mut set = WriteSet::new();
        let mut bytes = 0;
        for part in parts {
            let millrace_storage::LogEntry::Insert { row_ids, batch } = part.read()? else {
                continue;
            };
            let entry = millrace_storage::LogEntry::Insert {
                row_ids,
                batch: with_defaults(session, &def, &name.name, old_width, &batch).await?,
            };
            {
                let mut data = table.rows.write().or_poisoned("table")?;
                data.apply(&entry)?;
                budget.applied(&entry, &mut data);
            }
            bytes += entry.memory_bytes();
            set.append(new_record.id, entry);
            if bytes >= crate::engine::REWRITE_COMMIT_BYTES {
                engine.commit_write_set(std::mem::take(&mut set))?;
                bytes = 0;
            }
        }
        engine.commit_write_set(set)?;
        let mut with = WriteSet::new();
        with.put_catalog(new_record.clone());
        let store = store.clone();
        let id = new_record.id;
        tokio::task::block_in_place(move || store.finish_log_rewrite(id, from, with))?;
        Ok::<(), ServerError>(())
    }
    .await;
    if let Err(e) = rewritten {
        store.abandon_log_rewrite(new_record.id)?;
        return Err(e);
    }
    session
        .engine
        .catalog
        .register_relation(new_record, table.clone(), Some(table.clone()))?;
    attach_indexes(&session.engine.catalog, &table)?;
    Ok(Output::command("ALTER TABLE"))
}

/// `batch` of a table's old columns (the first `old_width`) with the new columns' defaults.
async fn with_defaults(
    session: &Session,
    def: &TableDef,
    table: &str,
    old_width: usize,
    batch: &RecordBatch,
) -> Result<RecordBatch> {
    let mut columns = batch.columns().to_vec();
    for field in def.schema.fields().iter().skip(old_width) {
        columns.push(default_column(session, def, field, batch.num_rows()).await?);
    }
    let loose = Arc::new(Schema::new(
        def.schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    crate::engine::conform_to_table(table, &def.schema, &RecordBatch::try_new(loose, columns)?)
}

/// The value existing rows get for a newly added column: its default, or NULL.
pub async fn default_column(
    session: &Session,
    def: &TableDef,
    field: &Field,
    rows: usize,
) -> Result<ArrayRef> {
    let Some(expr) = def.defaults.get(field.name()) else {
        return Ok(datafusion::arrow::array::new_null_array(
            field.data_type(),
            rows,
        ));
    };
    let batches = session
        .ctx
        .read_empty()?
        .select(vec![expr.clone().cast_to(
            field.data_type(),
            &datafusion::common::DFSchema::empty(),
        )?])?
        .collect()
        .await?;
    let value = match batches.first() {
        Some(b) if b.num_rows() == 1 => {
            datafusion::common::ScalarValue::try_from_array(b.column(0), 0)?
        }
        _ => datafusion::common::ScalarValue::try_from(field.data_type())?,
    };
    Ok(value.to_array_of_size(rows)?)
}
