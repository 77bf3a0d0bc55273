//! Durable append benchmark of the device agent, beside raw rusqlite in the same run.
//!
//! `cargo bench -p tidesync-device --bench append` prints, for 1, 8 and 64 concurrent producers
//! each recording one event at a time, and for one producer recording batches of 1,000: events/s
//! durable and acknowledgement latency p50/p99; and the raw baseline: rusqlite inserts of the same
//! rows with the same `synchronous` setting (FULL, WAL), one row per transaction and 1,000 rows per
//! transaction. Every scenario runs `ROUNDS` times on a fresh database; medians are printed. Last,
//! the CPU cost of the hash chain the writer computes per event (SHA-256 over the event's fields,
//! see `tidesync_core::auth`), alone, in ns/event: the part of the append cost that signing adds.
//! `TIDESYNC_BENCH_SECONDS` sets the length of one round (default 2).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use tidesync_core::auth::{ChainHash, EncodedEvent};
use tidesync_core::event::{DeviceId, EventId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_device::{Agent, DeviceStore, LedgerConfig, NewEvent};

const ROUNDS: usize = 3;
const BATCH_EVENTS: usize = 1000;

struct Round {
    events_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn seconds() -> Duration {
    let secs = std::env::var("TIDESYNC_BENCH_SECONDS").ok().and_then(|text| text.parse().ok()).unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

fn payload(i: u64) -> Payload {
    Payload::Reading(SensorReading {
        sensor: "sht31.temperature".into(),
        value: 20.0 + (i % 100) as f64 / 10.0,
        unit: "Cel".into(),
    })
}

fn percentile(sorted_ms: &[f64], fraction: f64) -> f64 {
    if sorted_ms.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted_ms.len() as f64 - 1.0) * fraction).round() as usize;
    sorted_ms[index]
}

fn summarise(count: u64, elapsed: Duration, mut latencies_ms: Vec<f64>) -> Round {
    latencies_ms.sort_by(f64::total_cmp);
    Round {
        events_per_s: count as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(&latencies_ms, 0.5),
        p99_ms: percentile(&latencies_ms, 0.99),
    }
}

fn agent_round(producers: usize, batch: usize) -> Round {
    let dir = tempfile::tempdir().expect("tempdir");
    let device = DeviceId::new("bench-1").expect("valid");
    let store =
        DeviceStore::create(&dir.path().join("ledger.sqlite3"), device, LedgerConfig::default()).expect("create");
    let agent = Arc::new(Agent::start(store).expect("start"));
    let barrier = Arc::new(Barrier::new(producers + 1));
    let duration = seconds();
    let threads: Vec<_> = (0..producers)
        .map(|producer| {
            let agent = Arc::clone(&agent);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut latencies_ms = Vec::new();
                let mut count = 0u64;
                barrier.wait();
                let start = Instant::now();
                while start.elapsed() < duration {
                    // Validation and encoding are the producer's work, as in a real application.
                    let events: Vec<NewEvent> = (0..batch as u64)
                        .map(|i| NewEvent::new(Millis(1_700_000_000_000), &payload(count + i + producer as u64)))
                        .collect::<Result<_, _>>()
                        .expect("valid");
                    let sent = Instant::now();
                    agent.submit(events).expect("submit").wait().expect("durable");
                    latencies_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
                    count += batch as u64;
                }
                (count, latencies_ms)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut count = 0;
    let mut latencies_ms = Vec::new();
    for thread in threads {
        let (n, latencies) = thread.join().expect("producer");
        count += n;
        latencies_ms.extend(latencies);
    }
    let elapsed = start.elapsed();
    summarise(count, elapsed, latencies_ms)
}

/// The same rows into the same schema with plain rusqlite: WAL, synchronous=FULL.
fn raw_round(batch: usize) -> Round {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Connection::open(dir.path().join("raw.sqlite3")).expect("open");
    db.pragma_update(None, "journal_mode", "WAL").expect("wal");
    db.pragma_update(None, "synchronous", "FULL").expect("sync");
    db.execute_batch(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY NOT NULL, device TEXT NOT NULL, hlc_wall_ms INTEGER NOT NULL,
         hlc_logical INTEGER NOT NULL, event_time_ms INTEGER NOT NULL, kind INTEGER NOT NULL,
         schema_version INTEGER NOT NULL, body BLOB NOT NULL) STRICT",
    )
    .expect("schema");
    let mut body = Vec::new();
    payload(0).encode_body(&mut body);
    let duration = seconds();
    let start = Instant::now();
    let mut seq = 0u64;
    let mut latencies_ms = Vec::new();
    while start.elapsed() < duration {
        let sent = Instant::now();
        let tx = db.unchecked_transaction().expect("begin");
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO events VALUES (?1, 'bench-1', ?2, 0, ?3, 1, 1, ?4)").expect("prepare");
            for _ in 0..batch {
                seq += 1;
                insert.execute(params![seq, 1_700_000_000_000u64 + seq, 1_700_000_000_000u64, body]).expect("insert");
            }
        }
        tx.commit().expect("commit");
        latencies_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    summarise(seq, start.elapsed(), latencies_ms)
}

/// Nanoseconds per event of the chain step alone, over the bench's payload.
fn chain_ns_per_event() -> f64 {
    let device = DeviceId::new("bench-1").expect("valid");
    let mut body = Vec::new();
    payload(0).encode_body(&mut body);
    let n_events = 1_000_000u64;
    let start = Instant::now();
    let mut chain = ChainHash::genesis(&device);
    for seq in 1..=n_events {
        chain = chain.next_encoded(&EncodedEvent {
            id: EventId { device, seq: Seq(seq) },
            hlc: Hlc { wall_ms: 1_700_000_000_000 + seq, logical: 0 },
            event_time: Millis(1_700_000_000_000),
            kind: payload(0).kind(),
            schema_version: 1,
            body: &body,
        });
    }
    let elapsed = start.elapsed();
    // Keep the result alive so the loop is not optimised away.
    assert_ne!(chain, ChainHash::default());
    elapsed.as_nanos() as f64 / n_events as f64
}

fn median(mut rounds: Vec<Round>) -> Round {
    rounds.sort_by(|a, b| a.events_per_s.total_cmp(&b.events_per_s));
    rounds.swap_remove(rounds.len() / 2)
}

fn main() {
    // `cargo bench` passes `--bench`; anything else (e.g. a filter) is ignored.
    println!("durable appends, WAL + synchronous=FULL; median of {ROUNDS} rounds of {:?}", seconds());
    println!("{:<40} {:>14} {:>10} {:>10}", "scenario", "events/s", "p50 ms", "p99 ms");
    let print = |name: &str, round: &Round| {
        println!("{name:<40} {:>14.0} {:>10.2} {:>10.2}", round.events_per_s, round.p50_ms, round.p99_ms);
    };
    let raw_single = median((0..ROUNDS).map(|_| raw_round(1)).collect());
    print("raw rusqlite, 1 row per transaction", &raw_single);
    let raw_batch = median((0..ROUNDS).map(|_| raw_round(BATCH_EVENTS)).collect());
    print("raw rusqlite, 1000 rows per transaction", &raw_batch);
    for producers in [1, 8, 64] {
        let round = median((0..ROUNDS).map(|_| agent_round(producers, 1)).collect());
        print(&format!("agent, {producers} producers x 1 event"), &round);
        println!("{:<40} {:>14.2}x raw single-row", "", round.events_per_s / raw_single.events_per_s);
    }
    let batch = median((0..ROUNDS).map(|_| agent_round(1, BATCH_EVENTS)).collect());
    print("agent, 1 producer x 1000-event batches", &batch);
    println!("{:<40} {:>14.2}x raw 1000-row", "", batch.events_per_s / raw_batch.events_per_s);
    let mut chain_ns: Vec<f64> = (0..ROUNDS).map(|_| chain_ns_per_event()).collect();
    chain_ns.sort_by(f64::total_cmp);
    println!("{:<40} {:>14.0} ns/event (the writer's share of signing)", "hash chain step alone", chain_ns[ROUNDS / 2]);
}
