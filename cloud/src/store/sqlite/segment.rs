//! The byte encoding of a *segment*: a run of one device's events at consecutive seqs and
//! consecutive positions, written by one insert (one gateway batch), stored as one SQLite row.
//!
//! The row's columns carry what the run shares (device, first and last seq, first and last
//! position, gateway, ingest time); the blob carries what differs per event, in seq order:
//!
//! ```text
//! segment  = version:u8 (= 2) event* crc:u32-le
//! event    = hlc_wall:zigzag-delta  hlc_logical:varint  event_time:zigzag-delta
//!            kind:varint  schema_version:varint  body_len:varint  body:[u8; body_len]
//! ```
//!
//! `crc` is CRC-32C (Castagnoli) of every byte before it, version included. SQLite keeps no
//! checksum of its pages, and a flipped bit inside a value delta or a body would still decode,
//! as a wrong event; with the checksum it is [`SegmentError::Checksum`]. Version 1 (the same
//! without `crc`) was written before the checksum and is still read.
//!
//! Varints are LEB128 (at most 10 bytes for a u64). `hlc_wall` and `event_time` are deltas from
//! the previous event's (from 0 for the first), zigzag-coded because event times inside a segment
//! may go backwards (RTC resets, late events). A segment holds no event count: the reader knows
//! it from the row (`last_seq - first_seq + 1`) and checks that the blob holds exactly that many.
//!
//! The blob is a file on disk, so decoding never trusts it: every malformed input (unknown
//! version, truncated varint or body, a field out of range, too few or too many events) is a
//! [`SegmentError`], never a panic.

/// The first segment format, without a checksum: read, no longer written.
pub const SEGMENT_FORMAT_V1: u8 = 1;

/// The segment format this build writes: version 1 with a CRC-32C of the bytes at the end.
pub const SEGMENT_FORMAT_V2: u8 = 2;

/// The checksum of version 2 segments (CRC-32C, as iSCSI and ext4 use it), slice-by-16: every
/// read of a segment checks its whole blob (up to 256 KiB), so the table-per-byte version would
/// show in read rates.
const CHECKSUM: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);
const CHECKSUM_BYTES: usize = 4;

/// Most events in one segment: a longer run is cut into several segments, so a read that starts
/// inside a segment never decodes more than this many events to skip to its start.
pub const SEGMENT_EVENTS_MAX: usize = 1_024;

/// A segment is cut after the event that takes its encoding past this many bytes (large payloads
/// make fewer events per segment).
pub const SEGMENT_BYTES_TARGET: usize = 256 * 1024;

/// One event's fields as a segment stores them (the payload still encoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent<'a> {
    /// The device's HLC wall clock.
    pub hlc_wall_ms: u64,
    /// The HLC's logical counter.
    pub hlc_logical: u32,
    /// The event time.
    pub event_time_ms: u64,
    /// The payload's kind tag.
    pub kind: u16,
    /// The payload's schema version.
    pub schema_version: u16,
    /// The payload body (the kind's schema, postcard-encoded).
    pub body: &'a [u8],
}

/// Why a segment's bytes do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// The blob is empty (not even a version byte).
    #[error("empty segment")]
    Empty,
    /// A format version this build does not know.
    #[error("unknown segment format version {0}")]
    UnknownVersion(u8),
    /// The bytes end inside an event.
    #[error("truncated at byte {at}")]
    Truncated {
        /// Where the bytes ran out.
        at: usize,
    },
    /// A varint longer than 10 bytes, or one that overflows 64 bits.
    #[error("bad varint at byte {at}")]
    Varint {
        /// Where it starts.
        at: usize,
    },
    /// A field that does not fit its type (logical clock, kind, schema version, body length).
    #[error("{field} out of range at byte {at}")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// Where it starts.
        at: usize,
    },
    /// The bytes are not those the checksum was taken of (a version 2 segment changed on disk).
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The checksum at the end of the blob.
        stored: u32,
        /// The checksum of the bytes before it.
        computed: u32,
    },
    /// The blob holds another number of events than its row says.
    #[error("holds {found} events or more, the row says {expected}")]
    Count {
        /// Events the row's seq range covers.
        expected: u64,
        /// Events found (at least).
        found: u64,
    },
}

/// Appends events to a segment blob, tracking the event-time range for the row's columns.
#[derive(Debug)]
pub struct SegmentEncoder {
    out: Vec<u8>,
    /// Whether `out` ends with the checksum ([`SegmentEncoder::finish`]); a push takes it off.
    sealed: bool,
    n_events: usize,
    previous_wall: u64,
    previous_time: u64,
    min_time: u64,
    max_time: u64,
}

impl Default for SegmentEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SegmentEncoder {
    /// An encoder holding an empty segment.
    pub fn new() -> Self {
        let mut encoder = Self {
            out: Vec::new(),
            sealed: false,
            n_events: 0,
            previous_wall: 0,
            previous_time: 0,
            min_time: u64::MAX,
            max_time: 0,
        };
        encoder.clear();
        encoder
    }

    /// Empties the segment (keeping the buffer's capacity).
    pub fn clear(&mut self) {
        self.out.clear();
        self.out.push(SEGMENT_FORMAT_V2);
        self.sealed = false;
        self.n_events = 0;
        self.previous_wall = 0;
        self.previous_time = 0;
        self.min_time = u64::MAX;
        self.max_time = 0;
    }

    /// Appends one event.
    pub fn push(&mut self, event: &RawEvent<'_>) {
        if self.sealed {
            self.out.truncate(self.out.len() - CHECKSUM_BYTES);
            self.sealed = false;
        }
        put_varint(&mut self.out, zigzag(event.hlc_wall_ms.wrapping_sub(self.previous_wall)));
        put_varint(&mut self.out, u64::from(event.hlc_logical));
        put_varint(&mut self.out, zigzag(event.event_time_ms.wrapping_sub(self.previous_time)));
        put_varint(&mut self.out, u64::from(event.kind));
        put_varint(&mut self.out, u64::from(event.schema_version));
        put_varint(&mut self.out, event.body.len() as u64);
        self.out.extend_from_slice(event.body);
        self.previous_wall = event.hlc_wall_ms;
        self.previous_time = event.event_time_ms;
        self.min_time = self.min_time.min(event.event_time_ms);
        self.max_time = self.max_time.max(event.event_time_ms);
        self.n_events += 1;
    }

    /// Appends one event whose payload the caller encoded into `body` (see
    /// [`SegmentEncoder::push`]): the body is written straight into the segment.
    pub fn push_event(&mut self, event: &tidesync_core::event::Event, body: &mut Vec<u8>) {
        body.clear();
        event.payload.encode_body(body);
        self.push(&RawEvent {
            hlc_wall_ms: event.hlc.wall_ms,
            hlc_logical: event.hlc.logical,
            event_time_ms: event.event_time.0,
            kind: event.kind().tag(),
            schema_version: event.schema_version(),
            body,
        });
    }

    /// Events appended.
    pub fn len(&self) -> usize {
        self.n_events
    }

    /// Whether no event was appended.
    pub fn is_empty(&self) -> bool {
        self.n_events == 0
    }

    /// Whether the segment is full: it holds [`SEGMENT_EVENTS_MAX`] events or its bytes reached
    /// [`SEGMENT_BYTES_TARGET`].
    pub fn is_full(&self) -> bool {
        self.n_events >= SEGMENT_EVENTS_MAX || self.out.len() >= SEGMENT_BYTES_TARGET
    }

    /// The smallest and largest event time appended (`(u64::MAX, 0)` when empty).
    pub fn time_range(&self) -> (u64, u64) {
        (self.min_time, self.max_time)
    }

    /// The encoded segment, its checksum appended (a later push takes it off again).
    pub fn finish(&mut self) -> &[u8] {
        if !self.sealed {
            let checksum = CHECKSUM.checksum(&self.out);
            self.out.extend_from_slice(&checksum.to_le_bytes());
            self.sealed = true;
        }
        &self.out
    }
}

fn zigzag(delta: u64) -> u64 {
    let signed = delta as i64;
    ((signed << 1) ^ (signed >> 63)) as u64
}

fn unzigzag(value: u64) -> u64 {
    ((value >> 1) as i64 ^ -((value & 1) as i64)) as u64
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a segment's events in order. Yields `Err` once on malformed bytes, then ends.
#[derive(Debug, Clone)]
pub struct SegmentReader<'a> {
    bytes: &'a [u8],
    at: usize,
    expected: u64,
    n_read: u64,
    previous_wall: u64,
    previous_time: u64,
    failed: bool,
}

impl<'a> SegmentReader<'a> {
    /// A reader of `bytes`, which must hold exactly `n_events` events. A version 2 segment's
    /// checksum is checked here, before any event is read.
    pub fn new(bytes: &'a [u8], n_events: u64) -> Result<Self, SegmentError> {
        let (&version, _) = bytes.split_first().ok_or(SegmentError::Empty)?;
        let bytes = match version {
            SEGMENT_FORMAT_V1 => bytes,
            SEGMENT_FORMAT_V2 => {
                // The content keeps its version byte: there must be one before the checksum.
                let (content, stored) = bytes
                    .split_last_chunk::<CHECKSUM_BYTES>()
                    .filter(|(content, _)| !content.is_empty())
                    .ok_or(SegmentError::Truncated { at: bytes.len() })?;
                let stored = u32::from_le_bytes(*stored);
                let computed = CHECKSUM.checksum(content);
                if stored != computed {
                    return Err(SegmentError::Checksum { stored, computed });
                }
                content
            }
            other => return Err(SegmentError::UnknownVersion(other)),
        };
        Ok(Self { bytes, at: 1, expected: n_events, n_read: 0, previous_wall: 0, previous_time: 0, failed: false })
    }

    fn varint(&mut self) -> Result<u64, SegmentError> {
        let start = self.at;
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at).ok_or(SegmentError::Truncated { at: self.at })?;
            self.at += 1;
            let bits = u64::from(byte & 0x7f);
            // The tenth byte may only carry the top bit of a u64.
            if shift == 63 && bits > 1 {
                return Err(SegmentError::Varint { at: start });
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(SegmentError::Varint { at: start })
    }

    fn narrow<T: TryFrom<u64>>(&mut self, field: &'static str) -> Result<T, SegmentError> {
        let at = self.at;
        let value = self.varint()?;
        T::try_from(value).map_err(|_| SegmentError::OutOfRange { field, at })
    }

    fn event(&mut self) -> Result<RawEvent<'a>, SegmentError> {
        let wall = self.previous_wall.wrapping_add(unzigzag(self.varint()?));
        let logical: u32 = self.narrow("hlc logical")?;
        let time = self.previous_time.wrapping_add(unzigzag(self.varint()?));
        let kind: u16 = self.narrow("kind")?;
        let schema_version: u16 = self.narrow("schema version")?;
        let len: usize = self.narrow("body length")?;
        let end = self.at.checked_add(len).ok_or(SegmentError::OutOfRange { field: "body length", at: self.at })?;
        let body = self.bytes.get(self.at..end).ok_or(SegmentError::Truncated { at: self.bytes.len() })?;
        self.at = end;
        self.previous_wall = wall;
        self.previous_time = time;
        Ok(RawEvent { hlc_wall_ms: wall, hlc_logical: logical, event_time_ms: time, kind, schema_version, body })
    }
}

impl<'a> Iterator for SegmentReader<'a> {
    type Item = Result<RawEvent<'a>, SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let at_end = self.at >= self.bytes.len();
        let result = match (self.n_read < self.expected, at_end) {
            (false, true) => return None,
            (false, false) => Err(SegmentError::Count { expected: self.expected, found: self.n_read + 1 }),
            (true, true) => Err(SegmentError::Count { expected: self.expected, found: self.n_read }),
            (true, false) => self.event(),
        };
        match &result {
            Ok(_) => self.n_read += 1,
            Err(_) => self.failed = true,
        }
        Some(result)
    }
}

/// Decodes a whole segment that must hold `n_events` events (for tests and the fuzz target; the
/// store streams with [`SegmentReader`]).
pub fn decode(bytes: &[u8], n_events: u64) -> Result<Vec<RawEvent<'_>>, SegmentError> {
    SegmentReader::new(bytes, n_events)?.collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    struct Owned {
        wall: u64,
        logical: u32,
        time: u64,
        kind: u16,
        schema: u16,
        body: Vec<u8>,
    }

    fn owned() -> impl Strategy<Value = Owned> {
        (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u16>(),
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(wall, logical, time, kind, schema, body)| Owned {
                wall,
                logical,
                time,
                kind,
                schema,
                body,
            })
    }

    fn raw(event: &Owned) -> RawEvent<'_> {
        RawEvent {
            hlc_wall_ms: event.wall,
            hlc_logical: event.logical,
            event_time_ms: event.time,
            kind: event.kind,
            schema_version: event.schema,
            body: &event.body,
        }
    }

    fn encode(events: &[Owned]) -> SegmentEncoder {
        let mut encoder = SegmentEncoder::new();
        for event in events {
            encoder.push(&raw(event));
        }
        encoder
    }

    proptest! {
        #[test]
        fn round_trips(events in proptest::collection::vec(owned(), 0..50)) {
            let mut encoder = encode(&events);
            prop_assert_eq!(encoder.len(), events.len());
            let bytes = encoder.finish().to_vec();
            let decoded = decode(&bytes, events.len() as u64).unwrap();
            let expected: Vec<RawEvent<'_>> = events.iter().map(raw).collect();
            prop_assert_eq!(&decoded, &expected);
            let min = events.iter().map(|e| e.time).min().unwrap_or(u64::MAX);
            let max = events.iter().map(|e| e.time).max().unwrap_or(0);
            prop_assert_eq!(encoder.time_range(), (min, max));
        }

        #[test]
        fn every_truncation_is_an_error(events in proptest::collection::vec(owned(), 1..8)) {
            let mut encoder = encode(&events);
            let bytes = encoder.finish().to_vec();
            for len in 0..bytes.len() {
                prop_assert!(decode(&bytes[..len], events.len() as u64).is_err(), "cut at {}", len);
            }
        }

        #[test]
        fn every_bit_flip_is_an_error(events in proptest::collection::vec(owned(), 1..6)) {
            let bytes = encode(&events).finish().to_vec();
            for bit in 8..bytes.len() * 8 {
                let mut flipped = bytes.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                prop_assert!(decode(&flipped, events.len() as u64).is_err(), "flip of bit {}", bit);
            }
        }

        #[test]
        fn version_1_segments_still_read(events in proptest::collection::vec(owned(), 0..20)) {
            // Version 1 is version 2 without the checksum.
            let v2 = encode(&events).finish().to_vec();
            let mut v1 = v2[..v2.len() - CHECKSUM_BYTES].to_vec();
            v1[0] = SEGMENT_FORMAT_V1;
            let decoded = decode(&v1, events.len() as u64).unwrap();
            let expected: Vec<RawEvent<'_>> = events.iter().map(raw).collect();
            prop_assert_eq!(decoded, expected);
        }

        #[test]
        fn pushing_after_finish_reseals(events in proptest::collection::vec(owned(), 2..10)) {
            let (first, rest) = events.split_at(1);
            let mut encoder = encode(first);
            let _ = encoder.finish();
            for event in rest {
                encoder.push(&raw(event));
            }
            prop_assert_eq!(encoder.finish().to_vec(), encode(&events).finish().to_vec());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), n in 0u64..20) {
            // Either an error or exactly n events, each inside the input.
            if let Ok(events) = decode(&bytes, n) {
                prop_assert_eq!(events.len() as u64, n);
                prop_assert!(events.iter().map(|e| e.body.len()).sum::<usize>() < bytes.len().max(1));
            }
        }

        #[test]
        fn a_wrong_count_is_an_error(events in proptest::collection::vec(owned(), 0..8), delta in 1u64..3) {
            let mut encoder = encode(&events);
            let n = events.len() as u64;
            let more = decode(encoder.finish(), n + delta).unwrap_err();
            prop_assert!(matches!(more, SegmentError::Count { .. }), "{:?}", more);
            if n >= delta {
                let fewer = decode(encoder.finish(), n - delta).unwrap_err();
                prop_assert!(matches!(fewer, SegmentError::Count { .. }), "{:?}", fewer);
            }
        }
    }

    #[test]
    fn malformed_headers_and_fields_are_typed_errors() {
        assert_eq!(decode(&[], 0).unwrap_err(), SegmentError::Empty);
        assert_eq!(decode(&[3], 0).unwrap_err(), SegmentError::UnknownVersion(3));
        assert!(decode(&[SEGMENT_FORMAT_V1], 0).unwrap().is_empty());
        // Version 2: the checksum must be there and match.
        let empty = SegmentEncoder::new().finish().to_vec();
        assert_eq!(empty.len(), 1 + CHECKSUM_BYTES);
        assert!(decode(&empty, 0).unwrap().is_empty());
        assert_eq!(decode(&[SEGMENT_FORMAT_V2], 0).unwrap_err(), SegmentError::Truncated { at: 1 });
        assert_eq!(decode(&empty[..4], 0).unwrap_err(), SegmentError::Truncated { at: 4 });
        let mut wrong = empty.clone();
        wrong[1] ^= 1;
        assert!(matches!(decode(&wrong, 0).unwrap_err(), SegmentError::Checksum { .. }));
        // Eleven continuation bytes: no u64 varint is that long.
        let mut long = vec![SEGMENT_FORMAT_V1];
        long.extend([0xff; 11]);
        assert_eq!(decode(&long, 1).unwrap_err(), SegmentError::Varint { at: 1 });
        // A tenth byte carrying more than the top bit overflows.
        let mut overflow = vec![SEGMENT_FORMAT_V1];
        overflow.extend([0xff; 9]);
        overflow.push(0x02);
        assert_eq!(decode(&overflow, 1).unwrap_err(), SegmentError::Varint { at: 1 });
        // A kind above u16.
        let mut kind = vec![SEGMENT_FORMAT_V1, 0, 0, 0];
        put_varint(&mut kind, 70_000);
        assert_eq!(decode(&kind, 1).unwrap_err(), SegmentError::OutOfRange { field: "kind", at: 4 });
        // A body longer than what is left.
        let body = vec![SEGMENT_FORMAT_V1, 0, 0, 0, 1, 1, 5, 1, 2];
        assert!(matches!(decode(&body, 1).unwrap_err(), SegmentError::Truncated { .. }));
        // A huge body length never allocates or wraps.
        let mut huge = vec![SEGMENT_FORMAT_V1, 0, 0, 0, 1, 1];
        put_varint(&mut huge, u64::MAX);
        assert!(decode(&huge, 1).is_err());
    }

    #[test]
    fn out_of_order_times_and_extremes_round_trip() {
        let events = vec![
            Owned { wall: u64::MAX, logical: u32::MAX, time: 5_000, kind: 1, schema: 1, body: vec![1] },
            Owned { wall: 0, logical: 0, time: 1_000, kind: u16::MAX, schema: u16::MAX, body: vec![] },
            Owned { wall: 7, logical: 1, time: u64::MAX, kind: 3, schema: 1, body: vec![9; 300] },
        ];
        let mut encoder = encode(&events);
        assert_eq!(encoder.time_range(), (1_000, u64::MAX));
        let bytes = encoder.finish().to_vec();
        let decoded = decode(&bytes, 3).unwrap();
        assert_eq!(decoded, events.iter().map(raw).collect::<Vec<_>>());
    }

    #[test]
    fn a_segment_is_full_at_its_bounds() {
        let mut encoder = SegmentEncoder::new();
        let small = Owned { wall: 1, logical: 0, time: 1, kind: 1, schema: 1, body: vec![0; 10] };
        for _ in 0..SEGMENT_EVENTS_MAX - 1 {
            encoder.push(&raw(&small));
        }
        assert!(!encoder.is_full());
        encoder.push(&raw(&small));
        assert!(encoder.is_full());
        encoder.clear();
        assert!(encoder.is_empty() && !encoder.is_full());
        let big = Owned { body: vec![0; SEGMENT_BYTES_TARGET], ..small };
        encoder.push(&raw(&big));
        assert!(encoder.is_full());
    }
}
