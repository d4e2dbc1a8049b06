//! PostgreSQL text rendering for the types whose pgwire text encoding differs from
//! PostgreSQL's: timestamps print their fraction only when it is non-zero (trimmed), and
//! `timestamptz` values print in the session's TimeZone with a short offset (`+01`); floats
//! print in PostgreSQL's shortest form (`98`, `1e+20`, `Infinity`).

use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Offset, TimeZone, Utc};
use datafusion::arrow::array::timezone::Tz;
use datafusion::arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, IntervalUnit, Schema, TimeUnit};
use pgwire::api::results::{FieldFormat, FieldInfo};

use crate::error::Result;

/// Re-renders text-format timestamp and float columns of `batch` as PostgreSQL prints them.
pub fn render(batch: RecordBatch, fields: &[FieldInfo], time_zone: &str) -> Result<RecordBatch> {
    let batch = crate::exec::output::wire_decimals(batch)?;
    let needs = batch.schema().fields().iter().enumerate().any(|(i, f)| {
        matches!(
            f.data_type(),
            DataType::Timestamp(_, _)
                | DataType::Date32
                | DataType::Float32
                | DataType::Float64
                | DataType::Interval(IntervalUnit::MonthDayNano)
        ) && fields
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
            // NOTE: chrono writes years past 9999 with a sign (`+10033-08-21`).
            DataType::Date32 if text => {
                let rendered: StringArray = match column
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::Date32Array>(
                ) {
                    Some(a) => a
                        .iter()
                        .map(|v| {
                            v.and_then(|days| {
                                let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
                                let date = epoch
                                    .checked_add_signed(chrono::Duration::days(days.into()))?;
                                Some(pg_date(date))
                            })
                        })
                        .collect(),
                    None => StringArray::new_null(column.len()),
                };
                columns.push(Arc::new(rendered) as ArrayRef);
                out_fields.push(Field::new(field.name(), DataType::Utf8, true));
            }
            // NOTE: arrow-pg encodes a NULL interval as `00:00:00`; render intervals here.
            DataType::Interval(IntervalUnit::MonthDayNano) if text => {
                let rendered: StringArray =
                    match column
                        .as_any()
                        .downcast_ref::<datafusion::arrow::array::IntervalMonthDayNanoArray>()
                    {
                        Some(a) => a
                            .iter()
                            .map(|v| {
                                v.map(|iv| {
                                    pg_interval::Interval::new(
                                        iv.months,
                                        iv.days,
                                        iv.nanoseconds / 1000,
                                    )
                                    .to_postgres()
                                })
                            })
                            .collect(),
                        None => StringArray::new_null(column.len()),
                    };
                columns.push(Arc::new(rendered) as ArrayRef);
                out_fields.push(Field::new(field.name(), DataType::Utf8, true));
            }
            DataType::Float64 | DataType::Float32 if text => {
                let wide = cast(column, &DataType::Float64)?;
                let precision = if field.data_type() == &DataType::Float32 {
                    6
                } else {
                    15
                };
                let rendered: StringArray = match wide
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::Float64Array>(
                ) {
                    Some(a) => a
                        .iter()
                        .map(|v| {
                            v.map(|x| {
                                if field.data_type() == &DataType::Float32 {
                                    pg_float(format!("{:e}", x as f32), x, precision)
                                } else {
                                    pg_float(format!("{x:e}"), x, precision)
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

/// PostgreSQL's float output: shortest round-trip digits, in exponent form when the decimal
/// exponent is below -4 or at least `precision` (15 for float8, 6 for float4).
fn pg_float(scientific: String, value: f64, precision: i32) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    let (mantissa, exp) = match scientific.split_once('e') {
        Some((m, e)) => (m.to_string(), e.parse::<i32>().unwrap_or(0)),
        None => return scientific,
    };
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if exp < -4 || exp >= precision {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{frac}e{esign}{:02}", exp.abs());
    }
    let len = digits.len() as i32;
    if exp < 0 {
        let zeros = "0".repeat((-exp - 1) as usize);
        format!("{sign}0.{zeros}{digits}")
    } else if len <= exp + 1 {
        let zeros = "0".repeat((exp + 1 - len) as usize);
        format!("{sign}{digits}{zeros}")
    } else {
        let (int, frac) = digits.split_at((exp + 1) as usize);
        format!("{sign}{int}.{frac}")
    }
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
        unsigned_year(t.format("%Y-%m-%d %H:%M:%S").to_string()),
        fraction(t.and_utc().timestamp_subsec_nanos())
    )
}

/// A date chrono wrote with a `+` before a year past 9999, as PostgreSQL writes it (without).
/// A date as PostgreSQL writes it: years before 1 as `4392-08-24 BC` (year 0 is 1 BC).
fn pg_date(date: chrono::NaiveDate) -> String {
    use chrono::Datelike;
    match date.year() {
        year if year <= 0 => format!("{:04}-{:02}-{:02} BC", 1 - year, date.month(), date.day()),
        _ => unsigned_year(date.format("%Y-%m-%d").to_string()),
    }
}

fn unsigned_year(text: String) -> String {
    match text.strip_prefix('+') {
        Some(rest) => rest.to_string(),
        None => text,
    }
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
    fn dates_before_year_one_print_as_bc() {
        let d = |y, m, day| pg_date(chrono::NaiveDate::from_ymd_opt(y, m, day).expect("date"));
        assert_eq!(d(-4391, 8, 24), "4392-08-24 BC");
        assert_eq!(d(0, 1, 1), "0001-01-01 BC");
        assert_eq!(d(1, 1, 1), "0001-01-01");
        assert_eq!(d(2023, 1, 9), "2023-01-09");
        assert_eq!(d(10033, 8, 21), "10033-08-21");
    }

    #[test]
    fn floats_print_like_postgres() {
        let f8 = |x: f64| pg_float(format!("{x:e}"), x, 15);
        let f4 = |x: f32| pg_float(format!("{x:e}"), f64::from(x), 6);
        assert_eq!(f8(1e15), "1e+15");
        assert_eq!(f8(1e14), "100000000000000");
        assert_eq!(f8(123456789012345.0), "123456789012345");
        assert_eq!(f8(0.0001), "0.0001");
        assert_eq!(f8(0.00001), "1e-05");
        assert_eq!(f8(-98.0), "-98");
        assert_eq!(f8(-2.1875), "-2.1875");
        assert_eq!(f8(1.25e-7), "1.25e-07");
        assert_eq!(f8(2.5e100), "2.5e+100");
        assert_eq!(f8(-0.0), "-0");
        assert_eq!(f8(f64::NAN), "NaN");
        assert_eq!(f8(f64::NEG_INFINITY), "-Infinity");
        assert_eq!(f4(1e6), "1e+06");
        assert_eq!(f4(123456.0), "123456");
        assert_eq!(f4(1234567.0), "1.234567e+06");
        assert_eq!(f4(12345.678), "12345.678");
        assert_eq!(f4(0.1), "0.1");
    }

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
