//! `SimDisk`: a node's storage with its durable and its unsynced part kept apart.
//!
//! Every write goes to the *live* store (what the node reads) and is also queued as an unsynced
//! operation. [`SimDisk::sync`] (the host's fsync) replays the queued operations onto the
//! *durable* store; [`SimDisk::crash`] throws the live store away and continues from the durable
//! one. So a crash loses exactly the writes since the last sync, as a real power cut may.
//! Replaying gives the same state because core's ledger is deterministic: the same operations on
//! the same state give the same seqs and clock stamps.

use std::collections::BTreeSet;

use tidesync_core::event::{DeviceId, EventId, Millis, Payload, Seq};
use tidesync_core::ledger::{Appended, Ledger, LedgerError};
use tidesync_core::shadow::Shadow;
use tidesync_core::sync::{batch::EventBatch, MemStore, Store};

/// A write not yet synced.
#[derive(Clone, Debug)]
enum DiskOp {
    Append(EventBatch),
    Record { device: DeviceId, wall: Millis, event_time: Millis, payload: Payload },
    DropOldest { device: DeviceId, n_events: usize, wall: Millis },
    MarkCommitted { device: DeviceId, up_to: Seq },
}

/// What a sync made durable, for the caller's bookkeeping.
#[derive(Debug, Default)]
pub struct Synced {
    /// Events recorded by this node that are now durable, in order, with their content hash
    /// ([`crate::digest::event_hash`]) taken as they became durable.
    pub recorded: Vec<(EventId, u64)>,
    /// Seq ranges this node dropped under storage pressure that are now durably dropped.
    pub dropped: Vec<(Seq, Seq)>,
    /// Operations replayed.
    pub n_ops: usize,
}

/// A node's storage: live and durable [`MemStore`]s and the writes between them.
#[derive(Debug, Clone)]
pub struct SimDisk {
    live: MemStore,
    durable: MemStore,
    unsynced: Vec<DiskOp>,
    dirty_shadows: BTreeSet<DeviceId>,
    n_syncs: u64,
}

impl SimDisk {
    /// A fresh disk holding `empty` (an empty store).
    pub fn new(empty: MemStore) -> Self {
        Self { durable: empty.clone(), live: empty, unsynced: Vec::new(), dirty_shadows: BTreeSet::new(), n_syncs: 0 }
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

    /// What survives a crash now.
    pub fn durable(&self) -> &MemStore {
        &self.durable
    }

    /// Whether there are writes a crash would lose.
    pub fn has_unsynced(&self) -> bool {
        !self.unsynced.is_empty() || !self.dirty_shadows.is_empty()
    }

    /// Syncs done so far.
    pub fn n_syncs(&self) -> u64 {
        self.n_syncs
    }

    /// Appends a received batch (unsynced).
    pub fn append(&mut self, batch: &EventBatch) -> Result<Appended, LedgerError> {
        let appended = self.live.append(batch)?;
        self.unsynced.push(DiskOp::Append(batch.clone()));
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
        self.unsynced.push(DiskOp::Record { device, wall, event_time, payload });
        Ok(id)
    }

    /// Drops the device's oldest uncommitted events and records the gap (unsynced).
    pub fn drop_oldest(&mut self, device: DeviceId, n_events: usize, wall: Millis) -> Option<(Seq, Seq)> {
        let dropped = self.live.ledger.drop_oldest(device, n_events, wall)?;
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
        let mut synced = Synced { recorded: Vec::new(), dropped: Vec::new(), n_ops: self.unsynced.len() };
        if !self.has_unsynced() {
            return synced;
        }
        self.n_syncs += 1;
        for op in std::mem::take(&mut self.unsynced) {
            // The live store accepted each operation on the same state, so the replay cannot fail;
            // a failure would mean the two stores diverged, which is a simulator bug.
            match op {
                DiskOp::Append(batch) => {
                    let replayed = self.durable.append(&batch);
                    assert!(replayed.is_ok(), "durable replay of an append failed: {replayed:?}");
                }
                DiskOp::Record { device, wall, event_time, payload } => {
                    let replayed = self.durable.ledger.record(device, wall, event_time, payload);
                    match replayed {
                        Ok(id) => synced.recorded.push((id, self.durable_hash(id))),
                        Err(error) => panic!("durable replay of a record failed: {error}"),
                    }
                }
                DiskOp::DropOldest { device, n_events, wall } => {
                    let dropped = self.durable.ledger.drop_oldest(device, n_events, wall);
                    match dropped {
                        Some(range) => synced.dropped.push(range),
                        None => panic!("durable replay of a drop found nothing to drop"),
                    }
                    let gap_id = EventId { device, seq: self.durable.ledger.high(&device) };
                    synced.recorded.push((gap_id, self.durable_hash(gap_id)));
                }
                DiskOp::MarkCommitted { device, up_to } => {
                    let replayed = self.durable.mark_committed(device, up_to);
                    assert!(replayed.is_ok(), "durable replay of a commit failed: {replayed:?}");
                }
            }
        }
        for device in std::mem::take(&mut self.dirty_shadows) {
            if let Some(shadow) = self.live.shadows.get(&device) {
                self.durable.shadows.insert(device, shadow.clone());
            }
        }
        synced
    }

    /// The content hash of an event just made durable (so it is held).
    fn durable_hash(&self, id: EventId) -> u64 {
        match self.durable.ledger.get(&id) {
            Some(event) => crate::digest::event_hash(event),
            None => panic!("{id} was just recorded durably but is not held"),
        }
    }

    /// A crash: the live store becomes what was durable; unsynced writes are gone.
    pub fn crash(&mut self) {
        self.unsynced.clear();
        self.dirty_shadows.clear();
        self.live = self.durable.clone();
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

#[cfg(test)]
mod tests;
