//! `Spool`: the gateway's SQLite file of events in custody for many devices, with their shadows,
//! implementing core's `Ledger` and `Store`.
//!
//! Writes go into one open transaction that the daemon ends with [`Spool::commit`]: a group
//! commit. Custody is acknowledged only after that commit returns (WAL, `synchronous=FULL`), so an
//! acknowledged event survives a crash or power loss.
//!
//! Invariant: per device the spool covers seqs `1..=high` contiguously: events held, events pruned
//! after the cloud committed them (`<= committed`), and holes a device declared; `high`, `committed`
//! and the holes are written in the same transaction as the events they describe.
//!
//! Invariant: the proof a device's batch carried (see `tidesync_core::auth`) is stored in the same
//! transaction as its events, one row per appended batch in `proofs` ([`proofs`]), and pruned
//! with them; a read hands it on untouched, so the cloud can verify what this gateway relays
//! (and this gateway cannot forge it). A batch without a proof is relayed without one.
//!
//! Invariant: events held use at most `budget_bytes` (body plus [`EVENT_ROW_OVERHEAD_BYTES`]); an
//! append that would pass it changes nothing and fails with `LedgerError::Full`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use tidesync_core::auth::ChainHash;
use tidesync_core::event::{DeviceId, Event, EventId, EventKind, Hlc, Millis, Payload, Seq};
use tidesync_core::ledger::{Appended, Ledger, LedgerError};
use tidesync_core::shadow::{Shadow, ShadowError, ShadowLimits};
use tidesync_core::sync::Store;
use tidesync_core::vv::VersionVector;
use tidesync_core::wire::{EventBatch, BATCH_EVENTS_MAX};

use self::proofs::ProofRow;

/// `PRAGMA application_id` of a gateway spool ("TSGW").
pub const APPLICATION_ID: i64 = 0x5453_4757;
/// Bytes an event row costs on top of its body, for the byte budget (row header, integer
/// columns, device name, primary-key entry), rounded up.
pub const EVENT_ROW_OVERHEAD_BYTES: u64 = 64;

const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS events (
    device         TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    hlc_wall_ms    INTEGER NOT NULL,
    hlc_logical    INTEGER NOT NULL,
    event_time_ms  INTEGER NOT NULL,
    kind           INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    body           BLOB    NOT NULL,
    PRIMARY KEY (device, seq)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    device    TEXT    PRIMARY KEY NOT NULL,
    high      INTEGER NOT NULL,
    committed INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS holes (
    device TEXT    NOT NULL,
    first  INTEGER NOT NULL,
    last   INTEGER NOT NULL,
    PRIMARY KEY (device, first)
) STRICT;
CREATE TABLE IF NOT EXISTS proofs (
    device TEXT    NOT NULL,
    first  INTEGER NOT NULL,
    last   INTEGER NOT NULL,
    prev   BLOB    NOT NULL,
    seals  BLOB    NOT NULL,
    hole   BLOB,
    PRIMARY KEY (device, first)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shadows (
    device TEXT PRIMARY KEY NOT NULL,
    doc    BLOB NOT NULL
) STRICT;
";

/// Why the spool could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// SQLite failed.
    #[error("spool {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is another application's SQLite database.
    #[error("{path} is not a tidesync gateway spool (application id {found:#x})")]
    NotASpool {
        /// The file.
        path: PathBuf,
        /// What it holds.
        found: i64,
    },
    /// A stored shadow does not load.
    #[error("shadow of {device} in the spool does not load: {source}")]
    Shadow {
        /// Whose.
        device: String,
        /// Why.
        #[source]
        source: Box<ShadowError>,
    },
    /// A stored device name is invalid (the file was edited by hand or is corrupt).
    #[error("invalid device name {name:?} in the spool")]
    DeviceName {
        /// The name.
        name: String,
    },
    /// A stored batch proof does not decode (the file was edited by hand or is corrupt).
    #[error("corrupt batch proof of {device} at seq {first} in the spool")]
    Proof {
        /// Whose.
        device: DeviceId,
        /// The first seq it covers.
        first: Seq,
    },
}

#[derive(Clone, Debug, Default)]
struct StreamState {
    high: Seq,
    committed: Seq,
    /// Declared holes not filled yet, first → last.
    holes: BTreeMap<Seq, Seq>,
    n_events: u64,
    used_bytes: u64,
}

/// Figures for metrics and `tidesync-gateway status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Devices with a stream.
    pub n_devices: u64,
    /// Events held (not yet pruned).
    pub n_events: u64,
    /// Bytes the held events count against the budget.
    pub used_bytes: u64,
    /// The budget.
    pub budget_bytes: u64,
}

/// The gateway's spool. See the module documentation.
pub struct Spool {
    db: Connection,
    path: PathBuf,
    replica: String,
    limits: ShadowLimits,
    budget_bytes: u64,
    streams: BTreeMap<DeviceId, StreamState>,
    shadows: BTreeMap<DeviceId, Shadow>,
    /// State before the open transaction, restored if it rolls back.
    saved: Option<BTreeMap<DeviceId, StreamState>>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).field("stats", &self.stats()).finish_non_exhaustive()
    }
}

fn storage(error: rusqlite::Error) -> LedgerError {
    LedgerError::Storage(Box::new(error))
}

fn to_i64(value: u64) -> i64 {
    // Seqs, times and sizes stay far below 2^63 in practice; saturate rather than wrap.
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Spool {
    /// Opens (or creates) the spool at `path` for the gateway whose shadow replica is `replica`
    /// (`gateway:NAME`), with a budget of `budget_bytes` for held events.
    pub fn open(path: &Path, replica: &str, budget_bytes: u64, limits: ShadowLimits) -> Result<Self, SpoolError> {
        let sql = |source| SpoolError::Sqlite { path: path.to_path_buf(), source };
        let db = Connection::open(path).map_err(sql)?;
        let found: i64 = db.query_row("PRAGMA application_id", [], |row| row.get(0)).map_err(sql)?;
        let n_tables: i64 = db.query_row("SELECT COUNT(*) FROM sqlite_master", [], |row| row.get(0)).map_err(sql)?;
        if found != APPLICATION_ID && !(found == 0 && n_tables == 0) {
            return Err(SpoolError::NotASpool { path: path.to_path_buf(), found });
        }
        db.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        db.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
        db.pragma_update(None, "application_id", APPLICATION_ID).map_err(sql)?;
        db.busy_timeout(std::time::Duration::from_secs(5)).map_err(sql)?;
        db.execute_batch(SCHEMA_SQL).map_err(sql)?;
        let mut spool = Self {
            db,
            path: path.to_path_buf(),
            replica: replica.to_string(),
            limits,
            budget_bytes,
            streams: BTreeMap::new(),
            shadows: BTreeMap::new(),
            saved: None,
        };
        spool.load().map_err(sql)?.map_err(|name| SpoolError::DeviceName { name })?;
        spool.load_shadows()?;
        Ok(spool)
    }

    /// Opens a spool read-only for `tidesync-gateway status` (works beside a running daemon).
    pub fn open_read_only(path: &Path) -> Result<Self, SpoolError> {
        let sql = |source| SpoolError::Sqlite { path: path.to_path_buf(), source };
        let db = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql)?;
        let found: i64 = db.query_row("PRAGMA application_id", [], |row| row.get(0)).map_err(sql)?;
        if found != APPLICATION_ID {
            return Err(SpoolError::NotASpool { path: path.to_path_buf(), found });
        }
        let mut spool = Self {
            db,
            path: path.to_path_buf(),
            replica: String::new(),
            limits: ShadowLimits::default(),
            budget_bytes: 0,
            streams: BTreeMap::new(),
            shadows: BTreeMap::new(),
            saved: None,
        };
        spool.load().map_err(sql)?.map_err(|name| SpoolError::DeviceName { name })?;
        Ok(spool)
    }

    fn load(&mut self) -> Result<Result<(), String>, rusqlite::Error> {
        let mut streams = BTreeMap::new();
        {
            let mut statement = self.db.prepare("SELECT device, high, committed FROM streams")?;
            let rows = statement
                .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?)))?;
            for row in rows {
                let (name, high, committed) = row?;
                let Ok(device) = DeviceId::new(&name) else { return Ok(Err(name)) };
                let state =
                    StreamState { high: Seq(high as u64), committed: Seq(committed as u64), ..Default::default() };
                streams.insert(device, state);
            }
            let mut statement = self.db.prepare("SELECT device, first, last FROM holes")?;
            let rows = statement
                .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?)))?;
            for row in rows {
                let (name, first, last) = row?;
                let Ok(device) = DeviceId::new(&name) else { return Ok(Err(name)) };
                streams
                    .entry(device)
                    .or_insert_with(StreamState::default)
                    .holes
                    .insert(Seq(first as u64), Seq(last as u64));
            }
            let mut statement = self
                .db
                .prepare("SELECT device, COUNT(*), COALESCE(SUM(length(body)), 0) FROM events GROUP BY device")?;
            let rows = statement
                .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?)))?;
            for row in rows {
                let (name, n_events, body_bytes) = row?;
                let Ok(device) = DeviceId::new(&name) else { return Ok(Err(name)) };
                let state = streams.entry(device).or_insert_with(StreamState::default);
                state.n_events = n_events as u64;
                state.used_bytes = body_bytes as u64 + n_events as u64 * EVENT_ROW_OVERHEAD_BYTES;
            }
        }
        self.streams = streams;
        Ok(Ok(()))
    }

    fn load_shadows(&mut self) -> Result<(), SpoolError> {
        let sql = |source| SpoolError::Sqlite { path: self.path.clone(), source };
        let mut statement = self.db.prepare("SELECT device, doc FROM shadows").map_err(sql)?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?)))
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        drop(statement);
        for (name, doc) in rows {
            let device = DeviceId::new(&name).map_err(|_| SpoolError::DeviceName { name: name.clone() })?;
            let shadow = Shadow::load(&doc, &self.replica, self.limits)
                .map_err(|source| SpoolError::Shadow { device: name, source: Box::new(source) })?;
            self.shadows.insert(device, shadow);
        }
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counts for metrics and status.
    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            n_devices: self.streams.len() as u64,
            n_events: self.streams.values().map(|state| state.n_events).sum(),
            used_bytes: self.streams.values().map(|state| state.used_bytes).sum(),
            budget_bytes: self.budget_bytes,
        }
    }

    /// Per device: (high, committed, events held).
    pub fn device_stats(&self) -> Vec<(DeviceId, Seq, Seq, u64)> {
        self.streams.iter().map(|(device, state)| (*device, state.high, state.committed, state.n_events)).collect()
    }

    /// Highest seq of `device` the cloud has committed, as last heard.
    pub fn committed(&self, device: &DeviceId) -> Seq {
        self.streams.get(device).map_or(Seq::ZERO, |state| state.committed)
    }

    /// Whether writes are waiting for [`Spool::commit`].
    pub fn in_transaction(&self) -> bool {
        self.saved.is_some()
    }

    fn begin(&mut self) -> Result<(), rusqlite::Error> {
        if self.saved.is_none() {
            self.db.execute_batch("BEGIN IMMEDIATE")?;
            self.saved = Some(self.streams.clone());
        }
        Ok(())
    }

    /// Ends the open transaction (the group commit): when it returns `Ok`, everything appended
    /// since the last commit is durable.
    pub fn commit(&mut self) -> Result<(), LedgerError> {
        if self.saved.is_none() {
            return Ok(());
        }
        match self.db.execute_batch("COMMIT") {
            Ok(()) => {
                self.saved = None;
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, "spool group commit failed; rolling back");
                let _ = self.db.execute_batch("ROLLBACK");
                if let Some(saved) = self.saved.take() {
                    self.streams = saved;
                }
                Err(storage(error))
            }
        }
    }

    /// Writes `device`'s shadow into the open transaction.
    pub fn persist_shadow(&mut self, device: DeviceId) -> Result<(), LedgerError> {
        self.begin().map_err(storage)?;
        let Some(shadow) = self.shadows.get_mut(&device) else { return Ok(()) };
        let doc = shadow.save();
        self.db
            .execute(
                "INSERT INTO shadows (device, doc) VALUES (?1, ?2) ON CONFLICT(device) DO UPDATE SET doc = excluded.doc",
                params![device.as_str(), doc],
            )
            .map_err(storage)?;
        Ok(())
    }

    /// The shadow of `device`, if the spool has one.
    pub fn shadow(&self, device: &DeviceId) -> Option<&Shadow> {
        self.shadows.get(device)
    }

    fn write_stream(&self, device: DeviceId, state: &StreamState) -> Result<(), rusqlite::Error> {
        self.db.execute(
            "INSERT INTO streams (device, high, committed) VALUES (?1, ?2, ?3)
             ON CONFLICT(device) DO UPDATE SET high = excluded.high, committed = excluded.committed",
            params![device.as_str(), to_i64(state.high.0), to_i64(state.committed.0)],
        )?;
        self.db.execute("DELETE FROM holes WHERE device = ?1", params![device.as_str()])?;
        for (first, last) in &state.holes {
            self.db.execute(
                "INSERT INTO holes (device, first, last) VALUES (?1, ?2, ?3)",
                params![device.as_str(), to_i64(first.0), to_i64(last.0)],
            )?;
        }
        Ok(())
    }

    fn insert_event(&self, event: &Event) -> Result<u64, rusqlite::Error> {
        let mut body = Vec::new();
        event.payload.encode_body(&mut body);
        self.db
            .prepare_cached(
                "INSERT OR IGNORE INTO events
                 (device, seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                event.id.device.as_str(),
                to_i64(event.id.seq.0),
                to_i64(event.hlc.wall_ms),
                event.hlc.logical,
                to_i64(event.event_time.0),
                event.kind().tag(),
                event.schema_version(),
                body,
            ])?;
        Ok(body.len() as u64 + EVENT_ROW_OVERHEAD_BYTES)
    }

    fn insert_proof(&self, device: DeviceId, row: &ProofRow) -> Result<(), rusqlite::Error> {
        self.db
            .prepare_cached(
                "INSERT OR REPLACE INTO proofs (device, first, last, prev, seals, hole) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                device.as_str(),
                to_i64(row.first.0),
                to_i64(row.last.0),
                &row.prev.0[..],
                proofs::encode_seals(&row.seals),
                row.hole.as_ref().map(proofs::encode_hole),
            ])?;
        Ok(())
    }

    /// The stored proof rows of `device` from the one holding `first` (or the last before it) to
    /// the last starting at or before `last`, ascending.
    fn proof_rows(&self, device: &DeviceId, first: Seq, last: Seq) -> Result<Vec<ProofRow>, LedgerError> {
        let mut statement = self
            .db
            .prepare_cached(
                "SELECT first, last, prev, seals, hole FROM proofs
                 WHERE device = ?1 AND first <= ?3
                   AND first >= COALESCE((SELECT MAX(first) FROM proofs WHERE device = ?1 AND first <= ?2), 0)
                 ORDER BY first",
            )
            .map_err(storage)?;
        let rows = statement
            .query_map(params![device.as_str(), to_i64(first.0), to_i64(last.0)], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                    row.get::<_, Vec<u8>>(3)?,
                    row.get::<_, Option<Vec<u8>>>(4)?,
                ))
            })
            .map_err(storage)?;
        let mut out = Vec::new();
        for row in rows {
            let (first, last, prev, seals, hole) = row.map_err(storage)?;
            let (first, last) = (Seq(first as u64), Seq(last as u64));
            let corrupt = || LedgerError::Storage(Box::new(SpoolError::Proof { device: *device, first }));
            let hole = match hole {
                Some(bytes) => Some(proofs::decode_hole(&bytes).ok_or_else(corrupt)?),
                None => None,
            };
            out.push(ProofRow {
                first,
                last,
                prev: proofs::decode_chain(&prev).ok_or_else(corrupt)?,
                seals: proofs::decode_seals(&seals).ok_or_else(corrupt)?,
                hole,
            });
        }
        Ok(out)
    }

    /// The chain value after `up_to` (before `up_to + 1`), from `anchor`, the row holding
    /// `up_to + 1` or the last before it: its `prev` hashed forward over the events held from its
    /// first to `up_to`. `None` if unknown (no anchor, or events missing in between).
    fn chain_after(
        &self,
        device: &DeviceId,
        up_to: Seq,
        anchor: Option<&ProofRow>,
    ) -> Result<Option<ChainHash>, LedgerError> {
        if up_to == Seq::ZERO {
            return Ok(Some(ChainHash::genesis(device)));
        }
        let Some(anchor) = anchor.filter(|anchor| anchor.first <= up_to.next()) else { return Ok(None) };
        if anchor.first == up_to.next() {
            return Ok(Some(anchor.prev));
        }
        let mut statement = self
            .db
            .prepare_cached(
                "SELECT seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body
                 FROM events WHERE device = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq",
            )
            .map_err(storage)?;
        let mut rows =
            statement.query(params![device.as_str(), to_i64(anchor.first.0), to_i64(up_to.0)]).map_err(storage)?;
        let (mut chain, mut expected) = (anchor.prev, anchor.first);
        let mut scratch = Vec::new();
        while let Some(row) = rows.next().map_err(storage)? {
            let seq = Seq(row.get::<_, i64>(0).map_err(storage)? as u64);
            if seq != expected {
                return Ok(None);
            }
            let body = row.get_ref(6).map_err(storage)?.as_blob().map_err(|error| storage(error.into()))?;
            let (kind, schema_version) =
                (EventKind::from_tag(row.get(4).map_err(storage)?), row.get(5).map_err(storage)?);
            let payload = Payload::decode_body(kind, schema_version, body)
                .map_err(|error| LedgerError::Storage(Box::new(error)))?;
            let event = Event {
                id: EventId { device: *device, seq },
                hlc: Hlc {
                    wall_ms: row.get::<_, i64>(1).map_err(storage)? as u64,
                    logical: row.get(2).map_err(storage)?,
                },
                event_time: Millis(row.get::<_, i64>(3).map_err(storage)? as u64),
                payload,
            };
            chain = chain.next_with(&event, &mut scratch);
            expected = seq.next();
        }
        Ok((expected == up_to.next()).then_some(chain))
    }

    /// Forgets the proofs of `device` up to `up_to` before its events there are pruned. A row
    /// that goes past `up_to` keeps its part after it, with the chain value at `up_to` computed
    /// from the events still held, so a read from `up_to + 1` still carries a proof.
    fn prune_proofs(&self, device: &DeviceId, up_to: Seq) -> Result<(), LedgerError> {
        let rows = self.proof_rows(device, up_to, up_to)?;
        if let Some(straddling) = rows.last().filter(|row| row.first <= up_to && row.last > up_to) {
            let chain = self.chain_after(device, up_to, Some(straddling))?;
            if let Some(chain) = chain {
                self.insert_proof(*device, &straddling.after(up_to, chain)).map_err(storage)?;
            }
        }
        self.db
            .prepare_cached("DELETE FROM proofs WHERE device = ?1 AND first <= ?2")
            .map_err(storage)?
            .execute(params![device.as_str(), to_i64(up_to.0)])
            .map_err(storage)?;
        Ok(())
    }

    fn append_in_tx(&mut self, batch: &EventBatch) -> Result<Appended, LedgerError> {
        let mut state = self.streams.get(&batch.device).cloned().unwrap_or_default();
        if batch.from > state.high.next() {
            return Err(LedgerError::Hole { device: batch.device, high: state.high, from: batch.from });
        }
        // What is new: events in a declared hole, and events past high.
        let in_hole =
            |state: &StreamState, seq: Seq| state.holes.range(..=seq).next_back().is_some_and(|(_, last)| seq <= *last);
        let fresh: Vec<&Event> = batch
            .events
            .iter()
            .filter(|event| {
                event.id.seq > state.high || (in_hole(&state, event.id.seq) && event.id.seq > state.committed)
            })
            .collect();
        let incoming_bytes: u64 =
            fresh.iter().map(|event| event.payload.encoded_body_len() as u64 + EVENT_ROW_OVERHEAD_BYTES).sum();
        let used_bytes = self.stats().used_bytes;
        if !fresh.is_empty() && used_bytes + incoming_bytes > self.budget_bytes {
            return Err(LedgerError::Full { used_bytes, budget_bytes: self.budget_bytes });
        }
        self.begin().map_err(storage)?;
        let mut n_new = 0;
        for event in &fresh {
            let seq = event.id.seq;
            if seq <= state.high {
                // Fills (part of) a declared hole.
                if let Some((first, last)) = state.holes.range(..=seq).next_back().map(|(a, b)| (*a, *b)) {
                    state.holes.remove(&first);
                    if first < seq {
                        state.holes.insert(first, Seq(seq.0 - 1));
                    }
                    if seq < last {
                        state.holes.insert(seq.next(), last);
                    }
                }
            }
            let bytes = self.insert_event(event).map_err(storage)?;
            state.used_bytes += bytes;
            state.n_events += 1;
            n_new += 1;
        }
        if batch.last_seq() > state.high {
            // What is past high may start with a declared hole (after what the spool covers).
            let (from, first) = (state.high.next().max(batch.from), batch.first_seq().max(state.high.next()));
            if from < first {
                state.holes.insert(from, Seq(first.0 - 1));
            }
            if let Some(row) = ProofRow::of_fresh(batch, state.high) {
                self.insert_proof(batch.device, &row).map_err(storage)?;
            }
            state.high = batch.last_seq();
        }
        self.write_stream(batch.device, &state).map_err(storage)?;
        self.streams.insert(batch.device, state.clone());
        Ok(Appended { high: state.high, n_new })
    }
}

impl Ledger for Spool {
    fn high(&self, device: &DeviceId) -> Seq {
        self.streams.get(device).map_or(Seq::ZERO, |state| state.high)
    }

    fn version_vector(&self) -> VersionVector {
        self.streams.iter().map(|(device, state)| (*device, state.high)).collect()
    }

    fn read(&self, device: &DeviceId, from: Seq, max_events: usize) -> Result<Option<EventBatch>, LedgerError> {
        if !self.streams.contains_key(device) {
            return Ok(None);
        }
        let from = from.max(Seq::FIRST);
        let limit = max_events.min(BATCH_EVENTS_MAX);
        let mut statement = self
            .db
            .prepare_cached(
                "SELECT seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body
                 FROM events WHERE device = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(storage)?;
        let rows = statement
            .query_map(params![device.as_str(), to_i64(from.0), limit as i64], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, u32>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, u16>(4)?,
                    row.get::<_, u16>(5)?,
                    row.get::<_, Vec<u8>>(6)?,
                ))
            })
            .map_err(storage)?;
        let mut events: Vec<Event> = Vec::new();
        for row in rows {
            let (seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body) = row.map_err(storage)?;
            let seq = Seq(seq as u64);
            if events.last().is_some_and(|previous| seq != previous.id.seq.next()) {
                break;
            }
            let kind = EventKind::from_tag(kind);
            let payload = Payload::decode_body(kind, schema_version, &body)
                .map_err(|error| LedgerError::Storage(Box::new(error)))?;
            events.push(Event {
                id: EventId { device: *device, seq },
                hlc: Hlc { wall_ms: hlc_wall_ms as u64, logical: hlc_logical },
                event_time: Millis(event_time_ms as u64),
                payload,
            });
        }
        if events.is_empty() {
            return Ok(None);
        }
        let mut batch = EventBatch::new(*device, from, events)?;
        let (first, last) = (batch.first_seq(), batch.last_seq());
        let rows = self.proof_rows(device, first, last)?;
        // Events that came with a proof go on with one; others (unsigned devices) without.
        if rows.iter().any(|row| row.last >= first) {
            let prev = self.chain_after(device, Seq(first.0 - 1), rows.first())?;
            batch.proof = prev.map(|prev| proofs::batch_proof(prev, from, first, last, &rows));
        }
        Ok(Some(batch))
    }

    fn append(&mut self, batch: &EventBatch) -> Result<Appended, LedgerError> {
        batch.validate()?;
        self.append_in_tx(batch)
    }

    fn mark_committed(&mut self, device: DeviceId, up_to: Seq) -> Result<(), LedgerError> {
        let mut state = self.streams.get(&device).cloned().unwrap_or_default();
        if up_to <= state.committed {
            return Ok(());
        }
        self.begin().map_err(storage)?;
        let (n_events, body_bytes): (i64, i64) = self
            .db
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM events WHERE device = ?1 AND seq <= ?2",
                params![device.as_str(), to_i64(up_to.0)],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(storage)?;
        self.prune_proofs(&device, up_to)?;
        self.db
            .execute("DELETE FROM events WHERE device = ?1 AND seq <= ?2", params![device.as_str(), to_i64(up_to.0)])
            .map_err(storage)?;
        state.n_events = state.n_events.saturating_sub(n_events as u64);
        state.used_bytes =
            state.used_bytes.saturating_sub(body_bytes as u64 + n_events as u64 * EVENT_ROW_OVERHEAD_BYTES);
        state.committed = up_to;
        state.high = state.high.max(up_to);
        state.holes.retain(|first, _| *first > up_to);
        self.write_stream(device, &state).map_err(storage)?;
        self.streams.insert(device, state);
        Ok(())
    }

    fn chain_head(&self, device: &DeviceId) -> Option<ChainHash> {
        let high = self.high(device);
        let head = self
            .proof_rows(device, high.next(), high.next())
            .and_then(|rows| self.chain_after(device, high, rows.first()));
        match head {
            Ok(head) => head,
            Err(error) => {
                tracing::error!(%device, %error, "cannot read the chain head from the spool");
                None
            }
        }
    }
}

impl Store for Spool {
    fn shadow_mut(&mut self, device: &DeviceId) -> Result<Option<&mut Shadow>, ShadowError> {
        let (replica, limits) = (&self.replica, self.limits);
        Ok(Some(self.shadows.entry(*device).or_insert_with(|| Shadow::new(replica, limits))))
    }

    fn shadow_devices(&self) -> Vec<DeviceId> {
        self.shadows.keys().copied().collect()
    }
}

/// Whether a stored stream exists for `device` (for tests and status).
pub fn has_stream(db_path: &Path, device: &DeviceId) -> Result<bool, rusqlite::Error> {
    let db = Connection::open_with_flags(db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let found: Option<i64> = db
        .query_row("SELECT 1 FROM streams WHERE device = ?1", params![device.as_str()], |row| row.get(0))
        .optional()?;
    Ok(found.is_some())
}

mod proofs;

#[cfg(test)]
mod tests;
