//! Property test: any sequence of record / custody ack / commit ack / prune / restart keeps the
//! ledger's invariants, under both budget policies, against a model of what was acknowledged.
//!
//! Invariants checked after every step: held seqs are one contiguous run ending at `high`;
//! `high` never decreases; the byte budget holds; every acknowledged event is held with its value
//! unless it was committed, custody-acknowledged, or (under `drop-oldest`) named by a gap event;
//! a restart changes nothing observable and the clock never goes back; the chain stored with each
//! held event, the chain head and the `prev` of a read from any seq equal a fresh fold of every
//! event recorded so far, and a batch read from seq 1 (starting with the hole of what was pruned or
//! dropped) signs and verifies.

// Test helpers outside #[test] functions may unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use tidesync_core::auth::{verify_batch, ChainHash, DeviceKeys, DeviceSigner};
use tidesync_core::event::{DeviceId, Gap, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::Ledger;
use tidesync_device::{DeviceStore, FullPolicy, LedgerConfig, NewEvent, StoreError};

#[derive(Clone, Debug)]
enum Op {
    Record(u8),
    Custody(u8),
    Commit(u8),
    Prune,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..6).prop_map(Op::Record),
        1 => any::<u8>().prop_map(Op::Custody),
        1 => any::<u8>().prop_map(Op::Commit),
        1 => Just(Op::Prune),
        1 => Just(Op::Restart),
    ]
}

fn reading(value: u64) -> NewEvent {
    let payload = Payload::Reading(SensorReading { sensor: "s".into(), value: value as f64, unit: String::new() });
    NewEvent::new(Millis(1), &payload).unwrap()
}

/// A seq between `low` and `high` picked by `fraction` (0..=255).
fn pick(fraction: u8, high: u64) -> u64 {
    high * u64::from(fraction) / 255
}

struct Model {
    acknowledged: BTreeMap<u64, u64>,
    gaps: Vec<(u64, u64)>,
    committed: u64,
    custody: u64,
    high: u64,
    next_value: u64,
    /// The chain after each seq ever recorded, folded from genesis by the test.
    chains: BTreeMap<u64, ChainHash>,
}

impl Model {
    fn chain(&self, device: &DeviceId, seq: u64) -> ChainHash {
        if seq == 0 {
            return ChainHash::genesis(device);
        }
        self.chains[&seq]
    }
}

/// The chain checks: see the module documentation.
fn check_chains(
    store: &DeviceStore,
    model: &mut Model,
    events: &[tidesync_core::event::Event],
) -> Result<(), TestCaseError> {
    let device = store.device();
    let fail = |error: &dyn std::fmt::Display| TestCaseError::fail(error.to_string());
    for event in events {
        let seq = event.id.seq.0;
        if model.chains.contains_key(&seq) {
            continue;
        }
        // Every seq is seen by the check after the step that recorded it.
        let last = model.chains.keys().next_back().copied().unwrap_or(0);
        prop_assert_eq!(seq, last + 1, "seq {} was recorded and removed unseen", seq);
        let chain = model.chain(&device, last).next(event);
        model.chains.insert(seq, chain);
    }
    let first_held = events.first().map(|event| event.id.seq.0);
    let stored = store.chains_from(Seq::FIRST, 1 << 20).map_err(|error| fail(&error))?;
    for (seq, chain) in &stored {
        prop_assert_eq!(*chain, Some(model.chain(&device, seq.0)), "stored chain of seq {}", seq);
    }
    prop_assert_eq!(store.chain_head(&device), Some(model.chain(&device, model.high)));
    for from in 1..=model.high {
        let Some(batch) = store.read(&device, Seq(from), 5).map_err(|error| fail(&error))? else {
            prop_assert!(first_held.is_none(), "nothing read from {} although events are held", from);
            continue;
        };
        let prev = batch.proof.as_ref().map(|proof| proof.prev);
        prop_assert_eq!(prev, Some(model.chain(&device, batch.first_seq().0 - 1)), "prev of a read from {}", from);
    }
    // What the uplink would send from seq 1, sealed as it would, is what a cloud accepts.
    if let Some(mut batch) = store.read(&device, Seq(1), 1 << 10).map_err(|error| fail(&error))? {
        let signer = DeviceSigner::from_seed(device, [3; 32]);
        let mut keys = DeviceKeys::new();
        keys.insert(device, signer.public_key()).map_err(|error| fail(&error))?;
        let (from, first, last) = (batch.from, batch.first_seq(), batch.last_seq());
        if let Some(proof) = batch.proof.as_mut() {
            let head = proof.prev.over(&batch.events);
            proof.seals = vec![signer.seal(last, &head)];
            if first > from {
                let (known, before) = store.chain_before(&device, from);
                prop_assert_eq!(before, model.chain(&device, known.0), "chain before a hole from {}", from);
                proof.hole = Some(signer.hole(known.next(), Seq(first.0 - 1), before, proof.prev));
            }
        }
        let verified = verify_batch(&keys, &batch, None).map_err(|violation| fail(&violation))?;
        prop_assert_eq!(verified.head, model.chain(&device, last.0));
    }
    Ok(())
}

fn check(store: &DeviceStore, model: &mut Model, budget_bytes: u64) -> Result<(), TestCaseError> {
    let status = store.status().map_err(|error| TestCaseError::fail(error.to_string()))?;
    prop_assert!(status.high_seq >= model.high, "high went back: {} < {}", status.high_seq, model.high);
    model.high = status.high_seq;
    prop_assert!(status.used_bytes <= budget_bytes, "budget exceeded: {} > {budget_bytes}", status.used_bytes);
    let events = store.events_from(Seq::FIRST, 1 << 20).map_err(|error| TestCaseError::fail(error.to_string()))?;
    let seqs: Vec<u64> = events.iter().map(|event| event.id.seq.0).collect();
    if let (Some(first), Some(last)) = (seqs.first(), seqs.last()) {
        prop_assert_eq!(*last, status.high_seq);
        prop_assert_eq!(seqs.clone(), (*first..=*last).collect::<Vec<_>>(), "held seqs not contiguous");
        prop_assert_eq!(*first, status.first_held_seq);
    } else {
        prop_assert_eq!(status.first_held_seq, status.high_seq + 1);
    }
    let mut held = BTreeMap::new();
    for event in &events {
        match &event.payload {
            Payload::Reading(reading) => {
                held.insert(event.id.seq.0, reading.value as u64);
            }
            Payload::Gap(Gap { first, last, .. }) => {
                if !model.gaps.contains(&(first.0, last.0)) {
                    model.gaps.push((first.0, last.0));
                }
            }
            other => prop_assert!(false, "unexpected payload {:?}", other),
        }
    }
    for (seq, value) in &model.acknowledged {
        if *seq <= model.committed.max(model.custody) {
            continue;
        }
        if model.gaps.iter().any(|(first, last)| (first..=last).contains(&seq)) {
            continue;
        }
        prop_assert_eq!(held.get(seq), Some(value), "acknowledged seq {} lost", seq);
    }
    check_chains(store, model, &events)
}

fn run(ops: Vec<Op>, policy: FullPolicy, budget_events: u64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|error| TestCaseError::fail(error.to_string()))?;
    let path = dir.path().join("ledger.sqlite3");
    let device = DeviceId::new("prop-1").expect("valid");
    let budget_bytes = budget_events * reading(0).cost_bytes();
    let config = LedgerConfig { budget_bytes, full_policy: policy, ..LedgerConfig::default() };
    let mut store = DeviceStore::create(&path, device, config.clone()).expect("create");
    let mut model = Model {
        acknowledged: BTreeMap::new(),
        gaps: Vec::new(),
        committed: 0,
        custody: 0,
        high: 0,
        next_value: 1,
        chains: BTreeMap::new(),
    };
    let mut wall = 1_000;
    for op in ops {
        wall += 7;
        match op {
            Op::Record(n) => {
                let values: Vec<u64> = (0..u64::from(n)).map(|i| model.next_value + i).collect();
                model.next_value += u64::from(n);
                let events: Vec<NewEvent> = values.iter().map(|value| reading(*value)).collect();
                match store.record(Millis(wall), &events) {
                    Ok(range) => {
                        prop_assert_eq!(range.len(), u64::from(n));
                        for (seq, value) in (range.first.0..=range.last.0).zip(values) {
                            model.acknowledged.insert(seq, value);
                        }
                    }
                    Err(StoreError::Ledger(_)) => prop_assert_eq!(policy, FullPolicy::Refuse, "drop-oldest refused"),
                    Err(other) => prop_assert!(false, "unexpected error {}", other),
                }
            }
            Op::Custody(fraction) => {
                let seq = pick(fraction, model.high);
                store.mark_custody("gw", Seq(seq)).expect("custody");
                model.custody = model.custody.max(seq);
            }
            Op::Commit(fraction) => {
                let seq = pick(fraction, model.high);
                store.mark_committed_seq(Seq(seq)).expect("commit");
                model.committed = model.committed.max(seq);
            }
            Op::Prune => store.prune_all().expect("prune"),
            Op::Restart => {
                let before = store.status().expect("status");
                drop(store);
                store = DeviceStore::open(&path, Some(device), config.clone()).expect("reopen");
                let after = store.status().expect("status");
                prop_assert_eq!(
                    (after.high_seq, after.first_held_seq, after.committed_seq, after.used_bytes),
                    (before.high_seq, before.first_held_seq, before.committed_seq, before.used_bytes)
                );
                prop_assert_eq!(after.custody_seqs, before.custody_seqs);
                prop_assert!(after.hlc_last >= before.hlc_last);
            }
        }
        check(&store, &mut model, budget_bytes)?;
    }
    let integrity: String =
        store.connection().query_row("PRAGMA integrity_check", [], |row| row.get(0)).expect("integrity");
    prop_assert_eq!(integrity, "ok");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn refuse_policy_keeps_the_invariants(ops in proptest::collection::vec(op(), 1..40), budget in 4u64..40) {
        run(ops, FullPolicy::Refuse, budget)?;
    }

    #[test]
    fn drop_oldest_policy_keeps_the_invariants(ops in proptest::collection::vec(op(), 1..40), budget in 8u64..40) {
        run(ops, FullPolicy::DropOldest, budget)?;
    }
}
