//! The view lifecycle in one place: compiling a view's query into an incremental plan,
//! starting it (register, backfill, publish), restoring it on start from the last
//! checkpoint, rebuilding it when its pipeline fails, and the supervisor that does so with
//! backoff. The coordinator (`coordinator/`) runs the started pipelines epoch by epoch.

pub mod backfill;
pub mod compile;
pub mod restore;
pub mod restore_plan;
pub mod start;
pub mod supervisor;
