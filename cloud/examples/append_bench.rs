//! Durable append throughput of the cloud store with dedupe, beside a raw baseline in the same
//! run, and projection catch-up rate.
//!
//! ```text
//! cargo run --release -p tidesync-cloud --example append_bench -- [N_EVENTS] [--rounds R]
//!     [--commit-events C] [--batch-events B] [--only sqlite|postgres]
//! ```
//!
//! PostgreSQL runs too when `TIDESYNC_TEST_POSTGRES_URL` is set.
//!
//! Workload: 10 devices, batches of `B` readings each (default 1,000) as gateways deliver them; `C`
//! events per commit (default 1,000: one batch per transaction; a multiple of `B`). Devices that
//! send as they read deliver batches of a few events: `--batch-events 10` is that case. The store path is `CloudStore::append_from`
//! then `commit` (what `tidesync-cloud run` does per group commit): dedupe by event id, stream
//! bookkeeping, writer lock, global positions.
//!
//! Two baselines, with the same connection settings and durability and the same rows per
//! transaction, without dedupe, stream bookkeeping and the writer lock:
//! - on SQLite, plain multi-row INSERTs of the same events (chunks of 256, 64, 16, 4, 1 rows) into
//!   (a) the per-event table with the two lookup indexes a per-event design needs (the store's
//!   layout before segments: `sqlite::PER_EVENT_EVENTS_SQL`) and (b) the same table without
//!   secondary indexes (the issue's "raw SQLite, 1,000-row transactions" setting). The store keeps events
//!   as segments (one row per batch run), so (a) is the like-for-like design it replaces and (b)
//!   the ceiling of inserting rows at all;
//! - on PostgreSQL, one `UNNEST` INSERT per batch into the store's own table and indexes.
//!
//! The runs alternate, each on fresh files or schemas, for `R` rounds (default 5); the medians are
//! printed last.

use std::time::Instant;

use tidesync_cloud::projection::{builtin, Runner};
use tidesync_cloud::store::{postgres::PostgresStore, sqlite, Backend, CloudStore, IngestMeta};
use tidesync_core::event::{DeviceId, Event, EventId, GatewayId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::wire::EventBatch;

const DEFAULT_BATCH_EVENTS: u64 = 1_000;

/// Rows per multi-row `INSERT` of the SQLite baselines, largest first (what the per-event store
/// used): a batch is cut into chunks of these sizes.
const INSERT_CHUNK_ROWS: [usize; 5] = [256, 64, 16, 4, 1];
const DEVICES: u64 = 10;

struct Options {
    n_events: u64,
    rounds: usize,
    commit_events: u64,
    batch_events: u64,
    only: Option<String>,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        n_events: 200_000,
        rounds: 5,
        commit_events: DEFAULT_BATCH_EVENTS,
        batch_events: DEFAULT_BATCH_EVENTS,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--rounds" => options.rounds = value()?.parse()?,
            "--commit-events" => options.commit_events = value()?.parse()?,
            "--batch-events" => options.batch_events = value()?.parse()?,
            "--only" => options.only = Some(value()?),
            number => options.n_events = number.parse()?,
        }
    }
    anyhow::ensure!(options.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        options.batch_events > 0
            && options.commit_events >= options.batch_events
            && options.commit_events % options.batch_events == 0,
        "--commit-events must be a multiple of --batch-events ({})",
        options.batch_events
    );
    Ok(options)
}

/// The batches, grouped per commit.
fn workload(options: &Options) -> anyhow::Result<Vec<Vec<EventBatch>>> {
    let per_device = options.n_events / DEVICES;
    let mut batches = Vec::new();
    let batch_events = options.batch_events;
    for first in (1..=per_device).step_by(batch_events as usize) {
        for device_index in 0..DEVICES {
            let device = DeviceId::new(&format!("dev-{device_index}"))?;
            let last = (first + batch_events - 1).min(per_device);
            let events = (first..=last)
                .map(|seq| Event {
                    id: EventId { device, seq: Seq(seq) },
                    hlc: Hlc { wall_ms: 1_700_000_000_000 + seq, logical: 0 },
                    event_time: Millis(1_700_000_000_000 + seq * 1_000),
                    payload: Payload::Reading(SensorReading {
                        sensor: "temp".into(),
                        value: (seq % 100) as f64 / 4.0,
                        unit: "Cel".into(),
                    }),
                })
                .collect();
            batches.push(EventBatch::new(device, Seq(first), events)?);
        }
    }
    let per_commit = (options.commit_events / batch_events) as usize;
    Ok(batches.chunks(per_commit).map(<[EventBatch]>::to_vec).collect())
}

fn n_events_of(groups: &[Vec<EventBatch>]) -> u64 {
    groups.iter().flatten().map(|batch| batch.events.len() as u64).sum()
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    let index = ((sorted.len() as f64 * fraction) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or(0.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(&values, 0.5)
}

/// One store run: events offered per second, new events, p99 commit latency (ms).
struct StoreRun {
    rate: f64,
    n_new: u64,
    p99_ms: f64,
}

/// Appends every group and commits it, as the ingest loop does.
fn store_run(backend: &Backend, groups: &[Vec<EventBatch>]) -> anyhow::Result<StoreRun> {
    let mut store = CloudStore::open(backend.open_writer()?, ShadowLimits::default())?;
    let meta = IngestMeta { gateway: GatewayId::new("gw")?, ingest_time: Millis(1) };
    let mut latencies_ms = Vec::with_capacity(groups.len());
    let mut n_new = 0u64;
    let started = Instant::now();
    for group in groups {
        let commit_started = Instant::now();
        for batch in group {
            n_new += store.append_from(batch, &meta)?.n_new as u64;
        }
        store.commit()?;
        latencies_ms.push(commit_started.elapsed().as_secs_f64() * 1_000.0);
    }
    let rate = n_events_of(groups) as f64 / started.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    Ok(StoreRun { rate, n_new, p99_ms: percentile(&latencies_ms, 0.99) })
}

/// The store's multi-row insert, minus `ON CONFLICT`: the same columns, chunk sizes and binds.
fn raw_insert_sql(n_rows: usize) -> String {
    let row = "(?,?,?,?,?,?,?,?,?,?)";
    let rows = vec![row; n_rows].join(",");
    format!(
        "INSERT INTO events (device, seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body, \
         gateway, ingest_ms) VALUES {rows}"
    )
}

/// Which table the SQLite baseline fills.
#[derive(Clone, Copy)]
enum RawTable {
    /// [`sqlite::PER_EVENT_EVENTS_SQL`]: the per-event table with its two lookup indexes.
    Indexed,
    /// The same table without secondary indexes.
    Plain,
}

fn raw_sqlite(path: &std::path::Path, table: RawTable, groups: &[Vec<EventBatch>]) -> anyhow::Result<f64> {
    let db = rusqlite::Connection::open(path)?;
    for (name, value) in sqlite::WRITER_PRAGMAS {
        db.pragma_update(None, name, value)?;
    }
    match table {
        RawTable::Indexed => db.execute_batch(sqlite::PER_EVENT_EVENTS_SQL)?,
        RawTable::Plain => {
            let table_only = sqlite::PER_EVENT_EVENTS_SQL
                .split("CREATE UNIQUE INDEX")
                .next()
                .unwrap_or(sqlite::PER_EVENT_EVENTS_SQL);
            db.execute_batch(table_only)?
        }
    }
    db.set_prepared_statement_cache_capacity(64);
    let mut body = Vec::new();
    let started = Instant::now();
    for group in groups {
        db.execute_batch("BEGIN")?;
        for batch in group {
            let mut rest: &[Event] = &batch.events;
            while !rest.is_empty() {
                let n_rows = INSERT_CHUNK_ROWS.iter().copied().find(|n| *n <= rest.len()).unwrap_or(1);
                let (chunk, tail) = rest.split_at(n_rows);
                let mut insert = db.prepare_cached(&raw_insert_sql(n_rows))?;
                let mut index = 1;
                for event in chunk {
                    body.clear();
                    event.payload.encode_body(&mut body);
                    insert.raw_bind_parameter(index, event.id.device.as_str())?;
                    insert.raw_bind_parameter(index + 1, event.id.seq.0 as i64)?;
                    insert.raw_bind_parameter(index + 2, event.hlc.wall_ms as i64)?;
                    insert.raw_bind_parameter(index + 3, i64::from(event.hlc.logical))?;
                    insert.raw_bind_parameter(index + 4, event.event_time.0 as i64)?;
                    insert.raw_bind_parameter(index + 5, i64::from(event.kind().tag()))?;
                    insert.raw_bind_parameter(index + 6, i64::from(event.schema_version()))?;
                    insert.raw_bind_parameter(index + 7, body.as_slice())?;
                    insert.raw_bind_parameter(index + 8, "gw")?;
                    insert.raw_bind_parameter(index + 9, 1i64)?;
                    index += 10;
                }
                insert.raw_execute()?;
                rest = tail;
            }
        }
        db.execute_batch("COMMIT")?;
    }
    Ok(n_events_of(groups) as f64 / started.elapsed().as_secs_f64())
}

fn raw_postgres(url: &str, schema: &str, groups: &[Vec<EventBatch>]) -> anyhow::Result<f64> {
    drop(PostgresStore::open(url, schema)?);
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    client.batch_execute(&format!("SET search_path TO {schema}"))?;
    let insert = client.prepare(
        "INSERT INTO events
         (position, device, seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body, gateway, ingest_ms)
         SELECT *, $10::TEXT, $11::BIGINT FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[],
                                        $6::BIGINT[], $7::BIGINT[], $8::BIGINT[], $9::BYTEA[])",
    )?;
    let mut position = 0i64;
    let started = Instant::now();
    for group in groups {
        let mut transaction = client.transaction()?;
        for batch in group {
            let n = batch.events.len();
            let (mut positions, mut devices, mut seqs) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
            let (mut walls, mut logicals, mut times) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
            let (mut kinds, mut versions, mut bodies) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
            for event in &batch.events {
                let mut body = Vec::new();
                event.payload.encode_body(&mut body);
                position += 1;
                positions.push(position);
                devices.push(event.id.device.as_str());
                seqs.push(event.id.seq.0 as i64);
                walls.push(event.hlc.wall_ms as i64);
                logicals.push(i64::from(event.hlc.logical));
                times.push(event.event_time.0 as i64);
                kinds.push(i64::from(event.kind().tag()));
                versions.push(i64::from(event.schema_version()));
                bodies.push(body);
            }
            transaction.execute(
                &insert,
                &[&positions, &devices, &seqs, &walls, &logicals, &times, &kinds, &versions, &bodies, &"gw", &1i64],
            )?;
        }
        transaction.commit()?;
    }
    Ok(n_events_of(groups) as f64 / started.elapsed().as_secs_f64())
}

fn catch_up(backend: &Backend) -> anyhow::Result<f64> {
    let mut runner = Runner::new(backend.open_writer()?, builtin(Vec::new()));
    let started = Instant::now();
    let n = runner.catch_up()?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// One round's figures.
struct Round {
    raw: f64,
    /// SQLite only: the baseline into a table without secondary indexes.
    raw_plain: Option<f64>,
    store: StoreRun,
    replay: StoreRun,
    catch_up: f64,
}

fn report(name: &str, baseline: &str, rounds: &[Round]) {
    for (index, round) in rounds.iter().enumerate() {
        let plain = round.raw_plain.map_or(String::new(), |plain| {
            format!(", raw no-index {plain:.0} rows/s, ratio {:.2}", round.store.rate / plain)
        });
        println!(
            "{name} round {index}: store {:.0} events/s ({} new, p99 commit {:.2} ms), raw {:.0} rows/s, ratio {:.2}\
             {plain}; replay {:.0} events/s ({} stored again); catch-up {:.0} events/s",
            round.store.rate,
            round.store.n_new,
            round.store.p99_ms,
            round.raw,
            round.store.rate / round.raw,
            round.replay.rate,
            round.replay.n_new,
            round.catch_up
        );
    }
    let store = median(rounds.iter().map(|round| round.store.rate).collect());
    let raw = median(rounds.iter().map(|round| round.raw).collect());
    let ratio = median(rounds.iter().map(|round| round.store.rate / round.raw).collect());
    println!(
        "{name} MEDIAN of {}: store {store:.0} events/s, p99 commit {:.2} ms; raw ({baseline}) {raw:.0} rows/s; \
         ratio {ratio:.2} (median of per-round ratios); replay {:.0} events/s; projection catch-up {:.0} events/s",
        rounds.len(),
        median(rounds.iter().map(|round| round.store.p99_ms).collect()),
        median(rounds.iter().map(|round| round.replay.rate).collect()),
        median(rounds.iter().map(|round| round.catch_up).collect()),
    );
    let plain: Vec<(f64, f64)> =
        rounds.iter().filter_map(|round| round.raw_plain.map(|plain| (plain, round.store.rate / plain))).collect();
    if !plain.is_empty() {
        println!(
            "{name} MEDIAN of {}: raw (same INSERTs into the table without secondary indexes) {:.0} rows/s; \
             ratio {:.2} (median of per-round ratios)",
            plain.len(),
            median(plain.iter().map(|(rate, _)| *rate).collect()),
            median(plain.iter().map(|(_, ratio)| *ratio).collect()),
        );
    }
}

fn main() -> anyhow::Result<()> {
    let options = options()?;
    let groups = workload(&options)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "workload: {} events, {DEVICES} devices, batches of {}, {} events per commit, {} rounds; \
         load average at start: {}",
        n_events_of(&groups),
        options.batch_events,
        options.commit_events,
        options.rounds,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    if options.only.as_deref().is_none_or(|only| only == "sqlite") {
        println!("sqlite settings (store and raw): {:?}", sqlite::WRITER_PRAGMAS);
        let mut rounds = Vec::new();
        for index in 0..options.rounds {
            let dir = tempfile::tempdir()?;
            let backend = Backend::Sqlite { path: dir.path().join("cloud.sqlite3") };
            let raw_path = dir.path().join("raw.sqlite3");
            let plain_path = dir.path().join("raw-plain.sqlite3");
            // Alternate the order so drift in the machine's load hits every side alike.
            let (raw, raw_plain, store) = if index % 2 == 0 {
                let raw = raw_sqlite(&raw_path, RawTable::Indexed, &groups)?;
                let plain = raw_sqlite(&plain_path, RawTable::Plain, &groups)?;
                (raw, plain, store_run(&backend, &groups)?)
            } else {
                let store = store_run(&backend, &groups)?;
                let plain = raw_sqlite(&plain_path, RawTable::Plain, &groups)?;
                (raw_sqlite(&raw_path, RawTable::Indexed, &groups)?, plain, store)
            };
            let replay = store_run(&backend, &groups)?;
            rounds.push(Round { raw, raw_plain: Some(raw_plain), store, replay, catch_up: catch_up(&backend)? });
        }
        report("sqlite", "multi-row INSERTs, per-event table with its two lookup indexes", &rounds);
    }
    if let (Ok(url), true) =
        (std::env::var("TIDESYNC_TEST_POSTGRES_URL"), options.only.as_deref().is_none_or(|only| only == "postgres"))
    {
        let mut rounds = Vec::new();
        for index in 0..options.rounds {
            let store_schema = format!("bench_{}_{index}_store", std::process::id());
            let raw_schema = format!("bench_{}_{index}_raw", std::process::id());
            let backend = Backend::Postgres { url: url.clone(), schema: store_schema.clone() };
            let (raw, store) = if index % 2 == 0 {
                let raw = raw_postgres(&url, &raw_schema, &groups)?;
                (raw, store_run(&backend, &groups)?)
            } else {
                let store = store_run(&backend, &groups)?;
                (raw_postgres(&url, &raw_schema, &groups)?, store)
            };
            let replay = store_run(&backend, &groups)?;
            rounds.push(Round { raw, raw_plain: None, store, replay, catch_up: catch_up(&backend)? });
            let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
            client.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {store_schema} CASCADE; DROP SCHEMA IF EXISTS {raw_schema} CASCADE"
            ))?;
        }
        report("postgres", "UNNEST INSERT per batch, same table and indexes", &rounds);
    }
    Ok(())
}
