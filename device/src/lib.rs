//! tidesync-device: the device agent that runs on a Linux-class edge device.
//!
//! It will own the durable SQLite ledger of the device's events (group commits, retention and a
//! byte budget), the persisted automerge shadow, the recording API used by applications, the
//! uplink that drives core's `sync::Uplink` over QUIC, the serial ingest from the firmware, and
//! the `tidesync-device` CLI. Filled by the device issue; today it only names its place.
