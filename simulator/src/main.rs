//! The `tidesync-sim` command: `run` one seeded simulation, or `sweep` many seeds.

use std::io::IsTerminal;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tidesync_sim::options::{parse_duration_ms, parse_faults, parse_seed_range};
use tidesync_sim::report::format_ms;
use tidesync_sim::{Bugs, Outcome, SimOptions, World};

mod demo;

// A simulated fleet allocates and frees an event's copies at every tier, many millions of small
// blocks a run; mimalloc serves them faster than the system allocator (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "tidesync-sim", about = "Deterministic fleet simulation of tidesync's sync protocol")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one seeded simulation, print its report, exit non-zero if a check fails.
    Run {
        #[command(flatten)]
        fleet: FleetArgs,
        /// The seed: same seed and binary, same run.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write an SVG plot of backlog and shadow convergence over simulated time.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
    },
    /// The real system in one process over QUIC on 127.0.0.1: a cloud, two gateways and a fleet
    /// of device agents go through outages and converge; prints a summary.
    Demo {
        /// Devices in the fleet.
        #[arg(long, default_value_t = 24)]
        devices: usize,
        /// Seconds of recording per phase.
        #[arg(long, default_value_t = 3)]
        phase_secs: u64,
        /// Readings per second per device.
        #[arg(long, default_value_t = 10)]
        rate_hz: u64,
        /// Keep the data in this directory (default: a new temporary directory, kept).
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
        /// Port of the cloud's HTTP API and dashboard (0: any free port).
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// Stop after the summary instead of waiting for Ctrl-C.
        #[arg(long)]
        exit: bool,
    },
    /// Run many seeds and print a pass/fail summary; exit non-zero if any failed.
    Sweep {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Runs at once (default: one per core). Results print in seed order either way.
        #[arg(long)]
        jobs: Option<usize>,
        /// Seeds as A..B (end exclusive) or A..=B.
        #[arg(long, default_value = "0..100")]
        seeds: String,
    },
}

#[derive(Args, Debug)]
struct FleetArgs {
    /// Devices in the fleet.
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// Gateways.
    #[arg(long, default_value_t = 3)]
    gateways: usize,
    /// Simulated workload time, in which faults happen (e.g. 7d, 36h, 90m).
    #[arg(long, default_value = "1d")]
    duration: String,
    /// Fault kinds: all, none, or a comma-separated list (loss,dup,reorder,stall,partition,
    /// device-crash,gateway-crash,gateway-wipe,clock,offline,roaming,storage-full,cloud-outage).
    #[arg(long, default_value = "all")]
    faults: String,
    /// Time between two readings of one device.
    #[arg(long, default_value = "1m")]
    interval: String,
    /// How long a device holds new readings so that they leave in one batch (0: each at once).
    #[arg(long, default_value = "15m")]
    linger: String,
    /// Longest heal phase before the run counts as not converged.
    #[arg(long, default_value = "2d")]
    heal_max: String,
    /// Deliberately broken host behaviour, to see the checks catch it: skip-dedupe,
    /// ack-before-fsync, send-unsynced, skip-verify.
    #[arg(long)]
    bug: Vec<String>,
    /// Duplicate shadow sync frames too (core amplifies them without bound; see the report).
    #[arg(long)]
    duplicate_shadow_sync: bool,
    /// Do not replace connections whose shadow sync spins (shows the core bug; see the report).
    #[arg(long)]
    no_spin_watchdog: bool,
    /// An evil gateway that tampers with what it relays and, on some seeds, a cloned device
    /// (drawn per seed and printed with the faults); the checks require every attack detected.
    #[arg(long)]
    adversaries: bool,
    /// Devices do not sign and the cloud does not verify (to measure what signatures cost).
    #[arg(long)]
    unsigned: bool,
    /// Print the report only (no drawn faults, no progress bar).
    #[arg(long)]
    quiet: bool,
}

impl FleetArgs {
    fn options(&self, seed: u64) -> Result<SimOptions> {
        if self.gateways == 0 {
            bail!("a fleet needs at least one gateway");
        }
        let duration_ms = parse_duration_ms(&self.duration).context("--duration")?;
        let mut options = SimOptions::new(self.devices, self.gateways, duration_ms, seed);
        options.faults = parse_faults(&self.faults).context("--faults")?;
        options.reading_interval_ms = parse_duration_ms(&self.interval).context("--interval")?.max(1);
        options.linger_ms = parse_duration_ms(&self.linger).context("--linger")?;
        options.heal_ms_max = parse_duration_ms(&self.heal_max).context("--heal-max")?;
        let mut bugs = Bugs::default();
        for bug in &self.bug {
            match bug.as_str() {
                "skip-dedupe" => bugs.skip_dedupe = true,
                "ack-before-fsync" => bugs.ack_before_fsync = true,
                "send-unsynced" => bugs.send_unsynced = true,
                "skip-verify" => bugs.skip_verify = true,
                other => {
                    bail!("unknown bug {other:?}; known are skip-dedupe, ack-before-fsync, send-unsynced, skip-verify")
                }
            }
        }
        options.bugs = bugs;
        options.duplicate_shadow_sync = self.duplicate_shadow_sync;
        options.spin_watchdog = !self.no_spin_watchdog;
        options.adversaries = self.adversaries;
        options.unsigned = self.unsigned;
        Ok(options)
    }
}

fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{spinner} simulated {msg} [{bar:40}] {percent}% ({elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

fn run_one(options: SimOptions, quiet: bool, plot: Option<&std::path::Path>) -> Result<Outcome> {
    let mut world = World::new(options);
    if !quiet {
        println!("{}", Outcome::header(world.options(), world.drawn()));
    }
    let bar = progress_bar(quiet);
    let started = Instant::now();
    let outcome = tidesync_sim::run_world(&mut world, |done_ms, total_ms| {
        bar.set_length(total_ms.max(1));
        bar.set_position(done_ms);
        bar.set_message(format_ms(done_ms));
    });
    bar.finish_and_clear();
    let wall = started.elapsed();
    println!("{outcome}");
    let wall_s = wall.as_secs_f64().max(1e-9);
    println!(
        "wall: {:.2} s, {:.0} simulated device-events per wall second, time acceleration {:.0}x",
        wall_s,
        outcome.stats.n_recorded as f64 / wall_s,
        outcome.simulated_ms as f64 / 1_000.0 / wall_s
    );
    if world.options().verify_ahead {
        println!("signatures verified ahead on another core: {}", world.n_signatures_verified_ahead());
    }
    if let Some(path) = plot {
        std::fs::write(path, outcome.svg()).with_context(|| format!("writing the plot to {}", path.display()))?;
        println!("plot: {}", path.display());
    }
    Ok(outcome)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { fleet, seed, plot } => {
            let mut options = fleet.options(seed)?;
            // One world: the second core verifies signatures ahead (a sweep has a world per core).
            options.verify_ahead = std::thread::available_parallelism().is_ok_and(|cores| cores.get() > 1);
            let outcome = run_one(options, fleet.quiet, plot.as_deref())?;
            if !outcome.passed() {
                std::process::exit(1);
            }
        }
        Command::Demo { devices, phase_secs, rate_hz, data_dir, http_port, exit } => {
            let options = demo::DemoOptions { devices, phase_secs, rate_hz, data_dir, http_port, exit };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let summary = runtime.block_on(demo::run(&options))?;
            if !summary.passed() {
                std::process::exit(1);
            }
        }
        Command::Sweep { fleet, seeds, jobs } => {
            let seeds = parse_seed_range(&seeds).context("--seeds")?;
            let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
            let started = Instant::now();
            let (passed, failed) = sweep(&fleet, seeds.clone(), jobs)?;
            println!(
                "sweep {}..{}: {passed} passed, {} failed in {:.1} s on {jobs} threads",
                seeds.start,
                seeds.end,
                failed.len(),
                started.elapsed().as_secs_f64()
            );
            if !failed.is_empty() {
                println!("failed seeds: {failed:?}");
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// Runs `seeds` on `jobs` threads (each run is one deterministic world; runs share nothing) and
/// prints each result in seed order as soon as every earlier seed is done. Returns how many
/// passed and the seeds that failed.
fn sweep(fleet: &FleetArgs, seeds: std::ops::Range<u64>, jobs: usize) -> Result<(u64, Vec<u64>)> {
    let all_options: Vec<SimOptions> = seeds.clone().map(|seed| fleet.options(seed)).collect::<Result<_>>()?;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (sender, receiver) = std::sync::mpsc::channel::<(usize, Outcome)>();
    let bar = progress_bar(fleet.quiet);
    bar.set_length(all_options.len() as u64);
    let (mut passed, mut failed) = (0u64, Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(all_options.len()) {
            let (sender, next, all_options) = (sender.clone(), &next, &all_options);
            scope.spawn(move || loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(options) = all_options.get(index) else {
                    break;
                };
                let outcome = tidesync_sim::run(options.clone(), |_, _| {});
                if sender.send((index, outcome)).is_err() {
                    break;
                }
            });
        }
        drop(sender);
        let mut done = std::collections::BTreeMap::new();
        let mut printed = 0;
        for (index, outcome) in receiver {
            bar.inc(1);
            done.insert(index, outcome);
            while let Some(outcome) = done.remove(&printed) {
                let seed = outcome.options.seed;
                if outcome.passed() {
                    passed += 1;
                    if !fleet.quiet {
                        bar.suspend(|| println!("seed {seed}: ok (digest {:016x})", outcome.digest));
                    }
                } else {
                    let mut text = format!("seed {seed}: FAILED\n");
                    for failure in &outcome.failures {
                        text.push_str(&format!("  {failure}\n"));
                    }
                    text.push_str(&format!("  replay: {}", outcome.options.replay_command()));
                    bar.suspend(|| println!("{text}"));
                    failed.push(seed);
                }
                printed += 1;
            }
        }
    });
    bar.finish_and_clear();
    Ok((passed, failed))
}
