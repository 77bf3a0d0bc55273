//! Durable append throughput of the cloud store with dedupe, beside a raw baseline (plain
//! INSERTs of the same rows in transactions of the same size, same durability), and projection
//! catch-up rate. `cargo run --release -p tidesync-cloud --example append_bench -- [N_EVENTS]`;
//! PostgreSQL too when `TIDESYNC_TEST_POSTGRES_URL` is set.

use std::time::Instant;

use tidesync_cloud::projection::{builtin, Runner};
use tidesync_cloud::store::{Backend, CloudStore, IngestMeta};
use tidesync_core::event::{DeviceId, Event, EventId, GatewayId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::wire::EventBatch;

const BATCH_EVENTS: u64 = 1_000;
const DEVICES: u64 = 10;

fn batches(n_events: u64) -> anyhow::Result<Vec<EventBatch>> {
    let per_device = n_events / DEVICES;
    let mut out = Vec::new();
    for first in (1..=per_device).step_by(BATCH_EVENTS as usize) {
        for device_index in 0..DEVICES {
            let device = DeviceId::new(&format!("dev-{device_index}"))?;
            let last = (first + BATCH_EVENTS - 1).min(per_device);
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
            out.push(EventBatch::new(device, Seq(first), events)?);
        }
    }
    Ok(out)
}

fn p99(mut latencies_us: Vec<u64>) -> f64 {
    latencies_us.sort_unstable();
    let index = (latencies_us.len() * 99 / 100).min(latencies_us.len().saturating_sub(1));
    latencies_us.get(index).copied().unwrap_or(0) as f64 / 1_000.0
}

/// Appends every batch with one commit each; returns (events offered per second, new events,
/// p99 commit latency in ms).
fn store_run(backend: &Backend, batches: &[EventBatch]) -> anyhow::Result<(f64, u64, f64)> {
    let mut store = CloudStore::open(backend.open_writer()?, ShadowLimits::default())?;
    let meta = IngestMeta { gateway: GatewayId::new("gw")?, ingest_time: Millis(1) };
    let started = Instant::now();
    let mut latencies = Vec::new();
    let (mut n_offered, mut n_new) = (0u64, 0u64);
    for batch in batches {
        let commit_started = Instant::now();
        n_new += store.append_from(batch, &meta)?.n_new as u64;
        n_offered += batch.events.len() as u64;
        store.commit()?;
        latencies.push(commit_started.elapsed().as_micros() as u64);
    }
    Ok((n_offered as f64 / started.elapsed().as_secs_f64(), n_new, p99(latencies)))
}

fn raw_sqlite(path: &std::path::Path, batches: &[EventBatch]) -> anyhow::Result<f64> {
    let db = rusqlite::Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute_batch(
        "CREATE TABLE raw (position INTEGER PRIMARY KEY, device TEXT, seq INTEGER, hlc INTEGER, t INTEGER, kind INTEGER, v INTEGER, body BLOB, gateway TEXT, ingest INTEGER)",
    )?;
    let started = Instant::now();
    let mut n = 0u64;
    for batch in batches {
        db.execute_batch("BEGIN")?;
        {
            let mut insert = db.prepare_cached("INSERT INTO raw VALUES (NULL, ?1, ?2, ?3, ?4, 1, 1, ?5, 'gw', 1)")?;
            for event in &batch.events {
                let mut body = Vec::new();
                event.payload.encode_body(&mut body);
                insert.execute(rusqlite::params![
                    event.id.device.as_str(),
                    event.id.seq.0 as i64,
                    event.hlc.wall_ms as i64,
                    event.event_time.0 as i64,
                    body
                ])?;
                n += 1;
            }
        }
        db.execute_batch("COMMIT")?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn raw_postgres(url: &str, batches: &[EventBatch]) -> anyhow::Result<f64> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    client.batch_execute("DROP TABLE IF EXISTS bench_raw; CREATE TABLE bench_raw (position BIGSERIAL PRIMARY KEY, device TEXT, seq BIGINT, hlc BIGINT, t BIGINT, body BYTEA, gateway TEXT, ingest BIGINT)")?;
    let started = Instant::now();
    let mut n = 0u64;
    for batch in batches {
        let mut devices = Vec::new();
        let mut seqs = Vec::new();
        let mut hlcs = Vec::new();
        let mut times = Vec::new();
        let mut bodies = Vec::new();
        for event in &batch.events {
            let mut body = Vec::new();
            event.payload.encode_body(&mut body);
            devices.push(event.id.device.as_str().to_string());
            seqs.push(event.id.seq.0 as i64);
            hlcs.push(event.hlc.wall_ms as i64);
            times.push(event.event_time.0 as i64);
            bodies.push(body);
            n += 1;
        }
        let mut transaction = client.transaction()?;
        transaction.execute(
            "INSERT INTO bench_raw (device, seq, hlc, t, body, gateway, ingest) SELECT d, s, h, t, b, 'gw', 1 FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BYTEA[]) AS x(d, s, h, t, b)",
            &[&devices, &seqs, &hlcs, &times, &bodies],
        )?;
        transaction.commit()?;
    }
    client.batch_execute("DROP TABLE bench_raw")?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn catch_up(backend: &Backend) -> anyhow::Result<f64> {
    let mut runner = Runner::new(backend.open_writer()?, builtin(Vec::new()));
    let started = Instant::now();
    let n = runner.catch_up()?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let n_events: u64 = std::env::args().nth(1).map(|arg| arg.parse()).transpose()?.unwrap_or(200_000);
    let batches = batches(n_events)?;
    let dir = tempfile::tempdir()?;
    let backend = Backend::Sqlite { path: dir.path().join("cloud.sqlite3") };
    let raw = raw_sqlite(&dir.path().join("raw.sqlite3"), &batches)?;
    let (store, n_new, p99_ms) = store_run(&backend, &batches)?;
    let (again, n_again, _) = store_run(&backend, &batches)?;
    let projections = catch_up(&backend)?;
    println!(
        "sqlite: store {store:.0} events/s ({n_new} new, p99 commit {p99_ms:.2} ms), raw {raw:.0} rows/s, \
         ratio {:.2}; replay of the same batches {again:.0} events/s ({n_again} stored again); \
         projection catch-up {projections:.0} events/s",
        store / raw
    );
    if let Ok(url) = std::env::var("TIDESYNC_TEST_POSTGRES_URL") {
        let backend = Backend::Postgres { url: url.clone(), schema: format!("bench_{}", std::process::id()) };
        let raw = raw_postgres(&url, &batches)?;
        let (store, n_new, p99_ms) = store_run(&backend, &batches)?;
        let projections = catch_up(&backend)?;
        println!(
            "postgres: store {store:.0} events/s ({n_new} new, p99 commit {p99_ms:.2} ms), raw {raw:.0} rows/s, \
             ratio {:.2}; \
             projection catch-up {projections:.0} events/s",
            store / raw
        );
        let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS bench_{} CASCADE", std::process::id()))?;
    }
    Ok(())
}
