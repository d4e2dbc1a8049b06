//! The engine: the handles every session and background task shares (the catalog, the
//! durable store, DataFusion's runtime, the view coordinator, the cache manager, sources and
//! sinks) and the write path that turns table changes into committed log entries. It starts
//! nothing (`boot.rs` does) and imports no statement code.
//!
//! Flow of a write: a session computes [`TableChange`]s under [`Engine::write_lock`], then
//! [`Engine::commit_changes`] validates them, syncs one `WriteSet` to RocksDB and only then
//! applies the same entries to the tables' columnar caches.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::array::{Array, BooleanArray, RecordBatch, UInt64Array};

use datafusion::execution::FunctionRegistry;
use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use millrace_planner::{Catalog, MillraceTable};
use millrace_storage::{ColdFile, LogEntry, RowId, Store, WriteSet};
use tracing::{info, warn};

use crate::compute::ComputeRuntime;
use crate::config::ServeConfig;
use crate::coordinator::Coordinator;
use crate::coordinator::entry::EpochChanges;
use crate::error::{Result, ServerError};
use crate::memory::budget::{MemoryBudget, cold_store};
use crate::memory::cache::CacheManager;
use crate::memory::statement::SessionPool;
use crate::registry::sinks::Sinks;
use crate::registry::sources::Sources;

use millrace_planner::{Changelog, EpochPart};
use millrace_storage::error::LockResultExt;

/// A table log is rewritten once it holds at least this many entries (and 1/64 of its rows).
const COMPACT_MIN_ENTRIES: usize = 256;

/// A table log is rewritten once at least this many rows (and a quarter of the table) sit in
/// cold files it does not refer to: the rewrite turns them into references, so that a
/// restart opens the files instead of reading the rows and evicting them again.
const COMPACT_MIN_COLD_ROWS: usize = 65_536;

/// Bytes of rows a log rewrite (compaction, ALTER TABLE) commits at a time.
pub(crate) const REWRITE_COMMIT_BYTES: usize = 4 << 20;

/// Rows removed from and added to one table by one statement.
#[derive(Debug, Clone)]
pub struct TableChange {
    /// The table written.
    pub table: Arc<MillraceTable>,
    /// Its user-visible name (for error messages).
    pub table_name: String,
    /// Row ids to delete.
    pub deletes: Vec<RowId>,
    /// Rows to insert, in the table's schema.
    pub inserts: Option<RecordBatch>,
    /// More rows to insert, staged in cold files by a large COPY or INSERT ... SELECT
    /// (`memory/staging.rs`): the commit refers to the files, and the views read their rows
    /// a step at a time.
    pub staged: Vec<Arc<ColdFile>>,
}

/// A staged file of a commit: its rows' ids, and their encoded primary keys.
type StagedFile = (UInt64Array, Arc<ColdFile>, Option<Vec<Box<[u8]>>>);

/// One table's part of a commit, between its durable write and its application.
struct Applied {
    table: Arc<MillraceTable>,
    /// Log entries applied to the table's rows once durable.
    entries: Vec<LogEntry>,
    /// Staged files with the row ids their rows get and their encoded keys.
    files: Vec<StagedFile>,
    /// What the views are sent.
    changes: Vec<EpochPart>,
    /// Whether any view reads the table.
    watched: bool,
}

/// State shared by all sessions.
pub struct Engine {
    /// Databases, schemas, tables and views.
    pub catalog: Arc<Catalog>,
    /// Serialises writers: held while a DML statement computes and commits its changes.
    pub write_lock: tokio::sync::Mutex<()>,
    /// DataFusion runtime (memory pool, disk manager) shared by all sessions.
    pub runtime: Arc<RuntimeEnv>,
    /// Partitions DataFusion uses per query.
    pub workers: usize,
    /// Number of open client connections.
    pub connections: AtomicUsize,
    /// The materialized views and the coordinator that maintains them epoch by epoch.
    pub views: Arc<Coordinator>,
    /// Ingest tasks of connector-fed tables.
    pub sources: Arc<Sources>,
    /// Delivery tasks of sinks.
    pub sinks: Arc<Sinks>,
    /// Whether sessions may inject faults (`--failpoints`, tests only).
    pub failpoints: bool,
    /// Time between checkpoints (None: checkpoints off).
    pub checkpoint_interval: Option<std::time::Duration>,
    /// The memory budget and the object store that chunks are evicted to.
    pub cache: Arc<CacheManager>,
    /// The threads statements' query plans run on, apart from the connections' runtime.
    pub compute: ComputeRuntime,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("workers", &self.workers)
            .finish()
    }
}

impl Engine {
    /// The shared handles over the configured data directory: the store opened, nothing
    /// replayed or started yet (see `boot.rs`).
    pub fn new(config: &ServeConfig) -> Result<Arc<Engine>> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            ServerError::Internal(format!(
                "cannot create data directory {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let budget = MemoryBudget::new(config.memory_limit, config.cache_bytes);
        let store = Arc::new(Store::open_with_memory(
            &config.data_dir.join("rocksdb"),
            budget.rocksdb.map(|b| b as usize),
        )?);
        let mut runtime = RuntimeEnvBuilder::new();
        if let Some(queries) = budget.queries {
            // NOTE: a fair pool, not DataFusion's default greedy one: under the greedy
            // pool one partition's aggregate took the whole pool and the other's could not
            // even spill (a GROUP BY of 150k rows of text failed with 53200 at 64 MB).
            let pool = FairSpillPool::new(queries as usize);
            let consumers = std::num::NonZeroUsize::new(5).unwrap_or(std::num::NonZeroUsize::MIN);
            runtime = runtime.with_memory_pool(Arc::new(TrackConsumersPool::new(pool, consumers)));
        }
        let runtime = runtime.build_arc()?;
        let cold = cold_store(config.object_store.as_deref(), &config.data_dir)?;
        let views = Coordinator::new(
            config.workers(),
            config.epoch_queue,
            config.view_max_restarts,
            store.clone(),
            // Changes waiting for the views take at most a 64th of the limit.
            config.memory_limit.map(|l| (l / 64).max(1 << 20)),
            config.step_bytes,
            runtime.disk_manager.clone(),
        );
        let catalog = Arc::new(Catalog::new(store));
        let cache = CacheManager::try_new(cold, budget, catalog.clone(), views.clone())?;
        let room = Arc::downgrade(&cache);
        views.set_room(move |bytes| room.upgrade().is_some_and(|c| c.make_room(|| bytes).made()));
        let engine = Arc::new(Engine {
            catalog,
            write_lock: tokio::sync::Mutex::new(()),
            runtime,
            workers: config.workers(),
            connections: AtomicUsize::new(0),
            views,
            sources: Arc::new(Sources::default()),
            sinks: Arc::new(Sinks::default()),
            failpoints: config.failpoints,
            checkpoint_interval: (config.checkpoint_interval_ms > 0)
                .then(|| std::time::Duration::from_millis(config.checkpoint_interval_ms)),
            cache,
            compute: ComputeRuntime::new(config.workers())?,
        });
        Ok(engine)
    }

    /// The durable store.
    pub fn store(&self) -> &Arc<Store> {
        self.catalog.store()
    }

    /// A DataFusion context for a session of `database`, with pg_catalog and our functions.
    pub fn session_context(&self, database: &str, schema: &str) -> Result<SessionContext> {
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema(database, schema)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true)
            .with_target_partitions(self.workers)
            // The running statement's stop flag, read by the correlated apply.
            .with_extension(Arc::new(millrace_planner::stop::CurrentStop::default()));
        let options = config.options_mut();
        options.sql_parser.map_string_types_to_utf8view = false;
        options.sql_parser.dialect = datafusion::config::Dialect::PostgreSQL;
        options.sql_parser.parse_float_as_decimal = true;
        options.execution.time_zone = Some("+00:00".to_string());
        // DataFusion's TopKAggregation gives wrong answers: after the aggregate under a
        // `Sort fetch=n` it carries the limit on into aggregates further down (through a
        // DISTINCT into a `min` grouped by another key), keeping too few groups (random SQL
        // seed 796637762 query 60).
        options.optimizer.enable_topk_aggregation = false;
        // DataFusion's logical nullability of a CASE is finer than its physical one: `CASE
        // WHEN (CASE WHEN x THEN FALSE ELSE NULL END) THEN col ELSE 610 END` never takes
        // `col`, so it is not null logically and nullable physically, and the check that an
        // aggregate's input has its logical schema refused a DISTINCT over it (random SQL
        // seed 35 query 888). Types are checked again where the plan runs.
        options.execution.skip_physical_aggregate_schema_check = true;
        // Each session draws from the engine's query pool through a pool of its own, which
        // holds its statements to `statement_mem` (memory/statement.rs).
        let pool = SessionPool::new(self.runtime.memory_pool.clone());
        let runtime = RuntimeEnvBuilder::from_runtime_env(&self.runtime)
            .with_memory_pool(Arc::new(pool))
            .build_arc()?;
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_catalog_list(self.catalog.provider_list())
            .with_default_features();
        let state = millrace_planner::optimizer::with_rules(state).build();
        let mut ctx = SessionContext::new_with_state(state);
        ctx.register_expr_planner(Arc::new(millrace_planner::pg_intervals::PgIntervals))
            .map_err(ServerError::DataFusion)?;
        datafusion_pg_catalog::setup_pg_catalog(&ctx, database, EmptyContextProvider)
            .map_err(|e| ServerError::DataFusion(*e))?;
        millrace_planner::pg_functions::register(&ctx);
        ctx.add_analyzer_rule(Arc::new(millrace_planner::pg_casts::PgCasts));
        ctx.add_analyzer_rule(Arc::new(millrace_planner::exists_domain::ExistsOverDomain));
        ctx.add_analyzer_rule(Arc::new(millrace_planner::set_ops::MultisetSetOps));
        ctx.add_analyzer_rule(Arc::new(millrace_planner::not_in::NotInOverNulls));
        ctx.add_analyzer_rule(Arc::new(
            millrace_planner::correlated::SubqueriesInPlace::new(&ctx.state_ref()),
        ));
        millrace_planner::optimizer::add_correlated_subqueries(&ctx);

        Ok(ctx)
    }

    /// Commits table changes atomically: validate, sync to RocksDB, then apply to the cache.
    /// The caller holds [`Engine::write_lock`]. Returns the number of rows touched.
    pub fn commit_changes(&self, changes: Vec<TableChange>, mut extra: WriteSet) -> Result<usize> {
        let _room = self.cache.make_room(|| self.bytes_to_read(&changes));
        let mut touched = 0;
        let mut applied: Vec<Applied> = Vec::new();
        let mut compacted: Vec<Arc<MillraceTable>> = Vec::new();
        let mut epoch = EpochChanges::new();
        for change in merge_by_table(changes)? {
            let TableChange {
                table,
                table_name,
                deletes,
                inserts,
                staged,
            } = change;
            let mut data = table.rows.write().or_poisoned("table")?;
            let deleted: HashSet<RowId> = deletes.iter().copied().collect();
            if deleted.len() != deletes.len() || deletes.iter().any(|id| !data.contains(*id)) {
                return Err(ServerError::SerializationFailure);
            }
            let mut entries = Vec::new();
            let watched = self.views.has_readers(table.id);
            let mut changes: Vec<EpochPart> = Vec::new();
            if watched && !deletes.is_empty() {
                // NOTE: referred to, not read: the views read them a step at a time.
                changes.push(EpochPart::deleted(data.stored_rows(&deletes)));
            }
            if !deletes.is_empty() {
                touched += deletes.len();
                entries.push(LogEntry::Delete {
                    row_ids: deletes.into(),
                });
            }
            let inserts = inserts
                .filter(|b| b.num_rows() > 0)
                .map(|b| conform_to_table(&table_name, &table.def.schema, &b))
                .transpose()?;
            // NOTE: read before the commit: a read failing after it would leave a committed
            // change half applied.
            let keys = (staged.iter())
                .map(|file| data.staged_keys(file))
                .collect::<millrace_storage::Result<Vec<_>>>()?;
            if data.key_conflicts(&deleted, inserts.as_ref(), &keys)? {
                return Err(ServerError::UniqueViolation {
                    constraint: format!("{table_name}_pkey"),
                });
            }
            if let Some(batch) = inserts {
                touched += batch.num_rows();
                if watched {
                    changes.push(Changelog::inserts(batch.clone()).into());
                }
                entries.push(LogEntry::Insert {
                    row_ids: data.allocate_row_ids(batch.num_rows()),
                    batch,
                });
            }
            let mut files = Vec::with_capacity(staged.len());
            for (file, keys) in staged.into_iter().zip(keys) {
                touched += file.rows;
                let row_ids = data.allocate_row_ids(file.rows);
                extra.append(
                    table.id,
                    LogEntry::Cold {
                        path: file.path().to_string(),
                        row_ids: row_ids.clone(),
                        live: BooleanArray::from(vec![true; file.rows]),
                    },
                );
                files.push((row_ids, file, keys));
            }
            for entry in &entries {
                extra.append(table.id, entry.clone());
            }
            drop(data);
            applied.push(Applied {
                table,
                entries,
                files,
                changes,
                watched,
            });
        }
        self.commit_write_set(extra)?;
        for Applied {
            table,
            entries,
            files,
            mut changes,
            watched,
        } in applied
        {
            let mut data = table.rows.write().or_poisoned("table")?;
            let mut staged_ids = Vec::new();
            let logged = entries.len() + files.len();
            data.keep_staged(files.iter().map(|(_, file, _)| file));
            for (row_ids, file, keys) in files {
                data.add_staged(&row_ids, file, keys)?;
                staged_ids.extend_from_slice(row_ids.values());
            }
            for entry in &entries {
                data.apply(entry)?;
            }
            if watched && !staged_ids.is_empty() {
                // NOTE: referred to, not read: the views read them a step at a time.
                changes.push(EpochPart::inserted(data.stored_rows(&staged_ids)));
            }
            drop(data);
            table.log_entries.fetch_add(logged, Ordering::SeqCst);
            // NOTE: neither concatenated nor consolidated: an UPDATE's deleted and inserted
            // rows rarely cancel, operators take unconsolidated changes, and copying or
            // encoding every row doubled the memory a large UPDATE held.
            if !changes.is_empty() {
                epoch.insert(table.id, changes);
            }
            compacted.push(table);
        }
        if !epoch.is_empty() {
            self.views.send_epoch(epoch);
        }
        // NOTE: with checkpoints on, logs are rewritten by the checkpoint ticker, so that a
        // checkpoint's log position stays valid.
        if self.checkpoint_interval.is_none() {
            for table in &compacted {
                self.maybe_compact(table)?;
            }
        }
        Ok(touched)
    }

    /// About the bytes `changes` bring into memory for the views: the inserted rows and the
    /// positions of the deleted ones (the views read the deleted rows a step at a time).
    fn bytes_to_read(&self, changes: &[TableChange]) -> u64 {
        changes
            .iter()
            .filter(|c| self.views.has_readers(c.table.id))
            .map(|c| {
                let inserted = c.inserts.as_ref().map_or(0, |b| b.get_array_memory_size());
                let deleted = c.deletes.len() * std::mem::size_of::<usize>();
                (deleted + inserted) as u64
            })
            .sum()
    }

    /// Takes a checkpoint now (`CHECKPOINT`, flushed to disk, and every checkpoint interval):
    /// rewrites the logs that grew well past their rows, then queues the barrier behind the
    /// epochs committed so far and waits until it commits. Returns the checkpointed epoch
    /// (None: nothing changed since the last one).
    pub async fn checkpoint(&self, flush: bool) -> Result<Option<u64>> {
        let (done, committed) = tokio::sync::oneshot::channel();
        {
            let _writers = self.write_lock.lock().await;
            for id in self.catalog.table_ids() {
                if let Some(table) = self.catalog.table(id) {
                    self.maybe_compact(&table)?;
                }
            }
            let barrier = crate::coordinator::manifest::Barrier {
                log_seq: self.store().next_log_seq(),
                done: Some(done),
                flush,
            };
            self.views.queue_checkpoint(barrier).await;
        }
        committed
            .await
            .map_err(|_| ServerError::Internal("the view coordinator stopped".into()))?
    }

    /// Rewrites a table's log as its live rows once the log has grown well past them, or once
    /// many of its rows are in cold files the log does not refer to, so that replay on start
    /// stays proportional to the data in memory: hot chunks are written as inserts, cold ones
    /// as references to their files. The caller holds the write lock.
    fn maybe_compact(&self, table: &MillraceTable) -> Result<()> {
        let entries = table.log_entries.load(Ordering::SeqCst);
        let data = table.rows.read().or_poisoned("table")?;
        let rows = data.num_rows();
        let unlogged_cold = data.unlogged_cold_rows();
        if entries < COMPACT_MIN_ENTRIES.max(rows / 64)
            && unlogged_cold < COMPACT_MIN_COLD_ROWS.max(rows / 4)
        {
            return Ok(());
        }
        let parts = data.log_parts()?;
        drop(data);
        let n = parts.len();
        // The cold files the new log refers to: kept from now (the old log's, once it is gone).
        let files: Vec<_> = parts
            .iter()
            .filter_map(|p| p.cold_file().cloned())
            .collect();
        let store = self.store().clone();
        let id = table.id;
        // NOTE: a chunk at a time, in commits of a few MiB: the whole table in one write
        // batch held it all in memory twice (a spilled table read back, then encoded).
        let started = std::time::Instant::now();
        let rewrite = move || -> Result<usize> {
            let from = store.begin_log_rewrite(id)?;
            let written = (|| -> Result<usize> {
                let mut set = WriteSet::new();
                let (mut bytes, mut total) = (0, 0);
                for part in parts {
                    let entry = part.entry()?;
                    bytes += entry.memory_bytes();
                    total += entry.memory_bytes();
                    set.append(id, entry);
                    if bytes >= REWRITE_COMMIT_BYTES {
                        store.commit(std::mem::take(&mut set))?;
                        bytes = 0;
                    }
                }
                store.commit(set)?;
                store.finish_log_rewrite(id, from, WriteSet::new())?;
                Ok(total)
            })();
            if written.is_err() {
                // NOTE: the old log stays; a failure here is retried at the next restart.
                if let Err(e) = store.abandon_log_rewrite(id) {
                    warn!(table_id = id, error = %e, "cannot delete an unfinished log rewrite");
                }
            }
            written
        };
        let bytes = tokio::task::block_in_place(rewrite)?;
        let referenced = files.len();
        table
            .rows
            .write()
            .or_poisoned("table")?
            .set_log_files(files);
        table.log_entries.store(n, Ordering::SeqCst);
        info!(
            table_id = table.id,
            entries_before = entries,
            unlogged_cold_rows = unlogged_cold,
            entries_after = n,
            rows,
            bytes,
            cold_files = referenced,
            ms = started.elapsed().as_millis() as u64,
            "compacted table log"
        );
        Ok(())
    }

    /// Checks a change against NOT NULL and the primary key without applying it.
    pub fn validate(&self, change: &TableChange) -> Result<()> {
        let batch = change.inserts.as_ref().filter(|b| b.num_rows() > 0);
        if batch.is_none() && change.staged.is_empty() {
            return Ok(());
        }
        let batch = batch
            .map(|b| conform_to_table(&change.table_name, &change.table.def.schema, b))
            .transpose()?;
        let data = change.table.rows.read().or_poisoned("table")?;
        let deleted: HashSet<RowId> = change.deletes.iter().copied().collect();
        let keys = (change.staged.iter())
            .map(|file| data.staged_keys(file))
            .collect::<millrace_storage::Result<Vec<_>>>()?;
        if data.key_conflicts(&deleted, batch.as_ref(), &keys)? {
            return Err(ServerError::UniqueViolation {
                constraint: format!("{}_pkey", change.table_name),
            });
        }
        Ok(())
    }

    /// Syncs a write set to RocksDB without blocking the async workers.
    pub fn commit_write_set(&self, set: WriteSet) -> Result<()> {
        let store = self.store().clone();
        Ok(tokio::task::block_in_place(move || store.commit(set))?)
    }

    /// Counts a new connection; returns the new total.
    pub fn connection_opened(&self) -> usize {
        self.connections.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Counts a closed connection.
    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Folds several changes to one table into one (a transaction may write a table twice).
fn merge_by_table(changes: Vec<TableChange>) -> Result<Vec<TableChange>> {
    let mut out: Vec<TableChange> = Vec::new();
    for change in changes {
        if let Some(existing) = out.iter_mut().find(|c| c.table.id == change.table.id) {
            existing.deletes.extend(change.deletes);
            existing.staged.extend(change.staged);
            existing.inserts = match (existing.inserts.take(), change.inserts) {
                (Some(a), Some(b)) => {
                    // NOTE: each statement's batch carries its own nullability; concatenate
                    // under an all-nullable schema (NOT NULL is enforced at commit).
                    let loose = Arc::new(datafusion::arrow::datatypes::Schema::new(
                        a.schema()
                            .fields()
                            .iter()
                            .map(|f| f.as_ref().clone().with_nullable(true))
                            .collect::<Vec<_>>(),
                    ));
                    let a = RecordBatch::try_new(loose.clone(), a.columns().to_vec())?;
                    let b = RecordBatch::try_new(loose.clone(), b.columns().to_vec())?;
                    Some(datafusion::arrow::compute::concat_batches(&loose, &[a, b])?)
                }
                (a, b) => a.or(b),
            };
        } else {
            out.push(change);
        }
    }
    Ok(out)
}

/// Casts a batch to a table's column types and schema, enforcing NOT NULL.
pub fn conform_to_table(
    table_name: &str,
    schema: &datafusion::arrow::datatypes::SchemaRef,
    batch: &RecordBatch,
) -> Result<RecordBatch> {
    if batch.num_columns() != schema.fields().len() {
        return Err(ServerError::Internal(format!(
            "row has {} columns, table {table_name} has {}",
            batch.num_columns(),
            schema.fields().len()
        )));
    }
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if !field.is_nullable() && column.null_count() > 0 {
            return Err(ServerError::NotNullViolation {
                table: table_name.to_string(),
                column: field.name().clone(),
            });
        }
        let column = if column.data_type() == field.data_type() {
            column.clone()
        } else if field.data_type() == &datafusion::arrow::datatypes::DataType::Binary
            && let Some(text) = column
                .as_any()
                .downcast_ref::<datafusion::arrow::array::StringArray>()
        {
            // NOTE: PostgreSQL reads text into bytea as `\x` hex (or the raw bytes).
            let mut bytes = Vec::with_capacity(text.len());
            for v in text.iter() {
                bytes.push(match v {
                    None => None,
                    Some(s) => {
                        Some(millrace_planner::pg_casts::parse_bytea(s).ok_or_else(|| {
                            ServerError::InvalidText(format!(
                                "invalid input syntax for type bytea: \"{s}\""
                            ))
                        })?)
                    }
                });
            }
            std::sync::Arc::new(datafusion::arrow::array::BinaryArray::from_iter(bytes))
        } else {
            let options = datafusion::arrow::compute::CastOptions {
                safe: false,
                ..Default::default()
            };
            datafusion::arrow::compute::cast_with_options(column, field.data_type(), &options)?
        };
        columns.push(column);
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}
