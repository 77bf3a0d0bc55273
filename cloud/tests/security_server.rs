//! The running cloud (`tidesync_cloud::start`, SQLite) over real QUIC on 127.0.0.1, with gateway
//! clients that drive core's `Uplink` themselves so a test can alter what they send:
//! - a tampering gateway is refused, the refusal is stored as a security event naming device and
//!   gateway (and served by `GET /api/security/events`, counted in `/metrics`), nothing of its
//!   batch is stored, and an honest gateway relaying the same signed events is accepted;
//! - rate limits per device and per gateway hold events back without losing any;
//! - the device key registry is reloaded when it changes, live sessions verify with the new keys,
//!   and a bad file keeps the old keys.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tidesync_cloud::store::{Backend, Position, StoredEvent};
use tidesync_cloud::Config;
use tidesync_core::auth::{DeviceSigner, KeyRegistry, REGISTRY_HEADER};
use tidesync_core::event::{DeviceId, GatewayId, Millis, Payload, SensorReading};
use tidesync_core::ledger::{Ledger, MemLedger};
use tidesync_core::net::pki::{self, FleetCa, Identity};
use tidesync_core::net::quic::{Client, FrameReceiver, FrameSender, Link, TransportLimits};
use tidesync_core::net::tls::Credentials;
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::sync::{Ingest, MemStore, SessionConfig, SessionEvent, ShadowKeeping, Uplink};
use tidesync_core::wire::{BackpressureReason, Frame};

fn wall() -> Millis {
    Millis(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64)
}

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn signer(name: &str) -> DeviceSigner {
    let mut seed = [0u8; 32];
    seed[..name.len()].copy_from_slice(name.as_bytes());
    DeviceSigner::from_seed(device(name), seed)
}

/// A `device-keys.txt` with an active key for each of `devices`, written by core's registry
/// formatter (what `tidesync-gateway pki issue` writes).
fn registry(devices: &[&str]) -> String {
    let mut registry = KeyRegistry::parse(REGISTRY_HEADER).unwrap();
    for name in devices {
        assert!(registry.add(device(name), signer(name).public_key(), Millis(1_700_000_000_000)).unwrap());
    }
    registry.format()
}

struct Fleet {
    dir: tempfile::TempDir,
    ca: FleetCa,
    next_serial: u64,
}

impl Fleet {
    fn new() -> Self {
        let now = wall();
        let ca = FleetCa::create("security", Millis(now.0 - 3_600_000), Millis(now.0 + 86_400_000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let mut fleet = Self { dir, ca, next_serial: 1 };
        let cloud = fleet.issue(Identity::Cloud);
        std::fs::write(fleet.dir.path().join("cloud.pem"), &cloud.cert_pem).unwrap();
        std::fs::write(fleet.dir.path().join("cloud.key"), &cloud.key_pem).unwrap();
        fleet
    }

    fn issue(&mut self, identity: Identity) -> Credentials {
        let now = wall();
        self.next_serial += 1;
        let issued =
            self.ca.issue(identity, self.next_serial, Millis(now.0 - 3_600_000), Millis(now.0 + 86_400_000)).unwrap();
        Credentials {
            ca_pem: self.ca.cert_pem().to_string(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            crl_pem: None,
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// The cloud's config, with `extra` top-level lines and `limits` lines.
    fn config(&self, extra: &str, limits: &str) -> Config {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{extra}\n\
             [tls]\nca = \"ca.pem\"\ncert = \"cloud.pem\"\nkey = \"cloud.key\"\n[limits]\n{limits}\n"
        );
        Config::parse(&text, &self.path("cloud.toml")).unwrap()
    }
}

fn reading(value: f64) -> Payload {
    Payload::Reading(SensorReading { sensor: "t".into(), value, unit: "Cel".into() })
}

/// A gateway's spool holding `n` events of the device `name`, signed by it (relayed from the
/// device through core's sessions, as a real gateway receives them).
fn signed_spool(spool: &mut MemStore, name: &str, n: u64) {
    let mut on_device =
        MemStore::new("device", MemLedger::pruning(), ShadowKeeping::Only(device(name)), ShadowLimits::default());
    for index in 0..n {
        on_device
            .ledger
            .record(device(name), Millis(1_000 + index), Millis(1_000 + index), reading(index as f64))
            .unwrap();
    }
    let config = SessionConfig { batch_events_max: 64, ..SessionConfig::default() };
    let now = Millis(1_000);
    let mut uplink = Uplink::for_device(device(name), config.clone(), now).signing(signer(name));
    let mut ingest = Ingest::for_gateway(device(name), config, now);
    for _ in 0..10_000 {
        let mut moved = false;
        while let Some(frame) = uplink.poll_transmit(now, &mut on_device).unwrap() {
            moved = true;
            ingest.handle_frame(now, frame, spool).unwrap();
        }
        while let Some(event) = ingest.poll_event() {
            if let SessionEvent::EventsReceived(batch) = event {
                let appended = spool.append(&batch).unwrap();
                ingest.handle_durable(now, batch.device, appended.high);
            }
        }
        while let Some(frame) = ingest.poll_transmit(now, spool) {
            moved = true;
            uplink.handle_frame(now, frame, &mut on_device).unwrap();
        }
        while uplink.poll_event().is_some() {}
        if !moved {
            break;
        }
    }
    assert_eq!(spool.ledger.high(&device(name)).0, n, "the gateway holds every signed event");
}

fn spool() -> MemStore {
    MemStore::new("gateway", MemLedger::pruning(), ShadowKeeping::All, ShadowLimits::default())
}

/// A gateway connected to the cloud over QUIC, driving core's `Uplink` itself; `tamper` sees each
/// batch before it is encoded.
struct Gateway {
    _client: Client,
    link: Link,
    sender: FrameSender,
    receiver: FrameReceiver,
    uplink: Uplink,
    events: Vec<SessionEvent>,
}

impl Gateway {
    async fn connect(fleet: &mut Fleet, name: &str, cloud: SocketAddr, session: SessionConfig) -> Self {
        let credentials = fleet.issue(Identity::Gateway(GatewayId::new(name).unwrap()));
        let limits = TransportLimits { idle_timeout_ms: 10_000, keep_alive_ms: 1_000, ..TransportLimits::default() };
        let client = Client::bind("127.0.0.1:0".parse().unwrap(), &credentials, &limits).unwrap();
        let link = client.connect(cloud, pki::CLOUD_SERVER_NAME, 5_000).await.unwrap();
        let (sender, receiver) = link.open_stream(&limits).await.unwrap().split();
        let uplink = Uplink::for_gateway(GatewayId::new(name).unwrap(), session, wall());
        Self { _client: client, link, sender, receiver, uplink, events: Vec::new() }
    }

    /// Runs the session until `done` holds of the events seen so far (or panics after `timeout`).
    async fn run_until(
        &mut self,
        spool: &mut MemStore,
        tamper: &mut dyn FnMut(&mut tidesync_core::wire::EventBatch),
        timeout: Duration,
        done: impl Fn(&[SessionEvent]) -> bool,
    ) {
        let started = Instant::now();
        loop {
            let now = wall();
            if self.uplink.poll_timeout().is_some_and(|at| at <= now) {
                self.uplink.handle_timeout(now);
            }
            while let Some(mut frame) = self.uplink.poll_transmit(now, spool).unwrap() {
                if let Frame::Events(batch) = &mut frame {
                    tamper(batch);
                }
                self.sender.send(&frame).await.unwrap();
            }
            while let Some(event) = self.uplink.poll_event() {
                if let SessionEvent::Committed { device, up_to } = &event {
                    spool.mark_committed(*device, *up_to).unwrap();
                }
                self.events.push(event);
            }
            if done(&self.events) {
                return;
            }
            assert!(started.elapsed() < timeout, "timed out; session events: {:?}", self.events);
            if let Ok(received) = tokio::time::timeout(Duration::from_millis(20), self.receiver.recv()).await {
                let frame = received.unwrap().expect("the cloud ended the stream");
                self.uplink.handle_frame(wall(), frame, spool).unwrap();
            }
        }
    }

    fn throttled(&self, reason: BackpressureReason) -> usize {
        self.events
            .iter()
            .filter(|event| matches!(event, SessionEvent::Throttled { reason: r, .. } if *r == reason))
            .count()
    }
}

fn committed(events: &[SessionEvent], name: &str, up_to: u64) -> bool {
    events.iter().any(|event| {
        matches!(event, SessionEvent::Committed { device: d, up_to: seq } if *d == device(name) && seq.0 >= up_to)
    })
}

fn refused(events: &[SessionEvent]) -> bool {
    events.iter().any(|event| matches!(event, SessionEvent::Throttled { reason: BackpressureReason::Refused, .. }))
}

async fn stored(backend: &Backend) -> Vec<StoredEvent> {
    let backend = backend.clone();
    tokio::task::spawn_blocking(move || backend.open_reader().unwrap().read_from(Position(0), 100_000).unwrap())
        .await
        .unwrap()
}

async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.lines().next().unwrap_or_default().to_string();
        let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
        (status, body)
    })
    .await
    .unwrap()
}

fn no_tamper() -> impl FnMut(&mut tidesync_core::wire::EventBatch) {
    |_| {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampering_gateway_is_refused_and_recorded_and_an_honest_one_is_accepted() {
    let mut fleet = Fleet::new();
    std::fs::write(fleet.path("device-keys.txt"), registry(&["meter-1"])).unwrap();
    let config = fleet.config("device_keys = \"device-keys.txt\"", "device_events_per_s = 0");
    let backend = config.backend();
    let cloud = tidesync_cloud::start(config).await.unwrap();
    let http = cloud.http_addr.unwrap();
    let mut signed = spool();
    signed_spool(&mut signed, "meter-1", 100);
    let session = SessionConfig { batch_events_max: 64, ..SessionConfig::default() };

    // The evil gateway raises the first reading of every batch it relays.
    let mut evil_spool = signed.clone();
    let mut evil = Gateway::connect(&mut fleet, "gw-evil", cloud.ingest.quic_addr(), session.clone()).await;
    let mut n_altered = 0;
    let mut alter = |batch: &mut tidesync_core::wire::EventBatch| {
        if let Some(Payload::Reading(first)) = batch.events.first_mut().map(|event| &mut event.payload) {
            first.value += 1.0;
            n_altered += 1;
        }
    };
    evil.run_until(&mut evil_spool, &mut alter, Duration::from_secs(20), refused).await;
    assert!(n_altered >= 1);
    assert!(!evil.events.iter().any(|event| matches!(event, SessionEvent::Committed { .. })), "{:?}", evil.events);
    assert!(stored(&backend).await.is_empty(), "nothing of the altered batch is stored");

    // The security event names the device, the gateway and the batch.
    let (status, body) = http_get(http, "/api/security/events").await;
    assert!(status.contains(" 200 "), "{status}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["total"], 1, "{page}");
    let event = &page["events"][0];
    assert_eq!((event["gateway"].as_str(), event["device"].as_str()), (Some("gw-evil"), Some("meter-1")), "{event}");
    assert_eq!(event["kind"], "bad_seal");
    assert_eq!((event["from_seq"].as_u64(), event["count"].as_u64()), (Some(1), Some(1)), "{event}");
    assert!(event["last_seq"].as_u64().unwrap() >= 1);
    assert!(event["detail"].as_str().unwrap().contains("does not verify"), "{event}");
    let (_, metrics) = http_get(http, "/metrics").await;
    assert!(metrics.contains("tidesync_cloud_security_events_total{kind=\"bad_seal\"} 1"), "{metrics}");
    assert!(metrics.contains("tidesync_cloud_verifying 1"), "{metrics}");
    evil.link.close(tidesync_core::net::quic::CloseCode::Done);

    // The honest gateway relays the same signed events untouched: all accepted, exactly once.
    let mut honest = Gateway::connect(&mut fleet, "gw-good", cloud.ingest.quic_addr(), session).await;
    honest
        .run_until(&mut signed, &mut no_tamper(), Duration::from_secs(30), |events| committed(events, "meter-1", 100))
        .await;
    assert!(!refused(&honest.events), "{:?}", honest.events);
    let events = stored(&backend).await;
    let seqs: Vec<u64> = events.iter().map(|stored| stored.event.id.seq.0).collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    assert!(events.iter().all(|stored| stored.meta.gateway.as_str() == "gw-good"));
    assert!(events.iter().enumerate().all(|(index, stored)| stored.event.payload == reading(index as f64)));
    let (_, body) = http_get(http, "/api/security/events").await;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["total"], 1, "no false alarm: {body}");
    cloud.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_events_back_and_lose_none() {
    let mut fleet = Fleet::new();
    std::fs::write(fleet.path("device-keys.txt"), registry(&["meter-1", "meter-2"])).unwrap();
    // 300 events; each device at most 100/s, the gateway 150/s in all.
    let config = fleet.config(
        "device_keys = \"device-keys.txt\"",
        "device_events_per_s = 100\ndevice_burst_events = 50\ngateway_events_per_s = 150\ngateway_burst_events = 100",
    );
    let backend = config.backend();
    let cloud = tidesync_cloud::start(config).await.unwrap();
    let mut spool = spool();
    signed_spool(&mut spool, "meter-1", 150);
    signed_spool(&mut spool, "meter-2", 150);
    let session = SessionConfig { batch_events_max: 64, ..SessionConfig::default() };
    let mut gateway = Gateway::connect(&mut fleet, "gw-1", cloud.ingest.quic_addr(), session).await;
    let started = Instant::now();
    gateway
        .run_until(&mut spool, &mut no_tamper(), Duration::from_secs(60), |events| {
            committed(events, "meter-1", 150) && committed(events, "meter-2", 150)
        })
        .await;
    let elapsed = started.elapsed();
    assert!(gateway.throttled(BackpressureReason::RateLimited) >= 1, "{:?}", gateway.events);
    // 300 events, a gateway burst of 100 and one 64-event batch into debt at 150/s: >= 0.9 s.
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    let events = stored(&backend).await;
    for name in ["meter-1", "meter-2"] {
        let seqs: Vec<u64> =
            events.iter().filter(|stored| stored.event.id.device == device(name)).map(|e| e.event.id.seq.0).collect();
        assert_eq!(seqs, (1..=150).collect::<Vec<_>>(), "{name}: every event once");
    }
    let (_, metrics) = http_get(cloud.http_addr.unwrap(), "/metrics").await;
    let limited: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("tidesync_cloud_rate_limited_batches_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(limited >= 1, "{metrics}");
    assert!(metrics.contains("tidesync_cloud_security_events_total"), "{metrics}");
    assert!(!metrics.contains("tidesync_cloud_security_events_total{"), "no violations: {metrics}");
    cloud.shutdown().await.unwrap();
}

async fn metric(http: SocketAddr, name: &str) -> u64 {
    let (_, metrics) = http_get(http, "/metrics").await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
        .parse()
        .unwrap()
}

async fn wait_for_metric(http: SocketAddr, name: &str, at_least: u64) {
    let started = Instant::now();
    while metric(http, name).await < at_least {
        assert!(started.elapsed() < Duration::from_secs(20), "{name} never reached {at_least}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_registry_is_reloaded_for_live_sessions_and_a_bad_file_keeps_the_old_keys() {
    let mut fleet = Fleet::new();
    let keys_path = fleet.path("device-keys.txt");
    std::fs::write(&keys_path, registry(&["meter-0"])).unwrap();
    let config =
        fleet.config("device_keys = \"device-keys.txt\"", "device_events_per_s = 0\ndevice_keys_reload_ms = 50");
    let backend = config.backend();
    let cloud = tidesync_cloud::start(config).await.unwrap();
    let http = cloud.http_addr.unwrap();
    assert_eq!(metric(http, "tidesync_cloud_device_keys").await, 1);
    let session = SessionConfig { batch_events_max: 64, ..SessionConfig::default() };

    // meter-1 has no key yet: refused as an unknown device.
    let mut early = spool();
    signed_spool(&mut early, "meter-1", 10);
    let mut first = Gateway::connect(&mut fleet, "gw-1", cloud.ingest.quic_addr(), session.clone()).await;
    first.run_until(&mut early, &mut no_tamper(), Duration::from_secs(20), refused).await;
    let (_, body) = http_get(http, "/api/security/events").await;
    assert!(body.contains("\"kind\":\"unknown_device\""), "{body}");

    // A session that is already established when the registry changes.
    let mut late = spool();
    let mut live_session = Gateway::connect(&mut fleet, "gw-2", cloud.ingest.quic_addr(), session.clone()).await;
    live_session
        .run_until(&mut late, &mut no_tamper(), Duration::from_secs(20), |events| {
            events.iter().any(|event| matches!(event, SessionEvent::Established { .. }))
        })
        .await;
    assert!(live_session.uplink.is_established());
    std::fs::write(&keys_path, registry(&["meter-0", "meter-1"])).unwrap();
    wait_for_metric(http, "tidesync_cloud_device_keys_reloads_total", 1).await;
    assert_eq!(metric(http, "tidesync_cloud_device_keys").await, 2);
    signed_spool(&mut late, "meter-1", 10);
    live_session.uplink.handle_appended(device("meter-1"));
    live_session
        .run_until(&mut late, &mut no_tamper(), Duration::from_secs(20), |events| committed(events, "meter-1", 10))
        .await;
    assert!(!refused(&live_session.events), "{:?}", live_session.events);
    assert_eq!(stored(&backend).await.len(), 10);

    // A broken registry is refused; the keys in use stay.
    std::fs::write(&keys_path, "meter-1 not-a-key active 0\n").unwrap();
    wait_for_metric(http, "tidesync_cloud_device_keys_reload_failures_total", 1).await;
    assert_eq!(metric(http, "tidesync_cloud_device_keys").await, 2);
    let mut more = spool();
    signed_spool(&mut more, "meter-0", 5);
    live_session.uplink.handle_appended(device("meter-0"));
    live_session
        .run_until(&mut more, &mut no_tamper(), Duration::from_secs(20), |events| committed(events, "meter-0", 5))
        .await;
    assert_eq!(stored(&backend).await.len(), 15);
    cloud.shutdown().await.unwrap();
}

#[test]
fn an_unreadable_registry_stops_the_start() {
    let fleet = Fleet::new();
    std::fs::write(fleet.path("device-keys.txt"), "garbage line\n").unwrap();
    let config = fleet.config("device_keys = \"device-keys.txt\"", "");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let error = runtime.block_on(tidesync_cloud::start(config)).unwrap_err();
    assert!(format!("{error:#}").contains("device-keys.txt"), "{error:#}");
    let missing = fleet.config("device_keys = \"nowhere.txt\"", "");
    let error = runtime.block_on(tidesync_cloud::start(missing)).unwrap_err();
    assert!(format!("{error:#}").contains("nowhere.txt"), "{error:#}");
    assert!(Path::new(&fleet.path("device-keys.txt")).exists());
}
