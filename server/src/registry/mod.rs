//! The registry of what runs in the background: sources and sinks, each with its live
//! figures and status and the switch that stops it, and the system tables that show them.
//! It sits below the engine, which holds it; the tasks themselves live in `connector/` and
//! `sink/`, which register here.

pub mod sinks;
pub mod sinks_table;
pub mod sources;
pub mod sources_table;
pub mod status;
