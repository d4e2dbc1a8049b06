//! Server lifecycle: open the engine, accept connections, shut down on SIGTERM or Ctrl-C.

use std::sync::Arc;

use pgwire::api::{ConnectionManager, RandomPidSecretKeyGenerator};
use pgwire::tokio::process_socket;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::catalog::records::DEFAULT_DATABASE;
use crate::config::ServeConfig;
use crate::error::{Result, ServerError};
use crate::wire::cancel::CancelRegistry;
use crate::wire::handler::{Connection, Handlers};

/// Runs the server until a shutdown signal arrives.
pub async fn run(config: ServeConfig) -> Result<()> {
    info!(data_dir = %config.data_dir.display(), workers = config.workers(), "starting millrace");
    let engine = crate::boot::open(&config).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServerError::Internal(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    info!(
        "millrace is ready; connect with: psql -h {} -p {} -U millrace {}",
        addr.ip(),
        addr.port(),
        DEFAULT_DATABASE
    );
    tokio::spawn(crate::views::supervisor::restore_all(engine.clone()));
    let manager = Arc::new(ConnectionManager::new());
    let keys = Arc::new(RandomPidSecretKeyGenerator::default());
    let cancels = Arc::new(CancelRegistry::default());
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((socket, _peer)) => {
                        let _ = socket.set_nodelay(true);
                        let handlers = Handlers(Connection::new(engine.clone(), manager.clone(), keys.clone(), cancels.clone()));
                        tokio::spawn(async move {
                            if let Err(e) = process_socket(socket, None, handlers).await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                    }
                    Err(e) => warn!(error = %e, "accept failed"),
                }
            }
            _ = &mut shutdown => {
                info!("shutdown signal received; stopping");
                break;
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
