//! Scenario tests of the sync sessions through one data-driven helper, `check_sync`.

use super::*;
use crate::event::{GatewayId, Payload, SensorReading};
use crate::shadow::Section;
use crate::value::Value;
use crate::wire::{BackpressureReason, Frame};

fn device() -> DeviceId {
    DeviceId::new("pump-7").unwrap()
}

fn reading(value: f64) -> Payload {
    Payload::Reading(SensorReading { sensor: "temp".into(), value, unit: "Cel".into() })
}

fn device_store() -> MemStore {
    MemStore::new("device:pump-7", MemLedger::pruning(), ShadowKeeping::Only(device()), ShadowLimits::default())
}

fn gateway_store() -> MemStore {
    MemStore::new("gateway:g1", MemLedger::pruning(), ShadowKeeping::All, ShadowLimits::default())
}

/// What the gateway host does with a received batch.
#[derive(Clone, Copy, PartialEq)]
enum GatewayHost {
    Store,
    Refuse,
}

/// Runs a device uplink against a gateway ingest until quiet, with frames passing through
/// `script` (which may drop them), and returns the uplink's events.
fn check_sync(
    device_ledger: &mut MemStore,
    gateway: &mut MemStore,
    host: GatewayHost,
    mut script: impl FnMut(&Frame) -> bool,
) -> (Uplink, Vec<SessionEvent>) {
    let config = SessionConfig { batch_events_max: 3, ..SessionConfig::default() };
    let mut uplink = Uplink::for_device(device(), config.clone(), Millis(0));
    let mut ingest = Ingest::for_gateway(device(), config, Millis(0));
    let mut seen = Vec::new();
    let mut now = Millis(0);
    for _ in 0..200 {
        now = now.plus_ms(1_000);
        let mut moved = false;
        while let Some(frame) = uplink.poll_transmit(now, device_ledger).unwrap() {
            moved = true;
            if script(&frame) {
                let _ = ingest.handle_frame(now, frame, gateway);
            }
        }
        while let Some(event) = ingest.poll_event() {
            if let SessionEvent::EventsReceived(batch) = event {
                match host {
                    GatewayHost::Store => {
                        let appended = gateway.append(&batch).unwrap();
                        ingest.handle_durable(now, batch.device, appended.high);
                    }
                    GatewayHost::Refuse => ingest.handle_refused(now, batch.device, BackpressureReason::StoreFull, 500),
                }
            }
        }
        while let Some(frame) = ingest.poll_transmit(now, gateway) {
            moved = true;
            let _ = uplink.handle_frame(now, frame, device_ledger);
        }
        while let Some(event) = uplink.poll_event() {
            if let SessionEvent::Committed { device, up_to } = &event {
                device_ledger.mark_committed(*device, *up_to).unwrap();
            }
            seen.push(event);
        }
        if !moved {
            uplink.handle_timeout(now);
            ingest.handle_timeout(now);
            if uplink.poll_timeout().is_none() {
                break;
            }
        }
        if !moved && uplink.backlog_events() == 0 && now.0 > 100_000 {
            break;
        }
    }
    (uplink, seen)
}

fn record(store: &mut MemStore, n: u64) {
    for index in 0..n {
        store.ledger.record(device(), Millis(1_000 + index), Millis(1_000 + index), reading(index as f64)).unwrap();
    }
}

#[test]
fn events_reach_the_gateway_once_and_custody_comes_back() {
    let (mut on_device, mut on_gateway) = (device_store(), gateway_store());
    record(&mut on_device, 10);
    let (uplink, events) = check_sync(&mut on_device, &mut on_gateway, GatewayHost::Store, |_| true);
    assert_eq!(on_gateway.ledger.events(&device()).count(), 10);
    assert_eq!(uplink.acked(&device()), Seq(10));
    assert!(events.contains(&SessionEvent::Custody { device: device(), up_to: Seq(10) }));
}

#[test]
fn a_lost_batch_is_resent_after_the_retransmit_timeout() {
    let (mut on_device, mut on_gateway) = (device_store(), gateway_store());
    record(&mut on_device, 9);
    let mut dropped = false;
    let (_, _) = check_sync(&mut on_device, &mut on_gateway, GatewayHost::Store, |frame| {
        // Lose the first batch once.
        if matches!(frame, Frame::Events(_)) && !dropped {
            dropped = true;
            return false;
        }
        true
    });
    let seqs: Vec<u64> = on_gateway.ledger.events(&device()).map(|event| event.id.seq.0).collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
}

#[test]
fn a_full_gateway_applies_backpressure_and_the_device_keeps_its_events() {
    let (mut on_device, mut on_gateway) = (device_store(), gateway_store());
    record(&mut on_device, 4);
    let (uplink, events) = check_sync(&mut on_device, &mut on_gateway, GatewayHost::Refuse, |_| true);
    assert!(events.iter().any(|event| matches!(event, SessionEvent::Throttled { .. })));
    assert_eq!(uplink.acked(&device()), Seq::ZERO);
    assert_eq!(on_device.ledger.events(&device()).count(), 4, "the device keeps what nobody took");
    assert!(on_gateway.ledger.is_empty());
}

#[test]
fn shadows_sync_both_ways_in_one_session() {
    let (mut on_device, mut on_gateway) = (device_store(), gateway_store());
    on_device.shadow_mut(&device()).unwrap().unwrap().set(Section::Reported, "fw", &Value::Text("1.2".into())).unwrap();
    on_gateway.shadow_mut(&device()).unwrap().unwrap().set(Section::Desired, "rate_s", &Value::Int(10)).unwrap();
    let (_, events) = check_sync(&mut on_device, &mut on_gateway, GatewayHost::Store, |_| true);
    let on_device_json = on_device.shadow_mut(&device()).unwrap().unwrap().to_json();
    let on_gateway_json = on_gateway.shadow_mut(&device()).unwrap().unwrap().to_json();
    assert_eq!(on_device_json, on_gateway_json);
    assert_eq!(on_device_json["desired"]["rate_s"], 10);
    assert_eq!(on_device_json["delta"]["rate_s"], 10);
    assert!(events.contains(&SessionEvent::ShadowChanged { device: device() }));
}

#[test]
fn a_device_claiming_another_identity_is_refused() {
    let mut on_gateway = gateway_store();
    let other = DeviceId::new("impostor").unwrap();
    let mut ingest = Ingest::for_gateway(device(), SessionConfig::default(), Millis(0));
    let hello = Frame::Hello(crate::wire::Hello {
        protocol_min: 1,
        protocol_max: 1,
        peer: crate::wire::Peer::Device(other),
        vv: Default::default(),
        wall: Millis(0),
    });
    let error = ingest.handle_frame(Millis(1), hello, &mut on_gateway).unwrap_err();
    assert!(matches!(error, SessionError::Unauthorized { .. }));
    assert!(ingest.is_closed());
    let reply = ingest.poll_transmit(Millis(1), &mut on_gateway).unwrap();
    assert!(matches!(reply, Frame::Error(error) if error.code == crate::wire::ErrorCode::Unauthorized));
}

#[test]
fn events_for_another_device_are_refused_and_nothing_is_stored() {
    let (mut on_device, mut on_gateway) = (device_store(), gateway_store());
    record(&mut on_device, 1);
    let mut ingest = Ingest::for_gateway(device(), SessionConfig::default(), Millis(0));
    let mut uplink = Uplink::for_device(device(), SessionConfig::default(), Millis(0));
    let hello = uplink.poll_transmit(Millis(1), &mut on_device).unwrap().unwrap();
    ingest.handle_frame(Millis(1), hello, &mut on_gateway).unwrap();
    let mut batch = on_device.ledger.read(&device(), Seq(1), 10).unwrap().unwrap();
    let other = DeviceId::new("victim").unwrap();
    batch.device = other;
    batch.events[0].id.device = other;
    let error = ingest.handle_frame(Millis(2), Frame::Events(batch), &mut on_gateway).unwrap_err();
    assert!(matches!(error, SessionError::Unauthorized { .. }));
    let mut received = false;
    while let Some(event) = ingest.poll_event() {
        received |= matches!(event, SessionEvent::EventsReceived(_));
    }
    assert!(!received);
}

#[test]
fn the_cloud_commits_what_a_gateway_forwards() {
    let mut spool = MemStore::new("gateway:g1", MemLedger::pruning(), ShadowKeeping::All, ShadowLimits::default());
    for index in 0..5 {
        spool.ledger.record(device(), Millis(index), Millis(index), reading(1.0)).unwrap();
    }
    let mut cloud = MemStore::new("cloud", MemLedger::new(), ShadowKeeping::All, ShadowLimits::default());
    let gateway = GatewayId::new("g1").unwrap();
    let mut uplink = Uplink::for_gateway(gateway, SessionConfig::default(), Millis(0));
    let mut ingest = Ingest::for_cloud(gateway, SessionConfig::default(), Millis(0));
    for round in 0..5 {
        let now = Millis(round);
        while let Some(frame) = uplink.poll_transmit(now, &mut spool).unwrap() {
            ingest.handle_frame(now, frame, &mut cloud).unwrap();
        }
        while let Some(event) = ingest.poll_event() {
            if let SessionEvent::EventsReceived(batch) = event {
                let appended = cloud.append(&batch).unwrap();
                ingest.handle_durable(now, batch.device, appended.high);
            }
        }
        while let Some(frame) = ingest.poll_transmit(now, &mut cloud) {
            uplink.handle_frame(now, frame, &mut spool).unwrap();
        }
        while let Some(event) = uplink.poll_event() {
            if let SessionEvent::Committed { device, up_to } = event {
                spool.mark_committed(device, up_to).unwrap();
            }
        }
    }
    assert_eq!(cloud.ledger.events(&device()).count(), 5);
    assert!(spool.ledger.is_empty(), "the spool prunes what the cloud committed");
    assert_eq!(spool.high(&device()), Seq(5));
}

#[test]
fn desired_state_set_in_the_cloud_reaches_a_gateway_that_learns_of_the_device_mid_session() {
    // The gateway's session starts before it has any event of the device (empty hello), and the
    // cloud already holds desired state for it.
    let mut spool = MemStore::new("gateway:g1", MemLedger::pruning(), ShadowKeeping::All, ShadowLimits::default());
    let mut cloud = MemStore::new("cloud", MemLedger::new(), ShadowKeeping::All, ShadowLimits::default());
    cloud.shadow_mut(&device()).unwrap().unwrap().set(Section::Desired, "interval_s", &Value::Int(30)).unwrap();
    let gateway = GatewayId::new("g1").unwrap();
    let mut uplink = Uplink::for_gateway(gateway, SessionConfig::default(), Millis(0));
    let mut ingest = Ingest::for_cloud(gateway, SessionConfig::default(), Millis(0));
    for round in 0..10 {
        let now = Millis(round);
        if round == 3 {
            spool.ledger.record(device(), Millis(1), Millis(1), reading(1.0)).unwrap();
            uplink.handle_appended(device());
        }
        while let Some(frame) = uplink.poll_transmit(now, &mut spool).unwrap() {
            ingest.handle_frame(now, frame, &mut cloud).unwrap();
        }
        while let Some(event) = ingest.poll_event() {
            if let SessionEvent::EventsReceived(batch) = event {
                let appended = cloud.append(&batch).unwrap();
                ingest.handle_durable(now, batch.device, appended.high);
            }
        }
        while let Some(frame) = ingest.poll_transmit(now, &mut cloud) {
            uplink.handle_frame(now, frame, &mut spool).unwrap();
        }
        while uplink.poll_event().is_some() {}
    }
    let shadow = spool.shadow_mut(&device()).unwrap().unwrap();
    assert_eq!(shadow.get(Section::Desired, "interval_s"), Some(Value::Int(30)));
}

#[test]
fn a_gateway_prunes_what_the_cloud_got_through_another_gateway() {
    // Gateway A holds five events of the device; the cloud already has them (they went up
    // through gateway B while A could not reach it). A's next session must let A prune them.
    let mut spool = MemStore::new("gateway:a", MemLedger::pruning(), ShadowKeeping::All, ShadowLimits::default());
    let mut cloud = MemStore::new("cloud", MemLedger::new(), ShadowKeeping::All, ShadowLimits::default());
    for index in 0..5 {
        spool.ledger.record(device(), Millis(index), Millis(index), reading(1.0)).unwrap();
        cloud.ledger.record(device(), Millis(index), Millis(index), reading(1.0)).unwrap();
    }
    let gateway = GatewayId::new("a").unwrap();
    let mut uplink = Uplink::for_gateway(gateway, SessionConfig::default(), Millis(0));
    let mut ingest = Ingest::for_cloud(gateway, SessionConfig::default(), Millis(0));
    let mut events_received = 0;
    for round in 0..5 {
        let now = Millis(round);
        while let Some(frame) = uplink.poll_transmit(now, &mut spool).unwrap() {
            ingest.handle_frame(now, frame, &mut cloud).unwrap();
        }
        while let Some(event) = ingest.poll_event() {
            if let SessionEvent::EventsReceived(_) = event {
                events_received += 1;
            }
        }
        while let Some(frame) = ingest.poll_transmit(now, &mut cloud) {
            uplink.handle_frame(now, frame, &mut spool).unwrap();
        }
        while let Some(event) = uplink.poll_event() {
            if let SessionEvent::Committed { device, up_to } = event {
                spool.mark_committed(device, up_to).unwrap();
            }
        }
    }
    assert_eq!(events_received, 0, "nothing is sent again");
    assert!(spool.ledger.is_empty(), "the spool drops what the cloud holds");
}

#[test]
fn a_silent_peer_times_out() {
    let mut on_device = device_store();
    record(&mut on_device, 2);
    let config = SessionConfig::default();
    let mut uplink = Uplink::for_device(device(), config.clone(), Millis(0));
    let mut on_gateway = gateway_store();
    let mut ingest = Ingest::for_gateway(device(), config.clone(), Millis(0));
    let hello = uplink.poll_transmit(Millis(0), &mut on_device).unwrap().unwrap();
    ingest.handle_frame(Millis(0), hello, &mut on_gateway).unwrap();
    while let Some(frame) = ingest.poll_transmit(Millis(0), &mut on_gateway) {
        uplink.handle_frame(Millis(0), frame, &mut on_device).unwrap();
    }
    // The gateway goes silent: batches are sent but nothing comes back.
    let mut events = Vec::new();
    let mut now = Millis(0);
    while !uplink.is_closed() && now.0 < 10 * config.idle_timeout_ms {
        while uplink.poll_transmit(now, &mut on_device).unwrap().is_some() {}
        now = uplink.poll_timeout().unwrap();
        uplink.handle_timeout(now);
        while let Some(event) = uplink.poll_event() {
            events.push(event);
        }
    }
    assert!(events.contains(&SessionEvent::Closed(CloseReason::IdleTimeout)));
    assert!(now.0 >= config.idle_timeout_ms);
}

#[test]
fn resending_without_progress_is_reported_as_a_loop() {
    let mut on_device = device_store();
    record(&mut on_device, 2);
    let config = SessionConfig { idle_timeout_ms: u64::MAX / 4, keepalive_ms: 1_000, ..SessionConfig::default() };
    let mut uplink = Uplink::for_device(device(), config.clone(), Millis(0));
    let mut on_gateway = gateway_store();
    let mut ingest = Ingest::for_gateway(device(), config.clone(), Millis(0));
    let hello = uplink.poll_transmit(Millis(0), &mut on_device).unwrap().unwrap();
    ingest.handle_frame(Millis(0), hello, &mut on_gateway).unwrap();
    while let Some(frame) = ingest.poll_transmit(Millis(0), &mut on_gateway) {
        uplink.handle_frame(Millis(0), frame, &mut on_device).unwrap();
    }
    let mut events = Vec::new();
    let mut now = Millis(0);
    for _ in 0..100 {
        while uplink.poll_transmit(now, &mut on_device).unwrap().is_some() {}
        // Keep the link alive (keep-alives arrive) but never acknowledge.
        uplink
            .handle_frame(now, Frame::KeepAlive(crate::wire::KeepAlive { backlog_events: 0 }), &mut on_device)
            .unwrap();
        now = uplink.poll_timeout().unwrap();
        uplink.handle_timeout(now);
        while let Some(event) = uplink.poll_event() {
            events.push(event);
        }
    }
    assert!(events.iter().any(|event| matches!(event, SessionEvent::ResendLoop { from: Seq(1), .. })));
    assert!(events.iter().any(|event| matches!(event, SessionEvent::Stalled { backlog_events: 2, .. })));
}

#[test]
fn a_roaming_device_sends_a_new_gateway_only_what_it_lacks() {
    let (mut on_device, mut gateway_a, mut gateway_b) = (device_store(), gateway_store(), gateway_store());
    record(&mut on_device, 5);
    check_sync(&mut on_device, &mut gateway_a, GatewayHost::Store, |_| true);
    assert_eq!(gateway_a.ledger.events(&device()).count(), 5);
    // The cloud committed what gateway A forwarded, and the device pruned it.
    on_device.mark_committed(device(), Seq(5)).unwrap();
    assert!(on_device.ledger.is_empty());
    record(&mut on_device, 3);

    let mut sent_seqs = Vec::new();
    check_sync(&mut on_device, &mut gateway_b, GatewayHost::Store, |frame| {
        if let Frame::Events(batch) = frame {
            sent_seqs.extend(batch.events.iter().map(|event| event.id.seq.0));
        }
        true
    });
    assert_eq!(sent_seqs, vec![6, 7, 8], "only the uncommitted events travel");
    assert_eq!(gateway_b.high(&device()), Seq(8));
    assert_eq!(
        gateway_b.ledger.holes(&device()),
        vec![(Seq(1), Seq(5))],
        "the committed seqs are covered, not waited for"
    );
}

#[test]
fn a_lost_hello_closes_both_ends_by_the_handshake_timeout_despite_keepalives() {
    let mut on_device = device_store();
    let mut on_gateway = gateway_store();
    record(&mut on_device, 1);
    let config = SessionConfig { keepalive_ms: 1_000, ..SessionConfig::default() };
    let mut uplink = Uplink::for_device(device(), config.clone(), Millis(0));
    let mut ingest = Ingest::for_gateway(device(), config.clone(), Millis(0));
    // The hello is lost; only keep-alives pass, which keep the idle timers of both ends happy.
    let _lost_hello = uplink.poll_transmit(Millis(0), &mut on_device).unwrap().unwrap();
    let mut now = Millis(0);
    let mut closes = Vec::new();
    while now.0 <= 2 * config.handshake_timeout_ms && closes.len() < 2 {
        now = uplink.poll_timeout().unwrap_or(now).min(ingest.poll_timeout().unwrap_or(now)).max(now.plus_ms(1));
        uplink.handle_timeout(now);
        ingest.handle_timeout(now);
        while let Some(frame) = uplink.poll_transmit(now, &mut on_device).unwrap() {
            let _ = ingest.handle_frame(now, frame, &mut on_gateway);
        }
        while let Some(frame) = ingest.poll_transmit(now, &mut on_gateway) {
            let _ = uplink.handle_frame(now, frame, &mut on_device);
        }
        for event in std::iter::from_fn(|| uplink.poll_event()).chain(std::iter::from_fn(|| ingest.poll_event())) {
            if let SessionEvent::Closed(reason) = event {
                closes.push((now, reason));
            }
        }
    }
    assert!(uplink.is_closed() && ingest.is_closed(), "{closes:?}");
    assert!(closes.iter().any(|(_, reason)| *reason == CloseReason::HandshakeTimeout), "{closes:?}");
    assert!(closes.iter().all(|(at, _)| at.0 >= config.handshake_timeout_ms && at.0 < config.idle_timeout_ms));
}

/// A device uplink with `linger_ms` against a gateway ingest, ticking once a second for `seconds`:
/// at each tick `n_new(t)` events are recorded, the hosts run their timers when due and pass
/// frames (through `pass`, which may drop them). Returns the seconds at which event batches were
/// sent with their sizes, and the uplink's events.
fn drive_lingering(
    on_device: &mut MemStore,
    linger_ms: u64,
    seconds: u64,
    n_new: impl Fn(u64) -> u64,
    mut pass: impl FnMut(&Frame) -> bool,
) -> (Vec<(u64, usize)>, Vec<SessionEvent>) {
    let config = SessionConfig { batch_events_max: 8, linger_ms, stall_ms: 10_000, ..SessionConfig::default() };
    let mut on_gateway = gateway_store();
    let mut uplink = Uplink::for_device(device(), config.clone(), Millis(0));
    let mut ingest = Ingest::for_gateway(device(), config, Millis(0));
    let (mut sent, mut seen) = (Vec::new(), Vec::new());
    for second in 0..=seconds {
        let now = Millis(second * 1_000);
        for _ in 0..n_new(second) {
            on_device.ledger.record(device(), now, now, reading(second as f64)).unwrap();
        }
        if uplink.poll_timeout().is_some_and(|deadline| deadline <= now) {
            uplink.handle_timeout(now);
        }
        if ingest.poll_timeout().is_some_and(|deadline| deadline <= now) {
            ingest.handle_timeout(now);
        }
        // Within one tick, frames go back and forth until both ends are quiet.
        loop {
            let mut moved = false;
            while let Some(frame) = uplink.poll_transmit(now, on_device).unwrap() {
                moved = true;
                if let Frame::Events(batch) = &frame {
                    sent.push((second, batch.events.len()));
                }
                if pass(&frame) {
                    let _ = ingest.handle_frame(now, frame, &mut on_gateway);
                }
            }
            while let Some(event) = ingest.poll_event() {
                if let SessionEvent::EventsReceived(batch) = event {
                    let appended = on_gateway.append(&batch).unwrap();
                    ingest.handle_durable(now, batch.device, appended.high);
                }
            }
            while let Some(frame) = ingest.poll_transmit(now, &mut on_gateway) {
                moved = true;
                let _ = uplink.handle_frame(now, frame, on_device);
            }
            while let Some(event) = uplink.poll_event() {
                seen.push(event);
            }
            if !moved {
                break;
            }
        }
    }
    (sent, seen)
}

#[test]
fn lingering_sends_events_together_when_the_first_has_waited_long_enough() {
    // A reading every 10 s, linger 60 s: the first (at 10 s) is due at 70 s, and the six taken
    // until then leave with it.
    let mut on_device = device_store();
    let (sent, seen) =
        drive_lingering(&mut on_device, 60_000, 140, |second| u64::from(second > 0 && second % 10 == 0), |_| true);
    assert_eq!(sent, vec![(70, 7), (140, 7)]);
    // Waiting on purpose, longer than `stall_ms`, is no stall.
    assert!(!seen.iter().any(|event| matches!(event, SessionEvent::Stalled { .. })), "{seen:?}");
    // Without linger, each reading leaves on its own.
    let mut on_device = device_store();
    let (sent, _) =
        drive_lingering(&mut on_device, 0, 140, |second| u64::from(second > 0 && second % 10 == 0), |_| true);
    assert_eq!(sent, (1..=14).map(|index| (index * 10, 1)).collect::<Vec<_>>());
}

#[test]
fn a_full_batch_does_not_wait_for_the_linger() {
    let mut on_device = device_store();
    // Three at 5 s, then ten at 20 s: at 20 s there are 13 waiting, so a full batch of 8 leaves at
    // once; the 5 left over leave when the wait that began at 5 s is over.
    let (sent, _) = drive_lingering(
        &mut on_device,
        600_000,
        700,
        |second| match second {
            5 => 3,
            20 => 10,
            _ => 0,
        },
        |_| true,
    );
    assert_eq!(sent, vec![(20, 8), (605, 5)]);
}

#[test]
fn a_backlog_found_at_the_handshake_leaves_at_once() {
    let mut on_device = device_store();
    record(&mut on_device, 5);
    let (sent, _) = drive_lingering(&mut on_device, 600_000, 30, |_| 0, |_| true);
    assert_eq!(sent, vec![(0, 5)]);
}

#[test]
fn a_lost_lingering_batch_is_resent_after_the_retransmit_timeout_not_another_linger() {
    let mut on_device = device_store();
    let mut dropped = false;
    let (sent, _) = drive_lingering(
        &mut on_device,
        60_000,
        120,
        |second| u64::from(second == 1),
        |frame| {
            if matches!(frame, Frame::Events(_)) && !dropped {
                dropped = true;
                return false;
            }
            true
        },
    );
    // Due at 61 s, lost, resent 5 s later (the default `retransmit_ms`).
    assert_eq!(sent, vec![(61, 1), (66, 1)]);
    assert_eq!(on_device.ledger.high(&device()), Seq(1));
}
