//! End-to-end tests over real QUIC on 127.0.0.1: device → gateway → cloud.
// Helpers outside #[test] functions unwrap too: a failing setup is a failing test.
#![allow(clippy::unwrap_used)]

mod gateway_crash;
mod gateway_flow;
mod gateway_security;

use std::time::Duration;

use tidesync_core::event::{DeviceId, GatewayId};

/// Every test finishes well inside this.
const TEST_TIMEOUT: Duration = Duration::from_secs(40);

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn gateway(name: &str) -> GatewayId {
    GatewayId::new(name).unwrap()
}
