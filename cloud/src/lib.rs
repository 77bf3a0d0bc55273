//! tidesync-cloud: the single source of truth.
//!
//! It will own the ingest server for gateways (core's `sync::Ingest` in its cloud role), the
//! event store behind one trait (SQLite embedded, PostgreSQL at scale), subscriptions,
//! projections, the HTTP API and the fleet dashboard. Filled by the cloud issue.
