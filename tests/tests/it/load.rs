//! Many concurrent devices, each with its own certificate and connection, against one gateway
//! that forwards to the cloud: every event arrives exactly once. The default run has 100 devices;
//! `TIDESYNC_LOAD_DEVICES=1000` runs the full-size one (the `tidesync-load` binary does too).

use std::time::Duration;

use tidesync_core::event::DeviceId;
use tidesync_core::sync::SessionConfig;
use tidesync_tests::load::{self, LoadOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_devices_deliver_every_event_exactly_once() {
    let n_devices = std::env::var("TIDESYNC_LOAD_DEVICES").ok().and_then(|value| value.parse().ok()).unwrap_or(100);
    let n_events_per_device = 200;
    let options = LoadOptions {
        n_devices,
        n_events_per_device,
        session: SessionConfig { batch_events_max: 64, ..SessionConfig::default() },
        until_committed: true,
        timeout: Duration::from_secs(90),
    };
    let dir = tempfile::tempdir().unwrap();
    let run = load::run_with_gateway(dir.path(), &options).await.unwrap();
    let report = &run.report;
    assert_eq!(report.n_errors, 0, "{report}");
    assert_eq!(report.n_connected, n_devices, "{report}");
    assert_eq!(report.n_custody, report.n_events, "{report}");
    assert_eq!(report.n_committed, report.n_events, "{report}");
    assert_eq!(run.events_in_total, report.n_events, "the gateway counted other events than were sent");
    // Group commits gather many devices' batches: far fewer commits than batches.
    let n_batches = report.n_events.div_ceil(64);
    assert!(run.group_commits < n_batches, "{} group commits for {n_batches} batches", run.group_commits);
    let cloud = run.cloud.as_ref().unwrap();
    let state = cloud.lock();
    for index in 0..n_devices {
        let device = DeviceId::new(&format!("load-{index}")).unwrap();
        let seqs: Vec<u64> = state.store.ledger.events(&device).map(|event| event.id.seq.0).collect();
        assert_eq!(seqs, (1..=n_events_per_device).collect::<Vec<_>>(), "{device}");
        assert_eq!(state.n_new[&device], n_events_per_device, "{device} took effect twice");
    }
    drop(state);
    cloud.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_baseline_stores_every_event_once_before_acknowledging() {
    let dir = tempfile::tempdir().unwrap();
    let spool_path = dir.path().join("json-spool.db");
    let server = load::json::JsonServer::start(&spool_path).await.unwrap();
    let devices: Vec<DeviceId> = (0..10).map(|index| DeviceId::new(&format!("json-{index}")).unwrap()).collect();
    let options = LoadOptions {
        n_devices: devices.len(),
        n_events_per_device: 300,
        session: SessionConfig { batch_events_max: 64, ..SessionConfig::default() },
        until_committed: false,
        timeout: Duration::from_secs(30),
    };
    let report = load::json::run(server.addr(), &devices, &options).await;
    assert_eq!(report.n_errors, 0, "{report}");
    assert_eq!(report.n_custody, 3_000, "{report}");
    assert!(report.frame_bytes_up > 3_000 * 50, "JSON is not that small: {report}");
    let n_commits = server.stop().await.unwrap();
    assert!(n_commits > 0 && n_commits < 3_000u64.div_ceil(64), "{n_commits} group commits");
    let spool = tidesync_gateway::spool::Spool::open_read_only(&spool_path).unwrap();
    assert_eq!(spool.stats().n_events, 3_000);
    for device in &devices {
        assert_eq!(tidesync_core::ledger::Ledger::high(&spool, device).0, 300);
    }
}
