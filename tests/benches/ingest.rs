//! Gateway ingest throughput (events/s from custody request to custody ack) with 1, 100 and
//! 1,000 devices connected at once on loopback, and bytes on the wire per event, beside the
//! baseline of the same events as JSON lines over plain TCP into the same SQLite spool, measured
//! in the same run. Each scenario runs `ROUNDS` times on a fresh spool; the median round counts.
//!
//! `cargo bench -p tidesync-tests --bench ingest` (`TIDESYNC_BENCH_ROUNDS` changes the rounds).

use std::time::Duration;

use anyhow::Context as _;
use tidesync_core::event::DeviceId;
use tidesync_core::ledger::Ledger as _;
use tidesync_core::sync::SessionConfig;
use tidesync_tests::load::{self, LoadOptions, LoadReport};

/// Rounds per scenario unless `TIDESYNC_BENCH_ROUNDS` says otherwise.
const ROUNDS: usize = 3;
/// Events per scenario (spread over its devices).
const EVENTS_TOTAL: u64 = 200_000;
/// Goals from the issue.
const GOAL_EVENTS_PER_S_100: f64 = 200_000.0;
const GOAL_RATIO: f64 = 2.0;
const GOAL_BYTES_PER_EVENT: f64 = 20.0;

struct Round {
    gateway: LoadReport,
    baseline: LoadReport,
    spool_events_per_s: f64,
}

/// The spool alone: the same batches appended straight into a fresh spool (no network, no
/// decoding), devices taking turns, a group commit every `GROUP_BATCHES` batches. Both ingest
/// paths end in these appends, so this is the ceiling either can reach.
fn spool_only(dir: &std::path::Path, devices: &[DeviceId], options: &LoadOptions) -> anyhow::Result<f64> {
    const GROUP_BATCHES: usize = 64;
    let mut per_device = Vec::new();
    for device in devices {
        let store = tidesync_tests::device_store(*device, options.n_events_per_device)?;
        let mut batches = Vec::new();
        let mut next = tidesync_core::event::Seq(1);
        while let Some(batch) = store.ledger.read(device, next, options.session.batch_events_max)? {
            next = batch.last_seq().next();
            batches.push(batch);
        }
        per_device.push(batches.into_iter());
    }
    let mut interleaved = Vec::new();
    loop {
        let before = interleaved.len();
        interleaved.extend(per_device.iter_mut().filter_map(Iterator::next));
        if interleaved.len() == before {
            break;
        }
    }
    let mut spool = tidesync_gateway::spool::Spool::open(
        &dir.join("spool-only.db"),
        "gateway:bench",
        u64::MAX,
        tidesync_core::shadow::ShadowLimits::default(),
    )?;
    let started = std::time::Instant::now();
    let mut n_events = 0u64;
    for group in interleaved.chunks(GROUP_BATCHES) {
        for batch in group {
            n_events += spool.append(batch)?.n_new as u64;
        }
        spool.commit()?;
    }
    Ok(n_events as f64 / started.elapsed().as_secs_f64())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn round(n_devices: usize, options: &LoadOptions) -> anyhow::Result<Round> {
    let dir = tempfile::tempdir()?;
    let run = load::run_with_gateway(dir.path(), options).await?;
    anyhow::ensure!(run.report.n_custody == run.report.n_events, "gateway run incomplete: {}", run.report);

    let devices: Vec<DeviceId> = (0..n_devices)
        .map(|index| DeviceId::new(&format!("load-{index}")).context("name"))
        .collect::<Result<_, _>>()?;
    let server = load::json::JsonServer::start(&dir.path().join("json-spool.db")).await?;
    let baseline = load::json::run(server.addr(), &devices, options).await;
    server.stop().await?;
    anyhow::ensure!(baseline.n_custody == baseline.n_events, "baseline run incomplete: {baseline}");
    let spool_events_per_s = spool_only(dir.path(), &devices, options)?;
    Ok(Round { gateway: run.report, baseline, spool_events_per_s })
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; anything else (`cargo test --all-targets`) gets a smoke run
    // that only shows the benchmark still works.
    let smoke = !std::env::args().any(|arg| arg == "--bench");
    let (events_total, scenarios, default_rounds): (u64, &[usize], usize) =
        if smoke { (2_000, &[1, 10], 1) } else { (EVENTS_TOTAL, &[1, 100, 1_000], ROUNDS) };
    let rounds: usize =
        std::env::var("TIDESYNC_BENCH_ROUNDS").ok().and_then(|value| value.parse().ok()).unwrap_or(default_rounds);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    println!(
        "gateway ingest vs JSON over TCP into the same spool; {events_total} events per scenario, median of {rounds}"
    );
    let rate = load::LOAD_DEVICE_RATE;
    println!(
        "gateway per-device rate limit: {} (device_events_per_s = {}, device_burst_events = {}; the production \
         default is 100/s, burst 100)",
        if rate.is_unlimited() { "off" } else { "on" },
        rate.events_per_s,
        rate.burst_events
    );
    println!(
        "{:>8} {:>14} {:>14} {:>7} {:>14} {:>11} {:>11} {:>11} {:>13} {:>10}",
        "devices",
        "gateway ev/s",
        "json ev/s",
        "ratio",
        "spool ev/s",
        "frame B/ev",
        "UDP B/ev",
        "json B/ev",
        "handshake B",
        "connect s"
    );
    let mut at_100 = None;
    let mut bytes_per_event = Vec::new();
    for &n_devices in scenarios {
        let options = LoadOptions {
            n_devices,
            n_events_per_device: events_total / n_devices as u64,
            session: SessionConfig::default(),
            until_committed: false,
            timeout: Duration::from_secs(300),
        };
        let mut results = Vec::new();
        for _ in 0..rounds {
            results.push(runtime.block_on(round(n_devices, &options))?);
        }
        let gateway_rate = median(results.iter().map(|round| round.gateway.events_per_s()).collect());
        let json_rate = median(results.iter().map(|round| round.baseline.events_per_s()).collect());
        let frame_bytes = median(results.iter().map(|round| round.gateway.frame_bytes_per_event()).collect());
        let udp_bytes = median(results.iter().map(|round| round.gateway.udp_bytes_per_event()).collect());
        let json_bytes = median(results.iter().map(|round| round.baseline.frame_bytes_per_event()).collect());
        let spool_rate = median(results.iter().map(|round| round.spool_events_per_s).collect());
        let handshake_bytes = median(
            results
                .iter()
                .map(|round| round.gateway.udp_handshake_bytes as f64 / round.gateway.n_connected.max(1) as f64)
                .collect(),
        );
        let connect_s = median(results.iter().map(|round| round.gateway.connect_elapsed.as_secs_f64()).collect());
        println!(
            "{n_devices:>8} {gateway_rate:>14.0} {json_rate:>14.0} {:>6.2}x {spool_rate:>14.0} {frame_bytes:>11.2} \
             {udp_bytes:>11.2} {json_bytes:>11.2} {handshake_bytes:>13.0} {connect_s:>10.2}",
            gateway_rate / json_rate
        );
        for (index, round) in results.iter().enumerate() {
            println!(
                "    round {index}: gateway {:.0} ev/s, json {:.0} ev/s",
                round.gateway.events_per_s(),
                round.baseline.events_per_s()
            );
        }
        if n_devices == 100 {
            at_100 = Some((gateway_rate, json_rate));
        }
        bytes_per_event.push(udp_bytes);
    }
    if let Some((gateway_rate, json_rate)) = at_100 {
        let met = |ok: bool| if ok { "met" } else { "NOT met" };
        println!(
            "goal ≥ {GOAL_EVENTS_PER_S_100:.0} events/s with 100 devices: {gateway_rate:.0} ({})",
            met(gateway_rate >= GOAL_EVENTS_PER_S_100)
        );
        println!(
            "goal ≥ {GOAL_RATIO}× the JSON baseline with 100 devices: {:.2}× ({})",
            gateway_rate / json_rate,
            met(gateway_rate / json_rate >= GOAL_RATIO)
        );
        let worst = bytes_per_event.iter().copied().fold(0.0, f64::max);
        println!("goal ≤ {GOAL_BYTES_PER_EVENT} bytes per event on the wire (UDP, both directions, worst scenario): {worst:.2} ({})", met(worst <= GOAL_BYTES_PER_EVENT));
    }
    Ok(())
}
