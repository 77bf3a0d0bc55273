//! `tidesync-load`: many concurrent devices (1,000 by default), each with its own certificate
//! and QUIC connection, sending events to one gateway on loopback. Prints how many connected, the
//! custody throughput, bytes on the wire and the errors; exits non-zero unless every event was
//! taken into custody (and committed, with `--cloud`).

use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use tidesync_core::sync::SessionConfig;
use tidesync_tests::load::{self, LoadOptions};

/// Load test of one gateway.
#[derive(Debug, Parser)]
struct Args {
    /// Concurrent devices.
    #[arg(long, default_value_t = 1_000)]
    devices: usize,
    /// Events per device.
    #[arg(long, default_value_t = 1_000)]
    events: u64,
    /// Events per batch.
    #[arg(long, default_value_t = 512)]
    batch_events: usize,
    /// Forward to a test cloud and wait for every commit too.
    #[arg(long)]
    cloud: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let options = LoadOptions {
        n_devices: args.devices,
        n_events_per_device: args.events,
        session: SessionConfig { batch_events_max: args.batch_events, ..SessionConfig::default() },
        until_committed: args.cloud,
        timeout: Duration::from_secs(args.timeout_s),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dir = tempfile::tempdir()?;
    let run = runtime.block_on(load::run_with_gateway(dir.path(), &options))?;
    println!("certificates: {} issued in {:.2} s", options.n_devices, run.issue_elapsed.as_secs_f64());
    println!("{}", run.report);
    println!(
        "gateway: peak connected {}, events in {}, group commits {}",
        run.peak_connected, run.events_in_total, run.group_commits
    );
    let report = &run.report;
    if report.n_errors > 0 || report.n_custody != report.n_events {
        bail!("{} errors, {} of {} events in custody", report.n_errors, report.n_custody, report.n_events);
    }
    if args.cloud && report.n_committed != report.n_events {
        bail!("{} of {} events committed", report.n_committed, report.n_events);
    }
    Ok(())
}
