//! COPY ... FROM STDIN (text and CSV) and COPY ... TO STDOUT.
//!
//! Incoming data is buffered until CopyDone, parsed into one Arrow batch per statement (each
//! field cast from its text to the column type), and committed like an INSERT: all rows or
//! none. Outgoing rows use the same text encoding as query results.

use std::sync::Arc;

use arrow_pg::datatypes::arrow_schema_to_pg_fields;
use datafusion::arrow::array::{ArrayRef, BinaryArray, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::DataType;
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget,
};
use millrace_planner::PlanError;
use pgwire::api::portal::Format;

use crate::engine::TableChange;
use crate::error::{Result, ServerError};
use crate::exec::ddl::default_column;
use crate::exec::output::Output;
use crate::exec::query;
use crate::exec::{names, txn};
use crate::session::Session;
use crate::session::copy_in::{CopyFormat, CopyIn};
use millrace_planner::error::ObjectClass;

/// Largest COPY FROM STDIN payload buffered for one statement.
const MAX_COPY_BYTES: usize = 1 << 30;

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
    session.copy_in = Some(CopyIn {
        table,
        table_name: name.name,
        columns: column_indices,
        format,
        buffer: Vec::new(),
    });
    Ok(Output::CopyIn { columns: n })
}

/// Buffers one CopyData message.
pub fn receive(session: &mut Session, data: &[u8]) -> Result<()> {
    let Some(copy) = session.copy_in.as_mut() else {
        return Err(ServerError::Protocol(
            "COPY data without COPY FROM STDIN".into(),
        ));
    };
    if copy.buffer.len() + data.len() > MAX_COPY_BYTES {
        session.copy_in = None;
        return Err(ServerError::BadCopyFormat(
            "COPY data exceeds 1 GiB; split the load".into(),
        ));
    }
    copy.buffer.extend_from_slice(data);
    Ok(())
}

/// Ends COPY FROM STDIN: parses the data and commits it. Returns the row count.
pub async fn finish(session: &mut Session) -> Result<usize> {
    let Some(copy) = session.copy_in.take() else {
        return Err(ServerError::Protocol(
            "CopyDone without COPY FROM STDIN".into(),
        ));
    };
    let text = std::str::from_utf8(&copy.buffer)
        .map_err(|e| ServerError::InvalidEncoding(format!("COPY {}: {e}", copy.table_name)))?;
    let mut records = if copy.format.csv {
        parse_csv(text, &copy.format)?
    } else {
        parse_text(text, &copy.format)?
    };
    if copy.format.header && !records.is_empty() {
        records.remove(0);
    }
    let first_line = if copy.format.header { 2 } else { 1 };
    let schema = copy.table.def.schema.clone();
    let rows = records.len();
    for (i, r) in records.iter().enumerate() {
        if r.len() != copy.columns.len() {
            let what = if r.len() > copy.columns.len() {
                "extra data after last expected column"
            } else {
                "missing data for column"
            };
            return Err(ServerError::BadCopyFormat(format!(
                "{what} (COPY {}, line {})",
                copy.table_name,
                i + first_line
            )));
        }
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (col, field) in schema.fields().iter().enumerate() {
        match copy.columns.iter().position(|&c| c == col) {
            Some(pos) => {
                let values: Vec<Option<&str>> = records.iter().map(|r| r[pos].as_deref()).collect();
                columns.push(cast_text(&values, field.data_type()).map_err(|bad| {
                    ServerError::InvalidText(format!(
                        "invalid input for type {} of column {}: \"{}\" (COPY {}, line {})",
                        field.data_type(),
                        field.name(),
                        values[bad].unwrap_or(""),
                        copy.table_name,
                        bad + first_line
                    ))
                })?);
            }
            None => columns.push(default_column(session, &copy.table.def, field, rows).await?),
        }
    }
    let loose = Arc::new(datafusion::arrow::datatypes::Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(loose, columns)?;
    let engine = session.engine.clone();
    let _write = engine.write_lock.lock().await;
    txn::apply(
        session,
        vec![TableChange {
            table: copy.table,
            table_name: copy.table_name,
            deletes: vec![],
            inserts: Some(batch),
        }],
    )?;
    Ok(rows)
}

/// Casts text values to a column type; on failure returns the index of the first bad value.
fn cast_text(values: &[Option<&str>], target: &DataType) -> std::result::Result<ArrayRef, usize> {
    match target {
        DataType::Boolean => {
            let mut out = Vec::with_capacity(values.len());
            for (i, v) in values.iter().enumerate() {
                out.push(match v {
                    None => None,
                    Some(s) => Some(parse_bool(s).ok_or(i)?),
                });
            }
            Ok(Arc::new(BooleanArray::from(out)))
        }
        DataType::Binary => {
            let mut out: Vec<Option<Vec<u8>>> = Vec::with_capacity(values.len());
            for (i, v) in values.iter().enumerate() {
                out.push(match v {
                    None => None,
                    Some(s) => Some(parse_bytea(s).ok_or(i)?),
                });
            }
            Ok(Arc::new(BinaryArray::from_iter(out)))
        }
        _ => {
            let strings: ArrayRef = Arc::new(StringArray::from(values.to_vec()));
            if *target == DataType::Utf8 {
                return Ok(strings);
            }
            let options = CastOptions {
                safe: false,
                ..Default::default()
            };
            match cast_with_options(&strings, target, &options) {
                Ok(a) => Ok(a),
                Err(_) => {
                    for (i, v) in values.iter().enumerate() {
                        let one: ArrayRef = Arc::new(StringArray::from(vec![*v]));
                        if cast_with_options(&one, target, &options).is_err() {
                            return Err(i);
                        }
                    }
                    Err(0)
                }
            }
        }
    }
}

/// PostgreSQL's boolean input spellings.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

pub use millrace_planner::pg_casts::parse_bytea;

/// Splits PostgreSQL text-format COPY data into records of optional fields.
fn parse_text(text: &str, format: &CopyFormat) -> Result<Vec<Vec<Option<String>>>> {
    let mut out = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line == "\\." {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut raw = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if c == format.delimiter {
                fields.push(finish_text_field(&raw, &field, format));
                field.clear();
                raw.clear();
                continue;
            }
            if c == '\\' {
                raw.push(c);
                match chars.next() {
                    Some(e) => {
                        raw.push(e);
                        match e {
                            'n' => field.push('\n'),
                            't' => field.push('\t'),
                            'r' => field.push('\r'),
                            'b' => field.push('\u{8}'),
                            'f' => field.push('\u{c}'),
                            'v' => field.push('\u{b}'),
                            'N' => field.push_str("\\N"),
                            d @ '0'..='7' => {
                                let mut v = d.to_digit(8).unwrap_or(0);
                                for _ in 0..2 {
                                    match chars.peek().and_then(|c| c.to_digit(8)) {
                                        Some(x) => {
                                            v = v * 8 + x;
                                            chars.next();
                                        }
                                        None => break,
                                    }
                                }
                                field.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                            }
                            other => field.push(other),
                        }
                    }
                    None => field.push('\\'),
                }
                continue;
            }
            raw.push(c);
            field.push(c);
        }
        fields.push(finish_text_field(&raw, &field, format));
        out.push(fields);
    }
    Ok(out)
}

fn finish_text_field(raw: &str, field: &str, format: &CopyFormat) -> Option<String> {
    if raw == format.null {
        None
    } else {
        Some(field.to_string())
    }
}

/// Splits CSV COPY data into records (quoted fields may span lines; unquoted NULL text is NULL).
fn parse_csv(text: &str, format: &CopyFormat) -> Result<Vec<Vec<Option<String>>>> {
    let mut out = Vec::new();
    let mut record: Vec<Option<String>> = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    let mut at_line_start = true;
    while let Some(c) = chars.next() {
        if at_line_start && !in_quotes && c == '\\' && chars.peek() == Some(&'.') {
            break;
        }
        at_line_start = false;
        if in_quotes {
            if c == format.escape
                && chars.peek() == Some(&format.quote)
                && format.escape != format.quote
            {
                chars.next();
                field.push(format.quote);
            } else if c == format.quote {
                if format.escape == format.quote && chars.peek() == Some(&format.quote) {
                    chars.next();
                    field.push(format.quote);
                } else {
                    in_quotes = false;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        if c == format.quote {
            in_quotes = true;
            quoted = true;
        } else if c == format.delimiter {
            record.push(csv_field(&field, quoted, format));
            field.clear();
            quoted = false;
        } else if c == '\n' || c == '\r' {
            if c == '\r' && chars.peek() == Some(&'\n') {
                chars.next();
            }
            record.push(csv_field(&field, quoted, format));
            field.clear();
            quoted = false;
            out.push(std::mem::take(&mut record));
            at_line_start = true;
        } else {
            field.push(c);
        }
    }
    if in_quotes {
        return Err(ServerError::BadCopyFormat(
            "unterminated CSV quoted field".into(),
        ));
    }
    if !field.is_empty() || quoted || !record.is_empty() {
        record.push(csv_field(&field, quoted, format));
        out.push(record);
    }
    Ok(out)
}

fn csv_field(field: &str, quoted: bool, format: &CopyFormat) -> Option<String> {
    if !quoted && field == format.null {
        None
    } else {
        Some(field.to_string())
    }
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

    fn text_format() -> CopyFormat {
        CopyFormat::text()
    }

    #[test]
    fn text_format_escapes_and_nulls() -> Result<()> {
        let rows = parse_text("1\ta\\tb\t\\N\n2\tx\\\\y\t\n\\.\n", &text_format())?;
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], vec![Some("1".into()), Some("a\tb".into()), None]);
        assert_eq!(
            rows[1],
            vec![Some("2".into()), Some("x\\y".into()), Some("".into())]
        );
        let line = format_line(&rows[0], &text_format());
        assert_eq!(String::from_utf8_lossy(&line), "1\ta\\tb\t\\N\n");
        Ok(())
    }

    #[test]
    fn csv_quotes_span_lines_and_empty_quoted_is_not_null() -> Result<()> {
        let mut f = text_format();
        f.csv = true;
        f.delimiter = ',';
        f.null = String::new();
        let rows = parse_csv("1,\"a,\"\"b\"\"\nc\",\n2,\"\",x\n", &f)?;
        assert_eq!(
            rows[0],
            vec![Some("1".into()), Some("a,\"b\"\nc".into()), None]
        );
        assert_eq!(
            rows[1],
            vec![Some("2".into()), Some("".into()), Some("x".into())]
        );
        assert!(parse_csv("1,\"open\n", &f).is_err());
        Ok(())
    }

    #[test]
    fn casts_report_the_bad_row() {
        let bad = cast_text(&[Some("1"), Some("x"), None], &DataType::Int32);
        assert_eq!(bad.err(), Some(1));
        let ok = cast_text(&[Some("t"), Some("no"), None], &DataType::Boolean);
        assert!(ok.is_ok());
    }
}
