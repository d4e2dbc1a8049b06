//! The memory a session's statements may take: each session's queries draw from the
//! engine's query pool (a share of `--memory-limit`, or of the machine's memory without one:
//! see `budget.rs`)
//! through a [`SessionPool`] that also holds the running statement to the session's
//! `statement_mem` (0: no limit of its own).
//!
//! DataFusion's operators reserve what they hold in the pool of their task context; an
//! operator that can spill (sort, aggregate) spills when a reservation is refused, one that
//! cannot (a hash join's build side) fails the statement with 53200, and the server, its
//! views and the session's other statements carry on.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::common::DataFusionError;
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};

/// A session's view of the engine's query pool, with a limit of its own.
#[derive(Debug)]
pub struct SessionPool {
    /// The engine's pool, which every session shares.
    engine: Arc<dyn MemoryPool>,
    /// The most the session's statements may hold at once, in bytes (0: no limit).
    limit: AtomicUsize,
    /// What they hold now.
    used: AtomicUsize,
}

impl SessionPool {
    /// A pool over `engine`'s, with no limit of its own.
    pub fn new(engine: Arc<dyn MemoryPool>) -> Self {
        Self {
            engine,
            limit: AtomicUsize::new(0),
            used: AtomicUsize::new(0),
        }
    }

    /// Sets the session's limit (`statement_mem`, in bytes; 0 for none).
    pub fn set_limit(&self, bytes: usize) {
        self.limit.store(bytes, Ordering::Relaxed);
    }
}

impl fmt::Display for SessionPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "session pool ({} bytes used, limit {}) over {}",
            self.used.load(Ordering::Relaxed),
            self.limit.load(Ordering::Relaxed),
            self.engine
        )
    }
}

impl MemoryPool for SessionPool {
    fn name(&self) -> &str {
        "millrace_session"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.engine.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.engine.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.used.fetch_add(additional, Ordering::Relaxed);
        self.engine.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(shrink))
            });
        self.engine.shrink(reservation, shrink);
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::error::Result<()> {
        let limit = self.limit.load(Ordering::Relaxed);
        let claimed = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                let after = u.checked_add(additional)?;
                (limit == 0 || after <= limit).then_some(after)
            });
        if let Err(used) = claimed {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "out of memory: statement_mem is {limit} bytes, {used} are in use and {} \
                 asked for {additional} more",
                reservation.consumer().name()
            )));
        }
        if let Err(e) = self.engine.try_grow(reservation, additional) {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        let limit = self.limit.load(Ordering::Relaxed);
        match (self.engine.memory_limit(), limit) {
            (MemoryLimit::Finite(engine), 0) => MemoryLimit::Finite(engine),
            (MemoryLimit::Finite(engine), own) => MemoryLimit::Finite(engine.min(own)),
            (_, 0) => self.engine.memory_limit(),
            (_, own) => MemoryLimit::Finite(own),
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::{GreedyMemoryPool, UnboundedMemoryPool};

    use super::*;

    /// A statement is held to the session's limit, the engine's pool to its own, and what
    /// was refused is not counted.
    #[test]
    fn statements_are_held_to_the_session_limit_and_the_engine_pool() {
        let engine: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1000));
        let session: Arc<dyn MemoryPool> = Arc::new(SessionPool::new(engine.clone()));
        if let Some(pool) = session.downcast_ref::<SessionPool>() {
            pool.set_limit(600);
        }
        let reservation = MemoryConsumer::new("join").register(&session);
        reservation.try_grow(500).expect("within both limits");
        let refused = reservation
            .try_grow(200)
            .expect_err("over the session's 600");
        assert!(
            refused.to_string().contains("statement_mem is 600"),
            "{refused}"
        );
        assert_eq!((session.reserved(), engine.reserved()), (500, 500));
        // The engine's pool refuses once other sessions hold the rest.
        let other = MemoryConsumer::new("sort").register(&engine);
        other.try_grow(450).expect("another session");
        reservation
            .try_grow(90)
            .expect_err("over the engine's 1000");
        assert_eq!((session.reserved(), engine.reserved()), (500, 950));
        drop(reservation);
        assert_eq!((session.reserved(), engine.reserved()), (0, 450));
        // Without a limit of its own, only the engine's applies.
        let free = SessionPool::new(Arc::new(UnboundedMemoryPool::default()));
        let free: Arc<dyn MemoryPool> = Arc::new(free);
        let big = MemoryConsumer::new("scan").register(&free);
        big.try_grow(1 << 30).expect("no limit");
    }
}
