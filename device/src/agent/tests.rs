//! Unit tests of the agent: many producers, group commits, and acknowledgements after durability.

use std::sync::Arc;

use tempfile::TempDir;
use tidesync_core::event::{Payload, SensorReading, Seq};

use super::*;
use crate::config::LedgerConfig;

fn reading(value: f64) -> Payload {
    Payload::Reading(SensorReading { sensor: "temp".into(), value, unit: "Cel".into() })
}

fn start(dir: &TempDir) -> Agent {
    let store = DeviceStore::create(
        &dir.path().join("ledger.sqlite3"),
        DeviceId::new("pump-7").unwrap(),
        LedgerConfig::default(),
    )
    .unwrap();
    Agent::start(store).unwrap()
}

#[test]
fn concurrent_producers_each_get_distinct_gap_free_seqs() {
    let dir = TempDir::new().unwrap();
    let agent = Arc::new(start(&dir));
    let producers: Vec<_> = (0..8)
        .map(|producer| {
            let agent = Arc::clone(&agent);
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| agent.record(Millis(1), &reading(f64::from(producer * 100 + i))).unwrap().seq.0)
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = producers.into_iter().flat_map(|producer| producer.join().unwrap()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
    let agent = Arc::into_inner(agent).unwrap();
    let store = agent.close().unwrap();
    assert_eq!(store.events_from(Seq::FIRST, 1000).unwrap().len(), 400);
}

#[test]
fn a_batch_is_all_or_nothing_and_an_invalid_payload_records_nothing() {
    let dir = TempDir::new().unwrap();
    let agent = start(&dir);
    let bad = Payload::Reading(SensorReading { sensor: String::new(), value: 1.0, unit: "Cel".into() });
    assert!(agent.record_batch(&[(Millis(1), reading(1.0)), (Millis(1), bad)]).is_err());
    assert_eq!(agent.status().unwrap().high_seq, 0);
    let range = agent.record_batch(&[(Millis(1), reading(1.0)), (Millis(1), reading(2.0))]).unwrap();
    assert_eq!((range.first, range.last), (Seq(1), Seq(2)));
}

#[test]
fn source_requests_are_recorded_once() {
    let dir = TempDir::new().unwrap();
    let agent = start(&dir);
    let event = || vec![NewEvent::new(Millis(1), &reading(1.0)).unwrap()];
    agent.submit_from_source("serial".into(), 1, event()).unwrap().wait().unwrap();
    let again = agent.submit_from_source("serial".into(), 1, event()).unwrap().wait();
    assert!(matches!(again, Err(StoreError::AlreadyRecorded { high: 1, .. })));
    assert_eq!(agent.source_high("serial").unwrap(), 1);
    assert_eq!(agent.status().unwrap().high_seq, 1);
}

#[test]
fn reports_and_status_go_through_the_writer() {
    let dir = TempDir::new().unwrap();
    let agent = start(&dir);
    agent.record(Millis(1), &reading(1.0)).unwrap();
    let id = agent.report("mode", Value::Text("eco".into())).unwrap();
    assert_eq!(id.seq, Seq(2));
    let json = agent.shadow_json().unwrap();
    assert_eq!(json["reported"]["mode"], "eco");
    let status = agent.status().unwrap();
    assert_eq!((status.next_seq, status.backlog_events), (3, 2));
}
