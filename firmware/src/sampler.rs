//! `Sampler`: runs each sensor on its own period from a millisecond tick and turns the readings
//! into timestamped samples.
//!
//! The tick (milliseconds since boot, from a timer) drives the schedule; the RTC only stamps
//! samples. The RTC may lose power and restart at the epoch, so every sample carries core's hybrid
//! logical clock, resumed after the last stamp in the flash log: stamps keep increasing even when
//! the RTC goes backwards (`event_time` is the raw RTC reading, as the sensor clock says).

use embedded_hal::delay::DelayNs;
use tidesync_core::event::{Hlc, HlcClock, Millis, Seq};
use tidesync_core::record::ReadingRecord;

/// Most readings one sensor measurement yields (e.g. temperature and humidity).
pub const READINGS_PER_SENSOR_MAX: usize = 2;

/// One value a sensor measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// The sensor channel, e.g. `"sht31.temperature"`.
    pub sensor: &'static str,
    /// The value in `unit`.
    pub value: f64,
    /// The UCUM unit code, e.g. `"Cel"`.
    pub unit: &'static str,
}

/// Why a sensor produced no reading, in the terms the schedule cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SensorFault {
    /// The bus failed.
    #[error("bus error")]
    Bus,
    /// A checksum did not match.
    #[error("crc mismatch")]
    Crc,
    /// Nothing (or the wrong chip) answers.
    #[error("sensor absent")]
    Absent,
    /// The conversion was not finished.
    #[error("sensor not ready")]
    NotReady,
}

/// A sensor the sampler can schedule: one measurement yields up to
/// [`READINGS_PER_SENSOR_MAX`] readings.
pub trait Sensor {
    /// Measures once, waiting on `delay` as the conversion needs, and writes the readings into
    /// `out`; returns how many it wrote.
    fn measure(
        &mut self,
        delay: &mut dyn DelayNs,
        out: &mut [Reading; READINGS_PER_SENSOR_MAX],
    ) -> Result<usize, SensorFault>;
}

/// A sample ready for the log: a reading with its clocks (the log assigns the seq).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// What was measured.
    pub reading: Reading,
    /// The RTC's reading when sampled.
    pub event_time: Millis,
    /// The hybrid logical clock stamp.
    pub hlc: Hlc,
}

impl Sample {
    /// The record the log stores (its seq is assigned by the log).
    pub fn to_record(&self) -> ReadingRecord<'static> {
        ReadingRecord {
            seq: Seq::ZERO,
            hlc: self.hlc,
            event_time: self.event_time,
            sensor: self.reading.sensor,
            value: self.reading.value,
            unit: self.reading.unit,
        }
    }
}

/// One scheduled sensor.
struct Slot<'s> {
    sensor: &'s mut dyn Sensor,
    period_ms: u32,
    next_due_ms: u64,
    faults: u32,
}

/// Counters of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SamplerStats {
    /// Measurements that failed (any sensor).
    pub faults: u32,
    /// Periods skipped because the sampler was polled too late to catch up.
    pub missed: u32,
    /// Samples produced.
    pub samples: u32,
}

/// A fixed schedule of up to `N` sensors.
pub struct Sampler<'s, const N: usize> {
    slots: [Option<Slot<'s>>; N],
    clock: HlcClock,
    stats: SamplerStats,
}

impl<'s, const N: usize> Sampler<'s, N> {
    /// An empty schedule whose clock resumes after `last_hlc` (from [`crate::log::RingLog::last_hlc`]).
    pub fn new(last_hlc: Hlc) -> Self {
        Self { slots: [const { None }; N], clock: HlcClock::resume(last_hlc), stats: SamplerStats::default() }
    }

    /// Schedules `sensor` every `period_ms` (at least 1), first due at tick `first_due_ms`.
    /// Returns the sensor back if the schedule is full.
    pub fn add(
        &mut self,
        sensor: &'s mut dyn Sensor,
        period_ms: u32,
        first_due_ms: u64,
    ) -> Result<(), &'s mut dyn Sensor> {
        match self.slots.iter_mut().find(|slot| slot.is_none()) {
            Some(free) => {
                *free = Some(Slot { sensor, period_ms: period_ms.max(1), next_due_ms: first_due_ms, faults: 0 });
                Ok(())
            }
            None => Err(sensor),
        }
    }

    /// The earliest tick at which some sensor is due (`None` with an empty schedule).
    pub fn next_due_ms(&self) -> Option<u64> {
        self.slots.iter().flatten().map(|slot| slot.next_due_ms).min()
    }

    /// Runs every sensor due at `tick_ms`, stamping samples with `rtc_now`, and hands each sample
    /// to `sink`. Returns how many samples were produced.
    pub fn poll(
        &mut self,
        tick_ms: u64,
        rtc_now: Millis,
        delay: &mut dyn DelayNs,
        mut sink: impl FnMut(Sample),
    ) -> usize {
        let mut produced = 0;
        for slot in self.slots.iter_mut().flatten() {
            if slot.next_due_ms > tick_ms {
                continue;
            }
            // Catch up by whole periods; periods that passed entirely are missed, not run late.
            let period_ms = u64::from(slot.period_ms);
            let behind_periods = (tick_ms - slot.next_due_ms) / period_ms;
            self.stats.missed = self.stats.missed.saturating_add(behind_periods as u32);
            slot.next_due_ms += (behind_periods + 1) * period_ms;
            let mut readings = [Reading { sensor: "", value: 0.0, unit: "" }; READINGS_PER_SENSOR_MAX];
            match slot.sensor.measure(delay, &mut readings) {
                Ok(count) => {
                    for reading in readings.iter().take(count) {
                        let hlc = self.clock.now(rtc_now);
                        sink(Sample { reading: *reading, event_time: rtc_now, hlc });
                        produced += 1;
                    }
                }
                Err(_) => {
                    slot.faults = slot.faults.saturating_add(1);
                    self.stats.faults = self.stats.faults.saturating_add(1);
                }
            }
        }
        self.stats.samples = self.stats.samples.saturating_add(produced as u32);
        produced
    }

    /// Counters since start.
    pub fn stats(&self) -> SamplerStats {
        self.stats
    }

    /// The clock's last stamp.
    pub fn last_hlc(&self) -> Hlc {
        self.clock.last()
    }
}
