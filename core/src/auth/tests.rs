//! Tests of the hash chain, seals and batch verification: every kind of tampering a relay could
//! try is refused with its own violation, and honest batches (also trimmed, merged and cut by a
//! relay) verify.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::event::{Millis, Payload, SensorReading};
use crate::ledger::{Ledger, MemLedger};
use crate::wire::{EventBatch, Frame};

fn device() -> DeviceId {
    DeviceId::new("meter-1").unwrap()
}

fn signer(seed: u8) -> DeviceSigner {
    DeviceSigner::from_seed(device(), [seed; 32])
}

fn keys_of(signer: &DeviceSigner) -> DeviceKeys {
    let mut keys = DeviceKeys::new();
    keys.insert(signer.device(), signer.public_key()).unwrap();
    keys
}

fn reading(value: f64) -> Payload {
    Payload::Reading(SensorReading { sensor: "t".into(), value, unit: "Cel".into() })
}

/// A ledger holding `n` events of the device.
fn ledger(n: u64) -> MemLedger {
    let mut ledger = MemLedger::pruning();
    for i in 0..n {
        ledger.record(device(), Millis(1_000 + i), Millis(1_000 + i), reading(i as f64 / 10.0)).unwrap();
    }
    ledger
}

/// What a device sends: events `from..` (at most `max`), sealed at the end.
fn sealed(ledger: &MemLedger, signer: &DeviceSigner, from: u64, max: usize) -> EventBatch {
    let mut batch = ledger.read(&device(), Seq(from), max).unwrap().unwrap();
    let (first, last) = (batch.first_seq(), batch.last_seq());
    let mut proof = batch.proof.take().unwrap();
    let head = proof.prev.over(&batch.events);
    proof.seals = vec![signer.seal(last, &head)];
    if batch.from < first {
        let (known, before) = ledger.chain_before(&device(), batch.from);
        proof.hole = Some(signer.hole(known.next(), Seq(first.0 - 1), before, proof.prev));
    }
    batch.proof = Some(proof);
    batch
}

#[test]
fn an_honest_batch_verifies_and_its_head_is_the_ledgers_chain() {
    let signer = signer(1);
    let ledger = ledger(10);
    let batch = sealed(&ledger, &signer, 1, 100);
    let verified = verify_batch(&keys_of(&signer), &batch, Some(Seq(0))).unwrap();
    assert_eq!(Some(verified.head), ledger.chain_head(&device()));
    assert_eq!(verified.at, Some(ChainHash::genesis(&device())));
}

#[test]
fn tampering_is_refused_with_its_own_violation() {
    let signer = signer(1);
    let keys = keys_of(&signer);
    let ledger = ledger(10);
    let honest = sealed(&ledger, &signer, 1, 100);

    let mut altered = honest.clone();
    altered.events[3].payload = reading(99.0);
    assert_eq!(verify_batch(&keys, &altered, None), Err(Violation::BadSeal { seq: Seq(10) }));

    let mut reordered = honest.clone();
    let (a, b) = (reordered.events[2].clone(), reordered.events[3].clone());
    reordered.events[2] = Event { id: a.id, ..b.clone() };
    reordered.events[3] = Event { id: b.id, ..a };
    assert!(matches!(verify_batch(&keys, &reordered, None), Err(Violation::BadSeal { .. })));

    let mut forged_signature = honest.clone();
    forged_signature.proof.as_mut().unwrap().seals[0].signature[0] ^= 1;
    assert!(matches!(verify_batch(&keys, &forged_signature, None), Err(Violation::BadSeal { .. })));

    // Signed by another key (a gateway's own, say).
    let other = sealed(&ledger, &DeviceSigner::from_seed(device(), [9; 32]), 1, 100);
    assert!(matches!(verify_batch(&keys, &other, None), Err(Violation::BadSeal { .. })));

    // The first three events cut out and declared a hole, with the chain recomputed.
    let mut cut = honest.after(Seq(3)).unwrap();
    cut.from = Seq(1);
    assert_eq!(verify_batch(&keys, &cut, None), Err(Violation::BadHole { first: Seq(1), last: Seq(3) }));

    // The seal's tail cut off: the batch no longer ends at a seal.
    let mut truncated = honest.clone();
    truncated.events.truncate(7);
    assert!(matches!(verify_batch(&keys, &truncated, None), Err(Violation::NotSealed { .. })));

    let mut stripped = honest.clone();
    stripped.proof = None;
    assert_eq!(verify_batch(&keys, &stripped, None), Err(Violation::Unsigned));
    assert_eq!(verify_batch(&DeviceKeys::new(), &honest, None), Err(Violation::UnknownDevice));
}

#[test]
fn a_relay_may_trim_and_merge_and_cut_at_seals() {
    let signer = signer(2);
    let keys = keys_of(&signer);
    let device_ledger = ledger(30);
    let mut relay = MemLedger::pruning();
    for from in [1, 11, 21] {
        relay.append(&sealed(&device_ledger, &signer, from, 10)).unwrap();
    }
    let merged = relay.read(&device(), Seq(1), 1000).unwrap().unwrap();
    assert_eq!(merged.proof.as_ref().unwrap().seals.len(), 3);
    verify_batch(&keys, &merged, None).unwrap();
    verify_batch(&keys, &merged.after(Seq(15)).unwrap(), None).unwrap();
    let mut cut = merged.clone();
    assert!(cut.truncate_sealed(25));
    assert_eq!(cut.last_seq(), Seq(20));
    verify_batch(&keys, &cut, None).unwrap();
    let mut too_short = merged;
    assert!(!too_short.truncate_sealed(5));
    assert_eq!(too_short.events.len(), 30);
}

#[test]
fn a_device_that_dropped_events_proves_the_hole() {
    let signer = signer(3);
    let keys = keys_of(&signer);
    let mut device_ledger = ledger(10);
    assert_eq!(device_ledger.drop_oldest(device(), 4, Millis(5_000)), Some((Seq(1), Seq(4))));
    let batch = sealed(&device_ledger, &signer, 1, 100);
    assert_eq!(batch.dropped(), Some((Seq(1), Seq(4))));
    let verified = verify_batch(&keys, &batch, None).unwrap();
    assert_eq!(Some(verified.head), device_ledger.chain_head(&device()));
    // A relay keeps the proof and passes it on.
    let mut relay = MemLedger::pruning();
    relay.append(&batch).unwrap();
    let relayed = relay.read(&device(), Seq(1), 100).unwrap().unwrap();
    assert_eq!(relayed, batch);
    // A receiver that holds part of the hole gets a narrower hole, still proven.
    verify_batch(&keys, &batch.after(Seq(2)).unwrap(), None).unwrap();
    // The proof names the chain before the hole: genesis, as it starts at seq 1.
    assert_eq!(verified.before, Some((Seq(0), ChainHash::genesis(&device()))));
}

#[test]
fn a_hole_after_a_commit_binds_the_chain_in_front_of_it() {
    let signer = signer(3);
    let keys = keys_of(&signer);
    let mut device_ledger = ledger(10);
    let at_six = device_ledger.chain_at(&device(), Seq(6)).unwrap();
    device_ledger.mark_committed(device(), Seq(6)).unwrap();
    assert_eq!(device_ledger.drop_oldest(device(), 2, Millis(5_000)), Some((Seq(7), Seq(8))));
    // The floor moved past the dropped run; the chain in front of it is still known.
    assert_eq!(device_ledger.chain_before(&device(), Seq(7)), (Seq(6), at_six));
    let batch = sealed(&device_ledger, &signer, 7, 100);
    let hole = batch.proof.as_ref().unwrap().hole.unwrap();
    assert_eq!((hole.first, hole.last, hole.before), (Seq(7), Seq(8), at_six));
    assert_eq!(verify_batch(&keys, &batch, None).unwrap().before, Some((Seq(6), at_six)));
    // Read from further back (a gateway that knows less), the hole starts where the chain is
    // known: at genesis.
    let wide = sealed(&device_ledger, &signer, 3, 100);
    let hole = wide.proof.as_ref().unwrap().hole.unwrap();
    assert_eq!((hole.first, hole.before), (Seq(1), ChainHash::genesis(&device())));
    verify_batch(&keys, &wide, None).unwrap();

    // `before` is signed: changing it (to claim another history's chain) breaks the proof.
    let mut moved = batch.clone();
    moved.proof.as_mut().unwrap().hole.as_mut().unwrap().before = ChainHash::genesis(&device());
    assert_eq!(verify_batch(&keys, &moved, None), Err(Violation::BadHole { first: Seq(7), last: Seq(8) }));
    // A proof whose hole starts at seq 0 has no chain before it.
    let mut zero = batch.clone();
    let proof = zero.proof.as_mut().unwrap();
    proof.hole = Some(signer.hole(Seq(0), Seq(8), ChainHash::genesis(&device()), proof.prev));
    assert_eq!(verify_batch(&keys, &zero, None), Err(Violation::BadHole { first: Seq(7), last: Seq(8) }));
    // A proof for a wider hole than the batch's is fine only if it starts no later than it.
    let mut late = batch;
    let proof = late.proof.as_mut().unwrap();
    proof.hole =
        Some(signer.hole(Seq(8), Seq(8), device_ledger.chain_at(&device(), Seq(7)).unwrap_or_default(), proof.prev));
    assert_eq!(verify_batch(&keys, &late, None), Err(Violation::BadHole { first: Seq(7), last: Seq(8) }));
}

#[test]
fn proofs_survive_the_wire() {
    let signer = signer(4);
    let mut device_ledger = ledger(40);
    device_ledger.drop_oldest(device(), 5, Millis(9_000));
    let batch = sealed(&device_ledger, &signer, 1, 100);
    let mut bytes = Vec::new();
    Frame::Events(batch.clone()).encode(&mut bytes);
    let mut decoder = crate::wire::FrameDecoder::new();
    decoder.push(&bytes);
    let decoded = decoder.next_frame().unwrap().unwrap();
    assert_eq!(decoded, Frame::Events(batch.clone()));
    // A reader that predates proofs sees the same events: the trailer is after every row.
    let mut without = batch.clone();
    without.proof = None;
    let mut plain = Vec::new();
    without.encode(&mut plain);
    let mut full = Vec::new();
    batch.encode(&mut full);
    assert_eq!(&full[..plain.len()], &plain[..]);
    assert!(batch.encoded_len_bound() >= full.len());
}

#[test]
fn malformed_proofs_are_errors_not_panics() {
    let signer = signer(5);
    let batch = sealed(&ledger(3), &signer, 1, 100);
    let mut bytes = Vec::new();
    batch.encode(&mut bytes);
    for cut in 0..bytes.len() {
        let _ = EventBatch::decode(&bytes[..cut]);
    }
    // A seal count far beyond the input is refused before allocating.
    let mut plain_batch = batch.clone();
    plain_batch.proof = None;
    let mut evil = Vec::new();
    plain_batch.encode(&mut evil);
    evil.push(0xA1);
    evil.extend_from_slice(&[0; 32]);
    evil.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(matches!(EventBatch::decode(&evil), Err(crate::wire::BatchError::Proof { .. })));
}

#[test]
fn a_hole_proof_without_before_does_not_decode() {
    let signer = signer(5);
    let mut device_ledger = ledger(6);
    device_ledger.drop_oldest(device(), 2, Millis(9_000));
    let batch = sealed(&device_ledger, &signer, 1, 100);
    let mut bytes = Vec::new();
    batch.encode(&mut bytes);
    // The hole section is the last 1 + 2 + 32 + 32 + 64 bytes: flag, first, last, before, chain,
    // signature. Every cut of it is a typed error.
    let flag_at = bytes.len() - (1 + 2 + 2 * CHAIN_BYTES + SIGNATURE_BYTES);
    assert_eq!(bytes[flag_at], 2);
    for cut in flag_at..bytes.len() {
        assert!(EventBatch::decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    // The layout without `before` (flag 1), as an unreleased build wrote it: first, last, chain,
    // signature. Refused where the flag is, not misread.
    let mut old = bytes[..flag_at].to_vec();
    old.extend_from_slice(&[1, 1, 2]);
    old.extend_from_slice(&batch.proof.as_ref().unwrap().prev.0);
    old.extend_from_slice(&[7; SIGNATURE_BYTES]);
    assert_eq!(EventBatch::decode(&old), Err(crate::wire::BatchError::Proof { offset: flag_at }));
}

#[test]
fn rotation_keeps_old_seals_valid_and_revocation_removes_them() {
    let old = signer(6);
    let new = signer(7);
    let ledger = ledger(5);
    let batch = sealed(&ledger, &old, 1, 100);
    let mut keys = keys_of(&old);
    keys.insert(device(), new.public_key()).unwrap();
    verify_batch(&keys, &batch, None).unwrap();
    verify_batch(&keys, &sealed(&ledger, &new, 1, 100), None).unwrap();
    let revoked = keys_of(&new);
    assert!(matches!(verify_batch(&revoked, &batch, None), Err(Violation::BadSeal { .. })));
    let _ = Arc::new(revoked);
}

/// A [`VerifiedSignatures`] that counts what it vouched for.
#[derive(Debug, Default)]
struct Vouched {
    entries: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
    n_taken: std::sync::atomic::AtomicUsize,
}

impl Vouched {
    fn record(&self, entries: Vec<[u8; 32]>) {
        self.entries.lock().unwrap().extend(entries);
    }

    fn n_taken(&self) -> usize {
        self.n_taken.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl VerifiedSignatures for Vouched {
    fn take(&self, entry: &[u8; 32]) -> bool {
        let taken = self.entries.lock().unwrap().remove(entry);
        self.n_taken.fetch_add(usize::from(taken), std::sync::atomic::Ordering::Relaxed);
        taken
    }
}

#[test]
fn signatures_verified_ahead_are_taken_once_and_vouch_for_nothing_else() {
    let signer = signer(4);
    let mut device_ledger = ledger(12);
    device_ledger.drop_oldest(device(), 2, Millis(5_000)).unwrap();
    let honest = sealed(&device_ledger, &signer, 1, 100);
    let ahead = verified_signatures(&keys_of(&signer), &honest);
    assert_eq!(ahead.len(), 2, "the seal and the hole proof");

    let vouched = Arc::new(Vouched::default());
    let keys = keys_of(&signer).consulting(vouched.clone());
    vouched.record(ahead.clone());
    let verified = verify_batch(&keys, &honest, None).unwrap();
    assert_eq!(Some(verified.head), device_ledger.chain_head(&device()));
    assert_eq!(vouched.n_taken(), 2);
    assert!(vouched.entries.lock().unwrap().is_empty());
    // Taken: the next check verifies again, with the same verdict.
    verify_batch(&keys, &honest, None).unwrap();
    assert_eq!(vouched.n_taken(), 2);

    // The honest batch's entries do not vouch for an altered batch, a forged signature, or a
    // batch of the same events signed by another key.
    let mut altered = honest.clone();
    altered.events[3].payload = reading(99.0);
    let mut forged = honest.clone();
    forged.proof.as_mut().unwrap().seals[0].signature[0] ^= 1;
    let other = sealed(&device_ledger, &DeviceSigner::from_seed(device(), [9; 32]), 1, 100);
    for tampered in [&altered, &forged, &other] {
        vouched.record(ahead.clone());
        let refused = verify_batch(&keys, tampered, None);
        assert!(matches!(refused, Err(Violation::BadSeal { .. } | Violation::BadHole { .. })), "{refused:?}");
        assert!(verified_signatures(&keys_of(&signer), tampered).len() < 2, "the bad seal has no entry");
    }
    // Nor for a key that was revoked since.
    vouched.record(ahead);
    let revoked = keys_of(&DeviceSigner::from_seed(device(), [5; 32])).consulting(vouched.clone());
    assert!(matches!(verify_batch(&revoked, &honest, None), Err(Violation::BadHole { .. })));
}

#[test]
fn weak_or_invalid_public_keys_are_refused() {
    let mut keys = DeviceKeys::new();
    // The identity point is a weak key.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    assert_eq!(keys.insert(device(), identity), Err(KeyError::Invalid));
    assert!(keys.is_empty());
}

proptest! {
    /// Any single-byte change to any event of a sealed batch is caught, and the honest batch
    /// always verifies.
    #[test]
    fn any_change_to_an_event_breaks_the_seal(n in 1u64..40, index in 0usize..40, delta in 1u64..1_000) {
        let signer = signer(8);
        let keys = keys_of(&signer);
        let batch = sealed(&ledger(n), &signer, 1, 100);
        prop_assert!(verify_batch(&keys, &batch, None).is_ok());
        let index = index % batch.events.len();
        let mut changed = batch.clone();
        let event = &mut changed.events[index];
        match delta % 3 {
            0 => event.hlc.wall_ms = event.hlc.wall_ms.wrapping_add(delta),
            1 => event.event_time = Millis(event.event_time.0.wrapping_add(delta)),
            _ => event.payload = reading(delta as f64 + 0.5),
        }
        prop_assert!(verify_batch(&keys, &changed, None).is_err());
        // Also when the honest batch's signatures were verified ahead of time.
        let vouched = Arc::new(Vouched::default());
        vouched.record(verified_signatures(&keys, &batch));
        prop_assert!(verify_batch(&keys.clone().consulting(vouched), &changed, None).is_err());
    }

    /// The chain is a function of the events: computing it in one pass or in any two pieces
    /// gives the same value.
    #[test]
    fn the_chain_composes(n in 1u64..30, split in 0usize..30) {
        let ledger = ledger(n);
        let events: Vec<Event> = ledger.events(&device()).cloned().collect();
        let split = split % (events.len() + 1);
        let genesis = ChainHash::genesis(&device());
        let whole = genesis.over(&events);
        let pieces = genesis.over(&events[..split]).over(&events[split..]);
        prop_assert_eq!(whole, pieces);
        prop_assert_eq!(Some(whole), ledger.chain_head(&device()));
    }
}
