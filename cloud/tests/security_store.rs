//! Conformance of the store's security state on every backend (SQLite in a temp dir; PostgreSQL at
//! `TIDESYNC_TEST_POSTGRES_URL`, one schema per test, skipped loudly when unset): chain heads are
//! written with the appends that move them and survive a reopen, so a verifying ingest catches a
//! second signed history after a restart; security events are recorded, counted when repeated,
//! paged newest first, and durable only with their commit.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod backends;

use std::sync::Arc;

use tidesync_cloud::store::{Backend, CloudStore, IngestMeta, SecurityEvent};
use tidesync_core::auth::{BatchProof, ChainHash, DeviceKeys, DeviceSigner, Violation};
use tidesync_core::event::{DeviceId, Event, EventId, GatewayId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::Ledger;
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::sync::{Ingest, SessionConfig, SessionEvent};
use tidesync_core::vv::VersionVector;
use tidesync_core::wire::{EventBatch, Frame, Hello, Peer, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

fn device() -> DeviceId {
    DeviceId::new("meter-1").unwrap()
}

fn gateway(name: &str) -> GatewayId {
    GatewayId::new(name).unwrap()
}

fn meta() -> IngestMeta {
    IngestMeta { gateway: gateway("gw"), ingest_time: Millis(1) }
}

fn signer() -> DeviceSigner {
    DeviceSigner::from_seed(device(), [7; 32])
}

fn reading(seq: u64, value: f64) -> Event {
    Event {
        id: EventId { device: device(), seq: Seq(seq) },
        hlc: Hlc { wall_ms: 1_700_000_000_000 + seq, logical: 0 },
        event_time: Millis(1_000 * seq),
        payload: Payload::Reading(SensorReading { sensor: "t".into(), value, unit: "Cel".into() }),
    }
}

/// Readings `first..=last` (value = seq + `offset`), covering from `from`, without a proof.
fn unsigned(from: u64, first: u64, last: u64, offset: f64) -> EventBatch {
    let events = (first..=last).map(|seq| reading(seq, seq as f64 + offset)).collect();
    EventBatch::new(device(), Seq(from), events).unwrap()
}

/// The same, sealed at its end by the device, `prev` being the chain value before `first`.
fn signed(from: u64, first: u64, last: u64, offset: f64, prev: ChainHash) -> EventBatch {
    let mut batch = unsigned(from, first, last, offset);
    let head = prev.over(&batch.events);
    // The store keeps the hole proof as it is; the chain before the hole is the session's to check.
    let hole = (from < first).then(|| signer().hole(Seq(from), Seq(first - 1), ChainHash([0; 32]), prev));
    batch.proof = Some(BatchProof { prev, seals: vec![signer().seal(Seq(last), &head)], hole });
    batch
}

fn genesis() -> ChainHash {
    ChainHash::genesis(&device())
}

fn chain(first: u64, last: u64, offset: f64, prev: ChainHash) -> ChainHash {
    prev.over(&unsigned(first, first, last, offset).events)
}

fn open(backend: &Backend) -> CloudStore {
    CloudStore::open(backend.open_writer().unwrap(), ShadowLimits::default()).unwrap()
}

fn chain_heads_move_with_appends_and_survive_reopen(backend: &Backend) {
    let d = device();
    {
        let mut store = open(backend);
        assert_eq!(store.chain_head(&d), Some(genesis()), "before any event the head is genesis");
        store.append_from(&unsigned(1, 1, 10, 0.0), &meta()).unwrap();
        assert_eq!(store.chain_head(&d), Some(chain(1, 10, 0.0, genesis())));
        // Overlap: seqs 5..=10 are held, the chain continues after them.
        store.append_from(&unsigned(5, 5, 15, 0.0), &meta()).unwrap();
        store.commit().unwrap();
        assert_eq!(store.chain_head(&d), Some(chain(1, 15, 0.0, genesis())));
        // A duplicate changes nothing.
        store.append_from(&unsigned(1, 1, 15, 0.0), &meta()).unwrap();
        store.commit().unwrap();
    }
    let at_15 = chain(1, 15, 0.0, genesis());
    {
        let mut store = open(backend);
        assert_eq!(store.chain_head(&d), Some(at_15), "the head is read back after a reopen");
        // An append that is never committed does not move the stored head.
        store.append_from(&unsigned(16, 16, 20, 0.0), &meta()).unwrap();
        assert_eq!(store.chain_head(&d), Some(chain(16, 20, 0.0, at_15)));
    }
    let store_reopened = open(backend);
    assert_eq!(store_reopened.high(&d), Seq(15));
    assert_eq!(store_reopened.chain_head(&d), Some(at_15), "the rolled-back group left the head at 15");
    drop(store_reopened);

    // After a declared hole only the device's proof knows the chain: signed, it is taken from
    // `prev`; unsigned, the head is unknown (and stays unknown after a reopen).
    let mut store = open(backend);
    let after_hole = ChainHash([9; 32]);
    store.append_from(&signed(16, 21, 25, 0.0, after_hole), &meta()).unwrap();
    store.commit().unwrap();
    assert_eq!(store.chain_head(&d), Some(chain(21, 25, 0.0, after_hole)));
    store.append_from(&unsigned(26, 30, 31, 0.0), &meta()).unwrap();
    store.commit().unwrap();
    assert_eq!(store.chain_head(&d), None);
    drop(store);
    let mut store = open(backend);
    assert_eq!(store.high(&d), Seq(31));
    assert_eq!(store.chain_head(&d), None, "a stored head behind high reads as unknown");
    // A signed batch continuing the unknown head brings it back from its proof.
    let prev = ChainHash([3; 32]);
    store.append_from(&signed(32, 32, 33, 0.0, prev), &meta()).unwrap();
    store.commit().unwrap();
    assert_eq!(store.chain_head(&d), Some(chain(32, 33, 0.0, prev)));
    drop(store);
    assert_eq!(open(backend).chain_head(&d), Some(chain(32, 33, 0.0, prev)));
}

/// Runs one verifying cloud session over `store` that sends `batches`; returns its violations and
/// how many events it appended.
fn ingest(store: &mut CloudStore, batches: Vec<EventBatch>) -> (Vec<Violation>, u64) {
    let mut keys = DeviceKeys::new();
    keys.insert(device(), signer().public_key()).unwrap();
    let now = Millis(5_000);
    let gw = gateway("gw");
    let mut session = Ingest::for_cloud(gw, SessionConfig::default(), now).verifying(Arc::new(keys));
    let mut vv = VersionVector::new();
    vv.set(device(), batches.last().map_or(Seq::ZERO, EventBatch::last_seq));
    let hello = Hello {
        protocol_min: PROTOCOL_VERSION_MIN,
        protocol_max: PROTOCOL_VERSION,
        peer: Peer::Gateway(gw),
        vv,
        wall: now,
    };
    session.handle_frame(now, Frame::Hello(hello), store).unwrap();
    let (mut violations, mut n_new) = (Vec::new(), 0);
    for batch in batches {
        session.handle_frame(now, Frame::Events(batch), store).unwrap();
        while let Some(event) = session.poll_event() {
            match event {
                SessionEvent::EventsReceived(batch) => {
                    let appended = store.append_from(&batch, &meta()).unwrap();
                    store.commit().unwrap();
                    session.handle_durable(now, batch.device, appended.high);
                    n_new += appended.n_new as u64;
                }
                SessionEvent::Violation { violation, .. } => violations.push(violation),
                _ => {}
            }
        }
    }
    (violations, n_new)
}

fn a_second_signed_history_is_caught_after_a_restart(backend: &Backend) {
    {
        let mut store = open(backend);
        let first = signed(1, 1, 5, 0.0, genesis());
        let second = signed(6, 6, 9, 0.0, chain(1, 5, 0.0, genesis()));
        let (violations, n_new) = ingest(&mut store, vec![first, second]);
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!(n_new, 9);
    }
    // The cloud restarts. A clone holding the device's key signed other readings for 1..=9 and
    // now sends 10..=12 on top of them: each batch verifies alone, but it does not continue the
    // chain the store holds.
    let mut store = open(backend);
    let clone_prev = chain(1, 9, 500.0, genesis());
    let (violations, n_new) = ingest(&mut store, vec![signed(10, 10, 12, 500.0, clone_prev)]);
    assert_eq!(violations, vec![Violation::Equivocation { seq: Seq(9) }]);
    assert_eq!(n_new, 0);
    assert_eq!(store.high(&device()), Seq(9));
    // The device's own continuation is still accepted.
    let (violations, n_new) = ingest(&mut store, vec![signed(10, 10, 12, 0.0, chain(1, 9, 0.0, genesis()))]);
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(n_new, 3);
}

fn security_event(gateway_name: &str, kind: &str, from: u64, last: u64, at: u64) -> SecurityEvent {
    SecurityEvent {
        id: 0,
        first_ms: Millis(at),
        last_ms: Millis(at),
        gateway: gateway(gateway_name),
        device: device(),
        kind: kind.to_string(),
        detail: format!("{kind} at {last}"),
        from_seq: Seq(from),
        last_seq: Seq(last),
        count: 1,
    }
}

fn security_events_are_recorded_counted_and_paged(backend: &Backend) {
    {
        let mut store = open(backend);
        store.record_security_event(&security_event("gw-a", "bad_seal", 1, 4, 100)).unwrap();
        store.commit().unwrap();
        // The gateway offers the same refused batch again: counted, not a new row.
        store.record_security_event(&security_event("gw-a", "bad_seal", 1, 4, 700)).unwrap();
        store.record_security_event(&security_event("gw-a", "bad_seal", 1, 4, 900)).unwrap();
        // Another gateway, kind or range is another row.
        store.record_security_event(&security_event("gw-b", "bad_seal", 1, 4, 800)).unwrap();
        store.record_security_event(&security_event("gw-a", "replay", 1, 4, 810)).unwrap();
        store.record_security_event(&security_event("gw-a", "bad_seal", 5, 8, 820)).unwrap();
        store.commit().unwrap();
        // Not committed: lost with the store.
        store.record_security_event(&security_event("gw-c", "unsigned", 1, 1, 999)).unwrap();
    }
    let mut reader = backend.open_reader().unwrap();
    let (page, total) = reader.security_events(None, 2).unwrap();
    assert_eq!(total, 4);
    let summary: Vec<(String, String, u64, u64)> = page
        .iter()
        .map(|event| (event.gateway.to_string(), event.kind.clone(), event.from_seq.0, event.count))
        .collect();
    assert_eq!(summary, vec![("gw-a".into(), "bad_seal".into(), 5, 1), ("gw-a".into(), "replay".into(), 1, 1)]);
    let (rest, _) = reader.security_events(page.last().map(|event| event.id), 10).unwrap();
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[0].gateway, gateway("gw-b"));
    let first = &rest[1];
    assert_eq!(
        (first.gateway, first.device, first.kind.as_str(), first.count, first.first_ms, first.last_ms),
        (gateway("gw-a"), device(), "bad_seal", 3, Millis(100), Millis(900))
    );
    assert_eq!((first.from_seq, first.last_seq, first.detail.as_str()), (Seq(1), Seq(4), "bad_seal at 4"));
    assert!(rest[0].id < page[1].id && first.id < rest[0].id, "ids ascend in the order recorded");
}

conformance!(
    chain_heads_move_with_appends_and_survive_reopen,
    a_second_signed_history_is_caught_after_a_restart,
    security_events_are_recorded_counted_and_paged,
);
