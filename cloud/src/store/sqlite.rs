//! The SQLite backend: one file in WAL mode with `synchronous=FULL`, so a commit that returned
//! survives a crash or power loss. The embedded default: no setup, one file to back up.
//!
//! Events are stored as *segments* (see [`segment`]): one row per run of one device's events at
//! consecutive seqs written by one insert (a gateway's batch), up to
//! [`segment::SEGMENT_EVENTS_MAX`] events. A row per event with two secondary indexes keyed by
//! device cost about 5 µs per event in B-tree inserts landing mid-tree; a row per segment pays
//! them once per run. Reads stay per event: they find the segments through the indexes
//! (position: the rowid `first_position`; seq: `(device, first_seq)`; time: `(device,
//! max_time_ms, min_time_ms)`, since times inside a segment may be out of order) and decode them.
//!
//! Invariant: a device's segments never overlap in seqs, and a segment's positions are
//! `first_position..=last_position`, one per seq `first_seq..=last_seq` in order; positions over
//! all segments are dense. Every insert checks its runs against the stored segments (one index
//! probe per run), so a seq is never stored twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use tidesync_core::auth::ChainHash;
use tidesync_core::event::{DeviceId, Event, EventId, EventKind, GatewayId, Hlc, Millis, Payload, Seq};

use self::segment::{RawEvent, SegmentEncoder, SegmentReader};
use super::{
    device_of, json_of, to_i64, to_u64, DeadLetter, EventReader, EventWriter, IngestMeta, Position, ShadowRow,
    StoreError, StoredEvent, StreamInfo, TimeCursor,
};

mod migrate;
pub use migrate::PER_EVENT_EVENTS_SQL;
pub mod segment;

/// `PRAGMA application_id` of a cloud store ("TSCL").
pub const APPLICATION_ID: i64 = 0x5453_434c;

/// `PRAGMA user_version` of the segment layout. Files written before it (one row per event in an
/// `events` table) have 0 and are migrated when a writer opens them.
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS segments (
    first_position INTEGER PRIMARY KEY,
    last_position  INTEGER NOT NULL,
    device         TEXT    NOT NULL,
    first_seq      INTEGER NOT NULL,
    last_seq       INTEGER NOT NULL,
    min_time_ms    INTEGER NOT NULL,
    max_time_ms    INTEGER NOT NULL,
    gateway        TEXT    NOT NULL,
    ingest_ms      INTEGER NOT NULL,
    events         BLOB    NOT NULL
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS segments_by_seq ON segments (device, first_seq);
CREATE INDEX IF NOT EXISTS segments_by_time ON segments (device, max_time_ms, min_time_ms);
CREATE TABLE IF NOT EXISTS streams (
    device TEXT PRIMARY KEY NOT NULL,
    high   INTEGER NOT NULL,
    holes  TEXT    NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS shadows (
    device     TEXT PRIMARY KEY NOT NULL,
    doc        BLOB    NOT NULL,
    view       TEXT    NOT NULL,
    updated_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS projection_rows (
    projection TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (projection, key)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    projection TEXT PRIMARY KEY NOT NULL,
    position   INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS dead_letters (
    id         INTEGER PRIMARY KEY,
    projection TEXT    NOT NULL,
    position   INTEGER NOT NULL,
    device     TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    reason     TEXT    NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS chain_heads (
    device TEXT PRIMARY KEY NOT NULL,
    high   INTEGER NOT NULL,
    chain  BLOB    NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS security_events (
    id       INTEGER PRIMARY KEY,
    first_ms INTEGER NOT NULL,
    last_ms  INTEGER NOT NULL,
    gateway  TEXT    NOT NULL,
    device   TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    detail   TEXT    NOT NULL,
    from_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count    INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS security_events_by_batch ON security_events (device, gateway, from_seq, last_seq);
";

/// The columns of a segment row as reads decode it (see [`segment_of`]).
const SEGMENT_COLUMNS: &str = "first_position, last_position, device, first_seq, last_seq, gateway, ingest_ms, events";

/// Settings of the writer's connection: WAL with `synchronous=FULL`, so a commit that returned
/// is durable (the WAL is synced at every commit).
pub const WRITER_PRAGMAS: [(&str, &str); 2] = [("journal_mode", "WAL"), ("synchronous", "FULL")];

/// Prepared statements kept per connection (every read and write).
const STATEMENT_CACHE_CAPACITY: usize = 64;

const INSERT_SEGMENT_SQL: &str = "INSERT INTO segments
    (first_position, last_position, device, first_seq, last_seq, min_time_ms, max_time_ms, gateway, ingest_ms, events)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// The stored segment of device `?1` with the highest first seq at or below `?2`. Segments of
/// one device never overlap, so it is the only one that can hold seqs in `[x, ?2]` for any `x`
/// above its first seq.
const SEGMENT_AT_OR_BELOW_SQL: &str =
    "SELECT first_seq, last_seq FROM segments WHERE device = ?1 AND first_seq <= ?2 ORDER BY first_seq DESC LIMIT 1";

/// The first seq of the segment of device `?1` that may hold seq `?2` (or `?2` when none does):
/// reads by seq start there.
const FIRST_SEQ_FROM_SQL: &str = "COALESCE((SELECT first_seq FROM segments WHERE device = ?1 AND first_seq <= ?2
    ORDER BY first_seq DESC LIMIT 1), ?2)";

/// A connection to a SQLite cloud store (a writer, or a reader with `query_only`).
pub struct SqliteStore {
    db: Connection,
    path: PathBuf,
    in_transaction: bool,
    next_position: u64,
    /// Reused for encoding event bodies and segments (SQLite copies what is bound).
    body: Vec<u8>,
    segment: SegmentEncoder,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

/// What a segment row's events share, checked.
struct SegmentHead {
    first_position: u64,
    first_seq: u64,
    device: DeviceId,
    meta: IngestMeta,
}

fn segment_corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { what: "event segment", detail: error.to_string() }
}

/// Reads a row selected as [`SEGMENT_COLUMNS`]: its shared columns and a reader of its events.
fn segment_of<'row>(row: &'row rusqlite::Row<'_>) -> Result<(SegmentHead, SegmentReader<'row>), StoreError> {
    let first_position: i64 = row.get(0)?;
    let last_position: i64 = row.get(1)?;
    let device: String = row.get(2)?;
    let first_seq: i64 = row.get(3)?;
    let last_seq: i64 = row.get(4)?;
    let gateway: String = row.get(5)?;
    let ingest_ms: i64 = row.get(6)?;
    let blob = row.get_ref(7)?.as_blob().map_err(segment_corrupt)?;
    let n_events = last_seq.checked_sub(first_seq).and_then(|span| span.checked_add(1)).filter(|n| *n > 0);
    let n_positions = last_position.checked_sub(first_position).and_then(|span| span.checked_add(1));
    let n_events = match (n_events, n_positions) {
        (Some(n), Some(positions)) if n == positions && first_seq >= 0 && first_position > 0 => to_u64(n),
        _ => {
            return Err(segment_corrupt(format_args!(
                "segment at position {first_position}: seqs {first_seq}..={last_seq}, positions \
                 {first_position}..={last_position}"
            )))
        }
    };
    let head = SegmentHead {
        first_position: to_u64(first_position),
        first_seq: to_u64(first_seq),
        device: device_of(&device)?,
        meta: IngestMeta {
            gateway: GatewayId::new(&gateway).map_err(|error| StoreError::corrupt("gateway name", error))?,
            ingest_time: Millis(to_u64(ingest_ms)),
        },
    };
    let reader = SegmentReader::new(blob, n_events)
        .map_err(|error| segment_corrupt(format_args!("segment at position {first_position}: {error}")))?;
    Ok((head, reader))
}

/// The `index`-th event of a segment, with its payload decoded.
fn stored_event(head: &SegmentHead, index: u64, raw: &RawEvent<'_>) -> Result<StoredEvent, StoreError> {
    let payload = Payload::decode_body(EventKind::from_tag(raw.kind), raw.schema_version, raw.body)
        .map_err(|error| StoreError::corrupt("event body", error))?;
    Ok(StoredEvent {
        position: Position(head.first_position + index),
        event: Event {
            id: EventId { device: head.device, seq: Seq(head.first_seq + index) },
            hlc: Hlc { wall_ms: raw.hlc_wall_ms, logical: raw.hlc_logical },
            event_time: Millis(raw.event_time_ms),
            payload,
        },
        meta: head.meta,
    })
}

/// The error of an insert that was proven new but finds its seqs stored: what the unique index of
/// a per-event table raised, so the caller's handling (roll back, check conflicts from now on)
/// is the same.
fn stored_already(device: &DeviceId, first: u64, last: u64) -> StoreError {
    StoreError::Sqlite(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE),
        Some(format!("UNIQUE constraint failed: events of {device} in seqs {first}..={last} are stored already")),
    ))
}

impl SqliteStore {
    /// Opens (or creates) the store at `path` for writing. A file in the per-event layout of
    /// earlier builds is migrated to segments first, in one transaction.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        let found: i64 = db.query_row("PRAGMA application_id", [], |row| row.get(0))?;
        let n_tables: i64 = db.query_row("SELECT COUNT(*) FROM sqlite_master", [], |row| row.get(0))?;
        if found != APPLICATION_ID && !(found == 0 && n_tables == 0) {
            return Err(StoreError::NotAStore { path: path.display().to_string(), found });
        }
        for (name, value) in WRITER_PRAGMAS {
            db.pragma_update(None, name, value)?;
        }
        db.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        // Under the write lock, so two writers opening one old file migrate it once.
        db.execute_batch("BEGIN IMMEDIATE")?;
        match migrate::create_or_migrate(&db, path) {
            Ok(()) => db.execute_batch("COMMIT")?,
            Err(error) => {
                if let Err(rollback) = db.execute_batch("ROLLBACK") {
                    tracing::error!(error = %rollback, "rollback of the schema setup failed");
                }
                return Err(error);
            }
        }
        Ok(Self::with(db, path))
    }

    fn with(db: Connection, path: &Path) -> Self {
        Self {
            db,
            path: path.to_path_buf(),
            in_transaction: false,
            next_position: 1,
            body: Vec::new(),
            segment: SegmentEncoder::new(),
        }
    }

    /// Opens an existing store for reading only (beside a running writer).
    pub fn open_reader(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let found: i64 = db.query_row("PRAGMA application_id", [], |row| row.get(0))?;
        if found != APPLICATION_ID {
            return Err(StoreError::NotAStore { path: path.display().to_string(), found });
        }
        let version: i64 = db.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::Corrupt {
                what: "store layout",
                detail: format!(
                    "{}: layout version {version}, this build reads {SCHEMA_VERSION} (a writer opened on the file \
                     migrates it)",
                    path.display()
                ),
            });
        }
        db.pragma_update(None, "query_only", true)?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Self::with(db, path))
    }

    /// Inserts `run` (one device's events at consecutive seqs, none of them stored) as segments
    /// at the next positions, cut where a segment is full; returns how many were inserted.
    fn insert_run(&mut self, run: &[Event], meta: &IngestMeta) -> Result<usize, StoreError> {
        let mut rest = run;
        while let Some(first) = rest.first() {
            self.segment.clear();
            for event in rest {
                self.segment.push_event(event, &mut self.body);
                if self.segment.is_full() {
                    break;
                }
            }
            let n = self.segment.len();
            let (min_time, max_time) = self.segment.time_range();
            let first_position = self.next_position;
            let last_position = first_position + n as u64 - 1;
            let mut statement = self.db.prepare_cached(INSERT_SEGMENT_SQL)?;
            statement.execute(params![
                to_i64(first_position),
                to_i64(last_position),
                first.id.device.as_str(),
                to_i64(first.id.seq.0),
                to_i64(first.id.seq.0 + n as u64 - 1),
                to_i64(min_time),
                to_i64(max_time),
                meta.gateway.as_str(),
                to_i64(meta.ingest_time.0),
                self.segment.finish(),
            ])?;
            self.next_position = last_position + 1;
            rest = &rest[n..];
        }
        Ok(run.len())
    }

    /// The stored seq ranges of `device` that overlap `first..=last`, in seq order.
    fn stored_ranges(&self, device: &DeviceId, first: u64, last: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let sql = format!(
            "SELECT first_seq, last_seq FROM segments WHERE device = ?1 AND first_seq <= ?3
             AND first_seq >= {FIRST_SEQ_FROM_SQL} ORDER BY first_seq"
        );
        let mut statement = self.db.prepare_cached(&sql)?;
        let rows = statement
            .query_map(params![device.as_str(), to_i64(first), to_i64(last)], |row| {
                Ok((to_u64(row.get(0)?), to_u64(row.get(1)?)))
            })?
            .collect::<Result<Vec<(u64, u64)>, _>>()?;
        Ok(rows.into_iter().filter(|(_, stored_last)| *stored_last >= first).collect())
    }

    /// Inserts `events` at the next positions, one segment per run (same device, consecutive
    /// seqs). With `skip_stored`, seqs stored already are left out; without, finding one is an
    /// error (the caller proved them new). Either way a seq is never stored twice: each run is
    /// checked against the segments, which include the runs of this call inserted before it.
    fn insert(
        &mut self,
        events: &[Event],
        meta: &IngestMeta,
        skip_stored: bool,
    ) -> Result<(usize, Position), StoreError> {
        self.begin()?;
        let mut n_inserted = 0;
        let mut rest = events;
        while let Some(first) = rest.first() {
            let device = first.id.device;
            let n_run = 1 + rest
                .windows(2)
                .take_while(|pair| {
                    pair[1].id.device == device && pair[0].id.seq.0.checked_add(1) == Some(pair[1].id.seq.0)
                })
                .count();
            let (run, tail) = rest.split_at(n_run);
            rest = tail;
            let (first_seq, last_seq) = (first.id.seq.0, first.id.seq.0 + (n_run as u64 - 1));
            if !skip_stored {
                let below: Option<(i64, i64)> = self
                    .db
                    .prepare_cached(SEGMENT_AT_OR_BELOW_SQL)?
                    .query_row(params![device.as_str(), to_i64(last_seq)], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()?;
                if below.is_some_and(|(_, stored_last)| to_u64(stored_last) >= first_seq) {
                    return Err(stored_already(&device, first_seq, last_seq));
                }
                n_inserted += self.insert_run(run, meta)?;
                continue;
            }
            let stored = self.stored_ranges(&device, first_seq, last_seq)?;
            let mut stored = stored.into_iter().peekable();
            let (mut start, mut index) = (0, 0);
            while index < run.len() {
                let seq = run[index].id.seq.0;
                while stored.peek().is_some_and(|(_, stored_last)| *stored_last < seq) {
                    stored.next();
                }
                match stored.peek() {
                    Some(&(stored_first, stored_last)) if stored_first <= seq => {
                        n_inserted += self.insert_run(&run[start..index], meta)?;
                        let n_stored = usize::try_from(stored_last - seq + 1).unwrap_or(usize::MAX);
                        index += n_stored.min(run.len() - index);
                        start = index;
                    }
                    _ => index += 1,
                }
            }
            n_inserted += self.insert_run(&run[start..], meta)?;
        }
        Ok((n_inserted, Position(self.next_position - 1)))
    }

    /// Runs `sql` (selecting [`SEGMENT_COLUMNS`]) and hands each segment's events in order to
    /// `visit` (the segment, the event's index in it, the event), until it returns `false`.
    fn scan(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        mut visit: impl FnMut(&SegmentHead, u64, &RawEvent<'_>) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut statement = self.db.prepare_cached(sql)?;
        let mut rows = statement.query(params)?;
        while let Some(row) = rows.next()? {
            let (head, reader) = segment_of(row)?;
            for (index, raw) in (0u64..).zip(reader) {
                let raw = raw.map_err(|error| {
                    segment_corrupt(format_args!("segment at position {}: {error}", head.first_position))
                })?;
                if !visit(&head, index, &raw)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

fn limit_of(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
}

impl EventReader for SqliteStore {
    fn head(&mut self) -> Result<Position, StoreError> {
        let head: Option<i64> = self
            .db
            .prepare_cached("SELECT last_position FROM segments ORDER BY first_position DESC LIMIT 1")?
            .query_row([], |row| row.get(0))
            .optional()?;
        Ok(Position(head.map_or(0, to_u64)))
    }

    fn read_from(&mut self, after: Position, max_events: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let mut events = Vec::new();
        if max_events == 0 {
            return Ok(events);
        }
        // From the segment holding `after + 1` (which may start before it) on.
        let sql = format!(
            "SELECT {SEGMENT_COLUMNS} FROM segments WHERE first_position >= COALESCE((SELECT first_position
             FROM segments WHERE first_position <= ?1 ORDER BY first_position DESC LIMIT 1), ?1)
             ORDER BY first_position"
        );
        let next = to_i64(after.0.saturating_add(1));
        self.scan(&sql, params![next], |head, index, raw| {
            if head.first_position + index > after.0 {
                events.push(stored_event(head, index, raw)?);
            }
            Ok(events.len() < max_events)
        })?;
        Ok(events)
    }

    fn read_seqs(
        &mut self,
        device: &DeviceId,
        from: Seq,
        to: Seq,
        max_events: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut events = Vec::new();
        if max_events == 0 || from > to {
            return Ok(events);
        }
        let sql = format!(
            "SELECT {SEGMENT_COLUMNS} FROM segments WHERE device = ?1 AND first_seq <= ?3
             AND first_seq >= {FIRST_SEQ_FROM_SQL} ORDER BY first_seq"
        );
        self.scan(&sql, params![device.as_str(), to_i64(from.0), to_i64(to.0)], |head, index, raw| {
            let seq = head.first_seq + index;
            if seq > to.0 {
                return Ok(false);
            }
            if seq >= from.0 {
                events.push(stored_event(head, index, raw)?);
            }
            Ok(events.len() < max_events)
        })?;
        Ok(events)
    }

    fn read_times(
        &mut self,
        device: &DeviceId,
        from: Millis,
        to: Millis,
        cursor: Option<TimeCursor>,
        max_events: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if max_events == 0 || from >= to {
            return Ok(Vec::new());
        }
        let after = |time: u64, seq: u64| {
            cursor.is_none_or(|(cursor_time, cursor_seq)| (time, seq) > (cursor_time.0, cursor_seq.0))
        };
        let wanted = |time: u64, seq: u64| from.0 <= time && time < to.0 && after(time, seq);
        // Candidates from the covering time index, without reading a blob: segments whose time
        // range meets the window past the cursor.
        let low = cursor.map_or(from.0, |(time, _)| time.0.max(from.0));
        let mut candidates: Vec<(i64, i64)> = self
            .db
            .prepare_cached(
                "SELECT min_time_ms, first_position FROM segments
                 WHERE device = ?1 AND max_time_ms >= ?2 AND min_time_ms < ?3",
            )?
            .query_map(params![device.as_str(), to_i64(low), to_i64(to.0)], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        candidates.sort_unstable();
        let one_segment = format!("SELECT {SEGMENT_COLUMNS} FROM segments WHERE first_position = ?1");
        // The first `max_events` (time, seq) keys, found in order of the segments' earliest time:
        // once a segment starts after the last key kept, no later one can hold a smaller key.
        let mut keys: Vec<(u64, u64, i64)> = Vec::new();
        for (min_time, first_position) in candidates {
            if keys.len() >= max_events && keys.last().is_some_and(|(time, _, _)| to_u64(min_time) > *time) {
                break;
            }
            self.scan(&one_segment, params![first_position], |head, index, raw| {
                let seq = head.first_seq + index;
                if wanted(raw.event_time_ms, seq) {
                    keys.push((raw.event_time_ms, seq, first_position));
                }
                Ok(true)
            })?;
            if keys.len() >= max_events {
                keys.sort_unstable();
                keys.truncate(max_events);
            }
        }
        keys.sort_unstable();
        // Decode only the events kept, one segment at a time.
        let mut by_segment: BTreeMap<i64, std::collections::BTreeSet<u64>> = BTreeMap::new();
        for (_, seq, first_position) in &keys {
            by_segment.entry(*first_position).or_default().insert(*seq);
        }
        let mut events = Vec::with_capacity(keys.len());
        for (first_position, seqs) in by_segment {
            self.scan(&one_segment, params![first_position], |head, index, raw| {
                if seqs.contains(&(head.first_seq + index)) {
                    events.push(stored_event(head, index, raw)?);
                }
                Ok(true)
            })?;
        }
        events.sort_unstable_by_key(|stored| (stored.event.event_time, stored.event.id.seq));
        Ok(events)
    }

    fn streams(&mut self) -> Result<BTreeMap<DeviceId, StreamInfo>, StoreError> {
        let mut statement = self.db.prepare_cached("SELECT device, high, holes FROM streams")?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, String>(2)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|(device, high, holes)| stream_info(&device, high, &holes)).collect()
    }

    fn shadow(&mut self, device: &DeviceId) -> Result<Option<ShadowRow>, StoreError> {
        let row = self
            .db
            .query_row(
                "SELECT device, doc, view, updated_ms FROM shadows WHERE device = ?1",
                params![device.as_str()],
                |row| Ok((row.get::<_, String>(0)?, row.get(1)?, row.get::<_, String>(2)?, row.get::<_, i64>(3)?)),
            )
            .optional()?;
        row.map(|(device, doc, view, updated)| shadow_row(&device, doc, &view, updated)).transpose()
    }

    fn shadows(&mut self) -> Result<Vec<ShadowRow>, StoreError> {
        let mut statement =
            self.db.prepare_cached("SELECT device, doc, view, updated_ms FROM shadows ORDER BY device")?;
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get(1)?, row.get::<_, String>(2)?, row.get::<_, i64>(3)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|(device, doc, view, updated)| shadow_row(&device, doc, &view, updated)).collect()
    }

    fn checkpoint(&mut self, projection: &str) -> Result<Position, StoreError> {
        let position: Option<i64> = self
            .db
            .query_row("SELECT position FROM checkpoints WHERE projection = ?1", params![projection], |row| row.get(0))
            .optional()?;
        Ok(Position(position.map_or(0, to_u64)))
    }

    fn rows(
        &mut self,
        projection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        // Keys compare as bytes (BINARY collation), so the prefix range is [prefix, prefix + U+10FFFF).
        let upper = format!("{prefix}\u{10FFFF}");
        let mut statement = self.db.prepare_cached(
            "SELECT key, value FROM projection_rows WHERE projection = ?1 AND key >= ?2 AND key < ?3
             ORDER BY key LIMIT ?4",
        )?;
        let rows = statement
            .query_map(params![projection, prefix, upper, limit_of(limit)], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|(key, value)| Ok((key, json_of("projection row", &value)?))).collect()
    }

    fn row(&mut self, projection: &str, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let value: Option<String> = self
            .db
            .prepare_cached("SELECT value FROM projection_rows WHERE projection = ?1 AND key = ?2")?
            .query_row(params![projection, key], |row| row.get(0))
            .optional()?;
        value.map(|value| json_of("projection row", &value)).transpose()
    }

    fn dead_letters(&mut self, projection: Option<&str>, limit: usize) -> Result<(Vec<DeadLetter>, u64), StoreError> {
        let count: i64 = self.db.query_row(
            "SELECT COUNT(*) FROM dead_letters WHERE ?1 IS NULL OR projection = ?1",
            params![projection],
            |row| row.get(0),
        )?;
        let mut statement = self.db.prepare_cached(
            "SELECT projection, position, device, seq, reason FROM dead_letters
             WHERE ?1 IS NULL OR projection = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = statement
            .query_map(params![projection, limit_of(limit)], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, String>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let letters = rows
            .into_iter()
            .map(|(projection, position, device, seq, reason)| {
                Ok(DeadLetter {
                    projection,
                    position: Position(to_u64(position)),
                    id: tidesync_core::event::EventId { device: device_of(&device)?, seq: Seq(to_u64(seq)) },
                    reason,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((letters, to_u64(count)))
    }

    fn chain_heads(&mut self) -> Result<BTreeMap<DeviceId, (Seq, ChainHash)>, StoreError> {
        let mut statement = self.db.prepare_cached("SELECT device, high, chain FROM chain_heads")?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, Vec<u8>>(2)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|(device, high, chain)| chain_head(&device, high, &chain)).collect()
    }

    fn security_events(
        &mut self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<super::SecurityEvent>, u64), StoreError> {
        let count: i64 = self.db.query_row("SELECT COUNT(*) FROM security_events", [], |row| row.get(0))?;
        let before = before.map_or(i64::MAX, to_i64);
        let mut statement = self.db.prepare_cached(
            "SELECT id, first_ms, last_ms, gateway, device, kind, detail, from_seq, last_seq, count
             FROM security_events WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = statement
            .query_map(params![before, limit_of(limit)], |row| {
                Ok(SecurityRow {
                    id: row.get(0)?,
                    first_ms: row.get(1)?,
                    last_ms: row.get(2)?,
                    gateway: row.get(3)?,
                    device: row.get(4)?,
                    kind: row.get(5)?,
                    detail: row.get(6)?,
                    from_seq: row.get(7)?,
                    last_seq: row.get(8)?,
                    count: row.get(9)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let events = rows.into_iter().map(SecurityRow::into_event).collect::<Result<Vec<_>, _>>()?;
        Ok((events, to_u64(count)))
    }
}

/// A stored chain head's columns, checked.
pub(crate) fn chain_head(device: &str, high: i64, chain: &[u8]) -> Result<(DeviceId, (Seq, ChainHash)), StoreError> {
    let chain: [u8; 32] = chain
        .try_into()
        .map_err(|_| StoreError::Corrupt { what: "chain head", detail: format!("{} bytes, not 32", chain.len()) })?;
    Ok((device_of(device)?, (Seq(to_u64(high)), ChainHash(chain))))
}

/// The columns of a stored security event, as both backends read them.
pub(crate) struct SecurityRow {
    pub(crate) id: i64,
    pub(crate) first_ms: i64,
    pub(crate) last_ms: i64,
    pub(crate) gateway: String,
    pub(crate) device: String,
    pub(crate) kind: String,
    pub(crate) detail: String,
    pub(crate) from_seq: i64,
    pub(crate) last_seq: i64,
    pub(crate) count: i64,
}

impl SecurityRow {
    pub(crate) fn into_event(self) -> Result<super::SecurityEvent, StoreError> {
        let gateway = tidesync_core::event::GatewayId::new(&self.gateway)
            .map_err(|error| StoreError::Corrupt { what: "gateway name", detail: error.to_string() })?;
        Ok(super::SecurityEvent {
            id: to_u64(self.id),
            first_ms: Millis(to_u64(self.first_ms)),
            last_ms: Millis(to_u64(self.last_ms)),
            gateway,
            device: device_of(&self.device)?,
            kind: self.kind,
            detail: self.detail,
            from_seq: Seq(to_u64(self.from_seq)),
            last_seq: Seq(to_u64(self.last_seq)),
            count: to_u64(self.count),
        })
    }
}

/// Builds a [`StreamInfo`] from its stored columns. The cloud never prunes, so the events held
/// are the seqs covered minus the holes.
pub(crate) fn stream_info(device: &str, high: i64, holes: &str) -> Result<(DeviceId, StreamInfo), StoreError> {
    let device = device_of(device)?;
    let holes: Vec<(u64, u64)> =
        serde_json::from_str(holes).map_err(|error| StoreError::corrupt("stream holes", error))?;
    let high = Seq(to_u64(high));
    let n_holes: u64 = holes.iter().map(|(first, last)| last.saturating_sub(*first) + 1).sum();
    let holes: Vec<(Seq, Seq)> = holes.into_iter().map(|(first, last)| (Seq(first), Seq(last))).collect();
    Ok((device, StreamInfo { high, holes, n_events: high.0.saturating_sub(n_holes) }))
}

/// The stored form of a stream's holes.
pub(crate) fn holes_json(holes: &[(Seq, Seq)]) -> String {
    let pairs: Vec<(u64, u64)> = holes.iter().map(|(first, last)| (first.0, last.0)).collect();
    serde_json::Value::from(pairs.into_iter().map(|(a, b)| serde_json::json!([a, b])).collect::<Vec<_>>()).to_string()
}

pub(crate) fn shadow_row(device: &str, doc: Vec<u8>, view: &str, updated: i64) -> Result<ShadowRow, StoreError> {
    Ok(ShadowRow {
        device: device_of(device)?,
        doc,
        view: json_of("shadow view", view)?,
        updated: Millis(to_u64(updated)),
    })
}

impl EventWriter for SqliteStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        if !self.in_transaction {
            self.db.execute_batch("BEGIN IMMEDIATE")?;
            self.in_transaction = true;
            match self.head() {
                Ok(head) => self.next_position = head.0 + 1,
                Err(error) => {
                    self.rollback();
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        if self.in_transaction {
            self.db.execute_batch("COMMIT")?;
            self.in_transaction = false;
        }
        Ok(())
    }

    fn rollback(&mut self) {
        if self.in_transaction {
            if let Err(error) = self.db.execute_batch("ROLLBACK") {
                tracing::error!(%error, "rollback failed");
            }
            self.in_transaction = false;
        }
    }

    fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    fn insert_events(&mut self, events: &[Event], meta: &IngestMeta) -> Result<(usize, Position), StoreError> {
        self.insert(events, meta, true)
    }

    fn insert_new_events(&mut self, events: &[Event], meta: &IngestMeta) -> Result<(usize, Position), StoreError> {
        self.insert(events, meta, false)
    }

    fn write_stream(&mut self, device: &DeviceId, high: Seq, holes: &[(Seq, Seq)]) -> Result<(), StoreError> {
        self.begin()?;
        self.db
            .prepare_cached(
                "INSERT INTO streams (device, high, holes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device) DO UPDATE SET high = excluded.high, holes = excluded.holes",
            )?
            .execute(params![device.as_str(), to_i64(high.0), holes_json(holes)])?;
        Ok(())
    }

    fn write_shadow(&mut self, row: &ShadowRow) -> Result<(), StoreError> {
        self.begin()?;
        self.db
            .prepare_cached(
                "INSERT INTO shadows (device, doc, view, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (device) DO UPDATE SET doc = excluded.doc, view = excluded.view,
                 updated_ms = excluded.updated_ms",
            )?
            .execute(params![row.device.as_str(), row.doc, row.view.to_string(), to_i64(row.updated.0)])?;
        Ok(())
    }

    fn put_rows(&mut self, projection: &str, rows: &[(String, Option<serde_json::Value>)]) -> Result<(), StoreError> {
        self.begin()?;
        for (key, value) in rows {
            match value {
                Some(value) => {
                    self.db
                        .prepare_cached(
                            "INSERT INTO projection_rows (projection, key, value) VALUES (?1, ?2, ?3)
                             ON CONFLICT (projection, key) DO UPDATE SET value = excluded.value",
                        )?
                        .execute(params![projection, key, value.to_string()])?;
                }
                None => {
                    self.db
                        .prepare_cached("DELETE FROM projection_rows WHERE projection = ?1 AND key = ?2")?
                        .execute(params![projection, key])?;
                }
            }
        }
        Ok(())
    }

    fn clear_projection(&mut self, projection: &str) -> Result<(), StoreError> {
        self.begin()?;
        self.db.execute("DELETE FROM projection_rows WHERE projection = ?1", params![projection])?;
        self.db.execute("DELETE FROM checkpoints WHERE projection = ?1", params![projection])?;
        self.db.execute("DELETE FROM dead_letters WHERE projection = ?1", params![projection])?;
        Ok(())
    }

    fn set_checkpoint(&mut self, projection: &str, position: Position) -> Result<(), StoreError> {
        self.begin()?;
        self.db
            .prepare_cached(
                "INSERT INTO checkpoints (projection, position) VALUES (?1, ?2)
                 ON CONFLICT (projection) DO UPDATE SET position = excluded.position",
            )?
            .execute(params![projection, to_i64(position.0)])?;
        Ok(())
    }

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), StoreError> {
        self.begin()?;
        self.db
            .prepare_cached(
                "INSERT INTO dead_letters (projection, position, device, seq, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                letter.projection,
                to_i64(letter.position.0),
                letter.id.device.as_str(),
                to_i64(letter.id.seq.0),
                letter.reason
            ])?;
        Ok(())
    }
    fn write_chain_head(&mut self, device: &DeviceId, high: Seq, chain: &ChainHash) -> Result<(), StoreError> {
        self.begin()?;
        self.db
            .prepare_cached(
                "INSERT INTO chain_heads (device, high, chain) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device) DO UPDATE SET high = excluded.high, chain = excluded.chain",
            )?
            .execute(params![device.as_str(), to_i64(high.0), &chain.0[..]])?;
        Ok(())
    }

    fn record_security_event(&mut self, event: &super::SecurityEvent) -> Result<(), StoreError> {
        self.begin()?;
        let repeated = self
            .db
            .prepare_cached(
                "UPDATE security_events SET count = count + ?1, last_ms = MAX(last_ms, ?2)
                 WHERE device = ?3 AND gateway = ?4 AND from_seq = ?5 AND last_seq = ?6 AND kind = ?7 AND detail = ?8",
            )?
            .execute(params![
                to_i64(event.count),
                to_i64(event.last_ms.0),
                event.device.as_str(),
                event.gateway.as_str(),
                to_i64(event.from_seq.0),
                to_i64(event.last_seq.0),
                event.kind,
                event.detail,
            ])?;
        if repeated == 0 {
            self.db
                .prepare_cached(
                    "INSERT INTO security_events
                     (first_ms, last_ms, gateway, device, kind, detail, from_seq, last_seq, count)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    to_i64(event.first_ms.0),
                    to_i64(event.last_ms.0),
                    event.gateway.as_str(),
                    event.device.as_str(),
                    event.kind,
                    event.detail,
                    to_i64(event.from_seq.0),
                    to_i64(event.last_seq.0),
                    to_i64(event.count),
                ])?;
        }
        Ok(())
    }
}
