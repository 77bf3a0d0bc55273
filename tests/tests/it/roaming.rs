//! A real device agent roams between two real gateways mid-backlog: its gateway is killed with
//! SIGKILL while thousands of events are still on the device, the device moves to the other
//! gateway, and in the end the cloud holds every event exactly once and the device has pruned.
//! The killed gateway then comes back with what it had spooled: the cloud takes no second effect.
//! The device signs with its PKI-issued key and the cloud verifies every batch, as in a real
//! deployment: the spool of the killed gateway keeps the seals, and roaming raises no alarm.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand_chacha::rand_core::SeedableRng;
use tidesync_core::event::{Millis, Payload, SensorReading};
use tidesync_core::net::pki::Identity;
use tidesync_core::net::quic::TransportLimits;
use tidesync_core::sync::SessionConfig;
use tidesync_device::uplink::{self, UplinkCounters, UplinkOptions};
use tidesync_device::{Agent, DeviceStore, LedgerConfig, SigningKey, Status};
use tidesync_gateway::Config;
use tidesync_tests::*;
use tokio::sync::watch;

use super::{
    device, gateway, issue_signing_key, metric, spawn_gateway, verifying_cloud, wait_until_serving, TEST_TIMEOUT,
};

/// The device's status, read on a blocking thread (the agent answers from its writer thread).
async fn status(agent: &Arc<Agent>) -> Status {
    let agent = Arc::clone(agent);
    tokio::task::spawn_blocking(move || agent.status().unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_roams_to_another_gateway_when_its_gateway_is_killed_mid_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let pump = device("pump-roam");
    let signing = SigningKey::load(&issue_signing_key(&fleet, pump)).unwrap();
    let cloud = verifying_cloud(&mut fleet);

    // Gateway A: the real binary, to be killed. Gateway B: in process.
    let a_quic = free_udp_port().unwrap();
    let a_metrics = free_tcp_port().unwrap();
    let a_settings = GatewaySettings {
        listen: a_quic,
        metrics_listen: Some(a_metrics),
        upstream: Some(cloud.addr()),
        ..GatewaySettings::default()
    };
    let a_config = fleet.gateway_config_in(&dir.path().join("gw-a"), gateway("gw-a"), &a_settings).unwrap();
    let a_log = dir.path().join("gw-a.log");
    let mut a_child = spawn_gateway(&a_config, &a_log);
    let b_settings = GatewaySettings { upstream: Some(cloud.addr()), ..GatewaySettings::default() };
    let b_config = fleet.gateway_config_in(&dir.path().join("gw-b"), gateway("gw-b"), &b_settings).unwrap();
    let b_running = tidesync_gateway::start(Config::load(&b_config).unwrap()).await.unwrap();
    wait_until_serving(a_metrics).await;

    // The device: a SQLite ledger with a backlog of several thousand readings.
    let n_events = 6_000u64;
    let store = DeviceStore::create(&dir.path().join("device.sqlite3"), pump, LedgerConfig::default()).unwrap();
    let agent = Arc::new(Agent::start(store).unwrap());
    let items: Vec<(Millis, Payload)> = (0..n_events)
        .map(|index| {
            let reading = SensorReading { sensor: "flow".into(), value: index as f64 / 4.0, unit: "l/min".into() };
            (Millis(1_700_000_000_000 + index * 1_000), Payload::Reading(reading))
        })
        .collect();
    agent.record_batch(&items).unwrap();

    let gateways: Vec<SocketAddr> = vec![a_quic, b_running.quic_addr()];
    let options = UplinkOptions {
        gateways,
        credentials: fleet.credentials(Identity::Device(pump)).unwrap(),
        // Small batches keep the backlog on the device long enough to kill A in the middle of it.
        session: SessionConfig {
            batch_events_max: 64,
            batches_in_flight_max: 2,
            retransmit_ms: 500,
            ..test_session_config()
        },
        transport: TransportLimits { idle_timeout_ms: 2_000, keep_alive_ms: 400, ..TransportLimits::default() },
        connect_timeout_ms: 1_000,
        backoff_initial_ms: 50,
        backoff_max_ms: 400,
    };
    let counters = Arc::new(UplinkCounters::default());
    let (stop, shutdown) = watch::channel(false);
    let running = tokio::spawn(uplink::run_with_key(
        Arc::clone(&agent),
        options,
        Some(signing),
        Arc::clone(&counters),
        rand_chacha::ChaCha8Rng::seed_from_u64(4),
        shutdown,
    ));

    // Kill A once it has taken custody of some of the backlog, with the rest still to send.
    wait_for("gateway A takes custody of 1,000 events", TEST_TIMEOUT, || counters.snapshot().custody_seq >= 1_000)
        .await
        .unwrap();
    kill(Pid::from_raw(a_child.id() as i32), Signal::SIGKILL).unwrap();
    let at_kill = counters.snapshot();
    assert!(!a_child.wait().unwrap().success());
    assert!(at_kill.custody_seq < n_events, "the kill came after the backlog was sent: {at_kill:?}");
    assert_eq!(at_kill.sessions, 1, "the device was on gateway A only: {at_kill:?}");

    // The device notices (idle timeout), moves to B and finishes there.
    wait_for("every event is committed through gateway B", TEST_TIMEOUT, || {
        counters.snapshot().committed_seq == n_events
    })
    .await
    .unwrap();
    let after_roaming = counters.snapshot();
    assert!(after_roaming.sessions >= 2, "{after_roaming:?}");
    assert_eq!(after_roaming.unsigned_batches, 0, "every batch was sealed: {after_roaming:?}");
    {
        let state = cloud.lock();
        assert!(state.violations.is_empty(), "roaming raised alarms: {:?}", state.violations);
        let seqs: Vec<u64> = state.store.ledger.events(&pump).map(|event| event.id.seq.0).collect();
        assert_eq!(seqs, (1..=n_events).collect::<Vec<_>>());
        assert_eq!(state.n_new[&pump], n_events, "an event took effect twice in the cloud");
    }
    let device_status = status(&agent).await;
    assert_eq!(device_status.committed_seq, n_events);
    assert_eq!(device_status.backlog_events, 0);
    assert!(device_status.custody_seqs.get("gw-a").is_some_and(|seq| *seq >= 1_000), "{device_status:?}");
    assert_eq!(device_status.custody_seqs.get("gw-b"), Some(&n_events), "{device_status:?}");
    let mut pruned = false;
    for _ in 0..200 {
        if status(&agent).await.held_events == 0 {
            pruned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(pruned, "the device kept events after the commit: {:?}", status(&agent).await);

    // A comes back with what it spooled before the kill: whatever it forwards, the cloud dedupes.
    let mut a_child = spawn_gateway(&a_config, &a_log);
    wait_until_serving(a_metrics).await;
    wait_for("gateway A reconnects to the cloud", TEST_TIMEOUT, || {
        metric(a_metrics, "tidesync_gateway_upstream_connected") == Some(1.0)
    })
    .await
    .unwrap();
    // Give its uplink a few round trips to send anything it would send.
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let state = cloud.lock();
        assert!(state.violations.is_empty(), "gateway A's leftovers raised alarms: {:?}", state.violations);
        assert_eq!(state.store.ledger.events(&pump).count() as u64, n_events);
        assert_eq!(state.n_new[&pump], n_events, "gateway A's leftovers took effect a second time");
    }

    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    kill(Pid::from_raw(a_child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(tokio::task::spawn_blocking(move || a_child.wait().unwrap()).await.unwrap().success());
    b_running.shutdown().await.unwrap();
    cloud.stop();
}
