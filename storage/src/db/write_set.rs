//! What a statement writes: a [`WriteSet`] of durable changes, built by the layers above and
//! committed by the store (`db.rs`) as one synced RocksDB write.

use crate::catalog_record::CatalogRecord;
use crate::log_entry::LogEntry;

/// One change to durable state, part of a [`WriteSet`].
#[derive(Debug, Clone)]
pub(crate) enum WriteOp {
    PutCatalog(CatalogRecord),
    DeleteCatalog(u64),
    Append {
        table_id: u64,
        entry: LogEntry,
    },
    DropLog(u64),
    PutOffset {
        source_id: u64,
        value: Vec<u8>,
    },
    DeleteOffset(u64),
    PutSinkRow {
        sink_id: u64,
        row: Vec<u8>,
        count: i64,
    },
    DropSinkRows(u64),
    PutBadRecord {
        seq: u64,
        value: Vec<u8>,
    },
    DeleteBadRecord(u64),
    PutViewState {
        view_id: u64,
        op: u32,
        partition: u32,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
    DropViewState(u64),
    DropViewStateExcept(u64, u32),
    DropViewStateOp(u64, u32),
    KeepViewSpills(u64),
    PutMeta {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    DeleteMeta(Vec<u8>),
}

/// All durable changes of one statement or transaction; committed atomically.
#[derive(Debug, Clone, Default)]
pub struct WriteSet {
    /// The changes, applied in order.
    pub(crate) ops: Vec<WriteOp>,
}

impl WriteSet {
    /// An empty write set.
    pub fn new() -> Self {
        Self::default()
    }
    /// Records how far a source has read, committed with the rows it produced.
    pub fn put_source_offset(&mut self, source_id: u64, offset: u64) {
        self.put_source_state(source_id, offset.to_be_bytes().to_vec());
    }
    /// Records a source's position in a connector-defined encoding (files read, ...).
    pub fn put_source_state(&mut self, source_id: u64, value: Vec<u8>) {
        self.ops.push(WriteOp::PutOffset { source_id, value });
    }
    /// Forgets a dropped source's offset.
    pub fn delete_source_offset(&mut self, source_id: u64) {
        self.ops.push(WriteOp::DeleteOffset(source_id));
    }
    /// Sets how many copies of an encoded row a sink has delivered (0 forgets the row).
    pub fn put_sink_row(&mut self, sink_id: u64, row: Vec<u8>, count: i64) {
        self.ops.push(WriteOp::PutSinkRow {
            sink_id,
            row,
            count,
        });
    }
    /// Forgets every row a dropped sink delivered.
    pub fn drop_sink_rows(&mut self, sink_id: u64) {
        self.ops.push(WriteOp::DropSinkRows(sink_id));
    }
    /// Keeps a source's bad record (number `seq`, encoded by the caller) with the commit of
    /// the rows read beside it.
    pub fn put_bad_record(&mut self, seq: u64, value: Vec<u8>) {
        self.ops.push(WriteOp::PutBadRecord { seq, value });
    }
    /// Forgets bad record `seq` (evicted).
    pub fn delete_bad_record(&mut self, seq: u64) {
        self.ops.push(WriteOp::DeleteBadRecord(seq));
    }
    /// Stores (or replaces) a catalog record.
    pub fn put_catalog(&mut self, record: CatalogRecord) {
        self.ops.push(WriteOp::PutCatalog(record));
    }
    /// Removes a catalog record.
    pub fn delete_catalog(&mut self, id: u64) {
        self.ops.push(WriteOp::DeleteCatalog(id));
    }
    /// Appends an entry to a table's log.
    pub fn append(&mut self, table_id: u64, entry: LogEntry) {
        self.ops.push(WriteOp::Append { table_id, entry });
    }
    /// Removes a table's whole log (DROP TABLE, or before rewriting it).
    pub fn drop_log(&mut self, table_id: u64) {
        self.ops.push(WriteOp::DropLog(table_id));
    }
    /// Appends every change of `other` after this set's changes.
    /// Sets (or with `None` removes) one checkpointed state entry of a view.
    pub fn put_view_state(
        &mut self,
        view_id: u64,
        op: u32,
        partition: u32,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) {
        self.ops.push(WriteOp::PutViewState {
            view_id,
            op,
            partition,
            key,
            value,
        });
    }

    /// Removes every checkpointed state entry of a view (and its undo records).
    pub fn drop_view_state(&mut self, view_id: u64) {
        self.ops.push(WriteOp::DropViewState(view_id));
    }

    /// Makes the state a view evicted since its last checkpoint part of this commit (a
    /// checkpoint that includes the view): its undo records go (see `state_recovery.rs`).
    pub fn keep_view_spills(&mut self, view_id: u64) {
        self.ops.push(WriteOp::KeepViewSpills(view_id));
    }

    /// Deletes the checkpointed state of one operator of a view (or of its contents).
    pub fn drop_view_state_op(&mut self, view_id: u64, op: u32) {
        self.ops.push(WriteOp::DropViewStateOp(view_id, op));
    }

    /// Drops a view's state (and undo records) but that of operator `keep` (contents a
    /// checkpoint wrote ahead of its commit).
    pub fn drop_view_state_except(&mut self, view_id: u64, keep: u32) {
        self.ops.push(WriteOp::DropViewStateExcept(view_id, keep));
    }

    /// Sets a metadata value (e.g. the checkpoint manifest).
    pub fn put_meta(&mut self, key: &[u8], value: Vec<u8>) {
        self.ops.push(WriteOp::PutMeta {
            key: key.to_vec(),
            value,
        });
    }

    /// Removes a metadata value.
    pub fn delete_meta(&mut self, key: &[u8]) {
        self.ops.push(WriteOp::DeleteMeta(key.to_vec()));
    }

    /// Appends another set's changes after these.
    pub fn extend(&mut self, other: WriteSet) {
        self.ops.extend(other.ops);
    }
    /// True when the set holds no change.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}
