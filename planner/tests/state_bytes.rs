//! The operator state figure the memory budget relies on (`StateStats::bytes`) against the
//! bytes the allocator really handed out for that state, for the stateful operators whose
//! state is evicted (join, aggregate, window): the cache manager evicts by that figure, so a
//! figure far below the truth would let the process grow past its limit unseen.
//!
//! A counting global allocator rounds every request up to jemalloc's size classes (the
//! server's allocator) and the test compares the figure with what the pipeline's steps left
//! allocated, within 25%.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use common::{Error, schema, table};
use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::prelude::SessionContext;
use millrace_planner::changelog::Changelog;
use millrace_planner::incremental::compile;
use millrace_planner::pipeline::Pipeline;

/// Bytes allocated and not yet freed, in jemalloc size classes.
static LIVE: AtomicI64 = AtomicI64::new(0);

struct Counting;

/// jemalloc's size class for a request: multiples of 16 up to 128, then four classes per
/// doubling.
fn class(size: usize) -> i64 {
    let size = size.max(1);
    if size <= 128 {
        return size.div_ceil(16) as i64 * 16;
    }
    let group = (usize::BITS - (size - 1).leading_zeros() - 1) as usize;
    let step = 1usize << (group - 2);
    size.div_ceil(step) as i64 * step as i64
}

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter moves.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(class(layout.size()), Ordering::Relaxed);
        // SAFETY: same layout as requested.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(class(layout.size()), Ordering::Relaxed);
        // SAFETY: ptr came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(class(new_size) - class(layout.size()), Ordering::Relaxed);
        // SAFETY: ptr came from `alloc` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Rows `from..to` with key `id / per_key` and a pad of about 60 bytes.
fn rows(from: i64, to: i64, per_key: i64) -> Result<RecordBatch, Error> {
    let ids: Vec<i64> = (from..to).collect();
    Ok(RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(Int64Array::from(
                ids.iter().map(|i| i / per_key).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                ids.iter()
                    .map(|i| format!("{i:>12}{}", "p".repeat(48)))
                    .collect::<Vec<_>>(),
            )),
        ],
    )?)
}

/// Runs `sql` over tables `l` (id 1) and `r` (id 2), each fed `n` rows in batches, and
/// returns (state figure, bytes the state holds).
async fn measure(sql: &str, n: i64, per_key: i64) -> Result<(i64, i64), Error> {
    let ctx = SessionContext::new();
    ctx.register_table("l", table(1)?)?;
    ctx.register_table("r", table(2)?)?;
    let state = ctx.state();
    let plan = state.optimize(&state.create_logical_plan(sql).await?)?;
    let mut pipeline = Pipeline::start(compile(&plan, state.execution_props())?, 1, None)?;
    pipeline.step(&HashMap::new()).await?;
    let batches: Vec<(u64, RecordBatch)> = (0..n)
        .step_by(10_000)
        .flat_map(|from| {
            let to = (from + 10_000).min(n);
            [
                (1u64, rows(from, to, per_key)),
                (2u64, rows(from, to, per_key)),
            ]
        })
        .map(|(id, b)| b.map(|b| (id, b)))
        .collect::<Result<_, _>>()?;
    // The input batches stay allocated until the end, so only what the steps keep counts.
    let before = LIVE.load(Ordering::SeqCst);
    for (id, batch) in &batches {
        let out = pipeline
            .step(&HashMap::from([(*id, Changelog::inserts(batch.clone()))]))
            .await?;
        drop(out);
    }
    let held = LIVE.load(Ordering::SeqCst) - before;
    Ok((pipeline.stats().state.bytes as i64, held))
}

/// Prints the comparison; returns it as a failure when the figure is off by more than 25%.
fn check(what: &str, (figure, held): (i64, i64)) -> Option<String> {
    let ratio = figure as f64 / held as f64;
    println!("{what}: figure {figure} bytes, allocated {held} bytes, ratio {ratio:.2}");
    (!(0.75..=1.25).contains(&ratio)).then(|| {
        format!("{what}: the state figure {figure} is not within 25% of the {held} bytes allocated")
    })
}

// One test: the allocation counter is process-wide, so the measurements must not overlap.
#[tokio::test(flavor = "current_thread")]
async fn state_figures_match_allocations() -> Result<(), Error> {
    let join = "SELECT l.id, r.id AS rid, l.pad, r.pad AS rpad FROM l JOIN r ON l.k = r.k";
    let aggregate = "SELECT k, count(*) AS n, sum(id) AS s, max(pad) AS m FROM l GROUP BY k";
    let window = "SELECT k, id, row_number() OVER (PARTITION BY k ORDER BY id) AS rn FROM l";
    let mut failures = Vec::new();
    for (what, sql, per_key) in [
        ("join, one row per key", join, 1),
        ("join, 20 rows per key", join, 20),
        ("aggregate, one row per group", aggregate, 1),
        ("aggregate, 20 rows per group", aggregate, 20),
        ("window, 20 rows per partition", window, 20),
    ] {
        failures.extend(check(what, measure(sql, 40_000, per_key).await?));
    }
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}
