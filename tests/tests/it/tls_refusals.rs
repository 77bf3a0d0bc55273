//! Certificates the fleet does not trust, against the running gateway binary with a revocation
//! list in its config: a self-signed device certificate, one from another fleet's CA, an expired
//! one, a not-yet-valid one and a revoked one. Each is refused in the handshake with a log line
//! that names the device and the reason, is counted, and stores nothing; a valid device of the
//! same fleet still gets custody.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tidesync_core::event::{DeviceId, Millis, Seq};
use tidesync_core::ledger::Ledger;
use tidesync_core::net::pki::{self, FleetCa, Identity};
use tidesync_core::net::quic::{Client, TransportLimits};
use tidesync_core::net::tls::Credentials;
use tidesync_core::vv::VersionVector;
use tidesync_core::wire::{Frame, Hello, Peer, PROTOCOL_VERSION};
use tidesync_gateway::spool::Spool;
use tidesync_tests::*;

use super::{device, gateway, metric, spawn_gateway, wait_until_serving, TEST_TIMEOUT};

const DAY_MS: u64 = 86_400_000;

/// A device certificate signed by its own key, naming `device` as a fleet certificate would.
fn self_signed(fleet: &Fleet, device: DeviceId) -> Credentials {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, device.to_string());
    params.subject_alt_names = vec![rcgen::SanType::URI(format!("tidesync:device:{device}").try_into().unwrap())];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).unwrap();
    Credentials {
        ca_pem: fleet.ca.cert_pem().to_string(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        crl_pem: None,
    }
}

/// A device certificate from another fleet's CA; the device trusts our CA so that only the
/// gateway's check can refuse it.
fn other_fleet(fleet: &Fleet, device: DeviceId) -> Credentials {
    let now = wall_now().0;
    let other = FleetCa::create("other", Millis(now - DAY_MS), Millis(now + DAY_MS)).unwrap();
    let issued = other.issue(Identity::Device(device), 1, Millis(now - DAY_MS), Millis(now + DAY_MS)).unwrap();
    Credentials {
        ca_pem: fleet.ca.cert_pem().to_string(),
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        crl_pem: None,
    }
}

/// Connects with `credentials` and says hello as `device`. Returns the first frame the gateway
/// sends, or the error that ended the attempt (QUIC may finish the client's side of the handshake
/// before the server has refused the client's certificate, so the refusal can show up at any step).
async fn attempt(credentials: &Credentials, device: DeviceId, addr: std::net::SocketAddr) -> Result<Frame, String> {
    let client = Client::bind(loopback_any(), credentials, &TransportLimits::default()).map_err(|e| e.to_string())?;
    let steps = async {
        let link = client.connect(addr, pki::GATEWAY_SERVER_NAME, 5_000).await.map_err(|e| e.to_string())?;
        let mut stream = link.open_stream(&TransportLimits::default()).await.map_err(|e| e.to_string())?;
        let hello = Frame::Hello(Hello {
            protocol_min: 1,
            protocol_max: PROTOCOL_VERSION,
            peer: Peer::Device(device),
            vv: VersionVector::new(),
            wall: wall_now(),
        });
        stream.send(&hello).await.map_err(|e| e.to_string())?;
        match stream.recv().await {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err("stream finished".to_string()),
            Err(error) => Err(error.to_string()),
        }
    };
    let result = tokio::time::timeout(TEST_TIMEOUT, steps).await.map_err(|_| "timed out".to_string())?;
    client.shutdown(tidesync_core::net::quic::CloseCode::Done, 500).await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_the_fleet_does_not_trust_are_refused_with_a_log_line_and_nothing_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let now = wall_now().0;
    let (revoked, revoked_serial) = fleet
        .credentials_valid(Identity::Device(device("pump-revoked")), Millis(now - DAY_MS), Millis(now + DAY_MS))
        .unwrap();
    let quic_addr = free_udp_port().unwrap();
    let metrics_addr = free_tcp_port().unwrap();
    let settings = GatewaySettings {
        listen: quic_addr,
        metrics_listen: Some(metrics_addr),
        crl_pem: Some(fleet.revocation_list(&[revoked_serial]).unwrap()),
        ..GatewaySettings::default()
    };
    let config = fleet.gateway_config(gateway("site-1"), &settings).unwrap();
    let log = dir.path().join("gateway.log");
    let mut child = spawn_gateway(&config, &log);
    wait_until_serving(metrics_addr).await;

    let (expired, _) = fleet
        .credentials_valid(Identity::Device(device("pump-old")), Millis(now - 3 * DAY_MS), Millis(now - DAY_MS))
        .unwrap();
    let (early, _) = fleet
        .credentials_valid(Identity::Device(device("pump-early")), Millis(now + DAY_MS), Millis(now + 3 * DAY_MS))
        .unwrap();
    let cases = [
        ("pump-selfie", self_signed(&fleet, device("pump-selfie")), "it was not issued by the fleet CA"),
        ("pump-alien", other_fleet(&fleet, device("pump-alien")), "it was not issued by the fleet CA"),
        ("pump-old", expired, "it has expired"),
        ("pump-early", early, "it is not valid yet"),
        ("pump-revoked", revoked, "it is on the fleet revocation list"),
    ];
    for (index, (name, credentials, reason)) in cases.iter().enumerate() {
        let outcome = attempt(credentials, device(name), quic_addr).await;
        assert!(outcome.is_err(), "{name} was let in: {outcome:?}");
        // The refusal is logged with who and why, and counted.
        let line = format!("refused device {name}: {reason}");
        wait_for(&line, Duration::from_secs(10), || std::fs::read_to_string(&log).unwrap().contains(&line))
            .await
            .unwrap_or_else(|error| panic!("{error}; log:\n{}", std::fs::read_to_string(&log).unwrap()));
        let n_failures = (index + 1) as f64;
        wait_for("the handshake failure counter", Duration::from_secs(5), || {
            metric(metrics_addr, "tidesync_gateway_handshake_failures_total") == Some(n_failures)
        })
        .await
        .unwrap();
    }
    assert_eq!(metric(metrics_addr, "tidesync_gateway_connected_devices"), Some(0.0));

    // A valid device of the same fleet is served by the same gateway, revocation list and all.
    let pump = device("pump-1");
    let client = device_client(&mut fleet, pump).unwrap();
    let mut store = device_store(pump, 20).unwrap();
    let mut progress = DeviceProgress::default();
    let done = |_: &_, progress: &DeviceProgress| progress.custody == Seq(20);
    sync_device_until(&mut store, pump, &client, quic_addr, &mut progress, done, TEST_TIMEOUT).await.unwrap();

    // Nothing of the refused devices is in the spool; the valid device's events are.
    let spool = Spool::open_read_only(&dir.path().join("spool.db")).unwrap();
    for (name, _, _) in &cases {
        assert_eq!(spool.high(&device(name)), Seq(0), "{name} has a stream in the spool");
    }
    assert_eq!(spool.high(&pump), Seq(20));
    assert_eq!(spool.stats().n_events, 20);
    assert_eq!(spool.stats().n_devices, 1);
    drop(spool);

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap().success());
}
