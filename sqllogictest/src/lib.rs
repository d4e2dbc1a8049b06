//! Test support for Millrace: start a real `millrace` server on a free loopback port with a
//! temporary data directory, talk to it over the PostgreSQL protocol, and run `.slt` files.

pub mod broker;
pub mod db;
pub mod postgres;
pub mod random_sql;
pub mod rows;
pub mod runner;
pub mod s3;
pub mod server;
pub mod service;
pub mod sink_output;

pub use db::MillraceDb;
pub use server::TestServer;
