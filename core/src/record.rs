//! `ReadingRecord`: a sensor reading as the firmware records it, with no heap.
//!
//! The firmware has no allocator, so it cannot build an owned [`crate::event::Event`]. It encodes
//! this borrowed record instead (postcard into a slice); the device agent decodes it and turns it
//! into an event of its own stream with [`ReadingRecord::to_event`]. The record's seq is the
//! firmware's own counter: the agent keeps it only to acknowledge the record back.

use serde::{Deserialize, Serialize};

use crate::event::{Hlc, Millis, Seq};

/// Largest encoded [`ReadingRecord`] (sensor and unit at their maximum lengths plus varints).
pub const READING_RECORD_BYTES_MAX: usize = 160;

/// Longest sensor name a record may carry, in bytes (the same bound as an event's).
pub const RECORD_SENSOR_BYTES_MAX: usize = 64;
/// Longest unit a record may carry, in bytes.
pub const RECORD_UNIT_BYTES_MAX: usize = 16;

/// One reading as the firmware logs it. Schema version 1; a new field means a new record type.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReadingRecord<'a> {
    /// The firmware's record counter (from 1, gap-free within one firmware log).
    pub seq: Seq,
    /// The firmware's hybrid logical clock when it sampled.
    pub hlc: Hlc,
    /// The RTC's time of the sample (ms since the Unix epoch; may be near 0 after an RTC reset).
    pub event_time: Millis,
    /// Which sensor, e.g. `"sht31.temperature"`.
    pub sensor: &'a str,
    /// The measured value.
    pub value: f64,
    /// The UCUM unit code, e.g. `"Cel"`.
    pub unit: &'a str,
}

/// Why a record could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The bytes are not a record (or the output buffer is too small).
    #[error("record codec: {0}")]
    Codec(postcard::Error),
    /// A text field is over its bound.
    #[error("record {field} is {len_bytes} bytes, at most {max_bytes} allowed")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len_bytes: usize,
        /// The bound.
        max_bytes: usize,
    },
}

impl<'a> ReadingRecord<'a> {
    /// Encodes the record into `buffer` and returns the used prefix.
    pub fn encode<'b>(&self, buffer: &'b mut [u8]) -> Result<&'b mut [u8], RecordError> {
        self.check()?;
        postcard::to_slice(self, buffer).map_err(RecordError::Codec)
    }

    /// Decodes a record that borrows its text from `bytes`.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, RecordError> {
        let record: ReadingRecord<'a> = postcard::from_bytes(bytes).map_err(RecordError::Codec)?;
        record.check()?;
        Ok(record)
    }

    fn check(&self) -> Result<(), RecordError> {
        if self.sensor.len() > RECORD_SENSOR_BYTES_MAX {
            return Err(RecordError::TooLong {
                field: "sensor",
                len_bytes: self.sensor.len(),
                max_bytes: RECORD_SENSOR_BYTES_MAX,
            });
        }
        if self.unit.len() > RECORD_UNIT_BYTES_MAX {
            return Err(RecordError::TooLong {
                field: "unit",
                len_bytes: self.unit.len(),
                max_bytes: RECORD_UNIT_BYTES_MAX,
            });
        }
        Ok(())
    }

    /// The reading as the payload of an event (the agent assigns the event's id and clock).
    #[cfg(feature = "alloc")]
    pub fn to_payload(&self) -> crate::event::Payload {
        crate::event::Payload::Reading(crate::event::SensorReading {
            sensor: self.sensor.into(),
            value: self.value,
            unit: self.unit.into(),
        })
    }
}
