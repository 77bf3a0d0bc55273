//! tidesync-device: the device agent that runs on a Linux-class edge device.
//!
//! Bird's-eye view: applications (or the `tidesync-device record` command) hand readings to an
//! [`Agent`]; its single writer thread owns the [`DeviceStore`] (one SQLite database in WAL mode)
//! and turns the requests of many producers into group commits, acknowledging each producer only
//! once the commit that holds its events is durable. The same store keeps the device's automerge
//! shadow, and implements core's `Ledger` and `Store` traits so that core's `sync::Uplink` runs
//! on it unchanged; the network issue adds the QUIC driver around that.
//!
//! Code map: [`store`] (SQLite ledger, retention and budget, shadow persistence), [`agent`]
//! (writer thread, group commit, application API), [`config`] (the TOML file), [`json`] (JSON
//! lines in and out), [`cli`] (the `tidesync-device` command), [`uplink`] (the QUIC session
//! driver), [`signing`] (the event signing key).

pub mod agent;
pub mod cli;
pub mod config;
pub mod error;
pub mod json;
pub mod serial;
pub mod signing;
pub mod store;
pub mod uplink;

pub use agent::{Agent, Pending};
pub use config::{Config, FullPolicy, LedgerConfig, Synchronous, UplinkConfig};
pub use error::StoreError;
pub use signing::{SigningKey, SigningKeyError};
pub use store::{DesiredWatch, DeviceStore, NewEvent, RecordRequest, Status};
