//! The cloud event store: one trait pair ([`EventReader`], [`EventWriter`]) with two backends
//! ([`sqlite`], the embedded default, and [`postgres`], at scale), and [`CloudStore`], which runs
//! core's cloud-side `sync::Ingest` over any backend (it implements core's `Ledger` and
//! `sync::Store`).
//!
//! The log has a *global position*: every stored event gets the next one when it is first
//! appended; a duplicate (same `(device, seq)`) is acknowledged and never stored twice. Per device
//! the store covers seqs `1..=high` contiguously (events held and holes the device declared), as
//! every ledger does, so its version vector is exact.
//!
//! Invariant: one writer appends events at a time (SQLite `BEGIN IMMEDIATE`; PostgreSQL an
//! advisory transaction lock), so positions are assigned and committed in order and a subscriber
//! that reads past its checkpoint never misses an event that commits later with a lower position.
//!
//! Invariant: a stream's `high` and holes are written in the same transaction as its events; a
//! shadow's document and its JSON view in the same transaction as each other.
//!
//! Invariant: a stream's chain head (`tidesync_core::auth`) is written in the same transaction as
//! the events that move it, tagged with the `high` it belongs to; a head whose tag is not the
//! stream's `high` is unknown, never wrong.

pub mod postgres;
pub mod sqlite;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tidesync_core::auth::ChainHash;
use tidesync_core::event::{DeviceId, Event, EventId, EventKind, GatewayId, Hlc, Millis, Payload, Seq};
use tidesync_core::ledger::{Appended, Ledger, LedgerError};
use tidesync_core::shadow::{Shadow, ShadowError, ShadowLimits};
use tidesync_core::sync::Store;
use tidesync_core::vv::VersionVector;
use tidesync_core::wire::{EventBatch, BATCH_EVENTS_MAX};

/// A place in the global log. Position 1 is the first event ever stored; `Position(0)` means
/// "before everything" (the checkpoint of a projection that has seen nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Position(pub u64);

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the store records about an event's arrival, beside the event itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestMeta {
    /// The gateway that delivered it.
    pub gateway: GatewayId,
    /// The cloud's wall clock when it was stored.
    pub ingest_time: Millis,
}

/// An event as the cloud store holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// Its place in the global log.
    pub position: Position,
    /// The event.
    pub event: Event,
    /// Which gateway delivered it, and when.
    pub meta: IngestMeta,
}

/// One device's stream as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamInfo {
    /// Highest seq covered contiguously (held or declared dropped).
    pub high: Seq,
    /// Declared holes not filled (yet), as (first, last).
    pub holes: Vec<(Seq, Seq)>,
    /// Events held.
    pub n_events: u64,
}

/// A device's shadow as stored: the automerge document and its JSON view.
#[derive(Clone, Debug, PartialEq)]
pub struct ShadowRow {
    /// Whose.
    pub device: DeviceId,
    /// The saved automerge document.
    pub doc: Vec<u8>,
    /// `{"reported": ..., "desired": ..., "delta": ...}` at the time of the save.
    pub view: serde_json::Value,
    /// When it was saved (cloud wall clock).
    pub updated: Millis,
}

/// An event a projection could not apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The projection.
    pub projection: String,
    /// The event's position.
    pub position: Position,
    /// The event.
    pub id: EventId,
    /// Why it could not be applied.
    pub reason: String,
}

/// A security event: a batch the cloud refused because it failed verification (see
/// `tidesync_core::auth`). Identical repeats (a gateway offering the same refused batch again
/// after `refused_retry_ms`) raise `count` and `last_ms` of one row instead of adding rows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SecurityEvent {
    /// Row id, ascending in the order first recorded (the page cursor); 0 before it is stored.
    pub id: u64,
    /// When it was first seen (cloud wall clock).
    pub first_ms: Millis,
    /// When it was last seen.
    pub last_ms: Millis,
    /// The gateway that relayed the batch.
    pub gateway: GatewayId,
    /// The device the batch claims to be from.
    pub device: DeviceId,
    /// `Violation::kind()`: a short stable name.
    pub kind: String,
    /// The violation, as text.
    pub detail: String,
    /// First seq the batch covered.
    pub from_seq: Seq,
    /// Last seq of the batch.
    pub last_seq: Seq,
    /// How many times it was seen.
    pub count: u64,
}

/// A page cursor for reads by event time: the last `(event_time, seq)` returned.
pub type TimeCursor = (Millis, Seq);

/// Why a store operation failed. A failed write changes nothing once rolled back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (or could not be reached).
    #[error("postgres: {0}")]
    Postgres(#[from] ::postgres::Error),
    /// The file is another application's SQLite database.
    #[error("{path} is not a tidesync cloud store (application id {found:#x})")]
    NotAStore {
        /// The file.
        path: String,
        /// Its application id.
        found: i64,
    },
    /// A stored value that does not decode (the database was edited by hand or is corrupt).
    #[error("corrupt {what} in the store: {detail}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// A stored shadow does not load.
    #[error("shadow of {device}: {source}")]
    Shadow {
        /// Whose.
        device: DeviceId,
        /// Why.
        #[source]
        source: Box<ShadowError>,
    },
    /// A write of the open transaction failed, so it was rolled back instead of committed.
    #[error("a write of this transaction failed: rolled back")]
    Poisoned,
    /// Events were inserted in a transaction opened with [`EventWriter::begin_projections`].
    #[error("events can only be inserted in a transaction opened with begin (the event writer lock)")]
    NotEventTransaction,
    /// A worker thread of the store could not start.
    #[error("cannot start a store thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl StoreError {
    /// Whether a unique index refused a row: an event stored already was inserted as new.
    pub fn is_conflict(&self) -> bool {
        match self {
            StoreError::Postgres(error) => error.code() == Some(&::postgres::error::SqlState::UNIQUE_VIOLATION),
            StoreError::Sqlite(error) => error.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation),
            _ => false,
        }
    }

    fn corrupt(what: &'static str, detail: impl std::fmt::Display) -> Self {
        StoreError::Corrupt { what, detail: detail.to_string() }
    }
}

/// Reads of the store. Any number of readers may run beside the one writer.
pub trait EventReader: Send {
    /// The highest position stored (0 if the log is empty).
    fn head(&mut self) -> Result<Position, StoreError>;

    /// Up to `max_events` events after `after`, in position order.
    fn read_from(&mut self, after: Position, max_events: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// Up to `max_events` events of `device` with `from <= seq <= to`, in seq order.
    fn read_seqs(
        &mut self,
        device: &DeviceId,
        from: Seq,
        to: Seq,
        max_events: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Up to `max_events` events of `device` with `from <= event_time < to`, ordered by
    /// `(event_time, seq)`, after `cursor` when given (for paging).
    fn read_times(
        &mut self,
        device: &DeviceId,
        from: Millis,
        to: Millis,
        cursor: Option<TimeCursor>,
        max_events: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Every device's stream.
    fn streams(&mut self) -> Result<BTreeMap<DeviceId, StreamInfo>, StoreError>;

    /// The stored shadow of `device`.
    fn shadow(&mut self, device: &DeviceId) -> Result<Option<ShadowRow>, StoreError>;

    /// Every stored shadow.
    fn shadows(&mut self) -> Result<Vec<ShadowRow>, StoreError>;

    /// The checkpoint of `projection` (0 if it has none).
    fn checkpoint(&mut self, projection: &str) -> Result<Position, StoreError>;

    /// Rows of `projection` whose key starts with `prefix`, in key order, at most `limit`.
    fn rows(
        &mut self,
        projection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError>;

    /// One row of `projection`.
    fn row(&mut self, projection: &str, key: &str) -> Result<Option<serde_json::Value>, StoreError>;

    /// Dead letters (of one projection, or all), newest first, at most `limit`, and their count.
    fn dead_letters(&mut self, projection: Option<&str>, limit: usize) -> Result<(Vec<DeadLetter>, u64), StoreError>;

    /// Every device's stored chain head: the hash-chain value at the seq stored with it.
    fn chain_heads(&mut self) -> Result<BTreeMap<DeviceId, (Seq, ChainHash)>, StoreError>;

    /// Security events newest first (those with `id < before` when given), at most `limit`, and
    /// how many there are in all.
    fn security_events(&mut self, before: Option<u64>, limit: usize) -> Result<(Vec<SecurityEvent>, u64), StoreError>;
}

/// Writes to the store, in one open transaction at a time: [`EventWriter::begin`] opens it (a
/// no-op when open), [`EventWriter::commit`] makes everything since durable.
pub trait EventWriter: EventReader {
    /// Opens a transaction and takes the writer lock, if none is open.
    fn begin(&mut self) -> Result<(), StoreError>;

    /// Opens a transaction for projection writes (rows, checkpoints, dead letters), if none is
    /// open. It serializes with other projection writers but need not wait for event appends:
    /// PostgreSQL takes a lock of its own, so a projection step never stalls ingest; SQLite has one
    /// write lock for everything. No events may be inserted in it. By default [`EventWriter::begin`].
    fn begin_projections(&mut self) -> Result<(), StoreError> {
        self.begin()
    }

    /// Commits the open transaction. When it returns `Ok`, every write since `begin` is durable.
    fn commit(&mut self) -> Result<(), StoreError>;

    /// Abandons the open transaction.
    fn rollback(&mut self);

    /// Whether a transaction is open.
    fn in_transaction(&self) -> bool;

    /// Inserts `events` (in order, each at the next position) into the open transaction; an event
    /// whose id is stored already is skipped. Returns how many were inserted and the head after.
    fn insert_events(&mut self, events: &[Event], meta: &IngestMeta) -> Result<(usize, Position), StoreError>;

    /// Writes a stream's high and holes into the open transaction.
    fn write_stream(&mut self, device: &DeviceId, high: Seq, holes: &[(Seq, Seq)]) -> Result<(), StoreError>;

    /// Writes a shadow row into the open transaction.
    fn write_shadow(&mut self, row: &ShadowRow) -> Result<(), StoreError>;

    /// Sets (`Some`) or deletes (`None`) rows of `projection` in the open transaction.
    fn put_rows(&mut self, projection: &str, rows: &[(String, Option<serde_json::Value>)]) -> Result<(), StoreError>;

    /// Deletes every row, the checkpoint and the dead letters of `projection`, in the open
    /// transaction.
    fn clear_projection(&mut self, projection: &str) -> Result<(), StoreError>;

    /// Sets the checkpoint of `projection` in the open transaction.
    fn set_checkpoint(&mut self, projection: &str, position: Position) -> Result<(), StoreError>;

    /// Records a dead letter in the open transaction.
    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), StoreError>;

    /// Inserts `events`, which the caller has proven are not stored (it holds the writer lock and
    /// its stream state is exact), each at the next position, without per-row conflict handling.
    /// A stored id is still refused (by the unique index on PostgreSQL, by the overlap check and
    /// the unique `(device, first_seq)` index of the segments on SQLite): an error, never a second
    /// copy. The error may come from this call or, where the backend holds the rows back to send
    /// a group's inserts together (PostgreSQL), from a later statement or the commit; either way
    /// the transaction fails as a whole ([`StoreError::is_conflict`] tells it apart). Returns how many were inserted and the head after. By default the same as
    /// [`EventWriter::insert_events`].
    fn insert_new_events(&mut self, events: &[Event], meta: &IngestMeta) -> Result<(usize, Position), StoreError> {
        self.insert_events(events, meta)
    }

    /// Writes `device`'s chain head (the chain value after `high`) into the open transaction.
    fn write_chain_head(&mut self, device: &DeviceId, high: Seq, chain: &ChainHash) -> Result<(), StoreError>;

    /// Records a security event in the open transaction: an identical one (same gateway, device,
    /// kind, detail and seqs) gets its count raised by `event.count` and its `last_ms` set.
    fn record_security_event(&mut self, event: &SecurityEvent) -> Result<(), StoreError>;
}

/// Which backend, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file (created when missing).
    Sqlite {
        /// The file.
        path: std::path::PathBuf,
    },
    /// A PostgreSQL database; the tables live in `schema` (created when missing).
    Postgres {
        /// A libpq-style URL or key=value string.
        url: String,
        /// The schema.
        schema: String,
    },
}

impl Backend {
    /// Opens a writer (creating the tables when missing).
    pub fn open_writer(&self) -> Result<Box<dyn EventWriter>, StoreError> {
        Ok(match self {
            Backend::Sqlite { path } => Box::new(sqlite::SqliteStore::open(path)?),
            Backend::Postgres { url, schema } => Box::new(postgres::PostgresStore::open(url, schema)?),
        })
    }

    /// Opens a reader. The writer must have been opened once before (it creates the tables).
    pub fn open_reader(&self) -> Result<Box<dyn EventReader>, StoreError> {
        Ok(match self {
            Backend::Sqlite { path } => Box::new(sqlite::SqliteStore::open_reader(path)?),
            Backend::Postgres { url, schema } => Box::new(postgres::PostgresStore::open_reader(url, schema)?),
        })
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }
}

/// The newest committed position, shared by the writer and every subscriber: subscribers wait on
/// it instead of polling the database (in-process notify).
#[derive(Debug, Default)]
pub struct HeadWatch {
    head: Mutex<Position>,
    changed: Condvar,
    async_head: Option<tokio::sync::watch::Sender<Position>>,
}

impl HeadWatch {
    /// A watch starting at `head`.
    pub fn new(head: Position) -> Arc<Self> {
        let (sender, _) = tokio::sync::watch::channel(head);
        Arc::new(Self { head: Mutex::new(head), changed: Condvar::new(), async_head: Some(sender) })
    }

    /// The newest committed position.
    pub fn get(&self) -> Position {
        *self.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes a newly committed head (never moves back).
    pub fn publish(&self, head: Position) {
        let mut current = self.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if head > *current {
            *current = head;
            self.changed.notify_all();
            if let Some(sender) = &self.async_head {
                sender.send_replace(head);
            }
        }
    }

    /// Blocks until the head passes `after` or `timeout` elapses; returns the head.
    pub fn wait_past(&self, after: Position, timeout: Duration) -> Position {
        let guard = self.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |head| *head <= after)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard
    }

    /// An async receiver of head changes (for server-sent events).
    pub fn subscribe(&self) -> Option<tokio::sync::watch::Receiver<Position>> {
        self.async_head.as_ref().map(tokio::sync::watch::Sender::subscribe)
    }
}

/// What one batch changes: the stream's state after it, the events that fill declared holes,
/// how many leading events are at or below the stream's `high` (the rest are new).
struct AppendPlan {
    state: StreamState,
    hole_fills: Vec<Event>,
    n_old: usize,
    high_before: Seq,
    unchanged: bool,
}

impl AppendPlan {
    fn is_empty(&self) -> bool {
        self.unchanged
    }
}

#[derive(Clone, Debug, Default)]
struct StreamState {
    high: Seq,
    holes: BTreeMap<Seq, Seq>,
}

/// The store as core's sessions see it: a backend writer plus the stream states and shadows kept
/// in memory. The ingest host appends with [`CloudStore::append_from`], ends each round with
/// [`CloudStore::commit`] (a group commit) and only then reports events durable to the sessions.
pub struct CloudStore {
    /// In a `RefCell` because core's `Ledger::read` takes `&self` and a PostgreSQL client needs
    /// `&mut` to query; the store lives on one thread, so borrows never overlap.
    writer: RefCell<Box<dyn EventWriter>>,
    streams: BTreeMap<DeviceId, StreamState>,
    shadows: BTreeMap<DeviceId, Shadow>,
    limits: ShadowLimits,
    /// While a transaction is open: the state before it of every stream it changed (`None`: the
    /// stream is new), restored if it rolls back. Only touched streams are saved, so a group
    /// commit costs the same with ten devices or a hundred thousand.
    saved: Option<BTreeMap<DeviceId, Option<StreamState>>>,
    /// Head before the open transaction, and the head it will have after commit.
    head: Position,
    pending_head: Position,
    head_watch: Arc<HeadWatch>,
    /// Metadata for appends made through the `Ledger` trait.
    default_meta: IngestMeta,
    /// The head this store committed last: if the head read under the writer lock differs,
    /// another writer appended meanwhile and the stream states are reloaded.
    committed_head: Position,
    /// Whether the open transaction's stream states are proven exact (nobody else appended since
    /// they were loaded), so fresh events are known new and are inserted without conflict checks.
    streams_proven: bool,
    /// Set when an insert the store proved new failed: from then on every insert checks conflicts.
    proofs_failed: bool,
    /// Set when a write failed inside the open transaction: the commit then rolls back instead
    /// (PostgreSQL turns a `COMMIT` of a failed transaction into a silent rollback).
    poisoned: bool,
    /// Per device, the hash-chain value after the seq beside it. Valid only while that seq is the
    /// stream's `high`, so an entry left ahead by a rolled-back group reads as unknown.
    chain_heads: BTreeMap<DeviceId, (Seq, ChainHash)>,
}

impl std::fmt::Debug for CloudStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudStore").field("head", &self.head).field("n_streams", &self.streams.len()).finish()
    }
}

/// The shadow replica name of the cloud (its automerge actor).
pub const CLOUD_REPLICA: &str = "cloud";

fn storage(error: StoreError) -> LedgerError {
    LedgerError::Storage(Box::new(error))
}

impl CloudStore {
    /// Opens the store over `writer`: loads the streams and shadows.
    pub fn open(mut writer: Box<dyn EventWriter>, limits: ShadowLimits) -> Result<Self, StoreError> {
        let streams = writer
            .streams()?
            .into_iter()
            .map(|(device, info)| (device, StreamState { high: info.high, holes: info.holes.into_iter().collect() }))
            .collect();
        let mut shadows = BTreeMap::new();
        for row in writer.shadows()? {
            let shadow = Shadow::load(&row.doc, CLOUD_REPLICA, limits)
                .map_err(|source| StoreError::Shadow { device: row.device, source: Box::new(source) })?;
            shadows.insert(row.device, shadow);
        }
        let chain_heads = writer.chain_heads()?;
        let head = writer.head()?;
        let fallback = GatewayId::new("unknown").map_err(|error| StoreError::corrupt("gateway name", error))?;
        Ok(Self {
            writer: RefCell::new(writer),
            streams,
            shadows,
            limits,
            saved: None,
            head,
            pending_head: head,
            head_watch: HeadWatch::new(head),
            default_meta: IngestMeta { gateway: fallback, ingest_time: Millis(0) },
            committed_head: head,
            streams_proven: false,
            proofs_failed: false,
            poisoned: false,
            chain_heads,
        })
    }

    /// The watch subscribers wait on.
    pub fn head_watch(&self) -> Arc<HeadWatch> {
        Arc::clone(&self.head_watch)
    }

    /// The committed head.
    pub fn head(&self) -> Position {
        self.head
    }

    /// Sets the metadata used by appends made through the `Ledger` trait.
    pub fn set_default_meta(&mut self, meta: IngestMeta) {
        self.default_meta = meta;
    }

    /// The writer, for reads on the writer's connection.
    pub fn writer(&mut self) -> &mut dyn EventWriter {
        &mut **self.writer.get_mut()
    }

    fn begin(&mut self) -> Result<(), StoreError> {
        if self.saved.is_none() {
            let writer = self.writer.get_mut();
            writer.begin()?;
            // The head read under the lock is ours to extend: positions only grow, so an
            // unchanged head means no other writer appended since our last commit, and the
            // stream states in memory are exact.
            let head = match writer.head() {
                Ok(head) => head,
                Err(error) => {
                    writer.rollback();
                    return Err(error);
                }
            };
            self.streams_proven = head == self.committed_head && !self.proofs_failed;
            if head != self.committed_head {
                tracing::info!(%head, committed = %self.committed_head, "another writer appended: reloading streams");
                let reloaded = writer.streams().and_then(|streams| Ok((streams, writer.chain_heads()?)));
                match reloaded {
                    Ok((streams, chain_heads)) => {
                        self.streams = streams
                            .into_iter()
                            .map(|(device, info)| {
                                (device, StreamState { high: info.high, holes: info.holes.into_iter().collect() })
                            })
                            .collect();
                        self.chain_heads = chain_heads;
                        self.committed_head = head;
                    }
                    Err(error) => {
                        writer.rollback();
                        return Err(error);
                    }
                }
            }
            self.head = head;
            self.pending_head = self.head;
            self.poisoned = false;
            self.saved = Some(BTreeMap::new());
        }
        Ok(())
    }

    /// Whether writes wait for [`CloudStore::commit`].
    pub fn in_transaction(&self) -> bool {
        self.saved.is_some()
    }

    /// Appends a batch delivered by a gateway into the open transaction (opening one): what the
    /// store covers already is skipped, events for declared holes fill them.
    pub fn append_from(&mut self, batch: &EventBatch, meta: &IngestMeta) -> Result<Appended, LedgerError> {
        batch.validate()?;
        let high_known = self.high(&batch.device);
        if batch.from > high_known.next() {
            return Err(LedgerError::Hole { device: batch.device, high: high_known, from: batch.from });
        }
        let mut plan = self.plan(batch);
        if plan.is_empty() {
            return Ok(Appended { high: plan.state.high, n_new: 0 });
        }
        if !self.in_transaction() {
            self.begin().map_err(storage)?;
            // `begin` reloads the streams when another writer appended: plan again on them (a
            // stream's high only grows, so the hole check above still holds).
            plan = self.plan(batch);
            if plan.is_empty() {
                return Ok(Appended { high: plan.state.high, n_new: 0 });
            }
        }
        let suffix = &batch.events[plan.n_old..];
        let written = self.write_append(batch, &plan.state, &plan.hole_fills, suffix, plan.high_before, meta);
        let (n_filled, n_appended) = written.map_err(|error| {
            // The group must not commit: part of this batch may be written, and PostgreSQL
            // would turn the COMMIT of its failed transaction into a silent rollback.
            self.poisoned = true;
            storage(error)
        })?;
        let high = plan.state.high;
        let previous = self.streams.insert(batch.device, plan.state);
        if let Some(saved) = self.saved.as_mut() {
            saved.entry(batch.device).or_insert(previous);
        }
        Ok(Appended { high, n_new: n_filled + n_appended })
    }

    /// What appending `batch` changes, against the stream states in memory.
    fn plan(&self, batch: &EventBatch) -> AppendPlan {
        let state_before = self.streams.get(&batch.device);
        let high_before = state_before.map_or(Seq::ZERO, |state| state.high);
        let mut state = state_before.cloned().unwrap_or_default();
        let in_hole =
            |state: &StreamState, seq: Seq| state.holes.range(..=seq).next_back().is_some_and(|(_, last)| seq <= *last);
        // The batch is contiguous, so the events above `high` are a suffix of it; only events at
        // or below `high` can fill a declared hole. In the common case (no holes) the fresh
        // events are that suffix and are not copied.
        let n_old = batch.events.partition_point(|event| event.id.seq <= state.high);
        let hole_fills: Vec<Event> = if state.holes.is_empty() {
            Vec::new()
        } else {
            batch.events[..n_old].iter().filter(|event| in_hole(&state, event.id.seq)).cloned().collect()
        };
        let mut holes_changed = false;
        for event in &hole_fills {
            let seq = event.id.seq;
            if let Some((first, last)) = state.holes.range(..=seq).next_back().map(|(a, b)| (*a, *b)) {
                state.holes.remove(&first);
                if first < seq {
                    state.holes.insert(first, Seq(seq.0 - 1));
                }
                if seq < last {
                    state.holes.insert(seq.next(), last);
                }
                holes_changed = true;
            }
        }
        let first_seq = batch.first_seq();
        if batch.last_seq() > state.high {
            // Seqs the device declared dropped, above what the stream covers: a new hole.
            let from_fresh = batch.from.max(state.high.next());
            if first_seq > state.high && from_fresh < first_seq {
                state.holes.insert(from_fresh, Seq(first_seq.0 - 1));
                holes_changed = true;
            }
            state.high = batch.last_seq();
        }
        let unchanged =
            hole_fills.is_empty() && n_old == batch.events.len() && state.high == high_before && !holes_changed;
        AppendPlan { state, hole_fills, n_old, high_before, unchanged }
    }

    /// The writes of one [`CloudStore::append_from`]: its events, its stream row, its chain head.
    /// Returns how many hole fills and how many events above `high` were new.
    fn write_append(
        &mut self,
        batch: &EventBatch,
        state: &StreamState,
        hole_fills: &[Event],
        suffix: &[Event],
        high_before: Seq,
        meta: &IngestMeta,
    ) -> Result<(usize, usize), StoreError> {
        let proven = self.streams_proven;
        let writer = self.writer.get_mut();
        // Positions follow the batch's seq order: hole fills (lower seqs) first, then the suffix.
        let (n_filled, _) = writer.insert_events(hole_fills, meta)?;
        let (n_appended, head) = if proven && !suffix.is_empty() {
            match writer.insert_new_events(suffix, meta) {
                Ok(inserted) => inserted,
                Err(error) => {
                    tracing::warn!(%error, "an insert proven new failed: checking conflicts from now on");
                    self.proofs_failed = true;
                    return Err(error);
                }
            }
        } else {
            writer.insert_events(suffix, meta)?
        };
        self.pending_head = head;
        let holes: Vec<(Seq, Seq)> = state.holes.iter().map(|(a, b)| (*a, *b)).collect();
        self.writer.get_mut().write_stream(&batch.device, state.high, &holes)?;
        self.write_chain_head(batch, high_before)?;
        Ok((n_filled, n_appended))
    }

    /// Writes `device`'s shadow (document and JSON view) into the open transaction.
    pub fn persist_shadow(&mut self, device: DeviceId, now: Millis) -> Result<(), StoreError> {
        self.begin()?;
        let Some(shadow) = self.shadows.get_mut(&device) else { return Ok(()) };
        let row = ShadowRow { device, doc: shadow.save(), view: shadow.to_json(), updated: now };
        self.writer.get_mut().write_shadow(&row)
    }

    /// The cloud's copy of `device`'s shadow.
    pub fn shadow(&self, device: &DeviceId) -> Option<&Shadow> {
        self.shadows.get(device)
    }

    /// Ends the open transaction (the group commit). When it returns `Ok`, everything appended
    /// since is durable and subscribers are woken. On failure it rolls back: nothing of the
    /// group is stored.
    pub fn commit(&mut self) -> Result<Position, StoreError> {
        if self.saved.is_none() {
            return Ok(self.head);
        }
        let writer = self.writer.get_mut();
        let committed = if self.poisoned { Err(StoreError::Poisoned) } else { writer.commit() };
        match committed {
            Ok(()) => {
                self.saved = None;
                self.head = self.pending_head;
                self.committed_head = self.head;
                self.head_watch.publish(self.head);
                Ok(self.head)
            }
            Err(error) => {
                tracing::error!(%error, "group commit failed; rolling back");
                writer.rollback();
                if error.is_conflict() {
                    // A backend that holds inserts back until the commit (PostgreSQL) reports a
                    // proven-new event found stored here rather than at the insert.
                    tracing::warn!("an insert proven new conflicted at the commit: checking conflicts from now on");
                    self.proofs_failed = true;
                }
                for (device, state) in self.saved.take().unwrap_or_default() {
                    match state {
                        Some(state) => self.streams.insert(device, state),
                        None => self.streams.remove(&device),
                    };
                }
                self.pending_head = self.head;
                Err(error)
            }
        }
    }

    /// The chain value of `device` after `high`, if known: the genesis value before any event.
    fn chain_at(&self, device: &DeviceId, high: Seq) -> Option<ChainHash> {
        if high == Seq::ZERO {
            return Some(ChainHash::genesis(device));
        }
        self.chain_heads.get(device).filter(|(at, _)| *at == high).map(|(_, chain)| *chain)
    }

    /// After `batch` extended `device`'s stream past `high_before`: the new chain head, written
    /// into the open transaction with the events. It continues the head held when the batch
    /// continues it; after a hole only the device's proof knows it (`prev`, which the verifying
    /// ingest checked against the device's seals). Unknown if neither is there (an unsigned
    /// batch after a hole, or a stream stored before chains were kept).
    fn write_chain_head(&mut self, batch: &EventBatch, high_before: Seq) -> Result<(), StoreError> {
        if batch.last_seq() <= high_before {
            return Ok(());
        }
        let first = batch.first_seq();
        let prev = batch.proof.as_ref().map(|proof| proof.prev);
        let chain = if first > high_before.next() {
            // Starts with a hole past what is held: `prev` is the chain value after the hole.
            prev.map(|prev| prev.over(&batch.events))
        } else {
            // Events at or below `high_before` are held already; the chain continues after them.
            let n_held = usize::try_from(high_before.0 + 1 - first.0).unwrap_or(usize::MAX);
            let base = self
                .chain_at(&batch.device, high_before)
                .or_else(|| prev.map(|prev| prev.over(batch.events.iter().take(n_held))));
            base.map(|base| base.over(batch.events.iter().skip(n_held)))
        };
        let high = batch.last_seq();
        match chain {
            Some(chain) => {
                self.writer.get_mut().write_chain_head(&batch.device, high, &chain)?;
                self.chain_heads.insert(batch.device, (high, chain));
            }
            None => {
                // A stored row stays behind `high` and so reads as unknown.
                self.chain_heads.remove(&batch.device);
            }
        }
        Ok(())
    }

    /// Records a security event in the open transaction (opening one); the next
    /// [`CloudStore::commit`] makes it durable.
    pub fn record_security_event(&mut self, event: &SecurityEvent) -> Result<(), StoreError> {
        self.begin()?;
        self.writer.get_mut().record_security_event(event)
    }

    /// Per device: (high, holes).
    pub fn stream_highs(&self) -> Vec<(DeviceId, Seq, usize)> {
        self.streams.iter().map(|(device, state)| (*device, state.high, state.holes.len())).collect()
    }
}

impl Ledger for CloudStore {
    fn high(&self, device: &DeviceId) -> Seq {
        self.streams.get(device).map_or(Seq::ZERO, |state| state.high)
    }

    fn version_vector(&self) -> VersionVector {
        self.streams.iter().map(|(device, state)| (*device, state.high)).collect()
    }

    fn read(&self, device: &DeviceId, from: Seq, max_events: usize) -> Result<Option<EventBatch>, LedgerError> {
        let from = from.max(Seq::FIRST);
        let limit = max_events.min(BATCH_EVENTS_MAX);
        let mut writer = self.writer.try_borrow_mut().map_err(|error| LedgerError::Storage(Box::new(error)))?;
        let stored = writer.read_seqs(device, from, Seq(u64::MAX >> 1), limit).map_err(storage)?;
        let mut events: Vec<Event> = Vec::new();
        for stored_event in stored {
            if events.last().is_some_and(|previous| stored_event.event.id.seq != previous.id.seq.next()) {
                break;
            }
            events.push(stored_event.event);
        }
        if events.is_empty() {
            return Ok(None);
        }
        Ok(Some(EventBatch::new(*device, from, events)?))
    }

    fn append(&mut self, batch: &EventBatch) -> Result<Appended, LedgerError> {
        let meta = self.default_meta;
        self.append_from(batch, &meta)
    }

    fn mark_committed(&mut self, _device: DeviceId, _up_to: Seq) -> Result<(), LedgerError> {
        // The cloud store is where commits come from; it keeps every event.
        Ok(())
    }

    fn chain_head(&self, device: &DeviceId) -> Option<ChainHash> {
        self.chain_at(device, self.high(device))
    }
}

impl Store for CloudStore {
    fn shadow_mut(&mut self, device: &DeviceId) -> Result<Option<&mut Shadow>, ShadowError> {
        let limits = self.limits;
        Ok(Some(self.shadows.entry(*device).or_insert_with(|| Shadow::new(CLOUD_REPLICA, limits))))
    }

    fn shadow_devices(&self) -> Vec<DeviceId> {
        self.shadows.keys().copied().collect()
    }
}

/// The columns of a stored event, as both backends read them.
pub(crate) struct EventRow {
    pub(crate) position: i64,
    pub(crate) device: String,
    pub(crate) seq: i64,
    pub(crate) hlc_wall_ms: i64,
    pub(crate) hlc_logical: i64,
    pub(crate) event_time_ms: i64,
    pub(crate) kind: i64,
    pub(crate) schema_version: i64,
    pub(crate) body: Vec<u8>,
    pub(crate) gateway: String,
    pub(crate) ingest_ms: i64,
}

/// Clamps a count, seq or time into SQL's signed 64-bit integers (they stay far below 2^63).
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Reads back a value written by [`to_i64`].
pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl EventRow {
    pub(crate) fn into_stored(self) -> Result<StoredEvent, StoreError> {
        let device = DeviceId::new(&self.device).map_err(|error| StoreError::corrupt("device name", error))?;
        let gateway = GatewayId::new(&self.gateway).map_err(|error| StoreError::corrupt("gateway name", error))?;
        let kind = u16::try_from(self.kind).map_err(|error| StoreError::corrupt("event kind", error))?;
        let schema_version =
            u16::try_from(self.schema_version).map_err(|error| StoreError::corrupt("schema version", error))?;
        let logical = u32::try_from(self.hlc_logical).map_err(|error| StoreError::corrupt("hlc", error))?;
        let payload = Payload::decode_body(EventKind::from_tag(kind), schema_version, &self.body)
            .map_err(|error| StoreError::corrupt("event body", error))?;
        Ok(StoredEvent {
            position: Position(to_u64(self.position)),
            event: Event {
                id: EventId { device, seq: Seq(to_u64(self.seq)) },
                hlc: Hlc { wall_ms: to_u64(self.hlc_wall_ms), logical },
                event_time: Millis(to_u64(self.event_time_ms)),
                payload,
            },
            meta: IngestMeta { gateway, ingest_time: Millis(to_u64(self.ingest_ms)) },
        })
    }
}

/// The body bytes and columns of an event to insert.
pub(crate) fn encode_event(event: &Event) -> (Vec<u8>, i64, i64) {
    let mut body = Vec::with_capacity(event.payload.encoded_body_len());
    event.payload.encode_body(&mut body);
    (body, i64::from(event.kind().tag()), i64::from(event.schema_version()))
}

/// Parses a stored device name.
pub(crate) fn device_of(name: &str) -> Result<DeviceId, StoreError> {
    DeviceId::new(name).map_err(|error| StoreError::corrupt("device name", error))
}

/// Parses stored JSON.
pub(crate) fn json_of(what: &'static str, text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::corrupt(what, error))
}
