//! A gateway that held events a device then delivered through another gateway drains them once
//! it reaches the cloud again (the cloud's Welcome says it holds them). The device signs and the
//! cloud verifies: the copies the first gateway held raise no alarm either.

use tidesync_core::event::Seq;
use tidesync_gateway::metrics::Metrics;
use tidesync_gateway::Config;
use tidesync_tests::*;

use super::{device, gateway, signed_session, verifying_cloud, TEST_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_drains_events_the_cloud_got_through_another_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let pump = device("pump-1");
    let session = signed_session(&fleet, pump);
    let cloud = verifying_cloud(&mut fleet);
    let a_dir = dir.path().join("gw-a");
    // A starts without a reachable cloud: it takes custody and keeps the events.
    let nowhere = free_udp_port().unwrap();
    let a_settings = GatewaySettings { upstream: Some(nowhere), ..GatewaySettings::default() };
    let a_config = fleet.gateway_config_in(&a_dir, gateway("gw-a"), &a_settings).unwrap();
    let a_running = tidesync_gateway::start(Config::load(&a_config).unwrap()).await.unwrap();
    let b_settings = GatewaySettings { upstream: Some(cloud.addr()), ..GatewaySettings::default() };
    let b_config = fleet.gateway_config_in(&dir.path().join("gw-b"), gateway("gw-b"), &b_settings).unwrap();
    let b_running = tidesync_gateway::start(Config::load(&b_config).unwrap()).await.unwrap();

    let n_events = 500;
    let client = device_client(&mut fleet, pump).unwrap();
    let mut store = device_store(pump, n_events).unwrap();
    let mut progress = DeviceProgress::default();
    let custody = |_: &_, progress: &DeviceProgress| progress.custody == Seq(n_events);
    let a_addr = a_running.quic_addr();
    sync_device_until_with(&session, &mut store, pump, &client, a_addr, &mut progress, custody, TEST_TIMEOUT)
        .await
        .unwrap();
    // The spool gauge is refreshed by the gateway's loop after the commit that granted custody.
    let deadline = std::time::Instant::now() + TEST_TIMEOUT;
    while Metrics::get(&a_running.metrics().spool_events) != n_events && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(Metrics::get(&a_running.metrics().spool_events), n_events);
    a_running.shutdown().await.unwrap();

    // The device roams to B, which forwards everything; the cloud commits.
    let committed = |_: &_, progress: &DeviceProgress| progress.committed == Seq(n_events);
    let b_addr = b_running.quic_addr();
    sync_device_until_with(&session, &mut store, pump, &client, b_addr, &mut progress, committed, TEST_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(cloud.lock().n_new[&pump], n_events);

    // A comes back, now with the cloud reachable: its copies are committed upstream already.
    let a_settings = GatewaySettings { upstream: Some(cloud.addr()), ..GatewaySettings::default() };
    let a_config = fleet.gateway_config_in(&a_dir, gateway("gw-a"), &a_settings).unwrap();
    let a_running = tidesync_gateway::start(Config::load(&a_config).unwrap()).await.unwrap();
    let metrics = a_running.metrics().clone();
    wait_for("gateway A to reconnect", TEST_TIMEOUT, || Metrics::get(&metrics.upstream_connected) == 1).await.unwrap();
    let drained =
        wait_for("gateway A to drain", std::time::Duration::from_secs(10), || Metrics::get(&metrics.spool_events) == 0)
            .await;
    assert!(drained.is_ok(), "gateway A still holds {} events the cloud has", Metrics::get(&metrics.spool_events));
    assert_eq!(cloud.lock().n_new[&pump], n_events);
    assert!(cloud.lock().violations.is_empty(), "{:?}", cloud.lock().violations);
    a_running.shutdown().await.unwrap();
    b_running.shutdown().await.unwrap();
    cloud.stop();
}
