//! The full path over real QUIC on 127.0.0.1: a device agent (`tidesync_device::uplink`) → a real
//! gateway daemon (`tidesync_gateway::start`) → this cloud (`tidesync_cloud::start`, SQLite):
//! every event lands in the cloud store exactly once, commits flow back to the device (which
//! prunes), projections fold it all, and desired state written in the cloud reaches the device.
//! The fleet is set up as an operator does it, with the gateway's `pki init` and `pki issue`: the
//! device signs every batch with its issued `NAME.sign.key` and the cloud verifies each one
//! against the PKI's `device-keys.txt`, raising no security event.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use tidesync_cloud::store::{Backend, Position};
use tidesync_cloud::Config;
use tidesync_core::event::{DeviceId, GatewayId, Millis, Payload, SensorReading};
use tidesync_core::net::quic::TransportLimits;
use tidesync_core::net::tls::Credentials;
use tidesync_core::sync::SessionConfig;
use tidesync_core::value::Value;
use tidesync_device::uplink::{self, UplinkCounters, UplinkOptions};
use tidesync_device::{Agent, DeviceStore, LedgerConfig, SigningKey};
use tidesync_gateway::pki_cli::{self, Holder};
use tokio::sync::watch;

/// Issues a certificate for `holder` in the PKI directory `pki` as `pki/name.pem` and
/// `pki/name.key` (a device also gets `pki/name.sign.key`, registered in `device-keys.txt`), as
/// `tidesync-gateway pki issue` does; returns the credentials.
fn issue(pki: &Path, holder: Holder, name: &str) -> Credentials {
    pki_cli::issue(pki, &holder, &pki.join(name), 1, &mut std::io::sink()).unwrap();
    let read = |file: String| std::fs::read_to_string(pki.join(file)).unwrap();
    Credentials {
        ca_pem: read("ca.pem".into()),
        cert_pem: read(format!("{name}.pem")),
        key_pem: read(format!("{name}.key")),
        crl_pem: None,
    }
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn record(agent: &Agent, from: u64, n: u64) {
    let items: Vec<(Millis, Payload)> = (from..from + n)
        .map(|i| {
            (
                Millis(1_700_000_000_000 + i * 1_000),
                Payload::Reading(SensorReading { sensor: "temp".into(), value: (i % 100) as f64, unit: "Cel".into() }),
            )
        })
        .collect();
    agent.record_batch(&items).unwrap();
}

fn cloud_config(dir: &Path) -> Config {
    let text = r#"
        listen = "127.0.0.1:0"
        http_listen = "127.0.0.1:0"
        data_dir = "data"
        device_keys = "pki/device-keys.txt"
        [tls]
        ca = "pki/ca.pem"
        cert = "pki/cloud.pem"
        key = "pki/cloud.key"
        # 2,000 events of one device as fast as they go (security_server.rs tests the limits).
        [limits]
        device_events_per_s = 0
        [[alerts]]
        name = "hot"
        sensor = "temp"
        above = 98.5
    "#;
    Config::parse(text, &dir.join("cloud.toml")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_to_gateway_to_cloud_exactly_once_with_commits_back_and_desired_state_down() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    pki_cli::init(&pki, "e2e", 1, 1, &mut std::io::sink()).unwrap();
    issue(&pki, Holder::Cloud, "cloud");
    let gateway_id = GatewayId::new("gw-1").unwrap();
    issue(&pki, Holder::Gateway(gateway_id), "gateway");
    let device = DeviceId::new("sensor-1").unwrap();
    let device_credentials = issue(&pki, Holder::Device(device), "sensor-1");
    let signing = SigningKey::load(&pki.join("sensor-1.sign.key")).unwrap();

    let config = cloud_config(dir.path());
    let backend = config.backend();
    let cloud = tidesync_cloud::start(config).await.unwrap();
    let cloud_addr = cloud.ingest.quic_addr();

    let gateway_config = tidesync_gateway::Config {
        gateway: gateway_id,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        spool: dir.path().join("spool.sqlite3"),
        spool_budget_bytes: 64 * 1024 * 1024,
        tls: tidesync_gateway::config::TlsFiles {
            ca: pki.join("ca.pem"),
            cert: pki.join("gateway.pem"),
            key: pki.join("gateway.key"),
            crl: None,
        },
        upstream: Some(tidesync_gateway::config::Upstream { addr: cloud_addr, reconnect_ms: 100 }),
        limits: tidesync_gateway::config::Limits { retransmit_ms: 1_000, ..Default::default() },
    };
    let gateway = tidesync_gateway::start(gateway_config).await.unwrap();

    let store = DeviceStore::create(&dir.path().join("ledger.sqlite3"), device, LedgerConfig::default()).unwrap();
    let agent = Arc::new(Agent::start(store).unwrap());
    record(&agent, 1, 2_000);
    agent.report("firmware", Value::Text("2.0.0".into())).unwrap();
    let watch_desired = agent.watch_desired().unwrap();
    let counters = Arc::new(UplinkCounters::default());
    let (stop, shutdown) = watch::channel(false);
    let options = UplinkOptions {
        gateways: vec![gateway.quic_addr()],
        credentials: device_credentials,
        session: SessionConfig { retransmit_ms: 500, ..SessionConfig::default() },
        transport: TransportLimits { idle_timeout_ms: 5_000, keep_alive_ms: 500, ..TransportLimits::default() },
        connect_timeout_ms: 2_000,
        backoff_initial_ms: 50,
        backoff_max_ms: 400,
    };
    let device_uplink = tokio::spawn(uplink::run_with_key(
        Arc::clone(&agent),
        options,
        Some(signing),
        Arc::clone(&counters),
        rand_chacha::ChaCha8Rng::seed_from_u64(7),
        shutdown,
    ));

    // Commits reach the device: the cloud made all 2,001 events durable.
    wait_until("the device hears the cloud's commit of every event", Duration::from_secs(60), || {
        counters.snapshot().committed_seq == 2_001
    })
    .await;
    // Live events go the whole way too.
    record(&agent, 2_002, 50);
    wait_until("the live events are committed", Duration::from_secs(30), || counters.snapshot().committed_seq == 2_051)
        .await;

    // Exactly once in the cloud store.
    let reader_backend = backend.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let mut reader = reader_backend.open_reader().unwrap();
        reader.read_from(Position(0), 100_000).unwrap()
    })
    .await
    .unwrap();
    let seqs: Vec<u64> = stored.iter().map(|event| event.event.id.seq.0).collect();
    assert_eq!(seqs, (1..=2_051).collect::<Vec<_>>(), "every event once, in order");
    assert!(stored.iter().all(|event| event.meta.gateway == gateway_id));
    let positions: Vec<u64> = stored.iter().map(|event| event.position.0).collect();
    assert_eq!(positions, (1..=2_051).collect::<Vec<_>>());
    // Every one of them verified against the device's issued key: verification was on, the
    // registry held the device, and nothing was refused.
    let live = cloud.ingest.live();
    assert!(live.verifying.load(Ordering::Relaxed), "the cloud did not verify");
    assert_eq!(live.keyed_devices.load(Ordering::Relaxed), 1);
    assert!(live.violations.lock().unwrap().is_empty(), "security events: {:?}", live.violations);
    assert_eq!(counters.snapshot().unsigned_batches, 0, "every batch was sealed");

    // Desired state written through the cloud's HTTP API reaches the device through the gateway.
    let http_addr = cloud.http_addr.unwrap();
    let status_line = tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let body = r#"{"interval_s": 30}"#;
        let mut stream = std::net::TcpStream::connect(http_addr).unwrap();
        let request = format!(
            "PATCH /api/devices/sensor-1/desired HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response.lines().next().unwrap_or_default().to_string()
    })
    .await
    .unwrap();
    assert!(status_line.contains(" 200 "), "{status_line}");
    let desired = tokio::task::spawn_blocking(move || watch_desired.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("desired state reaches the device");
    assert_eq!(desired.as_map().unwrap().get("interval_s"), Some(&Value::Int(30)));

    // Projections caught up with the log.
    let status_backend = backend.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status_backend = status_backend.clone();
        let (lag, presence, alerts) = tokio::task::spawn_blocking(move || {
            let mut reader = status_backend.open_reader().unwrap();
            let names: Vec<String> =
                ["latest", "minute", "hour", "presence", "gaps", "alerts"].map(String::from).into();
            let status = tidesync_cloud::projection::status(&mut *reader, &names).unwrap();
            let lag: u64 = status.iter().map(|projection| projection.lag_events).sum();
            (lag, reader.row("presence", "sensor-1").unwrap(), reader.rows("alerts", "alert|", 1_000).unwrap())
        })
        .await
        .unwrap();
        if lag == 0 {
            let presence = presence.unwrap();
            assert_eq!(presence["n_events"], 2_051);
            assert_eq!(presence["gateway"], "gw-1");
            // Values cycle 0..=99; "hot" (> 98.5) fires at each 99 after a lower value: i % 100 == 99.
            let expected = (1..=2_051u64).filter(|i| *i <= 2_000 || *i >= 2_002).filter(|i| i % 100 == 99).count();
            assert_eq!(alerts.len(), expected);
            break;
        }
        assert!(Instant::now() < deadline, "projections did not catch up: lag {lag}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(backend, Backend::Sqlite { .. }));

    stop.send(true).unwrap();
    device_uplink.await.unwrap().unwrap();
    gateway.shutdown().await.unwrap();
    cloud.shutdown().await.unwrap();
}
