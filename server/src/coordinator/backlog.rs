//! Back-pressure by bytes: bounds the memory that committed changes take while they wait
//! for the view coordinator (see `Coordinator::send_epoch`).
//!
//! Writers and sources hand each commit's changes to the coordinator through a queue of
//! epochs. The queue's length bounds how many wait, not how large they are: 256 epochs of
//! 20k-row INSERTs were about 1 GB, and the coordinator merged up to 64 of them into one
//! step (measured: peak RSS 1.6 GB for a join loaded under `--memory-limit 256MiB`). Under a
//! memory limit, a commit whose changes would take the backlog past its share waits until
//! the coordinator has processed enough; the coordinator also stops merging epochs at that
//! size. A single commit larger than the share still goes through, alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Bytes of changes queued for the coordinator, and their bound.
#[derive(Debug)]
pub struct Backlog {
    queued: AtomicU64,
    /// u64::MAX when there is no memory limit.
    max: u64,
    lock: Mutex<()>,
    drained: Condvar,
}

impl Backlog {
    /// A backlog of at most `max` bytes (None: unbounded).
    pub fn new(max: Option<u64>) -> Self {
        Self {
            queued: AtomicU64::new(0),
            max: max.unwrap_or(u64::MAX),
            lock: Mutex::new(()),
            drained: Condvar::new(),
        }
    }

    /// The bound on bytes merged into one step.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Bytes queued now.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
    }

    /// Adds `bytes` to the backlog, first waiting (blocking the thread) while the backlog
    /// is not empty and would go past its bound.
    pub fn reserve(&self, bytes: u64) {
        if self.max != u64::MAX {
            let mut guard = self.lock.lock().ok();
            loop {
                let queued = self.queued();
                if queued == 0 || queued.saturating_add(bytes) <= self.max {
                    break;
                }
                // NOTE: a bounded wait, so that a missed wake-up costs 50 ms, not a hang.
                guard = match guard.take() {
                    Some(g) => self
                        .drained
                        .wait_timeout(g, Duration::from_millis(50))
                        .ok()
                        .map(|(g, _)| g),
                    None => {
                        std::thread::sleep(Duration::from_millis(50));
                        None
                    }
                };
            }
        }
        self.queued.fetch_add(bytes, Ordering::SeqCst);
    }

    /// Removes `bytes` processed by the coordinator and wakes waiting writers.
    pub fn release(&self, bytes: u64) {
        let _ = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                Some(q.saturating_sub(bytes))
            });
        let _guard = self.lock.lock();
        self.drained.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_writer_waits_until_the_backlog_drains() {
        let backlog = Arc::new(Backlog::new(Some(100)));
        backlog.reserve(80);
        backlog.reserve(500 - 480); // fits: 100 in total
        let waiter = {
            let backlog = backlog.clone();
            std::thread::spawn(move || {
                backlog.reserve(30);
                backlog.queued()
            })
        };
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(backlog.queued(), 100, "the third writer is still waiting");
        backlog.release(100);
        assert_eq!(waiter.join().ok(), Some(30));
        // One commit larger than the bound goes through on an empty backlog.
        backlog.release(30);
        backlog.reserve(1_000);
        assert_eq!(backlog.queued(), 1_000);
    }
}
