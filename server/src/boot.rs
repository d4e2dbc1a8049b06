//! Start-up: opening the data directory, the replay of the catalog and of every table's log
//! (with the changes since the last checkpoint handed to the views that restore from it),
//! and starting what runs in the background: the supervisor, the cache manager's ticker,
//! sources, sinks and the checkpoint ticker. Only `server.rs` calls it; it sits at the top
//! of the server, above every module it starts.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use millrace_planner::{Changelog, EpochPart};
use millrace_storage::{CatalogRecord, LogEntry, ObjectKind, RowId, WriteSet};
use tracing::{info, warn};

use crate::catalog::index::attach_indexes;
use crate::catalog::options::{connector_options, stored_options};
use crate::catalog::records::{DEFAULT_DATABASE, database_records, replay_schema};
use crate::catalog::relation::{build_table, build_view};
use crate::config::ServeConfig;
use crate::coordinator::entry::EpochChanges;
use crate::engine::Engine;
use crate::error::{Result, ServerError};
use crate::views::restore::register_for_restore;
use crate::views::restore_plan::RestorePlan;
use millrace_storage::error::LockResultExt;

/// Metadata key of the object store (its URL) the last run kept spilled data in.
const OBJECT_STORE_META: &[u8] = b"object_store_url";

/// Opens the data directory, replays the catalog and every table, and starts the
/// supervisor, the cache manager, sources, sinks and the checkpoint ticker.
pub async fn open(config: &ServeConfig) -> Result<Arc<Engine>> {
    let engine = Engine::new(config)?;
    // NOTE: the coordinator starts once checkpointed views have loaded their state
    // (`supervisor::restore_all`); epochs committed meanwhile queue up for it.
    crate::coordinator::system::register(&engine.catalog, &engine.views);
    crate::coordinator::events::register(&engine.catalog, &engine.views.events);
    crate::coordinator::checkpoint::register(&engine.catalog, &engine.views);
    tokio::spawn(crate::views::supervisor::run(engine.clone()));
    crate::registry::sources_table::register(&engine.catalog, &engine.sources);
    crate::registry::sinks_table::register(&engine.catalog, &engine.sinks);
    crate::memory::system::register(&engine.cache, engine.runtime.clone());
    // The budget holds while the tables are rebuilt from their logs, too.
    tokio::spawn(crate::memory::cache::run(Arc::downgrade(&engine.cache)));
    let recorded = object_store_moved_from(&engine)?;
    if let Err(e) = replay(&engine).await {
        return Err(match recorded {
            Some(recorded) => ServerError::ObjectStoreMoved {
                recorded,
                given: engine.cache.cold.url().to_string(),
                cause: e.to_string(),
            },
            None => e,
        });
    }
    record_object_store(&engine)?;
    // NOTE: only now: the tables have opened the cold files their logs refer to.
    engine.cache.remove_orphans()?;
    engine.sources.load_bad_records(engine.store())?;
    start_sources(&engine)?;
    start_sinks(&engine)?;
    if let Some(interval) = engine.checkpoint_interval {
        tokio::spawn(checkpoint_ticker(Arc::downgrade(&engine), interval));
    }
    Ok(engine)
}

/// The object store the data directory's last run used, if it was another one than
/// now (its spilled files must have been copied here; a start that misses one says so).
fn object_store_moved_from(engine: &Engine) -> Result<Option<String>> {
    let given = engine.cache.cold.url();
    let recorded = engine
        .store()
        .meta(OBJECT_STORE_META)?
        .map(|url| String::from_utf8_lossy(&url).into_owned())
        .filter(|url| url != given);
    if let Some(recorded) = &recorded {
        warn!(
            recorded = %recorded,
            given = %given,
            "the object store differs from the last run's: its spilled files are read from the new one"
        );
    }
    Ok(recorded)
}

/// Records the object store in use, once every table found its files there.
fn record_object_store(engine: &Engine) -> Result<()> {
    let url = engine.cache.cold.url().as_bytes();
    if engine.store().meta(OBJECT_STORE_META)?.as_deref() != Some(url) {
        let mut set = WriteSet::new();
        set.put_meta(OBJECT_STORE_META, url.to_vec());
        engine.commit_write_set(set)?;
    }
    Ok(())
}

/// Rebuilds the catalog and every table's cache from the durable store.
async fn replay(engine: &Arc<Engine>) -> Result<()> {
    let records = engine.store().catalog()?;
    if !records
        .iter()
        .any(|r| r.kind == ObjectKind::Database && r.name == DEFAULT_DATABASE)
    {
        let mut set = WriteSet::new();
        for record in database_records(engine.store(), DEFAULT_DATABASE) {
            set.put_catalog(record);
        }
        engine.commit_write_set(set)?;
    }
    let records = engine.store().catalog()?;
    info!(objects = records.len(), "replaying catalog");
    let mut plan = RestorePlan::load(engine.store())?;
    if engine.checkpoint_interval.is_none() {
        plan.manifest = None;
    }
    let mut since_checkpoint = EpochChanges::new();
    let mut rows = 0usize;
    for record in records {
        rows += replay_record(engine, record, &mut plan, &mut since_checkpoint).await?;
    }
    info!(rows, "catalog replayed; table caches rebuilt");
    if !plan.restored.is_empty() {
        // The changes committed after the checkpoint, as the first epoch, for the views
        // that restore their state (processed once they have loaded it).
        let rows: usize = since_checkpoint.values().flatten().map(|c| c.len()).sum();
        let _writers = engine.write_lock.lock().await;
        let epoch = engine.views.send_epoch(since_checkpoint);
        engine.views.set_catch_up(crate::coordinator::CatchUp {
            epoch,
            rows,
            checkpoint_epoch: plan.manifest.as_ref().map_or(0, |m| m.epoch),
        });
    }
    Ok(())
}

/// Starts the ingest task of every connector-fed table, each from its committed offset.
fn start_sources(engine: &Arc<Engine>) -> Result<()> {
    for record in engine.store().catalog()? {
        if record.kind != ObjectKind::Table {
            continue;
        }
        let Some(options) = connector_options(&record.sql)? else {
            continue;
        };
        let Some(table) = engine.catalog.table(record.id) else {
            continue;
        };
        crate::connector::start(engine.clone(), table, record.name.clone(), &options)?;
    }
    Ok(())
}

/// Starts every sink from its committed progress (each waits for its view's backfill).
fn start_sinks(engine: &Arc<Engine>) -> Result<()> {
    for record in engine.store().catalog()? {
        if record.kind != ObjectKind::Sink {
            continue;
        }
        let options = stored_options(&record)?;
        let Some(view) = record
            .depends_on
            .first()
            .and_then(|id| engine.catalog.record(*id))
        else {
            continue;
        };
        crate::sink::start(engine.clone(), &record, &view, &options)?;
    }
    Ok(())
}

async fn replay_record(
    engine: &Arc<Engine>,
    record: CatalogRecord,
    plan: &mut RestorePlan,
    since_checkpoint: &mut EpochChanges,
) -> Result<usize> {
    match record.kind {
        ObjectKind::Database => {
            engine.catalog.register_database(record);
            Ok(0)
        }
        ObjectKind::Schema => {
            engine.catalog.register_schema(record)?;
            Ok(0)
        }
        ObjectKind::Table => {
            let ctx = engine.session_context(&record.database, replay_schema(&record))?;
            let table = build_table(&ctx, &record).await?;
            plan.check_table(engine.store(), record.id)?;
            let after = plan.manifest.as_ref().map(|m| m.log_seq);
            // The changes since the checkpoint, net of rows both inserted and deleted
            // after it: the rows deleted that the checkpoint had, read before their
            // delete is applied, and the rows inserted that are still live.
            let mut deleted: Vec<Changelog> = Vec::new();
            let mut inserted: HashSet<RowId> = HashSet::new();
            let (entries, parts) = {
                let mut data = table.rows.write().or_poisoned("table")?;
                let mut replay = engine.cache.replay_budget(record.id);
                let cold = &engine.cache.cold;
                let entries = engine.store().for_each_log_entry(record.id, |seq, entry| {
                    let tracked = after.is_some_and(|s| seq >= s);
                    match &entry {
                        LogEntry::Delete { row_ids } if tracked => {
                            let checkpointed: Vec<RowId> = (row_ids.values().iter())
                                .copied()
                                .filter(|id| !inserted.remove(id))
                                .collect();
                            if !checkpointed.is_empty() {
                                deleted.push(Changelog::deletes(data.fetch(&checkpointed)?));
                            }
                            data.apply(&entry)?;
                        }
                        LogEntry::Insert { row_ids, .. } | LogEntry::Cold { row_ids, .. }
                            if tracked =>
                        {
                            data.replay(&entry, cold)?;
                            inserted.extend(row_ids.values().iter().copied());
                        }
                        _ => data.replay(&entry, cold)?,
                    }
                    replay.applied(&entry, &mut data);
                    Ok(())
                })?;
                // NOTE: the inserted rows are referred to where the table keeps them,
                // not read: the views read them a step at a time. Reading both sides,
                // then concatenating and consolidating them, held a large change since
                // the checkpoint in memory three times while the restart replayed.
                let mut parts: Vec<EpochPart> = Vec::new();
                if !deleted.is_empty() {
                    let rows = Changelog::concat(&table.def.schema, deleted)?;
                    parts.push(rows.into());
                }
                if !inserted.is_empty() {
                    let mut ids: Vec<RowId> = inserted.into_iter().collect();
                    ids.sort_unstable();
                    parts.push(EpochPart::inserted(data.stored_rows(&ids)));
                }
                (entries, parts)
            };
            if !parts.is_empty() {
                since_checkpoint.insert(record.id, parts);
            }
            let (rows, stats) = table
                .rows
                .read()
                .map(|d| (d.num_rows(), d.cache_stats()))
                .unwrap_or_default();
            table.log_entries.store(entries, Ordering::SeqCst);
            info!(
                table = %record.name,
                rows,
                log_entries = entries,
                cold_chunks = stats.cold_chunks,
                log_files = stats.log_files,
                "table restored"
            );
            engine
                .catalog
                .register_relation(record, table.clone(), Some(table))?;
            Ok(rows)
        }
        ObjectKind::View => {
            let ctx = engine.session_context(&record.database, replay_schema(&record))?;
            let view = build_view(&ctx, &record).await?;
            engine.catalog.register_relation(record, view, None)?;
            Ok(0)
        }
        ObjectKind::MaterializedView => {
            let ctx = engine.session_context(&record.database, replay_schema(&record))?;
            register_for_restore(engine, &ctx, record, plan).await?;
            Ok(0)
        }
        ObjectKind::Sink => {
            engine.catalog.register_index(record);
            Ok(0)
        }
        ObjectKind::Index => {
            let table = record
                .depends_on
                .first()
                .and_then(|id| engine.catalog.table(*id));
            engine.catalog.register_index(record);
            if let Some(table) = table {
                attach_indexes(&engine.catalog, &table)?;
            }
            Ok(0)
        }
    }
}

/// Takes a checkpoint every `interval` while the engine lives.
async fn checkpoint_ticker(engine: Weak<Engine>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        if let Err(e) = engine.checkpoint(false).await {
            tracing::warn!(error = %e, "checkpoint failed");
        }
    }
}
