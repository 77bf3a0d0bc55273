//! Fleet benchmark: simulated device-events per wall second and time acceleration (simulated
//! time / wall time) for 1,000 devices over 24 simulated hours, printed next to baselines
//! measured in the same run on the same machine: core's wire codec encoding and decoding the
//! same number of events in batches, and a `MemLedger` recording them.
//!
//! `cargo bench -p tidesync-sim --bench fleet`. Environment: `TIDESYNC_SIM_BENCH_DEVICES`
//! (default 1000), `TIDESYNC_SIM_BENCH_GATEWAYS` (default 20), `TIDESYNC_SIM_BENCH_DURATION`
//! (default 1d), `TIDESYNC_SIM_BENCH_FAULTS` (default none; `all` for a faulty fleet),
//! `TIDESYNC_SIM_BENCH_SEED` (default 1), `TIDESYNC_SIM_BENCH_LINGER` (default the simulator's,
//! 15m: how long devices hold readings to send them in one batch; `0` sends each at once),
//! `TIDESYNC_SIM_BENCH_VERIFY_AHEAD` (default 1; `0` has the cloud verify every signature itself).

use std::time::Instant;

use anyhow::{Context, Result};
use tidesync_core::event::{DeviceId, Event, EventId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::MemLedger;
use tidesync_core::wire::{EventBatch, Frame};
use tidesync_sim::options::{format_duration_ms, format_faults, parse_duration_ms, parse_faults, DEFAULT_LINGER_MS};
use tidesync_sim::SimOptions;

// As the `tidesync-sim` binary does (the baselines run on it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn reading(index: u64) -> Payload {
    Payload::Reading(SensorReading {
        sensor: "temp".into(),
        value: 20.0 + (index % 100) as f64 / 10.0,
        unit: "Cel".into(),
    })
}

/// Encodes and decodes `n_events` events in frames of 256, as the sessions batch them.
fn codec_baseline(n_events: u64) -> Result<f64> {
    let device = DeviceId::new("d00001").context("device name")?;
    let started = Instant::now();
    let mut n_done = 0u64;
    let mut bytes = Vec::new();
    while n_done < n_events {
        let n_batch = (n_events - n_done).min(256);
        let events: Vec<Event> = (0..n_batch)
            .map(|offset| {
                let seq = n_done + offset + 1;
                Event {
                    id: EventId { device, seq: Seq(seq) },
                    hlc: Hlc { wall_ms: 1_767_225_600_000 + seq * 60_000, logical: 0 },
                    event_time: Millis(1_767_225_600_000 + seq * 60_000),
                    payload: reading(seq),
                }
            })
            .collect();
        let batch = EventBatch::new(device, Seq(n_done + 1), events).context("batch")?;
        bytes.clear();
        Frame::Events(batch).encode(&mut bytes);
        let (frame, _) = Frame::decode(&bytes).context("decode")?;
        std::hint::black_box(frame);
        n_done += n_batch;
    }
    Ok(n_events as f64 / started.elapsed().as_secs_f64())
}

/// Records `n_events` events into one `MemLedger`.
fn ledger_baseline(n_events: u64) -> Result<f64> {
    let device = DeviceId::new("d00001").context("device name")?;
    let mut ledger = MemLedger::pruning();
    let started = Instant::now();
    for index in 0..n_events {
        let wall = Millis(1_767_225_600_000 + index * 60_000);
        ledger.record(device, wall, wall, reading(index)).context("record")?;
    }
    std::hint::black_box(&ledger);
    Ok(n_events as f64 / started.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let n_devices: usize = env_or("TIDESYNC_SIM_BENCH_DEVICES", "1000").parse().context("devices")?;
    let n_gateways: usize = env_or("TIDESYNC_SIM_BENCH_GATEWAYS", "20").parse().context("gateways")?;
    let duration_ms = parse_duration_ms(&env_or("TIDESYNC_SIM_BENCH_DURATION", "1d"))?;
    let seed: u64 = env_or("TIDESYNC_SIM_BENCH_SEED", "1").parse().context("seed")?;
    let mut options = SimOptions::new(n_devices, n_gateways, duration_ms, seed);
    options.faults = parse_faults(&env_or("TIDESYNC_SIM_BENCH_FAULTS", "none"))?;
    options.linger_ms =
        parse_duration_ms(&env_or("TIDESYNC_SIM_BENCH_LINGER", &format_duration_ms(DEFAULT_LINGER_MS)))?;
    // As `tidesync-sim run` does: the second core verifies signatures ahead. `0` to compare.
    options.verify_ahead = env_or("TIDESYNC_SIM_BENCH_VERIFY_AHEAD", "1") != "0";
    println!("fleet: {} (verify ahead: {})", options.replay_command(), options.verify_ahead);
    let started = Instant::now();
    let outcome = tidesync_sim::run(options.clone(), |_, _| {});
    let wall_s = started.elapsed().as_secs_f64();
    let events_per_s = outcome.stats.n_recorded as f64 / wall_s;
    let acceleration = outcome.simulated_ms as f64 / 1_000.0 / wall_s;
    println!(
        "simulation: {} devices, {} gateways, {} simulated, faults {}, linger {}: {} events, {} frames in {wall_s:.1} s wall",
        n_devices,
        n_gateways,
        tidesync_sim::report::format_ms(outcome.simulated_ms),
        format_faults(&options.faults),
        format_duration_ms(options.linger_ms),
        outcome.stats.n_recorded,
        outcome.stats.n_frames_sent
    );
    println!("  {events_per_s:.0} simulated device-events per wall second, time acceleration {acceleration:.0}x");
    println!("  trace digest {:016x}", outcome.digest);
    println!(
        "  checks: {}",
        if outcome.passed() { "all passed".to_string() } else { format!("{} FAILED", outcome.failures.len()) }
    );
    let n_baseline = outcome.stats.n_recorded.max(1);
    println!("baseline, same run, {n_baseline} events:");
    println!("  wire codec encode+decode in frames of 256: {:.0} events/s", codec_baseline(n_baseline)?);
    println!("  MemLedger record: {:.0} events/s", ledger_baseline(n_baseline)?);
    Ok(())
}
