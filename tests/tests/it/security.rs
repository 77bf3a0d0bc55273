//! Security over real QUIC on 127.0.0.1: per-device rate limits at the gateway are backpressure
//! (a throttled device drains everything later, nothing lost, nothing duplicated), and device
//! signatures travel untouched through the gateway's spool to a cloud that verifies them (a
//! device without a registered key is refused there, and its events wait in the spool).
//!
//! Devices sign with keys issued by the fleet's PKI (`issue_signing_key`) and the cloud verifies
//! against the registry the PKI wrote, as in a real deployment.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tidesync_core::auth::{Violation, SEED_BYTES};
use tidesync_core::event::{DeviceId, Seq};
use tidesync_core::rate::RateLimit;
use tidesync_core::sync::{MemStore, SessionConfig};
use tidesync_gateway::metrics::Metrics;
use tidesync_gateway::Config;
use tidesync_tests::*;

use super::{device, gateway, issue_signing_key, metric, signing_seed, verifying_cloud, TEST_TIMEOUT};

/// Runs a core-level device holding `n_events` readings, sealing its batches of 50 with the key
/// whose seed is `seed`, against the gateway at `addr` until `done` holds. Returns the device's
/// store and what it heard.
async fn sync_signed_device(
    fleet: &mut Fleet,
    device: DeviceId,
    seed: [u8; SEED_BYTES],
    n_events: u64,
    addr: SocketAddr,
    done: impl Fn(&MemStore, &DeviceProgress) -> bool + Copy,
) -> (MemStore, DeviceProgress) {
    let session = DeviceSession {
        config: SessionConfig { batch_events_max: 50, ..test_session_config() },
        signing_seed: Some(seed),
    };
    let client = device_client(fleet, device).unwrap();
    let mut store = device_store(device, n_events).unwrap();
    let mut progress = DeviceProgress::default();
    sync_device_until_with(&session, &mut store, device, &client, addr, &mut progress, done, TEST_TIMEOUT)
        .await
        .unwrap();
    (store, progress)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_device_drains_everything_later_with_nothing_lost_or_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let pump = device("pump-1");
    let seed = signing_seed(&issue_signing_key(&fleet, pump));
    let cloud = verifying_cloud(&mut fleet);
    let rate = RateLimit { events_per_s: 200, burst_events: 100 };
    let settings = GatewaySettings { upstream: Some(cloud.addr()), device_rate: rate, ..GatewaySettings::default() };
    let config = Config::load(&fleet.gateway_config(gateway("site-1"), &settings).unwrap()).unwrap();
    assert_eq!(config.limits.device_rate(), rate);
    let running = tidesync_gateway::start(config).await.unwrap();

    let n_events = 600;
    let started = Instant::now();
    let done = |_: &_, progress: &DeviceProgress| progress.committed == Seq(n_events);
    let (store, progress) = sync_signed_device(&mut fleet, pump, seed, n_events, running.quic_addr(), done).await;
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
        assert!(state.violations.is_empty(), "throttling raised alarms: {:?}", state.violations);
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

/// Core-level cloud (`TestCloud`: core's `Ingest` verifying with the fleet's `DeviceKeys` registry
/// over a `MemStore`) behind the real gateway daemon and its spool, with devices driven by core's
/// signing `Uplink`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_events_verify_at_the_cloud_through_the_spool_and_an_unknown_device_waits_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let (honest, stranger) = (device("meter-1"), device("meter-2"));
    let honest_seed = signing_seed(&issue_signing_key(&fleet, honest));
    // The stranger signs with a key the fleet's PKI never issued.
    let stranger_seed = [0x5a; SEED_BYTES];
    let cloud = verifying_cloud(&mut fleet);
    let settings = GatewaySettings { upstream: Some(cloud.addr()), ..GatewaySettings::default() };
    let config = Config::load(&fleet.gateway_config(gateway("site-1"), &settings).unwrap()).unwrap();
    let spool_path = config.spool.clone();
    let running = tidesync_gateway::start(config).await.unwrap();
    let addr = running.quic_addr();

    // Device batches of 50, each sealed; the gateway relays batches of up to 512 events, cut
    // right after a seal.
    let n_events = 600;
    let done = |_: &_, progress: &DeviceProgress| progress.committed == Seq(n_events);
    sync_signed_device(&mut fleet, honest, honest_seed, n_events, addr, done).await;
    {
        let state = cloud.lock();
        assert!(state.violations.is_empty(), "honest relaying raised alarms: {:?}", state.violations);
        let seqs: Vec<u64> = state.store.ledger.events(&honest).map(|event| event.id.seq.0).collect();
        assert_eq!(seqs, (1..=n_events).collect::<Vec<_>>());
        assert_eq!(state.n_new[&honest], n_events);
    }

    // A device whose key the cloud does not know: the gateway takes custody, the cloud refuses.
    let n_stranger = 120;
    let done = |_: &_, progress: &DeviceProgress| progress.custody == Seq(n_stranger);
    let (store, progress) = sync_signed_device(&mut fleet, stranger, stranger_seed, n_stranger, addr, done).await;
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
