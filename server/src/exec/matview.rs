//! CREATE / EXPLAIN of materialized views.
//!
//! The query is planned and optimized by DataFusion exactly like a SELECT, compiled into an
//! incremental plan (`millrace_planner::incremental`), registered with the view runtime at
//! the current epoch, backfilled from snapshots of its sources, and only then made visible
//! in the catalog. The same path rebuilds every view when the server starts.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{self, Statement};
use millrace_planner::changelog::loose;
use millrace_planner::incremental::{PlanNode, compile};
use millrace_planner::pipeline::Pipeline;
use millrace_planner::view_table::{MaterializedView, ViewStatus};
use millrace_planner::{MillraceTable, PlanError};
use millrace_storage::{CatalogRecord, ObjectKind, StateTier, TieredSnapshot, WriteSet};

use crate::engine::Engine;
use crate::error::{Result, ServerError};
use crate::exec::Output;
use crate::exec::{ddl, names};
use crate::runtime::checkpoint::{self, RestorePlan};
use crate::runtime::{ViewEntry, backfill};
use crate::session::Session;
use tokio::sync::oneshot;

/// A view's query, planned, optimized and compiled.
struct Compiled {
    plan: PlanNode,
    schema: SchemaRef,
    depends_on: Vec<u64>,
}

/// Plans and compiles the query of a CREATE MATERIALIZED VIEW statement.
async fn compile_view(ctx: &SessionContext, view: &ast::CreateView) -> Result<Compiled> {
    let mut rewritten = millrace_planner::rewrite::rewrite(Statement::Query(view.query.clone()));
    let state = ctx.state();
    crate::exec::query::merge_using_columns(&state, &mut rewritten.statement).await;
    let logical = state
        .statement_to_plan(DFStatement::Statement(Box::new(rewritten.statement)))
        .await?;
    let depends_on = dependencies(&logical);
    millrace_planner::incremental::check_deterministic(&logical)?;
    let optimized = state.optimize(&logical)?;
    let plan = compile(&optimized, state.execution_props())?;
    let out = optimized.schema();
    let mut fields: Vec<Field> = out
        .fields()
        .iter()
        .enumerate()
        .map(
            |(i, f)| match rewritten.renames.iter().find(|(p, _)| *p == i) {
                Some((_, name)) => f.as_ref().clone().with_name(name),
                None => f.as_ref().clone(),
            },
        )
        .collect();
    if !view.columns.is_empty() {
        if view.columns.len() > fields.len() {
            return Err(ServerError::Plan(PlanError::DataFusion(
                datafusion::error::DataFusionError::Plan(
                    "CREATE MATERIALIZED VIEW specifies more column names than columns".into(),
                ),
            )));
        }
        for (field, column) in fields.iter_mut().zip(&view.columns) {
            *field = field.clone().with_name(names::fold(&column.name));
        }
    }
    let mut seen = HashSet::new();
    for f in &fields {
        if !seen.insert(f.name().clone()) {
            return Err(ServerError::DuplicateColumn(f.name().clone()));
        }
    }
    let schema = loose(&Arc::new(Schema::new(fields)));
    Ok(Compiled {
        plan,
        schema,
        depends_on,
    })
}

/// Ids of the tables and materialized views a plan reads.
fn dependencies(plan: &LogicalPlan) -> Vec<u64> {
    let mut ids = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = source_as_provider(&scan.source)
        {
            if let Some(t) = provider.downcast_ref::<MillraceTable>() {
                ids.push(t.id);
            } else if let Some(v) = provider.downcast_ref::<MaterializedView>() {
                ids.push(v.id);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// CREATE MATERIALIZED VIEW.
pub async fn create(session: &mut Session, view: ast::CreateView) -> Result<Output> {
    let name = names::resolve(session, &view.name)?;
    ddl::require_schema(session, &name)?;
    if ddl::relation_exists(session, &name).is_some() {
        if view.if_not_exists {
            return Ok(Output::command("CREATE MATERIALIZED VIEW"));
        }
        return Err(PlanError::DuplicateObject {
            kind: "relation",
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
        ddl::parse_one(&format!("CREATE MATERIALIZED VIEW {name} AS {query}"))?
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

/// Registers a stored materialized view on start, before the server listens: compiled,
/// listed in the catalog and the runtime as `recovering` (reads of it wait), with its
/// contents computed afterwards by [`rebuild`] once its inputs are back. A view that no
/// longer compiles is registered as failed, so that it can be dropped.
pub async fn register_for_restore(
    engine: &Arc<Engine>,
    ctx: &SessionContext,
    record: CatalogRecord,
    plan: &mut RestorePlan,
) -> Result<()> {
    let compiled = match crate::exec::ddl::parse_one(&record.sql) {
        Ok(Statement::CreateView(view)) => compile_view(ctx, &view).await,
        Ok(_) => Err(ServerError::Internal(format!(
            "record {} is not CREATE MATERIALIZED VIEW",
            record.id
        ))),
        Err(e) => Err(e),
    };
    let compiled = match compiled {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("cannot be planned again: {e}");
            engine
                .views
                .events
                .record("view_failed", Some(&record.name), None, reason.clone());
            let provider = Arc::new(MaterializedView::new(
                record.id,
                record.name.clone(),
                Arc::new(Schema::empty()),
                record.sql.clone(),
                ViewStatus::Failed(reason),
            )?);
            engine.catalog.register_relation(record, provider, None)?;
            return Ok(());
        }
    };
    let runtime = engine.views.clone();
    let sources = compiled.plan.sources();
    let explain = compiled.plan.explain(runtime.workers);
    // A view whose checkpointed state a fresh pipeline began to replace (the stale mark)
    // cannot continue that checkpoint; state evicted after it was put back on open.
    let stale = StateTier::is_marked(engine.store(), record.id)?;
    let layout = compiled.plan.layout();
    let restorable = !stale
        && plan.can_restore(record.id, &sources, (runtime.workers, layout), |id| {
            runtime.view(id).is_some()
        });
    let tier = StateTier::new(engine.store().clone(), record.id, !restorable);
    let pipeline = Pipeline::start(compiled.plan, runtime.workers, Some(tier))?;
    let status = match restorable {
        true => ViewStatus::Recovering("loading its checkpointed state".into()),
        false => ViewStatus::Recovering("being rebuilt after a restart".into()),
    };
    let provider = Arc::new(MaterializedView::new(
        record.id,
        record.name.clone(),
        compiled.schema.clone(),
        record.sql.clone(),
        status,
    )?);
    let (entry, _ready) = ViewEntry::new(provider.clone(), sources, explain, pipeline);
    if restorable {
        entry
            .restore_pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        plan.restored.insert(record.id);
    }
    runtime.register(entry);
    engine.catalog.register_relation(record, provider, None)?;
    Ok(())
}

/// Rows of a view's checkpointed contents restored at a time.
const RESTORE_PIECE_ROWS: usize = 16_384;

/// Loads a view's checkpointed contents into its fresh pipeline, and the state of operators
/// that cannot read it lazily from the warm tier; returns how many state entries (read up
/// front) and rows it loaded.
pub async fn restore_state(engine: &Arc<Engine>, view: &ViewEntry) -> Result<(usize, usize)> {
    let store = engine.store().clone();
    let view_id = view.id;
    let entries = {
        let mut guard = view.pipeline.lock().await;
        let pipeline = guard
            .as_mut()
            .ok_or_else(|| ServerError::Internal("view has no pipeline".into()))?;
        let eager = pipeline.restore_lazily().await?;
        let store = store.clone();
        let state = tokio::task::block_in_place(move || {
            checkpoint::load_op_state(&store, view_id, &eager)
        })?;
        let entries = state.values().map(|v| v.len()).sum();
        pipeline.restore(state).await?;
        entries
    };
    // NOTE: a piece at a time under the cache's budget: the whole contents decoded at once
    // held them three times over (encoded rows, one batch, its chunks), 5 x the limit for a
    // view of 500k rows under 128 MiB.
    let provider = view.provider.clone();
    let mut budget = engine.cache.restore_budget(view_id);
    tokio::task::block_in_place(|| {
        checkpoint::for_each_contents_piece(&store, view_id, RESTORE_PIECE_ROWS, |rows| {
            let mut contents = provider
                .contents
                .write()
                .map_err(|_| ServerError::Internal("view contents lock poisoned".into()))?;
            // NOTE: arrow-row panics on rows of another layout; the plan fingerprint keeps
            // such rows out (see `RestorePlan::can_restore`), and a panic here still only
            // rebuilds the view.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| contents.restore(&rows)))
                .map_err(|_| {
                    ServerError::Internal("checkpointed view rows do not decode".into())
                })??;
            let bytes = rows.iter().map(|(row, _)| row.len()).sum();
            budget.grew(bytes, contents.table_mut());
            Ok(())
        })
    })?;
    let rows = provider
        .contents
        .read()
        .map_err(|_| ServerError::Internal("view contents lock poisoned".into()))?
        .num_rows();
    Ok((entries, rows))
}

/// EXPLAIN CREATE MATERIALIZED VIEW: the incremental plan, one operator per line.
pub async fn explain(session: &Session, view: &ast::CreateView) -> Result<Vec<String>> {
    let compiled = compile_view(&session.ctx, view).await?;
    Ok(compiled.plan.explain(session.engine.views.workers))
}

/// Snapshots of a view's inputs (tables and running upstream views). The caller holds the
/// write lock and has waited for the last committed epoch, so they are one consistent cut.
fn snapshot_inputs(
    engine: &Arc<Engine>,
    sources: &[u64],
    qualified: &str,
) -> Result<Vec<(u64, TieredSnapshot)>> {
    let mut snapshots = Vec::with_capacity(sources.len());
    for id in sources {
        if let Some(table) = engine.catalog.table(*id) {
            let snapshot = table
                .data
                .read()
                .map_err(|_| ServerError::Internal("table lock poisoned".into()))?
                .tiered_snapshot()?;
            snapshots.push((*id, snapshot));
        } else if let Some(upstream) = engine.views.view(*id) {
            if upstream.status() != ViewStatus::Running {
                return Err(ServerError::ObjectNotReady(format!(
                    "materialized view \"{}\" is {}",
                    upstream.provider.name,
                    upstream.status().label()
                )));
            }
            snapshots.push((*id, upstream.provider.tiered_snapshot()?));
        } else {
            return Err(ServerError::Internal(format!(
                "source {id} of {qualified} is gone"
            )));
        }
    }
    Ok(snapshots)
}

/// Rebuilds a running view whose pipeline failed: its query compiled afresh into a new
/// pipeline, backfilled from snapshots of its inputs taken now (beside the old contents,
/// which stay readable until the rebuilt ones are published). The receiver is told when
/// the backfill has caught up.
pub async fn rebuild(engine: &Arc<Engine>, view: &Arc<ViewEntry>) -> Result<oneshot::Receiver<()>> {
    let record = engine
        .catalog
        .record(view.id)
        .ok_or_else(|| ServerError::Internal(format!("view {} has no catalog record", view.id)))?;
    let ctx = engine.session_context(&record.database, crate::engine::replay_schema(&record))?;
    let Statement::CreateView(ast) = crate::exec::ddl::parse_one(&record.sql)? else {
        return Err(ServerError::Internal(format!(
            "record {} is not CREATE MATERIALIZED VIEW",
            record.id
        )));
    };
    let compiled = compile_view(&ctx, &ast).await?;
    let runtime = engine.views.clone();
    let qualified = format!("{}.{}", record.schema, record.name);
    let _writers = engine.write_lock.lock().await;
    runtime.wait_published(runtime.committed_epoch()).await;
    if runtime.view(view.id).is_none() {
        return Err(ServerError::Internal(format!("{qualified} was dropped")));
    }
    let snapshots = snapshot_inputs(engine, &view.sources, &qualified)?;
    let tier = StateTier::new(engine.store().clone(), view.id, true);
    let pipeline = Pipeline::start(compiled.plan, runtime.workers, Some(tier))?;
    let ready = view.begin_rebuild(pipeline)?;
    tokio::spawn(backfill::run(runtime.clone(), view.clone(), snapshots));
    Ok(ready)
}

/// Registers, backfills and publishes a view; writes its record first when `persist`.
async fn start(
    engine: &Arc<Engine>,
    record: CatalogRecord,
    compiled: Compiled,
    persist: bool,
) -> Result<()> {
    let runtime = engine.views.clone();
    let qualified = format!("{}.{}", record.schema, record.name);
    let provider = Arc::new(MaterializedView::new(
        record.id,
        record.name.clone(),
        compiled.schema.clone(),
        record.sql.clone(),
        ViewStatus::Backfilling,
    )?);
    let sources = compiled.plan.sources();
    let explain = compiled.plan.explain(runtime.workers);
    let ready = {
        let _writers = engine.write_lock.lock().await;
        // Every source is at the last committed epoch once the coordinator has published it.
        runtime.wait_published(runtime.committed_epoch()).await;
        let snapshots = snapshot_inputs(engine, &sources, &qualified)?;
        if persist {
            let mut set = WriteSet::new();
            set.put_catalog(record.clone());
            engine.commit_write_set(set)?;
        }
        let tier = StateTier::new(engine.store().clone(), record.id, true);
        let pipeline = Pipeline::start(compiled.plan, runtime.workers, Some(tier))?;
        let (entry, ready) = ViewEntry::new(provider.clone(), sources, explain, pipeline);
        runtime.register(entry.clone());
        tokio::spawn(backfill::run(runtime.clone(), entry, snapshots));
        ready
    };
    let _ = ready.await;
    if let ViewStatus::Failed(reason) = provider.status() {
        if persist {
            runtime.deregister(record.id);
            let mut set = WriteSet::new();
            set.delete_catalog(record.id);
            engine.commit_write_set(set)?;
        } else {
            // NOTE: on restart a failing view stays registered (and listed in
            // millrace_views as failed) so that it can be dropped.
            engine
                .catalog
                .register_relation(record, provider.clone(), None)?;
            return Ok(());
        }
        return Err(PlanError::ViewFailed {
            view: qualified,
            reason,
        }
        .into());
    }
    engine.catalog.register_relation(record, provider, None)?;
    Ok(())
}
