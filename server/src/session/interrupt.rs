//! Stopping a running statement: a cancel request (sent on another connection with the
//! session's pid and secret key, see `wire/cancel.rs`) or `statement_timeout`.
//!
//! Each statement begins an [`Interrupt`]: the deadline of its timeout, the count of cancel
//! requests when it began (a request that came while the session was idle stops nothing, as
//! in PostgreSQL) and the planner's stop flag for it. The wire layer races the statement
//! against [`Interrupt::fired`], and a result streamed after the statement returned carries
//! the interrupt along ([`Interrupt::guard`]), so the timeout and cancel reach the rows still
//! being computed. When the interrupt fires or is dropped, the stop flag is set: operators
//! that loop inside one poll stop too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use millrace_planner::stop::{CurrentStop, StopFlag};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::ServerError;

/// A session's cancel requests.
#[derive(Debug, Default)]
pub struct CancelSignal {
    /// Cancel requests received so far.
    requests: AtomicU64,
    /// Wakes the statement running when a request comes.
    notify: Notify,
}

impl CancelSignal {
    /// Cancels the statement running now, if any.
    pub fn cancel(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Cancel requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Resolves when a request comes after `seen` had been counted.
    async fn after(&self, seen: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.requests.load(Ordering::SeqCst) != seen {
                return;
            }
            notified.await;
        }
    }
}

/// What stops one statement.
#[derive(Debug)]
pub struct Interrupt {
    signal: Arc<CancelSignal>,
    /// Requests counted when the statement began.
    seen: u64,
    /// When `statement_timeout` runs out.
    deadline: Option<Instant>,
    /// The planner's flag for this statement.
    stop: StopFlag,
    /// The session's slot of the running statement's flag.
    slot: Option<Arc<CurrentStop>>,
}

impl Interrupt {
    /// The interrupt of a statement that begins now.
    pub fn begin(
        signal: &Arc<CancelSignal>,
        timeout: Option<Duration>,
        slot: Option<Arc<CurrentStop>>,
    ) -> Self {
        Interrupt {
            signal: signal.clone(),
            seen: signal.requests.load(Ordering::SeqCst),
            deadline: timeout.map(|t| Instant::now() + t),
            stop: slot.as_ref().map(|s| s.begin()).unwrap_or_default(),
            slot,
        }
    }

    /// Resolves with the error that stops the statement: a cancel request or its timeout.
    pub async fn fired(&self) -> ServerError {
        let cancelled = self.signal.after(self.seen);
        let error = match self.deadline {
            Some(deadline) => tokio::select! {
                _ = cancelled => ServerError::Canceled,
                _ = tokio::time::sleep_until(deadline) => ServerError::StatementTimeout,
            },
            None => {
                cancelled.await;
                ServerError::Canceled
            }
        };
        self.stop.stop();
        error
    }

    /// `stream`, ended by an error when the statement is cancelled or times out while its
    /// rows are still being computed or sent.
    pub fn guard(self, stream: SendableRecordBatchStream) -> SendableRecordBatchStream {
        let schema = stream.schema();
        let guarded = futures::stream::unfold(Some((self, stream)), |state| async move {
            let (interrupt, mut stream) = state?;
            tokio::select! {
                biased;
                e = interrupt.fired() => {
                    Some((Err(DataFusionError::External(Box::new(e))), None))
                }
                next = stream.next() => next.map(|batch| (batch, Some((interrupt, stream)))),
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, guarded))
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        // The statement ended or was abandoned: nothing of it may run on.
        match &self.slot {
            Some(slot) => slot.end(&self.stop),
            None => self.stop.stop(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_while_idle_stops_nothing_and_one_while_running_does() {
        let signal = Arc::new(CancelSignal::default());
        signal.cancel();
        let interrupt = Interrupt::begin(&signal, None, None);
        let fired = tokio::time::timeout(Duration::from_millis(50), interrupt.fired()).await;
        assert!(
            fired.is_err(),
            "an earlier request cancelled a later statement"
        );
        let slot = Arc::new(CurrentStop::default());
        let interrupt = Interrupt::begin(&signal, None, Some(slot.clone()));
        let stop = slot.current();
        let canceller = signal.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            canceller.cancel();
        });
        let e = interrupt.fired().await;
        assert!(matches!(e, ServerError::Canceled), "{e}");
        assert!(stop.is_stopped());
    }

    #[tokio::test]
    async fn the_timeout_fires_and_a_dropped_interrupt_stops_its_statement() {
        let signal = Arc::new(CancelSignal::default());
        let slot = Arc::new(CurrentStop::default());
        let interrupt =
            Interrupt::begin(&signal, Some(Duration::from_millis(30)), Some(slot.clone()));
        let e = interrupt.fired().await;
        assert!(matches!(e, ServerError::StatementTimeout), "{e}");
        assert!(slot.current().is_stopped());
        let interrupt = Interrupt::begin(&signal, None, Some(slot.clone()));
        let stop: StopFlag = slot.current();
        drop(interrupt);
        assert!(stop.is_stopped());
        assert!(
            !slot.current().is_stopped(),
            "the next statement starts stopped"
        );
    }
}
