//! The checks a run must pass once the fleet has healed, as plain functions over the world.
//! Each returns the failures it found (at most a few per check, with the data that explains them).

use tidesync_core::event::{EventId, Payload, Seq};
use tidesync_core::ledger::Ledger;

use crate::digest::event_hash;
use crate::projection::Projection;
use crate::world::World;

/// Most failures one check reports.
const FAILURES_PER_CHECK_MAX: usize = 5;

/// A failed check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckFailure {
    /// The check's name.
    pub check: &'static str,
    /// What was wrong.
    pub detail: String,
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.check, self.detail)
    }
}

struct Failures {
    check: &'static str,
    found: Vec<CheckFailure>,
    n_more: usize,
}

impl Failures {
    fn new(check: &'static str) -> Self {
        Self { check, found: Vec::new(), n_more: 0 }
    }

    fn push(&mut self, detail: String) {
        if self.found.len() < FAILURES_PER_CHECK_MAX {
            self.found.push(CheckFailure { check: self.check, detail });
        } else {
            self.n_more += 1;
        }
    }

    fn finish(mut self) -> Vec<CheckFailure> {
        if self.n_more > 0 {
            let detail = format!("... and {} more", self.n_more);
            self.found.push(CheckFailure { check: self.check, detail });
        }
        self.found
    }
}

/// Runs every check.
pub fn check_all(world: &mut World) -> Vec<CheckFailure> {
    world.cloud.disk.materialize();
    let world: &World = world;
    let checks: [fn(&World) -> Vec<CheckFailure>; 9] = [
        check_no_anomalies,
        check_converged,
        check_exactly_once,
        check_device_order,
        check_gaps_explained,
        check_gap_events_cover_holes,
        check_shadows_converge,
        check_projection,
        crate::world::adversary::check_security,
    ];
    // The checks only read the world, so they run at once on the machine's cores (a tenth of a
    // large fleet's run was spent here); failures are reported in the order above all the same.
    std::thread::scope(|scope| {
        let running: Vec<_> = checks.iter().map(|check| scope.spawn(move || check(world))).collect();
        running
            .into_iter()
            .flat_map(|check| check.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}

/// Nothing impossible happened along the way (a store refusing a batch its session handed over,
/// a frame that did not decode).
pub fn check_no_anomalies(world: &World) -> Vec<CheckFailure> {
    let mut failures = Failures::new("no_anomalies");
    for anomaly in &world.anomalies {
        failures.push(anomaly.clone());
    }
    failures.finish()
}

/// The heal phase ended with the fleet quiescent: every device's events committed, nothing in
/// flight, every shadow replica at the same heads.
pub fn check_converged(world: &World) -> Vec<CheckFailure> {
    let mut failures = Failures::new("converged");
    if !world.converged() {
        for node in &world.devices {
            let ledger = &node.disk.live().ledger;
            let (high, committed) = (ledger.high(&node.id), ledger.committed(&node.id));
            let cloud_high = world.cloud.disk.live().high(&node.id);
            if (committed != high || cloud_high != high) && !world.security.may_lag(&node.id) {
                failures.push(format!(
                    "device {} holds up to seq {high}, committed {committed}; the cloud covers up to {cloud_high}",
                    node.id
                ));
            }
        }
        if failures.found.is_empty() {
            failures.push("the ledgers caught up but shadow replicas never reached the same heads".to_string());
        }
    }
    failures.finish()
}

/// The seqs of `device` that the cloud holds gap events for.
fn gap_ranges(world: &World, device: &tidesync_core::event::DeviceId) -> Vec<(Seq, Seq)> {
    world
        .cloud
        .disk
        .durable()
        .ledger
        .events(device)
        .filter_map(|event| match &event.payload {
            Payload::Gap(gap) => Some((gap.first, gap.last)),
            _ => None,
        })
        .collect()
}

fn covered(ranges: &[(Seq, Seq)], seq: Seq) -> bool {
    ranges.iter().any(|(first, last)| *first <= seq && seq <= *last)
}

/// Every event a device made durable is in the cloud store exactly once and unchanged, unless a
/// recorded drop explains its absence; the store's log has each id once and nothing else.
pub fn check_exactly_once(world: &World) -> Vec<CheckFailure> {
    let mut failures = Failures::new("exactly_once");
    let store = &world.cloud.disk.durable().ledger;
    for ((node, oracle), drops) in world.devices.iter().zip(&world.oracle).zip(&world.drops) {
        if world.security.is_cloned(&node.id) {
            // Two histories under one name: checked by the security checks.
            continue;
        }
        // A device whose batches the cloud refused may stay behind, never have holes.
        let lags = world.security.may_lag(&node.id).then(|| store.high(&node.id));
        // The stream in seq order, walked beside the oracle rather than looked up per event.
        let mut stored = store.events(&node.id).peekable();
        for (index, expected) in oracle.iter().enumerate() {
            let id = EventId { device: node.id, seq: Seq(index as u64 + 1) };
            while stored.next_if(|event| event.id.seq < id.seq).is_some() {}
            match stored.next_if(|event| event.id.seq == id.seq) {
                Some(event) if event_hash(event) == *expected => {}
                Some(_) => failures.push(format!("{id} in the cloud differs from what the device made durable")),
                None if covered(drops, id.seq) => {}
                None if lags.is_some_and(|high| id.seq > high) => {}
                None => failures.push(format!("{id} was durable on the device but is not in the cloud store")),
            }
        }
    }
    let mut logged = world.cloud.log.clone();
    logged.sort_unstable();
    let mut n_distinct = 0;
    for same in logged.chunk_by(|a, b| a == b) {
        n_distinct += 1;
        if same.len() > 1 {
            failures.push(format!("{} is in the cloud log more than once", same[0]));
        }
    }
    if n_distinct != store.len() {
        failures.push(format!("the cloud log has {n_distinct} distinct events, its store {}", store.len()));
    }
    failures.finish()
}

/// Per device, the cloud's events are those the device issued (no seq past what it made
/// durable) and their clock stamps strictly increase with seq, whatever the device's wall clock
/// did.
pub fn check_device_order(world: &World) -> Vec<CheckFailure> {
    let mut failures = Failures::new("device_order");
    let store = &world.cloud.disk.durable().ledger;
    for (node, oracle) in world.devices.iter().zip(&world.oracle) {
        if world.security.is_cloned(&node.id) {
            continue;
        }
        let high = store.high(&node.id);
        if high.0 > oracle.len() as u64 {
            failures.push(format!(
                "the cloud covers {} up to {high}, the device made only {} durable",
                node.id,
                oracle.len()
            ));
        }
        let mut previous: Option<&tidesync_core::event::Event> = None;
        for event in store.events(&node.id) {
            if let Some(previous) = previous {
                if event.hlc <= previous.hlc {
                    failures.push(format!(
                        "{} has clock stamp {:?}, not after {} at {:?}",
                        event.id, event.hlc, previous.id, previous.hlc
                    ));
                }
            }
            previous = Some(event);
        }
    }
    failures.finish()
}

/// Every hole in a device's stream in the cloud is a range the device really dropped (the
/// simulator's record of every drop).
pub fn check_gaps_explained(world: &World) -> Vec<CheckFailure> {
    holes_covered_by(world, "gaps_explained", |world, device| world.drops[device].clone())
}

/// Every hole in a device's stream in the cloud is covered by a gap event the cloud holds: the
/// cloud can explain each hole by itself.
pub fn check_gap_events_cover_holes(world: &World) -> Vec<CheckFailure> {
    holes_covered_by(world, "gap_events_cover_holes", |world, device| gap_ranges(world, &world.devices[device].id))
}

fn holes_covered_by(
    world: &World,
    check: &'static str,
    ranges: impl Fn(&World, usize) -> Vec<(Seq, Seq)>,
) -> Vec<CheckFailure> {
    let mut failures = Failures::new(check);
    let store = &world.cloud.disk.durable().ledger;
    for (device, node) in world.devices.iter().enumerate() {
        if world.security.is_cloned(&node.id) {
            continue;
        }
        let gaps = ranges(world, device);
        let high = store.high(&node.id);
        let mut missing_first = None;
        for seq in 1..=high.0 + 1 {
            let seq = Seq(seq);
            let held = seq > high || store.get(&EventId { device: node.id, seq }).is_some();
            match (held, missing_first) {
                (false, None) => missing_first = Some(seq),
                (true, Some(first)) => {
                    let last = Seq(seq.0 - 1);
                    if !(first.0..=last.0).all(|missing| covered(&gaps, Seq(missing))) {
                        failures.push(format!(
                            "{} lacks seqs {first}..={last} and nothing explains them ({check})",
                            node.id
                        ));
                    }
                    missing_first = None;
                }
                _ => {}
            }
        }
    }
    failures.finish()
}

/// Every shadow replica (device, every gateway that keeps one, cloud) shows the same JSON.
pub fn check_shadows_converge(world: &World) -> Vec<CheckFailure> {
    let mut failures = Failures::new("shadows_converge");
    for node in &world.devices {
        if world.security.is_cloned(&node.id) {
            continue;
        }
        let device_json = node.disk.live().shadows.get(&node.id).map(|shadow| shadow.to_json());
        let cloud_json = world.cloud.disk.live().shadows.get(&node.id).map(|shadow| shadow.to_json());
        if device_json != cloud_json {
            failures.push(format!("{}: device has {device_json:?}, cloud has {cloud_json:?}", node.id));
            continue;
        }
        for gateway in &world.gateways {
            if let Some(shadow) = gateway.disk.live().shadows.get(&node.id) {
                let gateway_json = Some(shadow.to_json());
                if gateway_json != device_json {
                    failures.push(format!(
                        "{}: gateway {} has {gateway_json:?}, device and cloud have {device_json:?}",
                        node.id, gateway.id
                    ));
                }
            }
        }
    }
    failures.finish()
}

/// The projection folded incrementally as the cloud made events durable equals a fresh fold of
/// the cloud store.
pub fn check_projection(world: &World) -> Vec<CheckFailure> {
    let mut failures = Failures::new("projection");
    let store = &world.cloud.disk.durable().ledger;
    let devices: Vec<_> = store.devices().copied().collect();
    let fresh = Projection::fold_all(devices.iter().flat_map(|device| store.events(device)));
    let live = &world.cloud.projection;
    if *live != fresh {
        for (device, n_fresh) in &fresh.n_events {
            let n_live = live.n_events.get(device).copied().unwrap_or(0);
            if n_live != *n_fresh {
                failures.push(format!("{device}: the projection counted {n_live} events, a fresh fold {n_fresh}"));
            }
        }
        for (key, latest) in &fresh.latest {
            if live.latest.get(key) != Some(latest) {
                failures.push(format!("{key:?}: the projection's latest reading differs from a fresh fold"));
            }
        }
        if failures.found.is_empty() {
            failures.push("the projection has entries a fresh fold does not".to_string());
        }
    }
    failures.finish()
}
