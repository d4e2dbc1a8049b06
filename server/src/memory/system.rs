//! `millrace_cache`: per table and view, bytes in memory and in the object store, chunks,
//! hits, misses and evictions, operator state; plus rows for RocksDB, queries and the whole
//! budget. Computed when scanned.

use std::sync::Arc;

use std::sync::atomic::Ordering;

use datafusion::execution::runtime_env::RuntimeEnv;
use millrace_planner::ops::StateStats;
use millrace_planner::system_table::SystemTableBuilder;
use millrace_storage::CacheStats;

use crate::memory::cache::{CacheManager, Owner};
use crate::memory::resident;

/// One row of `millrace_cache`.
struct CacheRow {
    name: String,
    kind: &'static str,
    stats: CacheStats,
    state: StateStats,
    budget: Option<u64>,
    detail: Option<String>,
}

impl CacheRow {
    fn system(name: &str, memory_bytes: u64, budget: Option<u64>, detail: &str) -> Self {
        Self {
            name: name.into(),
            kind: "system",
            stats: CacheStats {
                memory_bytes,
                ..CacheStats::default()
            },
            state: StateStats::default(),
            budget,
            detail: Some(detail.into()),
        }
    }
}

/// Registers `millrace_cache`: per table and view, bytes in memory and in the object store,
/// chunks, hits, misses and evictions, cold files held (and of them, those a table's log
/// refers to); plus rows for RocksDB, queries and the whole budget.
pub fn register(manager: &Arc<CacheManager>, queries: Arc<RuntimeEnv>) {
    let weak = Arc::downgrade(manager);
    let rows = move || {
        let Some(manager) = weak.upgrade() else {
            return Vec::new();
        };
        let records = manager.catalog().records();
        let mut rows: Vec<CacheRow> = Vec::new();
        let mut total = CacheStats::default();
        let mut total_state = StateStats::default();
        for (owner, stats, state) in manager.owners() {
            let (id, kind) = match &owner {
                Owner::Table(t) => (t.id, "table"),
                Owner::View(v) => (v.id, "view"),
            };
            let name = records
                .iter()
                .find(|r| r.id == id)
                .map(|r| r.name.clone())
                .unwrap_or_else(|| owner.dir());
            total.memory_bytes += stats.memory_bytes;
            total.object_store_bytes += stats.object_store_bytes;
            total.hot_chunks += stats.hot_chunks;
            total.cold_chunks += stats.cold_chunks;
            total.hits += stats.hits;
            total.misses += stats.misses;
            total.evictions += stats.evictions;
            total.files += stats.files;
            total.log_files += stats.log_files;
            total_state.add(state);
            rows.push(CacheRow {
                name,
                kind,
                stats,
                state,
                budget: None,
                detail: None,
            });
        }
        let counters = &manager.cold.counters;
        let failed = manager.failed_evictions.load(Ordering::Relaxed);
        let last = manager.last_error.lock().ok().and_then(|l| l.clone());
        let (mut state_failed, mut state_last) = (0, None);
        for view in manager.views().views() {
            if let Some(tier) = view.tier.lock().ok().and_then(|t| t.clone()) {
                let (n, last) = tier.failures();
                state_failed += n;
                state_last = state_last.or(last);
            }
        }
        rows.push(CacheRow {
            name: "columnar cache".into(),
            kind: "total",
            stats: total,
            state: total_state,
            budget: manager.budget.cache,
            detail: Some(format!(
                "object store {}: {} files written, {} deleted, {} reads; scans pruned {} files and {} row groups; {failed} failed eviction passes{}; operator state: {} eviction passes, {state_failed} failed evictions{}{}{}{}",
                manager.cold.url(),
                counters.files_written.load(Ordering::Relaxed),
                counters.files_deleted.load(Ordering::Relaxed),
                counters.reads.load(Ordering::Relaxed),
                counters.files_pruned.load(Ordering::Relaxed),
                counters.row_groups_pruned.load(Ordering::Relaxed),
                last.map(|e| format!(" (last: {e})")).unwrap_or_default(),
                manager.state_evictions.load(Ordering::Relaxed),
                state_last.map(|e| format!(" (last: {e})")).unwrap_or_default(),
                match manager.over_share.load(Ordering::Relaxed) {
                    0 => String::new(),
                    over => format!(
                        "; {over} bytes over the share that cannot be evicted (row indexes, state of views without checkpoint encoding)"
                    ),
                },
                match manager.over_limit.load(Ordering::Relaxed) {
                    0 => String::new(),
                    over => format!(
                        "; resident memory {over} bytes over the limit at the last tick (the share shrinks by as much)"
                    ),
                },
                match resident::helpers() {
                    (0, _) => String::new(),
                    (n, bytes) => format!(
                        "; {n} kafka fetch processes hold {bytes} bytes (counted in the limit)"
                    ),
                }
            )),
        });
        rows.push(CacheRow::system(
            "rocksdb",
            manager.catalog().store().memory_bytes(),
            manager.budget.rocksdb,
            "memtables and block cache",
        ));
        rows.push(CacheRow::system(
            "queries",
            queries.memory_pool.reserved() as u64,
            manager.budget.queries,
            "DataFusion memory pool",
        ));
        rows
    };
    let count = |f: fn(&CacheRow) -> u64| move |r: &CacheRow| f(r) as i64;
    let table = SystemTableBuilder::new()
        .text("name", |r: &CacheRow| r.name.clone())
        .text("kind", |r| r.kind.to_string())
        .int("memory_bytes", count(|r| r.stats.memory_bytes))
        .int("state_bytes", count(|r| r.state.bytes))
        .int("state_spilled_bytes", count(|r| r.state.spilled_bytes))
        .int("state_evicted", count(|r| r.state.counters.evicted))
        .int("state_fetched", count(|r| r.state.counters.fetched))
        .int("object_store_bytes", count(|r| r.stats.object_store_bytes))
        .int("hot_chunks", count(|r| r.stats.hot_chunks))
        .int("cold_chunks", count(|r| r.stats.cold_chunks))
        .int("hits", count(|r| r.stats.hits))
        .int("misses", count(|r| r.stats.misses))
        .int("evictions", count(|r| r.stats.evictions))
        .int_or_null("budget_bytes", |r| r.budget.map(|b| b as i64))
        .text_or_null("detail", |r| r.detail.clone())
        .int("files", count(|r| r.stats.files))
        .int("log_files", count(|r| r.stats.log_files))
        .build(rows);
    manager
        .catalog()
        .register_system_table("millrace_cache", Arc::new(table));
}
