//! Events flow end to end exactly once, signed by the devices and verified by the cloud; a full
//! spool stops custody and drains when the cloud returns.

use tidesync_core::event::Seq;
use tidesync_core::shadow::Section;
use tidesync_core::sync::Store;
use tidesync_core::value::Value;
use tidesync_gateway::metrics::Metrics;
use tidesync_gateway::Config;
use tidesync_tests::*;

use super::{device, gateway, signed_session, verifying_cloud, TEST_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_once_and_commit_acks_reach_the_devices() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let names = ["pump-1", "pump-2", "pump-3"];
    let sessions: Vec<DeviceSession> = names.iter().map(|name| signed_session(&fleet, device(name))).collect();
    let cloud = verifying_cloud(&mut fleet);
    let settings = GatewaySettings { upstream: Some(cloud.addr()), ..GatewaySettings::default() };
    let config = Config::load(&fleet.gateway_config(gateway("site-1"), &settings).unwrap()).unwrap();
    let running = tidesync_gateway::start(config).await.unwrap();
    let addr = running.quic_addr();

    let n_events = 1_500;
    let mut tasks = Vec::new();
    for (name, session) in names.into_iter().zip(sessions) {
        let pump = device(name);
        let client = device_client(&mut fleet, pump).unwrap();
        let mut store = device_store(pump, n_events).unwrap();
        // Each device also reports a value in its shadow; the gateway relays it to the cloud.
        store.shadow_mut(&pump).unwrap().unwrap().set(Section::Reported, "fw", &Value::Text("1.2".into())).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut progress = DeviceProgress::default();
            let done = |_: &_, progress: &DeviceProgress| progress.committed == Seq(n_events);
            sync_device_until_with(&session, &mut store, pump, &client, addr, &mut progress, done, TEST_TIMEOUT)
                .await
                .unwrap();
            (store, progress)
        }));
    }
    for task in tasks {
        let (store, progress) = task.await.unwrap();
        assert_eq!(progress.custody, Seq(n_events));
        // Committed events are pruned on the device.
        assert!(store.ledger.is_empty(), "device kept {} events", store.ledger.len());
    }
    assert!(cloud.lock().violations.is_empty(), "{:?}", cloud.lock().violations);
    for name in names {
        let pump = device(name);
        let state = cloud.lock();
        assert_eq!(state.store.ledger.events(&pump).count() as u64, n_events);
        assert_eq!(state.n_new[&pump], n_events, "duplicate effect upstream");
        let seqs: Vec<u64> = state.store.ledger.events(&pump).map(|event| event.id.seq.0).collect();
        assert_eq!(seqs, (1..=n_events).collect::<Vec<_>>());
        let shadow = state.store.shadows.get(&pump).expect("shadow relayed to the cloud");
        assert_eq!(shadow.get(Section::Reported, "fw"), Some(Value::Text("1.2".into())));
    }
    let metrics = running.metrics().clone();
    wait_for("the spool to drain", TEST_TIMEOUT, || Metrics::get(&metrics.spool_events) == 0).await.unwrap();
    assert_eq!(Metrics::get(&metrics.events_in_total), 3 * n_events);
    assert_eq!(Metrics::get(&metrics.events_out_total), 3 * n_events);
    assert!(metrics.custody_latency.count() > 0 && metrics.commit_latency.count() > 0);
    let page = tidesync_gateway::cli::fetch_metrics(running.metrics_addr().unwrap()).unwrap();
    assert_eq!(tidesync_gateway::metrics::sample(&page, "tidesync_gateway_events_in_total"), Some(4_500.0));
    assert_eq!(tidesync_gateway::metrics::sample(&page, "tidesync_gateway_upstream_connected"), Some(1.0));
    running.shutdown().await.unwrap();
    cloud.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_stops_custody_then_drains_when_the_cloud_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let cloud_addr = free_udp_port().unwrap();
    // About 81 bytes per event: two batches of 512 fit, the third does not.
    let budget_bytes = 100_000;
    let settings =
        GatewaySettings { upstream: Some(cloud_addr), spool_budget_bytes: budget_bytes, ..GatewaySettings::default() };
    let config = Config::load(&fleet.gateway_config(gateway("site-1"), &settings).unwrap()).unwrap();
    let running = tidesync_gateway::start(config).await.unwrap();
    let addr = running.quic_addr();
    let metrics = running.metrics().clone();

    let pump = device("pump-1");
    let n_events = 2_000;
    let client = device_client(&mut fleet, pump).unwrap();
    let mut store = device_store(pump, n_events).unwrap();
    let mut progress = DeviceProgress::default();
    // Cloud down: the device syncs until the gateway has taken what fits and refused the rest,
    // also on a retry.
    let throttled = |_: &_, progress: &DeviceProgress| progress.n_throttled >= 3 && progress.custody > Seq(0);
    sync_device_until(&mut store, pump, &client, addr, &mut progress, throttled, TEST_TIMEOUT).await.unwrap();
    let spool_bytes = Metrics::get(&metrics.spool_bytes);
    assert!(spool_bytes <= budget_bytes, "spool over budget: {spool_bytes}");
    assert!(
        spool_bytes > budget_bytes * 3 / 4,
        "spool refused custody early: {spool_bytes} bytes, {progress:?}, {} refusals",
        Metrics::get(&metrics.custody_refused_total)
    );
    assert!(progress.custody > Seq(0) && progress.custody < Seq(n_events), "{progress:?}");
    assert!(Metrics::get(&metrics.custody_refused_total) > 0);
    // The device keeps everything: nothing is committed yet.
    assert_eq!(store.ledger.len() as u64, n_events);
    assert_eq!(Metrics::get(&metrics.upstream_connected), 0);

    // The cloud comes back: the spool drains and the device finishes.
    let cloud = TestCloud::start(&mut fleet, cloud_addr).unwrap();
    let done = |_: &_, progress: &DeviceProgress| progress.committed == Seq(n_events);
    sync_device_until(&mut store, pump, &client, addr, &mut progress, done, TEST_TIMEOUT).await.unwrap();
    assert!(store.ledger.is_empty());
    assert_eq!(cloud.n_events(&pump) as u64, n_events);
    assert_eq!(cloud.lock().n_new[&pump], n_events);
    wait_for("the spool to drain", TEST_TIMEOUT, || Metrics::get(&metrics.spool_events) == 0).await.unwrap();
    assert_eq!(Metrics::get(&metrics.spool_bytes), 0);
    running.shutdown().await.unwrap();
    cloud.stop();
}
