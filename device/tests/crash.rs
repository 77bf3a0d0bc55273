//! Crash test: the real `tidesync-device record --follow` process records a stream of readings
//! and is killed with SIGKILL at random moments; after every kill the ledger must hold every
//! event the process acknowledged (with the value it was given), seqs must be gap-free, SQLite's
//! integrity check must pass, and the hash chain stored with the events must equal a fresh fold
//! of the surviving events (it is written in each event's own transaction).
//!
//! `TIDESYNC_CRASH_KILLS` sets the number of kills (default 50); `TIDESYNC_CRASH_SEED` the seed
//! of the kill moments (printed, so a failure can be replayed).

// Test helpers outside #[test] functions may unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tidesync_core::auth::ChainHash;
use tidesync_core::event::{DeviceId, Payload, Seq};
use tidesync_core::ledger::Ledger;
use tidesync_device::{DeviceStore, LedgerConfig};

const BIN: &str = env!("CARGO_BIN_EXE_tidesync-device");

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|text| text.parse().ok()).unwrap_or(default)
}

fn init(data_dir: &Path) {
    let output = Command::new(BIN)
        .args(["--data-dir", data_dir.to_str().unwrap(), "init", "--device-id", "crash-1"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// When a run is killed: `kill_after` after the process started, or after its first ack.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// Counted from the start: on a loaded machine this may land before SQLite is open.
    FromStart(Duration),
    /// Counted from the first acknowledgement (waited for up to 20 s), so the kill lands while
    /// group commits are in flight however slowly the process started.
    FromFirstAck(Duration),
}

/// One run of the recorder: feeds readings with values from `next_value` on until killed at
/// `kill_at`; returns the acknowledged (seq, value) pairs and the next unused value.
fn run_until_killed(data_dir: &Path, next_value: u64, kill_at: KillAt) -> (Vec<(u64, u64)>, u64) {
    let mut child = Command::new(BIN)
        .args(["--data-dir", data_dir.to_str().unwrap(), "record", "--follow"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut value = next_value;
            // Line numbers are 1-based per process; line n carries value next_value + n - 1.
            while !stop.load(Ordering::Relaxed) {
                let batch: String =
                    (value..value + 16).map(|v| format!("{{\"sensor\":\"counter\",\"value\":{v}}}\n")).collect();
                if stdin.write_all(batch.as_bytes()).is_err() {
                    break;
                }
                value += 16;
                std::thread::sleep(Duration::from_micros(200));
            }
            value
        })
    };
    let (first_ack, first_ack_seen) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let ack: serde_json::Value = serde_json::from_str(&line).unwrap();
            let line_number = ack["line"].as_u64().unwrap();
            acks.push((ack["seq"].as_u64().unwrap(), next_value + line_number - 1));
            if acks.len() == 1 {
                let _ = first_ack.send(());
            }
        }
        acks
    });
    match kill_at {
        KillAt::FromStart(after) => std::thread::sleep(after),
        KillAt::FromFirstAck(after) => {
            let _ = first_ack_seen.recv_timeout(Duration::from_secs(20));
            std::thread::sleep(after);
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let sent_up_to = feeder.join().unwrap();
    (reader.join().unwrap(), sent_up_to)
}

#[test]
fn every_acknowledged_event_survives_sigkill() {
    let kills = env_u64("TIDESYNC_CRASH_KILLS", 50);
    let seed = env_u64("TIDESYNC_CRASH_SEED", 0x7d5e_c0de);
    eprintln!("crash test: {kills} kills, seed {seed} (TIDESYNC_CRASH_SEED={seed} to replay)");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    init(&data_dir);
    let database = data_dir.join("ledger.sqlite3");
    let device = DeviceId::new("crash-1").unwrap();

    let mut acknowledged: BTreeMap<u64, u64> = BTreeMap::new();
    let mut next_value = 1;
    let mut high_seen = 0;
    let mut runs_with_acks = 0;
    // The fold of the chain over the surviving events, extended after each kill (what survived a
    // kill is durable, so later kills only add to it).
    let mut folded: Vec<ChainHash> = Vec::new();
    for kill in 0..kills {
        // One kill in four between 10 and 150 ms after start (some land while SQLite opens), the
        // others up to 140 ms after the first ack, while group commits are in flight: timed from
        // the start alone, a loaded machine made most runs die before their first commit.
        let after = Duration::from_millis(rng.next_u64() % 140);
        let kill_at = if rng.next_u64() % 4 == 0 {
            KillAt::FromStart(after + Duration::from_millis(10))
        } else {
            KillAt::FromFirstAck(after)
        };
        let (acks, sent_up_to) = run_until_killed(&data_dir, next_value, kill_at);
        next_value = sent_up_to + 1;
        if !acks.is_empty() {
            runs_with_acks += 1;
        }
        for (seq, value) in acks {
            assert!(acknowledged.insert(seq, value).is_none(), "seq {seq} acknowledged twice");
        }

        let store = DeviceStore::open(&database, Some(device), LedgerConfig::default())
            .unwrap_or_else(|error| panic!("kill {kill}: reopen failed: {error}"));
        let integrity: String = store.connection().query_row("PRAGMA integrity_check", [], |row| row.get(0)).unwrap();
        assert_eq!(integrity, "ok", "kill {kill}");
        let events = store.events_from(Seq::FIRST, usize::MAX >> 1).unwrap();
        let held: BTreeMap<u64, u64> = events
            .iter()
            .map(|event| match &event.payload {
                Payload::Reading(reading) => (event.id.seq.0, reading.value as u64),
                other => panic!("unexpected payload {other:?}"),
            })
            .collect();
        // Gap-free from 1: nothing was committed upstream, so nothing was pruned.
        let seqs: Vec<u64> = held.keys().copied().collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "kill {kill}: seqs have a gap");
        assert!(seqs.len() as u64 >= high_seen, "kill {kill}: the ledger lost events it had");
        high_seen = seqs.len() as u64;
        for (seq, value) in &acknowledged {
            assert_eq!(held.get(seq), Some(value), "kill {kill}: acknowledged seq {seq} lost or changed");
        }
        // The stored chain is exactly the fold of the surviving events from genesis.
        for event in &events[folded.len().min(events.len())..] {
            let before = folded.last().copied().unwrap_or_else(|| ChainHash::genesis(&device));
            folded.push(before.next(event));
        }
        let chains = store.chains_from(Seq::FIRST, usize::MAX >> 1).unwrap();
        assert_eq!(chains.len(), events.len(), "kill {kill}");
        for ((seq, chain), expected) in chains.iter().zip(&folded) {
            assert_eq!(chain.as_ref(), Some(expected), "kill {kill}: chain of seq {seq} is not the fold of the events");
        }
        let head = folded.last().copied().unwrap_or_else(|| ChainHash::genesis(&device));
        assert_eq!(store.chain_head(&device), Some(head), "kill {kill}: chain head");
        // Values are recorded in the order they were fed, each at most once.
        let values: Vec<u64> = held.values().copied().collect();
        assert!(values.windows(2).all(|pair| pair[0] < pair[1]), "kill {kill}: values out of order or duplicated");
    }
    eprintln!(
        "crash test: {} events acknowledged over {kills} kills ({runs_with_acks} runs acknowledged some), {high_seen} held",
        acknowledged.len()
    );
    assert!(runs_with_acks * 2 >= kills, "too few runs got to acknowledge anything: the test tests nothing");
}
