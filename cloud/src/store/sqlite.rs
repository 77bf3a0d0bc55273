//! The SQLite backend: one file in WAL mode with `synchronous=FULL`, so a commit that returned
//! survives a crash or power loss. The embedded default: no setup, one file to back up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use tidesync_core::auth::ChainHash;
use tidesync_core::event::{DeviceId, Event, Millis, Seq};

use super::{
    device_of, json_of, to_i64, to_u64, DeadLetter, EventReader, EventRow, EventWriter, IngestMeta, Position,
    ShadowRow, StoreError, StoredEvent, StreamInfo, TimeCursor,
};

/// `PRAGMA application_id` of a cloud store ("TSCL").
pub const APPLICATION_ID: i64 = 0x5453_434c;

const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS events (
    position       INTEGER PRIMARY KEY,
    device         TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    hlc_wall_ms    INTEGER NOT NULL,
    hlc_logical    INTEGER NOT NULL,
    event_time_ms  INTEGER NOT NULL,
    kind           INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    body           BLOB    NOT NULL,
    gateway        TEXT    NOT NULL,
    ingest_ms      INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS events_by_id ON events (device, seq);
CREATE INDEX IF NOT EXISTS events_by_time ON events (device, event_time_ms, seq);
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

const EVENT_COLUMNS: &str =
    "position, device, seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body, gateway, ingest_ms";

/// Settings of the writer's connection: WAL with `synchronous=FULL`, so a commit that returned
/// is durable (the WAL is synced at every commit).
pub const WRITER_PRAGMAS: [(&str, &str); 2] = [("journal_mode", "WAL"), ("synchronous", "FULL")];

/// Rows per multi-row `INSERT` statement, largest first; a batch is cut into chunks of these
/// sizes, so at most `INSERT_CHUNK_ROWS.len()` statements are ever prepared (and cached).
pub const INSERT_CHUNK_ROWS: [usize; 5] = [256, 64, 16, 4, 1];
/// Parameters bound per inserted row (the gateway and ingest time are shared: `?1`, `?2`).
const INSERT_PARAMS_PER_ROW: usize = 8;
/// Prepared statements kept per connection (the insert chunks plus every read and write).
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// `INSERT` of `n_rows` events, skipping ids stored already. `position` is left out: it is the
/// rowid, so each new row gets the next one.
fn insert_sql(n_rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO events
         (device, seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body, gateway, ingest_ms)
         VALUES ",
    );
    for row in 0..n_rows {
        let first = 3 + row * INSERT_PARAMS_PER_ROW;
        if row > 0 {
            sql.push(',');
        }
        sql.push('(');
        for param in first..first + INSERT_PARAMS_PER_ROW {
            sql.push_str(&format!("?{param},"));
        }
        sql.push_str("?1,?2)");
    }
    sql.push_str(" ON CONFLICT (device, seq) DO NOTHING");
    sql
}

/// A connection to a SQLite cloud store (a writer, or a reader with `query_only`).
pub struct SqliteStore {
    db: Connection,
    path: PathBuf,
    in_transaction: bool,
    next_position: u64,
    /// Reused for encoding event bodies (SQLite copies what is bound).
    body: Vec<u8>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn event_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        position: row.get(0)?,
        device: row.get(1)?,
        seq: row.get(2)?,
        hlc_wall_ms: row.get(3)?,
        hlc_logical: row.get(4)?,
        event_time_ms: row.get(5)?,
        kind: row.get(6)?,
        schema_version: row.get(7)?,
        body: row.get(8)?,
        gateway: row.get(9)?,
        ingest_ms: row.get(10)?,
    })
}

impl SqliteStore {
    /// Opens (or creates) the store at `path` for writing.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        let found: i64 = db.query_row("PRAGMA application_id", [], |row| row.get(0))?;
        let n_tables: i64 = db.query_row("SELECT COUNT(*) FROM sqlite_master", [], |row| row.get(0))?;
        if found != APPLICATION_ID && !(found == 0 && n_tables == 0) {
            return Err(StoreError::NotAStore { path: path.display().to_string(), found });
        }
        for (name, value) in WRITER_PRAGMAS {
            db.pragma_update(None, name, value)?;
        }
        db.pragma_update(None, "application_id", APPLICATION_ID)?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        db.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        db.execute_batch(SCHEMA_SQL)?;
        Ok(Self { db, path: path.to_path_buf(), in_transaction: false, next_position: 1, body: Vec::new() })
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
        db.pragma_update(None, "query_only", true)?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Self { db, path: path.to_path_buf(), in_transaction: false, next_position: 1, body: Vec::new() })
    }

    /// Inserts `chunk` (one of [`INSERT_CHUNK_ROWS`] long) with one cached multi-row statement;
    /// returns how many rows were new.
    fn insert_chunk(&mut self, chunk: &[Event], meta: &IngestMeta) -> Result<usize, StoreError> {
        let sql = insert_sql(chunk.len());
        let mut statement = self.db.prepare_cached(&sql)?;
        statement.raw_bind_parameter(1, meta.gateway.as_str())?;
        statement.raw_bind_parameter(2, to_i64(meta.ingest_time.0))?;
        let mut index = 3;
        for event in chunk {
            self.body.clear();
            event.payload.encode_body(&mut self.body);
            statement.raw_bind_parameter(index, event.id.device.as_str())?;
            statement.raw_bind_parameter(index + 1, to_i64(event.id.seq.0))?;
            statement.raw_bind_parameter(index + 2, to_i64(event.hlc.wall_ms))?;
            statement.raw_bind_parameter(index + 3, i64::from(event.hlc.logical))?;
            statement.raw_bind_parameter(index + 4, to_i64(event.event_time.0))?;
            statement.raw_bind_parameter(index + 5, i64::from(event.kind().tag()))?;
            statement.raw_bind_parameter(index + 6, i64::from(event.schema_version()))?;
            statement.raw_bind_parameter(index + 7, self.body.as_slice())?;
            index += INSERT_PARAMS_PER_ROW;
        }
        Ok(statement.raw_execute()?)
    }

    fn query_events(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<StoredEvent>, StoreError> {
        let mut statement = self.db.prepare_cached(sql)?;
        let rows = statement.query_map(params, event_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(EventRow::into_stored).collect()
    }
}

fn limit_of(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
}

impl EventReader for SqliteStore {
    fn head(&mut self) -> Result<Position, StoreError> {
        let head: i64 =
            self.db.prepare_cached("SELECT COALESCE(MAX(position), 0) FROM events")?.query_row([], |row| row.get(0))?;
        Ok(Position(to_u64(head)))
    }

    fn read_from(&mut self, after: Position, max_events: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE position > ?1 ORDER BY position LIMIT ?2");
        self.query_events(&sql, params![to_i64(after.0), limit_of(max_events)])
    }

    fn read_seqs(
        &mut self,
        device: &DeviceId,
        from: Seq,
        to: Seq,
        max_events: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE device = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4"
        );
        self.query_events(&sql, params![device.as_str(), to_i64(from.0), to_i64(to.0), limit_of(max_events)])
    }

    fn read_times(
        &mut self,
        device: &DeviceId,
        from: Millis,
        to: Millis,
        cursor: Option<TimeCursor>,
        max_events: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        // Without a cursor, start before the first possible (time, seq).
        let (after_time, after_seq) =
            cursor.map_or((to_i64(from.0), -1), |(time, seq)| (to_i64(time.0), to_i64(seq.0)));
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE device = ?1 AND event_time_ms >= ?2 AND event_time_ms < ?3
             AND (event_time_ms, seq) > (?4, ?5) ORDER BY event_time_ms, seq LIMIT ?6"
        );
        self.query_events(
            &sql,
            params![device.as_str(), to_i64(from.0), to_i64(to.0), after_time, after_seq, limit_of(max_events)],
        )
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
        self.begin()?;
        let mut n_inserted = 0;
        let mut rest = events;
        while !rest.is_empty() {
            // The largest cached statement that fits: one statement inserts many rows, so the
            // per-statement cost (step, reset, VDBE setup) is paid once per chunk, not per row.
            let n_rows = INSERT_CHUNK_ROWS.iter().copied().find(|n_rows| *n_rows <= rest.len()).unwrap_or(1);
            let (chunk, tail) = rest.split_at(n_rows);
            n_inserted += self.insert_chunk(chunk, meta)?;
            rest = tail;
        }
        // `position` is the rowid and the insert leaves it NULL, so SQLite assigns max + 1 to each
        // inserted row: positions stay dense (a skipped duplicate takes none) and in batch order.
        self.next_position += n_inserted as u64;
        debug_assert!(n_inserted == 0 || to_u64(self.db.last_insert_rowid()) == self.next_position - 1);
        Ok((n_inserted, Position(self.next_position - 1)))
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
