//! The supervisor: restarts views whose pipeline failed, inside the running server.
//!
//! The coordinator reports a failed view ([`Coordinator::task_failed`]); the supervisor
//! waits a backoff that doubles with each failure in a row, waits for the view's upstream
//! views to be running, and rebuilds it ([`crate::views::start::rebuild`]). When the
//! rebuilt view has caught up, an empty epoch is committed so that its change is published
//! at once even when nothing else is written. Each restart is its own task, so one view's
//! backoff never delays another's, and a view dropped meanwhile is simply forgotten.
//!
//! The same rebuild restores every view after a restart ([`restore_all`]), in the
//! background while the server already answers: reads of a view wait until it is back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use millrace_planner::view_table::ViewStatus;
use tracing::{info, warn};

use crate::coordinator::Coordinator;
use crate::coordinator::entry::{EpochChanges, ViewEntry};
use crate::engine::Engine;

/// Backoff before the first restart; doubled for each further failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a restart checks whether its upstream views run again.
const UPSTREAM_POLL: Duration = Duration::from_millis(50);

/// Restarts failed views until the server stops.
pub async fn run(engine: Arc<Engine>) {
    let Some(mut failed) = engine.views.take_failed() else {
        return;
    };
    info!("view supervisor started");
    while let Some(id) = failed.recv().await {
        let engine = engine.clone();
        tokio::spawn(async move { restart(engine, id).await });
    }
}

async fn restart(engine: Arc<Engine>, id: u64) {
    let coordinator = engine.views.clone();
    let Some(view) = coordinator.view(id) else {
        return;
    };
    let name = view.provider.name.clone();
    let attempt = view
        .failures_in_a_row
        .load(std::sync::atomic::Ordering::SeqCst);
    let wait = backoff(attempt);
    coordinator.events.record(
        "view_restarting",
        Some(&name),
        Some(attempt),
        format!("rebuilding from its inputs in {} ms", wait.as_millis()),
    );
    tokio::time::sleep(wait).await;
    if !upstream_running(&coordinator, &view).await {
        return;
    }
    view.restarts
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let ready = match crate::views::start::rebuild(&engine, &view).await {
        Ok(ready) => ready,
        Err(e) => {
            coordinator
                .task_failed(&view, format!("restart: {e}"))
                .await;
            return;
        }
    };
    let _ = ready.await;
    publish_rebuilt(&engine, &view).await;
}

/// Computes the contents of every materialized view registered at start-up, in creation
/// order (so a view's upstream views run before it is built), while the server already
/// accepts connections. Progress goes to the log and `millrace_events`.
pub async fn restore_all(engine: Arc<Engine>) {
    let coordinator = engine.views.clone();
    let started = Instant::now();
    load_checkpointed(&engine).await;
    coordinator.start();
    if let Some(catch_up) = coordinator.take_catch_up() {
        coordinator.wait_published(catch_up.epoch).await;
        coordinator.events.record(
            "checkpoint_replayed",
            None,
            None,
            format!(
                "{} changes committed after the checkpoint at epoch {} processed",
                catch_up.rows, catch_up.checkpoint_epoch
            ),
        );
    }
    let views: Vec<Arc<ViewEntry>> = coordinator
        .views()
        .into_iter()
        .filter(|v| matches!(v.status(), ViewStatus::Recovering(_)))
        .collect();
    if views.is_empty() {
        return;
    }
    coordinator.events.record(
        "recovery_started",
        None,
        None,
        format!("rebuilding {} materialized views", views.len()),
    );
    let mut restored = 0;
    for view in views {
        if !upstream_running(&coordinator, &view).await {
            continue;
        }
        let ready = match crate::views::start::rebuild(&engine, &view).await {
            Ok(ready) => ready,
            Err(e) => {
                coordinator
                    .task_failed(&view, format!("restore: {e}"))
                    .await;
                continue;
            }
        };
        let _ = ready.await;
        publish_rebuilt(&engine, &view).await;
        coordinator.wait_ready(&[view.id]).await;
        if view.status() == ViewStatus::Running {
            restored += 1;
        }
    }
    coordinator.events.record(
        "recovery_finished",
        None,
        None,
        format!(
            "{restored} materialized views running after {} ms",
            started.elapsed().as_millis()
        ),
    );
}

/// Loads the checkpointed state of the views that restore from the last checkpoint (before
/// the coordinator starts, so the catch-up epoch is the first they process). A view whose
/// state cannot be loaded, or whose upstream view's could not, is rebuilt instead.
async fn load_checkpointed(engine: &Arc<Engine>) {
    let coordinator = engine.views.clone();
    let mut unusable: HashSet<u64> = HashSet::new();
    for view in coordinator.views() {
        if !view.restore_pending.swap(false, Ordering::SeqCst) {
            continue;
        }
        let name = view.provider.name.clone();
        let started = Instant::now();
        let loaded = match view.sources.iter().find(|id| unusable.contains(id)) {
            Some(_) => Err(crate::error::ServerError::ObjectNotReady(
                "an upstream view is rebuilt".into(),
            )),
            None => crate::views::restore::restore_state(engine, &view).await,
        };
        match loaded {
            Ok((entries, rows)) => {
                view.checkpoint_fresh.store(false, Ordering::SeqCst);
                view.set_status(ViewStatus::Running);
                let undone = match engine.store().undone_spills(view.id) {
                    0 => String::new(),
                    n => format!(
                        "; {n} state entries evicted after the checkpoint were put back to it"
                    ),
                };
                coordinator.events.record(
                    "view_restored",
                    Some(&name),
                    None,
                    format!(
                        "from the checkpoint: {entries} state entries, {rows} rows, loaded in {} ms{undone}",
                        started.elapsed().as_millis()
                    ),
                );
            }
            Err(e) => {
                warn!(view = %name, error = %e, "checkpointed state unusable; rebuilding");
                unusable.insert(view.id);
                view.set_status(ViewStatus::Recovering(format!(
                    "being rebuilt (checkpointed state unusable: {e})"
                )));
            }
        }
    }
}

/// Commits an empty epoch if a rebuilt view waits for one to publish its contents.
async fn publish_rebuilt(engine: &Engine, view: &ViewEntry) {
    if view.has_carried_change() {
        let _writers = engine.write_lock.lock().await;
        engine.views.send_epoch(EpochChanges::new());
    }
}

/// Waits until every upstream view of `view` runs; false (and the view marked failed) if
/// one has failed for good, or if `view` was dropped meanwhile.
async fn upstream_running(coordinator: &Coordinator, view: &Arc<ViewEntry>) -> bool {
    loop {
        if coordinator.view(view.id).is_none() {
            return false;
        }
        let mut waiting = false;
        for upstream in view.sources.iter().filter_map(|id| coordinator.view(*id)) {
            match upstream.status() {
                ViewStatus::Running => {}
                ViewStatus::Failed(reason) => {
                    let reason = format!(
                        "upstream materialized view \"{}\" failed: {reason}",
                        upstream.provider.name
                    );
                    coordinator.events.record(
                        "view_failed",
                        Some(&view.provider.name),
                        None,
                        reason.clone(),
                    );
                    view.fail(reason).await;
                    return false;
                }
                _ => waiting = true,
            }
        }
        if !waiting {
            return true;
        }
        tokio::time::sleep(UPSTREAM_POLL).await;
    }
}

/// Backoff before restart number `attempt` (1-based).
fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_bound() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
