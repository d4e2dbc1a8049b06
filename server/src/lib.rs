//! Millrace server: the PostgreSQL front end, sessions, DDL/DML execution and the catalog's
//! durable bootstrap. `main.rs` parses the command line and calls [`server::run`].
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod connector;
pub mod engine;
pub mod error;
pub mod exec;
pub mod runtime;
pub mod server;
pub mod session;
pub mod sink;
pub mod wire;
