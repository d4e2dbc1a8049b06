//! Large epochs in bounded steps: [`Pipeline::step_bounded`] pushes an epoch's changes
//! through a view's pipeline a slice of input at a time, sizing the slices by how much state
//! each brings back into memory, and spills the view's change for the epoch to disk once it
//! is far larger than a step (see [`crate::spilled_change`]).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::disk_manager::DiskManager;

use super::Pipeline;
use crate::changelog::Changelog;
use crate::epoch_part::EpochPart;
use crate::error::{PlanError, Result};
use crate::ops::StateControl;
use crate::spilled_change::{SpillWriter, ViewChange};

/// Rows of a bounded step's change below which it is not consolidated between parts.
const MIN_CONSOLIDATE: usize = 65_536;

/// The state one step of a bounded epoch should add in memory, in multiples of its input
/// bound (see [`Pipeline::step_budget`]).
const GROWTH_PER_STEP: usize = 4;

/// A bounded epoch's change is held in memory up to this many times the step size; past
/// it, it is spilled to disk.
const SPILL_STEPS: usize = 4;

/// Rows of a part's first step in a bounded epoch, whose size sizes the part's next steps.
const PROBE_ROWS: usize = 1024;

impl Pipeline {
    /// Pushes one epoch's source changes through the pipeline in steps that each take about
    /// `max_bytes` of input at most, and returns the view's change for the whole epoch.
    ///
    /// A large epoch (an UPDATE of 300k rows) in one step holds its whole input, every
    /// evicted state entry it reads back and every intermediate change at once (measured:
    /// 1.2 GB under a 256 MiB limit). In steps, state is evicted between them (see
    /// [`Pipeline::step`]) and only the view's change accumulates, consolidated as it grows;
    /// past [`SPILL_STEPS`] x `max_bytes` it goes to files on `disk` instead (see
    /// [`crate::spilled_change`]). Splitting is exact: every operator maps a change to the
    /// difference of its results before and after it, so steps over consecutive parts add
    /// up to the step over the whole; each source's rows keep their order, so no relation is
    /// ever seen with a row deleted before it was inserted.
    ///
    /// A step's input can bring back far more state than its own size (each changed row of
    /// a join reads its key's evicted rows of the other side), and state is only evicted
    /// after a step: the steps shrink so that the state a step adds stays near
    /// [`GROWTH_PER_STEP`] times `max_bytes` (see [`Pipeline::step_budget`]).
    ///
    /// Operators whose results cost as much as their key's state hold them until the input
    /// is all in, and release them in steps of their own (see `StateControl::Hold`). A
    /// pipeline whose step fails has taken part of an epoch (and may still hold results):
    /// it is discarded, never stepped again.
    pub async fn step_bounded(
        &mut self,
        sources: &HashMap<u64, Vec<EpochPart>>,
        max_bytes: usize,
        disk: Option<&Arc<DiskManager>>,
    ) -> Result<ViewChange> {
        let bytes = |parts: &[EpochPart]| parts.iter().map(EpochPart::bytes_when_read).sum();
        let total: usize = sources.values().map(|p| bytes(p)).sum();
        let whole = total <= max_bytes
            && (sources.iter()).all(|(id, p)| bytes(p) <= self.step_budget(*id, max_bytes));
        if whole {
            let mut whole = HashMap::with_capacity(sources.len());
            for (id, parts) in sources {
                let Some(schema) = parts.first().map(EpochPart::schema) else {
                    continue;
                };
                whole.insert(*id, EpochPart::concat(&schema, parts)?);
            }
            let (out, growth) = self.step_measured(&whole, false).await?;
            if let [(id, parts)] = sources.iter().collect::<Vec<_>>()[..] {
                self.record_growth(*id, bytes(parts), growth);
            }
            return Ok(ViewChange::Rows(out));
        }
        let input_rows: usize = sources.values().flatten().map(EpochPart::len).sum();
        let mut change = EpochChange {
            outs: Vec::new(),
            spill: None,
            schema: None,
            held: 0,
            held_bytes: 0,
            consolidated: 0,
            spill_bytes: max_bytes.saturating_mul(SPILL_STEPS),
            partitions_for: 2 * total,
            input_rows,
        };
        self.control(StateControl::Hold).await?;
        for (id, part) in in_order(sources) {
            // NOTE: a part's size is estimated before it is read (a cold file's by its
            // encoded size, 30 times too small for a dictionary-encoded text): its first
            // step reads a few rows, and their size in memory sizes the next steps.
            let mut per_row = (part.bytes_when_read() / part.len().max(1)).max(1);
            let mut probed = false;
            let mut offset = 0;
            while offset < part.len() {
                let budget = self.step_budget(id, max_bytes);
                let mut rows = (budget / per_row).clamp(1, part.len() - offset);
                if !probed {
                    rows = rows.min(PROBE_ROWS);
                }
                // NOTE: stored rows are read here, one step's slice at a time.
                let read = part.slice(offset, rows).read()?;
                if !probed {
                    probed = true;
                    per_row = (read.slice_bytes() / rows).max(1);
                }
                let step = HashMap::from([(id, read)]);
                offset += rows;
                let (out, growth) = self.step_measured(&step, false).await?;
                self.record_growth(id, rows * per_row, growth);
                change.add(out, disk)?;
            }
        }
        // The held results (see `StateControl::Hold`), a slice of state per step.
        self.control(StateControl::Release(max_bytes)).await?;
        while held(&self.control(StateControl::Held).await?) > 0 {
            let (out, _) = self.step_measured(&HashMap::new(), true).await?;
            change.add(out, disk)?;
        }
        change.finish()
    }

    /// Input bytes of source `id` that one step of a bounded epoch takes: `max_bytes`, or
    /// less where the source's last step grew the state in memory by more than
    /// [`GROWTH_PER_STEP`] x `max_bytes` for that much input.
    ///
    /// Measured in `state_spill` (an UPDATE of 286k rows of one side of a spilled 1:1 join
    /// under `--memory-limit 256MiB`, 2 MiB steps): a step read back 31-58 MB of the other
    /// side's rows before the eviction after it, 15-25 x its input.
    fn step_budget(&self, id: u64, max_bytes: usize) -> usize {
        step_budget(self.growth_per_byte.get(&id).copied(), max_bytes)
    }

    /// Remembers how much a step of `input` bytes of source `id` grew the state.
    fn record_growth(&mut self, id: u64, input: usize, growth: i64) {
        let per_byte = growth.max(0) as f64 / input.max(1) as f64;
        self.growth_per_byte.insert(id, per_byte);
    }
}

/// Input bytes of a step that would grow the state by about [`GROWTH_PER_STEP`] x
/// `max_bytes`, if the last step grew it by `per_byte` for each byte of input; at most
/// `max_bytes`, at least one byte.
fn step_budget(per_byte: Option<f64>, max_bytes: usize) -> usize {
    let target = max_bytes.saturating_mul(GROWTH_PER_STEP) as f64;
    match per_byte {
        Some(per_byte) if per_byte * max_bytes as f64 > target => {
            ((target / per_byte) as usize).clamp(1, max_bytes)
        }
        _ => max_bytes,
    }
}

/// The view's change for a bounded epoch, as its steps add to it: consolidated in memory
/// while it is a few steps' worth, then spilled to disk.
struct EpochChange {
    outs: Vec<Changelog>,
    spill: Option<SpillWriter>,
    schema: Option<SchemaRef>,
    /// Rows and bytes in `outs`, and rows after the last consolidation.
    held: usize,
    held_bytes: usize,
    consolidated: usize,
    /// Bytes past which the change goes to disk.
    spill_bytes: usize,
    /// Bytes the spill's partitions are sized for (twice the epoch's input), and the
    /// epoch's input rows.
    partitions_for: usize,
    input_rows: usize,
}

impl EpochChange {
    /// Adds one step's change.
    fn add(&mut self, out: Changelog, disk: Option<&Arc<DiskManager>>) -> Result<()> {
        let schema = self.schema.get_or_insert_with(|| out.schema());
        if out.is_empty() {
            return Ok(());
        }
        if let Some(writer) = self.spill.as_mut() {
            return writer.append(&out);
        }
        self.held += out.len();
        self.held_bytes += out.bytes();
        self.outs.push(out);
        // The change is far larger than a step: it goes to disk, in partitions of about
        // what may be held, their number guessed from the epoch's input.
        if let Some(disk) = disk
            && self.held_bytes > self.spill_bytes
        {
            // NOTE: few rows (tests split every epoch) need few files.
            let partitions = (self.partitions_for.max(2 * self.held_bytes))
                .div_ceil(self.spill_bytes)
                .min(self.input_rows / 1024)
                .clamp(4, 256);
            let mut writer = SpillWriter::new(disk.clone(), schema, partitions, self.spill_bytes)?;
            for out in self.outs.drain(..) {
                writer.append(&out)?;
            }
            self.spill = Some(writer);
            return Ok(());
        }
        // NOTE: consolidating when the change doubles keeps the work linear overall.
        if self.held > MIN_CONSOLIDATE.max(2 * self.consolidated) {
            let merged =
                Changelog::concat(schema, std::mem::take(&mut self.outs))?.consolidate()?;
            self.held = merged.len();
            self.held_bytes = merged.bytes();
            self.consolidated = self.held;
            self.outs.push(merged);
        }
        Ok(())
    }

    /// The whole change.
    fn finish(mut self) -> Result<ViewChange> {
        if let Some(writer) = self.spill {
            return Ok(ViewChange::Spilled(Arc::new(writer.finish()?)));
        }
        let schema =
            (self.schema).ok_or_else(|| PlanError::Internal("a step without parts".into()))?;
        match self.outs.len() {
            1 => Ok(ViewChange::Rows(self.outs.remove(0))),
            _ => Ok(ViewChange::Rows(
                Changelog::concat(&schema, self.outs)?.consolidate()?,
            )),
        }
    }
}

/// The number of results still held, from every operator's answer to `Held`.
fn held(answers: &[(u32, u64)]) -> u64 {
    answers.iter().map(|(_, n)| n).sum()
}

/// Each source's non-empty parts, sources by id, parts in their order.
fn in_order(sources: &HashMap<u64, Vec<EpochPart>>) -> impl Iterator<Item = (u64, &EpochPart)> {
    let mut ids: Vec<u64> = sources.keys().copied().collect();
    ids.sort_unstable();
    ids.into_iter()
        .filter_map(|id| sources.get(&id).map(|parts| (id, parts)))
        .flat_map(|(id, parts)| parts.iter().map(move |part| (id, part)))
        .filter(|(_, part)| !part.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_shrink_when_they_grow_the_state_more_than_the_target() {
        let max = 2 << 20;
        assert_eq!(step_budget(None, max), max, "no step measured yet");
        assert_eq!(step_budget(Some(0.0), max), max, "a step that freed state");
        assert_eq!(step_budget(Some(4.0), max), max, "at the target");
        // A step that read back 25 bytes of state per input byte: the next takes 4/25.
        assert_eq!(step_budget(Some(25.0), max), max * 4 / 25);
        assert_eq!(step_budget(Some(1e30), max), 1, "at least a byte");
    }
}
