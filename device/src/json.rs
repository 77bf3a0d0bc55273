//! JSON lines in and out: the input format of `tidesync-device record` and the output format of
//! `tidesync-device export`.
//!
//! Input, one object per line; `kind` defaults to `reading`, `event_time_ms` (ms since the Unix
//! epoch, UTC) to the time the line is read:
//! `{"sensor": "temp", "value": 21.5, "unit": "Cel"}`,
//! `{"kind": "log", "level": "warn", "message": "fan slow"}`,
//! `{"kind": "app", "content_type": "text/plain", "data": "hello"}` (data as UTF-8 text).
//! Gap and shadow-reported events are made by the agent itself, never read from input.

use serde::Deserialize;
use tidesync_core::event::{AppPayload, Event, LogLevel, LogLine, Millis, Payload, SensorReading};

use crate::store::NewEvent;

/// Why an input line is not a recordable event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// Not JSON, or not an object of a known kind with the right fields.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// The line is JSON but not an object.
    #[error("expected a JSON object")]
    NotAnObject,
    /// The event breaks its schema's bounds.
    #[error("{0}")]
    Invalid(#[from] crate::error::StoreError),
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum InputLine {
    Reading {
        sensor: String,
        value: f64,
        #[serde(default)]
        unit: String,
        event_time_ms: Option<u64>,
    },
    Log {
        level: InputLevel,
        message: String,
        event_time_ms: Option<u64>,
    },
    App {
        content_type: String,
        data: String,
        event_time_ms: Option<u64>,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum InputLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// Parses and validates one input line into an event ready for the ledger; `now` is the event
/// time when the line has none.
pub fn parse_line(line: &str, now: Millis) -> Result<NewEvent, LineError> {
    let mut object = match serde_json::from_str::<serde_json::Value>(line)? {
        serde_json::Value::Object(object) => object,
        _ => return Err(LineError::NotAnObject),
    };
    object.entry("kind").or_insert_with(|| serde_json::Value::from("reading"));
    let input: InputLine = serde_json::from_value(serde_json::Value::Object(object))?;
    let (payload, event_time_ms) = match input {
        InputLine::Reading { sensor, value, unit, event_time_ms } => {
            (Payload::Reading(SensorReading { sensor, value, unit }), event_time_ms)
        }
        InputLine::Log { level, message, event_time_ms } => {
            let level = match level {
                InputLevel::Error => LogLevel::Error,
                InputLevel::Warn => LogLevel::Warn,
                InputLevel::Info => LogLevel::Info,
                InputLevel::Debug => LogLevel::Debug,
            };
            (Payload::Log(LogLine { level, message }), event_time_ms)
        }
        InputLine::App { content_type, data, event_time_ms } => {
            (Payload::App(AppPayload { content_type, data: data.into_bytes() }), event_time_ms)
        }
    };
    Ok(NewEvent::new(event_time_ms.map_or(now, Millis), &payload)?)
}

/// An event as one JSON object, for `export`.
pub fn event_to_json(event: &Event) -> serde_json::Value {
    serde_json::json!({
        "device": event.id.device.as_str(),
        "seq": event.id.seq.0,
        "hlc": { "wall_ms": event.hlc.wall_ms, "logical": event.hlc.logical },
        "event_time_ms": event.event_time.0,
        "kind": event.kind().name(),
        "schema_version": event.schema_version(),
        "payload": payload_to_json(&event.payload),
    })
}

fn payload_to_json(payload: &Payload) -> serde_json::Value {
    match payload {
        Payload::Reading(reading) => serde_json::json!({
            "sensor": reading.sensor, "value": reading.value, "unit": reading.unit,
        }),
        Payload::ShadowReported(shadow) => serde_json::json!({ "reported": shadow.reported.to_json() }),
        Payload::Log(line) => serde_json::json!({
            "level": format!("{:?}", line.level).to_lowercase(), "message": line.message,
        }),
        Payload::Gap(gap) => serde_json::json!({
            "first": gap.first.0, "last": gap.last.0, "reason": format!("{:?}", gap.reason),
        }),
        Payload::App(app) => serde_json::json!({
            "content_type": app.content_type, "data_hex": hex(&app.data),
        }),
        Payload::Unknown(unknown) => serde_json::json!({
            "kind_tag": unknown.kind, "schema_version": unknown.schema_version, "body_hex": hex(&unknown.body),
        }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests;
