//! The built-in projections: latest reading per device and sensor, per-minute and per-hour
//! aggregates, device presence, gaps, and threshold alerts.
//!
//! Keys are `device|sensor|...` with zero-padded numbers, so a prefix lists a device (or a
//! sensor) in order. Aggregates are keyed by the bucket of the *event time*, so late and
//! out-of-order events land in the bucket they belong to; count, min, max and sum commute, and
//! the sum is taken in position order, so a rebuild gives the same bits.
//!
//! Rows that exist are changed field by field in place ([`Rows::get_mut`]): most events only move
//! a few numbers, and rebuilding the whole JSON object per event was most of a fold's cost.

use serde::Deserialize;
use serde_json::json;
use tidesync_core::event::{Payload, SensorReading};

use super::{ApplyError, Projection, Rows};
use crate::store::StoredEvent;

/// Name of the latest-reading projection.
pub const LATEST: &str = "latest";
/// Name of the per-minute aggregates.
pub const MINUTE: &str = "minute";
/// Name of the per-hour aggregates.
pub const HOUR: &str = "hour";
/// Name of the presence projection.
pub const PRESENCE: &str = "presence";
/// Name of the gaps projection.
pub const GAPS: &str = "gaps";
/// Name of the alerts projection.
pub const ALERTS: &str = "alerts";

/// The built-in projections, with `rules` for alerts.
pub fn builtin(rules: Vec<AlertRule>) -> Vec<Box<dyn Projection>> {
    vec![
        Box::new(Latest),
        Box::new(Aggregates { name: MINUTE, bucket_ms: 60_000 }),
        Box::new(Aggregates { name: HOUR, bucket_ms: 3_600_000 }),
        Box::new(Presence),
        Box::new(Gaps),
        Box::new(Alerts { rules }),
    ]
}

fn reading(event: &StoredEvent) -> Option<&SensorReading> {
    match &event.event.payload {
        Payload::Reading(reading) => Some(reading),
        _ => None,
    }
}

fn u64_field(row: &serde_json::Value, field: &str) -> u64 {
    row.get(field).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

type Object = serde_json::Map<String, serde_json::Value>;

/// The stored row at `key` as an object to change in place, if there is one (a row that is not
/// an object is replaced whole by the caller).
fn object_mut<'r>(rows: &'r mut Rows<'_>, key: &str) -> Result<Option<&'r mut Object>, ApplyError> {
    Ok(rows.get_mut(key)?.and_then(serde_json::Value::as_object_mut))
}

/// Sets `field` in place: a number over a number allocates nothing.
fn set(object: &mut Object, field: &str, value: impl Into<serde_json::Value>) {
    match object.get_mut(field) {
        Some(slot) => *slot = value.into(),
        None => {
            object.insert(field.to_string(), value.into());
        }
    }
}

/// Sets a text `field`, allocating only when it differs.
fn set_str(object: &mut Object, field: &str, value: &str) {
    if object.get(field).and_then(serde_json::Value::as_str) != Some(value) {
        set(object, field, value);
    }
}

/// Latest reading per device and sensor, by event time (ties by seq), so a late event that is
/// older than the one shown does not replace it.
#[derive(Debug)]
struct Latest;

impl Projection for Latest {
    fn name(&self) -> &str {
        LATEST
    }

    fn apply(&self, rows: &mut Rows<'_>, event: &StoredEvent) -> Result<(), ApplyError> {
        let Some(reading) = reading(event) else { return Ok(()) };
        let id = event.event.id;
        let key = format!("{}|{}", id.device, reading.sensor);
        let order = (event.event.event_time.0, id.seq.0);
        if let Some(row) = rows.get(&key)? {
            if (u64_field(row, "event_time_ms"), u64_field(row, "seq")) >= order {
                return Ok(());
            }
        }
        if let Some(row) = object_mut(rows, &key)? {
            set(row, "value", reading.value);
            set_str(row, "unit", &reading.unit);
            set(row, "event_time_ms", event.event.event_time.0);
            set(row, "seq", id.seq.0);
            return Ok(());
        }
        rows.put(
            key,
            json!({
                "device": id.device.as_str(),
                "sensor": reading.sensor,
                "value": reading.value,
                "unit": reading.unit,
                "event_time_ms": event.event.event_time.0,
                "seq": id.seq.0,
            }),
        );
        Ok(())
    }
}

/// Count, min, max, sum and mean per device, sensor and time bucket.
#[derive(Debug)]
struct Aggregates {
    name: &'static str,
    bucket_ms: u64,
}

impl Projection for Aggregates {
    fn name(&self) -> &str {
        self.name
    }

    fn apply(&self, rows: &mut Rows<'_>, event: &StoredEvent) -> Result<(), ApplyError> {
        let Some(reading) = reading(event) else { return Ok(()) };
        let device = event.event.id.device;
        let bucket_ms = event.event.event_time.0 / self.bucket_ms * self.bucket_ms;
        let key = format!("{device}|{}|{bucket_ms:015}", reading.sensor);
        let value = reading.value;
        if let Some(row) = rows.get(&key)? {
            let unit = row.get("unit").and_then(serde_json::Value::as_str).unwrap_or_default();
            if unit != reading.unit {
                // Mixing units would make every figure of the bucket wrong. Refused before any
                // change, so there is nothing to undo.
                return Err(ApplyError::Rejected(format!(
                    "reading in {:?} for a bucket of {unit:?} ({device} {})",
                    reading.unit, reading.sensor
                )));
            }
        }
        if let Some(row) = object_mut(rows, &key)? {
            let number = |field: &str| row.get(field).and_then(serde_json::Value::as_f64);
            let count = row.get("count").and_then(serde_json::Value::as_u64).unwrap_or(0) + 1;
            let sum = number("sum").unwrap_or(0.0) + value;
            let min = number("min").unwrap_or(value).min(value);
            let max = number("max").unwrap_or(value).max(value);
            set(row, "count", count);
            set(row, "min", min);
            set(row, "max", max);
            set(row, "sum", sum);
            set(row, "mean", sum / count as f64);
            return Ok(());
        }
        rows.put(
            key,
            json!({
                "device": device.as_str(),
                "sensor": reading.sensor,
                "unit": reading.unit,
                "bucket_ms": bucket_ms,
                "count": 1,
                "min": value,
                "max": value,
                "sum": value,
                "mean": value,
            }),
        );
        Ok(())
    }
}

/// Per device: when the cloud last heard of it (ingest time), through which gateway, its newest
/// seq and event time, and how many events the cloud holds.
#[derive(Debug)]
struct Presence;

impl Projection for Presence {
    fn name(&self) -> &str {
        PRESENCE
    }

    fn apply(&self, rows: &mut Rows<'_>, event: &StoredEvent) -> Result<(), ApplyError> {
        let id = event.event.id;
        let key = id.device.to_string();
        if let Some(row) = object_mut(rows, &key)? {
            let field = |name: &str| row.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0);
            let last_seen_ms = field("last_seen_ms").max(event.meta.ingest_time.0);
            let last_event_time_ms = field("last_event_time_ms").max(event.event.event_time.0);
            let high_seq = field("high_seq").max(id.seq.0);
            let n_events = field("n_events") + 1;
            set(row, "last_seen_ms", last_seen_ms);
            set_str(row, "gateway", event.meta.gateway.as_str());
            set(row, "last_event_time_ms", last_event_time_ms);
            set(row, "high_seq", high_seq);
            set(row, "n_events", n_events);
            return Ok(());
        }
        let previous = rows.get(&key)?;
        let field = |name: &str| previous.map_or(0, |row| u64_field(row, name));
        let row = json!({
            "device": id.device.as_str(),
            "last_seen_ms": field("last_seen_ms").max(event.meta.ingest_time.0),
            "gateway": event.meta.gateway.as_str(),
            "last_event_time_ms": field("last_event_time_ms").max(event.event.event_time.0),
            "high_seq": field("high_seq").max(id.seq.0),
            "n_events": field("n_events") + 1,
        });
        rows.put(key, row);
        Ok(())
    }
}

/// Seqs devices reported dropped (their `gap` events).
#[derive(Debug)]
struct Gaps;

impl Projection for Gaps {
    fn name(&self) -> &str {
        GAPS
    }

    fn apply(&self, rows: &mut Rows<'_>, event: &StoredEvent) -> Result<(), ApplyError> {
        let Payload::Gap(gap) = &event.event.payload else { return Ok(()) };
        let device = event.event.id.device;
        rows.put(
            format!("{device}|{:020}", gap.first.0),
            json!({
                "device": device.as_str(),
                "first": gap.first.0,
                "last": gap.last.0,
                "n_dropped": gap.last.0.saturating_sub(gap.first.0) + 1,
                "reason": format!("{:?}", gap.reason),
                "reported_by_seq": event.event.id.seq.0,
            }),
        );
        Ok(())
    }
}

/// A threshold rule from the config file: readings of `sensor` above `above` (or below `below`)
/// raise an alert when the device's sensor enters that state.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// The rule's name (part of alert ids: keep it stable).
    pub name: String,
    /// Which sensor.
    pub sensor: String,
    /// Fires above this value.
    #[serde(default)]
    pub above: Option<f64>,
    /// Fires below this value.
    #[serde(default)]
    pub below: Option<f64>,
}

impl AlertRule {
    fn fires(&self, value: f64) -> bool {
        self.above.is_some_and(|above| value > above) || self.below.is_some_and(|below| value < below)
    }
}

/// Edge-triggered threshold alerts. An alert's id is `rule:device#seq`, the event that made the
/// rule fire, so a rebuild produces the same alerts and never raises one twice.
#[derive(Debug)]
struct Alerts {
    rules: Vec<AlertRule>,
}

impl Projection for Alerts {
    fn name(&self) -> &str {
        ALERTS
    }

    fn apply(&self, rows: &mut Rows<'_>, event: &StoredEvent) -> Result<(), ApplyError> {
        let Some(reading) = reading(event) else { return Ok(()) };
        let id = event.event.id;
        for rule in self.rules.iter().filter(|rule| rule.sensor == reading.sensor) {
            let state_key = format!("state|{}|{}|{}", rule.name, id.device, reading.sensor);
            let was_firing = rows
                .get(&state_key)?
                .and_then(|state| state.get("firing").and_then(serde_json::Value::as_bool))
                .unwrap_or(false);
            let firing = rule.fires(reading.value);
            if firing != was_firing {
                rows.put(state_key, json!({ "firing": firing, "since_seq": id.seq.0 }));
            }
            if firing && !was_firing {
                rows.put(
                    format!("alert|{}|{:020}|{}", id.device, id.seq.0, rule.name),
                    json!({
                        "id": format!("{}:{}#{}", rule.name, id.device, id.seq.0),
                        "rule": rule.name,
                        "device": id.device.as_str(),
                        "sensor": reading.sensor,
                        "seq": id.seq.0,
                        "value": reading.value,
                        "above": rule.above,
                        "below": rule.below,
                        "event_time_ms": event.event.event_time.0,
                    }),
                );
            }
        }
        Ok(())
    }
}
