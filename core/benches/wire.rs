//! Benchmark of the event-batch codec: encode+decode rate and bytes per event of a batch of
//! 1,000 readings from one sensor at 1 Hz, beside serde_json and plain postcard of the same events
//! measured in the same run. Run with `cargo bench -p tidesync-core --bench wire`; it prints a
//! summary line with the figures recorded in BENCHMARKS.md.

use std::time::{Duration, Instant};

use criterion::{criterion_main, BatchSize, Criterion, Throughput};
use tidesync_core::event::{DeviceId, Event, EventId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_core::wire::{EventBatch, Frame};

const N_EVENTS: usize = 1_000;

/// 1,000 readings of one temperature sensor at 1 Hz with 0.01 °C resolution, slowly varying.
fn one_hz_batch() -> EventBatch {
    let device = DeviceId::new("pump-7").expect("valid name");
    let events = (0..N_EVENTS)
        .map(|index| {
            let wall_ms = 1_763_900_000_000 + index as u64 * 1_000;
            let hundredths = 2_100 + ((index as f64 / 60.0).sin() * 150.0) as i64 + (index % 3) as i64;
            Event {
                id: EventId { device, seq: Seq(index as u64 + 1) },
                hlc: Hlc { wall_ms, logical: 0 },
                event_time: Millis(wall_ms),
                payload: Payload::Reading(SensorReading {
                    sensor: "sht31.temperature".into(),
                    value: hundredths as f64 / 100.0,
                    unit: "Cel".into(),
                }),
            }
        })
        .collect();
    EventBatch::new(device, Seq(1), events).expect("valid batch")
}

fn round_trip_frame(batch: &EventBatch) -> usize {
    let bytes = Frame::Events(batch.clone()).to_bytes();
    let (frame, _) = Frame::decode(&bytes).expect("decodes");
    match frame {
        Frame::Events(decoded) => decoded.events.len(),
        _ => 0,
    }
}

fn round_trip_json(events: &[Event]) -> usize {
    let bytes = serde_json::to_vec(events).expect("json encodes");
    let decoded: Vec<Event> = serde_json::from_slice(&bytes).expect("json decodes");
    decoded.len()
}

fn round_trip_postcard(events: &[Event]) -> usize {
    let bytes = postcard::to_allocvec(events).expect("postcard encodes");
    let decoded: Vec<Event> = postcard::from_bytes(&bytes).expect("postcard decodes");
    decoded.len()
}

/// Median events per second of `work` over `samples` timed runs.
fn median_rate(samples: usize, mut work: impl FnMut() -> usize) -> f64 {
    let mut rates: Vec<f64> = (0..samples)
        .map(|_| {
            let start = Instant::now();
            let n_events = work();
            n_events as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn bench_wire(c: &mut Criterion) {
    let batch = one_hz_batch();
    let events = batch.events.clone();
    let frame_bytes = Frame::Events(batch.clone()).to_bytes().len();
    let json_bytes = serde_json::to_vec(&events).expect("json").len();
    let postcard_bytes = postcard::to_allocvec(&events).expect("postcard").len();

    let mut group = c.benchmark_group("batch_1000_readings_1hz");
    group.throughput(Throughput::Elements(N_EVENTS as u64));
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("tidesync_encode_decode", |b| {
        b.iter_batched(|| batch.clone(), |batch| round_trip_frame(&batch), BatchSize::SmallInput)
    });
    group.bench_function("serde_json_encode_decode", |b| b.iter(|| round_trip_json(&events)));
    group.bench_function("postcard_encode_decode", |b| b.iter(|| round_trip_postcard(&events)));
    group.finish();

    // A summary with medians from this same run, for BENCHMARKS.md.
    let tidesync_rate = median_rate(201, || round_trip_frame(&batch));
    let json_rate = median_rate(51, || round_trip_json(&events));
    let postcard_rate = median_rate(101, || round_trip_postcard(&events));
    println!();
    println!("summary: batch of {N_EVENTS} readings, one sensor at 1 Hz (medians of this run)");
    println!(
        "  tidesync batch frame: {:6.2} bytes/event, {:5.2} M events/s encode+decode",
        frame_bytes as f64 / N_EVENTS as f64,
        tidesync_rate / 1e6
    );
    println!(
        "  plain postcard:       {:6.2} bytes/event, {:5.2} M events/s encode+decode",
        postcard_bytes as f64 / N_EVENTS as f64,
        postcard_rate / 1e6
    );
    println!(
        "  serde_json:           {:6.2} bytes/event, {:5.2} M events/s encode+decode",
        json_bytes as f64 / N_EVENTS as f64,
        json_rate / 1e6
    );
    println!(
        "  ratios: {:.1}x smaller than JSON, {:.1}x faster than JSON; goal <= 16 bytes/event (aim 12), >= 5 M events/s",
        json_bytes as f64 / frame_bytes as f64,
        tidesync_rate / json_rate
    );
}

#[allow(missing_docs)] // criterion_group! makes an undocumented public function.
mod group {
    criterion::criterion_group!(benches, super::bench_wire);
}
use group::benches;
criterion_main!(benches);
