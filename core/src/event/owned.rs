//! Owned events and their payload kinds: one typed schema per kind, each with its own version.
//!
//! On the wire and in ledgers a payload travels as `(kind tag, schema version, body bytes)`: the
//! body is the postcard encoding of that kind's struct at that version. A reader that does not
//! know a kind or a version keeps the bytes as [`Payload::Unknown`] and relays them untouched, so
//! a gateway running an older build never drops or rewrites a newer device's events.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use super::{EventId, Hlc, Millis, Seq};
use crate::value::Value;

/// Largest encoded payload body a device may record, in bytes. Events are small facts; bulk data
/// belongs elsewhere.
pub const PAYLOAD_BYTES_MAX: usize = 16 * 1024;
/// Longest sensor name, in bytes.
pub const SENSOR_NAME_BYTES_MAX: usize = 64;
/// Longest unit code, in bytes.
pub const UNIT_BYTES_MAX: usize = 16;
/// Longest content type of an application payload, in bytes.
pub const CONTENT_TYPE_BYTES_MAX: usize = 127;

/// An immutable fact recorded by a device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `(device, seq)`: unique, made at the source.
    pub id: EventId,
    /// The device's hybrid logical clock when it recorded the event.
    pub hlc: Hlc,
    /// When the fact happened according to the sensor's clock (ms since the Unix epoch, UTC).
    pub event_time: Millis,
    /// What happened. The kind and schema version are derived from it (see [`Event::kind`]),
    /// so they can never disagree with the payload.
    pub payload: Payload,
}

impl Event {
    /// The kind of this event.
    pub fn kind(&self) -> EventKind {
        self.payload.kind()
    }

    /// The schema version of this event's payload.
    pub fn schema_version(&self) -> u16 {
        self.payload.schema_version()
    }
}

/// The kinds of events. Tags are stable forever; a new kind takes a new tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EventKind {
    /// A sensor reading ([`SensorReading`]).
    Reading,
    /// The device's reported shadow after a change ([`ShadowReported`]).
    ShadowReported,
    /// A device log line ([`LogLine`]).
    Log,
    /// Seqs the device had to drop ([`Gap`]).
    Gap,
    /// An opaque application payload ([`AppPayload`]).
    App,
    /// A kind this build does not know, by tag.
    Unknown(u16),
}

impl EventKind {
    /// The stable numeric tag of the kind.
    pub fn tag(self) -> u16 {
        match self {
            EventKind::Reading => 1,
            EventKind::ShadowReported => 2,
            EventKind::Log => 3,
            EventKind::Gap => 4,
            EventKind::App => 5,
            EventKind::Unknown(tag) => tag,
        }
    }

    /// The kind with tag `tag`.
    pub fn from_tag(tag: u16) -> EventKind {
        match tag {
            1 => EventKind::Reading,
            2 => EventKind::ShadowReported,
            3 => EventKind::Log,
            4 => EventKind::Gap,
            5 => EventKind::App,
            other => EventKind::Unknown(other),
        }
    }

    /// A short lowercase name, for logs, metrics and JSON.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Reading => "reading",
            EventKind::ShadowReported => "shadow_reported",
            EventKind::Log => "log",
            EventKind::Gap => "gap",
            EventKind::App => "app",
            EventKind::Unknown(_) => "unknown",
        }
    }
}

/// The payload of an event: one variant per kind, each its own schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Payload {
    /// Kind `reading`, schema version 1.
    Reading(SensorReading),
    /// Kind `shadow_reported`, schema version 1.
    ShadowReported(ShadowReported),
    /// Kind `log`, schema version 1.
    Log(LogLine),
    /// Kind `gap`, schema version 1.
    Gap(Gap),
    /// Kind `app`, schema version 1.
    App(AppPayload),
    /// A kind or schema version this build cannot read, kept byte for byte.
    Unknown(UnknownPayload),
}

/// Emitted when a sensor was sampled. Schema version 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SensorReading {
    /// Which sensor on the device, e.g. `"sht31.temperature"`: 1 to 64 bytes.
    pub sensor: String,
    /// The measured value in `unit`; finite.
    pub value: f64,
    /// The unit as a UCUM code, e.g. `"Cel"`, `"%"`, `"hPa"`: at most 16 bytes, may be empty for
    /// dimensionless counts.
    pub unit: String,
}

/// Emitted when the device changed its reported shadow: the whole `reported` section after the
/// change (an entity event: the last one per device is the device's reported state). Version 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShadowReported {
    /// The full reported section, a [`Value::Map`].
    pub reported: Value,
}

/// Emitted when the device agent or firmware logs something worth keeping upstream. Version 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// Severity.
    pub level: LogLevel,
    /// The message, UTF-8.
    pub message: String,
}

/// Severity of a [`LogLine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LogLevel {
    /// Something failed.
    Error,
    /// Something is wrong but work goes on.
    Warn,
    /// Normal operation worth recording.
    Info,
    /// Detail for diagnosis.
    Debug,
}

/// Emitted when the device had to drop events it could not keep (storage full under the
/// `drop-oldest` policy, or a firmware log that overflowed). Says exactly which seqs are gone, so
/// the cloud can show the hole instead of silently missing data. Version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// First dropped seq.
    pub first: Seq,
    /// Last dropped seq (inclusive).
    pub last: Seq,
    /// Why they were dropped.
    pub reason: GapReason,
}

/// Why a [`Gap`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GapReason {
    /// The device ledger hit its byte budget with only unacknowledged events left.
    StorageFull,
    /// The firmware's flash log was full before the device agent collected it.
    FirmwareLogFull,
}

/// Emitted by an application for data tidesync does not interpret. Version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppPayload {
    /// A media type such as `application/cbor`: 1 to 127 bytes.
    pub content_type: String,
    /// The opaque bytes.
    #[serde(with = "crate::exact_bytes")]
    pub data: Vec<u8>,
}

/// A payload of a kind or schema version this build cannot read, kept byte for byte so that it
/// can be stored and relayed unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnknownPayload {
    /// The kind tag.
    pub kind: u16,
    /// The schema version.
    pub schema_version: u16,
    /// The body, as its writer encoded it.
    #[serde(with = "crate::exact_bytes")]
    pub body: Vec<u8>,
}

/// Why an event may not be recorded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// A text field is empty or too long.
    #[error("{field} is {len_bytes} bytes; allowed are {min_bytes} to {max_bytes}")]
    FieldLength {
        /// Which field.
        field: &'static str,
        /// Its length.
        len_bytes: usize,
        /// Shortest allowed.
        min_bytes: usize,
        /// Longest allowed.
        max_bytes: usize,
    },
    /// A reading's value is NaN or infinite.
    #[error("reading value {value} is not finite")]
    NotFinite {
        /// The refused value.
        value: f64,
    },
    /// A gap's range is empty or reversed.
    #[error("gap {first}..={last} is not a range")]
    GapRange {
        /// First seq.
        first: Seq,
        /// Last seq.
        last: Seq,
    },
    /// The encoded payload is larger than [`PAYLOAD_BYTES_MAX`].
    #[error("payload is {len_bytes} bytes encoded, the maximum is {max_bytes}")]
    TooLarge {
        /// Encoded length.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// A shadow-reported payload is not a map.
    #[error("reported shadow must be a map")]
    ReportedNotMap,
    /// Unknown payloads are relayed, never recorded.
    #[error("a device cannot record a payload of unknown kind {kind}")]
    UnknownKind {
        /// The kind tag.
        kind: u16,
    },
}

/// Why a payload body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?} body (schema version {schema_version}) does not decode: {reason}")]
pub struct BodyError {
    /// The kind whose body failed.
    pub kind: EventKind,
    /// Its schema version.
    pub schema_version: u16,
    /// What postcard said.
    pub reason: postcard::Error,
}

fn check_len(field: &'static str, text: &str, min_bytes: usize, max_bytes: usize) -> Result<(), EventError> {
    if text.len() < min_bytes || text.len() > max_bytes {
        return Err(EventError::FieldLength { field, len_bytes: text.len(), min_bytes, max_bytes });
    }
    Ok(())
}

impl Payload {
    /// The kind of this payload.
    pub fn kind(&self) -> EventKind {
        match self {
            Payload::Reading(_) => EventKind::Reading,
            Payload::ShadowReported(_) => EventKind::ShadowReported,
            Payload::Log(_) => EventKind::Log,
            Payload::Gap(_) => EventKind::Gap,
            Payload::App(_) => EventKind::App,
            Payload::Unknown(unknown) => EventKind::Unknown(unknown.kind),
        }
    }

    /// The schema version this payload is written in.
    pub fn schema_version(&self) -> u16 {
        match self {
            Payload::Unknown(unknown) => unknown.schema_version,
            _ => 1,
        }
    }

    /// Checks the payload against its schema's bounds before a device records it.
    pub fn validate(&self) -> Result<(), EventError> {
        match self {
            Payload::Reading(reading) => {
                check_len("sensor", &reading.sensor, 1, SENSOR_NAME_BYTES_MAX)?;
                check_len("unit", &reading.unit, 0, UNIT_BYTES_MAX)?;
                if !reading.value.is_finite() {
                    return Err(EventError::NotFinite { value: reading.value });
                }
            }
            Payload::ShadowReported(shadow) => {
                if !matches!(shadow.reported, Value::Map(_)) {
                    return Err(EventError::ReportedNotMap);
                }
            }
            Payload::Log(line) => check_len("message", &line.message, 0, PAYLOAD_BYTES_MAX)?,
            Payload::Gap(gap) => {
                if gap.first == Seq::ZERO || gap.last < gap.first {
                    return Err(EventError::GapRange { first: gap.first, last: gap.last });
                }
            }
            Payload::App(app) => check_len("content_type", &app.content_type, 1, CONTENT_TYPE_BYTES_MAX)?,
            Payload::Unknown(unknown) => return Err(EventError::UnknownKind { kind: unknown.kind }),
        }
        let len_bytes = self.encoded_body_len();
        if len_bytes > PAYLOAD_BYTES_MAX {
            return Err(EventError::TooLarge { len_bytes, max_bytes: PAYLOAD_BYTES_MAX });
        }
        Ok(())
    }

    /// Appends the body's bytes (the kind's schema, postcard-encoded) to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Reading(body) => put_postcard(out, body),
            Payload::ShadowReported(body) => put_postcard(out, body),
            Payload::Log(body) => put_postcard(out, body),
            Payload::Gap(body) => put_postcard(out, body),
            Payload::App(body) => put_postcard(out, body),
            Payload::Unknown(unknown) => out.extend_from_slice(&unknown.body),
        }
    }

    /// The length of [`Payload::encode_body`]'s output.
    pub fn encoded_body_len(&self) -> usize {
        let mut out = Vec::new();
        self.encode_body(&mut out);
        out.len()
    }

    /// Decodes a body written as `kind` at `schema_version`. Kinds and versions this build does
    /// not know become [`Payload::Unknown`]; a known kind whose bytes do not match its schema is
    /// an error. Trailing bytes after a known body are ignored: a newer minor writer may append
    /// fields that this reader does not know.
    pub fn decode_body(kind: EventKind, schema_version: u16, body: &[u8]) -> Result<Payload, BodyError> {
        let error = |reason| BodyError { kind, schema_version, reason };
        let payload = match (kind, schema_version) {
            (EventKind::Reading, 1) => Payload::Reading(postcard::from_bytes(body).map_err(error)?),
            (EventKind::ShadowReported, 1) => Payload::ShadowReported(postcard::from_bytes(body).map_err(error)?),
            (EventKind::Log, 1) => Payload::Log(postcard::from_bytes(body).map_err(error)?),
            (EventKind::Gap, 1) => Payload::Gap(postcard::from_bytes(body).map_err(error)?),
            (EventKind::App, 1) => Payload::App(postcard::from_bytes(body).map_err(error)?),
            _ => Payload::Unknown(UnknownPayload { kind: kind.tag(), schema_version, body: body.to_vec() }),
        };
        Ok(payload)
    }
}

/// Appends the postcard encoding of `value` to `out`. Serializing into a `Vec` cannot fail for
/// tidesync's types: postcard fails only on a full buffer or on unsupported serde features.
pub(crate) fn put_postcard<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    let buffer = core::mem::take(out);
    let start = buffer.len();
    match postcard::to_extend(value, buffer) {
        Ok(buffer) => *out = buffer,
        Err(error) => debug_assert!(false, "postcard failed into a Vec after {start} bytes: {error}"),
    }
}
