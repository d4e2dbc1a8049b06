//! The state of a `COPY ... FROM STDIN` in progress on a session: the target table, the
//! data layout, the bytes received and not parsed yet, and the rows parsed so far, held in
//! memory or staged in cold files (parsed, staged and committed by `exec/copy_from.rs`).

use std::sync::Arc;

use millrace_planner::MillraceTable;

use crate::memory::staging::Staging;

/// How COPY data is laid out.
#[derive(Debug, Clone)]
pub struct CopyFormat {
    /// CSV (true) or PostgreSQL text format (false).
    pub csv: bool,
    /// Field separator.
    pub delimiter: char,
    /// The text that means NULL.
    pub null: String,
    /// Whether the first line is a header to skip or write.
    pub header: bool,
    /// CSV quote character.
    pub quote: char,
    /// CSV escape character.
    pub escape: char,
}

/// A COPY FROM STDIN in progress.
#[derive(Debug)]
pub struct CopyIn {
    /// Target table.
    pub table: Arc<MillraceTable>,
    /// Its name, for messages.
    pub table_name: String,
    /// Table column index of each field in a line.
    pub columns: Vec<usize>,
    /// Data layout.
    pub format: CopyFormat,
    /// Data received and not parsed yet (at most a part and the record it ends in).
    pub pending: Vec<u8>,
    /// Records (lines) parsed so far, the header included: numbers lines in messages.
    pub lines: usize,
    /// Whether the end-of-data marker (`\.`) was read; data after it is ignored.
    pub ended: bool,
    /// The rows parsed so far, held or staged.
    pub rows: Staging,
}

impl CopyFormat {
    /// PostgreSQL's default text format: tab-separated, `\N` for NULL, no header.
    pub fn text() -> Self {
        CopyFormat {
            csv: false,
            delimiter: '\t',
            null: "\\N".into(),
            header: false,
            quote: '"',
            escape: '"',
        }
    }
}
