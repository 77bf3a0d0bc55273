//! The real `tidesync-gateway` process killed with SIGKILL mid-stream and restarted: nothing it
//! acknowledged is lost, and nothing reaches the cloud twice. Then SIGTERM stops it cleanly.
//! The device signs and the cloud verifies: the seals survive the crash in the spool.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tidesync_core::event::Seq;
use tidesync_core::ledger::Ledger;
use tidesync_core::shadow::ShadowLimits;
use tidesync_gateway::spool::Spool;
use tidesync_tests::*;

use super::{device, gateway, signed_session, spawn_gateway, verifying_cloud, wait_until_serving, TEST_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_acknowledged_and_duplicates_nothing_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let pump = device("pump-1");
    let session = signed_session(&fleet, pump);
    let cloud = verifying_cloud(&mut fleet);
    let quic_addr = free_udp_port().unwrap();
    let metrics_addr = free_tcp_port().unwrap();
    let settings = GatewaySettings {
        listen: quic_addr,
        metrics_listen: Some(metrics_addr),
        upstream: Some(cloud.addr()),
        ..GatewaySettings::default()
    };
    let config = fleet.gateway_config(gateway("site-1"), &settings).unwrap();
    let log = dir.path().join("gateway.log");
    let mut child = spawn_gateway(&config, &log);
    wait_until_serving(metrics_addr).await;

    let n_events = 6_000;
    let client = device_client(&mut fleet, pump).unwrap();
    let mut store = device_store(pump, n_events).unwrap();
    let mut progress = DeviceProgress::default();
    // Kill the gateway from inside the session loop, with batches in flight.
    let pid = Pid::from_raw(child.id() as i32);
    let kill_mid_stream = move |_: &_, progress: &DeviceProgress| {
        let mid = progress.custody >= Seq(1_000);
        if mid {
            kill(pid, Signal::SIGKILL).unwrap();
        }
        mid
    };
    sync_device_with(&session, &mut store, pump, &client, quic_addr, &mut progress, kill_mid_stream, TEST_TIMEOUT)
        .await
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "gateway was not killed: {status}");
    let acknowledged = progress.custody;
    assert!(acknowledged < Seq(n_events), "the kill came too late to be mid-stream");

    // Everything acknowledged is in the spool after the crash.
    {
        let spool =
            Spool::open(&dir.path().join("spool.db"), "gateway:site-1", u64::MAX, ShadowLimits::default()).unwrap();
        assert!(spool.high(&pump) >= acknowledged, "spool high {} < custody {acknowledged}", spool.high(&pump));
    }

    let mut child = spawn_gateway(&config, &log);
    wait_until_serving(metrics_addr).await;
    let done = |_: &_, progress: &DeviceProgress| progress.committed == Seq(n_events);
    sync_device_until_with(&session, &mut store, pump, &client, quic_addr, &mut progress, done, TEST_TIMEOUT)
        .await
        .unwrap();
    assert!(store.ledger.is_empty());
    {
        let state = cloud.lock();
        assert!(state.violations.is_empty(), "the crash raised alarms: {:?}", state.violations);
        let seqs: Vec<u64> = state.store.ledger.events(&pump).map(|event| event.id.seq.0).collect();
        assert_eq!(seqs, (1..=n_events).collect::<Vec<_>>());
        assert_eq!(state.n_new[&pump], n_events, "an event took effect twice upstream");
    }

    // SIGTERM: a graceful stop with exit status 0.
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "gateway ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status}; log:\n{log_text}");
    assert!(log_text.contains("SIGTERM received") && log_text.contains("gateway stopped"), "{log_text}");
    cloud.stop();
}
