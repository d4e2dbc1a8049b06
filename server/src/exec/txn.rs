//! Transaction blocks: BEGIN stages writes, COMMIT applies them atomically, ROLLBACK drops
//! them. Statements outside a block commit on their own.

use millrace_storage::WriteSet;

use crate::engine::TableChange;
use crate::error::{Result, ServerError};
use crate::exec::output::Output;
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
        session.write_epoch = session.engine.views.committed_epoch();
    }
    Ok(Output::TransactionEnd("COMMIT".into()))
}

/// ROLLBACK / ABORT.
pub fn rollback(session: &mut Session) -> Result<Output> {
    session.txn = None;
    Ok(Output::TransactionEnd("ROLLBACK".into()))
}

/// SAVEPOINT: remembers how much of the block is staged.
pub fn savepoint(session: &mut Session, name: &str) -> Result<Output> {
    let txn = session
        .txn
        .as_mut()
        .ok_or(ServerError::NoTransaction("SAVEPOINT"))?;
    let mark = (name.to_string(), txn.changes.len(), txn.written.clone());
    txn.savepoints.push(mark);
    Ok(Output::command("SAVEPOINT"))
}

/// RELEASE SAVEPOINT: forgets the savepoint (and those set after it), keeping the writes.
pub fn release(session: &mut Session, name: &str) -> Result<Output> {
    let txn = session
        .txn
        .as_mut()
        .ok_or(ServerError::NoTransaction("RELEASE SAVEPOINT"))?;
    let pos = find_savepoint(txn, name)?;
    txn.savepoints.truncate(pos);
    Ok(Output::command("RELEASE"))
}

/// ROLLBACK TO SAVEPOINT: drops the writes staged since it and clears a failure.
pub fn rollback_to(session: &mut Session, name: &str) -> Result<Output> {
    let txn = session
        .txn
        .as_mut()
        .ok_or(ServerError::NoTransaction("ROLLBACK TO SAVEPOINT"))?;
    let pos = find_savepoint(txn, name)?;
    let (_, changes, written) = txn.savepoints[pos].clone();
    txn.changes.truncate(changes);
    txn.written = written;
    txn.savepoints.truncate(pos + 1);
    txn.failed = false;
    Ok(Output::command("ROLLBACK"))
}

fn find_savepoint(txn: &Transaction, name: &str) -> Result<usize> {
    txn.savepoints
        .iter()
        .rposition(|(n, _, _)| n == name)
        .ok_or_else(|| ServerError::UnknownSavepoint(name.to_string()))
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
            session.write_epoch = session.engine.views.committed_epoch();
            Ok(())
        }
    }
}
