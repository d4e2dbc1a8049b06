//! Per-connection protocol handlers: startup (trust authentication on loopback for now),
//! simple and extended queries, COPY, and cancellation through pgwire's connection manager.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::Statement;
use futures::{Sink, SinkExt};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::copy::CopyHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionGuard, ConnectionHandle, ConnectionManager,
    PgWireServerHandlers, PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::copy::{CopyData, CopyDone, CopyFail};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::sync::Mutex;
use tracing::info;

use crate::catalog::records::DEFAULT_DATABASE;
use crate::engine::Engine;
use crate::error::{Result, ServerError};
use crate::exec::{self, Output, Prepared, copy_from, query};
use crate::session::Session;
use crate::sql::{self, Parsed};
use crate::wire::cancel::{CancelRegistry, Canceller, Registration};
use crate::wire::encode::{error_info, pg_error, response};
use crate::wire::subscribe;

/// The session of one connection, shared by its handlers.
type SessionCell = Arc<Mutex<Option<Session>>>;

/// All protocol handlers of one client connection.
pub struct Connection {
    /// Shared engine.
    engine: Arc<Engine>,
    /// Registry used by CancelRequest to find this connection's running statement.
    manager: Arc<ConnectionManager>,
    /// The session, created at startup.
    session: SessionCell,
    /// Parser for the extended protocol's Parse messages.
    parser: Arc<StatementParser>,
    /// Error met while receiving COPY data, reported at CopyDone.
    copy_error: std::sync::Mutex<Option<ServerError>>,
    /// Pid/secret generator for cancel keys.
    keys: Arc<RandomPidSecretKeyGenerator>,
    /// Sessions by cancel key.
    cancels: Arc<CancelRegistry>,
}

impl Connection {
    /// Handlers for a new client socket.
    pub fn new(
        engine: Arc<Engine>,
        manager: Arc<ConnectionManager>,
        keys: Arc<RandomPidSecretKeyGenerator>,
        cancels: Arc<CancelRegistry>,
    ) -> Arc<Connection> {
        let session: SessionCell = Arc::new(Mutex::new(None));
        Arc::new(Connection {
            engine,
            manager,
            parser: Arc::new(StatementParser {
                session: session.clone(),
            }),
            session,
            copy_error: std::sync::Mutex::new(None),
            keys,
            cancels,
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Ok(guard) = self.session.try_lock()
            && guard.is_some()
        {
            self.engine.connection_closed();
        }
    }
}

/// pgwire's handler factory, one per connection.
pub struct Handlers(pub Arc<Connection>);

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.0.clone()
    }
    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.0.clone()
    }
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.0.clone()
    }
    fn copy_handler(&self) -> Arc<impl CopyHandler> {
        self.0.clone()
    }
    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        Arc::new(Canceller {
            registry: self.0.cancels.clone(),
            manager: self.0.manager.clone(),
        })
    }
}

fn fatal(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".to_owned(),
        code.to_owned(),
        message,
    )))
}

#[async_trait]
impl StartupHandler for Connection {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let PgWireFrontendMessage::Startup(ref startup) = message else {
            return Ok(());
        };
        protocol_negotiation(client, startup).await?;
        save_startup_parameters_to_metadata(client, startup);
        let (pid, secret) = self.keys.generate(&*client);
        client.set_pid_and_secret_key(pid, secret.clone());
        let (handle, guard) = self.manager.register(pid, secret.clone());
        client
            .session_extensions()
            .insert::<Arc<ConnectionHandle>>(handle);
        client.session_extensions().insert::<ConnectionGuard>(guard);
        let user = client
            .metadata()
            .get("user")
            .cloned()
            .unwrap_or_else(|| DEFAULT_DATABASE.to_string());
        let database = client
            .metadata()
            .get("database")
            .cloned()
            .unwrap_or_else(|| user.clone());
        let mut session = Session::new(self.engine.clone(), &database, &user)
            .map_err(|e| fatal(e.sqlstate(), e.to_string()))?;
        let registration = self.cancels.register(pid, &secret, &session.cancel);
        client
            .session_extensions()
            .insert::<Registration>(registration);
        if let Some(app) = client.metadata().get("application_name") {
            let _ = session.settings.set("application_name", app);
        }
        let open = self.engine.connection_opened();
        info!(%user, %database, peer = %client.socket_addr(), connections = open, "connection opened");
        *self.session.lock().await = Some(session);
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = "15.0".to_string();
        params.date_style = "ISO, MDY".to_string();
        params.time_zone = "UTC".to_string();
        finish_authentication(client, &params).await?;
        Ok(())
    }
}

/// Runs one statement until it ends, is cancelled or runs past `statement_timeout`; a
/// result streamed after it returns stays under the same interrupt.
async fn run(
    session: &mut Session,
    statement: Statement,
    plan: Option<LogicalPlan>,
    params: Option<datafusion::common::ParamValues>,
) -> Result<Output> {
    let interrupt = session.interrupt();
    let result = tokio::select! {
        result = exec::execute(session, statement, plan, params) => result,
        e = interrupt.fired() => {
            session.fail_transaction();
            return Err(e);
        }
    };
    match result {
        Ok(Output::Stream { schema, head, rest }) => Ok(Output::Stream {
            schema,
            head,
            rest: exec::output::RowStream(interrupt.guard(rest.0)),
        }),
        other => other,
    }
}

fn no_session() -> PgWireError {
    fatal("08P01", "no session: startup did not complete".into())
}

#[async_trait]
impl SimpleQueryHandler for Connection {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut guard = self.session.lock().await;
        let session = guard.as_mut().ok_or_else(no_session)?;
        let parsed = match sql::parse(query) {
            Ok(p) => p,
            Err(e) => {
                session.fail_transaction();
                return Ok(vec![Response::Error(Box::new(error_info(&e)))]);
            }
        };
        let mut out = Vec::with_capacity(parsed.len());
        for p in parsed {
            let result = match p {
                Parsed::NoOp(tag) => match tag {
                    "FLUSH" => {
                        // FLUSH: every write committed so far becomes visible in every view.
                        let views = session.engine.views.clone();
                        views.wait_published(views.committed_epoch()).await;
                        Ok(Output::command(tag))
                    }
                    // CHECKPOINT: the views' state is checkpointed before the command ends.
                    "CHECKPOINT" if session.engine.checkpoint_interval.is_none() => {
                        Err(crate::error::ServerError::NotSupported(
                            "CHECKPOINT on a server started with --checkpoint-interval-ms 0".into(),
                        ))
                    }
                    "CHECKPOINT" => session
                        .engine
                        .checkpoint(true)
                        .await
                        .map(|_| Output::command(tag)),
                    _ => Ok(Output::command(tag)),
                },
                Parsed::Statement(s, renames) => run(session, *s, None, None)
                    .await
                    .and_then(|o| exec::output::rename_columns(o, &renames)),
                Parsed::CreateSink(_) | Parsed::DropSink { .. } => {
                    exec::sink::run(session, p).await
                }
                Parsed::Subscribe(view) => {
                    match subscribe::subscribe(session, client, &view).await {
                        Ok(done) => out.push(done),
                        Err(e) => out.push(Response::Error(Box::new(error_info(&e)))),
                    }
                    break;
                }
            };
            match result {
                Ok(output) => {
                    let is_copy_in = matches!(output, Output::CopyIn { .. });
                    out.push(response(session, output, &Format::UnifiedText)?);
                    if is_copy_in {
                        break;
                    }
                }
                Err(e) => {
                    out.push(Response::Error(Box::new(error_info(&e))));
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// Parses (and, for queries and DML, plans) statements of the extended protocol.
pub struct StatementParser {
    /// The connection's session, for planning against its catalog and settings.
    session: SessionCell,
}

fn plans_at_parse(statement: &Statement) -> bool {
    matches!(
        statement,
        Statement::Query(_) | Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_)
    )
}

#[async_trait]
impl QueryParser for StatementParser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let parsed = sql::parse_single(sql).map_err(pg_error)?;
        let (statement, renames) = match parsed {
            None => return Ok(None),
            Some(Parsed::NoOp(_)) => (None, vec![]),
            Some(Parsed::Statement(s, renames)) => (Some(*s), renames),
            Some(Parsed::Subscribe(view)) => {
                return Ok(Some(Prepared {
                    statement: None,
                    plan: None,
                    renames: vec![],
                    subscribe: Some(view),
                    command: None,
                }));
            }
            Some(command @ (Parsed::CreateSink(_) | Parsed::DropSink { .. })) => {
                return Ok(Some(Prepared {
                    statement: None,
                    plan: None,
                    renames: vec![],
                    subscribe: None,
                    command: Some(Box::new(command)),
                }));
            }
        };
        let mut plan = None;
        if let Some(stmt) = &statement
            && plans_at_parse(stmt)
        {
            let guard = self.session.lock().await;
            let session = guard.as_ref().ok_or_else(no_session)?;
            match query::plan_statement(session, stmt.clone()).await {
                Ok(p) => plan = Some(p),
                // NOTE: a statement may name a table that an earlier, not yet executed
                // statement of the same pipeline creates; plan again at Execute.
                Err(e) if e.sqlstate() == "42P01" => {}
                Err(e) => return Err(pg_error(e)),
            }
        }
        Ok(Some(Prepared {
            statement,
            plan,
            renames,
            subscribe: None,
            command: None,
        }))
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        let Some(plan) = &stmt.plan else {
            return Ok(vec![]);
        };
        ordered_param_types(plan)?
            .iter()
            .map(|t| match t {
                Some(t) => arrow_pg::datatypes::into_pg_type(t),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let format = format.unwrap_or(&Format::UnifiedText);
        if let Some(plan) = &stmt.plan {
            if matches!(plan, LogicalPlan::Dml(_) | LogicalPlan::Ddl(_)) {
                return Ok(vec![]);
            }
            return arrow_pg::datatypes::arrow_schema_to_pg_fields(
                plan.schema().as_arrow(),
                format,
                None,
            );
        }
        if let Some(Statement::ShowVariable { variable }) = &stmt.statement {
            let name = variable
                .iter()
                .map(|i| i.value.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join("");
            let schema = datafusion::arrow::datatypes::Schema::new(vec![
                datafusion::arrow::datatypes::Field::new(name, DataType::Utf8, true),
            ]);
            return arrow_pg::datatypes::arrow_schema_to_pg_fields(&schema, format, None);
        }
        Ok(vec![])
    }
}

/// Parameter types of a plan in `$1, $2, ...` order.
fn ordered_param_types(plan: &LogicalPlan) -> PgWireResult<Vec<Option<DataType>>> {
    let types: HashMap<String, Option<DataType>> =
        plan.get_parameter_types().map_err(|e| pg_error(e.into()))?;
    let mut v: Vec<(u32, Option<DataType>)> = types
        .into_iter()
        .map(|(k, t)| {
            (
                k.trim_start_matches('$').parse::<u32>().unwrap_or(u32::MAX),
                t,
            )
        })
        .collect();
    v.sort_by_key(|(k, _)| *k);
    Ok(v.into_iter().map(|(_, t)| t).collect())
}

#[async_trait]
impl ExtendedQueryHandler for Connection {
    type Statement = Prepared;
    type QueryParser = StatementParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        if let Some(view) = &prepared.subscribe {
            let mut guard = self.session.lock().await;
            let session = guard.as_mut().ok_or_else(no_session)?;
            return subscribe::subscribe(session, client, view)
                .await
                .map_err(pg_error);
        }
        if let Some(command) = &prepared.command {
            let mut guard = self.session.lock().await;
            let session = guard.as_mut().ok_or_else(no_session)?;
            let output = exec::sink::run(session, (**command).clone())
                .await
                .map_err(pg_error)?;
            return response(session, output, &portal.result_column_format);
        }
        let Some(statement) = prepared.statement.clone() else {
            return Ok(Response::Execution(Tag::new("FLUSH")));
        };
        let mut guard = self.session.lock().await;
        let session = guard.as_mut().ok_or_else(no_session)?;
        let params = match &prepared.plan {
            Some(plan) if portal.parameter_len() > 0 => {
                let types = ordered_param_types(plan)?;
                let refs: Vec<Option<&DataType>> = types.iter().map(|t| t.as_ref()).collect();
                Some(arrow_pg::datatypes::df::deserialize_parameters(
                    portal, &refs,
                )?)
            }
            _ => None,
        };
        if portal.parameter_len() > 0 && prepared.plan.is_none() {
            return Err(pg_error(ServerError::NotSupported(
                "parameters in this kind of statement".into(),
            )));
        }
        let output = run(session, statement, prepared.plan.clone(), params)
            .await
            .and_then(|o| exec::output::rename_columns(o, &prepared.renames))
            .map_err(pg_error)?;
        response(session, output, &portal.result_column_format)
    }
}

#[async_trait]
impl CopyHandler for Connection {
    async fn on_copy_data<C>(&self, _client: &mut C, copy_data: CopyData) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut guard = self.session.lock().await;
        let session = guard.as_mut().ok_or_else(no_session)?;
        if let Err(e) = copy_from::receive(session, &copy_data.data).await
            && let Ok(mut slot) = self.copy_error.lock()
            && slot.is_none()
        {
            *slot = Some(e);
        }
        Ok(())
    }

    async fn on_copy_done<C>(&self, client: &mut C, _done: CopyDone) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut guard = self.session.lock().await;
        let session = guard.as_mut().ok_or_else(no_session)?;
        let earlier = self.copy_error.lock().ok().and_then(|mut s| s.take());
        let result = match earlier {
            Some(e) => {
                session.copy_in = None;
                Err(e)
            }
            None => copy_from::finish(session).await,
        };
        match result {
            Ok(rows) => {
                let tag = Tag::new("COPY").with_rows(rows);
                client
                    .send(PgWireBackendMessage::CommandComplete(tag.into()))
                    .await?;
                Ok(())
            }
            Err(e) => {
                session.fail_transaction();
                Err(pg_error(e))
            }
        }
    }

    async fn on_copy_fail<C>(&self, _client: &mut C, fail: CopyFail) -> PgWireError
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut guard = self.session.lock().await;
        if let Some(session) = guard.as_mut() {
            session.copy_in = None;
            session.fail_transaction();
        }
        if let Ok(mut slot) = self.copy_error.lock() {
            *slot = None;
        }
        PgWireError::UserError(Box::new(ErrorInfo::new(
            "ERROR".to_owned(),
            "57014".to_owned(),
            format!("COPY from stdin failed: {}", fail.message),
        )))
    }
}
