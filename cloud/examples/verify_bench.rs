//! Signature verification at the cloud (issue 8): how many events per second one core verifies
//! (`tidesync_core::auth::verify_batch`, 256-event batches with 1 or several seals each), and the
//! ingest throughput with verification on vs off in the same run, over the real ingest path:
//! `Ingest::for_cloud` (with and without `.verifying(keys)`) taking the batches as frames, a
//! `CloudStore` on SQLite (WAL, `synchronous=FULL`) appending what it hands over with one group
//! commit per round of one batch per device, then `handle_durable` and the commit acks.
//! Runs alternate on/off; medians are printed.
//!
//! `cargo run --release -p tidesync-cloud --example verify_bench -- [N_EVENTS] [N_RUNS]`
//! (defaults 262,144 events, 5 runs of each).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tidesync_cloud::store::{Backend, CloudStore, IngestMeta};
use tidesync_core::auth::{verify_batch, BatchProof, ChainHash, DeviceKeys, DeviceSigner};
use tidesync_core::event::{DeviceId, Event, EventId, GatewayId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::sync::{Ingest, SessionConfig, SessionEvent};
use tidesync_core::vv::VersionVector;
use tidesync_core::wire::{EventBatch, Frame, Hello, Peer, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

const BATCH_EVENTS: u64 = 256;
const DEVICES: u64 = 16;

fn signer(index: u64) -> anyhow::Result<DeviceSigner> {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&index.to_le_bytes());
    Ok(DeviceSigner::from_seed(DeviceId::new(&format!("meter-{index:04}"))?, seed))
}

/// Per device, `per_device` readings in 256-event batches, each sealed every `seal_every` events
/// (and at its end), in round order: one batch of each device per round.
fn batches(per_device: u64, seal_every: u64) -> anyhow::Result<Vec<EventBatch>> {
    let mut by_device = Vec::new();
    for index in 0..DEVICES {
        let signer = signer(index)?;
        let device = signer.device();
        let mut chain = ChainHash::genesis(&device);
        let mut device_batches = Vec::new();
        for first in (1..=per_device).step_by(BATCH_EVENTS as usize) {
            let last = (first + BATCH_EVENTS - 1).min(per_device);
            let prev = chain;
            let mut events = Vec::new();
            let mut seals = Vec::new();
            let mut scratch = Vec::new();
            for seq in first..=last {
                let event = Event {
                    id: EventId { device, seq: Seq(seq) },
                    hlc: Hlc { wall_ms: 1_700_000_000_000 + seq * 1_000, logical: 0 },
                    event_time: Millis(1_700_000_000_000 + seq * 1_000),
                    payload: Payload::Reading(SensorReading {
                        sensor: "temperature".into(),
                        value: 20.0 + (seq % 100) as f64 / 8.0,
                        unit: "Cel".into(),
                    }),
                };
                chain = chain.next_with(&event, &mut scratch);
                if (seq - first + 1) % seal_every == 0 || seq == last {
                    seals.push(signer.seal(Seq(seq), &chain));
                }
                events.push(event);
            }
            let mut batch = EventBatch::new(device, Seq(first), events)?;
            batch.proof = Some(BatchProof { prev, seals, hole: None });
            device_batches.push(batch);
        }
        by_device.push(device_batches);
    }
    let n_rounds = by_device.first().map_or(0, Vec::len);
    let mut out = Vec::new();
    for round in 0..n_rounds {
        for device_batches in &by_device {
            if let Some(batch) = device_batches.get(round) {
                out.push(batch.clone());
            }
        }
    }
    Ok(out)
}

fn keys() -> anyhow::Result<Arc<DeviceKeys>> {
    let mut keys = DeviceKeys::new();
    for index in 0..DEVICES {
        let signer = signer(index)?;
        keys.insert(signer.device(), signer.public_key())?;
    }
    Ok(Arc::new(keys))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Verifies every batch once on this thread; returns events per second.
fn verify_run(keys: &DeviceKeys, batches: &[EventBatch]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut n_events = 0u64;
    for batch in batches {
        verify_batch(keys, batch, None).map_err(|violation| anyhow::anyhow!("{violation}"))?;
        n_events += batch.events.len() as u64;
    }
    Ok(n_events as f64 / started.elapsed().as_secs_f64())
}

/// The cloud's ingest path over a fresh SQLite store; returns events stored per second.
fn ingest_run(keys: Option<Arc<DeviceKeys>>, batches: &[EventBatch]) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let backend = Backend::Sqlite { path: dir.path().join("cloud.sqlite3") };
    let mut store = CloudStore::open(backend.open_writer()?, ShadowLimits::default())?;
    let gateway = GatewayId::new("gw-bench")?;
    let meta = IngestMeta { gateway, ingest_time: Millis(1) };
    let now = Millis(1_700_000_000_000);
    let config = SessionConfig { pending_events_max: 1 << 20, ..SessionConfig::default() };
    let mut ingest = Ingest::for_cloud(gateway, config, now);
    if let Some(keys) = keys {
        ingest = ingest.verifying(keys);
    }
    let mut vv = VersionVector::new();
    for batch in batches {
        vv.set(batch.device, Seq::ZERO);
    }
    let hello = Hello {
        protocol_min: PROTOCOL_VERSION_MIN,
        protocol_max: PROTOCOL_VERSION,
        peer: Peer::Gateway(gateway),
        vv,
        wall: now,
    };
    ingest.handle_frame(now, Frame::Hello(hello), &mut store)?;
    while ingest.poll_transmit(now, &mut store).is_some() {}
    let started = Instant::now();
    let mut n_stored = 0u64;
    for round in batches.chunks(DEVICES as usize) {
        for batch in round {
            ingest.handle_frame(now, Frame::Events(batch.clone()), &mut store)?;
        }
        let mut durable = Vec::new();
        while let Some(event) = ingest.poll_event() {
            match event {
                SessionEvent::EventsReceived(batch) => {
                    let appended = store.append_from(&batch, &meta)?;
                    n_stored += appended.n_new as u64;
                    durable.push((batch.device, appended.high));
                }
                SessionEvent::Violation { violation, .. } => anyhow::bail!("honest batch refused: {violation}"),
                _ => {}
            }
        }
        store.commit()?;
        for (device, high) in durable {
            ingest.handle_durable(now, device, high);
        }
        while ingest.poll_transmit(now, &mut store).is_some() {}
    }
    let expected: u64 = batches.iter().map(|batch| batch.events.len() as u64).sum();
    anyhow::ensure!(n_stored == expected, "stored {n_stored} of {expected}");
    Ok(n_stored as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n_events: u64 = args.next().map(|arg| arg.parse()).transpose().context("N_EVENTS")?.unwrap_or(262_144);
    let n_runs: usize = args.next().map(|arg| arg.parse()).transpose().context("N_RUNS")?.unwrap_or(5);
    let per_device = (n_events / DEVICES).max(BATCH_EVENTS);
    let keys = keys()?;
    println!(
        "verify_bench: {} devices x {per_device} events, {BATCH_EVENTS}-event batches, {n_runs} runs each, medians",
        DEVICES
    );
    let mut single_seal_rate = 0.0;
    for seal_every in [BATCH_EVENTS, 64, 16] {
        let batches = batches(per_device, seal_every)?;
        let n_seals = BATCH_EVENTS / seal_every;
        let rates: Vec<f64> = (0..n_runs).map(|_| verify_run(&keys, &batches)).collect::<anyhow::Result<_>>()?;
        if seal_every == BATCH_EVENTS {
            single_seal_rate = median(rates.clone());
        }
        println!(
            "verify_batch, {n_seals} seal(s) per batch: {:>12.0} events/s on one core ({:.2} us per batch)",
            median(rates.clone()),
            1e6 * BATCH_EVENTS as f64 / median(rates)
        );
    }
    let batches = batches(per_device, BATCH_EVENTS)?;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..n_runs {
        off.push(ingest_run(None, &batches)?);
        on.push(ingest_run(Some(Arc::clone(&keys)), &batches)?);
    }
    let (on, off) = (median(on), median(off));
    println!("ingest (Ingest::for_cloud + CloudStore on SQLite), verification off: {off:>10.0} events/s");
    println!("ingest (Ingest::for_cloud + CloudStore on SQLite), verification on:  {on:>10.0} events/s");
    println!(
        "ratio on/off {:.3}: verification costs {:.1} % of ingest throughput (goal <= 20 %)",
        on / off,
        100.0 * (1.0 - on / off)
    );
    // The two ingest figures are dominated by fsync and vary from run to run; the CPU the
    // verification adds per event, over the time an event takes to ingest, is the steadier figure.
    println!(
        "verification time per event / ingest time per event (off): {:.1} %",
        100.0 * off / single_seal_rate.max(1.0)
    );
    Ok(())
}
