//! Authorization at the gateway: a device may write only its own events, and a malformed frame
//! closes the connection; nothing is stored either way, and what was stored before stays.

use std::time::Duration;

use tidesync_core::event::Seq;
use tidesync_core::ledger::Ledger;
use tidesync_core::net::pki;
use tidesync_core::net::quic::TransportLimits;
use tidesync_core::vv::VersionVector;
use tidesync_core::wire::{ErrorCode, Frame, Hello, Peer, FRAME_BYTES_MAX, PROTOCOL_VERSION};
use tidesync_gateway::metrics::Metrics;
use tidesync_gateway::spool::Spool;
use tidesync_gateway::Config;
use tidesync_tests::*;

use super::{device, gateway, TEST_TIMEOUT};

/// Reads frames until the gateway closes; returns them.
async fn frames_until_close(receiver: &mut tidesync_core::net::quic::FrameReceiver) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Ok(Ok(Some(frame))) = tokio::time::timeout(TEST_TIMEOUT, receiver.recv()).await {
        frames.push(frame);
    }
    frames
}

fn hello(peer: tidesync_core::event::DeviceId) -> Frame {
    Frame::Hello(Hello {
        protocol_min: 1,
        protocol_max: PROTOCOL_VERSION,
        peer: Peer::Device(peer),
        vv: VersionVector::new(),
        wall: wall_now(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sending_another_devices_batch_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let config_path = fleet.gateway_config(gateway("site-1"), &GatewaySettings::default()).unwrap();
    let config = Config::load(&config_path).unwrap();
    let spool_path = config.spool.clone();
    let running = tidesync_gateway::start(config).await.unwrap();
    let metrics = running.metrics().clone();

    // pump-7 authenticates as itself, then sends pump-8's events.
    let (pump7, pump8) = (device("pump-7"), device("pump-8"));
    let client = device_client(&mut fleet, pump7).unwrap();
    let link = client.connect(running.quic_addr(), pki::GATEWAY_SERVER_NAME, 5_000).await.unwrap();
    let stream = link.open_stream(&TransportLimits::default()).await.unwrap();
    let (mut sender, mut receiver) = stream.split();
    sender.send(&hello(pump7)).await.unwrap();
    assert!(matches!(receiver.recv().await.unwrap(), Some(Frame::Welcome(_))));
    let forged = device_store(pump8, 10).unwrap().ledger.read(&pump8, Seq(1), 10).unwrap().unwrap();
    sender.send(&Frame::Events(forged)).await.unwrap();
    let frames = frames_until_close(&mut receiver).await;
    let error = frames.iter().find_map(|frame| match frame {
        Frame::Error(error) => Some(error.clone()),
        _ => None,
    });
    let error = error.expect("an error frame");
    assert_eq!(error.code, ErrorCode::Unauthorized);
    assert!(error.message.contains("pump-8"), "{}", error.message);
    assert!(!frames.iter().any(|frame| matches!(frame, Frame::Custody(_))));
    wait_for("the auth failure counter", Duration::from_secs(5), || Metrics::get(&metrics.auth_failures_total) == 1)
        .await
        .unwrap();
    running.shutdown().await.unwrap();
    let spool = Spool::open_read_only(&spool_path).unwrap();
    assert_eq!(spool.high(&pump8), Seq(0));
    assert_eq!(spool.stats().n_events, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_claiming_another_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let config = Config::load(&fleet.gateway_config(gateway("site-1"), &GatewaySettings::default()).unwrap()).unwrap();
    let running = tidesync_gateway::start(config).await.unwrap();
    let client = device_client(&mut fleet, device("pump-7")).unwrap();
    let link = client.connect(running.quic_addr(), pki::GATEWAY_SERVER_NAME, 5_000).await.unwrap();
    let (mut sender, mut receiver) = link.open_stream(&TransportLimits::default()).await.unwrap().split();
    sender.send(&hello(device("pump-8"))).await.unwrap();
    let frames = frames_until_close(&mut receiver).await;
    assert!(matches!(frames.as_slice(), [Frame::Error(error)] if error.code == ErrorCode::Unauthorized), "{frames:?}");
    assert_eq!(Metrics::get(&running.metrics().auth_failures_total), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_gets_an_error_frame_and_a_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let config = Config::load(&fleet.gateway_config(gateway("site-1"), &GatewaySettings::default()).unwrap()).unwrap();
    let running = tidesync_gateway::start(config).await.unwrap();
    let pump = device("pump-7");
    let client = device_client(&mut fleet, pump).unwrap();
    let link = client.connect(running.quic_addr(), pki::GATEWAY_SERVER_NAME, 5_000).await.unwrap();
    let (mut sender, mut receiver) = link.open_stream(&TransportLimits::default()).await.unwrap().split();
    sender.send(&hello(pump)).await.unwrap();
    assert!(matches!(receiver.recv().await.unwrap(), Some(Frame::Welcome(_))));
    // An events frame whose body is garbage.
    sender.send_raw(&[4, 3, 0xff, 0xff, 0xff]).await.unwrap();
    let frames = frames_until_close(&mut receiver).await;
    assert!(
        frames.iter().any(|frame| matches!(frame, Frame::Error(error) if error.code == ErrorCode::Malformed)),
        "{frames:?}"
    );
    assert_eq!(Metrics::get(&running.metrics().malformed_frames_total), 1);
    running.shutdown().await.unwrap();
}

/// A LEB128 length prefix.
fn length_prefix(mut len: u64) -> Vec<u8> {
    let mut prefix = Vec::new();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            prefix.push(byte);
            return prefix;
        }
        prefix.push(byte | 0x80);
    }
}

/// A device that has stored events, then sends `bad` bytes: it gets an error frame with
/// `expected` and a close, the malformed counter moves, and the spool keeps exactly what it
/// acknowledged before.
async fn refuse_after_custody(bad: &[u8], expected: ErrorCode) {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(dir.path()).unwrap();
    let config = Config::load(&fleet.gateway_config(gateway("site-1"), &GatewaySettings::default()).unwrap()).unwrap();
    let spool_path = config.spool.clone();
    let running = tidesync_gateway::start(config).await.unwrap();
    let pump = device("pump-7");
    let client = device_client(&mut fleet, pump).unwrap();
    let link = client.connect(running.quic_addr(), pki::GATEWAY_SERVER_NAME, 5_000).await.unwrap();
    let (mut sender, mut receiver) = link.open_stream(&TransportLimits::default()).await.unwrap().split();
    sender.send(&hello(pump)).await.unwrap();
    assert!(matches!(receiver.recv().await.unwrap(), Some(Frame::Welcome(_))));
    let store = device_store(pump, 50).unwrap();
    sender.send(&Frame::Events(store.ledger.read(&pump, Seq(1), 50).unwrap().unwrap())).await.unwrap();
    loop {
        match receiver.recv().await.unwrap() {
            Some(Frame::Custody(ack)) if ack.up_to == Seq(50) => break,
            Some(_) => {}
            None => panic!("the gateway closed before custody"),
        }
    }
    // The bad bytes, then a valid batch that must not be stored: the stream is not trusted after.
    sender.send_raw(bad).await.unwrap();
    let more = device_store(pump, 60).unwrap().ledger.read(&pump, Seq(51), 10).unwrap().unwrap();
    let _ = sender.send(&Frame::Events(more)).await;
    let frames = frames_until_close(&mut receiver).await;
    assert!(frames.iter().any(|frame| matches!(frame, Frame::Error(error) if error.code == expected)), "{frames:?}");
    assert!(!frames.iter().any(|frame| matches!(frame, Frame::Custody(ack) if ack.up_to > Seq(50))), "{frames:?}");
    // The connection is closed, not just the stream.
    let closed = tokio::time::timeout(TEST_TIMEOUT, link.closed()).await;
    assert!(closed.is_ok(), "the gateway left the connection open");
    assert_eq!(Metrics::get(&running.metrics().malformed_frames_total), 1);
    running.shutdown().await.unwrap();
    let spool = Spool::open_read_only(&spool_path).unwrap();
    assert_eq!(spool.high(&pump), Seq(50));
    assert_eq!(spool.stats().n_events, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_and_what_was_stored_stays() {
    // A length prefix one byte over the limit, and the start of a body: the gateway must refuse
    // on the prefix, not buffer a megabyte first.
    let mut bad = length_prefix(FRAME_BYTES_MAX as u64 + 1);
    bad.extend_from_slice(&[4; 64]);
    refuse_after_custody(&bad, ErrorCode::FrameTooLarge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_with_a_broken_length_prefix_is_refused_and_what_was_stored_stays() {
    // Six continuation bytes that add up to nothing: no LEB128 u32 is that long. (Continuation
    // bytes that already add up past the limit are refused as too large, however they arrive.)
    refuse_after_custody(&[0x80; 6], ErrorCode::Malformed).await;
}
