//! PostgreSQL text rendering for the types whose pgwire text encoding differs from
//! PostgreSQL's: timestamps print their fraction only when it is non-zero (trimmed), and
//! `timestamptz` values print in the session's TimeZone with a short offset (`+01`).

use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Offset, TimeZone, Utc};
use datafusion::arrow::array::timezone::Tz;
use datafusion::arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use pgwire::api::results::{FieldFormat, FieldInfo};

use crate::error::Result;

/// Re-renders text-format timestamp columns of `batch` as PostgreSQL prints them.
pub fn render(batch: RecordBatch, fields: &[FieldInfo], time_zone: &str) -> Result<RecordBatch> {
    let needs = batch.schema().fields().iter().enumerate().any(|(i, f)| {
        matches!(f.data_type(), DataType::Timestamp(_, _))
            && fields
                .get(i)
                .is_some_and(|fi| fi.format() == FieldFormat::Text)
    });
    if !needs {
        return Ok(batch);
    }
    let tz: Option<Tz> = time_zone.parse().ok();
    let mut columns = Vec::with_capacity(batch.num_columns());
    let mut out_fields = Vec::with_capacity(batch.num_columns());
    for (i, field) in batch.schema().fields().iter().enumerate() {
        let column = batch.column(i);
        let text = fields
            .get(i)
            .is_some_and(|fi| fi.format() == FieldFormat::Text);
        match field.data_type() {
            DataType::Timestamp(_, zone) if text => {
                let nanos = cast(column, &DataType::Timestamp(TimeUnit::Nanosecond, None))?;
                let nanos = nanos
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::TimestampNanosecondArray>()
                    .cloned();
                let rendered: StringArray = match nanos {
                    Some(a) => a
                        .iter()
                        .map(|v| {
                            v.map(|ns| {
                                let utc = DateTime::<Utc>::from_timestamp_nanos(ns);
                                match (zone, &tz) {
                                    (Some(_), Some(tz)) => with_zone(utc, tz),
                                    (Some(_), None) => with_zone(utc, &Utc),
                                    (None, _) => naive(&utc.naive_utc()),
                                }
                            })
                        })
                        .collect(),
                    None => StringArray::new_null(column.len()),
                };
                columns.push(Arc::new(rendered) as ArrayRef);
                out_fields.push(Field::new(field.name(), DataType::Utf8, true));
            }
            _ => {
                columns.push(column.clone());
                out_fields.push(field.as_ref().clone());
            }
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(out_fields)),
        columns,
    )?)
}

fn fraction(nanos: u32) -> String {
    if nanos == 0 {
        return String::new();
    }
    // PostgreSQL keeps microseconds.
    let micros = nanos / 1000;
    if micros == 0 {
        return String::new();
    }
    let s = format!(".{micros:06}");
    s.trim_end_matches('0').to_string()
}

fn naive(t: &NaiveDateTime) -> String {
    format!(
        "{}{}",
        t.format("%Y-%m-%d %H:%M:%S"),
        fraction(t.and_utc().timestamp_subsec_nanos())
    )
}

fn with_zone<Z: TimeZone>(utc: DateTime<Utc>, zone: &Z) -> String {
    let local = utc.with_timezone(zone);
    let secs = local.offset().fix().local_minus_utc();
    let sign = if secs < 0 { '-' } else { '+' };
    let secs = secs.abs();
    let (h, m) = (secs / 3600, (secs % 3600) / 60);
    let offset = if m == 0 {
        format!("{sign}{h:02}")
    } else {
        format!("{sign}{h:02}:{m:02}")
    };
    format!("{}{}", naive(&local.naive_local()), offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_trim_like_postgres() {
        assert_eq!(fraction(0), "");
        assert_eq!(fraction(500_000_000), ".5");
        assert_eq!(fraction(123_456_789), ".123456");
        let t = DateTime::<Utc>::from_timestamp(1_700_000_000, 250_000_000).map(|t| t.naive_utc());
        assert_eq!(
            t.map(|t| naive(&t)).as_deref(),
            Some("2023-11-14 22:13:20.25")
        );
        let utc = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let berlin: Tz = "Europe/Berlin"
            .parse()
            .unwrap_or_else(|_| "+00:00".parse().expect("tz"));
        assert_eq!(with_zone(utc, &berlin), "2023-11-14 23:13:20+01");
        let india: Tz = "+05:30".parse().expect("offset");
        assert_eq!(with_zone(utc, &india), "2023-11-15 03:43:20+05:30");
    }
}
