//! The `tidesync-gateway` command line: `run`, `status` and `pki`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tidesync_core::event::{DeviceId, GatewayId};

use crate::config::Config;
use crate::metrics;
use crate::pki_cli::{self, Holder};
use crate::spool::Spool;

/// tidesync gateway: store-and-forward between devices and the cloud.
#[derive(Debug, Parser)]
#[command(name = "tidesync-gateway", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM.
    Run {
        /// The gateway.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the spool's state and, if the daemon serves metrics, its live figures.
    Status {
        /// The gateway.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Fleet certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create a fleet CA.
    Init {
        /// Directory for the CA files.
        #[arg(long)]
        dir: PathBuf,
        /// The fleet's name.
        #[arg(long)]
        fleet: String,
        /// CA validity.
        #[arg(long, default_value_t = 3650)]
        ca_days: u64,
        /// Revocation list validity.
        #[arg(long, default_value_t = 30)]
        crl_days: u64,
    },
    /// Issue a certificate for a device, a gateway or the cloud.
    Issue {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        holder: HolderArgs,
        /// Output prefix: writes PREFIX.pem and PREFIX.key, and for a device also its event
        /// signing key PREFIX.sign.key (registered in DIR/device-keys.txt).
        #[arg(long)]
        out: PathBuf,
        /// Validity.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Revoke a certificate and rewrite crl.pem; a device's signing keys are revoked with it.
    Revoke {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The serial to revoke.
        #[arg(long)]
        serial: Option<u64>,
        /// Or the certificate file to revoke.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Revocation list validity.
        #[arg(long, default_value_t = 30)]
        crl_days: u64,
    },
    /// Make a new event signing key for a device (PREFIX.sign.key); its old keys stay active
    /// until `revoke-key`.
    RotateKey {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The device.
        device: DeviceId,
        /// Output prefix: writes PREFIX.sign.key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke a device's event signing keys in DIR/device-keys.txt: all, or the one given.
    RevokeKey {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The device.
        device: DeviceId,
        /// Only this public key (64 hex digits).
        #[arg(long)]
        public: Option<String>,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct HolderArgs {
    /// A device id.
    #[arg(long)]
    device: Option<DeviceId>,
    /// A gateway id.
    #[arg(long)]
    gateway: Option<GatewayId>,
    /// The cloud.
    #[arg(long)]
    cloud: bool,
}

/// Parses `args` (program name first) and runs the command.
pub fn main_with_args<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
            runtime.block_on(crate::daemon::run_until_signal(config))?;
            Ok(())
        }
        Command::Status { config } => status(&config),
        Command::Pki(PkiCommand::Init { dir, fleet, ca_days, crl_days }) => {
            pki_cli::init(&dir, &fleet, ca_days, crl_days, &mut std::io::stdout())
        }
        Command::Pki(PkiCommand::Issue { dir, holder, out, days }) => {
            let holder = match (holder.device, holder.gateway, holder.cloud) {
                (Some(device), _, _) => Holder::Device(device),
                (_, Some(gateway), _) => Holder::Gateway(gateway),
                _ => Holder::Cloud,
            };
            pki_cli::issue(&dir, &holder, &out, days, &mut std::io::stdout()).map(drop)
        }
        Command::Pki(PkiCommand::Revoke { dir, serial, cert, crl_days }) => {
            pki_cli::revoke(&dir, serial, cert.as_deref(), crl_days, &mut std::io::stdout()).map(drop)
        }
        Command::Pki(PkiCommand::RotateKey { dir, device, out }) => {
            pki_cli::rotate_key(&dir, device, &out, &mut std::io::stdout()).map(drop)
        }
        Command::Pki(PkiCommand::RevokeKey { dir, device, public }) => {
            pki_cli::revoke_key(&dir, device, public.as_deref(), &mut std::io::stdout()).map(drop)
        }
    }
}

fn status(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let spool = Spool::open_read_only(&config.spool)?;
    let stats = spool.stats();
    println!("gateway {}", config.gateway);
    println!("spool {}", config.spool.display());
    println!(
        "spool: {} devices, {} events held, {} of {} bytes",
        stats.n_devices, stats.n_events, stats.used_bytes, config.spool_budget_bytes
    );
    for (device, high, committed, n_events) in spool.device_stats() {
        println!("  {device}: high {high}, committed {committed}, held {n_events}");
    }
    match config.metrics_listen.map(fetch_metrics) {
        Some(Ok(page)) => {
            for (label, name) in [
                ("connected devices", "tidesync_gateway_connected_devices"),
                ("cloud connected", "tidesync_gateway_upstream_connected"),
                ("events in", "tidesync_gateway_events_in_total"),
                ("events out", "tidesync_gateway_events_out_total"),
                ("batches throttled (device over its rate)", "tidesync_gateway_throttled_batches_total"),
                ("events throttled (kept by their devices)", "tidesync_gateway_throttled_events_total"),
                ("auth failures", "tidesync_gateway_auth_failures_total"),
            ] {
                println!("{label}: {}", metrics::sample(&page, name).unwrap_or(f64::NAN));
            }
        }
        Some(Err(error)) => println!("daemon: not reachable ({error:#})"),
        None => println!("daemon: no metrics endpoint configured"),
    }
    Ok(())
}

/// GETs `/metrics` with a minimal HTTP/1.0 request (no HTTP client needed for one page).
pub fn fetch_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let addr = if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "metrics endpoint said {head:?}"
    );
    Ok(body.to_string())
}
