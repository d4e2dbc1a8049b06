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
    let mut out = text_rows(messages);
    out.sort();
    Ok(out)
}

/// The rows of a simple-protocol answer, in the order they came, each value as text.
pub fn text_rows(messages: Vec<SimpleQueryMessage>) -> Vec<TextRow> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// [`sorted_rows`] for tests: panics with the statement and the server's message.
pub async fn rows(client: &Client, sql: &str) -> Vec<TextRow> {
    sorted_rows(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `sql` (simple protocol) for tests: panics with the statement and the error.
pub async fn exec(client: &Client, sql: &str) {
    if let Err(e) = client.simple_query(sql).await {
        panic!("{sql}: {e:?}");
    }
}

/// The first value of the first row of `sql` for tests; panics when there is none.
pub async fn one(client: &Client, sql: &str) -> String {
    rows(client, sql)
        .await
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_else(|| panic!("{sql}: no value"))
}

/// The first value of the first row of `sql` as an integer for tests; panics when there is
/// none or it is not one.
pub async fn number(client: &Client, sql: &str) -> i64 {
    let value = one(client, sql).await;
    value
        .parse()
        .unwrap_or_else(|_| panic!("{sql}: {value:?} is not an integer"))
}

/// Polls `sql` until its single value is `want` (for at most a minute); on timeout panics
/// with `what`, the last value and every source's status, for connector tests.
pub async fn wait_for(client: &Client, sql: &str, want: &str, what: &str) {
    for _ in 0..600 {
        if one(client, sql).await == want {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "{what}: `{sql}` never returned {want} (last {}); sources: {:?}",
        one(client, sql).await,
        rows(
            client,
            "SELECT name, status, reason, \"offset\", rows_ingested FROM millrace_sources"
        )
        .await
    );
}

/// The bad records `millrace_source_errors` lists for `source`: (partition or file, offset
/// or line) -> reason.
pub async fn source_errors(
    client: &Client,
    source: &str,
) -> std::collections::BTreeMap<(String, String), String> {
    rows(
        client,
        &format!(
            "SELECT partition, \"offset\", reason FROM millrace_source_errors WHERE source = '{source}'"
        ),
    )
    .await
    .into_iter()
    .map(|r| {
        let text = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        ((text(0), text(1)), text(2))
    })
    .collect()
}
