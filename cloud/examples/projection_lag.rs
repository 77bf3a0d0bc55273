//! Projection lag under a steady ingest: appends at a fixed offered rate, paced in group commits,
//! through the path `tidesync-cloud run` uses (`CloudStore::append_from`, `commit`, which wakes
//! the projection runner started by `projection::spawn`), while the built-in projections run
//! live; prints lag percentiles in ms and in events next to the offered and achieved rate. In the
//! same run, the baseline: the catch-up rate of the same projections over the same events.
//!
//! ```text
//! cargo run --release -p tidesync-cloud --example projection_lag -- [--rate 50000] [--seconds 25]
//!     [--tick-ms 20] [--devices 10] [--only sqlite|postgres]
//! ```
//!
//! PostgreSQL runs too when `TIDESYNC_TEST_POSTGRES_URL` is set.
//!
//! The writer is open-loop: every tick's events arrive on schedule, and each commit takes all
//! that arrived by then (the server's group commit), so a slow commit makes the next group larger
//! rather than lowering the offered rate. Lag of a commit = time from the commit returning (when
//! subscribers are woken) until the runner's commit that covers its last position; lag from
//! arrival counts from when its oldest events were due, so time spent waiting for a commit
//! counts; lag in events = head minus what every projection has folded, sampled at each commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidesync_cloud::projection::{self, builtin, AlertRule, Runner};
use tidesync_cloud::store::{Backend, CloudStore, HeadWatch, IngestMeta, Position};
use tidesync_core::event::{DeviceId, Event, EventId, GatewayId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::wire::EventBatch;

struct Options {
    rate: u64,
    seconds: u64,
    tick_ms: u64,
    devices: u64,
    only: Option<String>,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options { rate: 50_000, seconds: 25, tick_ms: 20, devices: 10, only: None };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))?;
        match arg.as_str() {
            "--rate" => options.rate = value.parse()?,
            "--seconds" => options.seconds = value.parse()?,
            "--tick-ms" => options.tick_ms = value.parse()?,
            "--devices" => options.devices = value.parse()?,
            "--only" => options.only = Some(value),
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    anyhow::ensure!(options.rate > 0 && options.tick_ms > 0 && options.devices > 0, "options must be positive");
    Ok(options)
}

fn rules() -> Vec<AlertRule> {
    vec![AlertRule { name: "hot".into(), sensor: "temp".into(), above: Some(24.0), below: None }]
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    let index = ((sorted.len() as f64 * fraction) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or(0.0)
}

/// One committed group: when its commit returned, and the head it made.
struct Commit {
    at: Instant,
    /// When the oldest events of this commit were due (arrived): a writer that fell behind
    /// commits them late, and that wait counts too.
    arrived: Instant,
    head: Position,
    lag_events: u64,
}

fn run(name: &str, backend: &Backend, options: &Options) -> anyhow::Result<()> {
    let mut store = CloudStore::open(backend.open_writer()?, ShadowLimits::default())?;
    let head = store.head_watch();
    let progress = HeadWatch::new(Position(0));
    let stop = Arc::new(AtomicBool::new(false));
    let runner = projection::spawn_with_progress(
        backend,
        rules(),
        Arc::clone(&head),
        Arc::clone(&stop),
        Some(Arc::clone(&progress)),
    )?;
    // Records when each runner commit made progress (woken by the runner, not polling).
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let progress = Arc::clone(&progress);
        let monitor_stop = Arc::clone(&monitor_stop);
        std::thread::spawn(move || {
            let mut seen = Position(0);
            let mut samples = Vec::new();
            while !monitor_stop.load(Ordering::Relaxed) {
                let now_at = progress.wait_past(seen, Duration::from_millis(50));
                if now_at > seen {
                    samples.push((Instant::now(), now_at));
                    seen = now_at;
                }
            }
            samples
        })
    };

    let devices: Vec<DeviceId> =
        (0..options.devices).map(|index| DeviceId::new(&format!("dev-{index}"))).collect::<Result<_, _>>()?;
    let meta = IngestMeta { gateway: GatewayId::new("gw")?, ingest_time: Millis(1) };
    let per_tick = (options.rate * options.tick_ms / 1_000).max(1);
    let n_ticks = options.seconds * 1_000 / options.tick_ms;
    let mut seqs = vec![0u64; devices.len()];
    let mut commits = Vec::with_capacity(n_ticks as usize);
    let mut n_events = 0u64;
    let started = Instant::now();
    let mut tick = 0;
    while tick < n_ticks {
        let due = started + Duration::from_millis(tick * options.tick_ms);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // Open-loop load, group commit as `tidesync-cloud run` does it: everything that arrived by
        // now goes into one commit. A writer that fell behind (a slow commit) catches up with a
        // larger group rather than offering less.
        let arrived = started + Duration::from_millis(tick * options.tick_ms);
        let elapsed_ticks = started.elapsed().as_millis() as u64 / options.tick_ms;
        let through = (elapsed_ticks + 1).clamp(tick + 1, n_ticks);
        for due_tick in tick..through {
            let event_time = Millis(1_700_000_000_000 + due_tick * options.tick_ms);
            for (index, device) in devices.iter().enumerate() {
                let n = per_tick / options.devices + u64::from((index as u64) < per_tick % options.devices);
                if n == 0 {
                    continue;
                }
                let first = seqs[index] + 1;
                let events = (first..first + n)
                    .map(|seq| Event {
                        id: EventId { device: *device, seq: Seq(seq) },
                        hlc: Hlc { wall_ms: event_time.0, logical: seq as u32 },
                        event_time,
                        payload: Payload::Reading(SensorReading {
                            sensor: "temp".into(),
                            value: (seq % 100) as f64 / 4.0,
                            unit: "Cel".into(),
                        }),
                    })
                    .collect();
                seqs[index] += n;
                store.append_from(&EventBatch::new(*device, Seq(first), events)?, &meta)?;
                n_events += n;
            }
        }
        tick = through;
        let committed = store.commit()?;
        commits.push(Commit {
            at: Instant::now(),
            arrived,
            head: committed,
            lag_events: committed.0.saturating_sub(progress.get().0),
        });
    }
    let ingest_seconds = started.elapsed().as_secs_f64();
    let final_head = store.head();
    let drain_started = Instant::now();
    while progress.get() < final_head && drain_started.elapsed() < Duration::from_secs(120) {
        progress.wait_past(progress.get(), Duration::from_millis(100));
    }
    let drain_ms = drain_started.elapsed().as_secs_f64() * 1_000.0;
    stop.store(true, Ordering::Relaxed);
    monitor_stop.store(true, Ordering::Relaxed);
    runner.join().map_err(|_| anyhow::anyhow!("projection runner panicked"))?;
    let samples = monitor.join().map_err(|_| anyhow::anyhow!("monitor panicked"))?;

    let mut lag_ms: Vec<f64> = commits
        .iter()
        .map(|commit| {
            let folded = samples.iter().find(|(_, position)| *position >= commit.head);
            folded.map_or(f64::INFINITY, |(at, _)| at.saturating_duration_since(commit.at).as_secs_f64() * 1_000.0)
        })
        .collect();
    lag_ms.sort_by(f64::total_cmp);
    let mut arrival_lag_ms: Vec<f64> = commits
        .iter()
        .map(|commit| {
            let folded = samples.iter().find(|(_, position)| *position >= commit.head);
            folded.map_or(f64::INFINITY, |(at, _)| at.saturating_duration_since(commit.arrived).as_secs_f64() * 1_000.0)
        })
        .collect();
    arrival_lag_ms.sort_by(f64::total_cmp);
    let mut lag_events: Vec<f64> = commits.iter().map(|commit| commit.lag_events as f64).collect();
    lag_events.sort_by(f64::total_cmp);

    // Baseline: the same projections fold the same events from position 0.
    let mut runner = Runner::new(backend.open_writer()?, builtin(rules()));
    let mut writer = backend.open_writer()?;
    writer.begin()?;
    for name in runner.names() {
        writer.clear_projection(&name)?;
    }
    writer.commit()?;
    drop(writer);
    let catch_up_started = Instant::now();
    let n_folded = runner.catch_up()?;
    let catch_up_rate = n_folded as f64 / catch_up_started.elapsed().as_secs_f64();

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{name}: offered {} events/s, {per_tick} every {} ms over {} devices for {} s, each commit taking all that \
         arrived; achieved {:.0} events/s ({n_events} events, {} commits)",
        options.rate,
        options.tick_ms,
        options.devices,
        options.seconds,
        n_events as f64 / ingest_seconds,
        commits.len()
    );
    println!(
        "{name}: projection lag p50 {:.1} ms / {:.0} events, p99 {:.1} ms / {:.0} events, max {:.1} ms / {:.0} \
         events; drained {drain_ms:.0} ms after the last commit",
        percentile(&lag_ms, 0.5),
        percentile(&lag_events, 0.5),
        percentile(&lag_ms, 0.99),
        percentile(&lag_events, 0.99),
        lag_ms.last().copied().unwrap_or(0.0),
        lag_events.last().copied().unwrap_or(0.0),
    );
    println!(
        "{name}: lag from arrival (oldest event of a commit due → folded by every projection) p50 {:.1} ms, p99 {:.1} \
         ms, max {:.1} ms",
        percentile(&arrival_lag_ms, 0.5),
        percentile(&arrival_lag_ms, 0.99),
        arrival_lag_ms.last().copied().unwrap_or(0.0),
    );
    println!(
        "{name}: baseline catch-up of the same 6 projections over the same {n_folded} events: {catch_up_rate:.0} \
         events/s; load average after: {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = options()?;
    if options.only.as_deref().is_none_or(|only| only == "sqlite") {
        let dir = tempfile::tempdir()?;
        run("sqlite", &Backend::Sqlite { path: dir.path().join("cloud.sqlite3") }, &options)?;
    }
    if let (Ok(url), true) =
        (std::env::var("TIDESYNC_TEST_POSTGRES_URL"), options.only.as_deref().is_none_or(|only| only == "postgres"))
    {
        let schema = format!("lag_{}", std::process::id());
        let result = run("postgres", &Backend::Postgres { url: url.clone(), schema: schema.clone() }, &options);
        let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
        result?;
    }
    Ok(())
}
