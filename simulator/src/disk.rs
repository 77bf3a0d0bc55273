//! `SimDisk`: a node's storage with its durable and its unsynced part kept apart.
//!
//! Every write goes to the *live* store (what the node reads) and is also queued as an unsynced
//! operation. [`SimDisk::sync`] (the host's fsync) moves the queued operations to the synced log;
//! [`SimDisk::crash`] throws the live store away and continues from the durable one: the last
//! snapshot with the synced log replayed onto it. So a crash loses exactly the writes since the
//! last sync, as a real power cut may. Replaying gives the same state because core's ledger is
//! deterministic: the same operations on the same state give the same seqs and clock stamps.
//!
//! Replaying every write at every sync doubled the simulator's storage work although crashes are
//! rare, so a sync only logs: with nothing unsynced the live store *is* the durable one. Once the
//! log outweighs twice the live ledger (a device or a spool that prunes what was committed), a
//! sync copies the live ledger as the new snapshot instead. A store that only grows (the cloud's)
//! keeps its log, and replays it only when it crashes.

use std::collections::BTreeSet;

use tidesync_core::event::{DeviceId, EventId, Millis, Payload, Seq};
use tidesync_core::ledger::{Appended, Ledger, LedgerError, MemLedger};
use tidesync_core::shadow::Shadow;
use tidesync_core::sync::{batch::EventBatch, MemStore, Store};

/// Synced log weight (in events) below which a snapshot is never worth taking.
const SNAPSHOT_WEIGHT_MIN: usize = 64;
/// How many times the live ledger's size the log must weigh before a snapshot replaces it.
const SNAPSHOT_RATIO: usize = 2;

/// A write, kept until a snapshot covers it.
#[derive(Clone, Debug)]
enum DiskOp {
    Append(EventBatch),
    Record { device: DeviceId, wall: Millis, event_time: Millis, payload: Payload },
    DropOldest { device: DeviceId, n_events: usize, wall: Millis },
    MarkCommitted { device: DeviceId, up_to: Seq },
}

impl DiskOp {
    /// Roughly what replaying the operation costs, in events.
    fn weight(&self) -> usize {
        match self {
            DiskOp::Append(batch) => batch.events.len().max(1),
            _ => 1,
        }
    }

    /// Applies the operation to `store`. The live store accepted it on the same state, so this
    /// cannot fail; a failure means the two diverged, which is a simulator bug.
    fn replay(self, store: &mut MemStore) {
        match self {
            DiskOp::Append(batch) => {
                let replayed = store.append(&batch);
                assert!(replayed.is_ok(), "durable replay of an append failed: {replayed:?}");
            }
            DiskOp::Record { device, wall, event_time, payload } => {
                if let Err(error) = store.ledger.record(device, wall, event_time, payload) {
                    panic!("durable replay of a record failed: {error}");
                }
            }
            DiskOp::DropOldest { device, n_events, wall } => {
                let dropped = store.ledger.drop_oldest(device, n_events, wall);
                assert!(dropped.is_some(), "durable replay of a drop found nothing to drop");
            }
            DiskOp::MarkCommitted { device, up_to } => {
                let replayed = store.mark_committed(device, up_to);
                assert!(replayed.is_ok(), "durable replay of a commit failed: {replayed:?}");
            }
        }
    }
}

/// What a sync made durable, for the caller's bookkeeping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Events recorded by this node that are now durable, in order, with their content hash
    /// ([`crate::digest::event_hash`]) taken as they were recorded.
    pub recorded: Vec<(EventId, u64)>,
    /// Seq ranges this node dropped under storage pressure that are now durably dropped.
    pub dropped: Vec<(Seq, Seq)>,
    /// Operations made durable.
    pub n_ops: usize,
}

/// A node's storage: the live [`MemStore`], the durable one as a snapshot and the synced writes
/// after it, and the unsynced writes.
#[derive(Debug, Clone)]
pub struct SimDisk {
    live: MemStore,
    /// The durable store as of the last snapshot; its shadows are always current.
    snapshot: MemStore,
    /// Synced writes the snapshot does not hold yet, and their weight.
    synced: Vec<DiskOp>,
    synced_weight: usize,
    /// Log weight at which to weigh the log against the live ledger again (counting the live
    /// ledger's events walks all its streams, so not at every sync).
    next_weighing: usize,
    unsynced: Vec<DiskOp>,
    /// What the unsynced writes will report once synced.
    pending: Synced,
    dirty_shadows: BTreeSet<DeviceId>,
    n_syncs: u64,
}

impl SimDisk {
    /// A fresh disk holding `empty` (an empty store).
    pub fn new(empty: MemStore) -> Self {
        Self {
            snapshot: empty.clone(),
            live: empty,
            synced: Vec::new(),
            synced_weight: 0,
            next_weighing: SNAPSHOT_WEIGHT_MIN,
            unsynced: Vec::new(),
            pending: Synced::default(),
            dirty_shadows: BTreeSet::new(),
            n_syncs: 0,
        }
    }

    /// The store as the node sees it.
    pub fn live(&self) -> &MemStore {
        &self.live
    }

    /// The store as the node sees it, for sessions. Shadow changes made through it must be
    /// reported with [`SimDisk::touch_shadow`] so that a sync persists them.
    pub fn live_mut(&mut self) -> &mut MemStore {
        &mut self.live
    }

    /// What survives a crash now: the live store when nothing is unsynced, else the snapshot,
    /// which needs [`SimDisk::materialize`] first.
    ///
    /// # Panics
    /// If there are unsynced writes and synced writes are not in the snapshot yet: reading it
    /// then would be a simulator bug.
    pub fn durable(&self) -> &MemStore {
        if !self.has_unsynced() {
            return &self.live;
        }
        assert!(self.synced.is_empty(), "SimDisk::durable read before SimDisk::materialize");
        &self.snapshot
    }

    /// Makes [`SimDisk::durable`] readable while there are unsynced writes: replays the synced
    /// log onto the snapshot. (With none, the durable store is the live one already.)
    pub fn materialize(&mut self) {
        if self.has_unsynced() {
            self.replay_log();
        }
    }

    /// Replays the synced log onto the snapshot, which is then the durable store.
    fn replay_log(&mut self) {
        for op in std::mem::take(&mut self.synced) {
            op.replay(&mut self.snapshot);
        }
        self.synced_weight = 0;
        self.next_weighing = SNAPSHOT_WEIGHT_MIN;
    }

    /// Whether there are writes a crash would lose.
    pub fn has_unsynced(&self) -> bool {
        !self.unsynced.is_empty() || !self.dirty_shadows.is_empty()
    }

    /// Syncs done so far.
    pub fn n_syncs(&self) -> u64 {
        self.n_syncs
    }

    /// Appends a received batch (unsynced). Takes the batch: the log keeps it for a replay.
    pub fn append(&mut self, batch: EventBatch) -> Result<Appended, LedgerError> {
        let appended = self.live.append(&batch)?;
        self.unsynced.push(DiskOp::Append(batch));
        Ok(appended)
    }

    /// Records a new event of this node's device (unsynced).
    pub fn record(
        &mut self,
        device: DeviceId,
        wall: Millis,
        event_time: Millis,
        payload: Payload,
    ) -> Result<EventId, LedgerError> {
        let id = self.live.ledger.record(device, wall, event_time, payload.clone())?;
        self.pending.recorded.push((id, live_hash(&self.live.ledger, id)));
        self.unsynced.push(DiskOp::Record { device, wall, event_time, payload });
        Ok(id)
    }

    /// Drops the device's oldest uncommitted events and records the gap (unsynced).
    pub fn drop_oldest(&mut self, device: DeviceId, n_events: usize, wall: Millis) -> Option<(Seq, Seq)> {
        let dropped = self.live.ledger.drop_oldest(device, n_events, wall)?;
        self.pending.dropped.push(dropped);
        let gap_id = EventId { device, seq: self.live.ledger.high(&device) };
        self.pending.recorded.push((gap_id, live_hash(&self.live.ledger, gap_id)));
        self.unsynced.push(DiskOp::DropOldest { device, n_events, wall });
        Some(dropped)
    }

    /// Records a commit acknowledgement, which prunes (unsynced).
    pub fn mark_committed(&mut self, device: DeviceId, up_to: Seq) -> Result<(), LedgerError> {
        self.live.mark_committed(device, up_to)?;
        self.unsynced.push(DiskOp::MarkCommitted { device, up_to });
        Ok(())
    }

    /// Notes that the live shadow of `device` changed, so the next sync saves it.
    pub fn touch_shadow(&mut self, device: DeviceId) {
        self.dirty_shadows.insert(device);
    }

    /// The host's fsync: everything written so far becomes durable.
    pub fn sync(&mut self) -> Synced {
        if !self.has_unsynced() {
            return Synced::default();
        }
        self.n_syncs += 1;
        let mut synced = std::mem::take(&mut self.pending);
        synced.n_ops = self.unsynced.len();
        // Drained, not taken: the queue keeps its capacity for the next round.
        for op in self.unsynced.drain(..) {
            self.synced_weight += op.weight();
            self.synced.push(op);
        }
        for device in std::mem::take(&mut self.dirty_shadows) {
            if let Some(shadow) = self.live.shadows.get(&device) {
                self.snapshot.shadows.insert(device, shadow.clone());
            }
        }
        if self.synced_weight >= self.next_weighing {
            let live_weight = self.live.ledger.len() * SNAPSHOT_RATIO;
            if self.synced_weight >= live_weight {
                // Nothing is unsynced now, so the live ledger is the durable one.
                self.snapshot.ledger = self.live.ledger.clone();
                self.synced.clear();
                self.synced_weight = 0;
                self.next_weighing = live_weight.max(SNAPSHOT_WEIGHT_MIN);
            } else {
                self.next_weighing = live_weight;
            }
        }
        synced
    }

    /// A crash: the live store becomes what was durable; unsynced writes are gone.
    pub fn crash(&mut self) {
        self.unsynced.clear();
        self.pending = Synced::default();
        self.dirty_shadows.clear();
        self.replay_log();
        self.live = self.snapshot.clone();
    }

    /// The disk was replaced: everything is gone.
    pub fn wipe(&mut self, empty: MemStore) {
        *self = Self::new(empty);
    }

    /// The live shadow of `device`, created if this store keeps it.
    pub fn shadow_mut(&mut self, device: &DeviceId) -> Option<&mut Shadow> {
        self.live.shadow_mut(device).ok().flatten()
    }
}

/// The content hash of an event just written to `ledger` (so it is held).
fn live_hash(ledger: &MemLedger, id: EventId) -> u64 {
    match ledger.get(&id) {
        Some(event) => crate::digest::event_hash(event),
        None => panic!("{id} was just recorded but is not held"),
    }
}

#[cfg(test)]
mod tests;
