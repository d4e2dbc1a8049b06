//! COPY ... FROM STDIN, streamed: the data is parsed a part at a time as it arrives, each
//! part's fields cast from text to the column types into one Arrow batch, so that the
//! statement never holds the whole text. The parsed parts are held in memory or staged in
//! cold files (`memory/staging.rs`); all rows become visible at once, as one statement's,
//! or none (`exec/copy.rs` starts the COPY; `engine.rs` commits it).

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BinaryArray, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::DataType;

use crate::engine::{TableChange, conform_to_table};
use crate::error::{Result, ServerError};
use crate::exec::ddl::default_column;
use crate::exec::txn;
use crate::session::Session;
#[cfg(test)]
use crate::session::copy_in::RecordScan;
use crate::session::copy_in::{CopyFormat, CopyIn};

/// Bytes of COPY text parsed at a time (a part ends at the last whole record in them).
const PART_BYTES: usize = 4 << 20;

/// The longest record: a COPY whose data has no record end for this long is refused.
const MAX_RECORD_BYTES: usize = 1 << 30;

/// Records of fields, and whether the end-of-data marker ended them.
type Records = (Vec<Vec<Option<String>>>, bool);

/// Takes one CopyData message: parses the whole records it completes once a part's worth
/// is pending. After an error the COPY is over (its staged files go); the error is reported
/// at CopyDone.
pub async fn receive(session: &mut Session, data: &[u8]) -> Result<()> {
    let Some(mut copy) = session.copy_in.take() else {
        return Err(ServerError::Protocol(
            "COPY data without COPY FROM STDIN".into(),
        ));
    };
    if copy.ended {
        session.copy_in = Some(copy);
        return Ok(());
    }
    copy.pending.extend_from_slice(data);
    copy.scan.advance(&copy.pending, &copy.format);
    if copy.pending.len() >= PART_BYTES
        && let Some(end) = copy.scan.take_end()
    {
        let rest = copy.pending.split_off(end);
        let part = std::mem::replace(&mut copy.pending, rest);
        parse_part(session, &mut copy, &part).await?;
    }
    if copy.pending.len() > MAX_RECORD_BYTES {
        return Err(ServerError::BadCopyFormat(format!(
            "COPY {}: a record longer than 1 GiB (line {})",
            copy.table_name,
            copy.lines + 1
        )));
    }
    session.copy_in = Some(copy);
    Ok(())
}

/// Ends COPY FROM STDIN: parses what is pending and commits the rows (held and staged) as
/// one change. Returns the row count.
pub async fn finish(session: &mut Session) -> Result<usize> {
    let Some(mut copy) = session.copy_in.take() else {
        return Err(ServerError::Protocol(
            "CopyDone without COPY FROM STDIN".into(),
        ));
    };
    if !copy.ended {
        let part = std::mem::take(&mut copy.pending);
        parse_part(session, &mut copy, &part).await?;
    }
    let rows = copy.rows.rows();
    let (inserts, staged) = copy.rows.finish(&copy.table.def.schema)?;
    let engine = session.engine.clone();
    let _write = engine.write_lock.lock().await;
    txn::apply(
        session,
        vec![TableChange {
            table: copy.table,
            table_name: copy.table_name,
            deletes: vec![],
            inserts,
            staged,
        }],
    )?;
    Ok(rows)
}

/// Where the last whole record of `data` ends (after its newline), if any.
#[cfg(test)]
fn record_end(data: &[u8], format: &CopyFormat) -> Option<usize> {
    let mut scan = RecordScan::default();
    scan.advance(data, format);
    scan.take_end()
}

/// Parses whole records into one batch in the table's schema, and holds or stages it.
async fn parse_part(session: &Session, copy: &mut CopyIn, data: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(data).map_err(|e| {
        ServerError::InvalidEncoding(format!(
            "COPY {}: {e} (after line {})",
            copy.table_name, copy.lines
        ))
    })?;
    let (mut records, ended) = if copy.format.csv {
        parse_csv(text, &copy.format)?
    } else {
        parse_text(text, &copy.format)?
    };
    copy.ended |= ended;
    let mut first_line = copy.lines + 1;
    if copy.format.header && copy.lines == 0 && !records.is_empty() {
        records.remove(0);
        copy.lines += 1;
        first_line += 1;
    }
    copy.lines += records.len();
    if records.is_empty() {
        return Ok(());
    }
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
    drop(records);
    let loose = Arc::new(datafusion::arrow::datatypes::Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(loose, columns)?;
    let batch = conform_to_table(&copy.table_name, &schema, &batch)?;
    copy.rows.add(batch)
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
fn parse_text(text: &str, format: &CopyFormat) -> Result<Records> {
    let mut out = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line == "\\." {
            return Ok((out, true));
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
    Ok((out, false))
}

fn finish_text_field(raw: &str, field: &str, format: &CopyFormat) -> Option<String> {
    if raw == format.null {
        None
    } else {
        Some(field.to_string())
    }
}

/// Splits CSV COPY data into records (quoted fields may span lines; unquoted NULL text is NULL).
fn parse_csv(text: &str, format: &CopyFormat) -> Result<Records> {
    let mut out = Vec::new();
    let mut record: Vec<Option<String>> = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    let mut at_line_start = true;
    while let Some(c) = chars.next() {
        if at_line_start && !in_quotes && c == '\\' && chars.peek() == Some(&'.') {
            return Ok((out, true));
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
    Ok((out, false))
}

fn csv_field(field: &str, quoted: bool, format: &CopyFormat) -> Option<String> {
    if !quoted && field == format.null {
        None
    } else {
        Some(field.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_format() -> CopyFormat {
        CopyFormat::text()
    }

    #[test]
    fn text_format_escapes_and_nulls() -> Result<()> {
        let (rows, ended) = parse_text("1\ta\\tb\t\\N\n2\tx\\\\y\t\n\\.\n3\n", &text_format())?;
        assert!(ended);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], vec![Some("1".into()), Some("a\tb".into()), None]);
        assert_eq!(
            rows[1],
            vec![Some("2".into()), Some("x\\y".into()), Some("".into())]
        );
        Ok(())
    }

    #[test]
    fn csv_quotes_span_lines_and_empty_quoted_is_not_null() -> Result<()> {
        let mut f = text_format();
        f.csv = true;
        f.delimiter = ',';
        f.null = String::new();
        let (rows, _) = parse_csv("1,\"a,\"\"b\"\"\nc\",\n2,\"\",x\n", &f)?;
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

    /// A part ends after the last whole record: in CSV not inside a quoted field.
    #[test]
    fn parts_end_after_whole_records() {
        let text = text_format();
        assert_eq!(record_end(b"1\ta\n2\tb", &text), Some(4));
        assert_eq!(record_end(b"1\ta", &text), None);
        let mut csv = text_format();
        csv.csv = true;
        csv.delimiter = ',';
        let data = b"1,\"x\ny\"\n2,\"open\n";
        assert_eq!(record_end(data, &csv), Some(8));
        assert_eq!(record_end(b"1,\"a\"\"\nb\"\n", &csv), Some(10));
        csv.escape = '\\';
        assert_eq!(record_end(b"1,\"a\\\"\nb\"\n", &csv), Some(10));
    }

    /// Scanned a message at a time, the same ends, with an escape split from its quote.
    #[test]
    fn record_scans_carry_over_messages() {
        let mut csv = text_format();
        csv.csv = true;
        csv.delimiter = ',';
        csv.escape = '\\';
        let mut scan = RecordScan::default();
        let mut data = b"1,\"a\\".to_vec();
        scan.advance(&data, &csv);
        assert_eq!(scan.take_end(), None);
        data.extend_from_slice(b"\"\nb\"\n2,x\n3");
        scan.advance(&data, &csv);
        assert_eq!(scan.take_end(), Some(14));
        let mut rest = data.split_off(14);
        rest.extend_from_slice(b",y\n");
        scan.advance(&rest, &csv);
        assert_eq!(scan.take_end(), Some(4));
    }

    #[test]
    fn casts_report_the_bad_row() {
        let bad = cast_text(&[Some("1"), Some("x"), None], &DataType::Int32);
        assert_eq!(bad.err(), Some(1));
        let ok = cast_text(&[Some("t"), Some("no"), None], &DataType::Boolean);
        assert!(ok.is_ok());
    }
}
