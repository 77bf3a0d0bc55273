//! The `tidesync-cloud` command: `run` (ingest server, projections, HTTP), `projections rebuild
//! NAME` and `projections status`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::projection::{self, builtin, Runner};
use crate::server::{self, SecurityOptions, ServerOptions};

/// tidesync cloud: event store, projections, HTTP API.
#[derive(Debug, Parser)]
#[command(name = "tidesync-cloud", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the cloud until SIGTERM or SIGINT.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Projections of the store.
    Projections {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// What to do with them.
        #[command(subcommand)]
        action: ProjectionAction,
    },
}

/// What to do with projections.
#[derive(Debug, Subcommand)]
pub enum ProjectionAction {
    /// Clears a projection and folds it again from position 0.
    Rebuild {
        /// Its name (see `status`).
        name: String,
    },
    /// Prints each projection's checkpoint, lag and dead letters as JSON.
    Status,
}

/// Runs the command; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match execute(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tidesync-cloud: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Executes a parsed command line.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(run_until_signal(config))
        }
        Command::Projections { config, action } => {
            let config = Config::load(&config)?;
            let backend = config.backend();
            match action {
                ProjectionAction::Rebuild { name } => {
                    let mut runner = Runner::new(
                        backend.open_writer().context("cannot open the store")?,
                        builtin(config.alerts.clone()),
                    );
                    let started = std::time::Instant::now();
                    let Some(n_events) = runner.rebuild(&name).context("rebuild failed")? else {
                        bail!("no projection named {name:?}; there are {}", runner.names().join(", "));
                    };
                    println!(
                        "rebuilt {name} from position 0: {n_events} events in {:.2} s",
                        started.elapsed().as_secs_f64()
                    );
                    Ok(())
                }
                ProjectionAction::Status => {
                    let names = Runner::new(backend.open_writer()?, builtin(config.alerts.clone())).names();
                    let mut reader = backend.open_reader()?;
                    let status = projection::status(&mut *reader, &names)?;
                    println!("{}", serde_json::to_string_pretty(&status)?);
                    Ok(())
                }
            }
        }
    }
}

/// Starts everything `config` asks for and runs until SIGTERM or SIGINT, then shuts down
/// gracefully (group commit, goodbyes, projections stopped between transactions).
pub async fn run_until_signal(config: Config) -> anyhow::Result<()> {
    let device_keys = config.device_keys.clone();
    let running = start(config).await?;
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot watch SIGTERM")?;
    // Operators read this first: whether what the cloud stores is verified or taken on trust.
    match device_keys {
        Some(path) => println!(
            "tidesync-cloud: verifying device signatures against {} ({} devices with keys; reloaded when it changes)",
            path.display(),
            running.ingest.live().keyed_devices.load(Ordering::Relaxed)
        ),
        None => println!(
            "tidesync-cloud: WARNING: UNSIGNED INGEST: no device_keys in the config, so events are stored \
             without verifying device signatures"
        ),
    }
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    running.shutdown().await
}

/// Everything a running cloud is made of.
#[derive(Debug)]
pub struct Cloud {
    /// The ingest server.
    pub ingest: server::Running,
    /// Where the HTTP API listens, if configured.
    pub http_addr: Option<std::net::SocketAddr>,
    http: Option<tokio::task::JoinHandle<()>>,
    http_stop: tokio::sync::watch::Sender<bool>,
    projections: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Cloud {
    /// Stops ingest (gracefully), then the projection runner.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.http_stop.send(true);
        if let Some(http) = self.http.take() {
            let _ = http.await;
        }
        let result = self.ingest.shutdown().await;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.projections.take() {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        result.context("ingest server")
    }
}

/// Starts the ingest server and the projection runner of `config`.
pub async fn start(config: Config) -> anyhow::Result<Cloud> {
    let credentials = config.credentials()?;
    let backend = config.backend();
    if let crate::store::Backend::Sqlite { .. } = backend {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    }
    let options = ServerOptions {
        listen: config.listen,
        backend: backend.clone(),
        credentials,
        transport: config.limits.transport(),
        session: config.limits.session(),
        security: SecurityOptions {
            device_keys: config.device_keys.clone(),
            keys_reload_ms: config.limits.device_keys_reload_ms,
            device_limit: config.limits.device_limit(),
            gateway_limit: config.limits.gateway_limit(),
        },
    };
    let ingest = server::start(options).await.context("cannot start the ingest server")?;
    let stop = Arc::new(AtomicBool::new(false));
    let head = Arc::clone(ingest.head_watch());
    let rules = config.alerts.clone();
    let runner_stop = Arc::clone(&stop);
    let runner_backend = backend.clone();
    let projections = tokio::task::spawn_blocking(move || projection::spawn(&runner_backend, rules, head, runner_stop))
        .await
        .context("projection runner")??;
    let (http_stop, http_stop_rx) = tokio::sync::watch::channel(false);
    let (http_addr, http) = match config.http_listen {
        Some(addr) => {
            let state = crate::http::AppState::new(backend, ingest.control(), Arc::clone(ingest.live()))
                .with_head_watch(Arc::clone(ingest.head_watch()));
            let state = Arc::new(state);
            let (bound, task) = crate::http::spawn(addr, state, http_stop_rx)
                .await
                .with_context(|| format!("cannot serve http on {addr}"))?;
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    Ok(Cloud { ingest, http_addr, http, http_stop, projections: Some(projections), stop })
}
