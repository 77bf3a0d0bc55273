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

use crate::auth::{BatchProof, ChainHash, HoleProof, Seal};
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

    /// The device's hash-chain value at [`Ledger::high`] (see [`crate::auth`]), if this ledger
    /// keeps chains and knows it. The cloud checks that new events continue it.
    fn chain_head(&self, _device: &DeviceId) -> Option<ChainHash> {
        None
    }

    /// The highest seq below `from` after which this ledger knows `device`'s chain value, with
    /// that value: where a signing device starts the hole proof of a batch read from `from`
    /// (its `first` is one past the seq, its `before` the value; see [`crate::auth::HoleProof`]).
    /// The closer to `from`, the more the cloud can check; every ledger knows genesis at seq 0.
    fn chain_before(&self, device: &DeviceId, _from: Seq) -> (Seq, ChainHash) {
        (Seq::ZERO, ChainHash::genesis(device))
    }
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
    /// Chain value after each held event whose chain is known.
    chains: BTreeMap<Seq, ChainHash>,
    /// Chain value after the highest seq removed (pruned or dropped), if known.
    floor: Option<(Seq, ChainHash)>,
    /// Chain values known right before runs of removed seqs (the floor each removal started
    /// from), kept from the commit watermark on: where a hole proof can start.
    anchors: BTreeMap<Seq, ChainHash>,
    /// Chain value at `high`, if known.
    head: Option<ChainHash>,
    /// Seals received with events (a relay keeps them to pass on).
    seals: BTreeMap<Seq, Seal>,
    /// Hole proofs received, by the hole's last seq.
    hole_proofs: BTreeMap<Seq, HoleProof>,
}

impl Stream {
    /// The chain value after `seq`, if known.
    fn chain_at(&self, device: &DeviceId, seq: Seq) -> Option<ChainHash> {
        if seq == Seq::ZERO {
            return Some(ChainHash::genesis(device));
        }
        if let Some(chain) = self.chains.get(&seq) {
            return Some(*chain);
        }
        if seq == self.high {
            return self.head;
        }
        self.floor
            .filter(|(floor, _)| *floor == seq)
            .map(|(_, chain)| chain)
            .or_else(|| self.hole_proofs.get(&seq).map(|hole| hole.chain))
    }

    /// Forgets chains, seals and proofs at or below `up_to`, keeping the floor.
    fn forget_chains_through(&mut self, up_to: Seq, device: &DeviceId) {
        if let Some(chain) = self.chain_at(device, up_to) {
            self.floor = Some((up_to, chain));
            self.anchors.insert(up_to, chain);
        }
        // Anchors below the commit watermark would only start wider holes than the one at it.
        self.anchors = self.anchors.split_off(&up_to.min(self.committed));
        self.chains = self.chains.split_off(&up_to.next());
        self.seals = self.seals.split_off(&up_to.next());
        self.hole_proofs = self.hole_proofs.split_off(&up_to.next());
    }
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
        let event = Event { id, hlc, event_time, payload };
        let before = if seq == Seq::FIRST { Some(ChainHash::genesis(&device)) } else { stream.head };
        stream.head = before.map(|chain| chain.next(&event));
        if let Some(chain) = stream.head {
            stream.chains.insert(seq, chain);
        }
        stream.events.insert(seq, event);
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
        // The chain in front of the dropped run stays known too: a hole proof starts there.
        if let Some(chain) = stream.chain_at(&device, Seq(first.0 - 1)) {
            stream.anchors.insert(Seq(first.0 - 1), chain);
        }
        // Only a contiguous prefix of what is held can become a hole the batch format can declare.
        for seq in &doomed {
            // A gap event dropped now takes its explanation with it: the new gap covers the
            // seqs it named too, so every hole stays explained by a gap event that survives.
            if let Some(Event { payload: Payload::Gap(dropped), .. }) = stream.events.remove(seq) {
                first = first.min(dropped.first);
            }
        }
        // The chain after the dropped run stays known: a batch that starts with the hole proves
        // it from there.
        if let Some(chain) = stream.chains.get(&last).copied() {
            stream.floor = Some((last, chain));
        }
        stream.chains = stream.chains.split_off(&last.next());
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

    /// The chain value after `seq` of `device`, if known (see [`crate::auth`]).
    pub fn chain_at(&self, device: &DeviceId, seq: Seq) -> Option<ChainHash> {
        self.streams.get(device).and_then(|stream| stream.chain_at(device, seq))
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
        let mut batch = EventBatch::new(*device, from, events)?;
        let (first, last) = (batch.first_seq(), batch.last_seq());
        let hole = stream.hole_proofs.get(&Seq(first.0 - 1)).copied().filter(|hole| first > from && hole.first <= from);
        let prev = if first > from {
            hole.map(|hole| hole.chain).or_else(|| stream.chain_at(device, Seq(first.0 - 1)))
        } else {
            stream.chain_at(device, Seq(first.0 - 1))
        };
        batch.proof = prev.map(|prev| BatchProof {
            prev,
            seals: stream.seals.range(first..=last).map(|(_, seal)| *seal).collect(),
            hole,
        });
        Ok(Some(batch))
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
            // The chain continues our own head; after a hole only the sender's proof knows it.
            let mut chain = match (fresh.dropped(), &fresh.proof) {
                (Some(_), proof) => proof.as_ref().map(|proof| proof.prev),
                (None, _) if stream.high == Seq::ZERO => Some(ChainHash::genesis(&batch.device)),
                (None, _) => stream.head,
            };
            if let Some((first, last)) = fresh.dropped() {
                stream.holes.insert(first, last);
            }
            if let Some(proof) = &fresh.proof {
                stream.seals.extend(proof.seals.iter().map(|seal| (seal.seq, *seal)));
                if let Some(hole) = proof.hole {
                    stream.hole_proofs.insert(hole.last, hole);
                }
            }
            let mut scratch = Vec::new();
            for event in fresh.events {
                chain = chain.map(|chain| chain.next_with(&event, &mut scratch));
                if let Some(chain) = chain {
                    stream.chains.insert(event.id.seq, chain);
                }
                stream.events.insert(event.id.seq, event);
                n_new += 1;
            }
            stream.head = chain;
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
        if up_to > stream.high {
            // Committed beyond what we hold (through another gateway): our chain ends here.
            stream.high = up_to;
            stream.head = None;
        }
        if self.prune_on_commit {
            stream.events = stream.events.split_off(&up_to.next());
            stream.holes.retain(|first, _| *first > up_to);
            stream.forget_chains_through(up_to, &device);
        }
        Ok(())
    }

    fn chain_head(&self, device: &DeviceId) -> Option<ChainHash> {
        let stream = self.streams.get(device)?;
        if stream.high == Seq::ZERO {
            return Some(ChainHash::genesis(device));
        }
        stream.head
    }

    fn chain_before(&self, device: &DeviceId, from: Seq) -> (Seq, ChainHash) {
        let genesis = (Seq::ZERO, ChainHash::genesis(device));
        let Some(stream) = self.streams.get(device) else {
            return genesis;
        };
        let at = Seq(from.0.saturating_sub(1));
        if let Some(chain) = stream.chain_at(device, at) {
            return (at, chain);
        }
        stream.anchors.range(..=at).next_back().map_or(genesis, |(seq, chain)| (*seq, *chain))
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
