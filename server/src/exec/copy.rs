//! COPY ... FROM STDIN (text and CSV) and COPY ... TO STDOUT.
//!
//! Starting a COPY FROM STDIN (its data is parsed, staged and committed by
//! `exec/copy_from.rs`: all rows or none). Outgoing rows use the same text encoding as
//! query results.

use std::sync::Arc;

use arrow_pg::datatypes::arrow_schema_to_pg_fields;
use datafusion::arrow::array::RecordBatch;
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget,
};
use millrace_planner::PlanError;
use pgwire::api::portal::Format;

use crate::error::{Result, ServerError};
use crate::exec::names;
use crate::exec::output::Output;
use crate::exec::query;
use crate::memory::staging::Staging;
use crate::session::Session;
use crate::session::copy_in::{CopyFormat, CopyIn};
use millrace_planner::error::ObjectClass;

fn parse_format(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> Result<CopyFormat> {
    let mut f = CopyFormat::text();
    let mut delimiter = None;
    let mut null = None;
    let mut escape = None;
    for o in options {
        match o {
            CopyOption::Format(name) => match name.value.to_ascii_lowercase().as_str() {
                "csv" => f.csv = true,
                "text" => f.csv = false,
                other => return Err(ServerError::NotSupported(format!("COPY format {other}"))),
            },
            CopyOption::Delimiter(c) => delimiter = Some(*c),
            CopyOption::Null(s) => null = Some(s.clone()),
            CopyOption::Header(h) => f.header = *h,
            CopyOption::Quote(c) => f.quote = *c,
            CopyOption::Escape(c) => escape = Some(*c),
            CopyOption::Encoding(e)
                if e.eq_ignore_ascii_case("utf8") || e.eq_ignore_ascii_case("utf-8") => {}
            other => return Err(ServerError::NotSupported(format!("COPY option {other}"))),
        }
    }
    for o in legacy {
        match o {
            CopyLegacyOption::Csv(csv_opts) => {
                f.csv = true;
                for c in csv_opts {
                    match c {
                        CopyLegacyCsvOption::Header => f.header = true,
                        CopyLegacyCsvOption::Quote(q) => f.quote = *q,
                        CopyLegacyCsvOption::Escape(e) => escape = Some(*e),
                        other => {
                            return Err(ServerError::NotSupported(format!("COPY option {other}")));
                        }
                    }
                }
            }
            CopyLegacyOption::Delimiter(c) => delimiter = Some(*c),
            CopyLegacyOption::Null(s) => null = Some(s.clone()),
            CopyLegacyOption::Header => f.header = true,
            other => return Err(ServerError::NotSupported(format!("COPY option {other}"))),
        }
    }
    if f.csv {
        f.delimiter = ',';
        f.null = String::new();
    }
    if let Some(d) = delimiter {
        f.delimiter = d;
    }
    if let Some(n) = null {
        f.null = n;
    }
    f.escape = escape.unwrap_or(f.quote);
    for (what, c) in [
        ("delimiter", f.delimiter),
        ("quote", f.quote),
        ("escape", f.escape),
    ] {
        if !c.is_ascii() {
            return Err(ServerError::NotSupported(format!(
                "COPY {what} must be a single one-byte character"
            )));
        }
    }
    Ok(f)
}

/// Starts a COPY statement.
pub async fn start(
    session: &mut Session,
    source: CopySource,
    to: bool,
    target: CopyTarget,
    options: Vec<CopyOption>,
    legacy: Vec<CopyLegacyOption>,
) -> Result<Output> {
    let format = parse_format(&options, &legacy)?;
    if to {
        if !matches!(target, CopyTarget::Stdout) {
            return Err(ServerError::NotSupported(
                "COPY TO a file or program".into(),
            ));
        }
        let sql = match source {
            CopySource::Table {
                table_name,
                columns,
            } => {
                let cols = if columns.is_empty() {
                    "*".to_string()
                } else {
                    columns
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                format!("SELECT {cols} FROM {table_name}")
            }
            CopySource::Query(q) => q.to_string(),
        };
        let statement = crate::sql::parse_one(&sql)?;
        let Output::Rows { schema, batches } = query::run(session, statement, None, None)
            .await?
            .collect()
            .await?
        else {
            return Err(ServerError::Internal("COPY query produced no rows".into()));
        };
        let chunks = encode_rows(session, &schema, &batches, &format)?;
        return Ok(Output::CopyOut {
            columns: schema.fields().len(),
            chunks,
        });
    }
    if !matches!(target, CopyTarget::Stdin) {
        return Err(ServerError::NotSupported(
            "COPY FROM a file or program".into(),
        ));
    }
    let CopySource::Table {
        table_name,
        columns,
    } = source
    else {
        return Err(ServerError::Syntax("COPY FROM needs a table".into()));
    };
    let names::ResolvedTable { name, table, .. } = names::require_table(session, &table_name)?;
    session
        .engine
        .sources
        .check_writable(table.id, &name.name)?;
    let schema = table.def.schema.clone();
    let column_indices = if columns.is_empty() {
        (0..schema.fields().len()).collect()
    } else {
        let mut v = Vec::new();
        for c in &columns {
            let col = names::fold(c);
            v.push(
                schema
                    .index_of(&col)
                    .map_err(|_| PlanError::UndefinedObject {
                        kind: ObjectClass::Column,
                        name: col.clone(),
                    })?,
            );
        }
        v
    };
    let n = column_indices.len();
    let pool = session.ctx.runtime_env().memory_pool.clone();
    let rows = Staging::new(table.id, session.engine.cache.clone(), &pool);
    session.copy_in = Some(CopyIn {
        table,
        table_name: name.name,
        columns: column_indices,
        format,
        pending: Vec::new(),
        scan: Default::default(),
        lines: 0,
        ended: false,
        rows,
    });
    Ok(Output::CopyIn { columns: n })
}

/// Encodes rows as COPY text or CSV lines, one chunk per row.
/// Encodes rows as COPY lines, one chunk per row (a header line first if asked).
pub fn encode_rows(
    session: &Session,
    schema: &datafusion::arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
    format: &CopyFormat,
) -> Result<Vec<Vec<u8>>> {
    let fields = Arc::new(
        arrow_schema_to_pg_fields(
            schema,
            &Format::UnifiedText,
            Some(session.settings.format_options()),
        )
        .map_err(|e| ServerError::Internal(e.to_string()))?,
    );
    let mut chunks = Vec::new();
    if format.header {
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let values: Vec<Option<String>> = names.into_iter().map(Some).collect();
        chunks.push(format_line(&values, format));
    }
    for batch in batches {
        for row in crate::exec::output::data_rows(fields.clone(), batch.clone()) {
            let row = row.map_err(|e| ServerError::Internal(e.to_string()))?;
            let values = split_data_row(&row.data)?;
            chunks.push(format_line(&values, format));
        }
    }
    Ok(chunks)
}

/// Splits a DataRow body (length-prefixed fields) into text values.
fn split_data_row(data: &[u8]) -> Result<Vec<Option<String>>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 4 <= data.len() {
        let len = i32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
        pos += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let end = pos + len as usize;
        let bytes = data
            .get(pos..end)
            .ok_or_else(|| ServerError::Internal("truncated data row".into()))?;
        out.push(Some(String::from_utf8_lossy(bytes).into_owned()));
        pos = end;
    }
    Ok(out)
}

fn format_line(values: &[Option<String>], format: &CopyFormat) -> Vec<u8> {
    let mut line = String::new();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            line.push(format.delimiter);
        }
        match v {
            None => line.push_str(&format.null),
            Some(s) if format.csv => {
                let needs_quotes = s.is_empty()
                    || s.contains(format.delimiter)
                    || s.contains(format.quote)
                    || s.contains('\n')
                    || s.contains('\r');
                if needs_quotes {
                    line.push(format.quote);
                    for c in s.chars() {
                        if c == format.quote {
                            line.push(format.escape);
                        }
                        line.push(c);
                    }
                    line.push(format.quote);
                } else {
                    line.push_str(s);
                }
            }
            Some(s) => {
                for c in s.chars() {
                    match c {
                        '\\' => line.push_str("\\\\"),
                        '\n' => line.push_str("\\n"),
                        '\r' => line.push_str("\\r"),
                        '\t' => line.push_str("\\t"),
                        c if c == format.delimiter => {
                            line.push('\\');
                            line.push(c);
                        }
                        c => line.push(c),
                    }
                }
            }
        }
    }
    line.push('\n');
    line.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_escape_and_write_nulls() {
        let values = vec![Some("1".into()), Some("a\tb\\".to_string()), None];
        let line = format_line(&values, &CopyFormat::text());
        assert_eq!(String::from_utf8_lossy(&line), "1\ta\\tb\\\\\t\\N\n");
    }
}
