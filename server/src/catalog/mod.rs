//! The catalog's live objects: turning a stored record into a table, view, index or set of
//! connector options, and the records the server writes itself. Called by DDL statements
//! (`exec/`) and by the replay at start (`boot.rs`) alike; it starts nothing.

pub mod index;
pub mod options;
pub mod records;
pub mod relation;
