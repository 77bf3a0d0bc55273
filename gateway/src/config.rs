//! `gateway.toml`: what a gateway daemon listens on, where its spool and credentials are, and its
//! bounds. Relative paths are taken from the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tidesync_core::event::GatewayId;
use tidesync_core::net::quic::TransportLimits;
use tidesync_core::net::tls::Credentials;
use tidesync_core::rate::RateLimit;
use tidesync_core::sync::SessionConfig;

/// Default spool budget: 256 MiB of held events.
pub const SPOOL_BUDGET_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;

/// The daemon's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This gateway's id; its certificate must name it.
    pub gateway: GatewayId,
    /// QUIC address devices connect to.
    pub listen: SocketAddr,
    /// HTTP address of the Prometheus `/metrics` endpoint (none: no endpoint).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The spool file.
    pub spool: PathBuf,
    /// Bytes of held events past which the gateway stops granting custody.
    #[serde(default = "spool_budget_bytes_default")]
    pub spool_budget_bytes: u64,
    /// Certificates.
    pub tls: TlsFiles,
    /// The cloud (none: spool only, nothing forwarded).
    #[serde(default)]
    pub upstream: Option<Upstream>,
    /// Bounds and timers.
    #[serde(default)]
    pub limits: Limits,
}

fn spool_budget_bytes_default() -> u64 {
    SPOOL_BUDGET_BYTES_DEFAULT
}

/// PEM files of the gateway's credentials.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The fleet CA certificate.
    pub ca: PathBuf,
    /// The gateway's certificate.
    pub cert: PathBuf,
    /// The gateway's private key.
    pub key: PathBuf,
    /// The fleet revocation list (optional).
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// Where the cloud is.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The cloud's QUIC address.
    pub addr: SocketAddr,
    /// Wait before reconnecting after a failure (doubles up to 16× while it keeps failing).
    #[serde(default = "reconnect_ms_default")]
    pub reconnect_ms: u64,
}

fn reconnect_ms_default() -> u64 {
    1_000
}

/// Bounds and timers; the defaults suit a site gateway.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Devices connected at once.
    pub connections_max: usize,
    /// QUIC idle timeout.
    pub idle_timeout_ms: u64,
    /// QUIC keep-alive.
    pub keep_alive_ms: u64,
    /// Session retransmit timer (towards the cloud).
    pub retransmit_ms: u64,
    /// Session keep-alive.
    pub session_keepalive_ms: u64,
    /// Session idle timeout.
    pub session_idle_timeout_ms: u64,
    /// How long a device is told to wait when the spool is full.
    pub full_retry_after_ms: u32,
    /// Most messages handled per group commit.
    pub group_messages_max: usize,
    /// Each device's sustained event rate, events per second; 0 means unlimited. A device over
    /// its rate is told to wait (backpressure) and keeps its events; nothing is dropped.
    pub device_events_per_s: u32,
    /// Events a device may send at once after a quiet period (its token bucket's size).
    pub device_burst_events: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections_max: 10_000,
            idle_timeout_ms: 30_000,
            keep_alive_ms: 5_000,
            retransmit_ms: 5_000,
            session_keepalive_ms: 10_000,
            session_idle_timeout_ms: 45_000,
            full_retry_after_ms: 2_000,
            group_messages_max: 4_096,
            device_events_per_s: RateLimit::DEVICE_DEFAULT.events_per_s,
            device_burst_events: RateLimit::DEVICE_DEFAULT.burst_events,
        }
    }
}

impl Limits {
    /// The QUIC limits.
    pub fn transport(&self) -> TransportLimits {
        TransportLimits {
            idle_timeout_ms: self.idle_timeout_ms,
            keep_alive_ms: self.keep_alive_ms,
            connections_max: self.connections_max,
            ..TransportLimits::default()
        }
    }

    /// The per-device rate limit.
    pub fn device_rate(&self) -> RateLimit {
        RateLimit { events_per_s: self.device_events_per_s, burst_events: self.device_burst_events }
    }

    /// The session configuration.
    pub fn session(&self) -> SessionConfig {
        SessionConfig {
            retransmit_ms: self.retransmit_ms,
            keepalive_ms: self.session_keepalive_ms,
            idle_timeout_ms: self.session_idle_timeout_ms,
            ..SessionConfig::default()
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid.
    #[error("{path}: {source}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })
}

impl Config {
    /// Loads `path`, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        let mut config: Config = toml::from_str(&text)
            .map_err(|source| ConfigError::Toml { path: path.to_path_buf(), source: Box::new(source) })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |file: &mut PathBuf| {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        };
        resolve(&mut config.spool);
        resolve(&mut config.tls.ca);
        resolve(&mut config.tls.cert);
        resolve(&mut config.tls.key);
        if let Some(crl) = &mut config.tls.crl {
            resolve(crl);
        }
        Ok(config)
    }

    /// Reads the credential files.
    pub fn credentials(&self) -> Result<Credentials, ConfigError> {
        Ok(Credentials {
            ca_pem: read(&self.tls.ca)?,
            cert_pem: read(&self.tls.cert)?,
            key_pem: read(&self.tls.key)?,
            crl_pem: self.tls.crl.as_deref().map(read).transpose()?,
        })
    }
}
