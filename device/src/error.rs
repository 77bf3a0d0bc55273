//! `StoreError`: why opening, recording into or reading the device's store failed.

use std::path::PathBuf;
use std::sync::Arc;

use tidesync_core::event::{BodyError, DeviceId, Seq};
use tidesync_core::ledger::LedgerError;
use tidesync_core::shadow::ShadowError;

/// Why a store operation failed. A failed operation changes nothing: its transaction is rolled
/// back and the in-memory state restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No database at the path: the data dir was not initialised.
    #[error("no ledger database at {path} (run `tidesync-device init` first)")]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// `init` found a database already there.
    #[error("a ledger database already exists at {path}")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The file is not an SQLite database (wrong magic, truncated header, or garbage).
    #[error("{path} is not an SQLite database: {reason}")]
    NotADatabase {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The file is an SQLite database of some other application; it was left untouched.
    #[error("{path} is an SQLite database of another application (application_id {application_id:#010x}), not a tidesync device ledger")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The `PRAGMA application_id` found in its header.
        application_id: u32,
    },
    /// A tidesync ledger written by a newer (or unknown) schema version.
    #[error("{path} has ledger schema version {found}; this build reads version {supported}")]
    SchemaVersion {
        /// The file.
        path: PathBuf,
        /// `PRAGMA user_version` found.
        found: i64,
        /// The version this build writes.
        supported: i64,
    },
    /// The database belongs to another device.
    #[error("the ledger belongs to device {found}, not {expected}")]
    DeviceMismatch {
        /// The device the caller asked for.
        expected: DeviceId,
        /// The device recorded in the database.
        found: String,
    },
    /// A required metadata row is missing or out of range: the database was damaged.
    #[error("ledger metadata {key:?} is missing or invalid")]
    Meta {
        /// The key.
        key: &'static str,
    },
    /// A stored event's body does not decode with its recorded kind and schema version.
    #[error("stored event seq {seq} does not decode")]
    CorruptEvent {
        /// Its seq.
        seq: Seq,
        /// Why.
        #[source]
        source: BodyError,
    },
    /// A stored event's chain value is not 32 bytes: the database was damaged.
    #[error("stored chain value of seq {seq} is damaged")]
    CorruptChain {
        /// Its seq.
        seq: Seq,
    },
    /// A stored integer does not fit its type (seq, clock, kind tag).
    #[error("stored {column} value {value} is out of range")]
    OutOfRange {
        /// Which column.
        column: &'static str,
        /// The value found.
        value: i64,
    },
    /// The records of an outside source (the firmware) up to `high` are already in the ledger;
    /// nothing was written. The sender should be acknowledged again.
    #[error("records of source {origin:?} up to {high} are already recorded")]
    AlreadyRecorded {
        /// The source (e.g. the serial link's firmware log).
        origin: String,
        /// The highest record of it the ledger holds.
        high: u64,
    },
    /// The device ledger holds only its own device's events.
    #[error("this ledger belongs to {own} and cannot hold events of {device}")]
    ForeignDevice {
        /// The owner.
        own: Box<DeviceId>,
        /// The device of the refused batch.
        device: Box<DeviceId>,
    },
    /// A ledger rule (budget full, invalid event, hole) refused the operation.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The shadow refused a change.
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    /// SQLite failed (disk full, I/O error, corruption, busy).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The group commit that carried this operation failed; every operation in it failed too.
    #[error("group commit failed: {0}")]
    Commit(#[source] Arc<rusqlite::Error>),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent's writer thread has stopped (it panicked or the agent was closed).
    #[error("the agent's writer thread has stopped")]
    AgentStopped,
}

impl StoreError {
    /// Whether this is the ledger refusing new events because its byte budget is used up by
    /// unacknowledged events. The producer keeps its data and retries later.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Ledger(LedgerError::Full { .. }))
    }

    /// Whether SQLite reported the disk (or the page limit) full.
    pub fn is_disk_full(&self) -> bool {
        let sqlite = match self {
            StoreError::Sqlite(error) => error,
            StoreError::Commit(error) => error.as_ref(),
            _ => return false,
        };
        sqlite.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
    }
}

impl From<StoreError> for LedgerError {
    /// Ledger rule errors pass through; everything else is a storage failure.
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Ledger(inner) => inner,
            other => LedgerError::Storage(Box::new(other)),
        }
    }
}
