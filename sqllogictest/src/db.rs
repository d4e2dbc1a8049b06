//! The sqllogictest `AsyncDB` over tokio-postgres's simple-query protocol, formatting values
//! as the sqllogictest `postgres` engine does (NULL, `(empty)`, PostgreSQL text output).

use async_trait::async_trait;
use sqllogictest::{DBOutput, DefaultColumnType};
use tokio_postgres::{Client, SimpleQueryMessage};

/// A client error whose text carries the SQLSTATE and the server's message, so that
/// `statement error <regex>` can match either.
#[derive(Debug)]
pub struct DbError(pub tokio_postgres::Error);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => write!(f, "{}: {}", db.code().code(), db.message()),
            None => write!(f, "{}", self.0),
        }
    }
}

impl std::error::Error for DbError {}

/// One connection to a Millrace database.
pub struct MillraceDb {
    /// The client.
    client: Client,
}

impl MillraceDb {
    /// Wraps a connected client.
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl sqllogictest::AsyncDB for MillraceDb {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        let mut rows = Vec::new();
        let mut count = 0;
        for message in self.client.simple_query(sql).await.map_err(DbError)? {
            match message {
                SimpleQueryMessage::Row(row) => {
                    let values = (0..row.len())
                        .map(|i| match row.get(i) {
                            Some("") => "(empty)".to_string(),
                            Some(v) => v.to_string(),
                            None => "NULL".to_string(),
                        })
                        .collect();
                    rows.push(values);
                }
                SimpleQueryMessage::CommandComplete(n) => {
                    count = n;
                    break;
                }
                _ => {}
            }
        }
        if rows.is_empty() {
            Ok(DBOutput::StatementComplete(count))
        } else {
            let width = rows.first().map(|r: &Vec<String>| r.len()).unwrap_or(0);
            Ok(DBOutput::Rows {
                types: vec![DefaultColumnType::Any; width],
                rows,
            })
        }
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "postgres"
    }

    fn error_sql_state(err: &Self::Error) -> Option<String> {
        err.0.code().map(|s| s.code().to_owned())
    }
}
