//! Unit tests of `SimDisk`: a crash loses exactly the unsynced writes.

use super::*;
use tidesync_core::event::SensorReading;
use tidesync_core::ledger::MemLedger;
use tidesync_core::shadow::{Section, ShadowLimits};
use tidesync_core::sync::ShadowKeeping;
use tidesync_core::value::Value;

fn device() -> DeviceId {
    DeviceId::new("d1").unwrap()
}

fn reading(value: f64) -> Payload {
    Payload::Reading(SensorReading { sensor: "t".into(), value, unit: "Cel".into() })
}

fn disk() -> SimDisk {
    SimDisk::new(MemStore::new(
        "device:d1",
        MemLedger::pruning(),
        ShadowKeeping::Only(device()),
        ShadowLimits::default(),
    ))
}

#[test]
fn a_crash_loses_exactly_the_unsynced_writes() {
    let mut disk = disk();
    for index in 0..3 {
        disk.record(device(), Millis(1_000 + index), Millis(1_000 + index), reading(index as f64)).unwrap();
    }
    let synced = disk.sync();
    assert_eq!(synced.recorded.len(), 3);
    disk.record(device(), Millis(2_000), Millis(2_000), reading(9.0)).unwrap();
    assert_eq!(disk.live().high(&device()), Seq(4));
    assert!(disk.has_unsynced());
    disk.crash();
    assert_eq!(disk.live().high(&device()), Seq(3));
    assert!(!disk.has_unsynced());
    // The lost seq is issued again, with the same clock state as before the crash.
    let id = disk.record(device(), Millis(3_000), Millis(3_000), reading(10.0)).unwrap();
    assert_eq!(id.seq, Seq(4));
}

#[test]
fn replayed_state_equals_the_live_state() {
    let mut disk = disk();
    for index in 0..10 {
        disk.record(device(), Millis(5), Millis(5), reading(index as f64)).unwrap();
    }
    disk.mark_committed(device(), Seq(4)).unwrap();
    let dropped = disk.drop_oldest(device(), 2, Millis(6)).unwrap();
    assert_eq!(dropped, (Seq(5), Seq(6)));
    let synced = disk.sync();
    assert_eq!(synced.recorded.last().map(|(id, _)| id.seq), Some(Seq(11)), "the gap event counts as recorded");
    assert_eq!(synced.dropped, vec![(Seq(5), Seq(6))]);
    disk.materialize();
    let live: Vec<_> = disk.live().ledger.events(&device()).cloned().collect();
    let durable: Vec<_> = disk.durable().ledger.events(&device()).cloned().collect();
    assert_eq!(live, durable);
    assert_eq!(disk.durable().ledger.committed(&device()), Seq(4));
}

#[test]
fn shadow_changes_survive_only_after_a_sync() {
    let mut disk = disk();
    disk.shadow_mut(&device()).unwrap().set(Section::Reported, "fw", &Value::Int(1)).unwrap();
    disk.touch_shadow(device());
    disk.sync();
    disk.shadow_mut(&device()).unwrap().set(Section::Reported, "fw", &Value::Int(2)).unwrap();
    disk.touch_shadow(device());
    disk.crash();
    assert_eq!(disk.shadow_mut(&device()).unwrap().get(Section::Reported, "fw"), Some(Value::Int(1)));
}

/// The events and watermarks of the device's stream, to compare two stores.
fn state(store: &MemStore) -> (Vec<tidesync_core::event::Event>, Seq, Seq) {
    (store.ledger.events(&device()).cloned().collect(), store.high(&device()), store.ledger.committed(&device()))
}

#[test]
fn a_crash_after_many_syncs_restores_the_last_synced_state_whether_snapshotted_or_replayed() {
    // Enough writes that syncs take snapshots, with logged writes after the last one, then
    // unsynced writes that the crash must lose.
    for n_rounds in [3, 40, 200] {
        let mut disk = disk();
        let mut expected = None;
        for round in 0..n_rounds {
            for index in 0..3 {
                let wall = Millis(10_000 * round + index);
                disk.record(device(), wall, wall, reading(index as f64)).unwrap();
            }
            if round % 4 == 3 {
                let high = disk.live().high(&device());
                disk.mark_committed(device(), Seq(high.0 - 2)).unwrap();
            }
            if round % 7 == 6 {
                disk.drop_oldest(device(), 1, Millis(10_000 * round + 5)).unwrap();
            }
            let synced = disk.sync();
            assert!(!synced.recorded.is_empty());
            expected = Some(state(disk.live()));
        }
        disk.record(device(), Millis(1 << 40), Millis(1 << 40), reading(99.0)).unwrap();
        disk.mark_committed(device(), disk.live().high(&device())).unwrap();
        assert_ne!(Some(state(disk.live())), expected);
        disk.crash();
        assert_eq!(Some(state(disk.live())), expected, "{n_rounds} rounds");
        disk.materialize();
        assert_eq!(Some(state(disk.durable())), expected, "{n_rounds} rounds");
    }
}

#[test]
fn sync_reports_each_recorded_event_once_with_the_hash_it_was_recorded_with() {
    let mut disk = disk();
    let mut reported = Vec::new();
    for round in 0..100u64 {
        let wall = Millis(1_000 * round);
        let id = disk.record(device(), wall, wall, reading(round as f64)).unwrap();
        let hash = crate::digest::event_hash(disk.live().ledger.get(&id).unwrap());
        // Committed (and pruned) before the sync, as a host with the `send_unsynced` bug does.
        disk.mark_committed(device(), id.seq).unwrap();
        let synced = disk.sync();
        assert_eq!(synced.recorded, vec![(id, hash)]);
        reported.push(id.seq.0);
    }
    assert_eq!(reported, (1..=100).collect::<Vec<_>>());
}
