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
    /// Where the last whole record of `pending` ends.
    pub scan: RecordScan,
    /// Records (lines) parsed so far, the header included: numbers lines in messages.
    pub lines: usize,
    /// Whether the end-of-data marker (`\.`) was read; data after it is ignored.
    pub ended: bool,
    /// The rows parsed so far, held or staged.
    pub rows: Staging,
}

/// Where the last whole record of the pending data ends, found by scanning each byte once as
/// the data arrives: in CSV a newline inside quotes is part of a field.
#[derive(Debug, Default)]
pub struct RecordScan {
    /// Bytes of the pending data scanned.
    pos: usize,
    /// Whether the scan is inside a quoted CSV field there.
    in_quotes: bool,
    /// The end (after its newline) of the last whole record scanned.
    end: Option<usize>,
}

impl RecordScan {
    /// Scans the bytes of `data` (the pending data) not scanned yet.
    pub(crate) fn advance(&mut self, data: &[u8], format: &CopyFormat) {
        // NOTE: quote and escape are one byte (parse_format checks it).
        let (quote, escape) = (format.quote as u8, format.escape as u8);
        let mut i = self.pos;
        while i < data.len() {
            let b = data[i];
            if format.csv && self.in_quotes {
                if b == escape && escape != quote {
                    match data.get(i + 1) {
                        // An escape as the last byte: decided when more data comes.
                        None => break,
                        Some(&next) if next == quote => {
                            i += 2;
                            continue;
                        }
                        Some(_) => {}
                    }
                }
                // A doubled quote closes and reopens: the same state after both.
                self.in_quotes = b != quote;
            } else if format.csv && b == quote {
                self.in_quotes = true;
            } else if b == b'\n' {
                self.end = Some(i + 1);
            }
            i += 1;
        }
        self.pos = i;
    }

    /// The end of the last whole record, if any; the scan then goes on from there (the data
    /// before it is taken away).
    pub(crate) fn take_end(&mut self) -> Option<usize> {
        let end = self.end.take()?;
        self.pos -= end;
        Some(end)
    }
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
