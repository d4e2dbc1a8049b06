//! SUBSCRIBE on the wire: the view's snapshot and then each epoch's changes, streamed to the
//! client as COPY-out text rows `epoch <TAB> diff <TAB> columns...` (as Materialize's
//! `COPY (SUBSCRIBE ...) TO STDOUT`), flushed row group by row group as epochs publish.
//!
//! The feed ends when the view is dropped (CopyDone), when the client cancels (pgwire drops
//! this future and answers 57014), or with an error when the subscriber has fallen more than
//! `subscribe_max_buffer` epochs behind: a slow reader is cut off, it never holds back the
//! view or the other subscribers.

use std::fmt::Debug;

use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use futures::{Sink, SinkExt};
use millrace_storage::ObjectKind;
use pgwire::api::results::{Response, Tag};
use pgwire::error::PgWireError;
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::copy::{CopyData, CopyDone, CopyOutResponse};
use tokio::sync::broadcast::error::RecvError;
use tracing::info;

use crate::coordinator::feed::with_epoch_and_diff;
use crate::error::{Result, ServerError};
use crate::exec::copy::encode_rows;
use crate::exec::names::{parts, resolve};
use crate::session::Session;
use crate::session::copy_in::CopyFormat;
use crate::sql::SubscribeTarget;
use millrace_planner::error::ObjectClass;
use millrace_planner::spilled_change::ViewChange;

/// Streams the changes of a view, or of a query (through a view that lives as long as the
/// feed), to `client` until the feed ends.
pub async fn subscribe<C>(
    session: &mut Session,
    client: &mut C,
    target: &SubscribeTarget,
) -> Result<Response>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let mut _ephemeral = None;
    let record = match target {
        SubscribeTarget::View(view) => {
            let name = resolve(session, view)?;
            session
                .engine
                .catalog
                .find(
                    &[ObjectKind::MaterializedView],
                    &name.database,
                    &name.schema,
                    &name.name,
                )
                .ok_or_else(|| millrace_planner::PlanError::UndefinedObject {
                    kind: ObjectClass::MaterializedView,
                    name: parts(view).pop().unwrap_or_default(),
                })?
        }
        SubscribeTarget::Query(query) => {
            let view = crate::exec::matview::create_ephemeral(session, query).await?;
            let record = view.record.clone();
            _ephemeral = Some(view);
            record
        }
    };
    let name = &record;
    let setting = session.settings.get("subscribe_max_buffer")?;
    let limit: usize = setting.parse().map_err(|_| ServerError::InvalidSetting {
        name: "subscribe_max_buffer".into(),
        value: setting.clone(),
    })?;
    session.engine.views.wait_ready(&[record.id]).await;
    let mut subscription = session.engine.views.subscribe(record.id).await?;
    let schema = subscription.schema.clone();
    let columns = schema.fields().len();
    info!(view = %name.name, epoch = subscription.epoch, "subscriber started");
    let header = CopyOutResponse::new(0, columns as i16, vec![0; columns]);
    send(client, PgWireBackendMessage::CopyOutResponse(header)).await?;
    let snapshot = encode(session, &schema, &subscription.snapshot)?;
    write_lines(client, &snapshot).await?;
    // NOTE: the COPY text of a value depends on these settings only; subscribers that share
    // them share each delta's encoding.
    let settings = format!("{:?}", session.settings.format_options());
    loop {
        if subscription.feed.len() > limit {
            return Err(too_slow(&name.name, subscription.feed.len(), limit));
        }
        let delta = match subscription.feed.recv().await {
            Ok(delta) => delta,
            Err(RecvError::Lagged(missed)) => {
                return Err(too_slow(&name.name, missed as usize, limit));
            }
            Err(RecvError::Closed) => break,
        };
        match &delta.change {
            ViewChange::Rows(changes) => {
                let lines = delta.lines(&settings, || {
                    let batch = with_epoch_and_diff(
                        &schema,
                        &changes.batch,
                        delta.epoch,
                        &changes.weights,
                    )?;
                    encode(session, &schema, &[batch])
                })?;
                write_or_lag(client, &lines, &subscription.feed, limit, &name.name).await?;
            }
            // NOTE: a change spilled to files is read and encoded a consolidated partition
            // at a time, by each subscriber (such a change is large and rare).
            ViewChange::Spilled(spilled) => {
                for file in spilled.files() {
                    let part = file.consolidated()?;
                    let batch =
                        with_epoch_and_diff(&schema, &part.batch, delta.epoch, &part.weights)?;
                    let lines = encode(session, &schema, &[batch])?;
                    write_or_lag(client, &lines, &subscription.feed, limit, &name.name).await?;
                }
            }
        }
    }
    info!(view = %name.name, "subscribed view dropped; feed ended");
    send(client, PgWireBackendMessage::CopyDone(CopyDone::new())).await?;
    Ok(Response::Execution(Tag::new("SUBSCRIBE")))
}

/// Writes `lines`, or fails once more than `limit` epochs wait unread meanwhile: a reader
/// that stops reading blocks the write once the socket buffers are full, and the lag watch
/// cuts it off instead of queueing epochs for it.
async fn write_or_lag<C>(
    client: &mut C,
    lines: &[Bytes],
    feed: &tokio::sync::broadcast::Receiver<std::sync::Arc<crate::coordinator::feed::EpochDelta>>,
    limit: usize,
    view: &str,
) -> Result<()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    tokio::select! {
        written = write_lines(client, lines) => written,
        behind = lag_passes(feed, limit) => Err(too_slow(view, behind, limit)),
    }
}

/// Resolves once more than `limit` epochs wait unread in `feed`, with how many wait.
async fn lag_passes(
    feed: &tokio::sync::broadcast::Receiver<std::sync::Arc<crate::coordinator::feed::EpochDelta>>,
    limit: usize,
) -> usize {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        tick.tick().await;
        if feed.len() > limit {
            return feed.len();
        }
    }
}

fn too_slow(view: &str, behind: usize, limit: usize) -> ServerError {
    ServerError::SubscriberTooSlow(format!(
        "subscriber to \"{view}\" fell {behind} epochs behind (subscribe_max_buffer = {limit}); read faster or raise the limit"
    ))
}

/// Rows as COPY text lines.
fn encode(
    session: &Session,
    schema: &datafusion::arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<Bytes>> {
    Ok(encode_rows(session, schema, batches, &CopyFormat::text())?
        .into_iter()
        .map(Bytes::from)
        .collect())
}

/// Sends lines as COPY data, then flushes: a feed is read live, not at the end.
async fn write_lines<C>(client: &mut C, lines: &[Bytes]) -> Result<()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    for line in lines {
        client
            .feed(PgWireBackendMessage::CopyData(CopyData::new(line.clone())))
            .await
            .map_err(|e| ServerError::ClientGone(format!("{e:?}")))?;
    }
    client
        .flush()
        .await
        .map_err(|e| ServerError::ClientGone(format!("{e:?}")))
}

async fn send<C>(client: &mut C, message: PgWireBackendMessage) -> Result<()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
{
    client
        .send(message)
        .await
        .map_err(|e| ServerError::ClientGone(format!("{e:?}")))
}
