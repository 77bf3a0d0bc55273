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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidesync_core::auth::{DeviceKeys, SEED_BYTES};
use tidesync_core::event::{DeviceId, GatewayId};
use tidesync_gateway::pki_cli;
use tidesync_tests::{loopback_any, DeviceSession, Fleet, TestCloud};

/// Every test finishes well inside this.
const TEST_TIMEOUT: Duration = Duration::from_secs(40);

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn gateway(name: &str) -> GatewayId {
    GatewayId::new(name).unwrap()
}

/// Issues `device`'s signing key with the fleet PKI's own code (`pki_cli::rotate_key`, which
/// `tidesync-gateway pki issue --device` runs for a device's first key): a seed from the OS random
/// number generator written as `FLEET_DIR/NAME.sign.key` (0600) and its public key registered in
/// `FLEET_DIR/device-keys.txt`. Returns the key file's path.
fn issue_signing_key(fleet: &Fleet, device: DeviceId) -> PathBuf {
    let out = fleet.dir.join(device.as_str());
    pki_cli::rotate_key(&fleet.dir, device, &out, &mut std::io::sink()).unwrap();
    fleet.dir.join(format!("{device}.sign.key"))
}

/// The seed in a signing-key file, for the core-level devices (`DeviceSession::signing_seed`);
/// device agents load the file themselves (`tidesync_device::SigningKey::load`).
fn signing_seed(path: &Path) -> [u8; SEED_BYTES] {
    tidesync_core::auth::parse_seed(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A core-level device session (`DeviceSession`, the test sessions' timers) sealing every batch
/// with `device`'s signing key, issued now by the fleet's PKI ([`issue_signing_key`]).
fn signed_session(fleet: &Fleet, device: DeviceId) -> DeviceSession {
    let seed = signing_seed(&issue_signing_key(fleet, device));
    DeviceSession { signing_seed: Some(seed), ..DeviceSession::default() }
}

/// A test cloud on loopback verifying every batch against the fleet's `device-keys.txt` (every
/// active key the PKI registered so far), as the real cloud does with `device_keys` set.
fn verifying_cloud(fleet: &mut Fleet) -> TestCloud {
    let text = std::fs::read_to_string(fleet.dir.join(pki_cli::DEVICE_KEYS_FILE)).unwrap();
    let keys = Arc::new(DeviceKeys::parse(&text).unwrap());
    TestCloud::start_verifying(fleet, loopback_any(), keys).unwrap()
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
