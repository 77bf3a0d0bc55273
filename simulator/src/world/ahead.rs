//! Signature verification ahead of time, on another core.
//!
//! Verifying the devices' Ed25519 seals at the cloud was the largest single cost of a simulated
//! fleet, and it is a pure function of the batch, so it need not wait for the cloud's turn in the
//! event queue. As a device sends a batch, [`VerifyAhead::submit`] hands a copy to a worker
//! thread, which verifies its seals (and hole proof) with core's [`verified_signatures`] and
//! records those that verify. The cloud's keys consult that record ([`DeviceKeys::consulting`])
//! before verifying: a signature found there is valid for exactly that key and message, so the
//! verdict is the one the cloud would have reached itself. Where the worker is behind, the cloud
//! verifies as before. Either way the run is the same; only the wall time changes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};

use tidesync_core::auth::{verified_signatures, DeviceKeys, VerifiedSignatures};
use tidesync_core::wire::EventBatch;

/// Batches waiting for the worker; beyond that the cloud verifies them itself.
const QUEUE_BATCHES: usize = 4_096;
/// Recorded signatures kept at most. Entries the cloud never asks for (it verified the batch
/// before the worker got to it, or the frame was lost) would otherwise pile up.
const VOUCHED_MAX: usize = 1 << 18;

/// Signatures the worker found valid, by their [`VerifiedSignatures`] entry.
#[derive(Debug, Default)]
struct Vouched {
    entries: Mutex<HashSet<[u8; 32]>>,
    n_taken: AtomicU64,
}

impl VerifiedSignatures for Vouched {
    fn take(&self, entry: &[u8; 32]) -> bool {
        let taken = self.entries.lock().unwrap_or_else(PoisonError::into_inner).remove(entry);
        if taken {
            self.n_taken.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }
}

/// The worker and what it found.
#[derive(Debug)]
pub(super) struct VerifyAhead {
    jobs: SyncSender<EventBatch>,
    vouched: Arc<Vouched>,
    closed: Arc<AtomicBool>,
}

impl VerifyAhead {
    /// Starts a worker that verifies with `keys`.
    pub(super) fn start(keys: Arc<DeviceKeys>) -> Self {
        let (jobs, queue) = mpsc::sync_channel::<EventBatch>(QUEUE_BATCHES);
        let vouched = Arc::new(Vouched::default());
        let closed = Arc::new(AtomicBool::new(false));
        let (found, stop) = (vouched.clone(), closed.clone());
        // Detached: it ends when the world drops its sender, or at the next batch once closed.
        std::thread::spawn(move || {
            while let Ok(batch) = queue.recv() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let entries = verified_signatures(&keys, &batch);
                let mut vouched = found.entries.lock().unwrap_or_else(PoisonError::into_inner);
                if vouched.len() + entries.len() > VOUCHED_MAX {
                    vouched.clear();
                }
                vouched.extend(entries);
            }
        });
        Self { jobs, vouched, closed }
    }

    /// `keys` consulting what the worker found.
    pub(super) fn consulted_by(&self, keys: &DeviceKeys) -> Arc<DeviceKeys> {
        Arc::new(keys.clone().consulting(self.vouched.clone()))
    }

    /// Queues a device's batch for the worker, unless it is too far behind.
    pub(super) fn submit(&self, batch: &EventBatch) {
        if batch.proof.is_none() {
            return;
        }
        // Refused when the queue is full or the worker finished: the cloud verifies it itself.
        let _ = self.jobs.try_send(batch.clone());
    }

    /// Signatures the cloud did not have to verify itself.
    pub(super) fn n_taken(&self) -> u64 {
        self.vouched.n_taken.load(Ordering::Relaxed)
    }
}

impl Drop for VerifyAhead {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tidesync_core::auth::{verify_batch, DeviceSigner};
    use tidesync_core::event::{DeviceId, Millis, Payload, SensorReading};
    use tidesync_core::ledger::{Ledger, MemLedger};

    use super::*;

    #[test]
    fn the_cloud_takes_what_the_worker_verified_and_still_refuses_what_it_did_not() {
        let device = DeviceId::new("d1").unwrap();
        let signer = DeviceSigner::from_seed(device, [3; 32]);
        let mut keys = DeviceKeys::new();
        keys.insert(device, signer.public_key()).unwrap();
        let mut ledger = MemLedger::pruning();
        for index in 0..5 {
            let reading =
                Payload::Reading(SensorReading { sensor: "t".into(), value: index as f64, unit: "Cel".into() });
            ledger.record(device, Millis(1_000 + index), Millis(1_000 + index), reading).unwrap();
        }
        let mut batch = ledger.read(&device, tidesync_core::event::Seq(1), 100).unwrap().unwrap();
        let mut proof = batch.proof.take().unwrap();
        proof.seals = vec![signer.seal(batch.last_seq(), &proof.prev.over(&batch.events))];
        batch.proof = Some(proof);

        let ahead = VerifyAhead::start(Arc::new(keys.clone()));
        let cloud_keys = ahead.consulted_by(&keys);
        ahead.submit(&batch);
        let deadline = Instant::now() + Duration::from_secs(30);
        while ahead.vouched.entries.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the worker never verified the batch");
            std::thread::sleep(Duration::from_millis(1));
        }
        verify_batch(&cloud_keys, &batch, None).unwrap();
        assert_eq!(ahead.n_taken(), 1);

        let mut altered = batch.clone();
        altered.events[2].event_time = Millis(7);
        ahead.submit(&altered);
        ahead.submit(&batch);
        // The worker handles batches in order: once the honest one is in, the altered one is done.
        while ahead.vouched.entries.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the worker never verified the batch");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(verify_batch(&cloud_keys, &altered, None).is_err());
        assert_eq!(ahead.n_taken(), 1);
    }
}
