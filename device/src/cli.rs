//! The `tidesync-device` command line: argument parsing (clap) and one function per command.
//!
//! `record` reads JSON lines (see [`crate::json`]) from stdin. By default it validates every
//! line first and then writes all of them in one transaction, or nothing: one bad line prints
//! `error: line N: ...` on stderr for each bad line and records nothing, so a producer can fix
//! its input and send it again without duplicates. `record --follow` is the streaming form for a
//! long-running producer: each line is its own unit, a bad line is reported and skipped, and each
//! good line's seq is printed as `{"line":N,"seq":S}` once it is durable.

use std::io::{BufRead, Write};
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tidesync_core::event::{DeviceId, Seq};
use tidesync_core::value::Value;

use crate::agent::{wall_now, Agent, Pending};
use crate::config::{Config, FullPolicy, Synchronous, DATABASE_FILE_NAME};
use crate::json::{event_to_json, parse_line};
use crate::serial;
use crate::signing::SigningKey;
use crate::store::DeviceStore;
use crate::uplink::{self, UplinkCounters, UplinkOptions};
use rand::SeedableRng;
use tidesync_core::net::quic::TransportLimits;
use tidesync_core::net::tls::Credentials;
use tidesync_core::sync::SessionConfig;

/// The name under which the serial port's firmware log is tracked (its records' watermark).
const SERIAL_SOURCE: &str = "serial";
/// Events read per query while exporting.
const EXPORT_CHUNK_EVENTS: usize = 1000;
/// Acknowledgements in flight between the `--follow` reader and the printer.
const FOLLOW_IN_FLIGHT_MAX: usize = 4096;

/// The tidesync device agent.
#[derive(Debug, Parser)]
#[command(name = "tidesync-device", version, about)]
pub struct Cli {
    /// Directory holding the config file and the ledger database.
    #[arg(long, global = true, default_value = "tidesync-data")]
    pub data_dir: PathBuf,
    /// Config file (default: DATA_DIR/tidesync-device.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Override the ledger's byte budget.
    #[arg(long, global = true)]
    pub budget_bytes: Option<u64>,
    /// Override what happens when the budget is full of unacknowledged events.
    #[arg(long, global = true, value_enum)]
    pub full_policy: Option<FullPolicy>,
    /// Override the commit durability.
    #[arg(long, global = true, value_enum)]
    pub synchronous: Option<Synchronous>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the data dir, its config file and an empty ledger.
    Init {
        /// This device's name (1 to 64 of A-Z a-z 0-9 . _ -).
        #[arg(long)]
        device_id: String,
        /// This device's event signing key (`NAME.sign.key` from `tidesync-gateway pki issue`),
        /// absolute or relative to the data dir; checked now and saved as `[uplink] signing_key`.
        #[arg(long)]
        signing_key: Option<PathBuf>,
    },
    /// Record events from JSON lines on stdin.
    Record {
        /// Stream: record each line as it arrives and print its seq once durable.
        #[arg(long)]
        follow: bool,
    },
    /// Print next seq, backlog, watermarks and sizes as JSON.
    Status,
    /// Read or write the device shadow.
    Shadow {
        /// What to do with the shadow.
        #[command(subcommand)]
        command: ShadowCommand,
    },
    /// Sync with the gateways of `[uplink]` until SIGTERM or Ctrl-C: send events, apply custody
    /// and commit acks, prune, sync the shadow both ways.
    Run {
        /// Gateways as HOST:PORT (repeat the flag); replaces `[uplink] gateways`.
        #[arg(long = "gateway")]
        gateways: Vec<String>,
        /// Also take the firmware's readings from this serial port (a tty or pseudo-terminal).
        #[arg(long)]
        serial: Option<PathBuf>,
    },
    /// Print the held events as JSON lines.
    Export {
        /// First seq to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
}

/// Shadow commands.
#[derive(Debug, Subcommand)]
pub enum ShadowCommand {
    /// Print reported, desired and delta as JSON.
    Get,
    /// Set reported keys; VALUE is JSON, or else taken as text. Each is recorded as an event.
    Report {
        /// KEY=VALUE pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        assignments: Vec<String>,
    },
}

/// Sends logs to stderr; `RUST_LOG` picks the level (default `warn`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).try_init();
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_path = cli.config.clone().unwrap_or_else(|| Config::path_in(&cli.data_dir));
    let database_path = cli.data_dir.join(DATABASE_FILE_NAME);
    match &cli.command {
        Command::Init { device_id, signing_key } => {
            let device = DeviceId::new(device_id).with_context(|| format!("invalid device id {device_id:?}"))?;
            init(&cli, device, signing_key.as_deref(), &config_path, &database_path)
        }
        command => {
            let config = load_config(&cli, &config_path)?;
            let store = DeviceStore::open(&database_path, Some(config.device_id), config.ledger.clone())
                .with_context(|| format!("cannot open the ledger in {}", cli.data_dir.display()))?;
            match command {
                Command::Record { follow: false } => record_all(store),
                Command::Record { follow: true } => record_follow(store),
                Command::Status => print_json(&serde_json::to_value(store.status()?)?),
                Command::Shadow { command: ShadowCommand::Get } => print_json(&store.shadow().to_json()),
                Command::Shadow { command: ShadowCommand::Report { assignments } } => report(store, assignments),
                Command::Export { from } => export(&store, Seq(*from)),
                Command::Run { gateways, serial } => run_uplink(&cli, &config, store, gateways, serial.as_deref()),
                Command::Init { .. } => unreachable!("init is handled above"),
            }
        }
    }
}

fn apply_overrides(cli: &Cli, config: &mut Config) {
    if let Some(budget_bytes) = cli.budget_bytes {
        config.ledger.budget_bytes = budget_bytes;
    }
    if let Some(full_policy) = cli.full_policy {
        config.ledger.full_policy = full_policy;
    }
    if let Some(synchronous) = cli.synchronous {
        config.ledger.synchronous = synchronous;
    }
}

fn load_config(cli: &Cli, config_path: &Path) -> anyhow::Result<Config> {
    if !config_path.exists() {
        anyhow::bail!("no config at {} (run `tidesync-device init` first)", config_path.display());
    }
    let mut config = Config::load(config_path)?;
    apply_overrides(cli, &mut config);
    Ok(config)
}

fn init(
    cli: &Cli,
    device: DeviceId,
    signing_key: Option<&Path>,
    config_path: &Path,
    database_path: &Path,
) -> anyhow::Result<ExitCode> {
    if config_path.exists() {
        anyhow::bail!("{} already exists: this data dir is initialised", config_path.display());
    }
    // A wrong key path is found now, before anything is created.
    let public_key = signing_key.map(|path| SigningKey::load(&cli.data_dir.join(path))).transpose()?;
    std::fs::create_dir_all(&cli.data_dir).with_context(|| format!("cannot create {}", cli.data_dir.display()))?;
    let mut config = Config::new(device);
    config.uplink.signing_key = signing_key.map(Path::to_path_buf);
    apply_overrides(cli, &mut config);
    DeviceStore::create(database_path, device, config.ledger.clone())?;
    config.save(config_path)?;
    tracing::info!(%device, data_dir = %cli.data_dir.display(), "initialised");
    print_json(&serde_json::json!({
        "device_id": device.as_str(),
        "data_dir": cli.data_dir,
        "signing_public_key": public_key.map(|key| key.public_hex()),
    }))
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(ExitCode::SUCCESS)
}

/// Validates every line, then records all of them in one transaction, or nothing.
fn record_all(mut store: DeviceStore) -> anyhow::Result<ExitCode> {
    let now = wall_now();
    let mut events = Vec::new();
    let mut n_bad = 0;
    let mut n_lines = 0;
    for (index, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("cannot read stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        n_lines += 1;
        match parse_line(&line, now) {
            Ok(event) => events.push(event),
            Err(error) => {
                n_bad += 1;
                eprintln!("error: line {}: {error}", index + 1);
            }
        }
    }
    if n_bad > 0 {
        eprintln!("error: {n_bad} of {n_lines} lines are invalid; recorded nothing");
        return Ok(ExitCode::FAILURE);
    }
    if events.is_empty() {
        return print_json(&serde_json::json!({ "recorded": 0 }));
    }
    let recorded = store.record(wall_now(), &events).context("recorded nothing")?;
    print_json(&serde_json::json!({
        "recorded": recorded.len(), "first_seq": recorded.first.0, "last_seq": recorded.last.0,
    }))
}

/// Records each line as it arrives; a printer thread prints each seq once it is durable.
fn record_follow(store: DeviceStore) -> anyhow::Result<ExitCode> {
    let agent = Agent::start(store)?;
    let (acks, to_print) = mpsc::sync_channel::<(usize, Pending)>(FOLLOW_IN_FLIGHT_MAX);
    let printer = std::thread::spawn(move || -> bool {
        let mut all_ok = true;
        let stdout = std::io::stdout();
        for (line_number, pending) in to_print {
            match pending.wait() {
                Ok(recorded) => {
                    let mut out = stdout.lock();
                    // A closed stdout only means nobody listens for acknowledgements any more.
                    let _ = writeln!(out, "{{\"line\":{line_number},\"seq\":{}}}", recorded.first.0);
                    let _ = out.flush();
                }
                Err(error) => {
                    all_ok = false;
                    eprintln!("error: line {line_number}: {error}");
                }
            }
        }
        all_ok
    });
    let mut all_ok = true;
    for (index, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("cannot read stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line, wall_now()) {
            Ok(event) => {
                let pending = agent.submit(vec![event])?;
                acks.send((index + 1, pending)).map_err(|_| anyhow::anyhow!("acknowledgement printer stopped"))?;
            }
            Err(error) => {
                all_ok = false;
                eprintln!("error: line {}: {error}", index + 1);
            }
        }
    }
    drop(acks);
    let printed_ok = printer.join().map_err(|_| anyhow::anyhow!("acknowledgement printer panicked"))?;
    agent.close()?;
    Ok(if all_ok && printed_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Reads a PEM file of the uplink's credentials, relative to the data dir.
fn read_pem(data_dir: &Path, path: &Path, what: &str) -> anyhow::Result<String> {
    let path = data_dir.join(path);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read the {what} at {}", path.display()))
}

fn run_uplink(
    cli: &Cli,
    config: &Config,
    store: DeviceStore,
    gateways: &[String],
    serial: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let names = if gateways.is_empty() { config.uplink.gateways.clone() } else { gateways.to_vec() };
    let mut addrs = Vec::new();
    for name in &names {
        let resolved = name
            .to_socket_addrs()
            .with_context(|| format!("gateway address {name:?} is not HOST:PORT"))?
            .collect::<Vec<_>>();
        anyhow::ensure!(!resolved.is_empty(), "gateway address {name:?} resolves to nothing");
        addrs.extend(resolved);
    }
    anyhow::ensure!(
        !addrs.is_empty() || serial.is_some(),
        "nothing to run: configure `[uplink] gateways`, pass --gateway HOST:PORT, or --serial PATH"
    );
    // Loaded before anything starts: a missing or damaged key stops the agent with its reason.
    let signing =
        config.uplink.signing_key.as_ref().map(|path| SigningKey::load(&cli.data_dir.join(path))).transpose()?;
    let agent = Arc::new(Agent::start(store)?);
    let stop_serial = Arc::new(AtomicBool::new(false));
    let serial_thread = match serial {
        Some(path) => {
            let agent = Arc::clone(&agent);
            let stop = Arc::clone(&stop_serial);
            let path = path.to_path_buf();
            Some(std::thread::spawn(move || serial::run_ingest(&agent, &path, SERIAL_SOURCE, &stop)))
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let counters = Arc::new(UplinkCounters::default());
    let result: anyhow::Result<()> = runtime.block_on(async {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stopping: finishing the session");
            let _ = stop.send(true);
        });
        if addrs.is_empty() {
            let mut shutdown = shutdown;
            let _ = shutdown.changed().await;
            return Ok(());
        }
        let uplink = &config.uplink;
        let credentials = Credentials {
            ca_pem: read_pem(&cli.data_dir, &uplink.ca, "fleet CA certificate")?,
            cert_pem: read_pem(&cli.data_dir, &uplink.cert, "device certificate")?,
            key_pem: read_pem(&cli.data_dir, &uplink.key, "device key")?,
            crl_pem: uplink.crl.as_ref().map(|crl| read_pem(&cli.data_dir, crl, "revocation list")).transpose()?,
        };
        let options = UplinkOptions {
            gateways: addrs,
            credentials,
            session: SessionConfig { linger_ms: uplink.linger_ms, ..SessionConfig::default() },
            transport: TransportLimits::default(),
            connect_timeout_ms: uplink.connect_timeout_ms,
            backoff_initial_ms: uplink.backoff_initial_ms,
            backoff_max_ms: uplink.backoff_max_ms,
        };
        let rng = rand_chacha::ChaCha8Rng::from_os_rng();
        Ok(uplink::run_with_key(Arc::clone(&agent), options, signing, Arc::clone(&counters), rng, shutdown).await?)
    });
    stop_serial.store(true, Ordering::Relaxed);
    let mut summary = serde_json::json!({ "uplink": counters.snapshot() });
    if let Some(thread) = serial_thread {
        match thread.join().map_err(|_| anyhow::anyhow!("the serial ingest panicked"))? {
            Ok(stats) => summary["serial"] = serde_json::to_value(stats)?,
            Err(error) => tracing::error!(%error, "the serial ingest failed"),
        }
    }
    print_json(&summary)?;
    result?;
    let agent = Arc::into_inner(agent).context("the uplink still holds the agent")?;
    agent.close()?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn report(mut store: DeviceStore, assignments: &[String]) -> anyhow::Result<ExitCode> {
    let mut parsed = Vec::new();
    for assignment in assignments {
        let (key, text) = assignment.split_once('=').with_context(|| format!("{assignment:?} is not KEY=VALUE"))?;
        let json = serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_string()));
        let value = Value::from_json(&json).with_context(|| format!("value of {key:?}"))?;
        parsed.push((key.to_string(), value));
    }
    let mut seqs = Vec::new();
    for (key, value) in parsed {
        let id = store.report(wall_now(), &key, &value).with_context(|| format!("cannot report {key:?}"))?;
        seqs.push(id.seq.0);
    }
    print_json(&serde_json::json!({ "event_seqs": seqs, "shadow": store.shadow().to_json() }))
}

fn export(store: &DeviceStore, from: Seq) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut next = from.max(Seq::FIRST);
    loop {
        let events = store.events_from(next, EXPORT_CHUNK_EVENTS)?;
        let Some(last) = events.last() else {
            break;
        };
        next = last.id.seq.next();
        for event in &events {
            writeln!(out, "{}", event_to_json(event))?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
