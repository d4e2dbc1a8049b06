//! Statement outputs to pgwire responses (rows through arrow-pg's Arrow-to-Postgres encoding).

use std::sync::Arc;

use arrow_pg::datatypes::arrow_schema_to_pg_fields;
use futures::{StreamExt, stream};
use pgwire::api::portal::Format;
use pgwire::api::results::{CopyResponse, QueryResponse, Response, Tag};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::copy::CopyData;

use crate::error::ServerError;
use crate::exec::Output;
use crate::exec::output::data_rows;
use crate::session::Session;

/// The row description of `schema` in the session's output format.
fn pg_fields(
    session: &Session,
    schema: &datafusion::arrow::datatypes::Schema,
    format: &Format,
) -> PgWireResult<Arc<Vec<pgwire::api::results::FieldInfo>>> {
    Ok(Arc::new(arrow_schema_to_pg_fields(
        schema,
        format,
        Some(session.settings.format_options()),
    )?))
}

/// Encodes one statement's output.
pub fn response(session: &Session, output: Output, format: &Format) -> PgWireResult<Response> {
    Ok(match output {
        Output::Rows { schema, batches } => {
            let fields = pg_fields(session, &schema, format)?;
            let tz = session.settings.time_zone();
            let mut rows = Vec::new();
            for batch in batches {
                let batch =
                    crate::wire::text::render(batch, &fields, &tz).map_err(|e| pg_error_ref(&e))?;
                rows.extend(data_rows(fields.clone(), batch));
            }
            Response::Query(QueryResponse::new(fields, stream::iter(rows)))
        }
        Output::Stream { schema, head, rest } => {
            let fields = pg_fields(session, &schema, format)?;
            let tz = session.settings.time_zone();
            let encode_fields = fields.clone();
            let rows = stream::iter(head.into_iter().map(Ok))
                .chain(rest.0)
                .flat_map(move |batch| {
                    let encoded: Vec<PgWireResult<_>> = match batch
                        .map_err(ServerError::from)
                        .and_then(|b| crate::wire::text::render(b, &encode_fields, &tz))
                    {
                        Ok(batch) => data_rows(encode_fields.clone(), batch).collect(),
                        Err(e) => vec![Err(pg_error_ref(&e))],
                    };
                    stream::iter(encoded)
                });
            Response::Query(QueryResponse::new(fields, rows))
        }
        Output::Command { tag, rows } => {
            let t = if tag == "INSERT 0" {
                Tag::new("INSERT").with_oid(0)
            } else {
                Tag::new(&tag)
            };
            Response::Execution(match rows {
                Some(n) => t.with_rows(n),
                None => t,
            })
        }
        Output::TransactionStart(tag) => Response::TransactionStart(Tag::new(&tag)),
        Output::TransactionEnd(tag) => Response::TransactionEnd(Tag::new(&tag)),
        Output::CopyIn { columns } => {
            Response::CopyIn(CopyResponse::new(0, columns, stream::empty()))
        }
        Output::CopyOut { columns, chunks } => {
            let data = chunks
                .into_iter()
                .map(|c| Ok(CopyData::new(c.into())))
                .collect::<Vec<_>>();
            Response::CopyOut(CopyResponse::new(0, columns, stream::iter(data)))
        }
        Output::Empty => Response::EmptyQuery,
    })
}

/// The ErrorResponse fields for a failed statement.
pub fn error_info(e: &ServerError) -> ErrorInfo {
    match e.class() {
        crate::error::ErrorClass::Internal => tracing::warn!(error = %e, "statement failed"),
        crate::error::ErrorClass::User => tracing::debug!(error = %e, "statement failed"),
    }
    ErrorInfo::new("ERROR".to_owned(), e.sqlstate().to_owned(), e.to_string())
}

fn pg_error_ref(e: &ServerError) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(e)))
}

/// A server error as a pgwire error.
pub fn pg_error(e: ServerError) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(&e)))
}
