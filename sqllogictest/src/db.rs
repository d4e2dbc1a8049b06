//! The sqllogictest `AsyncDB` over tokio-postgres's simple-query protocol, formatting values
//! as the sqllogictest `postgres` engine does (NULL, `(empty)`, PostgreSQL text output).

use async_trait::async_trait;
use sqllogictest::{DBOutput, DefaultColumnType};
use tokio_postgres::{Client, SimpleQueryMessage};

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
    type Error = tokio_postgres::Error;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        let mut rows = Vec::new();
        let mut count = 0;
        for message in self.client.simple_query(sql).await? {
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
        err.code().map(|s| s.code().to_owned())
    }
}
