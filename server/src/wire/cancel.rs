//! Cancel requests: a client sends its session's pid and secret key on a new connection,
//! and the statement that session runs is stopped (`session/interrupt.rs`). pgwire's own
//! connection manager is told as well: it drops the futures it races against the request
//! (a SUBSCRIBE feed ends that way).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use pgwire::api::ConnectionManager;
use pgwire::api::cancel::CancelHandler;
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::SecretKey;

use crate::session::interrupt::CancelSignal;

/// A session's key: its pid and secret.
type Key = (i32, Vec<u8>);

/// The sessions that can be cancelled, by key.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<Key, Weak<CancelSignal>>>,
}

impl CancelRegistry {
    /// Registers a session's signal under its key until the registration is dropped.
    pub fn register(
        self: &Arc<Self>,
        pid: i32,
        secret: &SecretKey,
        signal: &Arc<CancelSignal>,
    ) -> Registration {
        let key = (pid, secret.to_bytes().to_vec());
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(key.clone(), Arc::downgrade(signal));
        }
        Registration {
            registry: self.clone(),
            key,
        }
    }

    fn cancel(&self, pid: i32, secret: &SecretKey) {
        let key = (pid, secret.to_bytes().to_vec());
        let signal = self
            .sessions
            .lock()
            .ok()
            .and_then(|s| s.get(&key).and_then(Weak::upgrade));
        if let Some(signal) = signal {
            signal.cancel();
        }
    }
}

/// A session's entry in the registry, removed with it.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<CancelRegistry>,
    key: Key,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut sessions) = self.registry.sessions.lock() {
            sessions.remove(&self.key);
        }
    }
}

/// The cancel handler of the server's connections.
pub struct Canceller {
    /// Sessions by key.
    pub registry: Arc<CancelRegistry>,
    /// pgwire's registry of running statements.
    pub manager: Arc<ConnectionManager>,
}

#[async_trait]
impl CancelHandler for Canceller {
    async fn on_cancel_request(&self, request: CancelRequest) {
        self.registry.cancel(request.pid, &request.secret_key);
        self.manager.cancel(request.pid, &request.secret_key).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reaches_the_session_of_its_key_only_while_registered() {
        let registry = Arc::new(CancelRegistry::default());
        let signal = Arc::new(CancelSignal::default());
        let other = Arc::new(CancelSignal::default());
        let secret = SecretKey::I32(7);
        let registration = registry.register(1, &secret, &signal);
        let _other = registry.register(2, &SecretKey::I32(8), &other);
        registry.cancel(1, &SecretKey::I32(9));
        registry.cancel(1, &secret);
        assert_eq!(
            signal.requests(),
            1,
            "a wrong secret cancelled, or the right one did not"
        );
        assert_eq!(other.requests(), 0);
        drop(registration);
        registry.cancel(1, &secret);
        assert_eq!(signal.requests(), 1, "a dropped registration still cancels");
    }
}
