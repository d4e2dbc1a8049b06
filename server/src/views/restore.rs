//! Restoring views on start: each stored view compiled and registered as recovering before
//! the server listens, and a view the last checkpoint covers given its operators' state and
//! its contents back (a piece at a time under the cache's budget) instead of a rebuild.

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use millrace_planner::pipeline::Pipeline;
use millrace_planner::view_table::{MaterializedView, ViewStatus};
use millrace_storage::{CatalogRecord, StateTier};

use crate::coordinator::entry::ViewEntry;
use crate::engine::Engine;
use crate::error::{Result, ServerError};
use crate::views::compile::compile_view;
use crate::views::restore_plan::{RestorePlan, for_each_contents_piece, load_op_state};
use millrace_storage::error::LockResultExt;

/// Registers a stored materialized view on start, before the server listens: compiled,
/// listed in the catalog and the coordinator as `recovering` (reads of it wait), with its
/// contents computed afterwards by [`crate::views::start::rebuild`] once its inputs are back. A view that no
/// longer compiles is registered as failed, so that it can be dropped.
pub async fn register_for_restore(
    engine: &Arc<Engine>,
    ctx: &SessionContext,
    record: CatalogRecord,
    plan: &mut RestorePlan,
) -> Result<()> {
    let compiled = match crate::sql::parse_one(&record.sql) {
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
    let coordinator = engine.views.clone();
    let sources = compiled.plan.sources();
    let explain = compiled.plan.explain(coordinator.workers);
    // A view whose checkpointed state a fresh pipeline began to replace (the stale mark)
    // cannot continue that checkpoint; state evicted after it was put back on open.
    let stale = StateTier::is_marked(engine.store(), record.id)?;
    let layout = compiled.plan.layout();
    let restorable = !stale
        && plan.can_restore(record.id, &sources, (coordinator.workers, layout), |id| {
            coordinator.view(id).is_some()
        });
    let tier = StateTier::new(engine.store().clone(), record.id, !restorable);
    let pipeline = Pipeline::start(compiled.plan, coordinator.workers, Some(tier))?;
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
    coordinator.register(entry);
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
        let state = tokio::task::block_in_place(move || load_op_state(&store, view_id, &eager))?;
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
        for_each_contents_piece(&store, view_id, RESTORE_PIECE_ROWS, |rows| {
            let mut contents = provider.contents.write().or_poisoned("view contents")?;
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
        .or_poisoned("view contents")?
        .num_rows();
    Ok((entries, rows))
}
