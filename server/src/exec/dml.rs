//! DML: INSERT, UPDATE, DELETE and TRUNCATE become [`TableChange`]s.
//!
//! DataFusion plans each statement. INSERT runs the planned input (defaults and casts
//! included); UPDATE and DELETE run their input over a [`RowIdTable`] to learn which rows to
//! change. The engine's write lock is held from planning to commit, so a statement sees and
//! changes one consistent state.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{Array, RecordBatch, UInt64Array};
use datafusion::arrow::compute::{CastOptions, cast_with_options, concat_batches};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ParamValues};
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{
    Expr, LogicalPlan, LogicalPlanBuilder, TableScan, TableScanBuilder, WriteOp,
};
use datafusion::prelude::DataFrame;
use datafusion::sql::sqlparser::ast::{self, Statement};
use futures::StreamExt;
use millrace_planner::{MillraceTable, ROW_ID_COLUMN, RowIdTable};

use crate::engine::{TableChange, conform_to_table};
use crate::error::{Result, ServerError};
use crate::exec::names;
use crate::exec::output::Output;
use crate::exec::query::{bind, check_reads, plan_statement};
use crate::exec::txn;
use crate::memory::staging::Staging;
use crate::session::Session;
use millrace_storage::error::LockResultExt;

/// Runs INSERT, UPDATE or DELETE.
pub async fn run(
    session: &mut Session,
    statement: Statement,
    plan: Option<LogicalPlan>,
    params: Option<ParamValues>,
) -> Result<Output> {
    let engine = session.engine.clone();
    let _write = engine.write_lock.lock().await;
    let plan = match plan {
        Some(p) => p,
        None => plan_statement(session, statement).await?,
    };
    let plan = bind(plan, params)?;
    let LogicalPlan::Dml(dml) = plan else {
        return Err(ServerError::Internal(
            "DML did not plan to a DML node".into(),
        ));
    };
    let provider = source_as_provider(&dml.target)?;
    let Some(target) = provider.downcast_ref::<MillraceTable>() else {
        return Err(ServerError::NotSupported(format!(
            "changing \"{}\", which is not a table",
            dml.table_name
        )));
    };
    let Some(table) = engine.catalog.table(target.id) else {
        return Err(ServerError::Internal(format!(
            "table {} is not registered",
            dml.table_name
        )));
    };
    let table_name = dml.table_name.table().to_string();
    engine.sources.check_writable(table.id, &table_name)?;
    let input = dml.input.as_ref().clone();
    check_reads(session, &input)?;
    let (change, tag, rows) = match dml.op {
        WriteOp::Insert(InsertOp::Append) => {
            // NOTE: streamed: a large INSERT ... SELECT stages its rows (memory/staging.rs).
            let pool = session.ctx.runtime_env().memory_pool.clone();
            let mut rows = Staging::new(table.id, engine.cache.clone(), &pool);
            let df = DataFrame::new(session.state(), input);
            let schema = Arc::new(df.schema().as_arrow().clone());
            let mut stream = crate::exec::query::execute_stream(session, df).await?;
            while let Some(batch) = stream.next().await {
                let batch = promised(batch?, &schema)?;
                rows.add(conform_to_table(&table_name, &table.def.schema, &batch)?)?;
            }
            let count = rows.rows();
            let (inserts, staged) = rows.finish(&table.def.schema)?;
            let change = TableChange {
                table,
                table_name,
                deletes: vec![],
                inserts,
                staged,
            };
            (change, "INSERT", count)
        }
        WriteOp::Delete => {
            if session
                .txn
                .as_ref()
                .is_some_and(|t| t.written.contains(&table.id))
            {
                return Err(ServerError::NotSupported(
                    "DELETE of a table written earlier in the same transaction block".into(),
                ));
            }
            let plan = with_row_ids(&table, input)?;
            let rowid = row_id_column(&plan)?;
            let plan = LogicalPlanBuilder::from(plan)
                .project(vec![rowid])?
                .build()?;
            let batch = collect(session, plan).await?;
            let deletes = unique_ids(batch.column(0))?;
            let rows = deletes.len();
            let change = TableChange {
                table,
                table_name,
                deletes,
                inserts: None,
                staged: Vec::new(),
            };
            (change, "DELETE", rows)
        }
        WriteOp::Update => {
            if session
                .txn
                .as_ref()
                .is_some_and(|t| t.written.contains(&table.id))
            {
                return Err(ServerError::NotSupported(
                    "UPDATE of a table written earlier in the same transaction block".into(),
                ));
            }
            let plan = with_row_ids(&table, input)?;
            let LogicalPlan::Projection(projection) = plan else {
                return Err(ServerError::Internal(
                    "UPDATE input is not a projection".into(),
                ));
            };
            let rowid = row_id_column(&projection.input)?;
            let mut exprs = projection.expr.clone();
            exprs.push(rowid);
            let plan = LogicalPlanBuilder::from(projection.input.as_ref().clone())
                .project(exprs)?
                .build()?;
            let batch = collect(session, plan).await?;
            let width = batch.num_columns() - 1;
            let ids = batch.column(width);
            let ids = ids
                .as_any()
                .downcast_ref::<UInt64Array>()
                .ok_or_else(|| ServerError::Internal("row ids are not UInt64".into()))?;
            // NOTE: UPDATE ... FROM can match a row several times; like PostgreSQL we apply one.
            let mut seen = HashSet::with_capacity(ids.len());
            let keep: Vec<bool> = ids.values().iter().map(|id| seen.insert(*id)).collect();
            let keep = datafusion::arrow::array::BooleanArray::from(keep);
            let batch = datafusion::arrow::compute::filter_record_batch(&batch, &keep)?;
            let deletes = unique_ids(batch.column(width))?;
            let rows = deletes.len();
            let values = batch.project(&(0..width).collect::<Vec<_>>())?;
            let change = TableChange {
                table,
                table_name,
                deletes,
                inserts: Some(values),
                staged: Vec::new(),
            };
            (change, "UPDATE", rows)
        }
        other => return Err(ServerError::NotSupported(format!("{other}"))),
    };
    txn::apply(session, vec![change])?;
    Ok(match tag {
        "INSERT" => Output::Command {
            tag: "INSERT 0".into(),
            rows: Some(rows),
        },
        _ => Output::command_rows(tag, rows),
    })
}

/// TRUNCATE: deletes every row of the named tables.
pub async fn truncate(session: &mut Session, truncate: ast::Truncate) -> Result<Output> {
    let engine = session.engine.clone();
    let _write = engine.write_lock.lock().await;
    let mut changes = Vec::new();
    for target in &truncate.table_names {
        let names::ResolvedTable { name, table, .. } = names::require_table(session, &target.name)?;
        engine.sources.check_writable(table.id, &name.name)?;
        // NOTE: the row ids only: a spilled table's rows stay in their files.
        let deletes = table.rows.read().or_poisoned("table")?.live_row_ids()?;
        changes.push(TableChange {
            table,
            table_name: name.name,
            deletes,
            inserts: None,
            staged: Vec::new(),
        });
    }
    txn::apply(session, changes)?;
    Ok(Output::command("TRUNCATE TABLE"))
}

/// Runs a plan and concatenates its output.
async fn collect(session: &Session, plan: LogicalPlan) -> Result<RecordBatch> {
    let df = DataFrame::new(session.state(), plan);
    let schema = Arc::new(df.schema().as_arrow().clone());
    let stream = crate::exec::query::execute_stream(session, df).await?;
    let batches = datafusion::physical_plan::common::collect(stream).await?;
    let batches = (batches.into_iter())
        .map(|b| promised(b, &schema))
        .collect::<Result<Vec<_>>>()?;
    Ok(concat_batches(&schema, &batches)?)
}

/// A batch in the types its plan promised: DataFusion can drop an INSERT's cast to the
/// table's types when a UNION's branches are coerced to a wider type after it was planned
/// (`SELECT int_col UNION ALL SELECT int_col + 100` yields Int64 under an Int32 schema). An
/// overflow is an error, as in PostgreSQL, not a NULL.
fn promised(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let types_differ = (batch.columns().iter().zip(schema.fields()))
        .any(|(column, field)| column.data_type() != field.data_type());
    if !types_differ {
        return Ok(batch);
    }
    let strict = CastOptions {
        safe: false,
        ..CastOptions::default()
    };
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| cast_with_options(column, field.data_type(), &strict))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Points every scan of `table` in `plan` at its row-id-carrying twin.
fn with_row_ids(table: &Arc<MillraceTable>, plan: LogicalPlan) -> Result<LogicalPlan> {
    let source = provider_as_source(Arc::new(RowIdTable::new(table.clone())));
    let rewritten = plan.transform_up(|node| match node {
        LogicalPlan::TableScan(scan) if scans_table(&scan, table.id) => {
            let new = TableScanBuilder::new(scan.table_name.clone(), source.clone())
                .with_filters(scan.filters.clone())
                .with_fetch(scan.fetch)
                .build()?;
            Ok(Transformed::yes(LogicalPlan::TableScan(new)))
        }
        other => {
            let recomputed = other.recompute_schema()?;
            Ok(Transformed::yes(recomputed))
        }
    })?;
    Ok(rewritten.data)
}

fn scans_table(scan: &TableScan, id: u64) -> bool {
    source_as_provider(&scan.source)
        .ok()
        .and_then(|p| p.downcast_ref::<MillraceTable>().map(|t| t.id == id))
        .unwrap_or(false)
}

/// The (first) row-id column of a plan's output, as a column expression.
fn row_id_column(plan: &LogicalPlan) -> Result<Expr> {
    plan.schema()
        .iter()
        .find(|(_, f)| f.name() == ROW_ID_COLUMN)
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
        .ok_or_else(|| ServerError::Internal("row id column missing from DML plan".into()))
}

fn unique_ids(array: &Arc<dyn Array>) -> Result<Vec<u64>> {
    let ids = array
        .as_any()
        .downcast_ref::<UInt64Array>()
        .ok_or_else(|| ServerError::Internal("row ids are not UInt64".into()))?;
    let mut seen = HashSet::with_capacity(ids.len());
    Ok(ids
        .values()
        .iter()
        .copied()
        .filter(|id| seen.insert(*id))
        .collect())
}
