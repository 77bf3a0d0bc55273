//! The sampler: periods from a tick, catch-up without running late periods, faults counted, and
//! hybrid-clock stamps that keep increasing across an RTC reset and a firmware reboot.

use embedded_hal::delay::DelayNs;
use tidesync_core::event::{Hlc, Millis};
use tidesync_firmware::log::RingLog;
use tidesync_firmware::sampler::{Reading, Sample, Sampler, Sensor, SensorFault, READINGS_PER_SENSOR_MAX};
use tidesync_firmware::sim_flash::SimFlash;

struct NoDelay;

impl DelayNs for NoDelay {
    fn delay_ns(&mut self, _ns: u32) {}
}

/// A sensor that yields its name and a count of measurements, failing when told to.
struct Fake {
    name: &'static str,
    measurements: u32,
    fail: bool,
}

impl Sensor for Fake {
    fn measure(
        &mut self,
        _delay: &mut dyn DelayNs,
        out: &mut [Reading; READINGS_PER_SENSOR_MAX],
    ) -> Result<usize, SensorFault> {
        if self.fail {
            return Err(SensorFault::Absent);
        }
        self.measurements += 1;
        out[0] = Reading { sensor: self.name, value: f64::from(self.measurements), unit: "1" };
        Ok(1)
    }
}

fn fake(name: &'static str) -> Fake {
    Fake { name, measurements: 0, fail: false }
}

#[test]
fn each_sensor_runs_on_its_period() {
    let (mut fast, mut slow) = (fake("fast"), fake("slow"));
    let mut samples: Vec<Sample> = Vec::new();
    {
        let mut sampler = Sampler::<2>::new(Hlc::default());
        sampler.add(&mut fast, 100, 0).map_err(|_| "full").expect("add");
        sampler.add(&mut slow, 250, 0).map_err(|_| "full").expect("add");
        let mut tick_ms = 0;
        while tick_ms <= 1000 {
            sampler.poll(tick_ms, Millis(1_700_000_000_000 + tick_ms), &mut NoDelay, |sample| samples.push(sample));
            tick_ms = sampler.next_due_ms().expect("scheduled");
        }
        assert_eq!(sampler.stats().missed, 0);
    }
    assert_eq!(fast.measurements, 11, "0, 100, ..., 1000");
    assert_eq!(slow.measurements, 5, "0, 250, ..., 1000");
    assert_eq!(samples.len(), 16);
    assert!(samples.windows(2).all(|pair| pair[0].hlc < pair[1].hlc), "stamps strictly increase");
}

#[test]
fn late_polls_skip_missed_periods_and_faults_are_counted() {
    let (mut sensor, mut broken) = (fake("ok"), Fake { name: "broken", measurements: 0, fail: true });
    let mut sampler = Sampler::<2>::new(Hlc::default());
    sampler.add(&mut sensor, 100, 0).map_err(|_| "full").expect("add");
    sampler.add(&mut broken, 100, 0).map_err(|_| "full").expect("add");
    let mut count = 0;
    count += sampler.poll(0, Millis(0), &mut NoDelay, |_| {});
    // Woken 350 ms late: the periods at 100, 200 and 300 were missed; one measurement now.
    count += sampler.poll(450, Millis(0), &mut NoDelay, |_| {});
    assert_eq!(count, 2);
    assert_eq!(sampler.stats().missed, 6, "three periods of each sensor");
    assert_eq!(sampler.stats().faults, 2);
    assert_eq!(sampler.next_due_ms(), Some(500));
    assert_eq!(sampler.poll(499, Millis(0), &mut NoDelay, |_| {}), 0, "nothing due before 500");
}

#[test]
fn schedule_is_bounded() {
    let (mut first, mut second) = (fake("a"), fake("b"));
    let mut sampler = Sampler::<1>::new(Hlc::default());
    assert!(sampler.add(&mut first, 10, 0).is_ok());
    assert!(sampler.add(&mut second, 10, 0).is_err());
}

#[test]
fn clock_keeps_order_across_rtc_reset_and_reboot() {
    type Flash = SimFlash<2048, 512, 4>;
    let mut log = RingLog::<Flash, 4>::open(Flash::new()).expect("open");
    let mut sensor = fake("t");
    let mut stamps = Vec::new();
    {
        let mut sampler = Sampler::<1>::new(log.last_hlc());
        sampler.add(&mut sensor, 1000, 0).map_err(|_| "full").expect("add");
        for step in 0..3u64 {
            sampler.poll(step * 1000, Millis(1_700_000_000_000 + step * 1000), &mut NoDelay, |sample| {
                log.append_reading(sample.to_record()).expect("append");
                stamps.push(sample.hlc);
            });
        }
    }
    // Reboot: the RTC lost power and restarts at the epoch.
    let mut log = RingLog::<Flash, 4>::open(log.into_flash()).expect("reopen");
    assert_eq!(log.last_hlc(), *stamps.last().expect("stamps"));
    let mut sampler = Sampler::<1>::new(log.last_hlc());
    sampler.add(&mut sensor, 1000, 0).map_err(|_| "full").expect("add");
    for step in 0..3u64 {
        sampler.poll(step * 1000, Millis(step * 1000), &mut NoDelay, |sample| {
            assert_eq!(sample.event_time, Millis(step * 1000), "event time is the raw RTC");
            log.append_reading(sample.to_record()).expect("append");
            stamps.push(sample.hlc);
        });
    }
    assert_eq!(stamps.len(), 6);
    assert!(stamps.windows(2).all(|pair| pair[0] < pair[1]), "stamps increase across the reset: {stamps:?}");
}
