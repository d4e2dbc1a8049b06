//! Reading a sink's output back: JSON lines (`{"op", "seq", "index", "row"}`) replayed
//! into a multiset of rows, to compare with the view the sink follows.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio_postgres::Client;

use crate::rows::rows;

/// Rows (as text, NULL as "NULL") with their multiplicity.
pub type Multiset = BTreeMap<Vec<String>, i64>;

/// Applies one JSON line of a sink (the row's `columns` in order) to `state`; returns its
/// (seq, index).
pub fn apply_line(state: &mut Multiset, line: &str, columns: &[&str]) -> (u64, u64) {
    let value: serde_json::Value = serde_json::from_str(line).expect("sink line is JSON");
    let row: Vec<String> = columns
        .iter()
        .map(|c| match &value["row"][c] {
            serde_json::Value::Null => "NULL".to_string(),
            v => v.to_string(),
        })
        .collect();
    let count = state.entry(row.clone()).or_default();
    match value["op"].as_str() {
        Some("insert") => *count += 1,
        Some("delete") => *count -= 1,
        other => panic!("bad op {other:?} in {line}"),
    }
    assert!(*count >= 0, "sink deleted a row it never inserted: {line}");
    if *count == 0 {
        state.remove(&row);
    }
    (
        value["seq"].as_u64().expect("seq"),
        value["index"].as_u64().expect("index"),
    )
}

/// Replays a file sink's directory: files in order, numbered 1..n without a gap.
pub fn replay_files(dir: &Path, columns: &[&str]) -> (Multiset, u64) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("sink dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    let mut state = Multiset::new();
    for (i, name) in names.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(name, &format!("{seq:020}.jsonl"), "files are numbered 1..n");
        let text = std::fs::read_to_string(dir.join(name)).expect("read");
        for (index, line) in text.lines().enumerate() {
            assert_eq!(
                apply_line(&mut state, line, columns),
                (seq, index as u64),
                "{name}"
            );
        }
    }
    (state, names.len() as u64)
}

/// The view's contents as a multiset.
pub async fn view_state(client: &Client, sql: &str) -> Multiset {
    let mut state = Multiset::new();
    for row in rows(client, sql).await {
        let row: Vec<String> = row
            .into_iter()
            .map(|v| v.unwrap_or_else(|| "NULL".into()))
            .collect();
        *state.entry(row).or_default() += 1;
    }
    state
}

/// Waits until the sink has delivered everything it numbered and is running.
pub async fn wait_delivered(client: &Client, sink: &str) {
    for _ in 0..600 {
        let r = rows(
            client,
            &format!(
                "SELECT status, seq = delivered_seq FROM millrace_sinks WHERE name = '{sink}'"
            ),
        )
        .await;
        if r == vec![vec![Some("running".to_string()), Some("t".to_string())]] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "sink {sink} did not settle: {:?}",
        rows(client, "SELECT * FROM millrace_sinks").await
    );
}

/// Waits until the sink's delivered history (read back with `read_back`) replays to exactly
/// `view`: the sink may still be working through the last epochs, but it must get there.
pub async fn assert_replays_to<F>(client: &Client, view: &Multiset, read_back: F)
where
    F: Fn() -> Multiset,
{
    let mut delivered = read_back();
    for _ in 0..100 {
        if &delivered == view {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        delivered = read_back();
    }
    assert_eq!(
        &delivered,
        view,
        "the sink's history replays to exactly the view; sink: {:?}",
        rows(client, "SELECT * FROM millrace_sinks").await
    );
}
