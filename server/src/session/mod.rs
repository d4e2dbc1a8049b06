//! A client session: who is connected to which database, its settings, its DataFusion
//! context, and its open transaction. One per connection; owned by the wire handler.

pub mod copy_in;
pub mod interrupt;
pub mod settings;

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::execution::session_state::SessionState;
use datafusion::prelude::SessionContext;

use crate::catalog::records::DEFAULT_SCHEMA;
use crate::engine::{Engine, TableChange};
use crate::error::{Result, ServerError};
use crate::memory::statement::SessionPool;
use crate::session::copy_in::CopyIn;
use crate::session::interrupt::{CancelSignal, Interrupt};
use millrace_planner::stop::CurrentStop;
pub use settings::Settings;

/// Writes staged by an open `BEGIN ... COMMIT` block.
#[derive(Debug, Default)]
pub struct Transaction {
    /// Changes to apply at COMMIT, in statement order.
    pub changes: Vec<TableChange>,
    /// Ids of tables written in this transaction.
    pub written: HashSet<u64>,
    /// Set when a statement failed: everything until ROLLBACK is refused.
    pub failed: bool,
    /// Open savepoints: name, number of staged changes and written tables when it was set.
    pub savepoints: Vec<(String, usize, HashSet<u64>)>,
}

/// One client's session.
pub struct Session {
    /// Shared engine state.
    pub engine: Arc<Engine>,
    /// Database the session is connected to.
    pub database: String,
    /// Connected user.
    pub user: String,
    /// DataFusion context resolving names in `database`.
    pub ctx: SessionContext,
    /// SET / SHOW parameters.
    pub settings: Settings,
    /// The open transaction block, if any.
    pub txn: Option<Transaction>,
    /// A COPY FROM STDIN waiting for its data.
    pub copy_in: Option<CopyIn>,
    /// Epoch of this session's last committed write: its reads of materialized views wait
    /// until that epoch is published.
    pub write_epoch: u64,
    /// Cancel requests for this session's statements.
    pub cancel: Arc<CancelSignal>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("database", &self.database)
            .field("user", &self.user)
            .finish()
    }
}

impl Session {
    /// Opens a session on `database`, which must exist.
    pub fn new(engine: Arc<Engine>, database: &str, user: &str) -> Result<Session> {
        if engine.catalog.database(database).is_none() {
            return Err(ServerError::UnknownDatabase(database.to_string()));
        }
        let ctx = engine.session_context(database, DEFAULT_SCHEMA)?;
        Ok(Session {
            engine,
            database: database.to_string(),
            user: user.to_string(),
            ctx,
            settings: Settings::default(),
            txn: None,
            copy_in: None,
            write_epoch: 0,
            cancel: Arc::new(CancelSignal::default()),
        })
    }

    /// What stops the statement that begins now: a cancel request, `statement_timeout`.
    pub fn interrupt(&self) -> Interrupt {
        let slot = self
            .ctx
            .state_ref()
            .read()
            .config()
            .get_extension::<CurrentStop>();
        Interrupt::begin(&self.cancel, self.settings.statement_timeout(), slot)
    }

    /// A snapshot of the DataFusion state (cheap: reference-counted parts).
    pub fn state(&self) -> SessionState {
        self.ctx.state()
    }

    /// Holds the next statement to the session's `statement_mem` (memory/statement.rs).
    pub fn hold_statement_memory(&self) {
        let runtime = self.ctx.runtime_env();
        if let Some(pool) = runtime.memory_pool.downcast_ref::<SessionPool>() {
            pool.set_limit(self.settings.statement_mem());
        }
    }

    /// Pushes settings that change planning (time zone, search path) into DataFusion.
    pub fn sync_settings(&self) {
        let schema = self
            .settings
            .search_path()
            .into_iter()
            .find(|s| self.engine.catalog.schema(&self.database, s).is_some())
            .unwrap_or_else(|| DEFAULT_SCHEMA.to_string());
        let tz = match self.settings.time_zone().as_str() {
            "UTC" => "+00:00".to_string(),
            other => other.to_string(),
        };
        let state = self.ctx.state_ref();
        let mut state = state.write();
        let options = state.config_mut().options_mut();
        options.catalog.default_schema = schema;
        options.execution.time_zone = Some(tz);
    }

    /// The schema unqualified names resolve to.
    pub fn current_schema(&self) -> String {
        self.state().config_options().catalog.default_schema.clone()
    }

    /// Marks the open transaction block (if any) as failed: it refuses statements until it
    /// ends, and COMMIT rolls it back.
    pub fn fail_transaction(&mut self) {
        if let Some(txn) = &mut self.txn {
            txn.failed = true;
        }
    }

    /// Whether a transaction block is open.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }
}
