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
