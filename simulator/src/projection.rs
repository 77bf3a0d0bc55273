//! `Projection`: the cloud's read model in the simulation, a fold of the event log. Latest reading
//! per (device, sensor) and event count per device. It is folded incrementally as the cloud
//! makes events durable, and must equal a fresh fold of the cloud store (the CQRS law: a
//! projection is a pure function of the log, so it can be rebuilt from position 0).

use std::collections::BTreeMap;

use tidesync_core::event::{DeviceId, Event, Hlc, Payload, Seq};

/// The latest reading of one sensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Latest {
    /// Clock stamp of the reading (the order "latest" is taken in).
    pub hlc: Hlc,
    /// Its seq (breaks ties between equal stamps, which a device never issues).
    pub seq: Seq,
    /// The value.
    pub value: f64,
}

/// Latest reading per (device, sensor) and event count per device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Projection {
    /// Latest reading per (device, sensor).
    pub latest: BTreeMap<(DeviceId, String), Latest>,
    /// Events folded per device.
    pub n_events: BTreeMap<DeviceId, u64>,
}

impl Projection {
    /// An empty projection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one event in. Commutative for distinct events, so arrival order does not matter,
    /// but not idempotent: folding an event twice counts it twice.
    pub fn fold(&mut self, event: &Event) {
        *self.n_events.entry(event.id.device).or_default() += 1;
        if let Payload::Reading(reading) = &event.payload {
            let candidate = Latest { hlc: event.hlc, seq: event.id.seq, value: reading.value };
            let entry = self.latest.entry((event.id.device, reading.sensor.clone()));
            match entry {
                std::collections::btree_map::Entry::Vacant(vacant) => {
                    vacant.insert(candidate);
                }
                std::collections::btree_map::Entry::Occupied(mut occupied) => {
                    let current = occupied.get();
                    if (candidate.hlc, candidate.seq) > (current.hlc, current.seq) {
                        occupied.insert(candidate);
                    }
                }
            }
        }
    }

    /// A fresh fold of `events`.
    pub fn fold_all<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self {
        let mut projection = Self::new();
        for event in events {
            projection.fold(event);
        }
        projection
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidesync_core::event::{EventId, Millis, SensorReading};

    fn event(seq: u64, wall_ms: u64, sensor: &str, value: f64) -> Event {
        Event {
            id: EventId { device: DeviceId::new("d").unwrap(), seq: Seq(seq) },
            hlc: Hlc { wall_ms, logical: 0 },
            event_time: Millis(wall_ms),
            payload: Payload::Reading(SensorReading { sensor: sensor.into(), value, unit: String::new() }),
        }
    }

    #[test]
    fn the_fold_does_not_depend_on_arrival_order() {
        let events = [event(1, 10, "a", 1.0), event(2, 30, "a", 2.0), event(3, 20, "b", 3.0), event(4, 5, "a", 4.0)];
        let forward = Projection::fold_all(&events);
        let backward = Projection::fold_all(events.iter().rev());
        assert_eq!(forward, backward);
        let latest_a = &forward.latest[&(DeviceId::new("d").unwrap(), "a".to_string())];
        assert_eq!(latest_a.value, 2.0, "latest by clock stamp, not by seq");
    }

    #[test]
    fn folding_twice_is_visible() {
        let once = Projection::fold_all(&[event(1, 10, "a", 1.0)]);
        let twice = Projection::fold_all(&[event(1, 10, "a", 1.0), event(1, 10, "a", 1.0)]);
        assert_ne!(once, twice);
    }
}
