//! Transaction blocks: BEGIN stages writes, COMMIT applies them atomically, ROLLBACK drops
//! them. Statements outside a block commit on their own.

use millrace_storage::WriteSet;

use crate::engine::TableChange;
use crate::error::Result;
use crate::exec::Output;
use crate::session::{Session, Transaction};

/// BEGIN / START TRANSACTION.
pub fn begin(session: &mut Session) -> Result<Output> {
    if session.txn.is_none() {
        session.txn = Some(Transaction::default());
    }
    Ok(Output::TransactionStart("BEGIN".into()))
}

/// COMMIT / END: applies the staged writes as one durable write; a failed block rolls back.
pub async fn commit(session: &mut Session) -> Result<Output> {
    let Some(txn) = session.txn.take() else {
        return Ok(Output::TransactionEnd("COMMIT".into()));
    };
    if txn.failed {
        return Ok(Output::TransactionEnd("ROLLBACK".into()));
    }
    if !txn.changes.is_empty() {
        let _write = session.engine.write_lock.lock().await;
        session
            .engine
            .commit_changes(txn.changes, WriteSet::new())?;
    }
    Ok(Output::TransactionEnd("COMMIT".into()))
}

/// ROLLBACK / ABORT.
pub fn rollback(session: &mut Session) -> Result<Output> {
    session.txn = None;
    Ok(Output::TransactionEnd("ROLLBACK".into()))
}

/// Commits changes now, or stages them in the open transaction block.
/// The caller holds the engine's write lock.
pub fn apply(session: &mut Session, changes: Vec<TableChange>) -> Result<()> {
    match &mut session.txn {
        Some(txn) => {
            for change in &changes {
                session.engine.validate(change)?;
                txn.written.insert(change.table.id);
            }
            txn.changes.extend(changes);
            Ok(())
        }
        None => {
            session.engine.commit_changes(changes, WriteSet::new())?;
            Ok(())
        }
    }
}
