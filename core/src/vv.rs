//! `VersionVector`: what a replica holds, as device → highest contiguous seq.
//!
//! Every ledger in tidesync (device ledger, gateway spool, cloud store) holds, per device, a
//! contiguous run of seqs from 1: events it still stores plus events it has already passed upstream
//! and pruned. So one number per device says everything, and comparing two vectors says exactly
//! which events one side lacks. A missing entry means 0 (nothing held).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::event::{DeviceId, Seq};

/// Device → highest contiguous seq held. Entries are never 0 (0 is the same as absent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "BTreeMap<DeviceId, Seq>", into = "BTreeMap<DeviceId, Seq>")]
pub struct VersionVector {
    entries: BTreeMap<DeviceId, Seq>,
}

/// A run of seqs of one device, inclusive at both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeqRange {
    /// The device.
    pub device: DeviceId,
    /// First seq in the run.
    pub first: Seq,
    /// Last seq in the run (inclusive).
    pub last: Seq,
}

impl SeqRange {
    /// How many seqs the run covers.
    pub fn len(&self) -> u64 {
        self.last.0.saturating_sub(self.first.0).saturating_add(1)
    }

    /// Whether the run is empty (never, for ranges this module makes).
    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }
}

impl VersionVector {
    /// An empty vector: nothing held.
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest contiguous seq held for `device` (0 if none).
    pub fn get(&self, device: &DeviceId) -> Seq {
        self.entries.get(device).copied().unwrap_or(Seq::ZERO)
    }

    /// Sets the entry for `device`; 0 removes it.
    pub fn set(&mut self, device: DeviceId, seq: Seq) {
        if seq == Seq::ZERO {
            self.entries.remove(&device);
        } else {
            self.entries.insert(device, seq);
        }
    }

    /// Raises the entry for `device` to `seq` if that is higher.
    pub fn advance(&mut self, device: DeviceId, seq: Seq) {
        if seq > self.get(&device) {
            self.entries.insert(device, seq);
        }
    }

    /// Number of devices with a non-zero entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in device order.
    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, Seq)> + '_ {
        self.entries.iter().map(|(device, seq)| (device, *seq))
    }

    /// The least upper bound: per device, the higher entry. Commutative, associative, idempotent.
    pub fn join(&self, other: &VersionVector) -> VersionVector {
        let mut joined = self.clone();
        joined.join_in_place(other);
        joined
    }

    /// `self = self.join(other)`.
    pub fn join_in_place(&mut self, other: &VersionVector) {
        for (device, seq) in other.iter() {
            self.advance(*device, seq);
        }
    }

    /// The greatest lower bound: per device, the lower entry.
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let mut met = VersionVector::new();
        for (device, seq) in self.iter() {
            met.set(*device, seq.min(other.get(device)));
        }
        met
    }

    /// Whether `self` holds everything `other` holds.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.iter().all(|(device, seq)| self.get(device) >= seq)
    }

    /// Compares as a partial order: `None` when each side holds something the other lacks
    /// (the two are concurrent).
    pub fn compare(&self, other: &VersionVector) -> Option<Ordering> {
        match (self.dominates(other), other.dominates(self)) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Greater),
            (false, true) => Some(Ordering::Less),
            (false, false) => None,
        }
    }

    /// Whether neither side dominates the other.
    pub fn is_concurrent(&self, other: &VersionVector) -> bool {
        self.compare(other).is_none()
    }

    /// The runs of seqs that `self` holds and `other` lacks, in device order: what a sender with
    /// `self` must transfer to a receiver with `other`.
    pub fn missing_from(&self, other: &VersionVector) -> Vec<SeqRange> {
        self.iter()
            .filter_map(|(device, seq)| {
                let theirs = other.get(device);
                (seq > theirs).then(|| SeqRange { device: *device, first: theirs.next(), last: seq })
            })
            .collect()
    }
}

impl From<BTreeMap<DeviceId, Seq>> for VersionVector {
    /// Drops zero entries, which mean the same as absent ones, so equal vectors compare equal.
    fn from(entries: BTreeMap<DeviceId, Seq>) -> Self {
        entries.into_iter().collect()
    }
}

impl From<VersionVector> for BTreeMap<DeviceId, Seq> {
    fn from(vector: VersionVector) -> Self {
        vector.entries
    }
}

impl FromIterator<(DeviceId, Seq)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (DeviceId, Seq)>>(iter: I) -> Self {
        let mut vector = VersionVector::new();
        for (device, seq) in iter {
            vector.advance(device, seq);
        }
        vector
    }
}
