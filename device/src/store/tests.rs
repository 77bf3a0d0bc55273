//! Unit tests of the store: seqs and clocks across reopen, retention and the byte budget, source
//! watermarks, the shadow and the files it refuses to open.

use tempfile::TempDir;
use tidesync_core::event::SensorReading;

use super::*;

fn device() -> DeviceId {
    DeviceId::new("pump-7").unwrap()
}

fn reading(value: f64) -> NewEvent {
    let payload = Payload::Reading(SensorReading { sensor: "temp".into(), value, unit: "Cel".into() });
    NewEvent::new(Millis(1_700_000_000_000), &payload).unwrap()
}

fn create(dir: &TempDir, config: LedgerConfig) -> DeviceStore {
    DeviceStore::create(&dir.path().join("ledger.sqlite3"), device(), config).unwrap()
}

fn reopen(dir: &TempDir, store: DeviceStore) -> DeviceStore {
    let config = store.config().clone();
    drop(store);
    DeviceStore::open(&dir.path().join("ledger.sqlite3"), Some(device()), config).unwrap()
}

fn held_seqs(store: &DeviceStore) -> Vec<u64> {
    store.events_from(Seq::FIRST, usize::MAX >> 1).unwrap().iter().map(|event| event.id.seq.0).collect()
}

fn values(store: &DeviceStore) -> Vec<f64> {
    store
        .events_from(Seq::FIRST, 1 << 20)
        .unwrap()
        .iter()
        .filter_map(|event| match &event.payload {
            Payload::Reading(reading) => Some(reading.value),
            _ => None,
        })
        .collect()
}

#[test]
fn seqs_continue_gap_free_and_the_clock_never_goes_back_across_reopen() {
    let dir = TempDir::new().unwrap();
    let mut store = create(&dir, LedgerConfig::default());
    let first = store.record(Millis(7_200_000), &[reading(1.0), reading(2.0)]).unwrap();
    assert_eq!((first.first, first.last), (Seq(1), Seq(2)));
    let stamp_before = store.hlc_last();
    let mut store = reopen(&dir, store);
    // The wall clock jumped back an hour while the device was off.
    let second = store.record(Millis(7_200_000 - 3_600_000), &[reading(3.0)]).unwrap();
    assert_eq!((second.first, second.last), (Seq(3), Seq(3)));
    assert!(store.hlc_last() > stamp_before);
    assert_eq!(held_seqs(&store), vec![1, 2, 3]);
    let events = store.events_from(Seq::FIRST, 10).unwrap();
    assert!(events.windows(2).all(|pair| pair[0].hlc < pair[1].hlc));
}

#[test]
fn a_group_commit_answers_each_request_and_refuses_one_without_touching_the_others() {
    let dir = TempDir::new().unwrap();
    let one = [reading(1.0)];
    // Budget for a handful of events: the oversized middle request is refused alone.
    let config = LedgerConfig { budget_bytes: 6 * one[0].cost_bytes(), ..LedgerConfig::default() };
    let mut store = create(&dir, config);
    let big: Vec<NewEvent> = (0..10).map(|i| reading(f64::from(i))).collect();
    let results = store
        .record_group(Millis(1), &[RecordRequest::local(&one), RecordRequest::local(&big), RecordRequest::local(&one)]);
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].as_ref().unwrap().first, Seq(1));
    assert!(matches!(results[1], Err(StoreError::Ledger(LedgerError::Full { .. }))), "{:?}", results[1]);
    assert_eq!(results[2].as_ref().unwrap().first, Seq(2));
    assert_eq!(held_seqs(&reopen(&dir, store)), vec![1, 2]);
}

#[test]
fn a_full_ledger_refuses_by_default_and_resumes_after_a_commit_frees_space() {
    let dir = TempDir::new().unwrap();
    let cost = reading(0.0).cost_bytes();
    let mut store = create(&dir, LedgerConfig { budget_bytes: 10 * cost, ..LedgerConfig::default() });
    for i in 0..10 {
        store.record(Millis(1), &[reading(f64::from(i))]).unwrap();
    }
    let error = store.record(Millis(1), &[reading(99.0)]).unwrap_err();
    assert!(error.to_string().contains("ledger is full"), "a clear error: {error}");
    assert_eq!(held_seqs(&store).len(), 10, "nothing acknowledged is lost");
    // The refused event did not take a seq.
    assert_eq!(store.status().unwrap().next_seq, 11);
    store.mark_committed_seq(Seq(4)).unwrap();
    store.prune_all().unwrap();
    let resumed = store.record(Millis(1), &[reading(99.0)]).unwrap();
    assert_eq!(resumed.first, Seq(11));
    assert_eq!(held_seqs(&store), (5..=11).collect::<Vec<_>>());
}

#[test]
fn custody_acknowledged_events_are_evicted_before_anything_is_refused() {
    let dir = TempDir::new().unwrap();
    let cost = reading(0.0).cost_bytes();
    let mut store = create(&dir, LedgerConfig { budget_bytes: 16 * cost, ..LedgerConfig::default() });
    for i in 0..16 {
        store.record(Millis(1), &[reading(f64::from(i))]).unwrap();
    }
    store.mark_custody("gateway-a", Seq(8)).unwrap();
    store.record(Millis(1), &[reading(100.0)]).unwrap();
    let held = held_seqs(&store);
    assert!(held[0] > 1 && held[0] <= 9, "evicted only custody-acked events: {held:?}");
    assert_eq!(*held.last().unwrap(), 17);
    assert!(held.windows(2).all(|pair| pair[1] == pair[0] + 1), "held events stay contiguous");
    // Custody persists across a reopen.
    let store = reopen(&dir, store);
    assert_eq!(store.status().unwrap().custody_seqs.get("gateway-a"), Some(&8));
}

#[test]
fn drop_oldest_records_a_gap_naming_exactly_the_dropped_seqs() {
    let dir = TempDir::new().unwrap();
    let cost = reading(0.0).cost_bytes();
    let config =
        LedgerConfig { budget_bytes: 16 * cost, full_policy: FullPolicy::DropOldest, ..LedgerConfig::default() };
    let mut store = create(&dir, config);
    for i in 0..40 {
        store.record(Millis(1), &[reading(f64::from(i))]).unwrap();
    }
    let events = store.events_from(Seq::FIRST, 1000).unwrap();
    let gaps: Vec<&Gap> = events
        .iter()
        .filter_map(|event| match &event.payload {
            Payload::Gap(gap) => Some(gap),
            _ => None,
        })
        .collect();
    assert!(!gaps.is_empty());
    // Every seq ever assigned is either held or named by a gap event (a gap event may itself be
    // dropped later, and then a later gap names it).
    let high = store.status().unwrap().high_seq;
    let mut dropped: Vec<u64> = gaps.iter().flat_map(|gap| gap.first.0..=gap.last.0).collect();
    let held: Vec<u64> = events.iter().map(|event| event.id.seq.0).collect();
    let first_held = held[0];
    dropped.retain(|seq| *seq < first_held);
    let oldest_named = dropped.iter().min().copied().unwrap_or(first_held);
    assert!(oldest_named <= first_held);
    // The gap events chain back without holes to seq 1 only if each dropped run is named; check
    // the newest gap names the run right before the first held event.
    let newest = gaps.last().unwrap();
    assert_eq!(newest.last.0 + 1, first_held, "{gaps:?} {held:?}");
    assert_eq!(*held.last().unwrap(), high);
    assert!(store.status().unwrap().used_bytes <= 16 * cost);
}

#[test]
fn a_source_watermark_commits_with_its_events_and_refuses_a_resend() {
    let dir = TempDir::new().unwrap();
    let mut store = create(&dir, LedgerConfig::default());
    assert_eq!(store.source_high("serial").unwrap(), 0);
    store.record_from_source(Millis(1), "serial", 2, &[reading(1.0), reading(2.0)]).unwrap();
    let mut store = reopen(&dir, store);
    assert_eq!(store.source_high("serial").unwrap(), 2);
    let resent = store.record_from_source(Millis(1), "serial", 2, &[reading(2.0)]).unwrap_err();
    assert!(matches!(resent, StoreError::AlreadyRecorded { high: 2, .. }), "{resent}");
    store.record_from_source(Millis(1), "serial", 3, &[reading(3.0)]).unwrap();
    assert_eq!(values(&store), vec![1.0, 2.0, 3.0]);
    // A refused request (budget) leaves the watermark where it was, so the record is sent again.
    let cost = reading(0.0).cost_bytes();
    let tight_dir = TempDir::new().unwrap();
    let mut tight = create(&tight_dir, LedgerConfig { budget_bytes: cost, ..LedgerConfig::default() });
    assert!(tight.record_from_source(Millis(1), "serial", 2, &[reading(1.0), reading(2.0)]).is_err());
    assert_eq!(tight.source_high("serial").unwrap(), 0);
}

#[test]
fn commits_prune_and_give_space_back() {
    let dir = TempDir::new().unwrap();
    let mut store = create(&dir, LedgerConfig::default());
    let batch: Vec<NewEvent> = (0..5000).map(|i| reading(f64::from(i))).collect();
    store.record(Millis(1), &batch).unwrap();
    let before = store.status().unwrap();
    store.mark_committed_seq(Seq(5000)).unwrap();
    store.prune_all().unwrap();
    let after = store.status().unwrap();
    assert_eq!(after.held_events, 0);
    assert_eq!(after.backlog_events, 0);
    assert_eq!(after.used_bytes, 0);
    assert!(after.database_bytes < before.database_bytes, "{} < {}", after.database_bytes, before.database_bytes);
    // Seqs continue after a full prune and a reopen.
    let mut store = reopen(&dir, store);
    assert_eq!(store.record(Millis(1), &[reading(1.0)]).unwrap().first, Seq(5001));
    // The ledger reads the pruned run as a hole in front of the held events.
    let batch = store.read(&device(), Seq(1), 100).unwrap().unwrap();
    assert_eq!(batch.from, Seq(1));
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].id.seq, Seq(5001));
}

#[test]
fn a_report_changes_the_shadow_and_records_its_event_in_one_transaction() {
    let dir = TempDir::new().unwrap();
    let mut store = create(&dir, LedgerConfig::default());
    let id = store.report(Millis(1), "firmware", &Value::Text("1.2.0".into())).unwrap();
    assert_eq!(id.seq, Seq(1));
    let store = reopen(&dir, store);
    assert_eq!(store.shadow().get(Section::Reported, "firmware"), Some(Value::Text("1.2.0".into())));
    let events = store.events_from(Seq::FIRST, 10).unwrap();
    assert!(matches!(&events[0].payload, Payload::ShadowReported(_)));

    // A full ledger refuses the report: neither the shadow nor the ledger changes.
    let cost = reading(0.0).cost_bytes();
    let dir = TempDir::new().unwrap();
    let mut store = create(&dir, LedgerConfig { budget_bytes: cost, ..LedgerConfig::default() });
    store.record(Millis(1), &[reading(1.0)]).unwrap();
    assert!(store.report(Millis(1), "mode", &Value::Text("eco".into())).is_err());
    assert_eq!(store.shadow().get(Section::Reported, "mode"), None);
    let store = reopen(&dir, store);
    assert_eq!(store.shadow().get(Section::Reported, "mode"), None);
    assert_eq!(held_seqs(&store), vec![1]);
}

#[test]
fn shadow_saves_are_compacted_and_reload_the_same_document() {
    let dir = TempDir::new().unwrap();
    let config = LedgerConfig { shadow_increments_max: 4, ..LedgerConfig::default() };
    let mut store = create(&dir, config);
    for i in 0..20 {
        store.report(Millis(1), &format!("key{}", i % 3), &Value::Int(i)).unwrap();
        assert!(store.status().unwrap().shadow_saves <= 6, "compaction bounds the rows");
    }
    let json = store.shadow().to_json();
    let store = reopen(&dir, store);
    assert_eq!(store.shadow().to_json(), json);
}

#[test]
fn desired_changes_reach_watchers() {
    let dir = TempDir::new().unwrap();
    let mut store = create(&dir, LedgerConfig::default());
    let watch = store.watch_desired();
    assert!(watch.try_recv().is_none());
    // A sync (here: a direct edit standing in for one) changes desired; persisting tells watchers.
    store.shadow.set(Section::Desired, "interval_s", &Value::Int(30)).unwrap();
    store.persist_shadow().unwrap();
    let desired = watch.recv_timeout(Duration::from_secs(1)).unwrap();
    assert_eq!(desired.as_map().and_then(|map| map.get("interval_s")), Some(&Value::Int(30)));
    let store = reopen(&dir, store);
    assert_eq!(store.shadow().get(Section::Desired, "interval_s"), Some(Value::Int(30)));
}

#[test]
fn foreign_corrupt_and_missing_files_are_refused_and_left_untouched() {
    let dir = TempDir::new().unwrap();
    let config = LedgerConfig::default();
    let path = dir.path().join("x.sqlite3");
    assert!(matches!(DeviceStore::open(&path, None, config.clone()), Err(StoreError::Missing { .. })));

    std::fs::write(&path, b"not a database at all, just some text that is long enough").unwrap();
    let before = std::fs::read(&path).unwrap();
    let error = DeviceStore::open(&path, None, config.clone()).unwrap_err();
    assert!(matches!(error, StoreError::NotADatabase { .. }), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    std::fs::remove_file(&path).unwrap();
    {
        let other = Connection::open(&path).unwrap();
        other.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let error = DeviceStore::open(&path, None, config.clone()).unwrap_err();
    assert!(matches!(error, StoreError::Foreign { .. }), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // A ledger whose pages were overwritten in the middle.
    let path = dir.path().join("ledger.sqlite3");
    let mut store = DeviceStore::create(&path, device(), config.clone()).unwrap();
    let batch: Vec<NewEvent> = (0..2000).map(|i| reading(f64::from(i))).collect();
    store.record(Millis(1), &batch).unwrap();
    drop(store);
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    for byte in &mut bytes[4096..len.min(4096 * 8)] {
        *byte = 0xA5;
    }
    std::fs::write(&path, &bytes).unwrap();
    match DeviceStore::open(&path, None, config.clone()) {
        Err(error) => assert!(!error.to_string().is_empty()),
        Ok(store) => {
            // SQLite may open a file whose damage is in pages it has not read yet; reading them
            // must then fail with an error, not a panic.
            assert!(store.events_from(Seq::FIRST, 5000).is_err() || integrity_fails(&store));
        }
    }

    // Someone else's device.
    let error = DeviceStore::open(&dir.path().join("x.sqlite3"), Some(device()), config).unwrap_err();
    assert!(!matches!(error, StoreError::DeviceMismatch { .. }));
}

fn integrity_fails(store: &DeviceStore) -> bool {
    store
        .connection()
        .query_row("PRAGMA integrity_check", [], |row| row.get::<_, String>(0))
        .map_or(true, |result| result != "ok")
}

#[test]
fn a_ledger_of_another_device_is_refused() {
    let dir = TempDir::new().unwrap();
    let store = create(&dir, LedgerConfig::default());
    drop(store);
    let other = DeviceId::new("pump-8").unwrap();
    let error =
        DeviceStore::open(&dir.path().join("ledger.sqlite3"), Some(other), LedgerConfig::default()).unwrap_err();
    assert!(matches!(error, StoreError::DeviceMismatch { .. }), "{error}");
}

#[test]
fn a_dropped_gap_event_is_covered_by_the_next_gap() {
    let dir = TempDir::new().unwrap();
    let cost = reading(0.0).cost_bytes();
    let config =
        LedgerConfig { budget_bytes: 8 * cost, full_policy: FullPolicy::DropOldest, ..LedgerConfig::default() };
    let mut store = create(&dir, config);
    for i in 0..200 {
        store.record(Millis(1), &[reading(f64::from(i))]).unwrap();
    }
    // Many evictions happened; earlier gap events were dropped with the events. The gaps still
    // held must explain every seq before the first held reading, from seq 1.
    let events = store.events_from(Seq::FIRST, 1000).unwrap();
    let first_held = events[0].id.seq.0;
    let mut explained = vec![false; first_held as usize];
    for event in &events {
        if let Payload::Gap(gap) = &event.payload {
            for seq in gap.first.0..=gap.last.0.min(first_held - 1) {
                explained[seq as usize] = true;
            }
        }
    }
    let unexplained: Vec<usize> = (1..first_held as usize).filter(|seq| !explained[*seq]).collect();
    assert!(unexplained.is_empty(), "seqs {unexplained:?} dropped with no gap event naming them");
}
