//! Security over real QUIC on 127.0.0.1: per-device rate limits at the gateway are backpressure
//! (a throttled device drains everything later, nothing lost, nothing duplicated), and device
//! signatures travel untouched through the gateway's spool to a cloud that verifies them (a
//! device without a registered key is refused there, and its events wait in the spool).

use std::sync::Arc;
use std::time::Instant;

use tidesync_core::auth::{DeviceKeys, DeviceSigner, Violation};
use tidesync_core::event::Seq;
use tidesync_core::rate::RateLimit;
use tidesync_core::sync::SessionConfig;
use tidesync_gateway::metrics::Metrics;
use tidesync_gateway::Config;
use tidesync_tests::*;

use super::{device, gateway, metric, TEST_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_device_drains_everything_later_with_nothing_lost_or_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let cloud = TestCloud::start(&mut fleet, loopback_any()).unwrap();
    let rate = RateLimit { events_per_s: 200, burst_events: 100 };
    let settings = GatewaySettings { upstream: Some(cloud.addr()), device_rate: rate, ..GatewaySettings::default() };
    let config = Config::load(&fleet.gateway_config(gateway("site-1"), &settings).unwrap()).unwrap();
    assert_eq!(config.limits.device_rate(), rate);
    let running = tidesync_gateway::start(config).await.unwrap();

    let pump = device("pump-1");
    let n_events = 600;
    let client = device_client(&mut fleet, pump).unwrap();
    let mut store = device_store(pump, n_events).unwrap();
    let session =
        DeviceSession { config: SessionConfig { batch_events_max: 50, ..test_session_config() }, signing_seed: None };
    let mut progress = DeviceProgress::default();
    let started = Instant::now();
    let done = |_: &_, progress: &DeviceProgress| progress.committed == Seq(n_events);
    sync_device_until_with(&session, &mut store, pump, &client, running.quic_addr(), &mut progress, done, TEST_TIMEOUT)
        .await
        .unwrap();
    let elapsed = started.elapsed();

    // The limit held: at 200 events/s with bursts of 100 (and one batch of 50 into debt), 600
    // events take at least (600 - 100 - 50) / 200 s.
    assert!(elapsed.as_secs_f64() >= 2.2, "600 events in {elapsed:?}: the rate limit did not hold");
    assert!(progress.n_throttled > 0, "{progress:?}");
    // Nothing lost: all committed, and the device pruned them only then.
    assert_eq!(progress.custody, Seq(n_events));
    assert!(store.ledger.is_empty(), "device kept {} events", store.ledger.len());
    {
        let state = cloud.lock();
        let seqs: Vec<u64> = state.store.ledger.events(&pump).map(|event| event.id.seq.0).collect();
        assert_eq!(seqs, (1..=n_events).collect::<Vec<_>>());
        // Nothing duplicated: each event took effect once upstream.
        assert_eq!(state.n_new[&pump], n_events);
    }
    let metrics = Arc::clone(running.metrics());
    assert_eq!(Metrics::get(&metrics.events_in_total), n_events, "the gateway took an event into custody twice");
    let throttled_batches = Metrics::get(&metrics.throttled_batches_total);
    let throttled_events = Metrics::get(&metrics.throttled_events_total);
    assert!(throttled_batches >= progress.n_throttled, "{throttled_batches} < {}", progress.n_throttled);
    assert!(throttled_events >= throttled_batches, "{throttled_events} events in {throttled_batches} batches");
    // The counters are on the metrics page (and so in `status`).
    let metrics_addr = running.metrics_addr().unwrap();
    assert_eq!(
        metric(metrics_addr, "tidesync_gateway_throttled_batches_total"),
        Some(throttled_batches as f64),
        "metrics page"
    );
    assert_eq!(metric(metrics_addr, "tidesync_gateway_throttled_events_total"), Some(throttled_events as f64));
    running.shutdown().await.unwrap();
}

/// The seed of a test device's signing key.
fn seed_of(name: &str) -> [u8; 32] {
    let mut seed = [0; 32];
    for (slot, byte) in seed.iter_mut().zip(name.bytes().cycle()) {
        *slot = byte;
    }
    seed
}

/// Core-level cloud (`TestCloud`: core's `Ingest` verifying with a `DeviceKeys` registry over a
/// `MemStore`) behind the real gateway daemon and its spool, with devices driven by core's signing
/// `Uplink`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_events_verify_at_the_cloud_through_the_spool_and_an_unknown_device_waits_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let (honest, stranger) = (device("meter-1"), device("meter-2"));
    let mut keys = DeviceKeys::new();
    keys.insert(honest, DeviceSigner::from_seed(honest, seed_of("meter-1")).public_key()).unwrap();
    let cloud = TestCloud::start_verifying(&mut fleet, loopback_any(), Arc::new(keys)).unwrap();
    let settings = GatewaySettings { upstream: Some(cloud.addr()), ..GatewaySettings::default() };
    let config = Config::load(&fleet.gateway_config(gateway("site-1"), &settings).unwrap()).unwrap();
    let spool_path = config.spool.clone();
    let running = tidesync_gateway::start(config).await.unwrap();
    let addr = running.quic_addr();
    // Device batches of 50, each sealed; the gateway relays batches of up to 512 events, cut
    // right after a seal.
    let session_for = |name: &str| DeviceSession {
        config: SessionConfig { batch_events_max: 50, ..test_session_config() },
        signing_seed: Some(seed_of(name)),
    };

    let n_events = 600;
    let client = device_client(&mut fleet, honest).unwrap();
    let mut store = device_store(honest, n_events).unwrap();
    let mut progress = DeviceProgress::default();
    let done = |_: &_, progress: &DeviceProgress| progress.committed == Seq(n_events);
    sync_device_until_with(
        &session_for("meter-1"),
        &mut store,
        honest,
        &client,
        addr,
        &mut progress,
        done,
        TEST_TIMEOUT,
    )
    .await
    .unwrap();
    {
        let state = cloud.lock();
        assert!(state.violations.is_empty(), "honest relaying raised alarms: {:?}", state.violations);
        let seqs: Vec<u64> = state.store.ledger.events(&honest).map(|event| event.id.seq.0).collect();
        assert_eq!(seqs, (1..=n_events).collect::<Vec<_>>());
        assert_eq!(state.n_new[&honest], n_events);
    }

    // A device whose key the cloud does not know: the gateway takes custody, the cloud refuses.
    let n_stranger = 120;
    let client = device_client(&mut fleet, stranger).unwrap();
    let mut store = device_store(stranger, n_stranger).unwrap();
    let mut progress = DeviceProgress::default();
    let done = |_: &_, progress: &DeviceProgress| progress.custody == Seq(n_stranger);
    sync_device_until_with(
        &session_for("meter-2"),
        &mut store,
        stranger,
        &client,
        addr,
        &mut progress,
        done,
        TEST_TIMEOUT,
    )
    .await
    .unwrap();
    wait_for("the cloud to refuse the stranger", TEST_TIMEOUT, || {
        cloud.lock().violations.iter().any(|(device, _, _)| *device == stranger)
    })
    .await
    .unwrap();
    {
        let state = cloud.lock();
        let (_, relayed_by, violation) = state.violations.iter().find(|(device, ..)| *device == stranger).unwrap();
        assert_eq!(*relayed_by, Some(gateway("site-1")), "the violation names the gateway");
        assert_eq!(*violation, Violation::UnknownDevice);
        assert_eq!(state.store.ledger.events(&stranger).count(), 0, "refused events were stored");
    }
    assert_eq!(progress.committed, Seq(0));
    assert_eq!(store.ledger.len() as u64, n_stranger, "the device keeps what the cloud did not commit");
    running.shutdown().await.unwrap();
    // Not lost, not committed: every event waits in the spool.
    let spool = tidesync_gateway::spool::Spool::open_read_only(&spool_path).unwrap();
    let held: Vec<_> = spool.device_stats().into_iter().filter(|(device, ..)| *device == stranger).collect();
    assert_eq!(held, vec![(stranger, Seq(n_stranger), Seq(0), n_stranger)]);
}
