//! The memory budget (`--memory-limit`) and the tiered cache manager behind `millrace_cache`.
//!
//! One budget bounds the process. RocksDB's memtables and block cache get an eighth of it
//! (a block cache that its write-buffer manager charges memtables to), DataFusion's memory
//! pool for queries a quarter, and the rest is the columnar cache: the Arrow chunks of tables
//! and view contents plus the views' operator state. Every 100 ms the manager adds up what
//! the cache holds; above its share it evicts the least recently read chunks, over all tables
//! and views, to Parquet files on the object store (`storage::cold`), and operator state to
//! the warm tier, until the cache is at 60% of its share. While the process's anonymous
//! resident memory is over three quarters of the limit, the share is what the cache holds
//! less what is over. Reads see evicted chunks through their files. The files of chunks
//! that were deleted, merged or dropped are deleted on the same tick.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use millrace_planner::Catalog;
use millrace_planner::ops::StateStats;
use millrace_planner::table::MillraceTable;
use millrace_planner::view_table::MaterializedView;
use millrace_storage::{CacheStats, ColdFile, ColdStore, ColumnarTable};
use tracing::{info, warn};

use crate::coordinator::Coordinator;
use crate::coordinator::entry::ViewEntry;
use crate::error::Result;
use crate::memory::budget::MemoryBudget;
use crate::memory::resident;

/// The process is taken to be over its limit from a this-many-th below it: memory allocated
/// between two ticks or during a long view step (a statement's rows, a step's intermediate
/// changes and the state it reads back) lands in that margin.
///
/// NOTE: a quarter, not an eighth: with an eighth, `state_spill`'s changes peaked at
/// 354-366 MiB against a bound of 414, with a quarter at 323-342.
const OVER_LIMIT_MARGIN: u64 = 4;
/// How long memory an eviction freed may still look resident (jemalloc purges freed pages
/// after a second, `main.rs`).
const RELEASE_WINDOW: Duration = Duration::from_millis(1500);
/// How often the manager checks the budget.
const TICK: Duration = Duration::from_millis(100);
/// Chunks smaller than this stay in memory (evicting them frees too little).
const MIN_EVICT_BYTES: usize = 64 << 10;
/// When over its share, the cache evicts down to this many tenths of it (the headroom is
/// what the pipelines grow into before the next tick).
const EVICT_TO_TENTHS: u64 = 6;

/// The cache manager's state.
pub struct CacheManager {
    /// The tables it watches.
    catalog: Arc<Catalog>,
    /// The views it watches.
    views: Arc<Coordinator>,
    /// Where evicted chunks go.
    pub cold: Arc<ColdStore>,
    /// The budget.
    pub budget: MemoryBudget,
    /// Eviction passes that failed (the object store refused a write), for `millrace_cache`.
    pub failed_evictions: AtomicU64,
    /// The last failure.
    pub last_error: Mutex<Option<String>>,
    /// Bytes the cache held at the last tick.
    pub cache_bytes: AtomicU64,
    /// Bytes over the cache's share that eviction could not free at the last tick (operator
    /// state and row indexes stay in memory).
    pub over_share: AtomicU64,
    /// Passes that evicted operator state.
    pub state_evictions: AtomicU64,
    /// Bytes statements are about to read into memory (see [`CacheManager::make_room`]).
    reserved: AtomicU64,
    /// Held through a tick (the manager's own, or one a statement runs).
    ticking: Mutex<()>,
    /// Anonymous resident memory when the manager started (before any data was loaded).
    anon_at_start: u64,
    /// Anonymous resident memory over the start's plus the limit at the last tick.
    pub over_limit: AtomicU64,
    /// When evictions freed how many bytes, over the last [`RELEASE_WINDOW`].
    freed: Mutex<VecDeque<(Instant, u64)>>,
}

impl std::fmt::Debug for CacheManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheManager")
            .field("cold", &self.cold)
            .field("budget", &self.budget)
            .finish()
    }
}

/// The object-store directory of a table's chunks.
fn table_dir(id: u64) -> String {
    format!("t{id}")
}

/// The object-store directory of a view's chunks.
fn view_dir(id: u64) -> String {
    format!("v{id}")
}

/// Keeps a table within the cache's share while a restart replays its log (before the table
/// is registered and seen by the manager's ticks), or a view's contents while they are
/// restored from a checkpoint: every eighth of the share added, the least recently written
/// chunks beyond 60% of the share are evicted.
pub struct ReplayBudget<'a> {
    manager: &'a CacheManager,
    dir: String,
    since_check: usize,
}

impl ReplayBudget<'_> {
    /// Called after each log entry is applied to `data`.
    pub fn applied(&mut self, entry: &millrace_storage::LogEntry, data: &mut ColumnarTable) {
        if let millrace_storage::LogEntry::Insert { batch, .. } = entry {
            self.grew(batch.get_array_memory_size(), data);
        }
    }

    /// Called after `bytes` of rows were added to `data`.
    pub fn grew(&mut self, bytes: usize, data: &mut ColumnarTable) {
        let Some(share) = self.manager.budget.cache else {
            return;
        };
        self.since_check += bytes;
        if self.since_check < (share / 8) as usize {
            return;
        }
        self.since_check = 0;
        let target = (share / 10 * 6) as usize;
        let mut used = data.memory_bytes();
        if used <= target {
            return;
        }
        let mut candidates = data.eviction_candidates();
        candidates.sort_unstable_by_key(|(_, last_used, _)| *last_used);
        for (chunk, _, _) in candidates {
            if used <= target {
                break;
            }
            match data.evict(chunk, &self.dir, &self.manager.cold) {
                Ok(freed) => used = used.saturating_sub(freed),
                Err(e) => {
                    warn!(error = %e, "evicting a chunk while replaying failed; continuing in memory");
                    self.manager
                        .failed_evictions
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// A table or view whose chunks can be evicted.
pub(crate) enum Owner {
    Table(Arc<MillraceTable>),
    View(Arc<MaterializedView>),
}

impl Owner {
    /// Name of the owner's directory in the object store.
    pub(crate) fn dir(&self) -> String {
        match self {
            Owner::Table(t) => table_dir(t.id),
            Owner::View(v) => view_dir(v.id),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&ColumnarTable) -> T) -> Option<T> {
        match self {
            Owner::Table(t) => t.rows.read().ok().map(|d| f(&d)),
            Owner::View(v) => v.contents.read().ok().map(|c| f(c.table())),
        }
    }

    fn write<T>(&self, f: impl FnOnce(&mut ColumnarTable) -> T) -> Option<T> {
        match self {
            Owner::Table(t) => t.rows.write().ok().map(|mut d| f(&mut d)),
            Owner::View(v) => v.contents.write().ok().map(|mut c| f(c.table_mut())),
        }
    }
}

impl CacheManager {
    /// The manager of `cold` under `budget`, watching the tables of `catalog` and `views`.
    pub fn try_new(
        cold: Arc<ColdStore>,
        budget: MemoryBudget,
        catalog: Arc<Catalog>,
        views: Arc<Coordinator>,
    ) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            catalog,
            views,
            cold,
            budget,
            failed_evictions: AtomicU64::new(0),
            last_error: Mutex::new(None),
            cache_bytes: AtomicU64::new(0),
            over_share: AtomicU64::new(0),
            state_evictions: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            ticking: Mutex::new(()),
            anon_at_start: resident::anonymous_resident().unwrap_or(0),
            over_limit: AtomicU64::new(0),
            freed: Mutex::new(VecDeque::new()),
        }))
    }

    /// The catalog whose tables the manager watches.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The coordinator whose views the manager watches.
    pub fn views(&self) -> &Arc<Coordinator> {
        &self.views
    }

    /// Makes room for the `bytes` (worked out only under a limit) that a statement is about
    /// to bring into memory (a large DELETE or UPDATE reads its rows back out of spilled
    /// chunks, and they go through the views), if they are a large part of the cache's
    /// share: a tick runs now counting them, instead of the next one finding the process over
    /// its limit. They count until the returned guard is dropped (by then they are changes
    /// in flight, counted as such).
    pub fn make_room(&self, bytes: impl FnOnce() -> u64) -> Room<'_> {
        let none = Room {
            manager: self,
            bytes: 0,
        };
        let (Some(share), Some(_)) = (self.budget.cache, self.budget.limit) else {
            return none;
        };
        let bytes = bytes();
        if bytes < share / 16 {
            return none;
        }
        self.reserved.fetch_add(bytes, Ordering::SeqCst);
        // NOTE: the tick blocks on writes to the object store and on pipelines.
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| self.tick());
        }
        Room {
            manager: self,
            bytes,
        }
    }

    /// Writes rows a statement stages before it commits (a large COPY) to a new cold file in
    /// the directory of table `table_id`; dropping the handle before the commit refers to it
    /// deletes the file.
    pub fn stage(&self, table_id: u64, batch: &RecordBatch) -> Result<Arc<ColdFile>> {
        let write = || self.cold.write(&table_dir(table_id), batch);
        let file = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(write)?,
            Err(_) => write()?,
        };
        Ok(Arc::new(file))
    }

    /// Removes the cold files earlier runs left that no table's log refers to (call once the
    /// tables are replayed).
    pub fn remove_orphans(&self) -> Result<usize> {
        let orphans = self.cold.remove_orphans()?;
        if orphans > 0 {
            info!(
                orphans,
                store = self.cold.url(),
                "removed cold files no table refers to"
            );
        }
        Ok(orphans)
    }

    /// The budget a restart replays table `id` under.
    pub fn replay_budget(&self, id: u64) -> ReplayBudget<'_> {
        ReplayBudget {
            manager: self,
            dir: table_dir(id),
            since_check: 0,
        }
    }

    /// The budget view `id`'s contents are restored from a checkpoint under.
    pub fn restore_budget(&self, id: u64) -> ReplayBudget<'_> {
        ReplayBudget {
            manager: self,
            dir: view_dir(id),
            since_check: 0,
        }
    }

    /// Every table and view with its cache figures, and the operator state of each view.
    pub(crate) fn owners(&self) -> Vec<(Owner, CacheStats, StateStats)> {
        let mut out = Vec::new();
        for id in self.catalog.table_ids() {
            if let Some(table) = self.catalog.table(id) {
                let owner = Owner::Table(table);
                if let Some(stats) = owner.read(ColumnarTable::cache_stats) {
                    out.push((owner, stats, StateStats::default()));
                }
            }
        }
        for view in self.views.views() {
            let mut state = view.stats.lock().map(|s| s.state).unwrap_or_default();
            // NOTE: the stats are recorded once an epoch is done; the tier has the state
            // after the last step (an UPDATE's epoch took 18 s of steps, reading back 100 MB
            // of state that the cache did not count until it ended).
            let live = view.tier.lock().ok().and_then(|t| t.as_ref()?.held());
            if let Some(bytes) = live {
                state.bytes = bytes;
            }
            let owner = Owner::View(view.provider.clone());
            // The contents' row index (encoded rows to their copies) is memory too.
            let stats = view.provider.contents.read().ok().map(|c| CacheStats {
                memory_bytes: c.memory_bytes() as u64,
                ..c.table().cache_stats()
            });
            if let Some(stats) = stats {
                out.push((owner, stats, state));
            }
        }
        out
    }

    /// The cache's share this tick, given that it holds `used` bytes: its part of the
    /// budget or, while the anonymous resident memory of the server and its helper
    /// processes (`resident.rs`) is over the limit (less a margin, plus what it held at
    /// start), what it holds less what is over.
    ///
    /// The shares count what the cache, RocksDB and the query pool account for; the rest
    /// (a statement's working set, a view step's intermediate changes, allocator slack,
    /// RocksDB's heap beyond its cache) is not accounted anywhere. Measured during an UPDATE
    /// of 286k rows of a spilled join under `--memory-limit 256MiB`: jemalloc held 150-230
    /// MB, of which the cache counted about 110 (chunks, state, changes in flight), and
    /// 65-100 MB more sat outside jemalloc (RocksDB through glibc, thread stacks) against
    /// RocksDB's 32 MB share. Measuring the process makes the cache give way to all of it.
    ///
    /// NOTE: what is over comes off what the cache holds, not off its full share: taken
    /// off the share, a cache holding 100 MB of a 160 MB share gave nothing back while the
    /// process was 65 MB over (`state_spill`). What evictions freed in the last
    /// [`RELEASE_WINDOW`] is not asked for again: the allocator returns freed pages to the
    /// system within a second, and until then the process looks as large as before.
    fn share_now(&self, used: u64) -> Option<u64> {
        let share = self.budget.cache?;
        let over = match (self.budget.limit, resident::anonymous_resident()) {
            (Some(limit), Some(anon)) => {
                anon.saturating_sub(self.anon_at_start + limit - limit / OVER_LIMIT_MARGIN)
            }
            _ => 0,
        };
        self.over_limit.store(over, Ordering::Relaxed);
        let freed = if over > 0 { self.recently_freed() } else { 0 };
        Some(squeezed_share(share, used, over, freed))
    }

    /// Bytes evictions freed within the last [`RELEASE_WINDOW`].
    fn recently_freed(&self) -> u64 {
        self.freed_window(None)
    }

    /// Records bytes an eviction freed now.
    fn record_freed(&self, bytes: u64) {
        if bytes > 0 {
            self.freed_window(Some(bytes));
        }
    }

    /// Forgets evictions older than [`RELEASE_WINDOW`], adds one that freed `now` bytes,
    /// and returns the bytes freed within the window.
    fn freed_window(&self, now: Option<u64>) -> u64 {
        let Ok(mut freed) = self.freed.lock() else {
            return 0;
        };
        while freed
            .front()
            .is_some_and(|(at, _)| at.elapsed() > RELEASE_WINDOW)
        {
            freed.pop_front();
        }
        if let Some(bytes) = now {
            freed.push_back((Instant::now(), bytes));
        }
        freed.iter().map(|(_, bytes)| bytes).sum()
    }

    /// One tick: evicts while over budget, then deletes unreferenced files.
    fn tick(&self) {
        let _ticking = self.ticking.lock();
        let owners = self.owners();
        let held: u64 = owners
            .iter()
            .map(|(_, s, state)| s.memory_bytes + state.bytes)
            .sum();
        self.cache_bytes.store(held, Ordering::Relaxed);
        // NOTE: changes on their way through the views (one UPDATE's can be a third of the
        // limit) share the cache's part of the budget: the cache makes room for them.
        let in_flight = self.views.changes_in_flight() + self.reserved.load(Ordering::SeqCst);
        let mut used = held + in_flight;
        let share_now = self.share_now(used);
        if let Some(share) = share_now
            && used > share
        {
            let target = share / 10 * EVICT_TO_TENTHS;
            match self.evict(&owners, used - target) {
                Ok(freed) => {
                    self.record_freed(freed);
                    used = used.saturating_sub(freed);
                }
                Err(e) => {
                    self.failed_evictions.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "evicting chunks to the object store failed; retrying");
                    if let Ok(mut last) = self.last_error.lock() {
                        *last = Some(e.to_string());
                    }
                }
            }
            self.cache_bytes
                .store(used.saturating_sub(in_flight), Ordering::Relaxed);
        }
        if let Some(share) = share_now
            && used > share
        {
            let freed = self.evict_state(used - share / 10 * EVICT_TO_TENTHS);
            self.record_freed(freed);
            used = used.saturating_sub(freed);
            self.cache_bytes
                .store(used.saturating_sub(in_flight), Ordering::Relaxed);
        }
        if let Some(share) = share_now {
            self.cap_state(&owners, share.saturating_sub(used));
        }
        let over = self.budget.cache.map_or(0, |share| {
            used.saturating_sub(in_flight).saturating_sub(share)
        });
        if self.over_share.swap(over, Ordering::Relaxed) == 0 && over > 0 {
            warn!(
                over_bytes = over,
                "the columnar cache stays over its share: row indexes and some operator state cannot be evicted"
            );
        }
        if let Err(e) = self.cold.collect_garbage() {
            warn!(error = %e, "deleting unreferenced cold files failed; retrying");
        }
    }

    /// Caps each view's operator state at what it holds plus its part of the cache's
    /// `headroom` (in proportion to its state), so that a pipeline that grows faster than
    /// the manager's ticks evicts on its own after a step.
    fn cap_state(&self, owners: &[(Owner, CacheStats, StateStats)], headroom: u64) {
        let total: u64 = owners.iter().map(|(_, _, s)| s.bytes).sum();
        let views = owners.iter().filter_map(|(owner, _, state)| match owner {
            Owner::View(v) => Some((v.id, state.bytes)),
            Owner::Table(_) => None,
        });
        for (id, state) in views {
            let Some(view) = self.views.view(id) else {
                continue;
            };
            let share = match total {
                0 => headroom,
                total => (headroom as f64 * state as f64 / total as f64) as u64,
            };
            if let Some(tier) = view.tier.lock().ok().and_then(|t| t.clone()) {
                tier.set_cap(state + share.max(MIN_EVICT_BYTES as u64));
            }
        }
    }

    /// Evicts operator state of every view in proportion to what `want` is of all of it
    /// (to the warm tier in RocksDB); returns the bytes freed. A view whose pipeline is
    /// busy (stepping, backfilling) is asked to evict after its current step instead.
    fn evict_state(&self, want: u64) -> u64 {
        let views: Vec<(Arc<ViewEntry>, u64)> = self
            .views
            .views()
            .into_iter()
            .filter_map(|v| {
                let state = v.stats.lock().map(|s| s.state.bytes).unwrap_or(0);
                let evictable = state >= MIN_EVICT_BYTES as u64 || self.budget.cache_only;
                (state > 0 && evictable).then_some((v, state))
            })
            .collect();
        let total: u64 = views.iter().map(|(_, s)| s).sum();
        if total == 0 {
            return 0;
        }
        let fraction = (want as f64 / total as f64).clamp(0.05, 1.0);
        let handle = tokio::runtime::Handle::current();
        let mut freed = 0;
        for (view, _) in views {
            let Ok(mut guard) = view.pipeline.try_lock() else {
                if let Some(tier) = view.tier.lock().ok().and_then(|t| t.clone()) {
                    tier.request_eviction(fraction);
                }
                continue;
            };
            let Some(pipeline) = guard.as_mut() else {
                continue;
            };
            freed += handle.block_on(pipeline.evict(fraction));
            let state = pipeline.stats().state;
            if let Ok(mut stats) = view.stats.lock() {
                stats.state = state;
            }
        }
        self.state_evictions.fetch_add(1, Ordering::Relaxed);
        freed
    }

    /// Evicts the least recently read chunks until `want` bytes are freed; returns the bytes
    /// freed. Each chunk is written without holding its table's lock, then swapped in.
    fn evict(&self, owners: &[(Owner, CacheStats, StateStats)], want: u64) -> Result<u64> {
        let mut candidates: Vec<(u64, usize, usize, u64)> = Vec::new();
        for (i, (owner, _, _)) in owners.iter().enumerate() {
            for (chunk, last_used, bytes) in owner
                .read(ColumnarTable::eviction_candidates)
                .unwrap_or_default()
            {
                if bytes >= MIN_EVICT_BYTES || self.budget.cache_only {
                    candidates.push((last_used, i, bytes, chunk));
                }
            }
        }
        candidates.sort_unstable();
        let mut freed = 0u64;
        for (_, i, _, chunk) in candidates {
            if freed >= want {
                break;
            }
            let owner = &owners[i].0;
            let Some(Some(batch)) = owner.read(|t| t.chunk_rows(chunk)) else {
                continue;
            };
            let file = self.cold.write(&owner.dir(), &batch)?;
            freed += owner.write(|t| t.mark_cold(chunk, file)).unwrap_or(0) as u64;
        }
        if freed > 0 {
            tracing::debug!(freed, want, "evicted chunks to the object store");
        }
        Ok(freed)
    }
}

/// Runs the manager until it goes away (with the engine that holds it).
pub async fn run(manager: Weak<CacheManager>) {
    loop {
        tokio::time::sleep(TICK).await;
        let Some(manager) = manager.upgrade() else {
            return;
        };
        // Writing Parquet and talking to the object store block; keep them off the runtime.
        let _ = tokio::task::spawn_blocking(move || manager.tick()).await;
    }
}

/// The cache's share when it holds `used` bytes of its full `share` and the process is
/// `over` its limit, of which evictions freed `freed` bytes recently (see
/// [`CacheManager::share_now`]).
fn squeezed_share(share: u64, used: u64, over: u64, freed: u64) -> u64 {
    if over == 0 {
        return share;
    }
    // NOTE: at most down to a quarter: what is over may be slack eviction cannot free.
    share
        .min(used.saturating_sub(over.saturating_sub(freed)))
        .max(share / 4)
}

/// Bytes counted by the cache manager until dropped ([`CacheManager::make_room`]).
pub struct Room<'a> {
    manager: &'a CacheManager,
    bytes: u64,
}

impl Room<'_> {
    /// Whether room was made (a tick ran).
    pub fn made(&self) -> bool {
        self.bytes > 0
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        self.manager
            .reserved
            .fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::squeezed_share;

    const MIB: u64 = 1 << 20;

    #[test]
    fn what_is_over_comes_off_what_the_cache_holds() {
        // Under the limit: the full share, whatever the cache holds.
        assert_eq!(squeezed_share(160 * MIB, 100 * MIB, 0, 0), 160 * MIB);
        // 65 MiB over while holding 100 of 160: down to 100 - 65 (floored at a quarter of
        // the share), not to 160 - 65 = 95, under which the cache already was.
        assert_eq!(squeezed_share(160 * MIB, 100 * MIB, 65 * MIB, 0), 40 * MIB);
        assert_eq!(squeezed_share(160 * MIB, 100 * MIB, 20 * MIB, 0), 80 * MIB);
        // Never above the full share.
        assert_eq!(squeezed_share(160 * MIB, 200 * MIB, 10 * MIB, 0), 160 * MIB);
    }

    #[test]
    fn what_evictions_freed_recently_is_not_asked_for_again() {
        // 30 MiB over, of which an eviction just freed 20 that may still look resident.
        assert_eq!(
            squeezed_share(160 * MIB, 100 * MIB, 30 * MIB, 20 * MIB),
            90 * MIB
        );
        // Freed more than is over: no further squeeze, and no growth either.
        assert_eq!(
            squeezed_share(160 * MIB, 100 * MIB, 30 * MIB, 50 * MIB),
            100 * MIB
        );
    }

    #[test]
    fn the_share_never_goes_below_a_quarter() {
        assert_eq!(squeezed_share(160 * MIB, 30 * MIB, 100 * MIB, 0), 40 * MIB);
    }
}
