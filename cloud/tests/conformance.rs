//! The event store conformance suite: every test is written once and run against every backend
//! (SQLite in a temp dir; PostgreSQL at `TIDESYNC_TEST_POSTGRES_URL`, one schema per test).
//! With the variable unset the PostgreSQL half skips loudly; set and unreachable, it fails.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod backends;

use std::time::Duration;

use tidesync_cloud::store::{
    Backend, CloudStore, DeadLetter, IngestMeta, Position, ShadowRow, StoreError, CLOUD_REPLICA,
};
use tidesync_cloud::subscription::Subscription;
use tidesync_core::event::{DeviceId, Event, EventId, GatewayId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::{Ledger, LedgerError};
use tidesync_core::shadow::{Section, ShadowLimits};
use tidesync_core::sync::{Ingest, SessionConfig, SessionEvent, Store};
use tidesync_core::value::Value;
use tidesync_core::vv::VersionVector;
use tidesync_core::wire::{Ack, EventBatch, Frame, Hello, Peer, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn meta(gateway: &str, at: u64) -> IngestMeta {
    IngestMeta { gateway: GatewayId::new(gateway).unwrap(), ingest_time: Millis(at) }
}

fn reading(device: DeviceId, seq: u64, event_time: u64, value: f64) -> Event {
    Event {
        id: EventId { device, seq: Seq(seq) },
        hlc: Hlc { wall_ms: 1_700_000_000_000 + seq, logical: 0 },
        event_time: Millis(event_time),
        payload: Payload::Reading(SensorReading { sensor: "t".into(), value, unit: "Cel".into() }),
    }
}

/// A batch of `device`'s readings `first..=last` (event time = 1000 * seq), covering from `from`.
fn batch(device: DeviceId, from: u64, first: u64, last: u64) -> EventBatch {
    let events = (first..=last).map(|seq| reading(device, seq, 1_000 * seq, seq as f64)).collect();
    EventBatch::new(device, Seq(from), events).unwrap()
}

fn open(backend: &Backend) -> CloudStore {
    CloudStore::open(backend.open_writer().unwrap(), ShadowLimits::default()).unwrap()
}

fn all_events(backend: &Backend) -> Vec<(u64, String, u64)> {
    let mut reader = backend.open_reader().unwrap();
    reader
        .read_from(Position(0), 100_000)
        .unwrap()
        .into_iter()
        .map(|stored| (stored.position.0, stored.event.id.device.to_string(), stored.event.id.seq.0))
        .collect()
}

fn append_dedupes_by_event_id(backend: &Backend) {
    let mut store = open(backend);
    let d = device("d1");
    let first = store.append_from(&batch(d, 1, 1, 10), &meta("gw", 5)).unwrap();
    assert_eq!((first.high, first.n_new), (Seq(10), 10));
    let again = store.append_from(&batch(d, 1, 1, 10), &meta("gw", 6)).unwrap();
    assert_eq!((again.high, again.n_new), (Seq(10), 0), "a duplicate is acknowledged, not stored");
    assert_eq!(store.commit().unwrap(), Position(10));
    let overlap = store.append_from(&batch(d, 5, 5, 15), &meta("gw2", 7)).unwrap();
    assert_eq!((overlap.high, overlap.n_new), (Seq(15), 5));
    store.commit().unwrap();
    let events = all_events(backend);
    let expected: Vec<(u64, String, u64)> = (1..=15).map(|seq| (seq, "d1".to_string(), seq)).collect();
    assert_eq!(events, expected);
    // Metadata of the first delivery is kept.
    let mut reader = backend.open_reader().unwrap();
    let stored = reader.read_seqs(&d, Seq(5), Seq(5), 10).unwrap();
    assert_eq!(stored[0].meta, meta("gw", 5));
    assert_eq!(reader.read_seqs(&d, Seq(11), Seq(11), 10).unwrap()[0].meta, meta("gw2", 7));
}

fn duplicates_after_reopen_are_not_stored(backend: &Backend) {
    let d = device("d1");
    {
        let mut store = open(backend);
        store.append_from(&batch(d, 1, 1, 20), &meta("gw", 1)).unwrap();
        store.commit().unwrap();
    }
    let mut store = open(backend);
    assert_eq!(store.high(&d), Seq(20));
    let appended = store.append(&batch(d, 1, 1, 25)).unwrap();
    assert_eq!(appended.n_new, 5);
    store.commit().unwrap();
    assert_eq!(all_events(backend).len(), 25);
    assert_eq!(store.head(), Position(25));
}

fn uncommitted_appends_are_lost_and_invisible(backend: &Backend) {
    let d = device("d1");
    {
        let mut store = open(backend);
        store.append_from(&batch(d, 1, 1, 3), &meta("gw", 1)).unwrap();
        store.commit().unwrap();
        store.append_from(&batch(d, 4, 4, 9), &meta("gw", 1)).unwrap();
        // A reader beside the open transaction sees only what was committed.
        assert_eq!(all_events(backend).len(), 3);
    }
    let store = open(backend);
    assert_eq!(store.high(&d), Seq(3), "the uncommitted group is gone");
    assert_eq!(all_events(backend).len(), 3);
}

fn reads_by_position_seq_and_time(backend: &Backend) {
    let mut store = open(backend);
    let (a, b) = (device("a"), device("b"));
    // Event times out of order: seq 1..=6 at times 6000, 5000, ..., 1000.
    let events: Vec<Event> = (1..=6).map(|seq| reading(a, seq, 7_000 - 1_000 * seq, seq as f64)).collect();
    store.append_from(&EventBatch::new(a, Seq(1), events).unwrap(), &meta("gw", 1)).unwrap();
    store.append_from(&batch(b, 1, 1, 4), &meta("gw", 1)).unwrap();
    store.commit().unwrap();
    let mut reader = backend.open_reader().unwrap();
    assert_eq!(reader.head().unwrap(), Position(10));
    let page: Vec<u64> = reader.read_from(Position(3), 4).unwrap().iter().map(|e| e.position.0).collect();
    assert_eq!(page, vec![4, 5, 6, 7]);
    let seqs: Vec<u64> = reader.read_seqs(&a, Seq(2), Seq(4), 100).unwrap().iter().map(|e| e.event.id.seq.0).collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    assert!(reader.read_seqs(&device("nobody"), Seq(1), Seq(9), 100).unwrap().is_empty());
    // By time: [2000, 5000) holds seqs 5, 4, 3 (times 2000, 3000, 4000), in time order, paged by 2.
    let first = reader.read_times(&a, Millis(2_000), Millis(5_000), None, 2).unwrap();
    let first_seqs: Vec<u64> = first.iter().map(|e| e.event.id.seq.0).collect();
    assert_eq!(first_seqs, vec![5, 4]);
    let last = first.last().unwrap();
    let cursor = (last.event.event_time, last.event.id.seq);
    let second = reader.read_times(&a, Millis(2_000), Millis(5_000), Some(cursor), 2).unwrap();
    assert_eq!(second.iter().map(|e| e.event.id.seq.0).collect::<Vec<_>>(), vec![3]);
    let streams = reader.streams().unwrap();
    assert_eq!(streams[&a].high, Seq(6));
    assert_eq!(streams[&b].n_events, 4);
    // The payload comes back as written.
    assert_eq!(reader.read_seqs(&a, Seq(1), Seq(1), 1).unwrap()[0].event, reading(a, 1, 6_000, 1.0));
}

fn declared_holes_are_covered_then_filled(backend: &Backend) {
    let d = device("d1");
    {
        let mut store = open(backend);
        // The device dropped 1..=3 and sends 4..=6 declaring the hole.
        let appended = store.append_from(&batch(d, 1, 4, 6), &meta("gw", 1)).unwrap();
        assert_eq!((appended.high, appended.n_new), (Seq(6), 3));
        let mut expected = VersionVector::new();
        expected.set(d, Seq(6));
        assert_eq!(store.version_vector(), expected);
        store.commit().unwrap();
    }
    let mut reader = backend.open_reader().unwrap();
    assert_eq!(reader.streams().unwrap()[&d].holes, vec![(Seq(1), Seq(3))]);
    let mut store = open(backend);
    // Seq 2 turns up after all (through another gateway): it fills the hole.
    let appended = store.append_from(&batch(d, 2, 2, 2), &meta("gw2", 2)).unwrap();
    assert_eq!(appended.n_new, 1);
    store.commit().unwrap();
    let info = &reader.streams().unwrap()[&d];
    assert_eq!(info.holes, vec![(Seq(1), Seq(1)), (Seq(3), Seq(3))]);
    assert_eq!(info.n_events, 4);
    // A batch that would leave a hole after high is refused and changes nothing.
    let error = store.append_from(&batch(d, 9, 9, 10), &meta("gw", 3)).unwrap_err();
    assert!(matches!(error, LedgerError::Hole { .. }), "{error}");
    // The same seq again is a duplicate.
    assert_eq!(store.append_from(&batch(d, 2, 2, 2), &meta("gw", 3)).unwrap().n_new, 0);
    store.commit().unwrap();
    assert_eq!(all_events(backend).len(), 4);
}

fn shadows_persist_with_their_view(backend: &Backend) {
    let d = device("d1");
    {
        let mut store = open(backend);
        let shadow = store.shadow_mut(&d).unwrap().unwrap();
        shadow.set(Section::Desired, "interval_s", &Value::Int(30)).unwrap();
        store.persist_shadow(d, Millis(42)).unwrap();
        store.commit().unwrap();
    }
    let store = open(backend);
    assert_eq!(store.shadow(&d).unwrap().get(Section::Desired, "interval_s"), Some(Value::Int(30)));
    assert_eq!(store.shadow_devices(), vec![d]);
    let mut reader = backend.open_reader().unwrap();
    let row: ShadowRow = reader.shadow(&d).unwrap().unwrap();
    assert_eq!(row.view["desired"]["interval_s"], 30);
    assert_eq!(row.view["delta"]["interval_s"], 30);
    assert_eq!(row.updated, Millis(42));
    let loaded = tidesync_core::shadow::Shadow::load(&row.doc, CLOUD_REPLICA, ShadowLimits::default()).unwrap();
    assert_eq!(loaded.get(Section::Desired, "interval_s"), Some(Value::Int(30)));
    assert_eq!(reader.shadows().unwrap().len(), 1);
}

fn subscription_catches_up_then_follows_live_appends(backend: &Backend) {
    let d = device("d1");
    let mut store = open(backend);
    store.append_from(&batch(d, 1, 1, 5), &meta("gw", 1)).unwrap();
    store.commit().unwrap();
    let mut subscription = Subscription::new(backend.open_reader().unwrap(), Position(2), store.head_watch());
    let caught_up: Vec<u64> =
        subscription.next_batch(100, Duration::ZERO).unwrap().iter().map(|e| e.position.0).collect();
    assert_eq!(caught_up, vec![3, 4, 5]);
    assert!(subscription.next_batch(100, Duration::from_millis(10)).unwrap().is_empty());
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        store.append_from(&batch(d, 6, 6, 8), &meta("gw", 2)).unwrap();
        store.commit().unwrap();
        store
    });
    let started = std::time::Instant::now();
    let live = subscription.next_batch(100, Duration::from_secs(10)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "woken by the commit, not the timeout");
    assert_eq!(live.iter().map(|e| e.event.id.seq.0).collect::<Vec<_>>(), vec![6, 7, 8]);
    assert_eq!(subscription.checkpoint(), Position(8));
    drop(writer.join().unwrap());
}

fn projection_rows_checkpoints_and_dead_letters(backend: &Backend) {
    let mut writer = backend.open_writer().unwrap();
    writer
        .put_rows(
            "p",
            &[
                ("a|1".into(), Some(serde_json::json!({"n": 1}))),
                ("a|2".into(), Some(serde_json::json!({"n": 2}))),
                ("b|1".into(), Some(serde_json::json!({"n": 3}))),
            ],
        )
        .unwrap();
    writer.put_rows("q", &[("a|1".into(), Some(serde_json::json!("other")))]).unwrap();
    writer.set_checkpoint("p", Position(7)).unwrap();
    let letter = DeadLetter {
        projection: "p".into(),
        position: Position(3),
        id: EventId { device: device("d1"), seq: Seq(3) },
        reason: "unit changed".into(),
    };
    writer.add_dead_letter(&letter).unwrap();
    writer.commit().unwrap();
    let mut reader = backend.open_reader().unwrap();
    let keys: Vec<String> = reader.rows("p", "a|", 10).unwrap().into_iter().map(|(key, _)| key).collect();
    assert_eq!(keys, vec!["a|1", "a|2"]);
    assert_eq!(reader.rows("p", "", 2).unwrap().len(), 2);
    assert_eq!(reader.row("p", "b|1").unwrap(), Some(serde_json::json!({"n": 3})));
    assert_eq!(reader.checkpoint("p").unwrap(), Position(7));
    assert_eq!(reader.checkpoint("never").unwrap(), Position(0));
    assert_eq!(reader.dead_letters(Some("p"), 10).unwrap(), (vec![letter], 1));
    assert_eq!(reader.dead_letters(None, 10).unwrap().1, 1);
    writer.put_rows("p", &[("a|1".into(), None), ("a|2".into(), Some(serde_json::json!({"n": 20})))]).unwrap();
    writer.commit().unwrap();
    let rows = reader.rows("p", "a|", 10).unwrap();
    assert_eq!(rows, vec![("a|2".to_string(), serde_json::json!({"n": 20}))]);
    writer.clear_projection("p").unwrap();
    writer.commit().unwrap();
    assert!(reader.rows("p", "", 10).unwrap().is_empty());
    assert_eq!(reader.checkpoint("p").unwrap(), Position(0));
    assert_eq!(reader.dead_letters(Some("p"), 10).unwrap().1, 0);
    assert_eq!(reader.rows("q", "", 10).unwrap().len(), 1, "other projections are untouched");
    // A rolled-back transaction leaves nothing behind.
    writer.put_rows("p", &[("z".into(), Some(serde_json::json!(1)))]).unwrap();
    writer.rollback();
    assert!(reader.rows("p", "", 10).unwrap().is_empty());
}

fn cloud_ingest_session_runs_on_the_store(backend: &Backend) {
    let mut store = open(backend);
    let d = device("d1");
    let gateway = GatewayId::new("gw").unwrap();
    let now = Millis(1_000);
    let mut ingest = Ingest::for_cloud(gateway, SessionConfig::default(), now);
    let mut vv = VersionVector::new();
    vv.set(d, Seq(10));
    let hello = Hello {
        protocol_min: PROTOCOL_VERSION_MIN,
        protocol_max: PROTOCOL_VERSION,
        peer: Peer::Gateway(gateway),
        vv,
        wall: now,
    };
    ingest.handle_frame(now, Frame::Hello(hello), &mut store).unwrap();
    for frame in [batch(d, 1, 1, 5), batch(d, 1, 1, 5), batch(d, 6, 6, 10)] {
        ingest.handle_frame(now, Frame::Events(frame), &mut store).unwrap();
    }
    let mut durable = Vec::new();
    while let Some(event) = ingest.poll_event() {
        if let SessionEvent::EventsReceived(batch) = event {
            let appended = store.append_from(&batch, &meta("gw", now.0)).unwrap();
            durable.push((batch.device, appended.high));
        }
    }
    // Nothing is acknowledged before the group commit.
    let before: Vec<Frame> = std::iter::from_fn(|| ingest.poll_transmit(now, &mut store)).collect();
    assert!(before.iter().all(|frame| !matches!(frame, Frame::Commit(_))), "{before:?}");
    store.commit().unwrap();
    for (device, high) in durable {
        ingest.handle_durable(now, device, high);
    }
    let after: Vec<Frame> = std::iter::from_fn(|| ingest.poll_transmit(now, &mut store)).collect();
    assert!(after.contains(&Frame::Commit(Ack { device: d, up_to: Seq(10) })), "{after:?}");
    assert_eq!(all_events(backend).len(), 10);
}

fn large_batches_keep_positions_in_seq_order(backend: &Backend) {
    // 1,000 events cross every multi-row statement size; the overlap is skipped.
    let d = device("d1");
    let mut store = open(backend);
    store.append_from(&batch(d, 1, 1, 300), &meta("gw", 1)).unwrap();
    store.commit().unwrap();
    let events: Vec<Event> = (1..=1_000).map(|seq| reading(d, seq, 1_000 * seq, seq as f64)).collect();
    let appended = store.append_from(&EventBatch::new(d, Seq(1), events).unwrap(), &meta("gw", 2)).unwrap();
    assert_eq!((appended.high, appended.n_new), (Seq(1_000), 700));
    assert_eq!(store.commit().unwrap(), Position(1_000));
    let stored = all_events(backend);
    let expected: Vec<(u64, String, u64)> = (1..=1_000).map(|seq| (seq, "d1".to_string(), seq)).collect();
    assert_eq!(stored, expected);
}

fn two_writers_never_store_an_id_twice(backend: &Backend) {
    let d = device("d1");
    let mut first = open(backend);
    let mut second = open(backend);
    first.append_from(&batch(d, 1, 1, 10), &meta("gw", 1)).unwrap();
    first.commit().unwrap();
    // `second` still believes the stream is empty; it must notice the other writer.
    let appended = second.append_from(&batch(d, 1, 1, 15), &meta("gw", 2)).unwrap();
    assert_eq!((appended.high, appended.n_new), (Seq(15), 5));
    second.commit().unwrap();
    let appended = first.append_from(&batch(d, 10, 10, 20), &meta("gw", 3)).unwrap();
    assert_eq!((appended.high, appended.n_new), (Seq(20), 5), "the stream's high never moves back");
    first.commit().unwrap();
    let seqs: Vec<u64> = all_events(backend).into_iter().map(|(_, _, seq)| seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
    assert_eq!(open(backend).high(&d), Seq(20));

    // Now at the same time, from two threads, overlapping batches of two devices.
    let writers: Vec<_> = (0..2)
        .map(|thread| {
            let backend = backend.clone();
            std::thread::spawn(move || {
                let mut store = open(&backend);
                for (index, first_seq) in (21..=200).step_by(10).enumerate() {
                    let d = device(if (index + thread) % 2 == 0 { "d1" } else { "d2" });
                    let from = store.high(&d).0.min(first_seq) + 1;
                    let events = (from..=first_seq + 9).map(|seq| reading(d, seq, seq, 0.0)).collect();
                    store.append_from(&EventBatch::new(d, Seq(from), events).unwrap(), &meta("gw", 4)).unwrap();
                    store.commit().unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let mut ids: Vec<(String, u64)> = all_events(backend).into_iter().map(|(_, d, seq)| (d, seq)).collect();
    let n_stored = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n_stored, "an id is stored once");
    let store = open(backend);
    for name in ["d1", "d2"] {
        let high = store.high(&device(name));
        assert_eq!(high, Seq(200), "{name}: every batch reached the stream");
        let held: Vec<u64> = ids.iter().filter(|(device, _)| device == name).map(|(_, seq)| *seq).collect();
        assert_eq!(held, (1..=high.0).collect::<Vec<u64>>(), "{name} is contiguous");
    }
}

fn a_failed_insert_never_commits_its_group(backend: &Backend) {
    let d = device("d1");
    let other = device("d2");
    // An event written behind the store's back: its stream row does not know it.
    let mut writer = backend.open_writer().unwrap();
    writer.begin().unwrap();
    writer.insert_events(&[reading(d, 5, 5_000, 5.0)], &meta("gw", 1)).unwrap();
    writer.commit().unwrap();
    drop(writer);
    let mut store = open(backend);
    store.append_from(&batch(other, 1, 1, 3), &meta("gw", 2)).unwrap();
    let retry = |store: &mut CloudStore| {
        assert_eq!(all_events(backend).len(), 1, "nothing of the failed group is stored");
        store.append_from(&batch(other, 1, 1, 3), &meta("gw", 3)).unwrap();
        assert_eq!(store.append_from(&batch(d, 1, 1, 10), &meta("gw", 3)).unwrap().n_new, 9);
        store.commit().unwrap();
    };
    match store.append_from(&batch(d, 1, 1, 10), &meta("gw", 2)) {
        // A backend that checks conflicts on every insert skips the stored one.
        Ok(appended) if appended.n_new == 9 => {
            store.commit().unwrap();
        }
        // One that trusted the stream state and holds inserts back until the commit (PostgreSQL)
        // fails there, as a conflict; the whole group rolls back, and the retry checks conflicts.
        Ok(appended) => {
            assert_eq!(appended.n_new, 10);
            let error = store.commit().expect_err("a group with a conflicting insert must not commit");
            assert!(error.is_conflict(), "{error}");
            retry(&mut store);
        }
        // One that trusted the stream state and inserts at once fails at the insert; the whole
        // group must roll back, and the retry checks conflicts.
        Err(_) => {
            assert!(store.commit().is_err(), "a group with a failed write must not commit");
            retry(&mut store);
        }
    }
    let mut seqs: Vec<(String, u64)> = all_events(backend).into_iter().map(|(_, d, seq)| (d, seq)).collect();
    seqs.sort();
    let mut expected: Vec<(String, u64)> = (1..=10).map(|seq| ("d1".to_string(), seq)).collect();
    expected.extend((1..=3).map(|seq| ("d2".to_string(), seq)));
    assert_eq!(seqs, expected);
}

fn projection_writes_do_not_stall_appends(backend: &Backend) {
    let d = device("d1");
    let mut store = open(backend);
    let mut projections = backend.open_writer().unwrap();
    projections.begin_projections().unwrap();
    projections.set_checkpoint("p", Position(0)).unwrap();
    if let Backend::Postgres { .. } = backend {
        // With one lock for both this append would wait for the projection step forever.
        store.append_from(&batch(d, 1, 1, 5), &meta("gw", 1)).unwrap();
        assert_eq!(store.commit().unwrap(), Position(5));
        let error = projections.insert_events(&[reading(d, 6, 6_000, 6.0)], &meta("gw", 1)).unwrap_err();
        assert!(matches!(error, StoreError::NotEventTransaction), "{error}");
        projections.rollback();
    } else {
        projections.commit().unwrap();
        store.append_from(&batch(d, 1, 1, 5), &meta("gw", 1)).unwrap();
        assert_eq!(store.commit().unwrap(), Position(5));
    }
    assert_eq!(all_events(backend).len(), 5);
}

fn open_failures_are_errors(backend: &Backend) {
    // Opening works twice (tables exist), and a reader of a fresh store sees an empty log.
    let _first = backend.open_writer().unwrap();
    let mut reader = backend.open_reader().unwrap();
    assert_eq!(reader.head().unwrap(), Position(0));
    assert!(reader.streams().unwrap().is_empty());
    if let Backend::Sqlite { path } = backend {
        let other = path.with_file_name("other.sqlite3");
        let db = rusqlite::Connection::open(&other).unwrap();
        db.execute_batch("CREATE TABLE foreign_data (x INTEGER)").unwrap();
        drop(db);
        let error = Backend::Sqlite { path: other }.open_writer().err().unwrap();
        assert!(matches!(error, StoreError::NotAStore { .. }), "{error}");
    }
}

/// Writes a backend may hold back until the commit (PostgreSQL's `Pending`) are seen by every
/// read and insert of their own transaction, and vanish with it on rollback.
fn a_transaction_reads_its_own_writes(backend: &Backend) {
    let d = device("d1");
    let other = device("d2");
    let mut writer = backend.open_writer().unwrap();
    writer.begin().unwrap();
    let events: Vec<Event> = (1..=5).map(|seq| reading(d, seq, 1_000 * seq, seq as f64)).collect();
    assert_eq!(writer.insert_new_events(&events, &meta("gw", 1)).unwrap(), (5, Position(5)));
    writer.write_stream(&d, Seq(5), &[]).unwrap();
    let chain = tidesync_core::auth::ChainHash([7; 32]);
    writer.write_chain_head(&d, Seq(5), &chain).unwrap();
    let other_events = [reading(other, 1, 1_000, 1.0)];
    assert_eq!(writer.insert_new_events(&other_events, &meta("gw2", 2)).unwrap(), (1, Position(6)));
    // Reads inside the transaction see the writes.
    assert_eq!(writer.head().unwrap(), Position(6));
    let read: Vec<(u64, u64)> = writer
        .read_from(Position(0), 100)
        .unwrap()
        .iter()
        .map(|stored| (stored.position.0, stored.event.id.seq.0))
        .collect();
    assert_eq!(read, [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 1)]);
    assert_eq!(writer.read_seqs(&other, Seq(1), Seq(1), 10).unwrap()[0].meta, meta("gw2", 2));
    assert_eq!(writer.streams().unwrap()[&d].high, Seq(5));
    assert_eq!(writer.chain_heads().unwrap()[&d], (Seq(5), chain));
    // An insert that checks conflicts sees them too: seqs 4 and 5 are skipped.
    let overlap: Vec<Event> = (4..=7).map(|seq| reading(d, seq, 1_000 * seq, 0.0)).collect();
    assert_eq!(writer.insert_events(&overlap, &meta("gw", 3)).unwrap().0, 2);
    // The stream row written last wins.
    writer.write_stream(&d, Seq(7), &[]).unwrap();
    writer.rollback();
    assert!(all_events(backend).is_empty(), "a rolled-back transaction leaves nothing");
    let mut reader = backend.open_reader().unwrap();
    assert!(reader.streams().unwrap().is_empty());
    assert!(reader.chain_heads().unwrap().is_empty());
    // The same writes committed are all stored, once.
    writer.begin().unwrap();
    writer.insert_new_events(&events, &meta("gw", 1)).unwrap();
    writer.write_stream(&d, Seq(3), &[]).unwrap();
    writer.write_stream(&d, Seq(5), &[]).unwrap();
    writer.write_chain_head(&d, Seq(5), &chain).unwrap();
    writer.commit().unwrap();
    assert_eq!(all_events(backend).len(), 5);
    assert_eq!(reader.streams().unwrap()[&d].high, Seq(5));
    assert_eq!(reader.chain_heads().unwrap()[&d], (Seq(5), chain));
}

conformance!(
    append_dedupes_by_event_id,
    duplicates_after_reopen_are_not_stored,
    uncommitted_appends_are_lost_and_invisible,
    reads_by_position_seq_and_time,
    declared_holes_are_covered_then_filled,
    shadows_persist_with_their_view,
    subscription_catches_up_then_follows_live_appends,
    projection_rows_checkpoints_and_dead_letters,
    cloud_ingest_session_runs_on_the_store,
    open_failures_are_errors,
    large_batches_keep_positions_in_seq_order,
    two_writers_never_store_an_id_twice,
    a_failed_insert_never_commits_its_group,
    projection_writes_do_not_stall_appends,
    a_transaction_reads_its_own_writes,
);
