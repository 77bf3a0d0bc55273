//! tidesync-gateway: the store-and-forward daemon at a site.
//!
//! It will own the QUIC server for devices (driving core's `sync::Ingest`), the SQLite spool
//! with custody acks after group commit, the uplink to the cloud (core's `sync::Uplink`), the
//! relay of shadows and commit acks, and its metrics endpoint. Filled by the network issue.
