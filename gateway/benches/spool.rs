//! The spool alone, the gateway's throughput ceiling: appends with group commits, then the reads
//! the cloud uplink makes, for batches without proofs (unsigned devices) and for signed batches
//! (a chain value and a device seal per batch, which the spool stores and hands out again).
//!
//! `cargo bench -p tidesync-gateway --bench spool` (`TIDESYNC_BENCH_ROUNDS` changes the rounds;
//! outside `cargo bench` a small smoke round runs).
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use tidesync_core::auth::DeviceSigner;
use tidesync_core::event::{DeviceId, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::{Ledger, MemLedger};
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::wire::EventBatch;
use tidesync_gateway::spool::Spool;

/// Devices taking turns, as in the ingest benchmark.
const N_DEVICES: usize = 100;
/// Events per device batch (core's default `batch_events_max`).
const BATCH_EVENTS: usize = 512;
/// Batches per group commit.
const GROUP_BATCHES: usize = 64;
/// Rounds unless `TIDESYNC_BENCH_ROUNDS` says otherwise.
const ROUNDS: usize = 5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// No proof: a device without a signing key.
    Unsigned,
    /// A proof with the chain before the batch and one seal at its end.
    Signed,
}

/// The batches of every device, interleaved as devices take turns.
fn batches(n_events_per_device: u64, kind: Kind) -> Vec<EventBatch> {
    let mut per_device = Vec::new();
    for index in 0..N_DEVICES {
        let device = DeviceId::new(&format!("load-{index}")).unwrap();
        let signer = DeviceSigner::from_seed(device, [index as u8; 32]);
        let mut ledger = MemLedger::pruning();
        for seq in 0..n_events_per_device {
            let payload =
                Payload::Reading(SensorReading { sensor: "temp".into(), value: seq as f64 / 2.0, unit: "Cel".into() });
            ledger.record(device, Millis(1_000 + seq), Millis(1_000 + seq), payload).unwrap();
        }
        let mut out = Vec::new();
        let mut next = Seq(1);
        while let Some(mut batch) = ledger.read(&device, next, BATCH_EVENTS).unwrap() {
            next = batch.last_seq().next();
            match kind {
                Kind::Unsigned => batch.proof = None,
                Kind::Signed => {
                    let last = batch.last_seq();
                    let proof = batch.proof.as_mut().unwrap();
                    let head = proof.prev.over(&batch.events);
                    proof.seals = vec![signer.seal(last, &head)];
                }
            }
            out.push(batch);
        }
        per_device.push(out.into_iter());
    }
    let mut interleaved = Vec::new();
    loop {
        let before = interleaved.len();
        interleaved.extend(per_device.iter_mut().filter_map(Iterator::next));
        if interleaved.len() == before {
            return interleaved;
        }
    }
}

/// Appends every batch into a fresh spool, then reads everything back as the uplink does.
/// Returns (append events/s, read events/s, batches read with a proof, batches read).
fn round(batches: &[EventBatch]) -> (f64, f64, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut spool =
        Spool::open(&dir.path().join("spool.db"), "gateway:bench", u64::MAX, ShadowLimits::default()).unwrap();
    let started = Instant::now();
    let mut n_events = 0u64;
    for group in batches.chunks(GROUP_BATCHES) {
        for batch in group {
            n_events += spool.append(batch).unwrap().n_new as u64;
        }
        spool.commit().unwrap();
    }
    let append_rate = n_events as f64 / started.elapsed().as_secs_f64();

    let devices: Vec<DeviceId> = spool.device_stats().into_iter().map(|(device, ..)| device).collect();
    let started = Instant::now();
    let (mut n_read, mut n_batches, mut n_proofs) = (0u64, 0u64, 0u64);
    for device in &devices {
        let mut next = Seq(1);
        while let Some(batch) = spool.read(device, next, BATCH_EVENTS).unwrap() {
            next = batch.last_seq().next();
            n_read += batch.events.len() as u64;
            n_batches += 1;
            n_proofs += u64::from(batch.proof.is_some());
        }
    }
    assert_eq!(n_read, n_events);
    (append_rate, n_read as f64 / started.elapsed().as_secs_f64(), n_proofs, n_batches)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let smoke = !std::env::args().any(|arg| arg == "--bench");
    let (n_events_per_device, default_rounds) = if smoke { (1_024, 1) } else { (2_048, ROUNDS) };
    let rounds: usize =
        std::env::var("TIDESYNC_BENCH_ROUNDS").ok().and_then(|value| value.parse().ok()).unwrap_or(default_rounds);
    println!(
        "spool alone: {N_DEVICES} devices x {n_events_per_device} events, batches of {BATCH_EVENTS}, \
         group commit every {GROUP_BATCHES} batches, median of {rounds}"
    );
    println!("{:>10} {:>14} {:>14} {:>16}", "batches", "append ev/s", "read ev/s", "reads w/ proof");
    for kind in [Kind::Unsigned, Kind::Signed] {
        let batches = batches(n_events_per_device, kind);
        let results: Vec<(f64, f64, u64, u64)> = (0..rounds).map(|_| round(&batches)).collect();
        let append = median(results.iter().map(|result| result.0).collect());
        let read = median(results.iter().map(|result| result.1).collect());
        let name = match kind {
            Kind::Unsigned => "unsigned",
            Kind::Signed => "signed",
        };
        let (n_proofs, n_batches) = results.last().map_or((0, 0), |result| (result.2, result.3));
        println!("{name:>10} {append:>14.0} {read:>14.0} {:>16}", format!("{n_proofs}/{n_batches}"));
    }
}
