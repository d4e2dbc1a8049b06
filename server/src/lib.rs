//! Millrace server: the PostgreSQL front end, sessions, DDL/DML execution and the catalog's
//! durable bootstrap. `main.rs` parses the command line and calls [`server::run`].
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod boot;
pub mod catalog;
pub mod compute;
pub mod config;
pub mod connector;
pub mod coordinator;
pub mod engine;
pub mod error;
pub mod exec;
pub mod memory;
pub mod registry;
pub mod server;
pub mod session;
pub mod sink;
pub mod sql;
pub mod views;
pub mod wire;
