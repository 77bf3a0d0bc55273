//! The PostgreSQL backend, over the synchronous `postgres` client: call it only from blocking
//! threads (the ingest core loop, the projection runner, `spawn_blocking` in the HTTP API).
//!
//! Tables live in a schema of their own (one per test, so tests run side by side). Writes of the
//! ingest path (events proven new, stream rows, chain heads) are held back and go out at the next
//! statement or the commit, one `UNNEST` of column arrays per table, so a group commit costs a few
//! round trips whatever its size and however many batches it carries. Writers serialize on an advisory transaction lock keyed by the schema,
//! which keeps positions in commit order (see the module documentation of `store`).

use std::collections::{BTreeMap, HashMap};

use postgres::{Client, NoTls, Statement};
use tidesync_core::auth::ChainHash;
use tidesync_core::event::{DeviceId, Event, EventId, GatewayId, Millis, Seq};

use super::sqlite::{holes_json, shadow_row, stream_info};
use super::{
    device_of, encode_event, json_of, to_i64, to_u64, DeadLetter, EventReader, EventRow, EventWriter, IngestMeta,
    Position, ShadowRow, StoreError, StoredEvent, StreamInfo, TimeCursor,
};

// Device names are ASCII and compared as bytes (`COLLATE "C"`): the same order as SQLite's, and
// index comparisons skip the locale's `strcoll`.
const SCHEMA_SQL: &str = r#"
CREATE TABLE IF NOT EXISTS events (
    position       BIGINT PRIMARY KEY,
    device         TEXT   COLLATE "C" NOT NULL,
    seq            BIGINT NOT NULL,
    hlc_wall_ms    BIGINT NOT NULL,
    hlc_logical    BIGINT NOT NULL,
    event_time_ms  BIGINT NOT NULL,
    kind           BIGINT NOT NULL,
    schema_version BIGINT NOT NULL,
    body           BYTEA  NOT NULL,
    gateway        TEXT   NOT NULL,
    ingest_ms      BIGINT NOT NULL,
    UNIQUE (device, seq)
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (device, event_time_ms, seq);
CREATE TABLE IF NOT EXISTS streams (
    device TEXT COLLATE "C" PRIMARY KEY,
    high   BIGINT NOT NULL,
    holes  TEXT   NOT NULL
);
CREATE TABLE IF NOT EXISTS shadows (
    device     TEXT COLLATE "C" PRIMARY KEY,
    doc        BYTEA  NOT NULL,
    view       TEXT   NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS projection_rows (
    projection TEXT NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (projection, key)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    projection TEXT PRIMARY KEY,
    position   BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id         BIGSERIAL PRIMARY KEY,
    projection TEXT   NOT NULL,
    position   BIGINT NOT NULL,
    device     TEXT   NOT NULL,
    seq        BIGINT NOT NULL,
    reason     TEXT   NOT NULL
);
CREATE TABLE IF NOT EXISTS chain_heads (
    device TEXT PRIMARY KEY,
    high   BIGINT NOT NULL,
    chain  BYTEA  NOT NULL
);
CREATE TABLE IF NOT EXISTS security_events (
    id       BIGSERIAL PRIMARY KEY,
    first_ms BIGINT NOT NULL,
    last_ms  BIGINT NOT NULL,
    gateway  TEXT   NOT NULL,
    device   TEXT   NOT NULL,
    kind     TEXT   NOT NULL,
    detail   TEXT   NOT NULL,
    from_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    count    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS security_events_by_batch ON security_events (device, gateway, from_seq, last_seq);
"#;

const EVENT_COLUMNS: &str =
    "position, device, seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body, gateway, ingest_ms";

/// Inserts rows given as column arrays ([`EventColumns`]: gateway and ingest time per row, as a
/// group commit mixes batches of several gateways), one statement whatever their number.
const INSERT_ROWS: &str = "INSERT INTO events
    (position, device, seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body, gateway, ingest_ms)
    SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[],
                         $7::BIGINT[], $8::BIGINT[], $9::BYTEA[], $10::TEXT[], $11::BIGINT[])";

/// [`INSERT_ROWS`], skipping rows whose id is stored already.
const INSERT_ROWS_SKIPPING_DUPLICATES: &str = "INSERT INTO events
    (position, device, seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body, gateway, ingest_ms)
    SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[],
                         $7::BIGINT[], $8::BIGINT[], $9::BYTEA[], $10::TEXT[], $11::BIGINT[])
    ON CONFLICT (device, seq) DO NOTHING";

const UPSERT_STREAMS: &str = "INSERT INTO streams (device, high, holes)
    SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::TEXT[])
    ON CONFLICT (device) DO UPDATE SET high = excluded.high, holes = excluded.holes";

const UPSERT_CHAIN_HEADS: &str = "INSERT INTO chain_heads (device, high, chain)
    SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BYTEA[])
    ON CONFLICT (device) DO UPDATE SET high = excluded.high, chain = excluded.chain";

/// Writes of the open transaction not sent yet. A group commit carries one batch per device and
/// gateway delivery; sent one by one, the event insert, stream row and chain head of a batch cost
/// three round trips (about 330 µs here), more than a hundred events' rows. Held back, they go out
/// as one statement per table. Only writes whose outcome is known without the server are held:
/// events proven new (their count is the batch's) and upserts of a device's latest state (the
/// last one wins, so a device appears once per statement, as `ON CONFLICT DO UPDATE` requires).
#[derive(Default)]
struct Pending {
    events: EventColumns,
    streams: BTreeMap<DeviceId, (i64, String)>,
    chain_heads: BTreeMap<DeviceId, (i64, Vec<u8>)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.events.positions.is_empty() && self.streams.is_empty() && self.chain_heads.is_empty()
    }
}

/// Event rows as the column arrays that [`INSERT_ROWS`] takes.
#[derive(Default)]
struct EventColumns {
    positions: Vec<i64>,
    devices: Vec<DeviceId>,
    seqs: Vec<i64>,
    hlc_walls: Vec<i64>,
    hlc_logicals: Vec<i64>,
    event_times: Vec<i64>,
    kinds: Vec<i64>,
    versions: Vec<i64>,
    bodies: Vec<Vec<u8>>,
    gateways: Vec<GatewayId>,
    ingest_ms: Vec<i64>,
}

impl EventColumns {
    fn push(&mut self, position: u64, event: &Event, meta: &IngestMeta) {
        let (body, kind, schema_version) = encode_event(event);
        self.positions.push(to_i64(position));
        self.devices.push(event.id.device);
        self.seqs.push(to_i64(event.id.seq.0));
        self.hlc_walls.push(to_i64(event.hlc.wall_ms));
        self.hlc_logicals.push(i64::from(event.hlc.logical));
        self.event_times.push(to_i64(event.event_time.0));
        self.kinds.push(kind);
        self.versions.push(schema_version);
        self.bodies.push(body);
        self.gateways.push(meta.gateway);
        self.ingest_ms.push(to_i64(meta.ingest_time.0));
    }
}

/// A connection to a PostgreSQL cloud store.
pub struct PostgresStore {
    client: Client,
    schema: String,
    in_transaction: bool,
    next_position: u64,
    /// Statements of the write path, prepared once per connection: a cached statement costs one
    /// round trip per use instead of two (parse and describe, then bind and execute).
    prepared: HashMap<&'static str, Statement>,
    /// Whether the open transaction holds the event writer lock (`begin`), not only the
    /// projection lock (`begin_projections`).
    holds_event_lock: bool,
    /// Writes of the open transaction held back (see [`Pending`]); sent by [`PostgresStore::flush`]
    /// before any other statement and at the commit.
    pending: Pending,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("schema", &self.schema).finish_non_exhaustive()
    }
}

fn event_row(row: &postgres::Row) -> Result<EventRow, StoreError> {
    Ok(EventRow {
        position: row.try_get(0)?,
        device: row.try_get(1)?,
        seq: row.try_get(2)?,
        hlc_wall_ms: row.try_get(3)?,
        hlc_logical: row.try_get(4)?,
        event_time_ms: row.try_get(5)?,
        kind: row.try_get(6)?,
        schema_version: row.try_get(7)?,
        body: row.try_get(8)?,
        gateway: row.try_get(9)?,
        ingest_ms: row.try_get(10)?,
    })
}

fn limit_of(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
}

/// Whether `schema` is a plain lowercase identifier (it is spliced into SQL).
fn valid_schema(schema: &str) -> bool {
    !schema.is_empty()
        && schema.len() <= 63
        && schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit())
}

impl PostgresStore {
    /// Connects to `url` and creates the schema and tables when missing.
    pub fn open(url: &str, schema: &str) -> Result<Self, StoreError> {
        let mut store = Self::connect(url, schema)?;
        // Serialize schema creation: concurrent `CREATE ... IF NOT EXISTS` can still collide.
        store.client.batch_execute("SELECT pg_advisory_lock(hashtext('tidesync-cloud-ddl'))")?;
        let created = store.client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}; {SCHEMA_SQL}"));
        store.client.batch_execute("SELECT pg_advisory_unlock(hashtext('tidesync-cloud-ddl'))")?;
        created?;
        Ok(store)
    }

    /// Connects to an existing store for reading.
    pub fn open_reader(url: &str, schema: &str) -> Result<Self, StoreError> {
        Self::connect(url, schema)
    }

    fn connect(url: &str, schema: &str) -> Result<Self, StoreError> {
        if !valid_schema(schema) {
            return Err(StoreError::Corrupt {
                what: "schema name",
                detail: format!("{schema:?} is not [a-z_][a-z0-9_]*"),
            });
        }
        let mut client = Client::connect(url, NoTls)?;
        client.batch_execute(&format!("SET search_path TO {schema}"))?;
        Ok(Self {
            client,
            schema: schema.to_string(),
            in_transaction: false,
            next_position: 1,
            prepared: HashMap::new(),
            holds_event_lock: false,
            pending: Pending::default(),
        })
    }

    /// Inserts `events` with one [`INSERT_ROWS_SKIPPING_DUPLICATES`] statement at the next
    /// positions.
    fn insert_skipping_duplicates(
        &mut self,
        events: &[Event],
        meta: &IngestMeta,
    ) -> Result<(usize, Position), StoreError> {
        self.begin()?;
        if !self.holds_event_lock {
            // Positions are only ours to assign under the event writer lock.
            return Err(StoreError::NotEventTransaction);
        }
        if events.is_empty() {
            return Ok((0, Position(self.next_position - 1)));
        }
        // The held-back rows go first, so that the conflict check sees them.
        self.flush()?;
        let n = events.len();
        let mut columns = EventColumns::default();
        for (index, event) in events.iter().enumerate() {
            columns.push(self.next_position + index as u64, event, meta);
        }
        // One statement and one round trip per batch, whatever its size.
        let inserted = self.insert_rows(INSERT_ROWS_SKIPPING_DUPLICATES, &columns)?;
        // A conflicting row leaves its position unused: positions stay increasing, not dense.
        self.next_position += n as u64;
        Ok((usize::try_from(inserted).unwrap_or(usize::MAX), Position(self.next_position - 1)))
    }

    /// The prepared statement for `sql` (preparing it on first use).
    fn prepared(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.prepared.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Runs `sql` ([`INSERT_ROWS`] or [`INSERT_ROWS_SKIPPING_DUPLICATES`]) on `columns`; returns
    /// the rows inserted.
    fn insert_rows(&mut self, sql: &'static str, columns: &EventColumns) -> Result<u64, StoreError> {
        let devices: Vec<&str> = columns.devices.iter().map(DeviceId::as_str).collect();
        let gateways: Vec<&str> = columns.gateways.iter().map(GatewayId::as_str).collect();
        let statement = self.prepared(sql)?;
        Ok(self.client.execute(
            &statement,
            &[
                &columns.positions,
                &devices,
                &columns.seqs,
                &columns.hlc_walls,
                &columns.hlc_logicals,
                &columns.event_times,
                &columns.kinds,
                &columns.versions,
                &columns.bodies,
                &gateways,
                &columns.ingest_ms,
            ],
        )?)
    }

    /// Sends the held-back writes, one statement per table. They are taken first: if a statement
    /// fails, the transaction is lost on the server anyway, and nothing is sent twice.
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        if !pending.events.positions.is_empty() {
            self.insert_rows(INSERT_ROWS, &pending.events)?;
        }
        if !pending.streams.is_empty() {
            let devices: Vec<&str> = pending.streams.keys().map(DeviceId::as_str).collect();
            let (highs, holes): (Vec<i64>, Vec<&str>) =
                pending.streams.values().map(|(high, holes)| (*high, holes.as_str())).unzip();
            let statement = self.prepared(UPSERT_STREAMS)?;
            self.client.execute(&statement, &[&devices, &highs, &holes])?;
        }
        if !pending.chain_heads.is_empty() {
            let devices: Vec<&str> = pending.chain_heads.keys().map(DeviceId::as_str).collect();
            let (highs, chains): (Vec<i64>, Vec<&[u8]>) =
                pending.chain_heads.values().map(|(high, chain)| (*high, chain.as_slice())).unzip();
            let statement = self.prepared(UPSERT_CHAIN_HEADS)?;
            self.client.execute(&statement, &[&devices, &highs, &chains])?;
        }
        Ok(())
    }

    fn query_events(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = self.client.query(sql, params)?;
        rows.iter().map(|row| event_row(row)?.into_stored()).collect()
    }
}

impl EventReader for PostgresStore {
    fn head(&mut self) -> Result<Position, StoreError> {
        self.flush()?;
        let statement = self.prepared("SELECT COALESCE(MAX(position), 0)::BIGINT FROM events")?;
        let row = self.client.query_one(&statement, &[])?;
        Ok(Position(to_u64(row.try_get(0)?)))
    }

    fn read_from(&mut self, after: Position, max_events: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.flush()?;
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2");
        self.query_events(&sql, &[&to_i64(after.0), &limit_of(max_events)])
    }

    fn read_seqs(
        &mut self,
        device: &DeviceId,
        from: Seq,
        to: Seq,
        max_events: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.flush()?;
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE device = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq LIMIT $4"
        );
        self.query_events(&sql, &[&device.as_str(), &to_i64(from.0), &to_i64(to.0), &limit_of(max_events)])
    }

    fn read_times(
        &mut self,
        device: &DeviceId,
        from: Millis,
        to: Millis,
        cursor: Option<TimeCursor>,
        max_events: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.flush()?;
        let (after_time, after_seq) =
            cursor.map_or((to_i64(from.0), -1), |(time, seq)| (to_i64(time.0), to_i64(seq.0)));
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE device = $1 AND event_time_ms >= $2 AND event_time_ms < $3
             AND (event_time_ms, seq) > ($4, $5) ORDER BY event_time_ms, seq LIMIT $6"
        );
        self.query_events(
            &sql,
            &[&device.as_str(), &to_i64(from.0), &to_i64(to.0), &after_time, &after_seq, &limit_of(max_events)],
        )
    }

    fn streams(&mut self) -> Result<BTreeMap<DeviceId, StreamInfo>, StoreError> {
        self.flush()?;
        let rows = self.client.query("SELECT device, high, holes FROM streams", &[])?;
        rows.iter()
            .map(|row| stream_info(row.try_get::<_, &str>(0)?, row.try_get(1)?, row.try_get::<_, &str>(2)?))
            .collect()
    }

    fn shadow(&mut self, device: &DeviceId) -> Result<Option<ShadowRow>, StoreError> {
        self.flush()?;
        let row = self
            .client
            .query_opt("SELECT device, doc, view, updated_ms FROM shadows WHERE device = $1", &[&device.as_str()])?;
        row.map(|row| shadow_row(row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?)).transpose()
    }

    fn shadows(&mut self) -> Result<Vec<ShadowRow>, StoreError> {
        self.flush()?;
        let rows = self.client.query("SELECT device, doc, view, updated_ms FROM shadows ORDER BY device", &[])?;
        rows.iter().map(|row| shadow_row(row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?)).collect()
    }

    fn checkpoint(&mut self, projection: &str) -> Result<Position, StoreError> {
        self.flush()?;
        let row = self.client.query_opt("SELECT position FROM checkpoints WHERE projection = $1", &[&projection])?;
        Ok(Position(match row {
            Some(row) => to_u64(row.try_get(0)?),
            None => 0,
        }))
    }

    fn rows(
        &mut self,
        projection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        self.flush()?;
        let upper = format!("{prefix}\u{10FFFF}");
        let rows = self.client.query(
            "SELECT key, value FROM projection_rows WHERE projection = $1 AND key >= $2 AND key < $3
             ORDER BY key LIMIT $4",
            &[&projection, &prefix, &upper, &limit_of(limit)],
        )?;
        rows.iter()
            .map(|row| Ok((row.try_get::<_, String>(0)?, json_of("projection row", row.try_get::<_, &str>(1)?)?)))
            .collect()
    }

    fn row(&mut self, projection: &str, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        self.flush()?;
        let row = self
            .client
            .query_opt("SELECT value FROM projection_rows WHERE projection = $1 AND key = $2", &[&projection, &key])?;
        row.map(|row| json_of("projection row", row.try_get::<_, &str>(0)?)).transpose()
    }

    fn dead_letters(&mut self, projection: Option<&str>, limit: usize) -> Result<(Vec<DeadLetter>, u64), StoreError> {
        self.flush()?;
        let count: i64 = self
            .client
            .query_one("SELECT COUNT(*) FROM dead_letters WHERE $1::TEXT IS NULL OR projection = $1", &[&projection])?
            .try_get(0)?;
        let rows = self.client.query(
            "SELECT projection, position, device, seq, reason FROM dead_letters
             WHERE $1::TEXT IS NULL OR projection = $1 ORDER BY id DESC LIMIT $2",
            &[&projection, &limit_of(limit)],
        )?;
        let letters = rows
            .iter()
            .map(|row| {
                Ok(DeadLetter {
                    projection: row.try_get(0)?,
                    position: Position(to_u64(row.try_get(1)?)),
                    id: EventId { device: device_of(row.try_get(2)?)?, seq: Seq(to_u64(row.try_get(3)?)) },
                    reason: row.try_get(4)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((letters, to_u64(count)))
    }

    fn chain_heads(&mut self) -> Result<BTreeMap<DeviceId, (Seq, ChainHash)>, StoreError> {
        self.flush()?;
        let rows = self.client.query("SELECT device, high, chain FROM chain_heads", &[])?;
        rows.iter()
            .map(|row| {
                super::sqlite::chain_head(row.try_get::<_, &str>(0)?, row.try_get(1)?, row.try_get::<_, &[u8]>(2)?)
            })
            .collect()
    }

    fn security_events(
        &mut self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<super::SecurityEvent>, u64), StoreError> {
        self.flush()?;
        let count: i64 = self.client.query_one("SELECT COUNT(*) FROM security_events", &[])?.try_get(0)?;
        let before = before.map_or(i64::MAX, to_i64);
        let rows = self.client.query(
            "SELECT id, first_ms, last_ms, gateway, device, kind, detail, from_seq, last_seq, count
             FROM security_events WHERE id < $1 ORDER BY id DESC LIMIT $2",
            &[&before, &limit_of(limit)],
        )?;
        let events = rows
            .iter()
            .map(|row| {
                super::sqlite::SecurityRow {
                    id: row.try_get(0)?,
                    first_ms: row.try_get(1)?,
                    last_ms: row.try_get(2)?,
                    gateway: row.try_get(3)?,
                    device: row.try_get(4)?,
                    kind: row.try_get(5)?,
                    detail: row.try_get(6)?,
                    from_seq: row.try_get(7)?,
                    last_seq: row.try_get(8)?,
                    count: row.try_get(9)?,
                }
                .into_event()
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((events, to_u64(count)))
    }
}

impl EventWriter for PostgresStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        if !self.in_transaction {
            // One round trip: the schema name is a checked identifier (see `valid_schema`).
            let begun =
                self.client.batch_execute(&format!("BEGIN; SELECT pg_advisory_xact_lock(hashtext('{}'))", self.schema));
            self.in_transaction = true;
            self.holds_event_lock = true;
            let locked = begun.map_err(StoreError::from).and_then(|()| self.head());
            match locked {
                Ok(head) => self.next_position = head.0 + 1,
                Err(error) => {
                    self.rollback();
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    fn begin_projections(&mut self) -> Result<(), StoreError> {
        if !self.in_transaction {
            let begun = self.client.batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(hashtext('{}:projections'))",
                self.schema
            ));
            self.in_transaction = true;
            self.holds_event_lock = false;
            if let Err(error) = begun {
                self.rollback();
                return Err(error.into());
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        if self.in_transaction {
            if let Err(error) = self.flush() {
                self.rollback();
                return Err(error);
            }
            self.in_transaction = false;
            self.client.batch_execute("COMMIT")?;
        }
        Ok(())
    }

    fn rollback(&mut self) {
        self.pending = Pending::default();
        if self.in_transaction {
            self.in_transaction = false;
            if let Err(error) = self.client.batch_execute("ROLLBACK") {
                tracing::error!(%error, "rollback failed");
            }
        }
    }

    fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    fn insert_events(&mut self, events: &[Event], meta: &IngestMeta) -> Result<(usize, Position), StoreError> {
        self.insert_skipping_duplicates(events, meta)
    }

    fn insert_new_events(&mut self, events: &[Event], meta: &IngestMeta) -> Result<(usize, Position), StoreError> {
        // Held back until the next statement or the commit (see `Pending`). No `ON CONFLICT`: a
        // speculative insertion costs about a third more per row here, and the unique index still
        // refuses a stored id (the statement, and so the commit, then fails as a whole).
        self.begin()?;
        if !self.holds_event_lock {
            return Err(StoreError::NotEventTransaction);
        }
        for event in events {
            self.pending.events.push(self.next_position, event, meta);
            self.next_position += 1;
        }
        Ok((events.len(), Position(self.next_position - 1)))
    }

    fn write_stream(&mut self, device: &DeviceId, high: Seq, holes: &[(Seq, Seq)]) -> Result<(), StoreError> {
        self.begin()?;
        self.pending.streams.insert(*device, (to_i64(high.0), holes_json(holes)));
        Ok(())
    }

    fn write_shadow(&mut self, row: &ShadowRow) -> Result<(), StoreError> {
        self.flush()?;
        self.begin()?;
        self.client.execute(
            "INSERT INTO shadows (device, doc, view, updated_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (device) DO UPDATE SET doc = excluded.doc, view = excluded.view, updated_ms = excluded.updated_ms",
            &[&row.device.as_str(), &row.doc, &row.view.to_string(), &to_i64(row.updated.0)],
        )?;
        Ok(())
    }

    fn put_rows(&mut self, projection: &str, rows: &[(String, Option<serde_json::Value>)]) -> Result<(), StoreError> {
        self.flush()?;
        self.begin()?;
        let mut put_keys = Vec::new();
        let mut put_values = Vec::new();
        let mut deleted = Vec::new();
        for (key, value) in rows {
            match value {
                Some(value) => {
                    put_keys.push(key.as_str());
                    put_values.push(value.to_string());
                }
                None => deleted.push(key.as_str()),
            }
        }
        if !put_keys.is_empty() {
            self.client.execute(
                "INSERT INTO projection_rows (projection, key, value)
                 SELECT $1, * FROM UNNEST($2::TEXT[], $3::TEXT[])
                 ON CONFLICT (projection, key) DO UPDATE SET value = excluded.value",
                &[&projection, &put_keys, &put_values],
            )?;
        }
        if !deleted.is_empty() {
            self.client.execute(
                "DELETE FROM projection_rows WHERE projection = $1 AND key = ANY($2::TEXT[])",
                &[&projection, &deleted],
            )?;
        }
        Ok(())
    }

    fn clear_projection(&mut self, projection: &str) -> Result<(), StoreError> {
        self.flush()?;
        self.begin()?;
        self.client.execute("DELETE FROM projection_rows WHERE projection = $1", &[&projection])?;
        self.client.execute("DELETE FROM checkpoints WHERE projection = $1", &[&projection])?;
        self.client.execute("DELETE FROM dead_letters WHERE projection = $1", &[&projection])?;
        Ok(())
    }

    fn set_checkpoint(&mut self, projection: &str, position: Position) -> Result<(), StoreError> {
        self.flush()?;
        self.begin()?;
        self.client.execute(
            "INSERT INTO checkpoints (projection, position) VALUES ($1, $2)
             ON CONFLICT (projection) DO UPDATE SET position = excluded.position",
            &[&projection, &to_i64(position.0)],
        )?;
        Ok(())
    }

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), StoreError> {
        self.flush()?;
        self.begin()?;
        self.client.execute(
            "INSERT INTO dead_letters (projection, position, device, seq, reason) VALUES ($1, $2, $3, $4, $5)",
            &[
                &letter.projection,
                &to_i64(letter.position.0),
                &letter.id.device.as_str(),
                &to_i64(letter.id.seq.0),
                &letter.reason,
            ],
        )?;
        Ok(())
    }
    fn write_chain_head(&mut self, device: &DeviceId, high: Seq, chain: &ChainHash) -> Result<(), StoreError> {
        self.begin()?;
        self.pending.chain_heads.insert(*device, (to_i64(high.0), chain.0.to_vec()));
        Ok(())
    }

    fn record_security_event(&mut self, event: &super::SecurityEvent) -> Result<(), StoreError> {
        self.flush()?;
        self.begin()?;
        let repeated = self.client.execute(
            "UPDATE security_events SET count = count + $1, last_ms = GREATEST(last_ms, $2)
             WHERE device = $3 AND gateway = $4 AND from_seq = $5 AND last_seq = $6 AND kind = $7 AND detail = $8",
            &[
                &to_i64(event.count),
                &to_i64(event.last_ms.0),
                &event.device.as_str(),
                &event.gateway.as_str(),
                &to_i64(event.from_seq.0),
                &to_i64(event.last_seq.0),
                &event.kind,
                &event.detail,
            ],
        )?;
        if repeated == 0 {
            self.client.execute(
                "INSERT INTO security_events (first_ms, last_ms, gateway, device, kind, detail, from_seq, last_seq, count)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &to_i64(event.first_ms.0),
                    &to_i64(event.last_ms.0),
                    &event.gateway.as_str(),
                    &event.device.as_str(),
                    &event.kind,
                    &event.detail,
                    &to_i64(event.from_seq.0),
                    &to_i64(event.last_seq.0),
                    &to_i64(event.count),
                ],
            )?;
        }
        Ok(())
    }
}
