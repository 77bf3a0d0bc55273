//! Conformance cases for the edges a store that keeps runs of events together (SQLite's segments)
//! opens, run on both backends: reads that start or end inside a run, a run boundary at the read
//! limit, time pages crossing runs with times out of order inside a run, hole fills landing
//! between runs, long runs cut into several segments, inserts that overlap what is stored. Then a
//! property test: random appends (duplicates, declared holes, fills, replays) through
//! `CloudStore`, and every read equals a simple in-memory model.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod backends;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tidesync_cloud::store::{Backend, CloudStore, EventReader, EventWriter, IngestMeta, Position, StoredEvent};
use tidesync_core::event::{DeviceId, Event, EventId, GatewayId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::wire::EventBatch;

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn meta(gateway: &str, at: u64) -> IngestMeta {
    IngestMeta { gateway: GatewayId::new(gateway).unwrap(), ingest_time: Millis(at) }
}

fn reading(device: DeviceId, seq: u64, event_time: u64) -> Event {
    Event {
        id: EventId { device, seq: Seq(seq) },
        hlc: Hlc { wall_ms: 1_700_000_000_000 + seq, logical: (seq % 3) as u32 },
        event_time: Millis(event_time),
        payload: Payload::Reading(SensorReading { sensor: "t".into(), value: seq as f64 / 2.0, unit: "Cel".into() }),
    }
}

/// `device`'s readings `first..=last` with event times from `time(seq)`, covering from `from`.
fn batch_with(device: DeviceId, from: u64, first: u64, last: u64, time: impl Fn(u64) -> u64) -> EventBatch {
    let events = (first..=last).map(|seq| reading(device, seq, time(seq))).collect();
    EventBatch::new(device, Seq(from), events).unwrap()
}

fn batch(device: DeviceId, from: u64, first: u64, last: u64) -> EventBatch {
    batch_with(device, from, first, last, |seq| 1_000 * seq)
}

fn open(backend: &Backend) -> CloudStore {
    CloudStore::open(backend.open_writer().unwrap(), ShadowLimits::default()).unwrap()
}

fn positions(events: &[StoredEvent]) -> Vec<u64> {
    events.iter().map(|stored| stored.position.0).collect()
}

fn seqs(events: &[StoredEvent]) -> Vec<u64> {
    events.iter().map(|stored| stored.event.id.seq.0).collect()
}

fn reads_start_and_end_inside_runs(backend: &Backend) {
    let (a, b) = (device("a"), device("b"));
    let mut store = open(backend);
    // Positions 1..=10 (a 1..=10), 11..=15 (b 1..=5), 16..=25 (a 11..=20), each its own batch.
    store.append_from(&batch(a, 1, 1, 10), &meta("gw", 1)).unwrap();
    store.append_from(&batch(b, 1, 1, 5), &meta("gw2", 2)).unwrap();
    store.commit().unwrap();
    store.append_from(&batch(a, 11, 11, 20), &meta("gw", 3)).unwrap();
    store.commit().unwrap();
    let mut reader = backend.open_reader().unwrap();
    assert_eq!(reader.head().unwrap(), Position(25));
    assert_eq!(positions(&reader.read_from(Position(3), 5).unwrap()), vec![4, 5, 6, 7, 8]);
    assert_eq!(positions(&reader.read_from(Position(8), 5).unwrap()), vec![9, 10, 11, 12, 13]);
    // The limit falls exactly on a run's end, then the next read starts at the next run.
    assert_eq!(positions(&reader.read_from(Position(10), 5).unwrap()), vec![11, 12, 13, 14, 15]);
    assert_eq!(positions(&reader.read_from(Position(15), 1).unwrap()), vec![16]);
    assert_eq!(positions(&reader.read_from(Position(24), 10).unwrap()), vec![25]);
    assert!(reader.read_from(Position(25), 10).unwrap().is_empty());
    assert!(reader.read_from(Position(3), 0).unwrap().is_empty());
    let all = reader.read_from(Position(0), 100).unwrap();
    assert_eq!(positions(&all), (1..=25).collect::<Vec<_>>());
    assert_eq!(all[12].event, reading(b, 3, 3_000));
    assert_eq!(all[12].meta, meta("gw2", 2));
    // By seq across a's two runs, and limits inside and at the end of a run.
    assert_eq!(seqs(&reader.read_seqs(&a, Seq(4), Seq(14), 100).unwrap()), (4..=14).collect::<Vec<_>>());
    assert_eq!(positions(&reader.read_seqs(&a, Seq(9), Seq(12), 100).unwrap()), vec![9, 10, 16, 17]);
    assert_eq!(seqs(&reader.read_seqs(&a, Seq(5), Seq(7), 2).unwrap()), vec![5, 6]);
    assert_eq!(seqs(&reader.read_seqs(&a, Seq(8), Seq(20), 3).unwrap()), vec![8, 9, 10]);
    assert_eq!(seqs(&reader.read_seqs(&a, Seq(10), Seq(10), 5).unwrap()), vec![10]);
    assert_eq!(seqs(&reader.read_seqs(&a, Seq(0), Seq(1), 5).unwrap()), vec![1]);
    assert!(reader.read_seqs(&a, Seq(21), Seq(30), 5).unwrap().is_empty());
    assert!(reader.read_seqs(&a, Seq(7), Seq(6), 5).unwrap().is_empty());
    // By time: a's times are 1000 * seq; [9500, 12000) spans both of a's runs.
    let page = reader.read_times(&a, Millis(9_500), Millis(12_000), None, 10).unwrap();
    assert_eq!(seqs(&page), vec![10, 11]);
}

fn time_pages_cross_runs_with_times_out_of_order(backend: &Backend) {
    let d = device("d");
    let times = [5_000, 1_000, 9_000, 3_000, 7_000, 2_000, 6_000, 4_000, 8_000, 1_000, 5_000, 0];
    let time = |seq: u64| times[(seq - 1) as usize];
    let mut store = open(backend);
    store.append_from(&batch_with(d, 1, 1, 5, time), &meta("gw", 1)).unwrap();
    store.append_from(&batch_with(d, 6, 6, 10, time), &meta("gw", 1)).unwrap();
    store.commit().unwrap();
    store.append_from(&batch_with(d, 11, 11, 12, time), &meta("gw", 1)).unwrap();
    store.commit().unwrap();
    let mut reader = backend.open_reader().unwrap();
    let mut expected: Vec<(u64, u64)> =
        (1..=12).map(|seq| (time(seq), seq)).filter(|(t, _)| (1_000..9_000).contains(t)).collect();
    expected.sort();
    for page_size in [1, 2, 3, 4, 100] {
        let mut cursor = None;
        let mut seen = Vec::new();
        loop {
            let page = reader.read_times(&d, Millis(1_000), Millis(9_000), cursor, page_size).unwrap();
            assert!(page.len() <= page_size);
            let keys: Vec<(u64, u64)> = page.iter().map(|e| (e.event.event_time.0, e.event.id.seq.0)).collect();
            let start = seen.len();
            assert_eq!(keys, expected[start..(start + page_size).min(expected.len())], "page size {page_size}");
            seen.extend(keys);
            let Some(last) = page.last() else { break };
            cursor = Some((last.event.event_time, last.event.id.seq));
        }
        assert_eq!(seen, expected, "page size {page_size}");
    }
    // A cursor inside a time tie (1000: seqs 2 and 10) continues with the next seq.
    let page = reader.read_times(&d, Millis(0), Millis(2_000), Some((Millis(1_000), Seq(2))), 10).unwrap();
    assert_eq!(seqs(&page), vec![10]);
    // Time 0 and an empty window.
    assert_eq!(seqs(&reader.read_times(&d, Millis(0), Millis(1), None, 10).unwrap()), vec![12]);
    assert!(reader.read_times(&d, Millis(5_000), Millis(5_000), None, 10).unwrap().is_empty());
    assert!(reader.read_times(&d, Millis(1_000), Millis(9_000), None, 0).unwrap().is_empty());
    let page = reader.read_times(&d, Millis(9_000), Millis(u64::MAX >> 1), None, 10).unwrap();
    assert_eq!(page.iter().map(|e| e.event.clone()).collect::<Vec<_>>(), vec![reading(d, 3, 9_000)]);
}

fn hole_fills_land_between_runs(backend: &Backend) {
    let d = device("d");
    let mut store = open(backend);
    // Seqs 1..=3 declared dropped; 4..=6 then 7..=9 arrive.
    store.append_from(&batch(d, 1, 4, 6), &meta("gw", 1)).unwrap();
    store.append_from(&batch(d, 7, 7, 9), &meta("gw2", 2)).unwrap();
    store.commit().unwrap();
    // Seq 2 turns up, then a replay of 1..=3 fills 1 and 3 around it.
    assert_eq!(store.append_from(&batch(d, 2, 2, 2), &meta("gw3", 3)).unwrap().n_new, 1);
    store.commit().unwrap();
    assert_eq!(store.append_from(&batch(d, 1, 1, 3), &meta("gw4", 4)).unwrap().n_new, 2);
    store.commit().unwrap();
    assert_eq!(store.append_from(&batch(d, 1, 1, 9), &meta("gw5", 5)).unwrap().n_new, 0);
    store.commit().unwrap();
    let mut reader = backend.open_reader().unwrap();
    let by_seq = reader.read_seqs(&d, Seq(1), Seq(9), 100).unwrap();
    assert_eq!(seqs(&by_seq), (1..=9).collect::<Vec<_>>());
    assert_eq!(positions(&by_seq), vec![8, 7, 9, 1, 2, 3, 4, 5, 6]);
    let gateways: Vec<&str> = by_seq.iter().map(|e| e.meta.gateway.as_str()).collect();
    assert_eq!(gateways, vec!["gw4", "gw3", "gw4", "gw", "gw", "gw", "gw2", "gw2", "gw2"]);
    assert_eq!(seqs(&reader.read_seqs(&d, Seq(2), Seq(4), 2).unwrap()), vec![2, 3]);
    assert_eq!(seqs(&reader.read_from(Position(0), 100).unwrap()), vec![4, 5, 6, 7, 8, 9, 2, 1, 3]);
    assert_eq!(seqs(&reader.read_from(Position(5), 2).unwrap()), vec![9, 2]);
    let by_time = reader.read_times(&d, Millis(0), Millis(100_000), None, 100).unwrap();
    assert_eq!(seqs(&by_time), (1..=9).collect::<Vec<_>>());
    let info = &reader.streams().unwrap()[&d];
    assert!(info.holes.is_empty());
    assert_eq!(info.n_events, 9);
}

fn long_runs_and_overlapping_inserts(backend: &Backend) {
    let d = device("d");
    let mut writer = backend.open_writer().unwrap();
    // 2,500 events in one insert: longer than any segment, read across the cuts.
    let events: Vec<Event> = (1..=2_500).map(|seq| reading(d, seq, 1_000 * seq)).collect();
    assert_eq!(writer.insert_events(&events, &meta("gw", 1)).unwrap(), (2_500, Position(2_500)));
    writer.commit().unwrap();
    let mut reader = backend.open_reader().unwrap();
    for after in [0, 1_000, 1_020, 1_023, 1_024, 2_047, 2_048, 2_490] {
        let page = reader.read_from(Position(after), 40).unwrap();
        let expected: Vec<u64> = (after + 1..=(after + 40).min(2_500)).collect();
        assert_eq!(positions(&page), expected, "after {after}");
        assert_eq!(seqs(&page), expected);
    }
    assert_eq!(seqs(&reader.read_seqs(&d, Seq(1_020), Seq(1_030), 100).unwrap()), (1_020..=1_030).collect::<Vec<_>>());
    let page = reader.read_times(&d, Millis(1_020_000), Millis(1_030_000), None, 100).unwrap();
    assert_eq!(seqs(&page), (1_020..1_030).collect::<Vec<_>>());
    assert_eq!(reader.read_seqs(&d, Seq(2_048), Seq(2_048), 1).unwrap()[0].event, events[2_047]);

    // Overlapping what is stored, with a duplicate inside the call: only new seqs are stored.
    let mut mixed: Vec<Event> = (2_495..=2_505).map(|seq| reading(d, seq, seq)).collect();
    mixed.push(reading(d, 2_503, 0));
    mixed.push(reading(d, 2_506, 2_506));
    let (n_inserted, head) = writer.insert_events(&mixed, &meta("gw", 2)).unwrap();
    assert_eq!(n_inserted, 6);
    writer.commit().unwrap();
    let tail = reader.read_seqs(&d, Seq(2_499), Seq(3_000), 100).unwrap();
    assert_eq!(seqs(&tail), (2_499..=2_506).collect::<Vec<_>>());
    assert_eq!(tail[1].meta, meta("gw", 1), "the stored copy is kept");
    assert_eq!(tail[4].event.event_time, Millis(2_503), "the first copy in the call is kept");
    assert_eq!(reader.head().unwrap(), head);
    let stored_positions = positions(&reader.read_from(Position(2_500), 100).unwrap());
    assert_eq!(stored_positions.len(), 6);
    assert!(stored_positions.windows(2).all(|pair| pair[0] < pair[1]));
    if let Backend::Sqlite { .. } = backend {
        assert_eq!(stored_positions, (2_501..=2_506).collect::<Vec<_>>(), "SQLite positions are dense");
    }

    // An insert proven new that finds a stored seq is refused (at the insert on SQLite, at the
    // commit on PostgreSQL, which holds inserts back), and the transaction rolls back.
    let refused = |writer: &mut Box<dyn EventWriter>, events: &[Event]| {
        let error = match writer.insert_new_events(events, &meta("gw", 3)) {
            Ok(_) => writer.commit().expect_err("a stored seq inserted as new is refused at the commit"),
            Err(error) => error,
        };
        writer.rollback();
        error
    };
    let error = refused(&mut writer, &[reading(d, 2_507, 1), reading(d, 2_506, 1)]);
    assert!(error.is_conflict(), "a stored seq inserted as new is a conflict: {error}");
    let error = refused(&mut writer, &[reading(d, 2_500, 1), reading(d, 2_501, 1)]);
    assert!(error.is_conflict(), "a run overlapping the stored tail is a conflict: {error}");
    assert_eq!(reader.read_seqs(&d, Seq(2_507), Seq(3_000), 10).unwrap().len(), 0);
    assert_eq!(reader.read_seqs(&d, Seq(1), Seq(3_000), 10_000).unwrap().len(), 2_506);
}

conformance!(
    reads_start_and_end_inside_runs,
    time_pages_cross_runs_with_times_out_of_order,
    hole_fills_land_between_runs,
    long_runs_and_overlapping_inserts,
    appends_then_reads_match_a_model,
);

/// One generated append: a device, where the batch starts relative to the stream's high, how
/// many events, how many declared-dropped seqs before them, and whether to commit after it.
#[derive(Clone, Debug)]
struct Op {
    device: usize,
    /// 0: fresh events right after `high`; otherwise a replay starting this far back.
    back: u64,
    gap: u64,
    len: u64,
    commit: bool,
}

fn op() -> impl Strategy<Value = Op> {
    (0usize..3, prop_oneof![3 => Just(0u64), 2 => 1u64..40], 0u64..4, 1u64..60, prop::bool::weighted(0.7))
        .prop_map(|(device, back, gap, len, commit)| Op { device, back, gap, len, commit })
}

/// A read to compare: by position, by seq, or by time (paged).
#[derive(Clone, Debug)]
enum Read {
    From { after: u64, max: usize },
    Seqs { device: usize, from: u64, to: u64, max: usize },
    Times { device: usize, from: u64, to: u64, page: usize },
}

fn read() -> impl Strategy<Value = Read> {
    prop_oneof![
        (0u64..200, 1usize..80).prop_map(|(after, max)| Read::From { after, max }),
        (0usize..3, 0u64..120, 0u64..120, 1usize..80).prop_map(|(device, from, len, max)| Read::Seqs {
            device,
            from,
            to: from + len,
            max
        }),
        (0usize..3, 0u64..25, 1u64..25, 1usize..30).prop_map(|(device, from, len, page)| Read::Times {
            device,
            from: from * 1_000,
            to: (from + len) * 1_000,
            page
        }),
    ]
}

/// What the store should hold: every event once, at the position it got when first delivered.
#[derive(Default)]
struct Model {
    log: Vec<StoredEvent>,
    by_device: BTreeMap<DeviceId, BTreeMap<u64, usize>>,
    high: BTreeMap<DeviceId, u64>,
}

static CASE: AtomicU64 = AtomicU64::new(0);

fn appends_then_reads_match_a_model(backend: &Backend) {
    let cases = if matches!(backend, Backend::Postgres { .. }) { 12 } else { 32 };
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let times = proptest::collection::vec(0u64..25, 64);
    let input = (proptest::collection::vec(op(), 1..14), proptest::collection::vec(read(), 1..20), times);
    runner
        .run(&input, |(ops, reads, times)| {
            // Every case has its own devices in the one store; positions continue from the head.
            let case = CASE.fetch_add(1, Ordering::Relaxed);
            let devices: Vec<DeviceId> = (0..3).map(|index| device(&format!("c{case}-d{index}"))).collect();
            let mut store = open(backend);
            let start = store.head().0;
            let mut model = Model::default();
            let time_of = |device: usize, seq: u64| times[((seq as usize) * 7 + device) % times.len()] * 1_000;
            for (index, op) in ops.iter().enumerate() {
                let d = devices[op.device];
                let high = *model.high.get(&d).unwrap_or(&0);
                let (from, first) = if op.back == 0 || high == 0 {
                    (high + 1, high + 1 + op.gap)
                } else {
                    let first = high.saturating_sub(op.back).max(1);
                    (first, first)
                };
                let last = first + op.len - 1;
                let batch = batch_with(d, from, first, last, |seq| time_of(op.device, seq));
                let at = meta(&format!("gw{index}"), index as u64);
                let appended = store.append_from(&batch, &at).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut n_new = 0;
                for event in &batch.events {
                    let held = model.by_device.entry(d).or_default();
                    if let std::collections::btree_map::Entry::Vacant(slot) = held.entry(event.id.seq.0) {
                        slot.insert(model.log.len());
                        let position = Position(start + model.log.len() as u64 + 1);
                        model.log.push(StoredEvent { position, event: event.clone(), meta: at });
                        n_new += 1;
                    }
                }
                let high = model.high.entry(d).or_default();
                *high = (*high).max(last);
                prop_assert_eq!(appended.n_new, n_new);
                prop_assert_eq!(appended.high, Seq(*high));
                if op.commit || index + 1 == ops.len() {
                    store.commit().map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
            }
            let mut reader = backend.open_reader().unwrap();
            prop_assert_eq!(reader.head().unwrap(), Position(start + model.log.len() as u64));
            prop_assert_eq!(&reader.read_from(Position(start), 10_000).unwrap(), &model.log);
            for read in reads {
                check_read(&mut *reader, &model, &devices, start, &read)?;
            }
            Ok(())
        })
        .unwrap();
}

fn check_read(
    reader: &mut dyn EventReader,
    model: &Model,
    devices: &[DeviceId],
    start: u64,
    read: &Read,
) -> Result<(), TestCaseError> {
    match *read {
        Read::From { after, max } => {
            let expected: Vec<StoredEvent> = model.log.iter().skip(after as usize).take(max).cloned().collect();
            prop_assert_eq!(reader.read_from(Position(start + after), max).unwrap(), expected, "{:?}", read);
        }
        Read::Seqs { device, from, to, max } => {
            let d = devices[device];
            let held = model.by_device.get(&d).cloned().unwrap_or_default();
            let expected: Vec<StoredEvent> =
                held.range(from..=to).take(max).map(|(_, index)| model.log[*index].clone()).collect();
            prop_assert_eq!(reader.read_seqs(&d, Seq(from), Seq(to), max).unwrap(), expected, "{:?}", read);
        }
        Read::Times { device, from, to, page } => {
            let d = devices[device];
            let held = model.by_device.get(&d).cloned().unwrap_or_default();
            let mut expected: Vec<&StoredEvent> = held
                .values()
                .map(|index| &model.log[*index])
                .filter(|stored| (from..to).contains(&stored.event.event_time.0))
                .collect();
            expected.sort_by_key(|stored| (stored.event.event_time, stored.event.id.seq));
            let mut cursor = None;
            let mut seen = 0;
            loop {
                let got = reader.read_times(&d, Millis(from), Millis(to), cursor, page).unwrap();
                let want: Vec<StoredEvent> = expected.iter().skip(seen).take(page).map(|e| (*e).clone()).collect();
                prop_assert_eq!(&got, &want, "{:?} after {}", read, seen);
                seen += got.len();
                let Some(last) = got.last() else { break };
                cursor = Some((last.event.event_time, last.event.id.seq));
            }
            prop_assert_eq!(seen, expected.len());
        }
    }
    Ok(())
}
