//! Entries of a table's durable log: inserted rows with their row ids, deleted row ids, or a
//! cold file holding rows (written by a log rewrite instead of the rows it holds).
//!
//! An entry is a tag byte followed by an Arrow IPC stream (a stable, self-describing format),
//! so replaying the log on start yields Arrow batches with no per-row decoding.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;

use crate::error::{Result, StorageError};

/// Name of the hidden row-id column inside encoded insert entries.
const ROW_ID_COLUMN: &str = "__millrace_rowid";
const TAG_INSERT: u8 = b'I';
const TAG_DELETE: u8 = b'D';
const TAG_COLD: u8 = b'C';
/// Name of the liveness column of encoded cold entries.
const LIVE_COLUMN: &str = "__millrace_live";
/// Schema metadata key of a cold entry's file path.
const COLD_FILE_KEY: &str = "millrace.cold_file";

/// One change to a table, as written to its log.
#[derive(Debug, Clone)]
pub enum LogEntry {
    /// Rows added to the table; `row_ids[i]` names row `i` of `batch`.
    Insert {
        /// Row ids of the inserted rows, one per row of `batch`.
        row_ids: UInt64Array,
        /// The rows, in the table's schema at the time of the write.
        batch: RecordBatch,
    },
    /// Rows removed from the table.
    Delete {
        /// Row ids of the removed rows.
        row_ids: UInt64Array,
    },
    /// The rows of a cold file (see `cold.rs`), in the table's current schema: what a log
    /// rewrite writes for an evicted chunk instead of reading its rows back.
    Cold {
        /// The file's path in the object store.
        path: String,
        /// Row ids of every row in the file, in file order.
        row_ids: UInt64Array,
        /// Which of the file's rows are live (the others were deleted before the rewrite).
        live: BooleanArray,
    },
}

impl LogEntry {
    /// Encodes the entry as a tag byte plus an Arrow IPC stream.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let (tag, batch) = match self {
            LogEntry::Insert { row_ids, batch } => {
                let mut fields = vec![Arc::new(Field::new(ROW_ID_COLUMN, DataType::UInt64, false))];
                fields.extend(batch.schema().fields().iter().cloned());
                let mut columns: Vec<ArrayRef> = vec![Arc::new(row_ids.clone())];
                columns.extend(batch.columns().iter().cloned());
                let schema = Arc::new(Schema::new(fields));
                (TAG_INSERT, RecordBatch::try_new(schema, columns)?)
            }
            LogEntry::Delete { row_ids } => {
                let schema = Arc::new(Schema::new(vec![Field::new(
                    ROW_ID_COLUMN,
                    DataType::UInt64,
                    false,
                )]));
                let columns: Vec<ArrayRef> = vec![Arc::new(row_ids.clone())];
                (TAG_DELETE, RecordBatch::try_new(schema, columns)?)
            }
            LogEntry::Cold {
                path,
                row_ids,
                live,
            } => {
                let schema = Schema::new(vec![
                    Field::new(ROW_ID_COLUMN, DataType::UInt64, false),
                    Field::new(LIVE_COLUMN, DataType::Boolean, false),
                ])
                .with_metadata([(COLD_FILE_KEY.to_string(), path.clone())].into());
                let columns: Vec<ArrayRef> =
                    vec![Arc::new(row_ids.clone()), Arc::new(live.clone())];
                (TAG_COLD, RecordBatch::try_new(Arc::new(schema), columns)?)
            }
        };
        let mut out = vec![tag];
        {
            let mut writer = StreamWriter::try_new(&mut out, &batch.schema())?;
            writer.write(&batch)?;
            writer.finish()?;
        }
        Ok(out)
    }

    /// Decodes an entry written by [`LogEntry::encode`].
    pub fn decode(bytes: &[u8]) -> Result<LogEntry> {
        let Some((&tag, body)) = bytes.split_first() else {
            return Err(corrupt("empty log entry"));
        };
        let reader = StreamReader::try_new(Cursor::new(body), None)?;
        let mut batches = Vec::new();
        for batch in reader {
            batches.push(batch?);
        }
        let schema = match batches.first() {
            Some(b) => b.schema(),
            None => return Err(corrupt("log entry without a batch")),
        };
        let batch = arrow::compute::concat_batches(&schema, &batches)?;
        let row_ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or_else(|| corrupt("row id column is not UInt64"))?
            .clone();
        match tag {
            TAG_INSERT => {
                let data = batch.project(&(1..batch.num_columns()).collect::<Vec<_>>())?;
                Ok(LogEntry::Insert {
                    row_ids,
                    batch: data,
                })
            }
            TAG_DELETE => Ok(LogEntry::Delete { row_ids }),
            TAG_COLD => {
                let path = schema
                    .metadata()
                    .get(COLD_FILE_KEY)
                    .ok_or_else(|| corrupt("cold entry without a file"))?
                    .clone();
                let live = batch
                    .columns()
                    .get(1)
                    .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
                    .filter(|l| l.null_count() == 0)
                    .ok_or_else(|| corrupt("cold entry without liveness"))?
                    .clone();
                Ok(LogEntry::Cold {
                    path,
                    row_ids,
                    live,
                })
            }
            other => Err(corrupt(&format!("unknown log entry tag {other}"))),
        }
    }

    /// Bytes the entry's arrays take in memory.
    pub fn memory_bytes(&self) -> usize {
        match self {
            LogEntry::Insert { row_ids, batch } => {
                row_ids.get_array_memory_size() + batch.get_array_memory_size()
            }
            LogEntry::Delete { row_ids } => row_ids.get_array_memory_size(),
            LogEntry::Cold { row_ids, live, .. } => {
                row_ids.get_array_memory_size() + live.get_array_memory_size()
            }
        }
    }

    /// Number of rows the entry touches.
    pub fn num_rows(&self) -> usize {
        match self {
            LogEntry::Insert { row_ids, .. }
            | LogEntry::Delete { row_ids }
            | LogEntry::Cold { row_ids, .. } => row_ids.len(),
        }
    }
}

fn corrupt(detail: &str) -> StorageError {
    StorageError::Corrupt {
        what: "table log entry",
        detail: detail.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, StringArray};

    #[test]
    fn insert_and_delete_round_trip() -> Result<()> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int32, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int32Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![Some("a"), None])),
            ],
        )?;
        let entry = LogEntry::Insert {
            row_ids: UInt64Array::from(vec![7, 8]),
            batch: batch.clone(),
        };
        match LogEntry::decode(&entry.encode()?)? {
            LogEntry::Insert { row_ids, batch: b } => {
                assert_eq!(row_ids.values().to_vec(), vec![7, 8]);
                assert_eq!(b, batch);
            }
            other => panic!("expected insert, got {other:?}"),
        }
        let del = LogEntry::Delete {
            row_ids: UInt64Array::from(vec![8]),
        };
        match LogEntry::decode(&del.encode()?)? {
            LogEntry::Delete { row_ids } => assert_eq!(row_ids.values().to_vec(), vec![8]),
            other => panic!("expected delete, got {other:?}"),
        }
        let cold = LogEntry::Cold {
            path: "cache/t3/x-00000001.parquet".into(),
            row_ids: UInt64Array::from(vec![10, 11, 12]),
            live: BooleanArray::from(vec![true, false, true]),
        };
        match LogEntry::decode(&cold.encode()?)? {
            LogEntry::Cold {
                path,
                row_ids,
                live,
            } => {
                assert_eq!(path, "cache/t3/x-00000001.parquet");
                assert_eq!(row_ids.values().to_vec(), vec![10, 11, 12]);
                assert_eq!(live, BooleanArray::from(vec![true, false, true]));
            }
            other => panic!("expected a cold entry, got {other:?}"),
        }
        assert!(LogEntry::decode(b"Xgarbage").is_err());
        assert!(LogEntry::decode(b"").is_err());
        Ok(())
    }
}
