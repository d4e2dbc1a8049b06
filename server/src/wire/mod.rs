//! The PostgreSQL front end: one [`handler::Connection`] per client socket implements
//! pgwire's startup, simple query, extended query, COPY and cancel handlers.

pub mod cancel;
pub mod encode;
pub mod handler;
pub mod subscribe;
pub mod text;
