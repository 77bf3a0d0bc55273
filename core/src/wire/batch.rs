//! `EventBatch`: a contiguous run of one device's events, and its compact encoding.
//!
//! A batch covers the seqs `from..=last`. Usually `from` is the first event's seq; when the device
//! dropped events (its storage was full under the `drop-oldest` policy) the batch starts with the
//! hole: seqs `from..first event` are declared dropped, and a `gap` event later in the stream says
//! why. So every ledger stays a contiguous run per device and a version vector describes it.
//!
//! Encoding (all integers LEB128, signed ones zigzag):
//! `device, from, first_event_seq - from, n_events, n_pairs, (sensor, unit) * n_pairs, row * n_events`.
//! A row is `hlc.wall_ms - previous row's wall_ms, hlc.logical, event_time - hlc.wall_ms, code, ...`:
//! - code `0x10 + k` (k in 0..=9): a reading whose value is exactly `int / 10^k`; then the
//!   (sensor, unit) pair index and `int` minus the previous int of that pair at the same scale;
//! - code `0x01`: a reading with a raw value; then the pair index and the f64 (8 bytes LE);
//! - code `0x02`: any other payload; then kind tag, schema version, body length and body.
//!
//! New row codes need a new protocol version; new kinds and versions always use code `0x02`, which
//! old readers keep as unknown payloads.
//!
//! After the rows, a batch may carry its [`BatchProof`] (see [`crate::auth`]) as a trailing
//! section, which readers that predate it ignore: `0xA1, prev (32 bytes), n_seals,
//! (seal seq - from, signature (64 bytes)) * n_seals, hole flag` where the flag is `0` for no hole
//! and `2` for a hole followed by `first, last, before (32 bytes), chain (32 bytes), signature (64
//! bytes)`. Flag `1` was a hole proof without `before`, never released; it is refused as
//! malformed (a proof that does not bind the chain before the hole must not verify). Any other
//! first byte is a newer trailer this build skips.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use super::codec::{put_str, put_varint, zigzag, Reader};
use crate::auth::{BatchProof, ChainHash, HoleProof, Seal, CHAIN_BYTES, SIGNATURE_BYTES};
use crate::event::{
    BodyError, DeviceId, Event, EventId, EventKind, Hlc, Millis, NameError, Payload, SensorReading, Seq,
};

/// Most events in one batch.
pub const BATCH_EVENTS_MAX: usize = 1024;

const CODE_READING_RAW: u8 = 0x01;
const CODE_OTHER: u8 = 0x02;
const CODE_READING_SCALED: u8 = 0x10;
const SCALE_MAX: u8 = 9;
const PROOF_TRAILER: u8 = 0xA1;
/// Hole flag of a proof without a hole.
const HOLE_NONE: u8 = 0;
/// Hole flag of a hole proof that binds the chain before the hole (`before`).
const HOLE_WITH_BEFORE: u8 = 2;
const POW10: [f64; 10] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
/// Integers beyond this lose precision as f64.
const EXACT_INT_MAX: f64 = 9_007_199_254_740_992.0;

/// A contiguous run of one device's events, possibly starting with a declared hole.
#[derive(Clone, Debug, PartialEq)]
pub struct EventBatch {
    /// Whose events.
    pub device: DeviceId,
    /// First seq the batch covers. Seqs before the first event's are declared dropped.
    pub from: Seq,
    /// The events, seqs contiguous, all of `device`. Never empty.
    pub events: Vec<Event>,
    /// The device's signatures over the batch, if the sender has them (see [`crate::auth`]).
    pub proof: Option<BatchProof>,
}

/// Why a batch is invalid or its bytes do not decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The input ends early.
    #[error("input ends at byte {offset}")]
    Truncated {
        /// Where.
        offset: usize,
    },
    /// An overlong or overflowing varint.
    #[error("malformed varint at byte {offset}")]
    Varint {
        /// Where.
        offset: usize,
    },
    /// Text that is not UTF-8.
    #[error("text at byte {offset} is not UTF-8")]
    Utf8 {
        /// Where.
        offset: usize,
    },
    /// The device name is invalid.
    #[error("device name: {0}")]
    DeviceName(#[from] NameError),
    /// No events, or more than [`BATCH_EVENTS_MAX`].
    #[error("batch has {n_events} events; allowed are 1 to {BATCH_EVENTS_MAX}")]
    EventCount {
        /// The count.
        n_events: u64,
    },
    /// More (sensor, unit) pairs than events.
    #[error("batch declares {n_pairs} sensor pairs for {n_events} events")]
    PairCount {
        /// Declared pairs.
        n_pairs: u64,
        /// Events.
        n_events: u64,
    },
    /// A row names a pair that does not exist.
    #[error("row {row} names sensor pair {index} of {n_pairs}")]
    PairIndex {
        /// Which row.
        row: usize,
        /// The index.
        index: u64,
        /// How many pairs there are.
        n_pairs: usize,
    },
    /// A row code this build does not know.
    #[error("row {row} has unknown code {code:#04x}")]
    RowCode {
        /// Which row.
        row: usize,
        /// The code.
        code: u8,
    },
    /// Seq 0, or seqs beyond `u64::MAX`.
    #[error("batch seqs are out of range")]
    SeqRange,
    /// An event of another device, or seqs that are not contiguous (when building a batch).
    #[error("event {id} does not continue the batch at seq {expected}")]
    NotContiguous {
        /// The seq expected next.
        expected: Seq,
        /// The event that broke the run.
        id: EventId,
    },
    /// The batch's `from` is after its first event.
    #[error("batch from {from} is after its first event {first}")]
    FromAfterFirst {
        /// `from`.
        from: Seq,
        /// First event's seq.
        first: Seq,
    },
    /// A kind tag or schema version out of range.
    #[error("row {row} has kind or schema version out of range")]
    KindRange {
        /// Which row.
        row: usize,
    },
    /// The proof section is malformed.
    #[error("malformed batch proof at byte {offset}")]
    Proof {
        /// Where.
        offset: usize,
    },
    /// A known payload whose body does not match its schema.
    #[error("row {row}: {source}")]
    Body {
        /// Which row.
        row: usize,
        /// Why.
        #[source]
        source: BodyError,
    },
}

impl EventBatch {
    /// A batch of `events`, checked: non-empty, at most [`BATCH_EVENTS_MAX`], all of `device`,
    /// seqs contiguous, and `from` (>= 1) not after the first.
    pub fn new(device: DeviceId, from: Seq, events: Vec<Event>) -> Result<Self, BatchError> {
        let batch = Self { device, from, events, proof: None };
        batch.validate()?;
        Ok(batch)
    }

    /// Checks the invariants listed on [`EventBatch::new`].
    pub fn validate(&self) -> Result<(), BatchError> {
        if self.events.is_empty() || self.events.len() > BATCH_EVENTS_MAX {
            return Err(BatchError::EventCount { n_events: self.events.len() as u64 });
        }
        if self.from == Seq::ZERO {
            return Err(BatchError::SeqRange);
        }
        let first = self.events[0].id.seq;
        if self.from > first {
            return Err(BatchError::FromAfterFirst { from: self.from, first });
        }
        let mut expected = first;
        for event in &self.events {
            if event.id.device != self.device || event.id.seq != expected {
                return Err(BatchError::NotContiguous { expected, id: event.id });
            }
            expected = Seq(expected.0.checked_add(1).ok_or(BatchError::SeqRange)?);
        }
        Ok(())
    }

    /// Seq of the first event.
    pub fn first_seq(&self) -> Seq {
        self.events.first().map_or(self.from, |event| event.id.seq)
    }

    /// Seq of the last event: the batch covers `from..=last_seq()`.
    pub fn last_seq(&self) -> Seq {
        self.events.last().map_or(self.from, |event| event.id.seq)
    }

    /// The seqs this batch declares dropped, if it starts with a hole.
    pub fn dropped(&self) -> Option<(Seq, Seq)> {
        let first = self.first_seq();
        (self.from < first).then(|| (self.from, Seq(first.0 - 1)))
    }

    /// The batch without the part a receiver holding up to `held` already has, or `None` if it
    /// has all of it. A declared hole is trimmed the same way. A proof stays valid: its `prev`
    /// moves past the trimmed events (the chain is a function of them) and seals on trimmed seqs
    /// go.
    pub fn after(&self, held: Seq) -> Option<EventBatch> {
        if self.last_seq() <= held {
            return None;
        }
        if self.from > held {
            return Some(self.clone());
        }
        let (skipped, kept): (Vec<&Event>, Vec<&Event>) = self.events.iter().partition(|event| event.id.seq <= held);
        let from = held.next().max(self.from);
        let proof = self.proof.as_ref().map(|proof| {
            let first_kept = kept.first().map_or(from, |event| event.id.seq);
            BatchProof {
                prev: proof.prev.over(skipped.iter().copied()),
                seals: proof.seals.iter().filter(|seal| seal.seq > held).copied().collect(),
                hole: proof.hole.filter(|_| from < first_kept),
            }
        });
        Some(EventBatch { device: self.device, from, events: kept.into_iter().cloned().collect(), proof })
    }

    /// Shortens the batch to at most `max_events` events. A sealed batch is cut only right after a
    /// seal, so it stays verifiable; returns `false` (and leaves it as it is) if no seal falls
    /// within the first `max_events` events.
    pub fn truncate_sealed(&mut self, max_events: usize) -> bool {
        let max_events = max_events.max(1);
        if self.events.len() <= max_events {
            return true;
        }
        let keep = match &self.proof {
            None => max_events,
            Some(proof) => {
                let first = self.first_seq().0;
                let cut = proof.seals.iter().rev().map(|seal| seal.seq.0 - first + 1).find(|n| *n <= max_events as u64);
                match cut {
                    Some(n) => n as usize,
                    None => return false,
                }
            }
        };
        self.events.truncate(keep);
        let last = self.last_seq();
        if let Some(proof) = &mut self.proof {
            proof.seals.retain(|seal| seal.seq <= last);
        }
        true
    }

    /// Bytes of [`EventBatch::encode`]'s output, exactly (encodes into a scratch buffer).
    pub fn encoded_len(&self) -> usize {
        let mut out = Vec::new();
        self.encode(&mut out);
        out.len()
    }

    /// An upper bound of [`EventBatch::encoded_len`] that costs no encoding: a sender checks
    /// the frame limit with it and encodes only when the bound is too large to decide.
    pub fn encoded_len_bound(&self) -> usize {
        // Name, from, first - from, counts: a name is at most 64 bytes, varints at most 10.
        let header = 1 + crate::event::NAME_BYTES_MAX + 4 * 10;
        let rows: usize = self
            .events
            .iter()
            .map(|event| {
                // Clock deltas and the code, then the payload.
                let clock = 10 + 5 + 10 + 1;
                clock
                    + match &event.payload {
                        // Pair index, value, and the pair's dictionary entry counted every time.
                        Payload::Reading(reading) => 10 + 10 + 2 + reading.sensor.len() + reading.unit.len(),
                        // Kind, version and length varints; recorded bodies are at most this big.
                        _ => 3 + 3 + 5 + crate::event::PAYLOAD_BYTES_MAX,
                    }
            })
            .sum();
        let proof = self.proof.as_ref().map_or(0, |proof| {
            1 + CHAIN_BYTES
                + 10
                + proof.seals.len() * (10 + SIGNATURE_BYTES)
                + 1
                + 20
                + 2 * CHAIN_BYTES
                + SIGNATURE_BYTES
        });
        header + rows + proof
    }

    /// Appends the compact encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, self.device.as_str());
        put_varint(out, self.from.0);
        put_varint(out, self.first_seq().0 - self.from.0);
        put_varint(out, self.events.len() as u64);

        // Each reading's (sensor, unit) pair index, found once; runs of one sensor skip the map.
        let mut pair_index: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        let mut row_pairs: Vec<u64> = Vec::with_capacity(self.events.len());
        let mut last_pair: Option<((&str, &str), u64)> = None;
        for event in &self.events {
            if let Payload::Reading(reading) = &event.payload {
                let key = (reading.sensor.as_str(), reading.unit.as_str());
                let index = match last_pair {
                    Some((last_key, index)) if last_key == key => index,
                    _ => *pair_index.entry(key).or_insert_with(|| {
                        pairs.push(key);
                        (pairs.len() - 1) as u64
                    }),
                };
                last_pair = Some((key, index));
                row_pairs.push(index);
            }
        }
        let mut row_pairs = row_pairs.into_iter();
        put_varint(out, pairs.len() as u64);
        for (sensor, unit) in &pairs {
            put_str(out, sensor);
            put_str(out, unit);
        }

        let mut previous_wall_ms: u64 = 0;
        let mut previous_scaled: Vec<Option<(u8, i64)>> = alloc::vec![None; pairs.len()];
        for event in &self.events {
            put_varint(out, zigzag(event.hlc.wall_ms.wrapping_sub(previous_wall_ms) as i64));
            previous_wall_ms = event.hlc.wall_ms;
            put_varint(out, u64::from(event.hlc.logical));
            put_varint(out, zigzag(event.event_time.0.wrapping_sub(event.hlc.wall_ms) as i64));
            match &event.payload {
                Payload::Reading(reading) => {
                    // One index was pushed per reading above, in the same order.
                    let index = row_pairs.next().unwrap_or_default();
                    let previous = &mut previous_scaled[index as usize];
                    let hint = previous.map_or(0, |(scale, _)| scale);
                    match decimal_scale(reading.value, hint) {
                        Some((scale, int)) => {
                            out.push(CODE_READING_SCALED + scale);
                            put_varint(out, index);
                            let base = match previous {
                                Some((previous_scale, previous_int)) if *previous_scale == scale => *previous_int,
                                _ => 0,
                            };
                            put_varint(out, zigzag(int.wrapping_sub(base)));
                            *previous = Some((scale, int));
                        }
                        None => {
                            out.push(CODE_READING_RAW);
                            put_varint(out, index);
                            out.extend_from_slice(&reading.value.to_le_bytes());
                        }
                    }
                }
                payload => {
                    out.push(CODE_OTHER);
                    put_varint(out, u64::from(payload.kind().tag()));
                    put_varint(out, u64::from(payload.schema_version()));
                    let mut body = Vec::new();
                    payload.encode_body(&mut body);
                    put_varint(out, body.len() as u64);
                    out.extend_from_slice(&body);
                }
            }
        }
        if let Some(proof) = &self.proof {
            encode_proof(proof, self.from, out);
        }
    }

    /// Decodes a batch from its compact encoding. Never panics; allocates at most in proportion
    /// to the input.
    pub fn decode(bytes: &[u8]) -> Result<Self, BatchError> {
        let mut reader = Reader::new(bytes);
        let device = DeviceId::new(reader.str()?)?;
        let from = Seq(reader.varint()?);
        let first = Seq(from.0.checked_add(reader.varint()?).ok_or(BatchError::SeqRange)?);
        let n_events = reader.varint()?;
        if n_events == 0 || n_events > BATCH_EVENTS_MAX as u64 {
            return Err(BatchError::EventCount { n_events });
        }
        if from == Seq::ZERO || first.0.checked_add(n_events - 1).is_none() {
            return Err(BatchError::SeqRange);
        }
        // Every row takes at least 4 bytes, so a count the input cannot hold is refused before
        // anything is allocated for it.
        if n_events.saturating_mul(4) > reader.remaining() as u64 {
            return Err(BatchError::Truncated { offset: reader.offset() });
        }
        let n_pairs = reader.varint()?;
        if n_pairs > n_events {
            return Err(BatchError::PairCount { n_pairs, n_events });
        }
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(n_pairs as usize);
        for _ in 0..n_pairs {
            pairs.push((reader.str()?, reader.str()?));
        }

        let mut events = Vec::with_capacity(n_events as usize);
        let mut previous_wall_ms: u64 = 0;
        let mut previous_scaled: Vec<Option<(u8, i64)>> = alloc::vec![None; pairs.len()];
        for row in 0..n_events as usize {
            let wall_ms = previous_wall_ms.wrapping_add(reader.zigzag()? as u64);
            previous_wall_ms = wall_ms;
            let logical =
                u32::try_from(reader.varint()?).map_err(|_| BatchError::Varint { offset: reader.offset() })?;
            let event_time = Millis(wall_ms.wrapping_add(reader.zigzag()? as u64));
            let code = reader.u8()?;
            let payload = match code {
                CODE_READING_RAW => {
                    let index = pair(&mut reader, row, pairs.len())?;
                    let value = reader.f64()?;
                    reading(pairs[index], value)
                }
                CODE_READING_SCALED..=0x19 => {
                    let scale = code - CODE_READING_SCALED;
                    let index = pair(&mut reader, row, pairs.len())?;
                    let delta = reader.zigzag()?;
                    let previous = &mut previous_scaled[index];
                    let base = match previous {
                        Some((previous_scale, previous_int)) if *previous_scale == scale => *previous_int,
                        _ => 0,
                    };
                    let int = base.wrapping_add(delta);
                    *previous = Some((scale, int));
                    reading(pairs[index], int as f64 / POW10[usize::from(scale)])
                }
                CODE_OTHER => {
                    let kind = u16::try_from(reader.varint()?).map_err(|_| BatchError::KindRange { row })?;
                    let schema_version = u16::try_from(reader.varint()?).map_err(|_| BatchError::KindRange { row })?;
                    let len = reader.len_within_input()?;
                    let body = reader.bytes(len)?;
                    Payload::decode_body(EventKind::from_tag(kind), schema_version, body)
                        .map_err(|source| BatchError::Body { row, source })?
                }
                code => return Err(BatchError::RowCode { row, code }),
            };
            events.push(Event {
                id: EventId { device, seq: Seq(first.0 + row as u64) },
                hlc: Hlc { wall_ms, logical },
                event_time,
                payload,
            });
        }
        let last = Seq(first.0 + n_events - 1);
        let proof = if reader.remaining() > 0 && reader.peek() == Some(PROOF_TRAILER) {
            reader.u8()?;
            Some(decode_proof(&mut reader, from, last)?)
        } else {
            // Nothing, or a trailer from a newer build: ignored, as the compatibility rules say.
            None
        };
        Ok(EventBatch { device, from, events, proof })
    }
}

fn encode_proof(proof: &BatchProof, from: Seq, out: &mut Vec<u8>) {
    out.push(PROOF_TRAILER);
    out.extend_from_slice(&proof.prev.0);
    put_varint(out, proof.seals.len() as u64);
    for seal in &proof.seals {
        put_varint(out, seal.seq.0.saturating_sub(from.0));
        out.extend_from_slice(&seal.signature);
    }
    match &proof.hole {
        None => out.push(HOLE_NONE),
        Some(hole) => {
            out.push(HOLE_WITH_BEFORE);
            put_varint(out, hole.first.0);
            put_varint(out, hole.last.0);
            out.extend_from_slice(&hole.before.0);
            out.extend_from_slice(&hole.chain.0);
            out.extend_from_slice(&hole.signature);
        }
    }
}

fn decode_proof(reader: &mut Reader<'_>, from: Seq, last: Seq) -> Result<BatchProof, BatchError> {
    let prev = ChainHash(array(reader)?);
    let n_seals = reader.varint()?;
    // A seal takes at least 65 bytes and at most one falls on each seq: refuse counts the input
    // or the batch cannot hold before allocating for them.
    let span = last.0 - from.0 + 1;
    if n_seals > span || n_seals.saturating_mul(1 + SIGNATURE_BYTES as u64) > reader.remaining() as u64 {
        return Err(BatchError::Proof { offset: reader.offset() });
    }
    let mut seals = Vec::with_capacity(n_seals as usize);
    for _ in 0..n_seals {
        let offset = reader.offset();
        let seq =
            from.0.checked_add(reader.varint()?).filter(|seq| *seq <= last.0).ok_or(BatchError::Proof { offset })?;
        seals.push(Seal { seq: Seq(seq), signature: array(reader)? });
    }
    // Fixed-size fields only: nothing here allocates.
    let hole = match reader.u8()? {
        HOLE_NONE => None,
        HOLE_WITH_BEFORE => Some(HoleProof {
            first: Seq(reader.varint()?),
            last: Seq(reader.varint()?),
            before: ChainHash(array(reader)?),
            chain: ChainHash(array(reader)?),
            signature: array(reader)?,
        }),
        _ => return Err(BatchError::Proof { offset: reader.offset() - 1 }),
    };
    Ok(BatchProof { prev, seals, hole })
}

fn array<const N: usize>(reader: &mut Reader<'_>) -> Result<[u8; N], BatchError> {
    let mut out = [0u8; N];
    out.copy_from_slice(reader.bytes(N)?);
    Ok(out)
}

const _: () = assert!(CHAIN_BYTES == 32 && SIGNATURE_BYTES == 64);

fn pair(reader: &mut Reader<'_>, row: usize, n_pairs: usize) -> Result<usize, BatchError> {
    let index = reader.varint()?;
    if index >= n_pairs as u64 {
        return Err(BatchError::PairIndex { row, index, n_pairs });
    }
    Ok(index as usize)
}

fn reading((sensor, unit): (&str, &str), value: f64) -> Payload {
    Payload::Reading(SensorReading { sensor: String::from(sensor), value, unit: String::from(unit) })
}

/// The smallest `k` with `value == int / 10^k` exactly (bit for bit), if there is one in 0..=9.
/// Sensors report at a fixed decimal resolution, so consecutive readings then differ by small
/// integers that take a byte or two instead of eight.
/// `hint` is the scale tried first: the previous reading's of the same sensor. Keeping a run at
/// one scale keeps its deltas small (a change of scale restarts from an absolute value), and a
/// sensor keeps its resolution, so the first try usually succeeds. The choice depends only on
/// the batch's own content, so encoding stays a pure function of the batch.
fn decimal_scale(value: f64, hint: u8) -> Option<(u8, i64)> {
    if !value.is_finite() {
        return None;
    }
    if let Some(int) = scaled_int(value, hint.min(SCALE_MAX)) {
        return Some((hint.min(SCALE_MAX), int));
    }
    (0..=SCALE_MAX).find_map(|scale| scaled_int(value, scale).map(|int| (scale, int)))
}

/// `int` with `value == int / 10^scale` exactly, if there is one.
fn scaled_int(value: f64, scale: u8) -> Option<i64> {
    let scaled = value * POW10[usize::from(scale)];
    if !(-EXACT_INT_MAX..=EXACT_INT_MAX).contains(&scaled) {
        return None;
    }
    // Round half away from zero without `f64::round`, which core lacks; the exactness check
    // below makes any candidate safe.
    let int = if scaled >= 0.0 { (scaled + 0.5) as i64 } else { (scaled - 0.5) as i64 };
    (((int as f64) / POW10[usize::from(scale)]).to_bits() == value.to_bits()).then_some(int)
}
