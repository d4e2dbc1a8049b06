//! `CREATE SINK` and `DROP SINK`: a sink is a catalog object that depends on its view (so
//! `DROP MATERIALIZED VIEW` needs CASCADE while a sink reads it) and a running task in
//! [`crate::registry::sinks::Sinks`].

use datafusion::sql::sqlparser::ast::ObjectName;
use millrace_planner::PlanError;
use millrace_storage::{CatalogRecord, ObjectKind, WriteSet};
use tracing::info;

use crate::catalog::options::ConnectorOptions;
use crate::error::{Result, ServerError};
use crate::exec::names::{parts, resolve};
use crate::exec::output::Output;
use crate::session::Session;
use crate::sink::Target;
use crate::sql::{CreateSink, Parsed};
use millrace_planner::error::ObjectClass;

/// Runs CREATE SINK or DROP SINK.
pub async fn run(session: &mut Session, command: Parsed) -> Result<Output> {
    if session.txn.is_some() {
        return Err(ServerError::NotSupported(
            "CREATE / DROP SINK inside a transaction block".into(),
        ));
    }
    match command {
        Parsed::CreateSink(create) => create_sink(session, *create).await,
        Parsed::DropSink { name, if_exists } => drop_sink(session, &name, if_exists),
        _ => Err(ServerError::Internal("not a sink command".into())),
    }
}

async fn create_sink(session: &mut Session, create: CreateSink) -> Result<Output> {
    let engine = session.engine.clone();
    let name = resolve(session, &create.name)?;
    if engine
        .catalog
        .find(
            &[ObjectKind::Sink],
            &name.database,
            &name.schema,
            &name.name,
        )
        .is_some()
    {
        if create.if_not_exists {
            return Ok(Output::command("CREATE SINK"));
        }
        return Err(PlanError::DuplicateObject {
            kind: ObjectClass::Sink,
            name: name.name,
        }
        .into());
    }
    let view_name = resolve(session, &create.from)?;
    let view = engine
        .catalog
        .find(
            &[ObjectKind::MaterializedView],
            &view_name.database,
            &view_name.schema,
            &view_name.name,
        )
        .ok_or_else(|| PlanError::UndefinedObject {
            kind: ObjectClass::MaterializedView,
            name: parts(&create.from).pop().unwrap_or_default(),
        })?;
    let options = ConnectorOptions::from_options(&create.options)?;
    Target::try_new(&options)?;
    let with = create
        .options
        .iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let record = CatalogRecord {
        id: engine.store().allocate_object_id(),
        kind: ObjectKind::Sink,
        database: name.database.clone(),
        schema: name.schema.clone(),
        name: name.name.clone(),
        sql: format!(
            "CREATE SINK \"{}\" FROM \"{}\".\"{}\" WITH ({with})",
            name.name, view.schema, view.name
        ),
        depends_on: vec![view.id],
        search_schema: Some(session.current_schema()),
    };
    let mut set = WriteSet::new();
    set.put_catalog(record.clone());
    engine.commit_write_set(set)?;
    engine.catalog.register_index(record.clone());
    crate::sink::start(engine.clone(), &record, &view, &options)?;
    info!(sink = %record.name, view = %view.name, "created sink");
    Ok(Output::command("CREATE SINK"))
}

fn drop_sink(session: &mut Session, name: &ObjectName, if_exists: bool) -> Result<Output> {
    let engine = session.engine.clone();
    let q = resolve(session, name)?;
    let Some(record) = engine
        .catalog
        .find(&[ObjectKind::Sink], &q.database, &q.schema, &q.name)
    else {
        if if_exists {
            return Ok(Output::command("DROP SINK"));
        }
        return Err(PlanError::UndefinedObject {
            kind: ObjectClass::Sink,
            name: q.name,
        }
        .into());
    };
    let mut set = WriteSet::new();
    forget(&mut set, &record);
    set.delete_catalog(record.id);
    engine.commit_write_set(set)?;
    engine.sinks.stop(record.id);
    engine.catalog.deregister(&record)?;
    Ok(Output::command("DROP SINK"))
}

/// Adds the removal of a sink's durable progress and mirror to `set`.
pub fn forget(set: &mut WriteSet, record: &CatalogRecord) {
    set.delete_source_offset(record.id);
    set.drop_sink_rows(record.id);
}
