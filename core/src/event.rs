//! Events: the immutable facts a device records, their ids, and the hybrid logical clock that
//! stamps them.
//!
//! An event is identified by `(device, seq)`: the device that recorded it and its per-device
//! sequence number, which starts at 1 and has no gaps. Ids are made at the source, so every store
//! on the way (device ledger, gateway spool, cloud store) dedupes on them and replays are
//! harmless. Events are never changed: a correction is a new event.
//!
//! Three times, kept apart on purpose: `event_time` is what the sensor's clock said when the
//! reading was taken (it may be wrong, reset or skewed), `hlc` is the device's hybrid logical
//! clock stamp (monotonic, causally ordered), and *ingest time* is assigned by the cloud store
//! when the event arrives there; it is not part of the event.

use core::fmt;

use serde::{Deserialize, Serialize};

/// Longest device or gateway name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;

/// Why a string is not a valid device or gateway name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("name is empty (a name has 1 to 64 characters of [A-Za-z0-9._-])")]
    Empty,
    /// The name is longer than [`NAME_BYTES_MAX`].
    #[error("name is {len_bytes} bytes long, the maximum is 64")]
    TooLong {
        /// Length of the refused name.
        len_bytes: usize,
    },
    /// The name holds a character outside `[A-Za-z0-9._-]`.
    #[error("name has {character:?} at byte {index}; allowed are A-Z, a-z, 0-9, '.', '_' and '-'")]
    InvalidChar {
        /// The refused character.
        character: char,
        /// Its byte offset.
        index: usize,
    },
}

/// A validated name, stored inline so it needs no heap (the firmware uses it too).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Name {
    len: u8,
    bytes: [u8; NAME_BYTES_MAX],
}

impl Name {
    fn new(text: &str) -> Result<Self, NameError> {
        if text.is_empty() {
            return Err(NameError::Empty);
        }
        if text.len() > NAME_BYTES_MAX {
            return Err(NameError::TooLong { len_bytes: text.len() });
        }
        if let Some((index, character)) =
            text.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::InvalidChar { character, index });
        }
        let mut bytes = [0u8; NAME_BYTES_MAX];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        // The length is at most 64, checked above, so it fits in a u8.
        Ok(Self { len: text.len() as u8, bytes })
    }

    fn name_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len as usize).unwrap_or(&[])
    }

    fn as_str(&self) -> &str {
        // Only ASCII was admitted by `new`, so the bytes are valid UTF-8.
        core::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $ty(Name);

        impl $ty {
            /// Validates `text`: 1 to 64 characters of `[A-Za-z0-9._-]`.
            pub fn new(text: &str) -> Result<Self, NameError> {
                Name::new(text).map(Self)
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl PartialOrd for $ty {
            fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl Ord for $ty {
            fn cmp(&self, other: &Self) -> core::cmp::Ordering {
                // Byte order is the order of the (ASCII) names; comparing bytes skips the UTF-8
                // check of `as_str`, which showed up in profiles of large fleets.
                self.0.name_bytes().cmp(other.0.name_bytes())
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), self.as_str())
            }
        }

        impl core::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(text: &str) -> Result<Self, NameError> {
                Self::new(text)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct NameVisitor;
                impl serde::de::Visitor<'_> for NameVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a name of 1 to 64 characters of [A-Za-z0-9._-]")
                    }
                    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<$ty, E> {
                        $ty::new(text).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(NameVisitor)
            }
        }
    };
}

name_type!(
    /// The name of a device: 1 to 64 characters of `[A-Za-z0-9._-]`. It is also the subject of the
    /// device's certificate, so a device can only write under its own name.
    DeviceId
);

name_type!(
    /// The name of a gateway, with the same rules as a [`DeviceId`].
    GatewayId
);

/// A per-device sequence number. The first event of a device has seq 1; `Seq(0)` means "none".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// "No event yet": the high-water mark of an empty stream.
    pub const ZERO: Seq = Seq(0);
    /// The seq of a device's first event.
    pub const FIRST: Seq = Seq(1);

    /// The seq after this one.
    pub fn next(self) -> Seq {
        Seq(self.0.saturating_add(1))
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The id of an event: its device and its seq there. Unique across the fleet and forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventId {
    /// The device that recorded the event.
    pub device: DeviceId,
    /// Its place in that device's stream.
    pub seq: Seq,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.device, self.seq)
    }
}

/// Milliseconds since the Unix epoch (UTC), as read from some wall clock. A value, not a clock:
/// core never reads the time itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + duration_ms`, saturating.
    pub fn plus_ms(self, duration_ms: u64) -> Millis {
        Millis(self.0.saturating_add(duration_ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// A hybrid logical clock stamp: the highest wall time seen (ms since the Unix epoch) and a
/// counter that orders stamps within one millisecond or while the wall clock stands still or runs
/// backwards. Ordered by `(wall_ms, logical)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Physical part: milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Logical part: orders stamps that share `wall_ms`.
    pub logical: u32,
}

/// The state of a hybrid logical clock (Kulkarni et al., 2014). It never goes backwards, whatever
/// the wall clock does; hosts persist [`HlcClock::last`] so it does not go backwards across restarts
/// either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that has issued nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock that resumes after `last`, the highest stamp issued or observed before a restart.
    pub fn resume(last: Hlc) -> Self {
        Self { last }
    }

    /// The highest stamp issued or observed so far.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new stamp for a local event, given the wall clock's reading `wall`.
    pub fn now(&mut self, wall: Millis) -> Hlc {
        let next = if wall.0 > self.last.wall_ms { Hlc { wall_ms: wall.0, logical: 0 } } else { Self::bump(self.last) };
        self.last = next;
        next
    }

    /// Merges a stamp received from another replica, so that later local stamps order after it.
    /// Returns the new clock value.
    pub fn observe(&mut self, wall: Millis, remote: Hlc) -> Hlc {
        let wall_ms = wall.0.max(self.last.wall_ms).max(remote.wall_ms);
        let next = if wall_ms == self.last.wall_ms && wall_ms == remote.wall_ms {
            Self::bump(Hlc { wall_ms, logical: self.last.logical.max(remote.logical) })
        } else if wall_ms == self.last.wall_ms {
            Self::bump(self.last)
        } else if wall_ms == remote.wall_ms {
            Self::bump(remote)
        } else {
            Hlc { wall_ms, logical: 0 }
        };
        self.last = next;
        next
    }

    /// The stamp just after `stamp`. When the counter is exhausted the physical part moves on by
    /// one millisecond instead, which keeps the order total without wrapping.
    fn bump(stamp: Hlc) -> Hlc {
        match stamp.logical.checked_add(1) {
            Some(logical) => Hlc { wall_ms: stamp.wall_ms, logical },
            None => Hlc { wall_ms: stamp.wall_ms.saturating_add(1), logical: 0 },
        }
    }
}

#[cfg(feature = "alloc")]
mod owned;
#[cfg(feature = "alloc")]
pub(crate) use owned::put_postcard;
#[cfg(feature = "alloc")]
pub use owned::*;

#[cfg(test)]
mod tests;
