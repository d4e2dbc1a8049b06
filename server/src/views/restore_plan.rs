//! Which views restore from the last checkpoint on start, and reading what a checkpoint
//! holds for a view: its operators' state and its contents, a piece at a time.

use std::collections::HashSet;

use millrace_planner::pipeline::RestoreEntries;
use millrace_storage::Store;
use millrace_storage::db::keys::CONTENTS_OP;
use tracing::info;

use crate::coordinator::manifest::Manifest;
use crate::error::{Result, ServerError};

/// Which views restore from the last checkpoint on start, decided as the catalog replays.
#[derive(Debug, Default)]
pub struct RestorePlan {
    pub manifest: Option<Manifest>,
    /// Tables whose logs no longer hold every entry since the checkpoint.
    pub rebased_tables: HashSet<u64>,
    /// Views restored so far (an upstream view must be among them).
    pub restored: HashSet<u64>,
}

impl RestorePlan {
    /// The plan for the last committed manifest.
    pub fn load(store: &Store) -> Result<Self> {
        let manifest = Manifest::load(store)?;
        if let Some(m) = &manifest {
            info!(
                epoch = m.epoch,
                log_seq = m.log_seq,
                views = m.views.len(),
                "last checkpoint"
            );
        }
        Ok(Self {
            manifest,
            ..Self::default()
        })
    }

    /// Notes a table whose log was rewritten after the checkpoint.
    pub fn check_table(&mut self, store: &Store, table_id: u64) -> Result<()> {
        if let Some(m) = &self.manifest
            && store
                .log_rebased_at(table_id)?
                .is_some_and(|s| s >= m.log_seq)
        {
            self.rebased_tables.insert(table_id);
        }
        Ok(())
    }

    /// Whether a view reading `sources` with `workers` partitions and plan fingerprint
    /// `layout` can restore its state.
    pub fn can_restore(
        &self,
        view_id: u64,
        sources: &[u64],
        (workers, layout): (usize, u64),
        is_view: impl Fn(u64) -> bool,
    ) -> bool {
        let Some(m) = &self.manifest else {
            return false;
        };
        m.views.get(&view_id) == Some(&workers)
            && m.layouts.get(&view_id).is_none_or(|l| *l == layout)
            && sources.iter().all(|id| {
                if is_view(*id) {
                    self.restored.contains(id)
                } else {
                    !self.rebased_tables.contains(id)
                }
            })
    }
}

/// A view's checkpointed contents: encoded rows with their number of copies.
pub type ContentsRows = Vec<(Vec<u8>, i64)>;

/// The checkpointed state of operators `ops` of a view (those restored up front).
pub fn load_op_state(store: &Store, view_id: u64, ops: &[u32]) -> Result<RestoreEntries> {
    let mut state = RestoreEntries::new();
    for &op in ops {
        for (partition, key, value) in store.view_state_op(view_id, op)? {
            state.entry((op, partition)).or_default().push((key, value));
        }
    }
    Ok(state)
}

/// Calls `f` with a view's checkpointed contents rows, `piece` rows at a time, so that a
/// restore holds one piece besides what it has loaded (and can evict between pieces).
pub fn for_each_contents_piece(
    store: &Store,
    view_id: u64,
    piece: usize,
    mut f: impl FnMut(ContentsRows) -> Result<()>,
) -> Result<()> {
    let op = Manifest::load(store)?.map_or(CONTENTS_OP, |m| m.contents_op(view_id));
    let mut rows = Vec::with_capacity(piece);
    store.for_each_view_state_op(view_id, op, |_, key, value| {
        let n = value
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(i64::from_le_bytes)
            .ok_or_else(|| ServerError::Internal("corrupt checkpointed row count".into()))?;
        rows.push((key.to_vec(), n));
        if rows.len() >= piece {
            f(std::mem::replace(&mut rows, Vec::with_capacity(piece)))?;
        }
        Ok::<(), ServerError>(())
    })?;
    if !rows.is_empty() {
        f(rows)?;
    }
    Ok(())
}
