//! tidesync-tests: cross-crate end-to-end tests (real QUIC on loopback, kill -9, TLS).
//!
//! The tests themselves live in `tests/it/`; this library holds helpers they share. Filled as
//! the device, network and cloud issues land.
