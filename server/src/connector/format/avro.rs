//! Avro records: the schema a source is given (inline or from a file, kept in the catalog),
//! one datum per Kafka message (raw, or in the Confluent wire format), or object container
//! files read whole by the file source.
//!
//! Sits inside [`crate::connector::decode::RecordDecoder`]: a record is decoded with the writer schema
//! into an Avro value, then each payload column takes the record field of its name, as a
//! `ScalarValue` of the Avro type that the decoder casts to the column's type. Nested
//! values (arrays, maps, records) become JSON text. A record that does not decode, leaves
//! bytes over, or has a field of the wrong type is refused with the reason, like a bad JSON
//! record.

use std::io::Cursor;
use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::types::Value;
use datafusion::arrow::datatypes::{DataType, FieldRef, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::sql::sqlparser::ast;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::catalog::options::ConnectorOptions;
use crate::connector::format::Format;
use crate::error::{Result, ServerError};

/// Options that name a schema file; its text is kept in the catalog as `avro.schema`.
pub const SCHEMA_FILE_KEYS: [&str; 3] = ["avro.schema.file", "schema.location", "schema.path"];
/// The option holding the schema's JSON text.
pub const SCHEMA_KEY: &str = "avro.schema";
/// The largest allocation one decoded datum may ask for (a corrupt length prefix otherwise
/// asks for gigabytes).
const MAX_ALLOCATION: usize = 64 << 20;

/// The schema of a source's records and where each payload column is in them.
#[derive(Debug)]
pub struct AvroCodec {
    schema: Schema,
    /// Messages start with the Confluent header (magic byte 0, 4-byte schema id).
    confluent: bool,
    fields: RecordFields,
}

/// For each payload column, the index of its field in the record and the field's schema.
#[derive(Debug)]
pub struct RecordFields(Vec<(usize, Schema)>);

impl AvroCodec {
    /// The codec of a source's options, or `None` when no schema is given. An error when
    /// the schema does not parse, is not a record, or lacks a column.
    pub fn from_options(
        options: &ConnectorOptions,
        columns: &[FieldRef],
    ) -> Result<Option<Arc<Self>>> {
        let Some(text) = schema_text(options)? else {
            return Ok(None);
        };
        let schema = parse_schema(&text)?;
        let confluent = match options
            .values
            .get("avro.wire_format")
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("raw") => false,
            Some("confluent") => true,
            Some(other) => {
                return Err(ServerError::InvalidSetting {
                    name: "avro.wire_format".into(),
                    value: other.into(),
                });
            }
        };
        let fields =
            RecordFields::new(&schema, columns).map_err(|reason| ServerError::InvalidSetting {
                name: SCHEMA_KEY.into(),
                value: reason,
            })?;
        Ok(Some(Arc::new(Self {
            schema,
            confluent,
            fields,
        })))
    }

    /// One message's payload values in column order (`None` for null), or why it is
    /// refused.
    pub fn decode(&self, raw: &[u8]) -> RecordValues {
        let datum = if self.confluent {
            match raw {
                [0, _, _, _, _, rest @ ..] => rest,
                _ => return Err("not in the Confluent wire format (magic byte 0)".into()),
            }
        } else {
            raw
        };
        let mut cursor = Cursor::new(datum);
        let schema = &self.schema;
        let value = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            apache_avro::util::max_allocation_bytes(MAX_ALLOCATION);
            apache_avro::from_avro_datum(schema, &mut cursor, None)
        }))
        .map_err(|_| "malformed Avro: the decoder failed".to_string())?
        .map_err(|e| format!("malformed Avro: {e}"))?;
        let left = datum.len() as u64 - cursor.position();
        if left > 0 {
            return Err(format!("malformed Avro: {left} bytes after the record"));
        }
        self.fields.values(value)
    }
}

impl RecordFields {
    /// Finds each column in a record schema by name.
    pub fn new(schema: &Schema, columns: &[FieldRef]) -> std::result::Result<Self, String> {
        let Schema::Record(record) = schema else {
            return Err("an Avro schema that is not a record".into());
        };
        columns
            .iter()
            .map(|column| {
                let index = record
                    .fields
                    .iter()
                    .position(|f| f.name == *column.name())
                    .ok_or_else(|| {
                        format!(
                            "column \"{}\" is not a field of the Avro schema",
                            column.name()
                        )
                    })?;
                let schema = record.fields[index].schema.clone();
                let target = column.data_type();
                let nested = matches!(
                    without_null(&schema).0,
                    Schema::Array(_) | Schema::Map(_) | Schema::Record(_)
                );
                if let Some(natural) = natural_type(&schema) {
                    // NOTE: nested values arrive as JSON text, which fits a text column only.
                    if (nested && *target != DataType::Utf8)
                        || !datafusion::arrow::compute::can_cast_types(&natural, target)
                    {
                        return Err(format!(
                            "column \"{}\" of type {target} from Avro {}",
                            column.name(),
                            avro_kind(&schema)
                        ));
                    }
                }
                Ok((index, schema))
            })
            .collect::<std::result::Result<_, _>>()
            .map(Self)
    }

    /// The columns' values of one decoded record.
    pub fn values(&self, value: Value) -> RecordValues {
        let Value::Record(mut fields) = value else {
            return Err("the Avro datum is not a record".into());
        };
        self.0
            .iter()
            .map(|(index, schema)| {
                let value = fields
                    .get_mut(*index)
                    .map(|(_, v)| std::mem::replace(v, Value::Null))
                    .ok_or("the Avro record has fewer fields than its schema")?;
                scalar(value, schema)
            })
            .collect()
    }
}

/// The schema text given by `avro.schema`, or read from the file a schema option names.
pub fn schema_text(options: &ConnectorOptions) -> Result<Option<String>> {
    if let Some(text) = options.values.get(SCHEMA_KEY) {
        return Ok(Some(text.clone()));
    }
    let Some((key, location)) = SCHEMA_FILE_KEYS
        .iter()
        .find_map(|k| options.values.get(*k).map(|v| (*k, v)))
    else {
        return Ok(None);
    };
    let path = location.strip_prefix("file://").unwrap_or(location);
    std::fs::read_to_string(path)
        .map(Some)
        .map_err(|e| ServerError::InvalidSetting {
            name: key.into(),
            value: format!("{location}: {e}"),
        })
}

/// Parses a schema's JSON text.
pub fn parse_schema(text: &str) -> Result<Schema> {
    Schema::parse_str(text).map_err(|e| ServerError::InvalidSetting {
        name: SCHEMA_KEY.into(),
        value: format!("not an Avro schema: {e}"),
    })
}

/// The column definitions (`name TYPE [NOT NULL]`) of a record schema's fields, for a
/// source declared without columns.
pub fn column_definitions(schema: &Schema) -> Result<Vec<String>> {
    let Schema::Record(record) = schema else {
        return Err(ServerError::NotSupported(
            "an Avro schema that is not a record".into(),
        ));
    };
    Ok(record
        .fields
        .iter()
        .map(|f| {
            let (inner, nullable) = without_null(&f.schema);
            let sql_type = match inner {
                Schema::Boolean => "BOOLEAN".to_string(),
                Schema::Int => "INTEGER".into(),
                Schema::Long => "BIGINT".into(),
                Schema::Float => "REAL".into(),
                Schema::Double => "DOUBLE PRECISION".into(),
                Schema::Date => "DATE".into(),
                Schema::TimestampMillis | Schema::TimestampMicros | Schema::TimestampNanos => {
                    "TIMESTAMPTZ".into()
                }
                Schema::LocalTimestampMillis
                | Schema::LocalTimestampMicros
                | Schema::LocalTimestampNanos => "TIMESTAMP".into(),
                Schema::Decimal(d) if d.precision <= 38 => {
                    format!("NUMERIC({}, {})", d.precision, d.scale)
                }
                _ => "TEXT".into(),
            };
            let quoted = f.name.replace('"', "\"\"");
            format!(
                "\"{quoted}\" {sql_type}{}",
                if nullable { "" } else { " NOT NULL" }
            )
        })
        .collect())
}

/// Readies a `CREATE TABLE` / `CREATE SOURCE` with `FORMAT AVRO` before it is planned and
/// stored: a schema named by a file option is read and kept inline as `avro.schema` (the
/// catalog then needs no file to restart), and a table declared without columns gets one
/// column per field of the record schema. Other statements are left as they are.
pub fn prepare_table(create: &mut ast::CreateTable) -> Result<()> {
    let Some(options) = ConnectorOptions::from_table(&create.table_options)? else {
        return Ok(());
    };
    if Format::from_options(&options)? != Format::Avro {
        return Ok(());
    }
    let Some(text) = schema_text(&options)? else {
        if create.columns.is_empty() {
            return Err(ServerError::InvalidSetting {
                name: SCHEMA_KEY.into(),
                value: "columns come from the Avro schema: give avro.schema or schema.location"
                    .into(),
            });
        }
        return Ok(());
    };
    let schema = parse_schema(&text)?;
    if let ast::CreateTableOptions::With(list) = &mut create.table_options {
        let named_by_file = |option: &ast::SqlOption| match option {
            ast::SqlOption::KeyValue { key, .. } => {
                SCHEMA_FILE_KEYS.contains(&key.value.to_ascii_lowercase().as_str())
            }
            _ => false,
        };
        if list.iter().any(named_by_file) {
            list.retain(|o| !named_by_file(o));
            list.push(ast::SqlOption::KeyValue {
                key: ast::Ident::with_quote('"', SCHEMA_KEY),
                value: ast::Expr::value(ast::Value::SingleQuotedString(text)),
            });
        }
    }
    if create.columns.is_empty() {
        let sql = format!(
            "CREATE TABLE t ({})",
            column_definitions(&schema)?.join(", ")
        );
        let parsed = Parser::parse_sql(&PostgreSqlDialect {}, &sql)?;
        if let Some(ast::Statement::CreateTable(table)) = parsed.into_iter().next() {
            create.columns = table.columns;
        }
    }
    Ok(())
}

/// A union of null and one type, as that type and whether null is allowed.
fn without_null(schema: &Schema) -> (&Schema, bool) {
    match schema {
        Schema::Union(u) => {
            let nullable = u.variants().iter().any(|v| matches!(v, Schema::Null));
            let rest: Vec<&Schema> = u
                .variants()
                .iter()
                .filter(|v| !matches!(v, Schema::Null))
                .collect();
            match rest[..] {
                [one] => (one, nullable),
                _ => (schema, nullable),
            }
        }
        Schema::Null => (schema, true),
        other => (other, false),
    }
}

/// The Arrow type a field's values decode to; `None` when it depends on the value (unions
/// of several types).
fn natural_type(schema: &Schema) -> Option<DataType> {
    let utc = || Some(Arc::from("+00:00"));
    Some(match without_null(schema).0 {
        Schema::Boolean => DataType::Boolean,
        Schema::Int => DataType::Int32,
        Schema::Long => DataType::Int64,
        Schema::Float => DataType::Float32,
        Schema::Double => DataType::Float64,
        Schema::Date => DataType::Date32,
        Schema::TimestampMillis => DataType::Timestamp(TimeUnit::Millisecond, utc()),
        Schema::TimestampMicros => DataType::Timestamp(TimeUnit::Microsecond, utc()),
        Schema::TimestampNanos => DataType::Timestamp(TimeUnit::Nanosecond, utc()),
        Schema::LocalTimestampMillis => DataType::Timestamp(TimeUnit::Millisecond, None),
        Schema::LocalTimestampMicros => DataType::Timestamp(TimeUnit::Microsecond, None),
        Schema::LocalTimestampNanos => DataType::Timestamp(TimeUnit::Nanosecond, None),
        Schema::Decimal(d) if d.precision <= 38 => {
            DataType::Decimal128(d.precision as u8, d.scale as i8)
        }
        Schema::Union(_) => return None,
        _ => DataType::Utf8,
    })
}

/// The Avro type's name, for messages.
fn avro_kind(schema: &Schema) -> String {
    match without_null(schema).0 {
        Schema::Decimal(d) => format!("decimal({}, {})", d.precision, d.scale),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase(),
    }
}

/// One field's value as a scalar of its Avro type (`None` for null).
fn scalar(value: Value, schema: &Schema) -> std::result::Result<Option<ScalarValue>, String> {
    let utc = || Some(Arc::from("+00:00"));
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::Union(i, inner) => {
            let variant = match schema {
                Schema::Union(u) => u.variants().get(i as usize).unwrap_or(schema),
                other => other,
            };
            return scalar(*inner, variant);
        }
        Value::Boolean(b) => ScalarValue::Boolean(Some(b)),
        Value::Int(i) => ScalarValue::Int32(Some(i)),
        Value::Long(i) => ScalarValue::Int64(Some(i)),
        Value::Float(f) => ScalarValue::Float32(Some(f)),
        Value::Double(f) => ScalarValue::Float64(Some(f)),
        Value::String(s) | Value::Enum(_, s) => ScalarValue::Utf8(Some(s)),
        Value::Uuid(u) => ScalarValue::Utf8(Some(u.to_string())),
        Value::Bytes(b) | Value::Fixed(_, b) => ScalarValue::Utf8(Some(
            String::from_utf8(b).map_err(|_| "Avro bytes that are not UTF-8".to_string())?,
        )),
        Value::Date(d) => ScalarValue::Date32(Some(d)),
        Value::TimeMillis(t) => ScalarValue::Time32Millisecond(Some(t)),
        Value::TimeMicros(t) => ScalarValue::Time64Microsecond(Some(t)),
        Value::TimestampMillis(t) => ScalarValue::TimestampMillisecond(Some(t), utc()),
        Value::TimestampMicros(t) => ScalarValue::TimestampMicrosecond(Some(t), utc()),
        Value::TimestampNanos(t) => ScalarValue::TimestampNanosecond(Some(t), utc()),
        Value::LocalTimestampMillis(t) => ScalarValue::TimestampMillisecond(Some(t), None),
        Value::LocalTimestampMicros(t) => ScalarValue::TimestampMicrosecond(Some(t), None),
        Value::LocalTimestampNanos(t) => ScalarValue::TimestampNanosecond(Some(t), None),
        Value::Decimal(d) => {
            let Schema::Decimal(ds) = schema else {
                return Err("an Avro decimal without its scale".into());
            };
            let bytes = Vec::<u8>::try_from(&d).map_err(|e| format!("Avro decimal: {e}"))?;
            match (unscaled(&bytes), ds.precision <= 38) {
                (Some(v), true) => {
                    ScalarValue::Decimal128(Some(v), ds.precision as u8, ds.scale as i8)
                }
                _ => return Err("an Avro decimal wider than 38 digits".into()),
            }
        }
        Value::BigDecimal(d) => ScalarValue::Utf8(Some(d.to_string())),
        Value::Duration(_) => return Err("Avro durations are not supported".into()),
        nested @ (Value::Array(_) | Value::Map(_) | Value::Record(_)) => {
            let json = serde_json::Value::try_from(nested).map_err(|e| e.to_string())?;
            ScalarValue::Utf8(Some(json.to_string()))
        }
    }))
}

/// A big-endian two's-complement integer of at most 16 bytes.
fn unscaled(bytes: &[u8]) -> Option<i128> {
    if bytes.len() > 16 {
        return None;
    }
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut buf = if negative { [0xff; 16] } else { [0; 16] };
    buf[16 - bytes.len()..].copy_from_slice(bytes);
    Some(i128::from_be_bytes(buf))
}

/// One record's payload values (`None` for null), or why it is refused.
pub type RecordValues = std::result::Result<Vec<Option<ScalarValue>>, String>;

/// The rows of an object container file: each record's payload values or why it is
/// refused, with its 1-based position; an error for a file that cannot be read at all.
pub fn container_records(
    bytes: &[u8],
    columns: &[FieldRef],
) -> std::result::Result<Vec<RecordValues>, String> {
    let reader = std::panic::catch_unwind(|| {
        apache_avro::util::max_allocation_bytes(MAX_ALLOCATION);
        apache_avro::Reader::new(bytes)
    })
    .map_err(|_| "unreadable Avro file".to_string())?
    .map_err(|e| format!("unreadable Avro file: {e}"))?;
    let fields = RecordFields::new(reader.writer_schema(), columns)?;
    let mut rows = Vec::new();
    let mut reader = reader;
    loop {
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.next()));
        match next {
            Ok(None) => break,
            Ok(Some(Ok(value))) => rows.push(fields.values(value)),
            Ok(Some(Err(e))) => {
                rows.push(Err(format!("malformed Avro block: {e}")));
                break;
            }
            Err(_) => {
                rows.push(Err("malformed Avro block".into()));
                break;
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::Field;

    const SCHEMA: &str = r#"{"type": "record", "name": "click", "fields": [
        {"name": "user_id", "type": "long"},
        {"name": "url", "type": ["null", "string"]},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
        {"name": "tags", "type": {"type": "array", "items": "string"}}
    ]}"#;

    fn columns() -> Vec<FieldRef> {
        vec![
            Arc::new(Field::new("url", DataType::Utf8, true)),
            Arc::new(Field::new("user_id", DataType::Int64, false)),
            Arc::new(Field::new("price", DataType::Decimal128(12, 2), false)),
            Arc::new(Field::new("tags", DataType::Utf8, true)),
            Arc::new(Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
                false,
            )),
        ]
    }

    fn record(user: i64, url: Option<&str>, cents: i64) -> Value {
        Value::Record(vec![
            ("user_id".into(), Value::Long(user)),
            (
                "url".into(),
                match url {
                    Some(u) => Value::Union(1, Box::new(Value::String(u.into()))),
                    None => Value::Union(0, Box::new(Value::Null)),
                },
            ),
            ("ts".into(), Value::TimestampMicros(1_700_000_000_000_000)),
            (
                "price".into(),
                Value::Decimal(apache_avro::Decimal::from(cents.to_be_bytes())),
            ),
            (
                "tags".into(),
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
        ])
    }

    fn options(extra: &[(&str, &str)]) -> ConnectorOptions {
        let mut values: std::collections::BTreeMap<String, String> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        values.insert(SCHEMA_KEY.into(), SCHEMA.into());
        ConnectorOptions { values }
    }

    #[test]
    fn a_datum_decodes_to_the_columns_by_name() {
        let codec = AvroCodec::from_options(&options(&[]), &columns())
            .expect("codec")
            .expect("a schema");
        let schema = parse_schema(SCHEMA).expect("schema");
        let datum =
            apache_avro::to_avro_datum(&schema, record(7, Some("/a"), -1234)).expect("encode");
        let values = codec.decode(&datum).expect("decodes");
        assert_eq!(
            values,
            vec![
                Some(ScalarValue::Utf8(Some("/a".into()))),
                Some(ScalarValue::Int64(Some(7))),
                Some(ScalarValue::Decimal128(Some(-1234), 10, 2)),
                Some(ScalarValue::Utf8(Some(r#"["a","b"]"#.into()))),
                Some(ScalarValue::TimestampMicrosecond(
                    Some(1_700_000_000_000_000),
                    Some("+00:00".into())
                )),
            ]
        );
        let null_url = codec
            .decode(&apache_avro::to_avro_datum(&schema, record(8, None, 5)).expect("encode"))
            .expect("decodes");
        assert_eq!(null_url[0], None);

        // Truncated, padded and foreign bytes are refused with the reason.
        let cut = codec
            .decode(&datum[..datum.len() - 3])
            .expect_err("truncated");
        assert!(cut.starts_with("malformed Avro"), "{cut}");
        let mut padded = datum.clone();
        padded.push(0);
        assert_eq!(
            codec.decode(&padded).expect_err("padded"),
            "malformed Avro: 1 bytes after the record"
        );
        assert!(codec.decode(b"{\"user_id\": 1}").is_err());
    }

    #[test]
    fn the_confluent_header_is_required_when_asked_for() {
        let codec =
            AvroCodec::from_options(&options(&[("avro.wire_format", "confluent")]), &columns())
                .expect("codec")
                .expect("a schema");
        let schema = parse_schema(SCHEMA).expect("schema");
        let datum = apache_avro::to_avro_datum(&schema, record(7, None, 1)).expect("encode");
        let mut framed = vec![0, 0, 0, 0, 42];
        framed.extend_from_slice(&datum);
        assert_eq!(
            codec.decode(&framed).expect("decodes")[1],
            Some(ScalarValue::Int64(Some(7)))
        );
        assert!(
            codec
                .decode(&datum)
                .expect_err("no header")
                .contains("Confluent")
        );
    }

    #[test]
    fn columns_are_checked_against_the_schema() {
        let missing = vec![Arc::new(Field::new("referrer", DataType::Utf8, true)) as FieldRef];
        let err = AvroCodec::from_options(&options(&[]), &missing).expect_err("no such field");
        assert!(
            err.to_string().contains("\"referrer\" is not a field"),
            "{err}"
        );
        let wrong = vec![Arc::new(Field::new("tags", DataType::Date32, true)) as FieldRef];
        let err = AvroCodec::from_options(&options(&[]), &wrong).expect_err("array into date");
        assert!(err.to_string().contains("\"tags\" of type Date32"), "{err}");
        let mut bad = options(&[]);
        bad.values
            .insert(SCHEMA_KEY.into(), "{\"type\": \"nope\"}".into());
        assert!(AvroCodec::from_options(&bad, &columns()).is_err());
    }

    #[test]
    fn columns_derive_from_a_record_schema() {
        let schema = parse_schema(SCHEMA).expect("schema");
        assert_eq!(
            column_definitions(&schema).expect("columns"),
            vec![
                "\"user_id\" BIGINT NOT NULL",
                "\"url\" TEXT",
                "\"ts\" TIMESTAMPTZ NOT NULL",
                "\"price\" NUMERIC(10, 2) NOT NULL",
                "\"tags\" TEXT NOT NULL",
            ]
        );
    }

    #[test]
    fn container_files_decode_record_by_record() {
        let schema = parse_schema(SCHEMA).expect("schema");
        let mut writer = apache_avro::Writer::new(&schema, Vec::new());
        for i in 0..3 {
            writer
                .append(record(i, Some("/f"), i * 100))
                .expect("append");
        }
        let bytes = writer.into_inner().expect("flush");
        let rows = container_records(&bytes, &columns()).expect("readable");
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[2].as_ref().expect("good")[2],
            Some(ScalarValue::Decimal128(Some(200), 10, 2))
        );
        assert!(container_records(b"not avro", &columns()).is_err());
        let cut = container_records(&bytes[..bytes.len() - 20], &columns()).expect("header reads");
        assert!(cut.last().expect("a row").is_err());
    }
}
