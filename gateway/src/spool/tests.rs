//! Unit tests of the spool: group commit durability, dedupe, budget, pruning, holes, and the batch
//! proofs it relays.

use proptest::prelude::*;
use tidesync_core::auth::{verify_batch, ChainHash, DeviceKeys, DeviceSigner};
use tidesync_core::event::{DeviceId, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::{Ledger, LedgerError, MemLedger};
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::wire::EventBatch;

use super::{proofs, Spool};

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

/// A device's ledger of `n_events` and the batches of `batch_events` its signing uplink sends:
/// each sealed at its end with the chain value the ledger's read gave.
fn signed_source(device_id: DeviceId, n_events: u64, batch_events: usize) -> (MemLedger, Vec<EventBatch>) {
    let ledger = recorded(device_id, n_events);
    let batches = signed_batches(&ledger, device_id, Seq(1), batch_events);
    (ledger, batches)
}

fn signer(device_id: DeviceId) -> DeviceSigner {
    DeviceSigner::from_seed(device_id, [7; 32])
}

fn keys(device_id: DeviceId) -> DeviceKeys {
    let mut keys = DeviceKeys::new();
    keys.insert(device_id, signer(device_id).public_key()).unwrap();
    keys
}

/// Batches from `from` on, sealed (and their holes proven) as core's signing `Uplink` does.
fn signed_batches(ledger: &MemLedger, device_id: DeviceId, from: Seq, batch_events: usize) -> Vec<EventBatch> {
    let signer = signer(device_id);
    let mut batches = Vec::new();
    let mut next = from;
    while let Some(mut batch) = ledger.read(&device_id, next, batch_events).unwrap() {
        let (first, last) = (batch.first_seq(), batch.last_seq());
        let proof = batch.proof.as_mut().expect("a device ledger knows its chain");
        let head = proof.prev.over(&batch.events);
        proof.seals = vec![signer.seal(last, &head)];
        proof.hole = (first > batch.from).then(|| {
            let (known, before) = ledger.chain_before(&device_id, batch.from);
            signer.hole(known.next(), Seq(first.0 - 1), before, proof.prev)
        });
        next = last.next();
        batches.push(batch);
    }
    batches
}

fn n_proof_rows(spool: &Spool) -> i64 {
    spool.db.query_row("SELECT COUNT(*) FROM proofs", [], |row| row.get(0)).unwrap()
}

#[test]
fn signed_batches_are_relayed_with_their_proofs_merged_and_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    let pump = device("pump-7");
    let (source, batches) = signed_source(pump, 20, 4);
    for batch in &batches {
        spool.append(batch).unwrap();
    }
    spool.commit().unwrap();
    assert_eq!(n_proof_rows(&spool), 5, "one row per appended batch");
    // One read merges the five device batches and keeps every seal.
    let read = spool.read(&pump, Seq(1), 100).unwrap().unwrap();
    let proof = read.proof.clone().unwrap();
    assert_eq!(proof.prev, ChainHash::genesis(&pump));
    let seals: Vec<Seq> = proof.seals.iter().map(|seal| seal.seq).collect();
    assert_eq!(seals, vec![Seq(4), Seq(8), Seq(12), Seq(16), Seq(20)]);
    assert_eq!(proof.hole, None);
    let verified = verify_batch(&keys(pump), &read, None).unwrap();
    assert_eq!(Some(verified.head), source.chain_at(&pump, Seq(20)));
    assert_eq!(spool.chain_head(&pump), source.chain_at(&pump, Seq(20)));
    // A read starting inside a batch (the cloud holds part of it through another gateway)
    // computes the chain before it from the held events.
    let mut read = spool.read(&pump, Seq(7), 6).unwrap().unwrap();
    assert_eq!(read.proof.as_ref().unwrap().prev, source.chain_at(&pump, Seq(6)).unwrap());
    assert!(read.truncate_sealed(6));
    assert_eq!(read.last_seq(), Seq(12));
    verify_batch(&keys(pump), &read, None).unwrap();
}

#[test]
fn proofs_are_written_with_their_events_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let pump = device("pump-7");
    let (_, batches) = signed_source(pump, 12, 4);
    {
        let mut spool = open(&path, u64::MAX);
        spool.append(&batches[0]).unwrap();
        spool.append(&batches[1]).unwrap();
        spool.commit().unwrap();
        spool.append(&batches[2]).unwrap();
        // A crash before the group commit: the third batch's events and proof both go.
    }
    let spool = open(&path, u64::MAX);
    assert_eq!(n_proof_rows(&spool), 2);
    let read = spool.read(&pump, Seq(1), 100).unwrap().unwrap();
    assert_eq!(read.last_seq(), Seq(8));
    verify_batch(&keys(pump), &read, None).unwrap();
}

#[test]
fn duplicates_and_overlaps_keep_one_row_per_seq_and_stay_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    let pump = device("pump-7");
    let (source, _) = signed_source(pump, 12, 4);
    let small = signed_batches(&source, pump, Seq(1), 6);
    let large = signed_batches(&source, pump, Seq(1), 10);
    spool.append(&small[0]).unwrap();
    // Resent after a lost ack, and a larger batch overlapping what is held.
    spool.append(&small[0]).unwrap();
    spool.append(&large[0]).unwrap();
    spool.commit().unwrap();
    assert_eq!(n_proof_rows(&spool), 2);
    let mut read = spool.read(&pump, Seq(1), 100).unwrap().unwrap();
    assert_eq!(read.proof.as_ref().unwrap().seals.iter().map(|seal| seal.seq).collect::<Vec<_>>(), [Seq(6), Seq(10)]);
    assert!(read.truncate_sealed(10));
    verify_batch(&keys(pump), &read, None).unwrap();
}

#[test]
fn pruning_drops_proofs_with_their_events_and_keeps_the_chain_inside_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    let pump = device("pump-7");
    let (source, batches) = signed_source(pump, 20, 8);
    for batch in &batches {
        spool.append(batch).unwrap();
    }
    spool.commit().unwrap();
    assert_eq!(n_proof_rows(&spool), 3);
    // At a batch boundary.
    spool.mark_committed(pump, Seq(8)).unwrap();
    spool.commit().unwrap();
    assert_eq!(n_proof_rows(&spool), 2);
    let read = spool.read(&pump, Seq(9), 100).unwrap().unwrap();
    verify_batch(&keys(pump), &read, None).unwrap();
    // Inside a batch (committed through another gateway): the rest keeps a proof.
    spool.mark_committed(pump, Seq(11)).unwrap();
    spool.commit().unwrap();
    assert_eq!(n_proof_rows(&spool), 2);
    let read = spool.read(&pump, Seq(12), 100).unwrap().unwrap();
    assert_eq!(read.proof.as_ref().unwrap().prev, source.chain_at(&pump, Seq(11)).unwrap());
    verify_batch(&keys(pump), &read, None).unwrap();
    assert_eq!(spool.chain_head(&pump), source.chain_at(&pump, Seq(20)));
    // Everything, and beyond what this spool held.
    spool.mark_committed(pump, Seq(25)).unwrap();
    spool.commit().unwrap();
    assert_eq!((n_proof_rows(&spool), spool.stats().n_events), (0, 0));
    assert_eq!(spool.chain_head(&pump), None, "the chain after seqs this spool never held is unknown");
}

#[test]
fn a_proven_hole_is_relayed_with_its_proof() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    let pump = device("pump-7");
    let mut source = recorded(pump, 10);
    // The device dropped seqs 1..=3 under storage pressure (and recorded a gap event for them).
    assert_eq!(source.drop_oldest(pump, 3, Millis(50_000)), Some((Seq(1), Seq(3))));
    let batches = signed_batches(&source, pump, Seq(1), 100);
    assert!(batches[0].proof.as_ref().unwrap().hole.is_some());
    spool.append(&batches[0]).unwrap();
    spool.commit().unwrap();
    let read = spool.read(&pump, Seq(1), 100).unwrap().unwrap();
    assert_eq!((read.from, read.first_seq()), (Seq(1), Seq(4)));
    assert_eq!(read.proof.as_ref().unwrap().hole, batches[0].proof.as_ref().unwrap().hole);
    verify_batch(&keys(pump), &read, None).unwrap();
}

#[test]
fn unsigned_batches_relay_without_a_proof() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    let pump = device("pump-7");
    let source = recorded(pump, 10);
    let mut unsigned = batch(&source, pump, 1, 10);
    unsigned.proof = None;
    spool.append(&unsigned).unwrap();
    spool.commit().unwrap();
    assert_eq!(n_proof_rows(&spool), 0);
    assert_eq!(spool.read(&pump, Seq(1), 100).unwrap().unwrap().proof, None);
}

#[test]
fn a_corrupt_proof_row_is_a_storage_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    let pump = device("pump-7");
    let (_, batches) = signed_source(pump, 4, 4);
    spool.append(&batches[0]).unwrap();
    spool.commit().unwrap();
    spool.db.execute("UPDATE proofs SET seals = x'0102'", []).unwrap();
    assert!(matches!(spool.read(&pump, Seq(1), 10), Err(LedgerError::Storage(_))));
}

#[test]
fn a_hole_proof_round_trips_with_the_chain_before_and_the_old_layout_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
    let pump = device("pump-7");
    let mut source = recorded(pump, 8);
    source.drop_oldest(pump, 3, Millis(9_000));
    let batch = signed_batches(&source, pump, Seq(1), 100).remove(0);
    let hole = batch.proof.as_ref().unwrap().hole.unwrap();
    assert_eq!(proofs::decode_hole(&proofs::encode_hole(&hole)), Some(hole));
    spool.append(&batch).unwrap();
    spool.commit().unwrap();
    let read = spool.read(&pump, Seq(1), 100).unwrap().unwrap();
    assert_eq!(read.proof.as_ref().unwrap().hole, Some(hole));
    verify_batch(&keys(pump), &read, None).unwrap();
    // A row in the layout without the chain before the hole (first, last, chain, signature).
    let mut old = proofs::encode_hole(&hole);
    old.drain(16..16 + tidesync_core::auth::CHAIN_BYTES);
    spool.db.execute("UPDATE proofs SET hole = ?1 WHERE hole IS NOT NULL", [old]).unwrap();
    assert!(matches!(spool.read(&pump, Seq(1), 100), Err(LedgerError::Storage(_))));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Whatever the device's batch sizes, commits and read windows, a read hands on a proof
    /// whose `prev` is the device's own chain value before the batch, and the read cut after its
    /// last seal (as the relay's uplink cuts it) verifies against the device's key.
    #[test]
    fn every_read_carries_the_devices_chain_and_verifies(
        n_events in 1u64..60,
        batch_events in 1usize..12,
        committed in 0u64..60,
        read_from in 1u64..60,
        read_max in 1usize..40,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(&dir.path().join("spool.db"), u64::MAX);
        let pump = device("pump-7");
        let (source, batches) = signed_source(pump, n_events, batch_events);
        for batch in &batches {
            spool.append(batch).unwrap();
        }
        let committed = Seq(committed.min(n_events));
        spool.mark_committed(pump, committed).unwrap();
        spool.commit().unwrap();
        let from = Seq(read_from.max(committed.0 + 1));
        let read = spool.read(&pump, from, read_max).unwrap();
        prop_assert_eq!(read.is_some(), from.0 <= n_events);
        if let Some(mut read) = read {
            let proof = read.proof.clone().unwrap();
            prop_assert_eq!(Some(proof.prev), source.chain_at(&pump, Seq(read.first_seq().0 - 1)));
            // Cut as the relay's uplink cuts: right after the last seal inside the batch.
            let ends_sealed = |batch: &EventBatch| {
                batch.proof.as_ref().and_then(|proof| proof.seals.last()).map(|seal| seal.seq) == Some(batch.last_seq())
            };
            if !ends_sealed(&read) {
                let n_events = read.events.len();
                read.truncate_sealed(n_events - 1);
            }
            prop_assert_eq!(ends_sealed(&read), !proof.seals.is_empty());
            if ends_sealed(&read) {
                prop_assert!(verify_batch(&keys(pump), &read, None).is_ok());
            }
        }
        // The head is known while the spool holds events after a stored proof.
        let head = if committed.0 < n_events { source.chain_at(&pump, Seq(n_events)) } else { None };
        prop_assert_eq!(spool.chain_head(&pump), head);
    }
}
