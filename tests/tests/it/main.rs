//! End-to-end tests over real QUIC on 127.0.0.1: device → gateway → cloud.
// Helpers outside #[test] functions unwrap too: a failing setup is a failing test.
#![allow(clippy::unwrap_used)]

mod gateway_crash;
mod gateway_flow;
mod gateway_security;
mod load;
mod roaming;
mod roaming_spool_drain;
mod security;
mod tls_refusals;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidesync_core::event::{DeviceId, GatewayId};

/// Every test finishes well inside this.
const TEST_TIMEOUT: Duration = Duration::from_secs(40);

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn gateway(name: &str) -> GatewayId {
    GatewayId::new(name).unwrap()
}

/// Starts the real gateway binary on `config`, its log appended to `log`.
fn spawn_gateway(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tidesync-gateway-under-test"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Waits until the gateway's metrics endpoint answers (it binds after the QUIC server).
async fn wait_until_serving(metrics_addr: std::net::SocketAddr) {
    let deadline = Instant::now() + TEST_TIMEOUT;
    while tidesync_gateway::cli::fetch_metrics(metrics_addr).is_err() {
        assert!(Instant::now() < deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One sample of a running gateway's metrics page.
fn metric(metrics_addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let page = tidesync_gateway::cli::fetch_metrics(metrics_addr).ok()?;
    tidesync_gateway::metrics::sample(&page, name)
}
