//! Starting a view: registered with the coordinator at the current epoch, backfilled from
//! snapshots of its inputs (taken under the write lock, one consistent cut), and only then
//! made visible in the catalog; and rebuilding a running view whose pipeline failed.

use std::sync::Arc;

use datafusion::sql::sqlparser::ast::Statement;
use millrace_planner::PlanError;
use millrace_planner::pipeline::Pipeline;
use millrace_planner::view_table::{MaterializedView, ViewStatus};
use millrace_storage::{CatalogRecord, StateTier, TieredSnapshot, WriteSet};
use tokio::sync::oneshot;

use crate::coordinator::entry::ViewEntry;
use crate::engine::Engine;
use crate::error::{Result, ServerError};
use crate::views::compile::{Compiled, compile_view};
use millrace_storage::error::LockResultExt;

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
            let snapshot = table.rows.read().or_poisoned("table")?.tiered_snapshot()?;
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
    let ctx = engine.session_context(
        &record.database,
        crate::catalog::records::replay_schema(&record),
    )?;
    let Statement::CreateView(ast) = crate::sql::parse_one(&record.sql)? else {
        return Err(ServerError::Internal(format!(
            "record {} is not CREATE MATERIALIZED VIEW",
            record.id
        )));
    };
    let compiled = compile_view(&ctx, &ast).await?;
    let coordinator = engine.views.clone();
    let qualified = format!("{}.{}", record.schema, record.name);
    let _writers = engine.write_lock.lock().await;
    coordinator
        .wait_published(coordinator.committed_epoch())
        .await;
    if coordinator.view(view.id).is_none() {
        return Err(ServerError::Internal(format!("{qualified} was dropped")));
    }
    let snapshots = snapshot_inputs(engine, &view.sources, &qualified)?;
    let tier = StateTier::new(engine.store().clone(), view.id, true);
    let pipeline = Pipeline::start(compiled.plan, coordinator.workers, Some(tier))?;
    let ready = view.begin_rebuild(pipeline)?;
    tokio::spawn(crate::views::backfill::run(
        coordinator.clone(),
        view.clone(),
        snapshots,
    ));
    Ok(ready)
}

/// Registers, backfills and publishes a view; writes its record first when `persist`.
pub async fn start(
    engine: &Arc<Engine>,
    record: CatalogRecord,
    compiled: Compiled,
    persist: bool,
) -> Result<()> {
    let coordinator = engine.views.clone();
    let qualified = format!("{}.{}", record.schema, record.name);
    let provider = Arc::new(MaterializedView::new(
        record.id,
        record.name.clone(),
        compiled.schema.clone(),
        record.sql.clone(),
        ViewStatus::Backfilling,
    )?);
    let sources = compiled.plan.sources();
    let explain = compiled.plan.explain(coordinator.workers);
    let ready = {
        let _writers = engine.write_lock.lock().await;
        // Every source is at the last committed epoch once the coordinator has published it.
        coordinator
            .wait_published(coordinator.committed_epoch())
            .await;
        let snapshots = snapshot_inputs(engine, &sources, &qualified)?;
        if persist {
            let mut set = WriteSet::new();
            set.put_catalog(record.clone());
            engine.commit_write_set(set)?;
        }
        let tier = StateTier::new(engine.store().clone(), record.id, true);
        let pipeline = Pipeline::start(compiled.plan, coordinator.workers, Some(tier))?;
        let (entry, ready) = ViewEntry::new(provider.clone(), sources, explain, pipeline);
        coordinator.register(entry.clone());
        tokio::spawn(crate::views::backfill::run(
            coordinator.clone(),
            entry,
            snapshots,
        ));
        ready
    };
    let _ = ready.await;
    if let ViewStatus::Failed(reason) = provider.status() {
        if persist {
            coordinator.deregister(record.id);
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
