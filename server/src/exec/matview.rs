//! CREATE / EXPLAIN of materialized views, and the unstored view a `SUBSCRIBE TO (query)`
//! maintains. Compiling, starting and backfilling a view are the view lifecycle's
//! (`views/`); this is the statement side.

use std::sync::Arc;

use datafusion::sql::sqlparser::ast::{self, Statement};
use millrace_planner::PlanError;
use millrace_planner::view_table::ViewStatus;
use millrace_storage::{CatalogRecord, ObjectKind};

use crate::engine::Engine;
use crate::error::{Result, ServerError};
use crate::exec::names;
use crate::exec::output::Output;
use crate::session::Session;
use crate::views::compile::compile_view;
use crate::views::start::start;
use millrace_planner::error::ObjectClass;

/// CREATE MATERIALIZED VIEW.
pub async fn create(session: &mut Session, view: ast::CreateView) -> Result<Output> {
    let name = names::resolve(session, &view.name)?;
    names::require_schema(session, &name)?;
    if names::relation_exists(session, &name).is_some() {
        if view.if_not_exists {
            return Ok(Output::command("CREATE MATERIALIZED VIEW"));
        }
        return Err(PlanError::DuplicateObject {
            kind: ObjectClass::Relation,
            name: name.name,
        }
        .into());
    }
    let sql = Statement::CreateView(view.clone()).to_string();
    let compiled = compile_view(&session.ctx, &view).await?;
    let record = CatalogRecord {
        id: session.engine.store().allocate_object_id(),
        kind: ObjectKind::MaterializedView,
        database: name.database,
        schema: name.schema,
        name: name.name,
        sql,
        depends_on: compiled.depends_on.clone(),
        search_schema: Some(session.current_schema()),
    };
    start(&session.engine, record, compiled, true).await?;
    Ok(Output::command("CREATE MATERIALIZED VIEW"))
}

/// A materialized view of `query` that is not stored and not listed: it lives as long as the
/// returned guard, which a `SUBSCRIBE TO (query)` holds while it streams.
pub async fn create_ephemeral(session: &mut Session, query: &str) -> Result<EphemeralView> {
    let id = session.engine.store().allocate_object_id();
    let name = format!("_subscribe_{id}");
    let Statement::CreateView(view) =
        crate::sql::parse_one(&format!("CREATE MATERIALIZED VIEW {name} AS {query}"))?
    else {
        return Err(ServerError::Syntax(
            "SUBSCRIBE TO (query) needs a query".into(),
        ));
    };
    let compiled = compile_view(&session.ctx, &view).await?;
    let record = CatalogRecord {
        id,
        kind: ObjectKind::MaterializedView,
        database: session.database.clone(),
        schema: session.current_schema(),
        name,
        sql: Statement::CreateView(view).to_string(),
        depends_on: compiled.depends_on.clone(),
        search_schema: Some(session.current_schema()),
    };
    let guard = EphemeralView {
        engine: session.engine.clone(),
        record: record.clone(),
    };
    start(&session.engine, record, compiled, false).await?;
    if let Some(entry) = session.engine.views.view(id)
        && let ViewStatus::Failed(reason) = entry.status()
    {
        return Err(PlanError::ViewFailed {
            view: "SUBSCRIBE query".into(),
            reason,
        }
        .into());
    }
    Ok(guard)
}

/// A view made for one subscription; dropped with it (also when the client cancels).
pub struct EphemeralView {
    engine: Arc<Engine>,
    /// Its (unstored) catalog record.
    pub record: CatalogRecord,
}

impl Drop for EphemeralView {
    fn drop(&mut self) {
        self.engine.views.deregister(self.record.id);
        let _ = self.engine.catalog.deregister(&self.record);
    }
}

/// EXPLAIN CREATE MATERIALIZED VIEW: the incremental plan, one operator per line.
pub async fn explain(session: &Session, view: &ast::CreateView) -> Result<Vec<String>> {
    let compiled = compile_view(&session.ctx, view).await?;
    Ok(compiled.plan.explain(session.engine.views.workers))
}
