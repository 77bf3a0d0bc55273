//! `Config`: the agent's settings, read from `tidesync-device.toml` in the data dir.
//!
//! Every setting has a default, so the file may hold only `device_id`. The CLI overrides single
//! settings per invocation with flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tidesync_core::event::DeviceId;

/// Name of the config file inside the data dir.
pub const CONFIG_FILE_NAME: &str = "tidesync-device.toml";
/// Name of the SQLite database inside the data dir.
pub const DATABASE_FILE_NAME: &str = "ledger.sqlite3";
/// Default byte budget of the ledger's events: 256 MiB.
pub const BUDGET_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;
/// Default number of incremental shadow saves kept before they are compacted into one full save.
pub const SHADOW_INCREMENTS_MAX_DEFAULT: u32 = 64;

/// How hard SQLite syncs a commit to storage, in WAL mode. See [`Synchronous::pragma_value`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Synchronous {
    /// `synchronous=FULL`: the WAL is fsynced at every commit, before the commit returns, so an
    /// acknowledged event survives a process crash *and* a power cut (as far as the storage honours
    /// fsync). The default.
    #[default]
    Full,
    /// `synchronous=EXTRA`: as FULL (in WAL mode SQLite treats them alike for commits); kept for
    /// operators who want the strongest setting spelled out.
    Extra,
    /// `synchronous=NORMAL`: the WAL is fsynced only at checkpoints. A commit survives a process
    /// crash but the last commits before a power cut may roll back. The database stays consistent
    /// either way. Faster; not the default because acknowledged readings could be lost.
    Normal,
}

impl Synchronous {
    /// The value for `PRAGMA synchronous`.
    pub fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// What the ledger does when its byte budget is full of events no upstream has acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Refuse new events with [`tidesync_core::ledger::LedgerError::Full`]; the producer keeps
    /// them and retries. Nothing recorded is lost. The default.
    #[default]
    Refuse,
    /// Drop the oldest unacknowledged events and record a `gap` event naming exactly their seqs.
    DropOldest,
}

/// The ledger's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Durability of commits.
    #[serde(default)]
    pub synchronous: Synchronous,
    /// Most bytes the held events may take, counted as body bytes plus
    /// [`crate::store::EVENT_ROW_OVERHEAD_BYTES`] per event.
    #[serde(default = "budget_bytes_default")]
    pub budget_bytes: u64,
    /// What to do when the budget is full of unacknowledged events.
    #[serde(default)]
    pub full_policy: FullPolicy,
    /// Incremental shadow saves kept before compaction into one full save.
    #[serde(default = "shadow_increments_max_default")]
    pub shadow_increments_max: u32,
}

fn budget_bytes_default() -> u64 {
    BUDGET_BYTES_DEFAULT
}

fn shadow_increments_max_default() -> u32 {
    SHADOW_INCREMENTS_MAX_DEFAULT
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::default(),
            budget_bytes: BUDGET_BYTES_DEFAULT,
            full_policy: FullPolicy::default(),
            shadow_increments_max: SHADOW_INCREMENTS_MAX_DEFAULT,
        }
    }
}

/// The uplink's settings (`tidesync-device run`). File paths are relative to the data dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Gateways as `HOST:PORT`, tried in order; the uplink roams to the next when one fails.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// The fleet CA certificate (PEM).
    #[serde(default = "ca_default")]
    pub ca: PathBuf,
    /// This device's certificate (PEM), issued by `tidesync-gateway pki issue`.
    #[serde(default = "cert_default")]
    pub cert: PathBuf,
    /// This device's private key (PEM).
    #[serde(default = "key_default")]
    pub key: PathBuf,
    /// The fleet's certificate revocation list (PEM), if the fleet publishes one.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// This device's event signing key (`NAME.sign.key` from `tidesync-gateway pki issue`). Without
    /// one the device sends its events unsigned, and a verifying cloud refuses them.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Give up a connection attempt after this long.
    #[serde(default = "connect_timeout_ms_default")]
    pub connect_timeout_ms: u64,
    /// First retry delay after a failure; doubles per failure, with jitter.
    #[serde(default = "backoff_initial_ms_default")]
    pub backoff_initial_ms: u64,
    /// Longest retry delay.
    #[serde(default = "backoff_max_ms_default")]
    pub backoff_max_ms: u64,
    /// How long new readings wait so that they leave in one batch (0: each at once). A sensor on a
    /// metered or battery link sets minutes here: one frame, one ack and one signature per batch.
    #[serde(default)]
    pub linger_ms: u64,
}

fn ca_default() -> PathBuf {
    PathBuf::from("fleet-ca.pem")
}

fn cert_default() -> PathBuf {
    PathBuf::from("device.pem")
}

fn key_default() -> PathBuf {
    PathBuf::from("device.key")
}

fn connect_timeout_ms_default() -> u64 {
    5_000
}

fn backoff_initial_ms_default() -> u64 {
    250
}

fn backoff_max_ms_default() -> u64 {
    30_000
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            gateways: Vec::new(),
            ca: ca_default(),
            cert: cert_default(),
            key: key_default(),
            crl: None,
            signing_key: None,
            connect_timeout_ms: connect_timeout_ms_default(),
            backoff_initial_ms: backoff_initial_ms_default(),
            backoff_max_ms: backoff_max_ms_default(),
            linger_ms: 0,
        }
    }
}

/// The contents of `tidesync-device.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This device's name; also the subject of its certificate.
    pub device_id: DeviceId,
    /// Ledger settings.
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// Uplink settings.
    #[serde(default)]
    pub uplink: UplinkConfig,
}

/// Why the config file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for a [`Config`].
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: toml::de::Error,
    },
    /// The config could not be written as TOML.
    #[error("config cannot be written as TOML: {0}")]
    Serialize(#[from] toml::ser::Error),
}

impl Config {
    /// A config for `device_id` with every default.
    pub fn new(device_id: DeviceId) -> Self {
        Self { device_id, ledger: LedgerConfig::default(), uplink: UplinkConfig::default() }
    }

    /// The config file of the data dir `data_dir`.
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join(CONFIG_FILE_NAME)
    }

    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })
    }

    /// Writes the config to `path`.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self)?;
        std::fs::write(path, text).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })
    }
}

#[cfg(test)]
mod tests;
