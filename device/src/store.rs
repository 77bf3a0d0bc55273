//! `DeviceStore`: the device's SQLite database — the append-only event ledger, its watermarks and
//! the persisted automerge shadow — and its implementation of core's `Ledger` and `Store`.
//!
//! Invariant: the events held are exactly the seqs `low..=high` (none when `low == high + 1`):
//! retention deletes the oldest first (committed, then custody-acked, then under `drop-oldest` the
//! oldest unacknowledged), so what is held is always one contiguous run and a `read` from an older
//! seq declares the hole in front of it, as core's batch format requires.
//!
//! Invariant: `high`, the clock's last stamp and the watermarks are written in the same
//! transaction as the events they describe, so after any crash seqs continue gap-free and the
//! clock never goes backwards.
//!
//! Invariant: a shadow change and the `shadow_reported` event that records it commit in one
//! transaction.
//!
//! Invariant: each event row holds the device's hash-chain value after it (see
//! `tidesync_core::auth`), computed by the writer from the row before and written in the event's
//! own transaction, or NULL when the chain is unknown (a ledger migrated from schema 1 that no
//! longer held seq 1). The `floor_chain` meta row is the chain value at `low - 1` (after the
//! highest seq pruned or dropped), absent when unknown. So `read` can always say what the chain
//! was before the events it returns, and a signing uplink can seal them.
//!
//! The `anchor_chain` meta row is the chain value at the commit watermark when it was last known
//! (8-byte little-endian seq, then the 32-byte value; absent in ledgers written before it and
//! until the first commit whose chain is known). A batch read from after the commit watermark may
//! start with a hole once drop-oldest has moved the floor past it; the hole proof then starts
//! right after the anchor and signs its value as the chain before the hole, which is what the
//! cloud, holding everything up to the commit, compares with its own (see
//! `tidesync_core::auth::HoleProof`). An optional row, so the schema version stays 2.
//!
//! The store is single-threaded (`&mut self`); [`crate::Agent`] owns one on its writer thread and
//! turns many producers' requests into group commits.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use tidesync_core::auth::{BatchProof, ChainHash, EncodedEvent, CHAIN_BYTES};
use tidesync_core::event::{DeviceId, Event, EventId, EventKind, Gap, GapReason, Hlc, HlcClock, Millis, Payload, Seq};
use tidesync_core::ledger::{Appended, Ledger, LedgerError};
use tidesync_core::shadow::{Section, Shadow, ShadowError, ShadowLimits};
use tidesync_core::sync::Store;
use tidesync_core::value::Value;
use tidesync_core::vv::{SeqRange, VersionVector};
use tidesync_core::wire::{EventBatch, BATCH_EVENTS_MAX};

use crate::config::{FullPolicy, LedgerConfig};
use crate::error::StoreError;

/// `PRAGMA application_id` of a device ledger ("TSDV"): tells our files from other SQLite files.
pub const APPLICATION_ID: u32 = 0x5453_4456;
/// Bytes of the `anchor_chain` meta value: seq (u64 LE) and chain value.
const ANCHOR_BYTES: usize = 8 + CHAIN_BYTES;
/// `PRAGMA user_version` this build writes and reads. Version 1 (no chains) is migrated on open.
pub const SCHEMA_VERSION: i64 = 2;
/// The schema version before events carried their chain value.
const SCHEMA_VERSION_UNCHAINED: i64 = 1;
/// Bytes an event row costs on top of its body, for the byte budget: the row header, the
/// integer columns, the device name, the 32-byte chain value and the index entry, rounded up.
pub const EVENT_ROW_OVERHEAD_BYTES: u64 = 80;
/// Most committed events deleted in one pruning transaction, so pruning never holds the writer
/// long.
pub const PRUNE_BATCH_EVENTS: u64 = 4096;
/// Free pages given back to the file system per pruning step.
pub const VACUUM_PAGES_PER_STEP: u32 = 512;
/// Under pressure, evict this fraction of the budget beyond what is needed (1/16), so that a
/// full ledger does not evict (and, under `drop-oldest`, record a gap) for every new event.
pub const EVICT_SLACK_DIVISOR: u64 = 16;
/// The upstream name under which the commit watermark (from the cloud store) is kept.
pub const COMMIT_UPSTREAM: &str = "cloud";
/// How long a statement waits for another process's lock (the CLI next to a running agent).
const BUSY_TIMEOUT_MS: u64 = 5_000;
/// SQLite's file header: magic string.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// Bytes of the SQLite file header that `check_header` reads.
const SQLITE_HEADER_BYTES: usize = 100;
/// Offset of `application_id` in the header (big-endian u32).
const HEADER_APPLICATION_ID_OFFSET: usize = 68;

const SCHEMA_SQL: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value ANY NOT NULL
) STRICT;
CREATE TABLE events (
    seq            INTEGER PRIMARY KEY NOT NULL,
    device         TEXT    NOT NULL,
    hlc_wall_ms    INTEGER NOT NULL,
    hlc_logical    INTEGER NOT NULL,
    event_time_ms  INTEGER NOT NULL,
    kind           INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    body           BLOB    NOT NULL,
    chain          BLOB    CHECK (chain IS NULL OR length(chain) = 32)
) STRICT;
CREATE TABLE watermarks (
    upstream TEXT    NOT NULL,
    kind     TEXT    NOT NULL CHECK (kind IN ('custody', 'commit')),
    seq      INTEGER NOT NULL,
    PRIMARY KEY (upstream, kind)
) STRICT;
CREATE TABLE sources (
    source TEXT    PRIMARY KEY NOT NULL,
    high   INTEGER NOT NULL
) STRICT;
CREATE TABLE shadow_saves (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    full  INTEGER NOT NULL,
    bytes BLOB    NOT NULL
) STRICT;
";

/// An event ready for the ledger: validated and encoded by the producer (off the writer thread);
/// the writer only assigns its seq and clock stamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    event_time: Millis,
    kind: EventKind,
    schema_version: u16,
    body: Vec<u8>,
}

impl NewEvent {
    /// Validates `payload` against its schema and encodes it. Errors are the producer's: nothing
    /// is written.
    pub fn new(event_time: Millis, payload: &Payload) -> Result<Self, StoreError> {
        payload.validate().map_err(LedgerError::from)?;
        let mut body = Vec::new();
        payload.encode_body(&mut body);
        Ok(Self { event_time, kind: payload.kind(), schema_version: payload.schema_version(), body })
    }

    /// Encodes a payload the ledger made itself and knows to be valid (a gap event).
    fn trusted(event_time: Millis, payload: &Payload) -> Self {
        debug_assert!(payload.validate().is_ok(), "ledger-made payload is valid");
        let mut body = Vec::new();
        payload.encode_body(&mut body);
        Self { event_time, kind: payload.kind(), schema_version: payload.schema_version(), body }
    }

    /// What the event counts against the byte budget.
    pub fn cost_bytes(&self) -> u64 {
        self.body.len() as u64 + EVENT_ROW_OVERHEAD_BYTES
    }
}

/// A group-commit request: events, and optionally the position in an outside source (the
/// firmware's record counter) that they bring the ledger up to, written in the same transaction.
#[derive(Clone, Copy, Debug)]
pub struct RecordRequest<'a> {
    /// The events, one all-or-nothing unit.
    pub events: &'a [NewEvent],
    /// `(source, high)`: after this request the ledger holds the source's records up to `high`.
    pub source: Option<(&'a str, u64)>,
}

impl<'a> RecordRequest<'a> {
    /// Events produced on this device, with no outside source.
    pub fn local(events: &'a [NewEvent]) -> Self {
        Self { events, source: None }
    }
}

/// A snapshot of the store for operators and the `status` command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    /// This device.
    pub device_id: String,
    /// The seq the next event will get.
    pub next_seq: u64,
    /// Highest seq recorded (or covered).
    pub high_seq: u64,
    /// Lowest seq still held (`high_seq + 1` when none is).
    pub first_held_seq: u64,
    /// Events held in the ledger.
    pub held_events: u64,
    /// Events not yet committed upstream: `high_seq - committed_seq`.
    pub backlog_events: u64,
    /// The cloud store holds everything up to here.
    pub committed_seq: u64,
    /// Per upstream (gateway), the highest seq it holds durably.
    pub custody_seqs: BTreeMap<String, u64>,
    /// Bytes the held events count against the budget.
    pub used_bytes: u64,
    /// The byte budget.
    pub budget_bytes: u64,
    /// The policy when the budget is full.
    pub full_policy: FullPolicy,
    /// The database file's size (`page_count * page_size`), WAL excluded.
    pub database_bytes: u64,
    /// The WAL file's size.
    pub wal_bytes: u64,
    /// Free pages inside the database file, not yet given back.
    pub free_pages: u64,
    /// Rows of saved shadow (one full save plus increments).
    pub shadow_saves: u64,
    /// The clock's last stamp.
    pub hlc_last: Hlc,
}

/// What the in-memory state of the ledger holds; restored wholesale when a transaction fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LedgerState {
    /// Highest seq covered.
    high: Seq,
    /// Lowest seq held; `high + 1` when none is.
    low: Seq,
    /// Highest seq committed upstream.
    committed: Seq,
    clock: HlcClock,
    used_bytes: u64,
    /// The chain value at `high`, if known.
    head: Option<ChainHash>,
    /// The chain value at `low - 1`, if known (what `floor_chain` in `meta` holds).
    floor: Option<ChainHash>,
    /// A seq (the commit watermark when it was written) and the chain value after it, if known
    /// (what `anchor_chain` in `meta` holds).
    anchor: Option<(Seq, ChainHash)>,
}

/// The latest desired state for one watcher: a slot that holds only the newest value, so a
/// slow watcher never makes the store buffer without bound.
#[derive(Debug, Default)]
struct WatchSlot {
    latest: Mutex<Option<Value>>,
    ready: Condvar,
}

/// Receives the shadow's `desired` section whenever a sync changes it. Only the newest value is
/// kept; intermediate ones a slow watcher missed are superseded by it.
#[derive(Debug)]
pub struct DesiredWatch {
    slot: Arc<WatchSlot>,
}

impl DesiredWatch {
    /// The newest desired state not yet taken, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Value> {
        let guard = self.slot.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (mut guard, _) = self
            .slot
            .ready
            .wait_timeout_while(guard, timeout, |latest| latest.is_none())
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.take()
    }

    /// The newest desired state not yet taken, without waiting.
    pub fn try_recv(&self) -> Option<Value> {
        self.slot.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }
}

/// The device's store. See the module documentation.
#[derive(Debug)]
pub struct DeviceStore {
    db: Connection,
    path: PathBuf,
    device: DeviceId,
    config: LedgerConfig,
    state: LedgerState,
    custody: BTreeMap<String, Seq>,
    shadow: Shadow,
    shadow_saves: u64,
    /// The next shadow save must be a full one (a save failed after taking an increment).
    shadow_full_pending: bool,
    desired_seen: Value,
    watchers: Vec<Arc<WatchSlot>>,
    /// Counts local edits of the shadow, so the uplink knows when to offer a sync message.
    local_shadow_edits: u64,
}

/// An SQLite error aborts the whole transaction; any other error refuses one request.
type TxResult<T> = Result<Result<T, StoreError>, rusqlite::Error>;

impl DeviceStore {
    /// Creates a new ledger database at `path` for `device` and opens it. Fails if a file is
    /// already there.
    pub fn create(path: &Path, device: DeviceId, config: LedgerConfig) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError::AlreadyExists { path: path.to_path_buf() });
        }
        {
            let db = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            // auto_vacuum must be chosen before the first table exists; INCREMENTAL lets pruning
            // give pages back to the file system in small steps.
            db.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
            db.pragma_update(None, "journal_mode", "WAL")?;
            db.pragma_update(None, "synchronous", config.synchronous.pragma_value())?;
            db.execute_batch("BEGIN IMMEDIATE")?;
            db.execute_batch(SCHEMA_SQL)?;
            db.pragma_update(None, "application_id", APPLICATION_ID)?;
            db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('device', ?1), ('high', 0), ('committed', 0),
                 ('hlc_wall_ms', 0), ('hlc_logical', 0), ('floor_chain', ?2)",
                params![device.as_str(), ChainHash::genesis(&device).0],
            )?;
            let replica = replica_name(device);
            let mut shadow = Shadow::new(&replica, ShadowLimits::default());
            db.execute("INSERT INTO shadow_saves (full, bytes) VALUES (1, ?1)", params![shadow.save()])?;
            db.execute_batch("COMMIT")?;
        }
        // The new file's directory entry must be durable too, or a power cut could lose the
        // whole ledger together with everything acknowledged into it.
        sync_dir(path)?;
        Self::open(path, Some(device), config)
    }

    /// Opens the ledger database at `path`, checking that it is a tidesync device ledger (of
    /// `expect_device`, if given) before SQLite writes anything to it. A foreign or corrupt file
    /// is reported and left as it was.
    pub fn open(path: &Path, expect_device: Option<DeviceId>, config: LedgerConfig) -> Result<Self, StoreError> {
        check_header(path)?;
        let db =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        db.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
        // Reading the schema first: a damaged file fails here, before any pragma could write.
        let user_version: i64 = db.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if user_version != SCHEMA_VERSION && user_version != SCHEMA_VERSION_UNCHAINED {
            return Err(StoreError::SchemaVersion {
                path: path.to_path_buf(),
                found: user_version,
                supported: SCHEMA_VERSION,
            });
        }
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", config.synchronous.pragma_value())?;
        // Keep the WAL from staying large after a burst.
        db.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)?;

        let device_name: String = meta(&db, "device")?;
        let device = DeviceId::new(&device_name).map_err(|_| StoreError::Meta { key: "device" })?;
        if let Some(expected) = expect_device {
            if expected != device {
                return Err(StoreError::DeviceMismatch { expected, found: device_name });
            }
        }
        let high = Seq(meta(&db, "high")?);
        let committed = Seq(meta(&db, "committed")?);
        let hlc_meta = Hlc { wall_ms: meta(&db, "hlc_wall_ms")?, logical: meta(&db, "hlc_logical")? };
        let (n_events, low, max_seq, body_bytes): (u64, Option<u64>, Option<u64>, u64) = db.query_row(
            "SELECT COUNT(*), MIN(seq), MAX(seq), COALESCE(SUM(length(body)), 0) FROM events",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )?;
        let hlc_max: Option<(u64, u32)> = db
            .query_row(
                "SELECT hlc_wall_ms, hlc_logical FROM events ORDER BY hlc_wall_ms DESC, hlc_logical DESC LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        // `high` is written with every insert; a larger seq on disk would mean a damaged file.
        if max_seq.is_some_and(|max_seq| max_seq > high.0) {
            return Err(StoreError::Meta { key: "high" });
        }
        let low = Seq(low.unwrap_or(high.0 + 1));
        if n_events != high.0 + 1 - low.0 {
            return Err(StoreError::Meta { key: "events" });
        }
        let hlc_events = hlc_max.map_or(Hlc::default(), |(wall_ms, logical)| Hlc { wall_ms, logical });
        let clock = HlcClock::resume(hlc_meta.max(hlc_events));
        if user_version == SCHEMA_VERSION_UNCHAINED {
            migrate_chains(&db, device, low, high)?;
        }
        let floor = floor_chain(&db)?;
        let anchor = anchor_chain(&db)?;
        let head = if low <= high { stored_chain(&db, high)? } else { floor };
        let state = LedgerState {
            high,
            low,
            committed,
            clock,
            used_bytes: body_bytes + n_events * EVENT_ROW_OVERHEAD_BYTES,
            head,
            floor,
            anchor,
        };

        let mut custody = BTreeMap::new();
        {
            let mut statement = db.prepare("SELECT upstream, seq FROM watermarks WHERE kind = 'custody'")?;
            let rows = statement.query_map([], |row| Ok((row.get::<_, String>(0)?, Seq(row.get(1)?))))?;
            for row in rows {
                let (upstream, seq) = row?;
                custody.insert(upstream, seq);
            }
        }
        let (shadow, shadow_saves) = load_shadow(&db, device)?;
        let desired_seen = shadow.desired();
        tracing::info!(%device, high = high.0, low = low.0, committed = committed.0, path = %path.display(), "ledger opened");
        Ok(Self {
            db,
            path: path.to_path_buf(),
            device,
            config,
            state,
            custody,
            shadow,
            shadow_saves,
            shadow_full_pending: false,
            desired_seen,
            watchers: Vec::new(),
            local_shadow_edits: 0,
        })
    }

    /// This store's device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ledger settings in force.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// The SQLite connection, for checks (`PRAGMA integrity_check`) and tests.
    pub fn connection(&self) -> &Connection {
        &self.db
    }

    /// Records `events` as one all-or-nothing unit, stamped with the wall clock `wall`. Returns
    /// the seqs they got.
    pub fn record(&mut self, wall: Millis, events: &[NewEvent]) -> Result<SeqRange, StoreError> {
        let mut results = self.record_group(wall, &[RecordRequest::local(events)]);
        results.pop().unwrap_or(Err(StoreError::AgentStopped))
    }

    /// Records `events` that bring the ledger up to record `source_high` of `source`, in one
    /// transaction with the source's watermark, so a record re-sent after a lost acknowledgement
    /// is refused with [`StoreError::AlreadyRecorded`] instead of stored twice.
    pub fn record_from_source(
        &mut self,
        wall: Millis,
        source: &str,
        source_high: u64,
        events: &[NewEvent],
    ) -> Result<SeqRange, StoreError> {
        let mut results = self.record_group(wall, &[RecordRequest { events, source: Some((source, source_high)) }]);
        results.pop().unwrap_or(Err(StoreError::AgentStopped))
    }

    /// The highest record of `source` the ledger holds (0 if none).
    pub fn source_high(&self, source: &str) -> Result<u64, StoreError> {
        Ok(self
            .db
            .query_row("SELECT high FROM sources WHERE source = ?1", params![source], |row| row.get(0))
            .optional()?
            .unwrap_or(0))
    }

    /// Records several producers' requests in one transaction (a group commit): one result per
    /// request, in order. A request the ledger refuses (budget full) fails alone and writes
    /// nothing; an SQLite failure fails them all and writes nothing.
    pub fn record_group(&mut self, wall: Millis, requests: &[RecordRequest<'_>]) -> Vec<Result<SeqRange, StoreError>> {
        let before = self.state;
        let outcome = self.begin().and_then(|()| {
            let mut results = Vec::with_capacity(requests.len());
            for request in requests {
                results.push(self.record_request_in_tx(wall, request)?);
            }
            self.write_state()?;
            self.db.execute_batch("COMMIT")?;
            Ok(results)
        });
        match outcome {
            Ok(results) => results,
            Err(error) => {
                self.rollback(before, &error);
                let error = Arc::new(error);
                requests.iter().map(|_| Err(StoreError::Commit(Arc::clone(&error)))).collect()
            }
        }
    }

    /// Sets `key` of the reported shadow to `value` and records the `shadow_reported` event that
    /// says so, in one transaction. Returns the event's id.
    pub fn report(&mut self, wall: Millis, key: &str, value: &Value) -> Result<EventId, StoreError> {
        let before_shadow = self.shadow.clone();
        let before_saves = self.shadow_saves;
        let before = self.state;
        self.shadow.set(Section::Reported, key, value)?;
        let payload =
            Payload::ShadowReported(tidesync_core::event::ShadowReported { reported: self.shadow.reported() });
        let new_event = match NewEvent::new(Millis(wall.0), &payload) {
            Ok(new_event) => new_event,
            Err(error) => {
                self.shadow = before_shadow;
                return Err(error);
            }
        };
        let outcome = self.begin().and_then(|()| {
            let recorded = match self.record_in_tx(wall, std::slice::from_ref(&new_event))? {
                Ok(recorded) => recorded,
                Err(refused) => return Ok(Err(refused)),
            };
            self.save_shadow_in_tx()?;
            self.write_state()?;
            self.db.execute_batch("COMMIT")?;
            Ok(Ok(recorded))
        });
        let refused = match outcome {
            Ok(Ok(recorded)) => {
                self.local_shadow_edits += 1;
                return Ok(EventId { device: self.device, seq: recorded.last });
            }
            Ok(Err(refused)) => {
                let _ = self.db.execute_batch("ROLLBACK");
                self.state = before;
                refused
            }
            Err(error) => {
                self.rollback(before, &error);
                StoreError::Sqlite(error)
            }
        };
        self.shadow = before_shadow;
        self.shadow_saves = before_saves;
        // The clone's save cursor may not match what is on disk; a full save is always right.
        self.shadow_full_pending = true;
        Err(refused)
    }

    /// Persists the shadow after a sync session changed it (on `SessionEvent::ShadowChanged`),
    /// and tells the watchers if `desired` changed.
    pub fn persist_shadow(&mut self) -> Result<(), StoreError> {
        let before_saves = self.shadow_saves;
        let outcome = self.begin().and_then(|()| {
            self.save_shadow_in_tx()?;
            self.db.execute_batch("COMMIT")
        });
        if let Err(error) = outcome {
            let state = self.state;
            self.rollback(state, &error);
            self.shadow_saves = before_saves;
            self.shadow_full_pending = true;
            return Err(error.into());
        }
        let desired = self.shadow.desired();
        if desired != self.desired_seen {
            self.desired_seen = desired.clone();
            self.watchers.retain(|slot| Arc::strong_count(slot) > 1);
            for slot in &self.watchers {
                *slot.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(desired.clone());
                slot.ready.notify_all();
            }
        }
        Ok(())
    }

    /// A watch that receives the desired section each time a sync changes it.
    pub fn watch_desired(&mut self) -> DesiredWatch {
        let slot = Arc::new(WatchSlot::default());
        self.watchers.push(Arc::clone(&slot));
        DesiredWatch { slot }
    }

    /// How many local edits the shadow has had since the store was opened.
    pub fn local_shadow_edits(&self) -> u64 {
        self.local_shadow_edits
    }

    /// The in-memory shadow (reported, desired, delta).
    pub fn shadow(&self) -> &Shadow {
        &self.shadow
    }

    /// Records that `upstream` (a gateway) holds this device's events up to `up_to` durably.
    /// Under storage pressure they may then be evicted before they are committed.
    pub fn mark_custody(&mut self, upstream: &str, up_to: Seq) -> Result<(), StoreError> {
        if self.custody.get(upstream).is_some_and(|seq| *seq >= up_to) {
            return Ok(());
        }
        self.db.execute(
            "INSERT INTO watermarks (upstream, kind, seq) VALUES (?1, 'custody', ?2)
             ON CONFLICT (upstream, kind) DO UPDATE SET seq = max(seq, excluded.seq)",
            params![upstream, up_to.0],
        )?;
        self.custody.insert(upstream.to_string(), up_to);
        Ok(())
    }

    /// Records that the cloud store holds this device's events up to `up_to`, then deletes one
    /// batch of them; [`DeviceStore::prune_step`] deletes the rest.
    pub fn mark_committed_seq(&mut self, up_to: Seq) -> Result<(), StoreError> {
        if up_to <= self.state.committed {
            return Ok(());
        }
        let before = self.state;
        // The chain at the commit watermark, while this ledger still knows it: where a hole proof
        // of a later batch starts, so the cloud can check that it continues what it holds.
        let anchor = self.chain_at(up_to)?.map(|chain| (up_to, chain));
        if up_to > self.state.high {
            // The cloud holds seqs this ledger never made: its database was lost or replaced.
            // Continue after them, so new events are not taken for duplicates and dropped.
            tracing::warn!(
                high = self.state.high.0,
                committed = up_to.0,
                "commit beyond the ledger's high: skipping ahead"
            );
            self.state.high = up_to;
            // Our chain does not reach there: what we record next cannot be sealed.
            self.state.head = None;
        }
        self.state.committed = up_to;
        let outcome = self.begin().and_then(|()| {
            self.db.execute(
                "INSERT INTO watermarks (upstream, kind, seq) VALUES (?1, 'commit', ?2)
                 ON CONFLICT (upstream, kind) DO UPDATE SET seq = max(seq, excluded.seq)",
                params![COMMIT_UPSTREAM, up_to.0],
            )?;
            if let Some((seq, chain)) = anchor {
                let mut value = Vec::with_capacity(ANCHOR_BYTES);
                value.extend_from_slice(&seq.0.to_le_bytes());
                value.extend_from_slice(&chain.0);
                self.db
                    .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('anchor_chain', ?1)")?
                    .execute(params![value])?;
                self.state.anchor = anchor;
            }
            self.write_state()?;
            self.db.execute_batch("COMMIT")
        });
        if let Err(error) = outcome {
            self.rollback(before, &error);
            return Err(error.into());
        }
        self.prune_step()?;
        Ok(())
    }

    /// Whether committed events are still waiting to be deleted.
    pub fn prune_pending(&self) -> bool {
        self.state.low <= self.state.committed && self.state.low <= self.state.high
    }

    /// Deletes up to [`PRUNE_BATCH_EVENTS`] committed events in one transaction and gives up to
    /// [`VACUUM_PAGES_PER_STEP`] free pages back to the file system. Returns whether more remain.
    pub fn prune_step(&mut self) -> Result<bool, StoreError> {
        if !self.prune_pending() {
            return Ok(false);
        }
        let before = self.state;
        let up_to = Seq(self.state.committed.0.min(self.state.low.0.saturating_add(PRUNE_BATCH_EVENTS - 1)));
        let outcome = self.begin().and_then(|()| {
            self.delete_through(up_to)?;
            self.write_state()?;
            self.db.execute_batch("COMMIT")
        });
        if let Err(error) = outcome {
            self.rollback(before, &error);
            return Err(error.into());
        }
        self.db.execute_batch(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES_PER_STEP})"))?;
        Ok(self.prune_pending())
    }

    /// Deletes every committed event and gives all free pages back.
    pub fn prune_all(&mut self) -> Result<(), StoreError> {
        while self.prune_step()? {}
        self.db.execute_batch("PRAGMA incremental_vacuum")?;
        Ok(())
    }

    /// Up to `max_events` held events from `from` on, in seq order.
    pub fn events_from(&self, from: Seq, max_events: usize) -> Result<Vec<Event>, StoreError> {
        let mut statement = self.db.prepare_cached(
            "SELECT seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body
             FROM events WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = statement.query(params![from.0, max_events as u64])?;
        let mut events = Vec::new();
        while let Some(row) = rows.next()? {
            let seq = Seq(row.get(0)?);
            let kind = EventKind::from_tag(row.get(4)?);
            let schema_version: u16 = row.get(5)?;
            let body: Vec<u8> = row.get(6)?;
            let payload = Payload::decode_body(kind, schema_version, &body)
                .map_err(|source| StoreError::CorruptEvent { seq, source })?;
            events.push(Event {
                id: EventId { device: self.device, seq },
                hlc: Hlc { wall_ms: row.get(1)?, logical: row.get(2)? },
                event_time: Millis(row.get(3)?),
                payload,
            });
        }
        Ok(events)
    }

    /// The chain values after up to `max_events` held events from `from` on, in seq order
    /// (`None` where the chain is unknown).
    pub fn chains_from(&self, from: Seq, max_events: usize) -> Result<Vec<(Seq, Option<ChainHash>)>, StoreError> {
        let mut statement =
            self.db.prepare_cached("SELECT seq, chain FROM events WHERE seq >= ?1 ORDER BY seq LIMIT ?2")?;
        let mut rows = statement.query(params![from.0, max_events as u64])?;
        let mut chains = Vec::new();
        while let Some(row) = rows.next()? {
            let seq = Seq(row.get(0)?);
            chains.push((seq, chain_value(row.get(1)?).ok_or(StoreError::CorruptChain { seq })?));
        }
        Ok(chains)
    }

    /// The chain value after `seq`: genesis at 0, the floor just before the held events, the
    /// stored value of a held event; `None` if unknown or not covered.
    pub fn chain_at(&self, seq: Seq) -> Result<Option<ChainHash>, StoreError> {
        if seq == Seq::ZERO {
            return Ok(Some(ChainHash::genesis(&self.device)));
        }
        if seq.next() == self.state.low {
            return Ok(self.state.floor);
        }
        if seq == self.state.high {
            return Ok(self.state.head);
        }
        if seq < self.state.low || seq > self.state.high {
            return Ok(None);
        }
        stored_chain(&self.db, seq)
    }

    /// The store's status.
    pub fn status(&self) -> Result<Status, StoreError> {
        let page_count: u64 = self.db.pragma_query_value(None, "page_count", |row| row.get(0))?;
        let page_size: u64 = self.db.pragma_query_value(None, "page_size", |row| row.get(0))?;
        let free_pages: u64 = self.db.pragma_query_value(None, "freelist_count", |row| row.get(0))?;
        let mut wal_path = self.path.clone().into_os_string();
        wal_path.push("-wal");
        let wal_bytes = std::fs::metadata(&wal_path).map_or(0, |metadata| metadata.len());
        let state = &self.state;
        Ok(Status {
            device_id: self.device.to_string(),
            next_seq: state.high.next().0,
            high_seq: state.high.0,
            first_held_seq: state.low.0,
            held_events: state.high.0 + 1 - state.low.0,
            backlog_events: state.high.0.saturating_sub(state.committed.0),
            committed_seq: state.committed.0,
            custody_seqs: self.custody.iter().map(|(upstream, seq)| (upstream.clone(), seq.0)).collect(),
            used_bytes: state.used_bytes,
            budget_bytes: self.config.budget_bytes,
            full_policy: self.config.full_policy,
            database_bytes: page_count * page_size,
            wal_bytes,
            free_pages,
            shadow_saves: self.shadow_saves,
            hlc_last: state.clock.last(),
        })
    }

    /// The clock's last stamp.
    pub fn hlc_last(&self) -> Hlc {
        self.state.clock.last()
    }

    fn begin(&self) -> Result<(), rusqlite::Error> {
        self.db.execute_batch("BEGIN IMMEDIATE")
    }

    /// Rolls back the open transaction after `error` and restores the in-memory state.
    fn rollback(&mut self, before: LedgerState, error: &rusqlite::Error) {
        tracing::warn!(%error, "ledger transaction failed; rolled back");
        // A failed COMMIT may already have ended the transaction; then there is nothing to undo.
        let _ = self.db.execute_batch("ROLLBACK");
        self.state = before;
    }

    /// One request inside the open transaction: check and raise its source watermark, then record.
    fn record_request_in_tx(&mut self, wall: Millis, request: &RecordRequest<'_>) -> TxResult<SeqRange> {
        let Some((source, source_high)) = request.source else {
            return self.record_in_tx(wall, request.events);
        };
        let held: u64 = self
            .db
            .query_row("SELECT high FROM sources WHERE source = ?1", params![source], |row| row.get(0))
            .optional()?
            .unwrap_or(0);
        if source_high <= held {
            return Ok(Err(StoreError::AlreadyRecorded { origin: source.to_string(), high: held }));
        }
        let recorded = match self.record_in_tx(wall, request.events)? {
            Ok(recorded) => recorded,
            Err(refused) => return Ok(Err(refused)),
        };
        self.db.execute(
            "INSERT INTO sources (source, high) VALUES (?1, ?2)
             ON CONFLICT (source) DO UPDATE SET high = max(high, excluded.high)",
            params![source, source_high],
        )?;
        Ok(Ok(recorded))
    }

    /// One request inside the open transaction: make room, then insert.
    fn record_in_tx(&mut self, wall: Millis, events: &[NewEvent]) -> TxResult<SeqRange> {
        let incoming_bytes: u64 = events.iter().map(NewEvent::cost_bytes).sum();
        if let Err(refused) = self.make_room(wall, incoming_bytes)? {
            return Ok(Err(refused));
        }
        let first = self.state.high.next();
        self.insert_all(wall, events)?;
        Ok(Ok(SeqRange { device: self.device, first, last: self.state.high }))
    }

    fn insert(&mut self, wall: Millis, new_event: &NewEvent) -> Result<Seq, rusqlite::Error> {
        self.insert_all(wall, std::slice::from_ref(new_event))?;
        Ok(self.state.high)
    }

    /// Inserts `events` with the next seqs and clock stamps, preparing the statement once: the
    /// per-row cost is then SQLite's alone, as in a hand-written bulk insert.
    fn insert_all(&mut self, wall: Millis, events: &[NewEvent]) -> Result<(), rusqlite::Error> {
        let mut statement = self.db.prepare_cached(
            "INSERT INTO events (seq, device, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body, chain)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        let device = self.device.as_str();
        let mut high = self.state.high;
        let mut chain = self.state.head;
        let mut used_bytes = 0;
        // The clock is advanced on a copy and kept only if every insert succeeded; on an error
        // the caller rolls back the transaction and restores the state anyway.
        let mut clock = self.state.clock;
        for new_event in events {
            let seq = high.next();
            let hlc = clock.now(wall);
            chain = chain.map(|before| {
                before.next_encoded(&EncodedEvent {
                    id: EventId { device: self.device, seq },
                    hlc,
                    event_time: new_event.event_time,
                    kind: new_event.kind,
                    schema_version: new_event.schema_version,
                    body: &new_event.body,
                })
            });
            statement.execute(params![
                seq.0,
                device,
                hlc.wall_ms,
                hlc.logical,
                new_event.event_time.0,
                new_event.kind.tag(),
                new_event.schema_version,
                new_event.body,
                chain.as_ref().map(|chain| &chain.0[..]),
            ])?;
            high = seq;
            used_bytes += new_event.cost_bytes();
        }
        drop(statement);
        if let Some(first) = events.first().map(|_| self.state.high.next()) {
            self.state.low = self.state.low.min(first);
        }
        self.state.high = high;
        self.state.head = chain;
        self.state.clock = clock;
        self.state.used_bytes += used_bytes;
        Ok(())
    }

    fn fits(&self, incoming_bytes: u64) -> bool {
        self.state.used_bytes + incoming_bytes <= self.config.budget_bytes
    }

    /// Frees budget for `incoming_bytes`: committed events first, then custody-acked ones, then
    /// by policy refuse or drop the oldest (recording a gap).
    fn make_room(&mut self, wall: Millis, incoming_bytes: u64) -> TxResult<()> {
        if self.fits(incoming_bytes) {
            return Ok(Ok(()));
        }
        let budget_bytes = self.config.budget_bytes;
        if self.prune_pending() {
            self.delete_through(self.state.committed)?;
            if self.fits(incoming_bytes) {
                return Ok(Ok(()));
            }
        }
        let slack_bytes = budget_bytes / EVICT_SLACK_DIVISOR;
        let custody = self.custody.values().copied().max().unwrap_or(Seq::ZERO).min(self.state.high);
        if custody >= self.state.low {
            let need_bytes = (self.state.used_bytes + incoming_bytes + slack_bytes).saturating_sub(budget_bytes);
            if let Some((first, last)) = self.evict_oldest(need_bytes, custody)? {
                tracing::info!(
                    first = first.0,
                    last = last.0,
                    "evicted custody-acknowledged events under storage pressure"
                );
            }
            if self.fits(incoming_bytes) {
                return Ok(Ok(()));
            }
        }
        let full = |used_bytes| StoreError::Ledger(LedgerError::Full { used_bytes, budget_bytes });
        match self.config.full_policy {
            FullPolicy::Refuse => Ok(Err(full(self.state.used_bytes))),
            FullPolicy::DropOldest => {
                let gap_probe =
                    Payload::Gap(Gap { first: Seq(u64::MAX), last: Seq(u64::MAX), reason: GapReason::StorageFull });
                let gap_bytes = gap_probe.encoded_body_len() as u64 + EVENT_ROW_OVERHEAD_BYTES;
                if incoming_bytes + gap_bytes > budget_bytes {
                    return Ok(Err(full(self.state.used_bytes)));
                }
                let need_bytes =
                    (self.state.used_bytes + incoming_bytes + gap_bytes + slack_bytes).saturating_sub(budget_bytes);
                let Some((first, last)) = self.evict_oldest(need_bytes, self.state.high)? else {
                    return Ok(Err(full(self.state.used_bytes)));
                };
                tracing::warn!(
                    first = first.0,
                    last = last.0,
                    "storage full: dropped unacknowledged events, recording a gap"
                );
                let gap = NewEvent::trusted(wall, &Payload::Gap(Gap { first, last, reason: GapReason::StorageFull }));
                self.insert(wall, &gap)?;
                if self.fits(incoming_bytes) {
                    Ok(Ok(()))
                } else {
                    Ok(Err(full(self.state.used_bytes)))
                }
            }
        }
    }

    /// Deletes the oldest held events, at most up to `up_to`, until at least `need_bytes` are
    /// freed. Returns the seqs a gap for them must name: the deleted ones, widened back over the
    /// seqs named by any gap event among them.
    fn evict_oldest(&mut self, need_bytes: u64, up_to: Seq) -> Result<Option<(Seq, Seq)>, rusqlite::Error> {
        let first = self.state.low;
        let mut covered_from = first;
        let mut last = None;
        {
            let mut statement = self.db.prepare_cached(
                "SELECT seq, length(body), schema_version, CASE WHEN kind = ?3 THEN body END FROM events
                 WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
            )?;
            let mut rows = statement.query(params![first.0, up_to.0, EventKind::Gap.tag()])?;
            let mut freed_bytes = 0;
            while let Some(row) = rows.next()? {
                let seq: u64 = row.get(0)?;
                let body_bytes: u64 = row.get(1)?;
                // A gap event dropped now takes its explanation with it: the gap recorded for
                // this eviction must cover the seqs it named too.
                if let Some(body) = row.get::<_, Option<Vec<u8>>>(3)? {
                    let schema_version: u16 = row.get(2)?;
                    if let Ok(Payload::Gap(dropped)) = Payload::decode_body(EventKind::Gap, schema_version, &body) {
                        covered_from = covered_from.min(dropped.first);
                    }
                }
                freed_bytes += body_bytes + EVENT_ROW_OVERHEAD_BYTES;
                last = Some(Seq(seq));
                if freed_bytes >= need_bytes {
                    break;
                }
            }
        }
        let Some(last) = last else {
            return Ok(None);
        };
        self.delete_through(last)?;
        Ok(Some((covered_from, last)))
    }

    /// Deletes held events `low..=up_to` and advances `low`.
    fn delete_through(&mut self, up_to: Seq) -> Result<(), rusqlite::Error> {
        let up_to = up_to.min(self.state.high);
        if up_to < self.state.low {
            self.state.low = self.state.low.max(up_to.next());
            return Ok(());
        }
        let (n_events, body_bytes): (u64, u64) = self.db.query_row(
            "SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM events WHERE seq BETWEEN ?1 AND ?2",
            params![self.state.low.0, up_to.0],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        // The chain after the last deleted event becomes the floor, so a batch that starts after
        // it (or with the hole it leaves) can still be sealed.
        let floor: Option<Option<Vec<u8>>> = self
            .db
            .prepare_cached("SELECT chain FROM events WHERE seq = ?1")?
            .query_row(params![up_to.0], |row| row.get(0))
            .optional()?;
        let floor = floor.flatten().and_then(|bytes| chain_value(Some(bytes)).flatten());
        self.db.execute("DELETE FROM events WHERE seq BETWEEN ?1 AND ?2", params![self.state.low.0, up_to.0])?;
        self.state.used_bytes -= body_bytes + n_events * EVENT_ROW_OVERHEAD_BYTES;
        self.state.low = up_to.next();
        self.set_floor(floor)?;
        Ok(())
    }

    /// Writes the chain value at `low - 1` (inside the open transaction).
    fn set_floor(&mut self, floor: Option<ChainHash>) -> Result<(), rusqlite::Error> {
        match floor {
            Some(chain) => self
                .db
                .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('floor_chain', ?1)")?
                .execute(params![chain.0])?,
            None => self.db.prepare_cached("DELETE FROM meta WHERE key = 'floor_chain'")?.execute([])?,
        };
        self.state.floor = floor;
        Ok(())
    }

    fn write_state(&self) -> Result<(), rusqlite::Error> {
        let last = self.state.clock.last();
        let mut statement = self.db.prepare_cached(
            "INSERT OR REPLACE INTO meta (key, value) VALUES
             ('high', ?1), ('committed', ?2), ('hlc_wall_ms', ?3), ('hlc_logical', ?4)",
        )?;
        statement.execute(params![self.state.high.0, self.state.committed.0, last.wall_ms, last.logical])?;
        Ok(())
    }

    /// Appends the shadow's changes since the last save, or a full save that replaces every
    /// earlier row when increments have piled up (compaction).
    fn save_shadow_in_tx(&mut self) -> Result<(), rusqlite::Error> {
        if self.shadow_full_pending || self.shadow_saves > u64::from(self.config.shadow_increments_max) {
            let bytes = self.shadow.save();
            self.db.execute("DELETE FROM shadow_saves", [])?;
            self.db.execute("INSERT INTO shadow_saves (full, bytes) VALUES (1, ?1)", params![bytes])?;
            self.shadow_saves = 1;
            self.shadow_full_pending = false;
        } else {
            let bytes = self.shadow.save_incremental();
            if !bytes.is_empty() {
                self.db.execute("INSERT INTO shadow_saves (full, bytes) VALUES (0, ?1)", params![bytes])?;
                self.shadow_saves += 1;
            }
        }
        Ok(())
    }
}

/// The automerge actor of a device's own shadow replica.
pub fn replica_name(device: DeviceId) -> String {
    format!("device:{device}")
}

fn meta<T: rusqlite::types::FromSql>(db: &Connection, key: &'static str) -> Result<T, StoreError> {
    db.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |row| row.get(0))
        .optional()
        .map_err(|error| match error {
            rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::IntegralValueOutOfRange(..) => {
                StoreError::Meta { key }
            }
            other => StoreError::Sqlite(other),
        })?
        .ok_or(StoreError::Meta { key })
}

/// A stored chain value: `Some(None)` for NULL (unknown), `None` if it is not 32 bytes (damaged).
fn chain_value(bytes: Option<Vec<u8>>) -> Option<Option<ChainHash>> {
    match bytes {
        None => Some(None),
        Some(bytes) => <[u8; CHAIN_BYTES]>::try_from(bytes.as_slice()).ok().map(|chain| Some(ChainHash(chain))),
    }
}

/// The stored chain value after held event `seq`.
fn stored_chain(db: &Connection, seq: Seq) -> Result<Option<ChainHash>, StoreError> {
    let bytes: Option<Option<Vec<u8>>> = db
        .prepare_cached("SELECT chain FROM events WHERE seq = ?1")?
        .query_row(params![seq.0], |row| row.get(0))
        .optional()?;
    chain_value(bytes.flatten()).ok_or(StoreError::CorruptChain { seq })
}

/// The chain value at `low - 1` kept in `meta`, if known.
fn floor_chain(db: &Connection) -> Result<Option<ChainHash>, StoreError> {
    let bytes: Option<Vec<u8>> = db
        .query_row("SELECT value FROM meta WHERE key = 'floor_chain'", [], |row| row.get(0))
        .optional()
        .map_err(|error| match error {
            rusqlite::Error::InvalidColumnType(..) | rusqlite::Error::FromSqlConversionFailure(..) => {
                StoreError::Meta { key: "floor_chain" }
            }
            other => StoreError::Sqlite(other),
        })?;
    chain_value(bytes).ok_or(StoreError::Meta { key: "floor_chain" })
}

/// The `anchor_chain` kept in `meta`, if any: `None` when absent (older ledgers, or no commit
/// whose chain was known yet).
fn anchor_chain(db: &Connection) -> Result<Option<(Seq, ChainHash)>, StoreError> {
    let damaged = || StoreError::Meta { key: "anchor_chain" };
    let bytes: Option<Vec<u8>> = db
        .query_row("SELECT value FROM meta WHERE key = 'anchor_chain'", [], |row| row.get(0))
        .optional()
        .map_err(|error| match error {
            rusqlite::Error::InvalidColumnType(..) | rusqlite::Error::FromSqlConversionFailure(..) => damaged(),
            other => StoreError::Sqlite(other),
        })?;
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    if bytes.len() != ANCHOR_BYTES {
        return Err(damaged());
    }
    let (seq, chain) = bytes.split_at(8);
    let seq = <[u8; 8]>::try_from(seq).map_err(|_| damaged())?;
    let chain = <[u8; CHAIN_BYTES]>::try_from(chain).map_err(|_| damaged())?;
    Ok(Some((Seq(u64::from_le_bytes(seq)), ChainHash(chain))))
}

/// Migrates a schema-1 ledger (no chains) in one transaction: adds the `chain` column and, if the
/// ledger still holds (or covers nothing but) its first event, computes every held event's chain
/// from genesis; otherwise the chain before the held events is unknown and stays so.
fn migrate_chains(db: &Connection, device: DeviceId, low: Seq, high: Seq) -> Result<(), StoreError> {
    db.execute_batch("BEGIN IMMEDIATE")?;
    let outcome = (|| -> Result<bool, rusqlite::Error> {
        db.execute_batch("ALTER TABLE events ADD COLUMN chain BLOB CHECK (chain IS NULL OR length(chain) = 32)")?;
        let from_genesis = low == Seq::FIRST || high == Seq::ZERO;
        if from_genesis {
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('floor_chain', ?1)",
                params![ChainHash::genesis(&device).0],
            )?;
            let mut select = db.prepare(
                "SELECT seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body FROM events ORDER BY seq",
            )?;
            let mut update = db.prepare("UPDATE events SET chain = ?2 WHERE seq = ?1")?;
            let mut rows = select.query([])?;
            let mut chain = ChainHash::genesis(&device);
            while let Some(row) = rows.next()? {
                let seq = Seq(row.get(0)?);
                let body: Vec<u8> = row.get(6)?;
                chain = chain.next_encoded(&EncodedEvent {
                    id: EventId { device, seq },
                    hlc: Hlc { wall_ms: row.get(1)?, logical: row.get(2)? },
                    event_time: Millis(row.get(3)?),
                    kind: EventKind::from_tag(row.get(4)?),
                    schema_version: row.get(5)?,
                    body: &body,
                });
                update.execute(params![seq.0, chain.0])?;
            }
        }
        db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        db.execute_batch("COMMIT")?;
        Ok(from_genesis)
    })();
    match outcome {
        Ok(from_genesis) => {
            tracing::info!(%device, low = low.0, high = high.0, from_genesis, "ledger migrated to schema 2 (hash chain)");
            Ok(())
        }
        Err(error) => {
            let _ = db.execute_batch("ROLLBACK");
            Err(error.into())
        }
    }
}

fn load_shadow(db: &Connection, device: DeviceId) -> Result<(Shadow, u64), StoreError> {
    let replica = replica_name(device);
    let limits = ShadowLimits::default();
    let mut statement = db.prepare("SELECT full, bytes FROM shadow_saves ORDER BY id")?;
    let mut rows = statement.query([])?;
    let mut shadow: Option<Shadow> = None;
    let mut n_saves = 0;
    while let Some(row) = rows.next()? {
        let full: bool = row.get(0)?;
        let bytes: Vec<u8> = row.get(1)?;
        n_saves += 1;
        match shadow.as_mut() {
            None if full => shadow = Some(Shadow::load(&bytes, &replica, limits)?),
            None => return Err(StoreError::Meta { key: "shadow_saves" }),
            Some(loaded) => {
                loaded.load_incremental(&bytes)?;
            }
        }
    }
    let shadow = shadow.ok_or(StoreError::Meta { key: "shadow_saves" })?;
    Ok((shadow, n_saves))
}

/// Reads the SQLite header of `path` without SQLite, so that a foreign or damaged file is
/// refused before anything could write to it.
fn check_header(path: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Io { path: path.to_path_buf(), source };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::Missing { path: path.to_path_buf() })
        }
        Err(error) => return Err(io(error)),
    };
    let mut header = Vec::with_capacity(SQLITE_HEADER_BYTES);
    file.by_ref().take(SQLITE_HEADER_BYTES as u64).read_to_end(&mut header).map_err(io)?;
    let not_a_database = |reason: String| StoreError::NotADatabase { path: path.to_path_buf(), reason };
    if header.len() < SQLITE_HEADER_BYTES {
        return Err(not_a_database(format!("file has {} bytes, less than an SQLite header", header.len())));
    }
    if &header[..SQLITE_MAGIC.len()] != SQLITE_MAGIC {
        return Err(not_a_database("the file does not start with the SQLite magic string".to_string()));
    }
    let mut id_bytes = [0u8; 4];
    id_bytes.copy_from_slice(&header[HEADER_APPLICATION_ID_OFFSET..HEADER_APPLICATION_ID_OFFSET + 4]);
    let application_id = u32::from_be_bytes(id_bytes);
    if application_id != APPLICATION_ID {
        return Err(StoreError::Foreign { path: path.to_path_buf(), application_id });
    }
    Ok(())
}

/// Fsyncs the directory holding `path`, so that a newly created file's entry is durable.
fn sync_dir(path: &Path) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })
}

impl Ledger for DeviceStore {
    fn high(&self, device: &DeviceId) -> Seq {
        if *device == self.device {
            self.state.high
        } else {
            Seq::ZERO
        }
    }

    fn version_vector(&self) -> VersionVector {
        [(self.device, self.state.high)].into_iter().collect()
    }

    fn read(&self, device: &DeviceId, from: Seq, max_events: usize) -> Result<Option<EventBatch>, LedgerError> {
        let from = from.max(Seq::FIRST);
        if *device != self.device || from > self.state.high {
            return Ok(None);
        }
        let events = self.events_from(from, max_events.clamp(1, BATCH_EVENTS_MAX))?;
        if events.is_empty() {
            return Ok(None);
        }
        // Held events are contiguous (module invariant); seqs before the first one held are
        // declared as a hole by starting the batch at `from`.
        let mut batch = EventBatch::new(self.device, from, events)?;
        // Seals and the hole proof are the signing uplink's to make; the ledger says where the
        // chain stood before the first event.
        let prev = self.chain_at(Seq(batch.first_seq().0 - 1))?;
        batch.proof = prev.map(|prev| BatchProof { prev, seals: Vec::new(), hole: None });
        Ok(Some(batch))
    }

    fn append(&mut self, batch: &EventBatch) -> Result<Appended, LedgerError> {
        batch.validate()?;
        if batch.device != self.device {
            return Err(StoreError::ForeignDevice { own: Box::new(self.device), device: Box::new(batch.device) }.into());
        }
        let high = self.state.high;
        if batch.from > high.next() {
            return Err(LedgerError::Hole { device: batch.device, high, from: batch.from });
        }
        let Some(fresh) = batch.after(high) else {
            return Ok(Appended { high, n_new: 0 });
        };
        let before = self.state;
        // A hole declared in front of the fresh events would split the held run; skip past it.
        // After a hole only the sender's proof knows the chain.
        let hole_floor = fresh.dropped().map(|_| fresh.proof.as_ref().map(|proof| proof.prev));
        if let Some((_, last_dropped)) = fresh.dropped() {
            if self.state.low <= self.state.high {
                return Err(LedgerError::Hole { device: batch.device, high, from: last_dropped.next() });
            }
            self.state.high = last_dropped;
            self.state.low = last_dropped.next();
        }
        let outcome = self.begin().and_then(|()| {
            if let Some(floor) = hole_floor {
                self.set_floor(floor)?;
                self.state.head = floor;
            }
            let mut statement = self.db.prepare_cached(
                "INSERT INTO events (seq, device, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body, chain)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            let mut used_bytes = 0;
            let mut chain = self.state.head;
            for event in &fresh.events {
                let mut body = Vec::new();
                event.payload.encode_body(&mut body);
                used_bytes += body.len() as u64 + EVENT_ROW_OVERHEAD_BYTES;
                chain = chain.map(|before| {
                    before.next_encoded(&EncodedEvent {
                        id: event.id,
                        hlc: event.hlc,
                        event_time: event.event_time,
                        kind: event.kind(),
                        schema_version: event.schema_version(),
                        body: &body,
                    })
                });
                statement.execute(params![
                    event.id.seq.0,
                    self.device.as_str(),
                    event.hlc.wall_ms,
                    event.hlc.logical,
                    event.event_time.0,
                    event.kind().tag(),
                    event.schema_version(),
                    body,
                    chain.as_ref().map(|chain| &chain.0[..]),
                ])?;
            }
            drop(statement);
            self.state.head = chain;
            self.state.used_bytes += used_bytes;
            self.state.low = self.state.low.min(fresh.first_seq());
            self.state.high = fresh.last_seq();
            if let Some(last) = fresh.events.last() {
                self.state.clock.observe(Millis(0), last.hlc);
            }
            self.write_state()?;
            self.db.execute_batch("COMMIT")
        });
        if let Err(error) = outcome {
            self.rollback(before, &error);
            return Err(StoreError::Sqlite(error).into());
        }
        Ok(Appended { high: self.state.high, n_new: fresh.events.len() })
    }

    fn mark_committed(&mut self, device: DeviceId, up_to: Seq) -> Result<(), LedgerError> {
        if device != self.device {
            return Err(StoreError::ForeignDevice { own: Box::new(self.device), device: Box::new(device) }.into());
        }
        Ok(self.mark_committed_seq(up_to)?)
    }

    fn chain_head(&self, device: &DeviceId) -> Option<ChainHash> {
        if *device != self.device {
            return None;
        }
        if self.state.high == Seq::ZERO {
            return Some(ChainHash::genesis(device));
        }
        self.state.head
    }

    fn chain_before(&self, device: &DeviceId, from: Seq) -> (Seq, ChainHash) {
        let genesis = (Seq::ZERO, ChainHash::genesis(device));
        if *device != self.device {
            return genesis;
        }
        let at = Seq(from.0.saturating_sub(1));
        match self.chain_at(at) {
            Ok(Some(chain)) => return (at, chain),
            Ok(None) => {}
            // A damaged stored chain only makes the hole proof start earlier (wider, still true).
            Err(error) => tracing::warn!(seq = at.0, %error, "chain value unreadable: hole proof starts earlier"),
        }
        self.state.anchor.filter(|(seq, _)| *seq <= at).unwrap_or(genesis)
    }
}

impl Store for DeviceStore {
    fn shadow_mut(&mut self, device: &DeviceId) -> Result<Option<&mut Shadow>, ShadowError> {
        Ok((*device == self.device).then_some(&mut self.shadow))
    }

    fn shadow_devices(&self) -> Vec<DeviceId> {
        vec![self.device]
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod chain_tests;
