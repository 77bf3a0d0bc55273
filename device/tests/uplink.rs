//! The device uplink over real QUIC on 127.0.0.1 against test gateways built from core's
//! `Ingest` session (the real gateway daemon is tested in the tests crate): every event arrives
//! exactly once, custody and commit acks become watermarks and the device prunes, the shadow
//! syncs both ways, a device roams to another gateway when one dies mid-stream, and a device
//! with a signing key seals every batch so that the relayed history verifies.

// Test helpers outside #[test] functions may unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use tidesync_core::auth::{format_seed, verify_batch, DeviceKeys};
use tidesync_core::event::{DeviceId, GatewayId, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::{Ledger, MemLedger};
use tidesync_core::net::pki::{FleetCa, Identity};
use tidesync_core::net::quic::{CloseCode, Server, TransportLimits};
use tidesync_core::net::tls::Credentials;
use tidesync_core::shadow::{Section, ShadowLimits};
use tidesync_core::sync::{Ingest, MemStore, SessionConfig, SessionEvent, ShadowKeeping};
use tidesync_core::value::Value;
use tidesync_device::uplink::{self, UplinkCounters, UplinkOptions};
use tidesync_device::{Agent, DeviceStore, LedgerConfig, SigningKey};
use tokio::sync::watch;

fn wall() -> Millis {
    Millis(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64)
}

struct Fleet {
    ca: FleetCa,
}

impl Fleet {
    fn new() -> Self {
        let now = wall();
        Self { ca: FleetCa::create("test-fleet", Millis(now.0 - 3_600_000), Millis(now.0 + 86_400_000)).unwrap() }
    }

    fn credentials(&self, identity: Identity, serial: u64) -> Credentials {
        let now = wall();
        let issued = self.ca.issue(identity, serial, Millis(now.0 - 3_600_000), Millis(now.0 + 86_400_000)).unwrap();
        Credentials {
            ca_pem: self.ca.cert_pem().to_string(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            crl_pem: None,
        }
    }
}

/// What the test gateways share: the "upstream" store, and how many new events it took.
#[derive(Default)]
struct Upstream {
    store: Option<MemStore>,
    n_new: usize,
}

/// A gateway that takes custody and commits at once (it stands in for gateway and cloud).
struct TestGateway {
    addr: SocketAddr,
    server: Arc<Server>,
    task: tokio::task::JoinHandle<()>,
}

impl TestGateway {
    fn start(fleet: &Fleet, name: &str, upstream: Arc<Mutex<Upstream>>) -> Self {
        let credentials = fleet.credentials(Identity::Gateway(GatewayId::new(name).unwrap()), 100);
        let server =
            Arc::new(Server::bind("127.0.0.1:0".parse().unwrap(), &credentials, TransportLimits::default()).unwrap());
        let addr = server.local_addr().unwrap();
        let accepting = Arc::clone(&server);
        let task = tokio::spawn(async move {
            while let Some(pending) = accepting.accept().await {
                let upstream = Arc::clone(&upstream);
                tokio::spawn(async move {
                    let Ok(link) = pending.establish().await else { return };
                    let Identity::Device(device) = link.peer() else { return };
                    let limits = TransportLimits::default();
                    let Ok(stream) = link.accept_stream(&limits).await else { return };
                    let (mut sender, mut receiver) = stream.split();
                    let mut ingest = Ingest::for_gateway(device, SessionConfig::default(), wall());
                    loop {
                        let frames = {
                            let mut upstream = upstream.lock().unwrap();
                            let Upstream { store, n_new } = &mut *upstream;
                            let store = store.as_mut().unwrap();
                            let mut frames = Vec::new();
                            loop {
                                while let Some(event) = ingest.poll_event() {
                                    if let SessionEvent::EventsReceived(batch) = event {
                                        let appended = store.append(&batch).unwrap();
                                        *n_new += appended.n_new;
                                        ingest.handle_durable(wall(), device, appended.high);
                                        ingest.handle_committed(wall(), device, appended.high);
                                    }
                                }
                                match ingest.poll_transmit(wall(), store) {
                                    Some(frame) => frames.push(frame),
                                    None => break,
                                }
                            }
                            frames
                        };
                        for frame in &frames {
                            if sender.send(frame).await.is_err() {
                                return;
                            }
                        }
                        if ingest.is_closed() {
                            let _ = sender.finish().await;
                            return;
                        }
                        let frame = tokio::select! {
                            frame = receiver.recv() => frame,
                            () = tokio::time::sleep(Duration::from_millis(200)) => {
                                ingest.handle_timeout(wall());
                                continue;
                            }
                        };
                        let Ok(Some(frame)) = frame else { return };
                        let mut upstream = upstream.lock().unwrap();
                        let store = upstream.store.as_mut().unwrap();
                        let _ = ingest.handle_frame(wall(), frame, store);
                    }
                });
            }
        });
        Self { addr, server, task }
    }

    /// Kills the gateway: the endpoint closes every connection at once.
    fn kill(self) {
        self.server.close(CloseCode::ShuttingDown);
        self.task.abort();
    }
}

fn upstream_store() -> Arc<Mutex<Upstream>> {
    let store = MemStore::new("gateway:test", MemLedger::new(), ShadowKeeping::All, ShadowLimits::default());
    Arc::new(Mutex::new(Upstream { store: Some(store), n_new: 0 }))
}

fn start_agent(dir: &tempfile::TempDir, device: DeviceId) -> Arc<Agent> {
    let store = DeviceStore::create(&dir.path().join("ledger.sqlite3"), device, LedgerConfig::default()).unwrap();
    Arc::new(Agent::start(store).unwrap())
}

fn record(agent: &Agent, from: u64, n: u64) {
    let items: Vec<(Millis, Payload)> = (from..from + n)
        .map(|i| {
            (
                Millis(1_700_000_000_000 + i),
                Payload::Reading(SensorReading { sensor: "t".into(), value: i as f64, unit: "Cel".into() }),
            )
        })
        .collect();
    agent.record_batch(&items).unwrap();
}

fn options(fleet: &Fleet, device: DeviceId, gateways: Vec<SocketAddr>) -> UplinkOptions {
    UplinkOptions {
        gateways,
        credentials: fleet.credentials(Identity::Device(device), 7),
        session: SessionConfig { retransmit_ms: 500, ..SessionConfig::default() },
        transport: TransportLimits { idle_timeout_ms: 3_000, keep_alive_ms: 500, ..TransportLimits::default() },
        connect_timeout_ms: 1_000,
        backoff_initial_ms: 50,
        backoff_max_ms: 400,
    }
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn upstream_seqs(upstream: &Mutex<Upstream>, device: &DeviceId) -> Vec<u64> {
    let upstream = upstream.lock().unwrap();
    upstream.store.as_ref().unwrap().ledger.events(device).map(|event| event.id.seq.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_exactly_once_the_device_prunes_and_the_shadow_syncs_both_ways() {
    let fleet = Fleet::new();
    let device = DeviceId::new("sensor-1").unwrap();
    let upstream = upstream_store();
    let gateway = TestGateway::start(&fleet, "gw-a", Arc::clone(&upstream));
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&dir, device);
    record(&agent, 1, 3000);
    agent.report("firmware", Value::Text("1.4.2".into())).unwrap();
    let watch_desired = agent.watch_desired().unwrap();

    let counters = Arc::new(UplinkCounters::default());
    let (stop, shutdown) = watch::channel(false);
    let running = tokio::spawn(uplink::run(
        Arc::clone(&agent),
        options(&fleet, device, vec![gateway.addr]),
        Arc::clone(&counters),
        rand_chacha::ChaCha8Rng::seed_from_u64(1),
        shutdown,
    ));
    wait_until("all 3001 events are committed", Duration::from_secs(30), || counters.snapshot().committed_seq == 3001)
        .await;
    // Recording while connected goes up without any poll interval.
    record(&agent, 3002, 10);
    wait_until("the live events are committed", Duration::from_secs(10), || counters.snapshot().committed_seq == 3011)
        .await;
    assert_eq!(upstream_seqs(&upstream, &device), (1..=3011).collect::<Vec<_>>());
    assert_eq!(upstream.lock().unwrap().n_new, 3011, "no event stored twice");

    // Reported state went up with the session.
    wait_until("the reported shadow arrives", Duration::from_secs(10), || {
        let mut upstream = upstream.lock().unwrap();
        let store = upstream.store.as_mut().unwrap();
        store.shadows.get(&device).and_then(|shadow| shadow.get(Section::Reported, "firmware"))
            == Some(Value::Text("1.4.2".into()))
    })
    .await;

    // The device pruned after the commits.
    let agent_for_status = Arc::clone(&agent);
    let status = tokio::task::spawn_blocking(move || agent_for_status.status().unwrap()).await.unwrap();
    assert_eq!(status.committed_seq, 3011);
    assert_eq!(status.backlog_events, 0);
    assert_eq!(status.custody_seqs.get("gw-a"), Some(&3011));
    wait_until("the device prunes", Duration::from_secs(10), || {
        let agent = Arc::clone(&agent);
        std::thread::spawn(move || agent.status().unwrap().held_events).join().unwrap() == 0
    })
    .await;

    // Desired state set at the gateway reaches the device (the gateway's next session sends it).
    {
        let mut upstream = upstream.lock().unwrap();
        let store = upstream.store.as_mut().unwrap();
        store.shadows.get_mut(&device).unwrap().set(Section::Desired, "interval_s", &Value::Int(30)).unwrap();
    }
    // Reconnect so the gateway offers its shadow again (a real gateway tells live sessions).
    gateway.kill();
    let gateway = TestGateway::start(&fleet, "gw-a", Arc::clone(&upstream));
    let (stop2, shutdown2) = watch::channel(false);
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    let running = tokio::spawn(uplink::run(
        Arc::clone(&agent),
        options(&fleet, device, vec![gateway.addr]),
        Arc::clone(&counters),
        rand_chacha::ChaCha8Rng::seed_from_u64(2),
        shutdown2,
    ));
    let desired = tokio::task::spawn_blocking(move || watch_desired.recv_timeout(Duration::from_secs(15)))
        .await
        .unwrap()
        .expect("desired state reaches the device");
    assert_eq!(desired.as_map().unwrap().get("interval_s"), Some(&Value::Int(30)));
    stop2.send(true).unwrap();
    running.await.unwrap().unwrap();
    gateway.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_roams_when_its_gateway_dies_mid_stream_and_nothing_is_lost_or_doubled() {
    // Logs show in the output of a failed run (RUST_LOG=tidesync_device=debug for more).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let fleet = Fleet::new();
    let device = DeviceId::new("sensor-2").unwrap();
    let upstream = upstream_store();
    let dead: SocketAddr = {
        // A port nobody listens on: the first gateway in the list is unreachable.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let gateway_a = TestGateway::start(&fleet, "gw-a", Arc::clone(&upstream));
    let gateway_b = TestGateway::start(&fleet, "gw-b", Arc::clone(&upstream));
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&dir, device);
    let counters = Arc::new(UplinkCounters::default());
    let (stop, shutdown) = watch::channel(false);
    let running = tokio::spawn(uplink::run(
        Arc::clone(&agent),
        options(&fleet, device, vec![dead, gateway_a.addr, gateway_b.addr]),
        Arc::clone(&counters),
        rand_chacha::ChaCha8Rng::seed_from_u64(3),
        shutdown,
    ));
    // Record in the background while gateway A dies. The second half is recorded only once A is
    // dead, so that it must go through B however fast A took the first half.
    let recording = |chunks: std::ops::Range<u64>| {
        let agent = Arc::clone(&agent);
        std::thread::spawn(move || {
            for chunk in chunks {
                record(&agent, 1 + chunk * 100, 100);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let first_half = recording(0..20);
    wait_until("gateway A got some events", Duration::from_secs(20), || counters.snapshot().committed_seq >= 500).await;
    gateway_a.kill();
    first_half.join().unwrap();
    recording(20..40).join().unwrap();
    let start = Instant::now();
    while counters.snapshot().committed_seq != 4000 {
        if start.elapsed() > Duration::from_secs(30) {
            // Say where it stuck: the uplink's counters, what the gateways hold, the ledger.
            let held = upstream_seqs(&upstream, &device);
            let agent_for_status = Arc::clone(&agent);
            let status = tokio::task::spawn_blocking(move || agent_for_status.status().unwrap()).await.unwrap();
            panic!(
                "timed out waiting until everything is committed via gateway B: {:?}; upstream holds {} up to {:?}; {status:?}",
                counters.snapshot(),
                held.len(),
                held.last()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream_seqs(&upstream, &device), (1..=4000).collect::<Vec<_>>());
    assert_eq!(upstream.lock().unwrap().n_new, 4000, "no event stored twice");
    let snapshot = counters.snapshot();
    assert!(snapshot.sessions >= 2, "{snapshot:?}");
    assert!(snapshot.connect_failures >= 1, "the dead gateway was tried: {snapshot:?}");
    let agent_for_status = Arc::clone(&agent);
    let status = tokio::task::spawn_blocking(move || agent_for_status.status().unwrap()).await.unwrap();
    assert!(status.custody_seqs.contains_key("gw-b"), "{:?}", status.custody_seqs);
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    gateway_b.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_device_seals_every_batch_and_the_relayed_history_verifies() {
    let fleet = Fleet::new();
    let device = DeviceId::new("sensor-3").unwrap();
    let upstream = upstream_store();
    let gateway = TestGateway::start(&fleet, "gw-a", Arc::clone(&upstream));
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("sensor-3.sign.key");
    std::fs::write(&key_path, format_seed(&[0x42; 32])).unwrap();
    let key = SigningKey::load(&key_path).unwrap();
    let mut keys = DeviceKeys::new();
    keys.insert(device, key.public_key()).unwrap();
    let agent = start_agent(&dir, device);
    record(&agent, 1, 700);

    let counters = Arc::new(UplinkCounters::default());
    let (stop, shutdown) = watch::channel(false);
    let running = tokio::spawn(uplink::run_with_key(
        Arc::clone(&agent),
        options(&fleet, device, vec![gateway.addr]),
        Some(key.clone()),
        Arc::clone(&counters),
        rand_chacha::ChaCha8Rng::seed_from_u64(4),
        shutdown,
    ));
    wait_until("700 events are committed", Duration::from_secs(30), || counters.snapshot().committed_seq == 700).await;
    // The device prunes what was committed; what it records next continues the chain from the
    // floor it kept.
    wait_until("the device prunes", Duration::from_secs(10), || {
        let agent = Arc::clone(&agent);
        std::thread::spawn(move || agent.status().unwrap().held_events).join().unwrap() == 0
    })
    .await;
    record(&agent, 701, 50);
    wait_until("the later events are committed", Duration::from_secs(10), || counters.snapshot().committed_seq == 750)
        .await;
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    gateway.kill();
    assert_eq!(counters.snapshot().unsigned_batches, 0);

    // The relay kept every seal; the whole history verifies as the cloud checks it, and its head
    // is the device's chain head.
    let relayed =
        upstream.lock().unwrap().store.as_ref().unwrap().ledger.read(&device, Seq(1), 10_000).unwrap().unwrap();
    assert_eq!(relayed.events.len(), 750);
    let proof = relayed.proof.as_ref().unwrap();
    assert!(proof.seals.len() >= 2, "one seal per batch sent: {}", proof.seals.len());
    let verified = verify_batch(&keys, &relayed, None).unwrap();
    let agent_for_head = Arc::clone(&agent);
    let head = tokio::task::spawn_blocking(move || agent_for_head.with_store(move |store| store.chain_head(&device)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Some(verified.head), head);
    // Another key does not verify it, nor does an altered event.
    let mut other_keys = DeviceKeys::new();
    other_keys.insert(device, SigningKey::from_seed([0x43; 32]).public_key()).unwrap();
    assert!(verify_batch(&other_keys, &relayed, None).is_err());
    let mut altered = relayed.clone();
    altered.events[10].event_time = Millis(altered.events[10].event_time.0 + 1);
    assert!(verify_batch(&keys, &altered, None).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_device_sends_readings_taken_over_time_in_one_batch() {
    let fleet = Fleet::new();
    let device = DeviceId::new("sensor-4").unwrap();
    let upstream = upstream_store();
    let gateway = TestGateway::start(&fleet, "gw-a", Arc::clone(&upstream));
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&dir, device);
    let counters = Arc::new(UplinkCounters::default());
    let (stop, shutdown) = watch::channel(false);
    let mut options = options(&fleet, device, vec![gateway.addr]);
    options.session.linger_ms = 3_000;
    let running = tokio::spawn(uplink::run(
        Arc::clone(&agent),
        options,
        Arc::clone(&counters),
        rand_chacha::ChaCha8Rng::seed_from_u64(4),
        shutdown,
    ));
    // Five readings 100 ms apart, once the session is up with nothing to send.
    wait_until("the session is up", Duration::from_secs(10), || counters.snapshot().sessions > 0).await;
    // (Connected is counted before the handshake, which takes a few ms on loopback: a backlog
    // found at the handshake would leave at once.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    for seq in 1..=5 {
        record(&agent, seq, 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until("the five readings are committed", Duration::from_secs(15), || counters.snapshot().committed_seq == 5)
        .await;
    assert_eq!(upstream_seqs(&upstream, &device), vec![1, 2, 3, 4, 5]);
    assert_eq!(counters.snapshot().batches_out, 1, "the readings left together");
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    gateway.kill();
}
