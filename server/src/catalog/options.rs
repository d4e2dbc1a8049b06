//! The `WITH (...)` options of connector-fed tables, sources and sinks: decoded from the
//! statement, and from a stored record when the server starts them again.

use std::collections::BTreeMap;

use datafusion::sql::sqlparser::ast::{CreateTableOptions, Expr, SqlOption, Statement, Value};
use millrace_storage::CatalogRecord;

use crate::error::{Result, ServerError};
use crate::sql::Parsed;

/// The rate limit of a source that has none.
pub const UNLIMITED: u64 = u64::MAX;

/// A connector's `WITH` options, keys lower-cased.
#[derive(Debug, Clone, Default)]
pub struct ConnectorOptions {
    /// Option values by key.
    pub values: BTreeMap<String, String>,
}

impl ConnectorOptions {
    /// The options of a CREATE TABLE, or `None` when it names no connector.
    pub fn from_table(options: &CreateTableOptions) -> Result<Option<Self>> {
        let CreateTableOptions::With(list) = options else {
            return Ok(None);
        };
        Self::from_options(list).map(Some)
    }

    /// Options from a `WITH (...)` list, which must name a connector.
    pub fn from_options(list: &[SqlOption]) -> Result<Self> {
        let mut values = BTreeMap::new();
        for option in list {
            let SqlOption::KeyValue { key, value } = option else {
                return Err(ServerError::NotSupported(format!("option {option}")));
            };
            let text = match value {
                Expr::Value(v) => match &v.value {
                    Value::SingleQuotedString(s) => s.clone(),
                    Value::Number(n, _) => n.clone(),
                    Value::Boolean(b) => b.to_string(),
                    other => other.to_string(),
                },
                Expr::Identifier(ident) => ident.value.clone(),
                other => other.to_string(),
            };
            values.insert(key.value.to_ascii_lowercase(), text);
        }
        if !values.contains_key("connector") {
            return Err(ServerError::NotSupported(
                "options without connector = '...'".into(),
            ));
        }
        Ok(Self { values })
    }

    /// The connector's name.
    pub fn connector(&self) -> &str {
        self.values.get("connector").map_or("", |s| s.as_str())
    }

    /// The value of the first of `keys` given; an error naming `keys[0]` when none is.
    pub fn required(&self, keys: &[&str]) -> Result<String> {
        keys.iter()
            .find_map(|k| self.values.get(*k))
            .cloned()
            .ok_or_else(|| ServerError::InvalidSetting {
                name: keys.first().copied().unwrap_or_default().into(),
                value: String::new(),
            })
    }

    /// An optional numeric option.
    pub fn number(&self, key: &str) -> Result<Option<u64>> {
        self.values
            .get(key)
            .map(|v| {
                v.trim().parse().map_err(|_| ServerError::InvalidSetting {
                    name: key.into(),
                    value: v.clone(),
                })
            })
            .transpose()
    }

    /// Rows per second (`rows_per_second`, `max_rows_per_second` or RisingWave's
    /// `datagen.rows.per.second`); default 1000 for generators, [`UNLIMITED`] for readers.
    pub fn rate(&self) -> Result<u64> {
        for key in [
            "max_rows_per_second",
            "rows_per_second",
            "datagen.rows.per.second",
        ] {
            if let Some(n) = self.number(key)? {
                return Ok(n.max(1));
            }
        }
        Ok(match self.connector() {
            "kafka" | "file" => UNLIMITED,
            _ => 1000,
        })
    }

    /// Total rows to produce (`total_rows`, `nexmark.event.num`); `None` for unbounded.
    pub fn total(&self) -> Result<Option<u64>> {
        for key in ["total_rows", "nexmark.event.num"] {
            if let Some(n) = self.number(key)? {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }
}

/// The connector options of a stored CREATE TABLE, if it names a connector.
pub fn connector_options(sql: &str) -> Result<Option<ConnectorOptions>> {
    match crate::sql::parse_one(sql)? {
        Statement::CreateTable(create) => ConnectorOptions::from_table(&create.table_options),
        _ => Ok(None),
    }
}

/// The connector options of a stored sink.
pub fn stored_options(record: &CatalogRecord) -> Result<ConnectorOptions> {
    match crate::sql::parse(&record.sql)?.pop() {
        Some(Parsed::CreateSink(create)) => ConnectorOptions::from_options(&create.options),
        _ => Err(ServerError::Internal(format!(
            "stored sink {} is not a CREATE SINK",
            record.name
        ))),
    }
}
