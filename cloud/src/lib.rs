//! tidesync-cloud: the single source of truth.
//!
//! Gateways connect over QUIC ([`server`]); each connection drives core's `sync::Ingest` in its
//! cloud role over the [`store`] (SQLite embedded, PostgreSQL at scale), and commit acks go out
//! only after a group commit made the events durable. [`subscription`]s catch up from a
//! checkpoint and follow live appends; [`projection`]s fold the log into read models with their
//! checkpoint in the same transaction; [`http`] serves them as JSON with Prometheus metrics and
//! the [`dashboard`] as a web page. [`cli`] is the `tidesync-cloud` command.

pub mod cli;
pub mod config;
pub mod dashboard;
pub mod http;
pub mod projection;
pub mod server;
pub mod store;
pub mod subscription;

pub use cli::{start, Cloud};
pub use config::Config;
pub use store::{Backend, CloudStore, EventReader, EventWriter, Position, StoreError, StoredEvent};
