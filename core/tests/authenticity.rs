//! End to end through the sans-IO sessions: a signing device, a relaying gateway and a verifying
//! cloud. Honest relaying (also merged, trimmed and after drops) is accepted; every attack of a
//! compromised gateway, and a cloned device (also one whose batch starts with a hole right after
//! what the cloud holds), is refused with a violation naming device and gateway, and nothing of it
//! is stored.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use proptest::prelude::*;

use tidesync_core::auth::{DeviceKeys, DeviceSigner, Violation};
use tidesync_core::event::{DeviceId, GatewayId, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::{Ledger, MemLedger};
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::sync::{Ingest, MemStore, SessionConfig, SessionEvent, ShadowKeeping, Uplink};
use tidesync_core::wire::{BackpressureReason, Frame};

fn device() -> DeviceId {
    DeviceId::new("meter-9").unwrap()
}

fn gateway() -> GatewayId {
    GatewayId::new("gw-1").unwrap()
}

fn signer() -> DeviceSigner {
    DeviceSigner::from_seed(device(), [42; 32])
}

fn keys() -> Arc<DeviceKeys> {
    let mut keys = DeviceKeys::new();
    keys.insert(device(), signer().public_key()).unwrap();
    Arc::new(keys)
}

fn store(name: &str, keeps: ShadowKeeping) -> MemStore {
    let ledger = if name.starts_with("cloud") { MemLedger::new() } else { MemLedger::pruning() };
    MemStore::new(name, ledger, keeps, ShadowLimits::default())
}

fn record(store: &mut MemStore, n: u64, base: f64) {
    for index in 0..n {
        let payload =
            Payload::Reading(SensorReading { sensor: "t".into(), value: base + index as f64, unit: "Cel".into() });
        store.ledger.record(device(), Millis(1_000 + index), Millis(1_000 + index), payload).unwrap();
    }
}

fn config() -> SessionConfig {
    SessionConfig { batch_events_max: 4, ..SessionConfig::default() }
}

/// Runs one session between `uplink` and `ingest` until quiet; frames from the client pass through
/// `tamper`. Returns the server's events.
fn pump(
    uplink: &mut Uplink,
    client: &mut MemStore,
    ingest: &mut Ingest,
    server: &mut MemStore,
    mut tamper: impl FnMut(Frame) -> Vec<Frame>,
) -> Vec<SessionEvent> {
    let mut seen = Vec::new();
    let now = Millis(10_000);
    for _ in 0..100 {
        let mut moved = false;
        while let Some(frame) = uplink.poll_transmit(now, client).unwrap() {
            moved = true;
            for frame in tamper(frame) {
                let _ = ingest.handle_frame(now, frame, server);
            }
        }
        while let Some(event) = ingest.poll_event() {
            if let SessionEvent::EventsReceived(batch) = &event {
                let appended = server.append(batch).unwrap();
                ingest.handle_durable(now, batch.device, appended.high);
            }
            seen.push(event);
        }
        while let Some(frame) = ingest.poll_transmit(now, server) {
            moved = true;
            let _ = uplink.handle_frame(now, frame, client);
        }
        while let Some(event) = uplink.poll_event() {
            if let SessionEvent::Committed { device, up_to } = event {
                client.mark_committed(device, up_to).unwrap();
            }
        }
        if !moved {
            break;
        }
    }
    seen
}

/// Device → gateway: the device signs.
fn to_gateway(on_device: &mut MemStore, on_gateway: &mut MemStore) {
    let mut uplink = Uplink::for_device(device(), config(), Millis(0)).signing(signer());
    let mut ingest = Ingest::for_gateway(device(), config(), Millis(0));
    pump(&mut uplink, on_device, &mut ingest, on_gateway, |frame| vec![frame]);
}

/// Gateway → cloud through `tamper`; returns the violations the cloud reported and whether it
/// told the gateway to hold the device's events.
fn to_cloud(
    on_gateway: &mut MemStore,
    cloud: &mut MemStore,
    tamper: impl FnMut(Frame) -> Vec<Frame>,
) -> (Vec<Violation>, Vec<SessionEvent>) {
    let mut uplink = Uplink::for_gateway(gateway(), config(), Millis(0));
    let mut ingest = Ingest::for_cloud(gateway(), config(), Millis(0)).verifying(keys());
    let events = pump(&mut uplink, on_gateway, &mut ingest, cloud, tamper);
    let violations = events
        .iter()
        .filter_map(|event| match event {
            SessionEvent::Violation { device: d, gateway: Some(g), violation } if *d == device() && *g == gateway() => {
                Some(violation.clone())
            }
            _ => None,
        })
        .collect();
    (violations, events)
}

fn stored(cloud: &MemStore) -> Vec<f64> {
    cloud
        .ledger
        .events(&device())
        .map(|event| match &event.payload {
            Payload::Reading(reading) => reading.value,
            _ => f64::NAN,
        })
        .collect()
}

fn fleet(n: u64) -> (MemStore, MemStore, MemStore) {
    let mut on_device = store("device", ShadowKeeping::Only(device()));
    let mut on_gateway = store("gateway", ShadowKeeping::All);
    record(&mut on_device, n, 0.0);
    to_gateway(&mut on_device, &mut on_gateway);
    (on_device, on_gateway, store("cloud", ShadowKeeping::All))
}

#[test]
fn honest_relaying_is_accepted_without_alarms() {
    let (mut on_device, mut on_gateway, mut cloud) = fleet(10);
    let (violations, _) = to_cloud(&mut on_gateway, &mut cloud, |frame| vec![frame]);
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(stored(&cloud), (0..10).map(f64::from).collect::<Vec<_>>());
    // More later, after the device dropped some under storage pressure: the hole is proven.
    on_device.ledger.mark_committed(device(), Seq(10)).unwrap();
    record(&mut on_device, 10, 100.0);
    on_device.ledger.drop_oldest(device(), 3, Millis(50_000));
    to_gateway(&mut on_device, &mut on_gateway);
    let (violations, _) = to_cloud(&mut on_gateway, &mut cloud, |frame| vec![frame]);
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(cloud.ledger.holes(&device()), vec![(Seq(11), Seq(13))]);
    assert_eq!(cloud.ledger.high(&device()), on_device.ledger.high(&device()));
}

fn attack(tamper: impl FnMut(Frame) -> Vec<Frame>) -> (Vec<Violation>, Vec<SessionEvent>, MemStore) {
    let (_, mut on_gateway, mut cloud) = fleet(12);
    let (violations, events) = to_cloud(&mut on_gateway, &mut cloud, tamper);
    (violations, events, cloud)
}

fn on_events(mut change: impl FnMut(&mut tidesync_core::wire::EventBatch)) -> impl FnMut(Frame) -> Vec<Frame> {
    move |frame| match frame {
        Frame::Events(mut batch) => {
            change(&mut batch);
            vec![Frame::Events(batch)]
        }
        frame => vec![frame],
    }
}

#[test]
fn an_altered_event_is_refused_and_the_gateway_told_to_hold() {
    let (violations, events, cloud) = attack(on_events(|batch| {
        if let Payload::Reading(reading) = &mut batch.events[0].payload {
            reading.value += 1.0;
        }
    }));
    assert!(matches!(violations.first(), Some(Violation::BadSeal { .. })), "{violations:?}");
    assert!(stored(&cloud).is_empty());
    assert!(!events.iter().any(|event| matches!(event, SessionEvent::EventsReceived(_))));
    let _ = BackpressureReason::Refused;
}

#[test]
fn forged_reordered_and_cut_batches_are_refused() {
    // A forged event appended to a sealed run.
    let (violations, _, cloud) = attack(on_events(|batch| {
        let mut forged = batch.events.last().unwrap().clone();
        forged.id.seq = forged.id.seq.next();
        batch.events.push(forged);
    }));
    assert!(matches!(violations.first(), Some(Violation::NotSealed { .. })), "{violations:?}");
    assert!(stored(&cloud).is_empty());

    let (violations, _, _) = attack(on_events(|batch| {
        let (a, b) = (batch.events[0].clone(), batch.events[1].clone());
        batch.events[0].payload = b.payload;
        batch.events[1].payload = a.payload;
    }));
    assert!(matches!(violations.first(), Some(Violation::BadSeal { .. })), "{violations:?}");

    // Cut the first two events out and declare them a hole.
    let (violations, _, cloud) = attack(on_events(|batch| {
        if batch.from == Seq(1) {
            let mut cut = batch.after(Seq(2)).unwrap();
            cut.from = Seq(1);
            *batch = cut;
        }
    }));
    assert_eq!(violations.first(), Some(&Violation::BadHole { first: Seq(1), last: Seq(2) }));
    assert!(stored(&cloud).is_empty());

    // Strip the signatures.
    let (violations, _, _) = attack(on_events(|batch| batch.proof = None));
    assert_eq!(violations.first(), Some(&Violation::Unsigned));
}

#[test]
fn a_replay_of_what_the_cloud_acknowledged_is_refused() {
    let (_, mut on_gateway, mut cloud) = fleet(8);
    let mut captured = Vec::new();
    let (violations, _) = to_cloud(&mut on_gateway, &mut cloud, |frame| {
        if let Frame::Events(batch) = &frame {
            captured.push(batch.clone());
        }
        vec![frame]
    });
    assert!(violations.is_empty());
    // A later session: the gateway replays an old batch instead of (or besides) new data.
    let old = captured[0].clone();
    let mut replayed = false;
    let (violations, _) = to_cloud(&mut on_gateway, &mut cloud, |frame| {
        let mut out = vec![frame.clone()];
        if matches!(frame, Frame::KeepAlive(_) | Frame::Hello(_)) && !replayed {
            replayed = true;
            out.push(Frame::Events(old.clone()));
        }
        out
    });
    assert_eq!(violations, vec![Violation::Replay { last: old.last_seq() }]);
    assert_eq!(stored(&cloud).len(), 8);
}

#[test]
fn a_cloned_device_signing_a_second_history_is_caught() {
    // Two devices with one identity and one key record different readings for the same seqs,
    // through two gateways.
    let (_, mut gateway_a, mut cloud) = fleet(6);
    let mut clone = store("device", ShadowKeeping::Only(device()));
    record(&mut clone, 9, 500.0);
    let mut gateway_b = store("gateway-b", ShadowKeeping::All);
    to_gateway(&mut clone, &mut gateway_b);
    let (violations, _) = to_cloud(&mut gateway_a, &mut cloud, |frame| vec![frame]);
    assert!(violations.is_empty());
    let (violations, _) = to_cloud(&mut gateway_b, &mut cloud, |frame| vec![frame]);
    assert!(matches!(violations.first(), Some(Violation::Equivocation { .. })), "{violations:?}");
    assert_eq!(stored(&cloud), (0..6).map(f64::from).collect::<Vec<_>>());
}

#[test]
fn a_duplicate_with_different_content_is_equivocation_even_below_the_head() {
    let (_, mut gateway_a, mut cloud) = fleet(8);
    let (violations, _) = to_cloud(&mut gateway_a, &mut cloud, |frame| vec![frame]);
    assert!(violations.is_empty());
    // A clone's signed history of only four events, all below what the cloud holds.
    let mut clone = store("device", ShadowKeeping::Only(device()));
    record(&mut clone, 4, 700.0);
    let mut gateway_b = store("gateway-b", ShadowKeeping::All);
    to_gateway(&mut clone, &mut gateway_b);
    let batch = gateway_b.ledger.read(&device(), Seq(1), 100).unwrap().unwrap();
    let mut ingest = Ingest::for_cloud(gateway(), config(), Millis(0)).verifying(keys());
    let mut uplink = Uplink::for_gateway(gateway(), config(), Millis(0));
    let mut fresh_gateway = store("gateway-c", ShadowKeeping::All);
    let events = pump(&mut uplink, &mut fresh_gateway, &mut ingest, &mut cloud, |frame| {
        let mut out = vec![frame.clone()];
        if matches!(frame, Frame::Hello(_)) {
            out.push(Frame::Events(batch.clone()));
        }
        out
    });
    assert!(
        events
            .iter()
            .any(|event| matches!(event, SessionEvent::Violation { violation: Violation::Equivocation { .. }, .. })),
        "{events:?}"
    );
}

/// A device whose first `committed` events the cloud holds (through gateway A) goes on with
/// `extra` events of its own history (`base` tells histories apart), drops `dropped` of them under
/// storage pressure, and relays through gateway B, which knows from the cloud what it committed.
/// Returns the cloud's violations, the cloud and the device.
fn after_a_hole_through_gateway_b(
    committed: u64,
    extra: u64,
    dropped: usize,
    clone: bool,
) -> (Vec<Violation>, MemStore, MemStore) {
    let (original, mut gateway_a, mut cloud) = fleet(committed);
    let (violations, _) = to_cloud(&mut gateway_a, &mut cloud, |frame| vec![frame]);
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(cloud.ledger.high(&device()), Seq(committed));
    let mut on_device = if clone {
        // Same identity and key, its own readings for the same seqs: a second history.
        let mut clone = store("device", ShadowKeeping::Only(device()));
        record(&mut clone, committed, 500.0);
        clone
    } else {
        original
    };
    record(&mut on_device, extra, 100.0);
    // Told what is committed (as a gateway relays the cloud's commit), it prunes that.
    on_device.ledger.mark_committed(device(), Seq(committed)).unwrap();
    let hole = on_device.ledger.drop_oldest(device(), dropped, Millis(50_000)).unwrap();
    assert_eq!(hole, (Seq(committed + 1), Seq(committed + dropped as u64)));
    let mut gateway_b = store("gateway-b", ShadowKeeping::All);
    gateway_b.ledger.mark_committed(device(), Seq(committed)).unwrap();
    to_gateway(&mut on_device, &mut gateway_b);
    let (violations, _) = to_cloud(&mut gateway_b, &mut cloud, |frame| vec![frame]);
    (violations, cloud, on_device)
}

#[test]
fn a_clone_whose_batch_starts_with_a_hole_at_the_clouds_head_is_refused() {
    // The original commits 1..=6 through gateway A; the clone (same key) drops 7..=8 and relays
    // 9.. through gateway B. Its hole proof signs the chain before the hole: its own, not the
    // cloud's.
    let (violations, cloud, _) = after_a_hole_through_gateway_b(6, 6, 2, true);
    assert_eq!(violations.first(), Some(&Violation::Equivocation { seq: Seq(6) }), "{violations:?}");
    assert_eq!(stored(&cloud), (0..6).map(f64::from).collect::<Vec<_>>());
    assert_eq!(cloud.ledger.high(&device()), Seq(6));
    assert!(cloud.ledger.holes(&device()).is_empty());
}

#[test]
fn an_honest_hole_right_after_the_clouds_head_is_accepted() {
    let (violations, cloud, on_device) = after_a_hole_through_gateway_b(6, 6, 2, false);
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(cloud.ledger.holes(&device()), vec![(Seq(7), Seq(8))]);
    assert_eq!(cloud.ledger.high(&device()), on_device.ledger.high(&device()));
    assert_eq!(cloud.ledger.chain_head(&device()), on_device.ledger.chain_head(&device()));
    let held: Vec<_> = on_device.ledger.events(&device()).cloned().collect();
    let tail: Vec<_> = cloud.ledger.events(&device()).skip(6).cloned().collect();
    assert_eq!(tail, held);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Wherever the hole falls after what the cloud holds, the device's own continuation is
    /// accepted with its hole, and a clone's is refused as an equivocation at the cloud's head with
    /// nothing of it stored.
    #[test]
    fn a_hole_at_the_head_links_to_the_history_held(committed in 1u64..8, extra in 2u64..8, dropped in 1usize..8) {
        let dropped = dropped.min(extra as usize - 1);
        let (violations, cloud, _) = after_a_hole_through_gateway_b(committed, extra, dropped, false);
        prop_assert!(violations.is_empty(), "{:?}", violations);
        prop_assert_eq!(cloud.ledger.holes(&device()), vec![(Seq(committed + 1), Seq(committed + dropped as u64))]);
        let (violations, cloud, _) = after_a_hole_through_gateway_b(committed, extra, dropped, true);
        prop_assert_eq!(violations.first(), Some(&Violation::Equivocation { seq: Seq(committed) }));
        prop_assert_eq!(cloud.ledger.high(&device()), Seq(committed));
        prop_assert_eq!(stored(&cloud), (0..committed).map(|value| value as f64).collect::<Vec<_>>());
    }
}
