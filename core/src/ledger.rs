//! The `Ledger` trait that sync sessions read and hosts write, and `MemLedger`, its in-memory
//! implementation for tests and the simulator.
//!
//! A ledger holds, per device, a contiguous run of seqs from 1: events it stores, events it has
//! pruned after the cloud committed them, and holes a sender declared (seqs it dropped or no
//! longer has; see [`EventBatch::dropped`]). Its [`VersionVector`] is therefore exact. Appends are
//! idempotent: what a ledger already covers is skipped, except that events arriving late for a
//! declared hole fill it.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::event::{DeviceId, Event, EventError, EventId, HlcClock, Millis, Payload, Seq};
use crate::vv::VersionVector;
use crate::wire::{BatchError, EventBatch};

/// Why a ledger operation failed. A failed operation changes nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The batch starts after the ledger's high: appending it would leave a hole.
    #[error("batch of {device} from seq {from} would leave a hole after seq {high}")]
    Hole {
        /// The device.
        device: DeviceId,
        /// What the ledger covers.
        high: Seq,
        /// Where the batch starts.
        from: Seq,
    },
    /// The batch breaks a batch invariant.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// The event may not be recorded.
    #[error(transparent)]
    Event(#[from] EventError),
    /// The ledger is at its byte budget and its policy is to refuse new events.
    #[error("ledger is full: {used_bytes} of {budget_bytes} bytes used by unacknowledged events")]
    Full {
        /// Bytes in use.
        used_bytes: u64,
        /// The budget.
        budget_bytes: u64,
    },
    /// The storage underneath failed (disk full, I/O error, corrupt file).
    #[error("ledger storage failed")]
    Storage(#[source] Box<dyn core::error::Error + Send + Sync>),
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The device's high after the append.
    pub high: Seq,
    /// How many events were new (the rest were duplicates).
    pub n_new: usize,
}

/// Storage of events as the sync sessions see it. Implemented over SQLite by the device agent,
/// the gateway spool and the cloud store, and in memory by [`MemLedger`].
pub trait Ledger {
    /// The highest seq of `device` this ledger covers contiguously (0 if none).
    fn high(&self, device: &DeviceId) -> Seq;

    /// Everything this ledger covers, as a version vector.
    fn version_vector(&self) -> VersionVector;

    /// Up to `max_events` contiguous events of `device` starting at `from`. If the ledger no
    /// longer has the events at `from` (pruned after commit, or dropped), the batch starts with
    /// that hole: its `from` is `from` and its first event is the first one held after it.
    /// `None` if the ledger holds nothing at or after `from`.
    fn read(&self, device: &DeviceId, from: Seq, max_events: usize) -> Result<Option<EventBatch>, LedgerError>;

    /// Appends a batch received from a sender, skipping what is already covered and filling
    /// holes. The batch may not start after `high + 1`.
    fn append(&mut self, batch: &EventBatch) -> Result<Appended, LedgerError>;

    /// Records that the cloud store holds `device`'s events up to `up_to`; the ledger may prune
    /// them (the cloud store itself keeps everything).
    fn mark_committed(&mut self, device: DeviceId, up_to: Seq) -> Result<(), LedgerError>;
}

/// One device's stream in a [`MemLedger`].
#[derive(Clone, Debug, Default)]
struct Stream {
    events: BTreeMap<Seq, Event>,
    /// Highest seq covered contiguously (held, pruned or declared dropped).
    high: Seq,
    /// Highest seq known to be committed in the cloud store.
    committed: Seq,
    /// Declared holes not filled yet, as first → last.
    holes: BTreeMap<Seq, Seq>,
}

/// An in-memory ledger for tests and the simulator.
#[derive(Clone, Debug, Default)]
pub struct MemLedger {
    streams: BTreeMap<DeviceId, Stream>,
    clock: HlcClock,
    prune_on_commit: bool,
}

impl MemLedger {
    /// An empty ledger that keeps every event (as a cloud store does).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty ledger that deletes events once the cloud has committed them (as a device ledger
    /// and a gateway spool do).
    pub fn pruning() -> Self {
        Self { prune_on_commit: true, ..Self::default() }
    }

    /// Records a new event of `device` now: assigns the next seq and a clock stamp.
    pub fn record(
        &mut self,
        device: DeviceId,
        wall: Millis,
        event_time: Millis,
        payload: Payload,
    ) -> Result<EventId, LedgerError> {
        payload.validate()?;
        let stream = self.streams.entry(device).or_default();
        let seq = stream.high.next();
        let id = EventId { device, seq };
        let hlc = self.clock.now(wall);
        stream.events.insert(seq, Event { id, hlc, event_time, payload });
        stream.high = seq;
        Ok(id)
    }

    /// Drops `device`'s oldest `n` held events that are not committed and records a gap event
    /// for them, as a device under storage pressure with the `drop-oldest` policy does. Returns
    /// the dropped seqs, if any.
    pub fn drop_oldest(&mut self, device: DeviceId, n: usize, wall: Millis) -> Option<(Seq, Seq)> {
        let stream = self.streams.get_mut(&device)?;
        let doomed: Vec<Seq> = stream.events.keys().copied().filter(|seq| *seq > stream.committed).take(n).collect();
        let (mut first, last) = (*doomed.first()?, *doomed.last()?);
        // Only a contiguous prefix of what is held can become a hole the batch format can declare.
        for seq in &doomed {
            // A gap event dropped now takes its explanation with it: the new gap covers the
            // seqs it named too, so every hole stays explained by a gap event that survives.
            if let Some(Event { payload: Payload::Gap(dropped), .. }) = stream.events.remove(seq) {
                first = first.min(dropped.first);
            }
        }
        let gap = Payload::Gap(crate::event::Gap { first, last, reason: crate::event::GapReason::StorageFull });
        // A gap payload with first <= last validates; recording cannot fail.
        let recorded = self.record(device, wall, wall, gap);
        debug_assert!(recorded.is_ok());
        Some((first, last))
    }

    /// The events held for `device`, in seq order.
    pub fn events(&self, device: &DeviceId) -> impl Iterator<Item = &Event> + '_ {
        self.streams.get(device).into_iter().flat_map(|stream| stream.events.values())
    }

    /// The event with id `id`, if held.
    pub fn get(&self, id: &EventId) -> Option<&Event> {
        self.streams.get(&id.device)?.events.get(&id.seq)
    }

    /// Number of events held, over all devices.
    pub fn len(&self) -> usize {
        self.streams.values().map(|stream| stream.events.len()).sum()
    }

    /// Whether no events are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The devices with a stream here.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceId> + '_ {
        self.streams.keys()
    }

    /// Declared holes of `device` that no late event has filled, as (first, last).
    pub fn holes(&self, device: &DeviceId) -> Vec<(Seq, Seq)> {
        self.streams.get(device).map_or_else(Vec::new, |stream| stream.holes.iter().map(|(a, b)| (*a, *b)).collect())
    }

    /// Highest seq of `device` known committed in the cloud store.
    pub fn committed(&self, device: &DeviceId) -> Seq {
        self.streams.get(device).map_or(Seq::ZERO, |stream| stream.committed)
    }

    /// The device clock's last stamp.
    pub fn clock(&self) -> HlcClock {
        self.clock
    }
}

impl Ledger for MemLedger {
    fn high(&self, device: &DeviceId) -> Seq {
        self.streams.get(device).map_or(Seq::ZERO, |stream| stream.high)
    }

    fn version_vector(&self) -> VersionVector {
        self.streams.iter().map(|(device, stream)| (*device, stream.high)).collect()
    }

    fn read(&self, device: &DeviceId, from: Seq, max_events: usize) -> Result<Option<EventBatch>, LedgerError> {
        let Some(stream) = self.streams.get(device) else {
            return Ok(None);
        };
        let from = from.max(Seq::FIRST);
        let mut events = Vec::new();
        for (seq, event) in stream.events.range(from..) {
            if events.len() == max_events.min(crate::wire::batch::BATCH_EVENTS_MAX) {
                break;
            }
            if let Some(previous) = events.last().map(|event: &Event| event.id.seq) {
                if *seq != previous.next() {
                    break;
                }
            }
            events.push(event.clone());
        }
        if events.is_empty() {
            return Ok(None);
        }
        Ok(Some(EventBatch::new(*device, from, events)?))
    }

    fn append(&mut self, batch: &EventBatch) -> Result<Appended, LedgerError> {
        batch.validate()?;
        let stream = self.streams.entry(batch.device).or_default();
        if batch.from > stream.high.next() {
            return Err(LedgerError::Hole { device: batch.device, high: stream.high, from: batch.from });
        }
        let mut n_new = 0;
        // Late events for declared holes fill them.
        for event in batch.events.iter().filter(|event| event.id.seq <= stream.high) {
            let seq = event.id.seq;
            let hole = stream.holes.range(..=seq).next_back().map(|(first, last)| (*first, *last));
            if let Some((first, last)) = hole.filter(|(_, last)| seq <= *last) {
                stream.holes.remove(&first);
                if first < seq {
                    stream.holes.insert(first, Seq(seq.0 - 1));
                }
                if seq < last {
                    stream.holes.insert(seq.next(), last);
                }
                if seq > stream.committed || !self.prune_on_commit {
                    stream.events.insert(seq, event.clone());
                    n_new += 1;
                }
            }
        }
        if let Some(fresh) = batch.after(stream.high) {
            if let Some((first, last)) = fresh.dropped() {
                stream.holes.insert(first, last);
            }
            for event in fresh.events {
                stream.events.insert(event.id.seq, event);
                n_new += 1;
            }
            stream.high = batch.last_seq();
        }
        if let Some(last) = batch.events.last() {
            self.clock.observe(Millis(0), last.hlc);
        }
        Ok(Appended { high: stream.high, n_new })
    }

    fn mark_committed(&mut self, device: DeviceId, up_to: Seq) -> Result<(), LedgerError> {
        let stream = self.streams.entry(device).or_default();
        if up_to <= stream.committed {
            return Ok(());
        }
        stream.committed = up_to;
        stream.high = stream.high.max(up_to);
        if self.prune_on_commit {
            stream.events = stream.events.split_off(&up_to.next());
            stream.holes.retain(|first, _| *first > up_to);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Gap, SensorReading};

    fn reading(value: f64) -> Payload {
        Payload::Reading(SensorReading { sensor: "t".into(), value, unit: "Cel".into() })
    }

    #[test]
    fn dropping_a_gap_event_widens_the_next_gap_so_every_hole_stays_explained() {
        let device = DeviceId::new("d").unwrap();
        let mut ledger = MemLedger::pruning();
        for i in 0..4 {
            ledger.record(device, Millis(i), Millis(i), reading(i as f64)).unwrap();
        }
        assert_eq!(ledger.drop_oldest(device, 2, Millis(10)), Some((Seq(1), Seq(2))));
        // Seqs 3, 4 and the gap event at 5 go now.
        ledger.drop_oldest(device, 3, Millis(11));
        let gaps: Vec<(Seq, Seq)> = ledger
            .events(&device)
            .filter_map(|event| match &event.payload {
                Payload::Gap(Gap { first, last, .. }) => Some((*first, *last)),
                _ => None,
            })
            .collect();
        assert_eq!(gaps, vec![(Seq(1), Seq(5))]);
    }
}
