//! The compute runtime: statements' query plans run on threads of their own, apart from the
//! runtime that serves connections, timers and cancel requests.
//!
//! A DataFusion operator can stay inside one poll for seconds (a nested-loop join probing a
//! batch against a large build side, the correlated apply). On the runtime that also serves
//! the sockets, two such polls took both workers: `statement_timeout`'s timer never fired, a
//! cancel request was never read and new connections were not accepted, for as long as the
//! plan ran. Here a plan is driven by a task on the compute runtime (the operators it spawns
//! run there too) and hands its batches over a small channel to the statement; dropping the
//! stream aborts the task, which stops the plan when its current poll returns.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use millrace_planner::stop::{CurrentStop, with_stop_checks};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Result, ServerError};

/// Batches a plan may compute ahead of the statement reading them.
const AHEAD: usize = 2;

/// The runtime that query plans run on.
pub struct ComputeRuntime {
    /// Owned here; shut down without waiting when the engine goes.
    runtime: Option<Runtime>,
    handle: Handle,
}

impl std::fmt::Debug for ComputeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ComputeRuntime")
    }
}

impl ComputeRuntime {
    /// A runtime of `workers` threads.
    pub fn new(workers: usize) -> Result<ComputeRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("millrace-compute")
            // NOTE: as the main runtime's: building and running deep plans recurses.
            .thread_stack_size(16 << 20)
            .enable_all()
            .build()
            .map_err(|e| ServerError::Internal(format!("cannot start the compute runtime: {e}")))?;
        Ok(ComputeRuntime {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Runs `plan` on the compute runtime; its batches, in order. Dropping the stream stops
    /// the plan. A panic in the plan ends the stream with an error.
    pub fn execute(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        context: Arc<TaskContext>,
    ) -> SendableRecordBatchStream {
        let schema = plan.schema();
        let flag = CurrentStop::of(context.session_config());
        let plan = match with_stop_checks(plan, &flag) {
            Ok(plan) => plan,
            Err(e) => return failed(schema, e),
        };
        let (tx, rx) = mpsc::channel::<datafusion::error::Result<RecordBatch>>(AHEAD);
        let task = self.handle.spawn(async move {
            let mut stream = match datafusion::physical_plan::execute_stream(plan, context) {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            while let Some(batch) = stream.next().await {
                let failed = batch.is_err();
                if tx.send(batch).await.is_err() || failed {
                    return;
                }
            }
        });
        let feed = Feed {
            rx,
            task: Some(AbortOnDrop(task)),
        };
        let batches = futures::stream::unfold(feed, |mut feed| async move {
            match feed.rx.recv().await {
                Some(batch) => Some((batch, feed)),
                // The channel closed: the plan ended, or its task panicked.
                None => {
                    let mut task = feed.task.take()?;
                    match (&mut task.0).await {
                        Err(e) if e.is_panic() => {
                            let message = panic_message(e.into_panic());
                            tracing::error!(panic = %message, "a query plan panicked");
                            Some((
                                Err(DataFusionError::Execution(format!(
                                    "the query's plan failed: {message}"
                                ))),
                                feed,
                            ))
                        }
                        _ => None,
                    }
                }
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, batches))
    }
}

impl Drop for ComputeRuntime {
    fn drop(&mut self) {
        // NOTE: dropping a runtime blocks until its tasks stop, which panics inside another
        // runtime; its threads are left to end on their own.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The statement's end of a running plan.
struct Feed {
    rx: mpsc::Receiver<datafusion::error::Result<RecordBatch>>,
    task: Option<AbortOnDrop>,
}

/// Aborts the plan's task when the statement lets go of it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn failed(
    schema: datafusion::arrow::datatypes::SchemaRef,
    e: DataFusionError,
) -> SendableRecordBatchStream {
    Box::pin(RecordBatchStreamAdapter::new(
        schema,
        futures::stream::once(async move { Err(e) }),
    ))
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    async fn collect(
        compute: &ComputeRuntime,
        ctx: &SessionContext,
        sql: &str,
    ) -> datafusion::error::Result<Vec<RecordBatch>> {
        let plan = ctx.sql(sql).await?.create_physical_plan().await?;
        datafusion::physical_plan::common::collect(compute.execute(plan, ctx.task_ctx())).await
    }

    #[tokio::test]
    async fn a_plan_runs_on_the_compute_runtime_and_its_rows_arrive_in_order() {
        let compute = ComputeRuntime::new(1).expect("runtime");
        let ctx = SessionContext::new();
        let batches = collect(
            &compute,
            &ctx,
            "SELECT value FROM generate_series(1, 20000) ORDER BY value",
        )
        .await
        .expect("rows");
        let values: Vec<i64> = batches.iter().flat_map(first_ints).collect();
        assert_eq!(values, (1..=20000).collect::<Vec<i64>>());
    }

    #[tokio::test]
    async fn an_error_of_the_plan_reaches_the_statement() {
        let compute = ComputeRuntime::new(1).expect("runtime");
        let ctx = SessionContext::new();
        let e = collect(
            &compute,
            &ctx,
            "SELECT 1 / (value - 5) FROM generate_series(1, 10)",
        )
        .await
        .expect_err("division by zero");
        assert!(e.to_string().contains("Divide by zero"), "{e}");
    }

    /// The values of a batch's first column, an Int64 one.
    fn first_ints(batch: &RecordBatch) -> Vec<i64> {
        datafusion::common::cast::as_int64_array(batch.column(0))
            .map(|a| a.values().to_vec())
            .unwrap_or_default()
    }
}
