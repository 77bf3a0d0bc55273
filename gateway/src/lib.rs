//! tidesync-gateway: the store-and-forward daemon at a site.
//!
//! Devices connect over QUIC with mutual TLS ([`daemon`]); each connection drives core's
//! `sync::Ingest`, and events go into the SQLite [`spool`] with group commits before custody is
//! acknowledged. The spool drains to the cloud through core's `sync::Uplink`; the cloud's commit
//! acks prune the spool and are relayed down so devices prune. Shadows are kept per device and
//! relayed both ways. [`metrics`] serves Prometheus text; [`cli`] is the `tidesync-gateway`
//! command (`run`, `status`, `pki`).

pub mod cli;
pub mod config;
pub mod daemon;
pub mod metrics;
pub mod pki_cli;
pub mod spool;

pub use config::Config;
pub use daemon::{start, Running};
