//! `cloud.toml`: where the cloud listens, where its store and credentials are, its device key
//! registry, rate limits and alert rules. Relative paths are taken from the config file's
//! directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tidesync_core::net::quic::TransportLimits;
use tidesync_core::net::tls::Credentials;
use tidesync_core::rate::RateLimit;
use tidesync_core::sync::SessionConfig;

use crate::projection::AlertRule;
use crate::store::Backend;

/// The file name of the SQLite store inside the data directory.
pub const SQLITE_FILE: &str = "cloud.sqlite3";

/// The cloud's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// QUIC address gateways connect to.
    pub listen: SocketAddr,
    /// HTTP address of the API, dashboard and `/metrics` (none: no HTTP).
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Directory of the SQLite store (the default backend).
    pub data_dir: PathBuf,
    /// The store (default: SQLite in `data_dir`).
    #[serde(default)]
    pub store: StoreConfig,
    /// Certificates.
    pub tls: TlsFiles,
    /// Threshold alert rules.
    #[serde(default)]
    pub alerts: Vec<AlertRule>,
    /// The fleet's device public keys (`device-keys.txt`, see `tidesync_core::auth::KeyRegistry`).
    /// With it every batch must carry valid device signatures; without it events are taken
    /// unsigned (and the cloud says so loudly when it starts).
    #[serde(default)]
    pub device_keys: Option<PathBuf>,
    /// Session timers and rate limits.
    #[serde(default)]
    pub limits: Limits,
}

/// Which store backend.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "lowercase")]
pub enum StoreConfig {
    /// SQLite file `data_dir/cloud.sqlite3`.
    #[default]
    Sqlite,
    /// PostgreSQL.
    Postgres {
        /// Connection URL.
        url: String,
        /// Schema of the tables.
        #[serde(default = "schema_default")]
        schema: String,
    },
}

fn schema_default() -> String {
    "tidesync".into()
}

/// PEM files of the cloud's credentials (a certificate issued for the cloud by the fleet CA).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The fleet CA certificate.
    pub ca: PathBuf,
    /// The cloud's certificate.
    pub cert: PathBuf,
    /// The cloud's key.
    pub key: PathBuf,
    /// The fleet revocation list (optional).
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// Timers; the defaults suit a cloud serving site gateways.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// QUIC idle timeout.
    pub idle_timeout_ms: u64,
    /// QUIC keep-alive.
    pub keep_alive_ms: u64,
    /// Gateway connections at once.
    pub connections_max: usize,
    /// Session keep-alive.
    pub session_keepalive_ms: u64,
    /// Session idle timeout.
    pub session_idle_timeout_ms: u64,
    /// Sustained events per second admitted per device (0: unlimited).
    pub device_events_per_s: u32,
    /// Events a device may send at once after a quiet period.
    pub device_burst_events: u32,
    /// Sustained events per second admitted per gateway, all its devices together (0: unlimited).
    pub gateway_events_per_s: u32,
    /// Events a gateway may send at once after a quiet period.
    pub gateway_burst_events: u32,
    /// How often the device key registry is checked for changes.
    pub device_keys_reload_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_timeout_ms: 30_000,
            keep_alive_ms: 5_000,
            connections_max: 1_000,
            session_keepalive_ms: 10_000,
            session_idle_timeout_ms: 45_000,
            device_events_per_s: RateLimit::DEVICE_DEFAULT.events_per_s,
            device_burst_events: RateLimit::DEVICE_DEFAULT.burst_events,
            gateway_events_per_s: GATEWAY_EVENTS_PER_S_DEFAULT,
            gateway_burst_events: GATEWAY_EVENTS_PER_S_DEFAULT,
            device_keys_reload_ms: 5_000,
        }
    }
}

/// Default sustained rate per gateway. A site gateway of 1,000 sensors at 1 Hz uses 5 % of it,
/// and drains a day-long outage of them in 72 minutes; it is about a fifth of what the SQLite
/// store appends (BENCHMARKS.md), so no single gateway (a compromised one, or one emptying a big
/// spool) can take the store from the others. Per device the default is core's (100/s).
pub const GATEWAY_EVENTS_PER_S_DEFAULT: u32 = 20_000;

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

    /// The rate limit of each device.
    pub fn device_limit(&self) -> RateLimit {
        RateLimit { events_per_s: self.device_events_per_s, burst_events: self.device_burst_events }
    }

    /// The rate limit of each gateway.
    pub fn gateway_limit(&self) -> RateLimit {
        RateLimit { events_per_s: self.gateway_events_per_s, burst_events: self.gateway_burst_events }
    }

    /// The session configuration.
    pub fn session(&self) -> SessionConfig {
        SessionConfig {
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
    /// Parses `text`, resolving relative paths against `base`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text)
            .map_err(|source| ConfigError::Toml { path: path.to_path_buf(), source: Box::new(source) })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |file: &mut PathBuf| {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        };
        resolve(&mut config.data_dir);
        resolve(&mut config.tls.ca);
        resolve(&mut config.tls.cert);
        resolve(&mut config.tls.key);
        if let Some(crl) = &mut config.tls.crl {
            resolve(crl);
        }
        if let Some(keys) = &mut config.device_keys {
            resolve(keys);
        }
        Ok(config)
    }

    /// Loads `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read(path)?, path)
    }

    /// The store backend.
    pub fn backend(&self) -> Backend {
        match &self.store {
            StoreConfig::Sqlite => Backend::Sqlite { path: self.data_dir.join(SQLITE_FILE) },
            StoreConfig::Postgres { url, schema } => Backend::Postgres { url: url.clone(), schema: schema.clone() },
        }
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
