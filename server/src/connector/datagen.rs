//! `connector = 'datagen'`: rows computed from their offset, so any range can be produced
//! again exactly (what makes resuming after a crash exact).
//!
//! Per column, `fields.<col>.kind` is `sequence` (start + offset; the default for integer
//! columns) or `random` (a hash of seed, column and offset; the default otherwise), with
//! `fields.<col>.start`, `.min`, `.max`, `.length` (strings) and `.seed` (or the table's
//! `seed`). Timestamps count seconds and dates days from 2024-01-01.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array, Int8Array,
    Int16Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray,
};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};

use crate::catalog::options::ConnectorOptions;
use crate::connector::ingest::Generator;
use crate::error::{Result, ServerError};

/// Seconds from the Unix epoch to 2024-01-01, where generated timestamps start.
const BASE_SECONDS: i64 = 1_704_067_200;
/// Days from the Unix epoch to 2024-01-01.
const BASE_DAYS: i32 = 19_723;

/// How one column's values are made.
#[derive(Debug, Clone)]
struct ColumnGen {
    /// The column's type.
    data_type: DataType,
    /// Sequence (start + offset) or random (hash of seed, column, offset).
    sequence: bool,
    /// First value of a sequence.
    start: i64,
    /// Smallest random value.
    min: i64,
    /// Largest random value.
    max: i64,
    /// Length of generated strings.
    length: usize,
    /// Seed of random values.
    seed: u64,
}

/// The datagen generator of one table.
#[derive(Debug)]
pub struct Datagen {
    schema: SchemaRef,
    columns: Vec<ColumnGen>,
}

impl Datagen {
    /// A generator for `schema`, configured by `options`; refuses types it cannot make.
    pub fn try_new(schema: SchemaRef, options: &ConnectorOptions) -> Result<Self> {
        let table_seed = options.number("seed")?.unwrap_or(0);
        let mut columns = Vec::new();
        for (i, field) in schema.fields().iter().enumerate() {
            let name = field.name().to_ascii_lowercase();
            let key = |k: &str| format!("fields.{name}.{k}");
            let int = |k: &str| -> Result<Option<i64>> {
                options
                    .values
                    .get(&key(k))
                    .map(|v| {
                        v.trim().parse().map_err(|_| ServerError::InvalidSetting {
                            name: key(k),
                            value: v.clone(),
                        })
                    })
                    .transpose()
            };
            let data_type = field.data_type().clone();
            let integer = matches!(
                data_type,
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
            );
            let sequence = match options.values.get(&key("kind")).map(|s| s.as_str()) {
                Some("sequence") => true,
                Some("random") => false,
                None => integer,
                Some(other) => {
                    return Err(ServerError::InvalidSetting {
                        name: key("kind"),
                        value: other.into(),
                    });
                }
            };
            if !crate::connector::ingest::column_type_supported(&data_type) {
                return Err(ServerError::NotSupported(format!(
                    "datagen for column \"{name}\" of type {data_type}"
                )));
            }
            columns.push(ColumnGen {
                data_type,
                sequence,
                start: int("start")?.unwrap_or(0),
                min: int("min")?.unwrap_or(0),
                max: int("max")?.unwrap_or(1000),
                length: int("length")?.unwrap_or(10).clamp(0, 1 << 20) as usize,
                seed: int("seed")?.map_or(table_seed, |s| s as u64)
                    ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            });
        }
        Ok(Self { schema, columns })
    }
}

/// splitmix64: a fast, well-mixed hash of one 64-bit value.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ColumnGen {
    /// The integer behind the value at `offset`.
    fn value(&self, offset: u64) -> i64 {
        if self.sequence {
            self.start.wrapping_add(offset as i64)
        } else {
            let span = (self.max as i128 - self.min as i128 + 1).max(1) as u128;
            let r = mix(self.seed ^ mix(offset)) as u128 % span;
            (self.min as i128 + r as i128) as i64
        }
    }

    fn text(&self, offset: u64) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        if self.sequence {
            return self.value(offset).to_string();
        }
        let mut h = mix(self.seed ^ mix(offset));
        (0..self.length)
            .map(|i| {
                if i % 8 == 0 && i > 0 {
                    h = mix(h);
                }
                let c = ALPHABET[(h >> ((i % 8) * 8)) as usize % ALPHABET.len()];
                c as char
            })
            .collect()
    }

    fn array(&self, from: u64, rows: usize) -> Result<ArrayRef> {
        let offsets = from..from + rows as u64;
        let ints = || offsets.clone().map(|o| self.value(o));
        Ok(match &self.data_type {
            DataType::Int8 => Arc::new(Int8Array::from_iter_values(ints().map(|v| v as i8))),
            DataType::Int16 => Arc::new(Int16Array::from_iter_values(ints().map(|v| v as i16))),
            DataType::Int32 => Arc::new(Int32Array::from_iter_values(ints().map(|v| v as i32))),
            DataType::Int64 => Arc::new(Int64Array::from_iter_values(ints())),
            DataType::Float32 => Arc::new(Float32Array::from_iter_values(ints().map(|v| v as f32))),
            DataType::Float64 => Arc::new(Float64Array::from_iter_values(ints().map(|v| v as f64))),
            DataType::Boolean => Arc::new(BooleanArray::from_iter(
                offsets
                    .clone()
                    .map(|o| Some(mix(self.seed ^ mix(o)) & 1 == 1)),
            )),
            DataType::Utf8 => Arc::new(StringArray::from_iter_values(
                offsets.clone().map(|o| self.text(o)),
            )),
            DataType::Date32 => Arc::new(Date32Array::from_iter_values(
                ints().map(|v| BASE_DAYS + (v % 36_500) as i32),
            )),
            DataType::Timestamp(unit, tz) => {
                let seconds = ints().map(|v| BASE_SECONDS + v);
                let array: ArrayRef = match unit {
                    TimeUnit::Second => Arc::new(
                        TimestampSecondArray::from_iter_values(seconds)
                            .with_timezone_opt(tz.clone()),
                    ),
                    TimeUnit::Millisecond => Arc::new(
                        TimestampMillisecondArray::from_iter_values(seconds.map(|s| s * 1_000))
                            .with_timezone_opt(tz.clone()),
                    ),
                    TimeUnit::Microsecond => Arc::new(
                        TimestampMicrosecondArray::from_iter_values(seconds.map(|s| s * 1_000_000))
                            .with_timezone_opt(tz.clone()),
                    ),
                    TimeUnit::Nanosecond => Arc::new(
                        TimestampNanosecondArray::from_iter_values(
                            seconds.map(|s| s * 1_000_000_000),
                        )
                        .with_timezone_opt(tz.clone()),
                    ),
                };
                array
            }
            DataType::Decimal128(p, s) => Arc::new(
                Decimal128Array::from_iter_values(ints().map(i128::from))
                    .with_precision_and_scale(*p, *s)?,
            ),
            other => {
                return Err(ServerError::NotSupported(format!(
                    "datagen of type {other}"
                )));
            }
        })
    }
}

impl Generator for Datagen {
    fn batch(&mut self, from: u64, rows: usize) -> Result<RecordBatch> {
        let columns = self
            .columns
            .iter()
            .map(|c| c.array(from, rows))
            .collect::<Result<Vec<_>>>()?;
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Schema};

    #[test]
    fn the_same_offsets_give_the_same_rows() -> Result<()> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
            Field::new("score", DataType::Int32, false),
        ]));
        let mut options = ConnectorOptions::default();
        options.values.insert("connector".into(), "datagen".into());
        options
            .values
            .insert("fields.score.kind".into(), "random".into());
        options.values.insert("fields.score.max".into(), "9".into());
        let mut g = Datagen::try_new(schema, &options)?;
        let whole = g.batch(0, 100)?;
        let tail = g.batch(60, 40)?;
        assert_eq!(whole.slice(60, 40), tail);
        let ids = whole
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .map(|a| a.values().to_vec());
        assert_eq!(ids, Some((0..100).collect::<Vec<i64>>()));
        let scores = whole
            .column(2)
            .as_any()
            .downcast_ref::<Int32Array>()
            .map(|a| a.values().to_vec())
            .unwrap_or_default();
        assert!(scores.iter().all(|s| (0..=9).contains(s)));
        assert!(
            scores
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 5
        );
        Ok(())
    }
}
