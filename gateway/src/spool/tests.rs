//! Unit tests of the spool: group commit durability, dedupe, budget, pruning, holes.

use tidesync_core::event::{DeviceId, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::{Ledger, LedgerError, MemLedger};
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::wire::EventBatch;

use super::Spool;

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn recorded(device_id: DeviceId, n_events: u64) -> MemLedger {
    let mut ledger = MemLedger::new();
    for index in 0..n_events {
        let payload =
            Payload::Reading(SensorReading { sensor: "temp".into(), value: index as f64, unit: "Cel".into() });
        ledger.record(device_id, Millis(1_000 + index), Millis(1_000 + index), payload).unwrap();
    }
    ledger
}

fn batch(ledger: &MemLedger, device_id: DeviceId, from: u64, n_events: usize) -> EventBatch {
    ledger.read(&device_id, Seq(from), n_events).unwrap().unwrap()
}

fn open(path: &std::path::Path, budget_bytes: u64) -> Spool {
    Spool::open(path, "gateway:test", budget_bytes, ShadowLimits::default()).unwrap()
}

#[test]
fn committed_appends_survive_reopen_and_uncommitted_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let pump = device("pump-7");
    let source = recorded(pump, 20);
    {
        let mut spool = open(&path, u64::MAX);
        assert_eq!(spool.append(&batch(&source, pump, 1, 10)).unwrap().n_new, 10);
        spool.commit().unwrap();
        assert_eq!(spool.append(&batch(&source, pump, 11, 10)).unwrap().high, Seq(20));
        // Dropped without the group commit, as a crash would.
    }
    let spool = open(&path, u64::MAX);
    assert_eq!(spool.high(&pump), Seq(10));
    assert_eq!(spool.stats().n_events, 10);
    let read = spool.read(&pump, Seq(1), 100).unwrap().unwrap();
    assert_eq!(read.events, batch(&source, pump, 1, 10).events);
}

#[test]
fn duplicates_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    let pump = device("pump-7");
    let source = recorded(pump, 10);
    assert_eq!(spool.append(&batch(&source, pump, 1, 6)).unwrap().n_new, 6);
    let again = spool.append(&batch(&source, pump, 1, 10)).unwrap();
    assert_eq!((again.high, again.n_new), (Seq(10), 4));
    spool.commit().unwrap();
    assert_eq!(spool.stats().n_events, 10);
    assert!(matches!(spool.append(&batch(&source, pump, 3, 2)), Ok(appended) if appended.n_new == 0));
}

#[test]
fn budget_refuses_without_changing_anything_and_commit_frees_room() {
    let dir = tempfile::tempdir().unwrap();
    let pump = device("pump-7");
    let source = recorded(pump, 20);
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    spool.append(&batch(&source, pump, 1, 10)).unwrap();
    spool.commit().unwrap();
    let ten_bytes = spool.stats().used_bytes;
    drop(spool);
    let mut spool = open(&dir.path().join("spool.db"), ten_bytes + ten_bytes / 2);
    assert_eq!(spool.stats().used_bytes, ten_bytes);
    let error = spool.append(&batch(&source, pump, 11, 10)).unwrap_err();
    assert!(matches!(error, LedgerError::Full { .. }), "{error}");
    assert_eq!(spool.high(&pump), Seq(10));
    spool.mark_committed(pump, Seq(8)).unwrap();
    spool.commit().unwrap();
    assert_eq!(spool.stats().n_events, 2);
    assert_eq!(spool.append(&batch(&source, pump, 11, 10)).unwrap().n_new, 10);
    spool.commit().unwrap();
    // Pruned events stay covered: a read from 1 declares them as a hole before seq 9.
    let read = spool.read(&pump, Seq(1), 100).unwrap().unwrap();
    assert_eq!((read.from, read.first_seq(), read.last_seq()), (Seq(1), Seq(9), Seq(20)));
    assert_eq!(spool.committed(&pump), Seq(8));
}

#[test]
fn declared_holes_are_covered_and_filled_late() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    let pump = device("pump-7");
    let source = recorded(pump, 10);
    let full = batch(&source, pump, 1, 10);
    let with_hole = EventBatch::new(pump, Seq(1), full.events[4..].to_vec()).unwrap();
    assert_eq!(spool.append(&with_hole).unwrap().high, Seq(10));
    spool.commit().unwrap();
    assert_eq!(spool.stats().n_events, 6);
    // The same events arriving late (through another gateway) fill the hole.
    assert_eq!(spool.append(&full).unwrap().n_new, 4);
    spool.commit().unwrap();
    assert_eq!(spool.read(&pump, Seq(1), 100).unwrap().unwrap().events, full.events);
}

#[test]
fn a_batch_after_a_gap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    let pump = device("pump-7");
    let source = recorded(pump, 10);
    assert!(matches!(spool.append(&batch(&source, pump, 5, 3)), Err(LedgerError::Hole { .. })));
    assert_eq!(spool.high(&pump), Seq(0));
}
