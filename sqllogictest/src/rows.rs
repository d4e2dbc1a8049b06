//! Query results as a multiset of text rows, for tests that compare answers.

use tokio_postgres::{Client, SimpleQueryMessage};

/// One row, each value as PostgreSQL's text (None for NULL).
pub type TextRow = Vec<Option<String>>;

/// Runs `sql` with the simple protocol and returns its rows as text, sorted (a multiset).
/// The error names the statement and carries the server's message.
pub async fn sorted_rows(client: &Client, sql: &str) -> Result<Vec<TextRow>, String> {
    let messages = client.simple_query(sql).await.map_err(|e| {
        format!(
            "{sql}: {}",
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string())
        )
    })?;
    let mut out = Vec::new();
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            out.push(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            );
        }
    }
    out.sort();
    Ok(out)
}
