//! Property tests of convergence: shadows edited concurrently on several replicas, and sync
//! sessions over a pipe that loses, duplicates and reorders frames.

mod common;

use std::collections::VecDeque;

use common::*;
use proptest::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tidesync_core::event::{DeviceId, GatewayId, Millis, Seq};
use tidesync_core::ledger::{Ledger, MemLedger};
use tidesync_core::shadow::{PeerSync, Section, Shadow, ShadowLimits};
use tidesync_core::sync::{Ingest, MemStore, SessionConfig, SessionEvent, ShadowKeeping, Uplink};
use tidesync_core::value::Value;
use tidesync_core::wire::Frame;

#[derive(Debug, Clone)]
enum ShadowOp {
    Set {
        replica: usize,
        section: Section,
        key: String,
        value: Value,
    },
    Remove {
        replica: usize,
        section: Section,
        key: String,
    },
    /// Deliver a sync message from one replica to another, possibly twice, possibly late.
    Sync {
        from: usize,
        to: usize,
        duplicate: bool,
        delay: bool,
    },
}

fn arb_section() -> impl Strategy<Value = Section> {
    prop_oneof![Just(Section::Reported), Just(Section::Desired)]
}

fn arb_shadow_op(n_replicas: usize) -> impl Strategy<Value = ShadowOp> {
    let key = prop_oneof![Just("rate_s"), Just("fw"), Just("mode"), Just("limits")].prop_map(String::from);
    prop_oneof![
        3 => (0..n_replicas, arb_section(), key.clone(), arb_value())
            .prop_map(|(replica, section, key, value)| ShadowOp::Set { replica, section, key, value }),
        1 => (0..n_replicas, arb_section(), key).prop_map(|(replica, section, key)| ShadowOp::Remove { replica, section, key }),
        4 => (0..n_replicas, 0..n_replicas, any::<bool>(), any::<bool>())
            .prop_map(|(from, to, duplicate, delay)| ShadowOp::Sync { from, to, duplicate, delay }),
    ]
}

/// Runs the automerge sync protocol between every pair until nobody has anything to say.
fn sync_all(replicas: &mut [Shadow]) {
    let n = replicas.len();
    let mut states: Vec<Vec<PeerSync>> = (0..n).map(|_| (0..n).map(|_| PeerSync::new()).collect()).collect();
    for _round in 0..20 {
        let mut quiet = true;
        for from in 0..n {
            for to in 0..n {
                if from == to {
                    continue;
                }
                while let Some(message) = replicas[from].generate_sync_message(&mut states[from][to]) {
                    quiet = false;
                    replicas[to].receive_sync_message(&mut states[to][from], &message).expect("valid message");
                }
            }
        }
        if quiet {
            return;
        }
    }
    panic!("sync did not go quiet");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn shadows_converge_after_concurrent_edits_and_messy_exchanges(
        n_replicas in 2usize..=4,
        ops in prop::collection::vec(arb_shadow_op(4), 1..40),
    ) {
        let names = ["device:d", "gateway:g1", "gateway:g2", "cloud"];
        let mut replicas: Vec<Shadow> = names[..n_replicas].iter().map(|name| Shadow::new(name, ShadowLimits::default())).collect();
        let mut states: Vec<Vec<PeerSync>> = (0..n_replicas).map(|_| (0..n_replicas).map(|_| PeerSync::new()).collect()).collect();
        let mut late: Vec<(usize, usize, Vec<u8>)> = Vec::new();
        for op in ops {
            match op {
                ShadowOp::Set { replica, section, key, value } if replica < n_replicas => {
                    replicas[replica].set(section, &key, &value).expect("small edits fit");
                }
                ShadowOp::Remove { replica, section, key } if replica < n_replicas => {
                    replicas[replica].remove(section, &key).expect("remove");
                }
                ShadowOp::Sync { from, to, duplicate, delay } if from < n_replicas && to < n_replicas && from != to => {
                    if let Some(message) = replicas[from].generate_sync_message(&mut states[from][to]) {
                        if delay {
                            late.push((from, to, message.clone()));
                        } else {
                            // Messages from an old exchange may be stale; they must still be safe.
                            let _ = replicas[to].receive_sync_message(&mut states[to][from], &message);
                        }
                        if duplicate {
                            let _ = replicas[to].receive_sync_message(&mut states[to][from], &message);
                        }
                    }
                }
                _ => {}
            }
        }
        // Late messages arrive in reverse order.
        for (from, to, message) in late.into_iter().rev() {
            let _ = replicas[to].receive_sync_message(&mut states[to][from], &message);
        }
        // Then a clean exchange, as after a reconnect.
        sync_all(&mut replicas);
        let first = replicas[0].to_json();
        let first_heads = replicas[0].heads();
        for replica in &mut replicas[1..] {
            prop_assert_eq!(replica.to_json(), first.clone());
            prop_assert_eq!(replica.heads(), first_heads.clone());
        }
        // Saved shadows are plain automerge documents: loading one gives the same state.
        let bytes = replicas[0].save();
        let loaded = Shadow::load(&bytes, "device:d", ShadowLimits::default()).expect("loads");
        prop_assert_eq!(loaded.to_json(), first);
    }

    #[test]
    fn device_to_gateway_sync_survives_a_lossy_pipe(
        n_events in 1u64..60,
        seed in any::<u64>(),
        loss_percent in 0u32..40,
        duplicate_percent in 0u32..40,
        reorder_percent in 0u32..40,
    ) {
        let device_id = device("pump-7");
        let mut on_device = MemStore::new("device:pump-7", MemLedger::new(), ShadowKeeping::Only(device_id), ShadowLimits::default());
        for index in 0..n_events {
            on_device.ledger.record(device_id, Millis(index * 1_000), Millis(index * 1_000), reading("t", index as f64, "Cel")).expect("record");
        }
        let mut on_gateway = MemStore::new("gateway:g1", MemLedger::pruning(), ShadowKeeping::All, ShadowLimits::default());
        let faults = Faults { rng: ChaCha8Rng::seed_from_u64(seed), loss_percent, duplicate_percent, reorder_percent };
        let n_new = run_link(
            || (Uplink::for_device(device_id, small_config(), Millis(0)), Ingest::for_gateway(device_id, small_config(), Millis(0))),
            &mut on_device,
            &mut on_gateway,
            faults,
        );
        let sent: Vec<_> = on_device.ledger.events(&device_id).cloned().collect();
        let received: Vec<_> = on_gateway.ledger.events(&device_id).cloned().collect();
        prop_assert_eq!(received, sent, "the gateway holds exactly the device's events");
        prop_assert_eq!(n_new, n_events, "no event was stored twice");
    }

    #[test]
    fn gateway_to_cloud_sync_survives_a_lossy_pipe(
        per_device in prop::collection::vec(1u64..25, 1..5),
        seed in any::<u64>(),
        loss_percent in 0u32..40,
        duplicate_percent in 0u32..40,
        reorder_percent in 0u32..40,
    ) {
        let mut spool = MemStore::new("gateway:g1", MemLedger::new(), ShadowKeeping::All, ShadowLimits::default());
        let devices: Vec<DeviceId> = (0..per_device.len()).map(|index| device(&format!("d{index}"))).collect();
        for (device_id, n) in devices.iter().zip(&per_device) {
            for index in 0..*n {
                spool.ledger.record(*device_id, Millis(index), Millis(index), reading("t", 1.5, "Cel")).expect("record");
            }
        }
        let mut cloud = MemStore::new("cloud", MemLedger::new(), ShadowKeeping::All, ShadowLimits::default());
        let gateway = GatewayId::new("g1").expect("valid");
        let faults = Faults { rng: ChaCha8Rng::seed_from_u64(seed), loss_percent, duplicate_percent, reorder_percent };
        let n_new = run_link(
            || (Uplink::for_gateway(gateway, small_config(), Millis(0)), Ingest::for_cloud(gateway, small_config(), Millis(0))),
            &mut spool,
            &mut cloud,
            faults,
        );
        for device_id in &devices {
            let sent: Vec<_> = spool.ledger.events(device_id).cloned().collect();
            let received: Vec<_> = cloud.ledger.events(device_id).cloned().collect();
            prop_assert_eq!(received, sent);
        }
        prop_assert_eq!(n_new, per_device.iter().sum::<u64>());
    }
}

fn small_config() -> SessionConfig {
    SessionConfig { batch_events_max: 4, batches_in_flight_max: 3, ..SessionConfig::default() }
}

struct Faults {
    rng: ChaCha8Rng,
    loss_percent: u32,
    duplicate_percent: u32,
    reorder_percent: u32,
}

impl Faults {
    fn chance(&mut self, percent: u32) -> bool {
        (self.rng.next_u32() % 100) < percent
    }

    /// Puts a frame on a pipe: maybe lost, maybe twice, maybe ahead of others.
    fn send(&mut self, pipe: &mut VecDeque<Frame>, frame: Frame) {
        if self.chance(self.loss_percent) {
            return;
        }
        let copies = if self.chance(self.duplicate_percent) { 2 } else { 1 };
        for _ in 0..copies {
            if self.chance(self.reorder_percent) && !pipe.is_empty() {
                let at = (self.rng.next_u32() as usize) % pipe.len();
                pipe.insert(at, frame.clone());
            } else {
                pipe.push_back(frame.clone());
            }
        }
    }
}

/// Drives sessions between `client` and `server` stores: a faulty phase with reconnects whenever
/// a session closes, then a clean session. Returns how many events the server stored as new.
fn run_link(
    mut connect: impl FnMut() -> (Uplink, Ingest),
    client: &mut MemStore,
    server: &mut MemStore,
    mut faults: Faults,
) -> u64 {
    let mut n_new = 0u64;
    let mut now = Millis(0);
    for phase_clean in [false, true] {
        let (mut uplink, mut ingest) = connect();
        let mut up: VecDeque<Frame> = VecDeque::new();
        let mut down: VecDeque<Frame> = VecDeque::new();
        let steps = if phase_clean { 2_000 } else { 300 };
        for _ in 0..steps {
            now = now.plus_ms(250);
            while let Some(frame) = uplink.poll_transmit(now, client).expect("memory ledger reads") {
                if phase_clean {
                    up.push_back(frame)
                } else {
                    faults.send(&mut up, frame)
                }
            }
            while let Some(frame) = up.pop_front() {
                let _ = ingest.handle_frame(now, frame, server);
            }
            while let Some(event) = ingest.poll_event() {
                if let SessionEvent::EventsReceived(batch) = event {
                    let appended = server.append(&batch).expect("contiguous batches append");
                    n_new += appended.n_new as u64;
                    ingest.handle_durable(now, batch.device, appended.high);
                }
            }
            while let Some(frame) = ingest.poll_transmit(now, server) {
                if phase_clean {
                    down.push_back(frame)
                } else {
                    faults.send(&mut down, frame)
                }
            }
            while let Some(frame) = down.pop_front() {
                let _ = uplink.handle_frame(now, frame, client);
            }
            while uplink.poll_event().is_some() {}
            uplink.handle_timeout(now);
            ingest.handle_timeout(now);
            if uplink.is_closed() || ingest.is_closed() {
                if phase_clean {
                    break;
                }
                // Reconnect, as a host does after a session ends.
                (uplink, ingest) = connect();
                up.clear();
                down.clear();
            }
            if phase_clean && uplink.is_established() && uplink.backlog_events() == 0 {
                let caught_up = client.version_vector().iter().all(|(device, seq)| uplink.acked(device) >= seq);
                if caught_up {
                    break;
                }
            }
        }
    }
    let _ = Seq::ZERO;
    n_new
}
