//! View maintenance benchmark, in process: the cost of one single-row change pushed through
//! a view's incremental pipeline, side by side with DataFusion recomputing the same query
//! from scratch over the same table, at several table sizes; the sustained change rate at
//! 1 and 2 workers; and the bytes of operator state per input row.
//!
//! Usage: `cargo run --release -p millrace-bench --bin views` (or `bench/run views`);
//! `BENCH_SIZES=100000,1000000,10000000` picks table sizes, `BENCH_CHANGES` the single-row
//! changes timed per size, `BENCH_SECONDS` the sustained-rate runs.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::Constraints;
use datafusion::prelude::SessionContext;
use millrace_planner::changelog::Changelog;
use millrace_planner::incremental::compile;
use millrace_planner::pipeline::Pipeline;
use millrace_planner::{MillraceTable, TableDef};
use millrace_storage::{ColumnarTable, LogEntry};

const GROUPS: i64 = 1000;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn facts_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("g", DataType::Int64, true),
        Field::new("x", DataType::Int64, true),
    ]))
}

fn dims_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("g", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
    ]))
}

fn facts(from: i64, to: i64) -> Result<RecordBatch, Error> {
    let ids: Vec<i64> = (from..to).collect();
    Ok(RecordBatch::try_new(
        facts_schema(),
        vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(Int64Array::from(
                ids.iter().map(|i| i % GROUPS).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                ids.iter().map(|i| i % 7).collect::<Vec<_>>(),
            )),
        ],
    )?)
}

fn table(id: u64, schema: SchemaRef) -> Result<Arc<MillraceTable>, Error> {
    Ok(Arc::new(MillraceTable {
        id,
        def: TableDef {
            schema: schema.clone(),
            primary_key: None,
            defaults: HashMap::new(),
            constraints: Constraints::default(),
        },
        rows: Arc::new(RwLock::new(ColumnarTable::try_new(schema, None)?)),
        sql: String::new(),
        log_entries: AtomicUsize::new(0),
    }))
}

fn load(table: &MillraceTable, batch: RecordBatch) -> Result<(), Error> {
    let mut data = table.rows.write().map_err(|_| "poisoned")?;
    let ids = data.allocate_row_ids(batch.num_rows());
    data.apply(&LogEntry::Insert {
        row_ids: ids,
        batch,
    })?;
    Ok(())
}

struct Setup {
    ctx: SessionContext,
    facts: Arc<MillraceTable>,
    dims: Arc<MillraceTable>,
}

fn setup(rows: i64) -> Result<Setup, Error> {
    let ctx = SessionContext::new();
    let facts_table = table(1, facts_schema())?;
    let dims_table = table(2, dims_schema())?;
    let mut start = 0;
    while start < rows {
        let end = (start + 1_000_000).min(rows);
        load(&facts_table, facts(start, end)?)?;
        start = end;
    }
    let names: Vec<String> = (0..GROUPS).map(|g| format!("group-{g}")).collect();
    load(
        &dims_table,
        RecordBatch::try_new(
            dims_schema(),
            vec![
                Arc::new(Int64Array::from((0..GROUPS).collect::<Vec<_>>())),
                Arc::new(StringArray::from(names)),
            ],
        )?,
    )?;
    ctx.register_table("facts", facts_table.clone())?;
    ctx.register_table("dims", dims_table.clone())?;
    Ok(Setup {
        ctx,
        facts: facts_table,
        dims: dims_table,
    })
}

async fn pipeline(setup: &Setup, sql: &str, workers: usize) -> Result<Pipeline, Error> {
    let state = setup.ctx.state();
    let plan = state.optimize(&state.create_logical_plan(sql).await?)?;
    let mut pipeline = Pipeline::start(compile(&plan, state.execution_props())?, workers, None)?;
    pipeline.step(&HashMap::new()).await?;
    for (id, table) in [(1u64, &setup.facts), (2u64, &setup.dims)] {
        for batch in table.snapshot()?.batches {
            let mut offset = 0;
            while offset < batch.num_rows() {
                let len = 65_536.min(batch.num_rows() - offset);
                pipeline
                    .step(&HashMap::from([(
                        id,
                        Changelog::inserts(batch.slice(offset, len)),
                    )]))
                    .await?;
                offset += len;
            }
        }
    }
    Ok(pipeline)
}

fn one_row(id: i64) -> Result<HashMap<u64, Changelog>, Error> {
    Ok(HashMap::from([(
        1u64,
        Changelog::inserts(facts(id, id + 1)?),
    )]))
}

fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

async fn per_change(sizes: &[i64], changes: usize) -> Result<(), Error> {
    let queries = [
        (
            "group by",
            "SELECT g, count(*) AS n, sum(x) AS s, max(id) AS mx FROM facts GROUP BY g",
        ),
        (
            "join",
            "SELECT facts.id, facts.x, dims.name FROM facts JOIN dims ON facts.g = dims.g",
        ),
    ];
    println!("## cost of one single-row INSERT: incremental step vs DataFusion recompute");
    println!(
        "| rows | view | incremental per change | DataFusion recompute | ratio | state bytes/input row |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for &rows in sizes {
        let setup = setup(rows)?;
        for (name, sql) in queries {
            let mut pipeline = pipeline(&setup, sql, 1).await?;
            let state_bytes = pipeline.stats().state.bytes;
            let started = Instant::now();
            for i in 0..changes {
                pipeline.step(&one_row(rows + i as i64)?).await?;
            }
            let incremental = started.elapsed() / changes as u32;
            let recompute_runs = 3;
            let started = Instant::now();
            for _ in 0..recompute_runs {
                let batches = setup.ctx.sql(sql).await?.collect().await?;
                std::hint::black_box(batches);
            }
            let recompute = started.elapsed() / recompute_runs;
            println!(
                "| {rows} | {name} | {} | {} | {:.0}x | {:.1} |",
                fmt_duration(incremental),
                fmt_duration(recompute),
                recompute.as_secs_f64() / incremental.as_secs_f64().max(1e-12),
                state_bytes as f64 / rows as f64
            );
        }
    }
    Ok(())
}

async fn sustained(rows: i64, seconds: u64) -> Result<(), Error> {
    println!();
    println!(
        "## sustained changes through a view (epochs of 256 single-row inserts, {rows}-row table)"
    );
    println!("| view | workers | changes/s |");
    println!("|---|---:|---:|");
    let setup = setup(rows)?;
    for (name, sql) in [
        (
            "group by",
            "SELECT g, count(*) AS n, sum(x) AS s FROM facts GROUP BY g",
        ),
        (
            "join",
            "SELECT facts.id, dims.name FROM facts JOIN dims ON facts.g = dims.g",
        ),
    ] {
        for workers in [1usize, 2] {
            let mut pipeline = pipeline(&setup, sql, workers).await?;
            let started = Instant::now();
            let mut next = rows;
            let mut done = 0u64;
            while started.elapsed() < Duration::from_secs(seconds) {
                let epoch = HashMap::from([(1u64, Changelog::inserts(facts(next, next + 256)?))]);
                pipeline.step(&epoch).await?;
                next += 256;
                done += 256;
            }
            println!(
                "| {name} | {workers} | {:.0} |",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Error> {
    let sizes: Vec<i64> = env("BENCH_SIZES", "100000,1000000,10000000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let changes: usize = env("BENCH_CHANGES", "200").parse()?;
    let seconds: u64 = env("BENCH_SECONDS", "5").parse()?;
    per_change(&sizes, changes).await?;
    sustained(1_000_000, seconds).await?;
    Ok(())
}
