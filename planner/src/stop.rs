//! A statement's stop flag. The server stops a statement that is cancelled, runs past
//! `statement_timeout` or is abandoned by dropping its plan's tasks, which takes effect when
//! their current poll returns; an operator of ours that loops inside one poll (the
//! correlated apply runs a batch's subqueries in one call) reads the flag between steps and
//! fails with [`STOPPED`] once it is set.
//!
//! DataFusion's operators can run for minutes inside one poll: an aggregate drains its
//! input in a loop for as long as the input is ready, and a nested-loop join is always ready
//! (a count over a join of two 40,000-row tables on an inequality never yielded, and went on
//! using both cores after its statement was cancelled). [`with_stop_checks`] puts a
//! [`StopExec`] over every operator of a plan about to run: each batch passed between two
//! operators reads the flag, so a stopped plan ends within one batch of work per operator.
//!
//! A session keeps a [`CurrentStop`] in its DataFusion config; each statement installs a new
//! flag, so a flag set for one statement never stops the next.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
    ReplaceChildrenOptions,
};
use futures::StreamExt;
use parking_lot::Mutex;

/// The message of the error an operator fails with when its statement was stopped (the
/// server answers with the cause, cancel or timeout, not with this).
pub const STOPPED: &str = "the statement was stopped";

/// One statement's flag.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Stops the statement.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the statement was stopped.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The flag of the statement a session runs now (a DataFusion config extension).
#[derive(Debug, Default)]
pub struct CurrentStop(Mutex<StopFlag>);

impl CurrentStop {
    /// Installs a new flag for the statement that begins, and returns it.
    pub fn begin(&self) -> StopFlag {
        let flag = StopFlag::default();
        *self.0.lock() = flag.clone();
        flag
    }

    /// Ends the statement of `flag`: sets it, and a statement run outside
    /// [`CurrentStop::begin`] after it (none is stopped by cancel) gets a clear flag.
    pub fn end(&self, flag: &StopFlag) {
        flag.stop();
        let mut current = self.0.lock();
        if Arc::ptr_eq(&current.0, &flag.0) {
            *current = StopFlag::default();
        }
    }

    /// The flag of the statement running now.
    pub fn current(&self) -> StopFlag {
        self.0.lock().clone()
    }

    /// The flag of the statement running now in the session of `config` (a clear flag
    /// where the session keeps none).
    pub fn of(config: &datafusion::prelude::SessionConfig) -> StopFlag {
        config
            .get_extension::<CurrentStop>()
            .map(|s| s.current())
            .unwrap_or_default()
    }
}

/// `plan` with a [`StopExec`] over each of its operators' inputs, reading `flag`.
pub fn with_stop_checks(
    plan: Arc<dyn ExecutionPlan>,
    flag: &StopFlag,
) -> Result<Arc<dyn ExecutionPlan>> {
    let wrapped = plan.transform_up(|node| {
        if node.children().is_empty() {
            return Ok(Transformed::no(node));
        }
        let children = node
            .children()
            .into_iter()
            .map(|child| {
                Arc::new(StopExec {
                    input: child.clone(),
                    flag: flag.clone(),
                }) as Arc<dyn ExecutionPlan>
            })
            .collect();
        // NOTE: the inputs keep their properties, so the operator's hold as planned.
        let node = node.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Keep),
        )?;
        Ok(Transformed::yes(node))
    })?;
    Ok(wrapped.data)
}

/// Passes its input's batches on while the statement's flag is clear, and fails with
/// [`STOPPED`] once it is set.
#[derive(Debug)]
pub struct StopExec {
    input: Arc<dyn ExecutionPlan>,
    flag: StopFlag,
}

impl DisplayAs for StopExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "StopExec")
    }
}

impl ExecutionPlan for StopExec {
    fn name(&self) -> &str {
        "StopExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.len() {
            1 => Ok(Arc::new(StopExec {
                input: children.swap_remove(0),
                flag: self.flag.clone(),
            })),
            n => Err(DataFusionError::Internal(format!(
                "StopExec has one input, given {n}"
            ))),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let mut input = self.input.execute(partition, context)?;
        let schema = input.schema();
        let flag = self.flag.clone();
        let mut failed = false;
        // The flag is read before each poll of the input and after each batch it yields.
        let checked = futures::stream::poll_fn(move |cx| {
            if failed {
                return Poll::Ready(None);
            }
            if flag.is_stopped() {
                failed = true;
                return Poll::Ready(Some(Err(DataFusionError::Execution(STOPPED.into()))));
            }
            match input.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(_))) if flag.is_stopped() => {
                    failed = true;
                    Poll::Ready(Some(Err(DataFusionError::Execution(STOPPED.into()))))
                }
                other => other,
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, checked)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_statement_gets_a_flag_of_its_own() {
        let slot = CurrentStop::default();
        let first = slot.begin();
        assert!(!slot.current().is_stopped());
        first.stop();
        assert!(slot.current().is_stopped(), "the running statement's flag");
        let second = slot.begin();
        assert!(first.is_stopped());
        assert!(
            !second.is_stopped(),
            "a stop of the last statement leaks into the next"
        );
        assert!(!slot.current().is_stopped());
        slot.end(&first);
        assert!(
            !slot.current().is_stopped(),
            "an old statement's end cleared the new one"
        );
        slot.end(&second);
        assert!(second.is_stopped());
        assert!(
            !slot.current().is_stopped(),
            "a statement after the end is stopped"
        );
    }

    #[tokio::test]
    async fn a_plan_with_stop_checks_fails_once_its_flag_is_set() {
        let ctx = datafusion::prelude::SessionContext::new();
        let plan = ctx
            .sql("SELECT count(*) FROM generate_series(1, 100000) AS a JOIN generate_series(1, 50) AS b ON a.value < b.value + a.value % 7")
            .await
            .expect("plan")
            .create_physical_plan()
            .await
            .expect("physical");
        let flag = StopFlag::default();
        let checked = with_stop_checks(plan, &flag).expect("wrap");
        let shown = datafusion::physical_plan::displayable(checked.as_ref())
            .indent(false)
            .to_string();
        assert!(shown.matches("StopExec").count() >= 3, "{shown}");
        let rows = datafusion::physical_plan::collect(checked.clone(), ctx.task_ctx())
            .await
            .expect("runs while the flag is clear");
        assert_eq!(rows[0].num_rows(), 1);
        flag.stop();
        let e = datafusion::physical_plan::collect(checked, ctx.task_ctx())
            .await
            .expect_err("stopped");
        assert!(e.to_string().contains(STOPPED), "{e}");
    }
}
