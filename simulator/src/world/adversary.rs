//! Event authenticity in the simulated fleet (issue 8, point 4): every device signs what it
//! sends, the cloud verifies before it stores, and, with `--adversaries`, an evil gateway tampers
//! with what it relays and a cloned device signs a second history under another device's key.
//!
//! The ground truth is recorded as it happens ([`Attack`]) and the cloud's security events are
//! collected from its sessions ([`SeenViolation`]); [`check_security`] then asks:
//! - every attack the cloud's session examined raised a violation naming that device and that
//!   gateway, of a kind that fits the attack (an attack is made where the evil gateway's frames
//!   enter the cloud's session, which is what tampering just before a loss-free send would be; so
//!   the ground truth knows whether the session looked at it or dropped it unread as out of order);
//! - no violation is unexplained (an honest run has none at all);
//! - no attacked data is stored: every stored event equals the genuine device's event (the
//!   exactly-once check compares each with what the device made durable), and the cloned
//!   identity's stored events all come from one of its two histories.
//!
//! Devices whose batches were refused may stay behind (the evil gateway holds them), so the
//! convergence checks let exactly those devices lag: their events may be missing above the
//! cloud's contiguous high, nothing else. The cloned pair is left out of the per-device checks
//! and checked here instead.
//!
//! Randomness: keys and attacks draw from their own streams of the run's seed
//! ([`KEY_STREAM`], [`ADVERSARY_STREAM`]), so enabling adversaries does not move the fault draws.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tidesync_core::auth::{DeviceKeys, DeviceSigner, Seal, Violation};
use tidesync_core::event::{DeviceId, EventId, GatewayId, Millis, Payload, Seq};
use tidesync_core::ledger::Ledger;
use tidesync_core::sync::{batch::EventBatch, Ingest, MemStore, SessionError};
use tidesync_core::wire::{Frame, BATCH_EVENTS_MAX};

use super::ahead::VerifyAhead;
use super::{device_store, Action, Device, LinkState, World, RECONNECT_MS_MIN, START_WALL};
use crate::check::CheckFailure;
use crate::dice;
use crate::digest::event_hash;

/// Stream of the run's seed the device keys are drawn from.
pub const KEY_STREAM: u64 = 0x6b65_7973;
/// Stream of the run's seed the adversaries draw from.
pub const ADVERSARY_STREAM: u64 = 0x6576_696c;
/// Old batches the evil gateway keeps to replay or splice later.
const CAPTURED_MAX: usize = 32;
/// Smallest storage budget (events) a cloned pair short of storage is drawn.
const CLONE_STORAGE_EVENTS_MIN: u64 = 8;
/// Largest storage budget (events) a cloned pair short of storage is drawn.
const CLONE_STORAGE_EVENTS_MAX: u64 = 40;
/// Most failures of one kind the security check reports.
const FAILURES_MAX: usize = 8;

/// One attack of a compromised gateway (issue 8, point 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttackKind {
    /// An event the device never recorded, appended to a sealed run (the last seal moved to it).
    Forge,
    /// A reading's value (or another event's sensor time) changed.
    Alter,
    /// Two neighbouring events swapped.
    Reorder,
    /// Events cut out of the middle of a batch (the rest close up, as implicit seqs do).
    CutMiddle,
    /// Events cut from the start of a batch and declared a hole.
    CutStart,
    /// The device's proof removed.
    StripProof,
    /// A batch the cloud committed before, sent again in a later session.
    Replay,
    /// Another device's signed events spliced into the batch under this device's name.
    Splice,
}

impl AttackKind {
    /// Every kind, in a fixed order.
    pub const ALL: [AttackKind; 8] = [
        AttackKind::Forge,
        AttackKind::Alter,
        AttackKind::Reorder,
        AttackKind::CutMiddle,
        AttackKind::CutStart,
        AttackKind::StripProof,
        AttackKind::Replay,
        AttackKind::Splice,
    ];

    /// A short stable name.
    pub fn name(self) -> &'static str {
        match self {
            AttackKind::Forge => "forge",
            AttackKind::Alter => "alter",
            AttackKind::Reorder => "reorder",
            AttackKind::CutMiddle => "cut-middle",
            AttackKind::CutStart => "cut-start",
            AttackKind::StripProof => "strip-proof",
            AttackKind::Replay => "replay",
            AttackKind::Splice => "splice",
        }
    }

    /// Whether `violation` is what the cloud should answer this attack with.
    fn fits(self, violation: &Violation) -> bool {
        match self {
            AttackKind::Alter | AttackKind::Reorder => matches!(violation, Violation::BadSeal { .. }),
            AttackKind::Forge | AttackKind::CutMiddle | AttackKind::Splice => {
                matches!(violation, Violation::BadSeal { .. } | Violation::NotSealed { .. })
            }
            AttackKind::CutStart => matches!(violation, Violation::BadHole { .. }),
            AttackKind::StripProof => matches!(violation, Violation::Unsigned),
            AttackKind::Replay => matches!(violation, Violation::Replay { .. }),
        }
    }
}

/// The adversaries of one run, drawn from the seed. Printed with the drawn faults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrawnAdversaries {
    /// The gateway that tampers with what it relays.
    pub evil_gateway: usize,
    /// Chance it attacks a batch it relays, in percent.
    pub attack_percent: u32,
    /// The device whose identity and key are cloned, if any.
    pub cloned_device: Option<usize>,
    /// The gateway the clone talks through (never the original's).
    pub clone_gateway: usize,
    /// The cloned pair's storage budget in events, if small (both drop their oldest events and
    /// declare holes under pressure).
    pub clone_storage_events_max: Option<usize>,
}

impl fmt::Display for DrawnAdversaries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "  evil gateway g{:03} attacks {} % of the batches it relays",
            self.evil_gateway, self.attack_percent
        )?;
        match self.cloned_device {
            Some(device) => write!(f, ", device d{device:05} cloned behind gateway g{:03}", self.clone_gateway)?,
            None => write!(f, ", no cloned device")?,
        }
        match self.clone_storage_events_max {
            Some(events_max) => write!(f, " (the pair keeps at most {events_max} events)"),
            None => Ok(()),
        }
    }
}

/// An attack, as the ground truth records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attack {
    /// When.
    pub at: Millis,
    /// The gateway that made it (index).
    pub gateway: usize,
    /// The device whose stream it attacked.
    pub device: DeviceId,
    /// What it did.
    pub kind: AttackKind,
    /// The seqs it touched.
    pub seqs: (Seq, Seq),
    /// Whether the cloud's session examined the batch (it drops a batch that arrives after a
    /// lost one unread, and ignores frames on a closed session).
    pub examined: bool,
}

/// A security event the cloud reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenViolation {
    /// When.
    pub at: Millis,
    /// The session's gateway (index).
    pub gateway: usize,
    /// The gateway the violation names.
    pub named: Option<GatewayId>,
    /// The device it names.
    pub device: DeviceId,
    /// What was wrong.
    pub violation: Violation,
}

/// Figures of a run's security, for the report and the tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecurityReport {
    /// The drawn adversaries, if enabled.
    pub drawn: Option<DrawnAdversaries>,
    /// Attacks made, by kind (examined or not).
    pub attacks: BTreeMap<AttackKind, u64>,
    /// Attacks the cloud's session examined, by kind.
    pub examined: BTreeMap<AttackKind, u64>,
    /// Examined attacks answered by a fitting violation naming device and gateway, by kind.
    pub detected: BTreeMap<AttackKind, u64>,
    /// Violations the cloud reported, by [`Violation::kind`].
    pub violations: BTreeMap<&'static str, u64>,
    /// Equivocations naming the cloned identity.
    pub clone_equivocations: u64,
    /// Devices allowed to lag because their batches were refused.
    pub n_lagging: usize,
}

impl SecurityReport {
    /// Attacks examined over all kinds.
    pub fn n_examined(&self) -> u64 {
        self.examined.values().sum()
    }

    /// Attacks detected over all kinds.
    pub fn n_detected(&self) -> u64 {
        self.detected.values().sum()
    }
}

impl fmt::Display for SecurityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n_violations: u64 = self.violations.values().sum();
        write!(f, "security: {n_violations} violations")?;
        if self.drawn.is_some() {
            write!(f, "; attacks (made/examined/detected):")?;
            for kind in AttackKind::ALL {
                let get = |map: &BTreeMap<AttackKind, u64>| map.get(&kind).copied().unwrap_or(0);
                write!(f, " {} {}/{}/{}", kind.name(), get(&self.attacks), get(&self.examined), get(&self.detected))?;
            }
            write!(f, "; clone equivocations {}; lagging devices {}", self.clone_equivocations, self.n_lagging)?;
        }
        Ok(())
    }
}

/// A batch the evil gateway relayed untouched, kept to replay or splice.
#[derive(Debug)]
struct Captured {
    conn: u64,
    batch: EventBatch,
}

/// The evil gateway's state and the adversaries' random stream.
#[derive(Debug)]
struct Adversary {
    drawn: DrawnAdversaries,
    rng: ChaCha8Rng,
    captured: Vec<Captured>,
    /// What the cloud's welcome told each of the evil gateway's connections it holds.
    welcomed: BTreeMap<u64, BTreeMap<DeviceId, Seq>>,
}

/// Keys, the adversaries and what they did: the security half of the world.
#[derive(Debug, Default)]
pub(crate) struct Security {
    /// Per device index, its secret key seed (a clone has its original's).
    seeds: Vec<[u8; 32]>,
    /// The devices' keys, as the cloud verifies with them (consulting `ahead` when there is one).
    keys: Arc<DeviceKeys>,
    /// Devices' signatures verified as they send, on another core
    /// ([`crate::options::SimOptions::verify_ahead`]).
    ahead: Option<VerifyAhead>,
    /// `--unsigned`: devices do not sign and the cloud does not verify.
    unsigned: bool,
    adversary: Option<Adversary>,
    /// The cloned identity.
    cloned: Option<DeviceId>,
    /// Devices the evil gateway attacked (their batches may be held back).
    lagging: BTreeSet<DeviceId>,
    pub(crate) attacks: Vec<Attack>,
    pub(crate) violations: Vec<SeenViolation>,
}

impl Security {
    /// The uplink of device `device` (index), signing with its key.
    pub(super) fn signer(&self, device: usize, id: DeviceId) -> Option<DeviceSigner> {
        if self.unsigned {
            return None;
        }
        self.seeds.get(device).map(|seed| DeviceSigner::from_seed(id, *seed))
    }

    /// The cloud's ingest, verifying (unless the run deliberately breaks it).
    pub(super) fn cloud_ingest(&self, ingest: Ingest, skip_verify: bool) -> Ingest {
        if skip_verify || self.unsigned {
            ingest
        } else {
            ingest.verifying(self.keys.clone())
        }
    }

    /// Hands a batch a device sends to the verifier that works ahead, if there is one.
    pub(super) fn verify_ahead(&self, batch: &EventBatch) {
        if let Some(ahead) = &self.ahead {
            ahead.submit(batch);
        }
    }

    /// Signatures the cloud found verified ahead instead of verifying them itself.
    pub(crate) fn n_verified_ahead(&self) -> u64 {
        self.ahead.as_ref().map_or(0, VerifyAhead::n_taken)
    }

    /// Whether `device`'s events may stay behind in the cloud (refused batches held by a
    /// gateway, or a cloned identity).
    pub(crate) fn may_lag(&self, device: &DeviceId) -> bool {
        self.lagging.contains(device) || self.cloned == Some(*device)
    }

    /// Whether `device` is the cloned identity (checked by [`check_security`], not per device).
    pub(crate) fn is_cloned(&self, device: &DeviceId) -> bool {
        self.cloned == Some(*device)
    }

    /// Whether `id` must not roam: the cloned pair talks through two different gateways.
    pub(super) fn pinned(&self, id: &DeviceId) -> bool {
        self.is_cloned(id)
    }

    /// A violation the cloud's session with `gateway` reported.
    pub(super) fn seen(
        &mut self,
        at: Millis,
        gateway: usize,
        named: Option<GatewayId>,
        device: DeviceId,
        violation: Violation,
    ) {
        tracing::debug!(%device, ?named, %violation, "security event at the cloud");
        self.violations.push(SeenViolation { at, gateway, named, device, violation });
    }

    /// Hands a frame from `gateway`'s connection `conn` to the cloud's session. The evil gateway's
    /// frames may be attacked on the way (see the module documentation).
    pub(super) fn deliver_to_cloud(
        &mut self,
        now: Millis,
        gateway: usize,
        conn: u64,
        frame: Frame,
        session: &mut Ingest,
        store: &mut MemStore,
    ) -> Result<(), SessionError> {
        let Some(adversary) = self.adversary.as_mut().filter(|adversary| adversary.drawn.evil_gateway == gateway)
        else {
            return session.handle_frame(now, frame, store);
        };
        let batch = match frame {
            Frame::Hello(hello) => {
                let welcomed = hello.vv.iter().map(|(device, _)| (*device, store.high(device))).collect();
                adversary.welcomed.insert(conn, welcomed);
                return session.handle_frame(now, Frame::Hello(hello), store);
            }
            Frame::Events(batch) => batch,
            frame => return session.handle_frame(now, frame, store),
        };
        let attackable = session.is_established()
            && self.cloned != Some(batch.device)
            && batch.proof.is_some()
            && dice::chance(&mut adversary.rng, adversary.drawn.attack_percent);
        if !attackable {
            if self.cloned != Some(batch.device) && batch.proof.is_some() {
                adversary.capture(conn, &batch);
            }
            return session.handle_frame(now, Frame::Events(batch), store);
        }
        let start = dice::index(&mut adversary.rng, AttackKind::ALL.len());
        for offset in 0..AttackKind::ALL.len() {
            let kind = AttackKind::ALL[(start + offset) % AttackKind::ALL.len()];
            if kind == AttackKind::Replay {
                let Some(old) = adversary.replayable(conn) else {
                    continue;
                };
                let seqs = (old.from, old.last_seq());
                let device = old.device;
                let examined = examine(session, |session| session.handle_frame(now, Frame::Events(old), store))?;
                self.record(Attack { at: now, gateway, device, kind, seqs, examined });
                return session.handle_frame(now, Frame::Events(batch), store);
            }
            let mut tampered = batch.clone();
            let Some(seqs) = adversary.tamper(kind, &mut tampered) else {
                continue;
            };
            let device = tampered.device;
            let examined = examine(session, |session| session.handle_frame(now, Frame::Events(tampered), store))?;
            self.record(Attack { at: now, gateway, device, kind, seqs, examined });
            return Ok(());
        }
        session.handle_frame(now, Frame::Events(batch), store)
    }

    fn record(&mut self, attack: Attack) {
        tracing::debug!(?attack, "evil gateway attacks");
        if attack.examined {
            self.lagging.insert(attack.device);
        }
        self.attacks.push(attack);
    }

    /// The report's figures.
    pub(crate) fn report(&self) -> SecurityReport {
        let mut report = SecurityReport {
            drawn: self.adversary.as_ref().map(|adversary| adversary.drawn.clone()),
            n_lagging: self.lagging.len(),
            ..SecurityReport::default()
        };
        for attack in &self.attacks {
            *report.attacks.entry(attack.kind).or_default() += 1;
            if attack.examined {
                *report.examined.entry(attack.kind).or_default() += 1;
            }
        }
        let (detected, _) = self.match_attacks();
        for (attack, _) in self.attacks.iter().zip(detected).filter(|(_, detected)| *detected) {
            *report.detected.entry(attack.kind).or_default() += 1;
        }
        for seen in &self.violations {
            *report.violations.entry(seen.violation.kind()).or_default() += 1;
            if self.is_cloned(&seen.device) && matches!(seen.violation, Violation::Equivocation { .. }) {
                report.clone_equivocations += 1;
            }
        }
        report
    }

    /// Pairs examined attacks with the violations that answered them: same time, same session,
    /// same device, a fitting kind. Returns whether each attack was detected, and the violations
    /// no attack explains.
    fn match_attacks(&self) -> (Vec<bool>, Vec<&SeenViolation>) {
        let mut unmatched: Vec<&SeenViolation> = self.violations.iter().collect();
        let mut detected = vec![false; self.attacks.len()];
        for (index, attack) in self.attacks.iter().enumerate().filter(|(_, attack)| attack.examined) {
            let answer = unmatched.iter().position(|seen| {
                seen.at == attack.at
                    && seen.gateway == attack.gateway
                    && seen.device == attack.device
                    && attack.kind.fits(&seen.violation)
            });
            if let Some(answer) = answer {
                unmatched.remove(answer);
                detected[index] = true;
            }
        }
        (detected, unmatched)
    }
}

/// Runs `deliver` and tells whether the session examined the batch: it was open, and did not
/// drop the batch unread as arriving after a lost one.
fn examine(
    session: &mut Ingest,
    deliver: impl FnOnce(&mut Ingest) -> Result<(), SessionError>,
) -> Result<bool, SessionError> {
    let open = session.is_established();
    let n_out_of_order = session.n_out_of_order();
    deliver(session)?;
    Ok(open && session.n_out_of_order() == n_out_of_order)
}

impl Adversary {
    fn capture(&mut self, conn: u64, batch: &EventBatch) {
        if self.captured.len() == CAPTURED_MAX {
            let index = dice::index(&mut self.rng, CAPTURED_MAX);
            self.captured.swap_remove(index);
        }
        self.captured.push(Captured { conn, batch: batch.clone() });
    }

    /// An old batch that an earlier connection relayed and that the cloud told connection `conn`
    /// it holds.
    fn replayable(&mut self, conn: u64) -> Option<EventBatch> {
        let welcomed = self.welcomed.get(&conn)?;
        let candidates: Vec<usize> = (0..self.captured.len())
            .filter(|index| {
                let old = &self.captured[*index];
                old.conn != conn && welcomed.get(&old.batch.device).is_some_and(|high| old.batch.last_seq() <= *high)
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let pick = candidates[dice::index(&mut self.rng, candidates.len())];
        Some(self.captured[pick].batch.clone())
    }

    /// Applies `kind` to `batch`; returns the seqs touched, or `None` if the batch does not allow
    /// it (too short, nothing to splice in).
    fn tamper(&mut self, kind: AttackKind, batch: &mut EventBatch) -> Option<(Seq, Seq)> {
        let n_events = batch.events.len();
        batch.proof.as_ref()?;
        match kind {
            AttackKind::Forge => {
                if n_events >= BATCH_EVENTS_MAX {
                    return None;
                }
                let mut forged = batch.events.last()?.clone();
                forged.id.seq = forged.id.seq.next();
                forged.hlc.logical = forged.hlc.logical.wrapping_add(1);
                if let Payload::Reading(reading) = &mut forged.payload {
                    reading.value = -reading.value - 1.0;
                }
                let seq = forged.id.seq;
                batch.events.push(forged);
                // The forger keeps the batch looking sealed at its end.
                move_last_seal(batch, seq);
                Some((seq, seq))
            }
            AttackKind::Alter => {
                let index = dice::index(&mut self.rng, n_events);
                let event = &mut batch.events[index];
                match &mut event.payload {
                    Payload::Reading(reading) => reading.value += 1.0,
                    _ => event.event_time = Millis(event.event_time.0 ^ 1),
                }
                Some((event.id.seq, event.id.seq))
            }
            AttackKind::Reorder => {
                if n_events < 2 {
                    return None;
                }
                let index = dice::index(&mut self.rng, n_events - 1);
                let (first, second) = (batch.events[index].id, batch.events[index + 1].id);
                batch.events.swap(index, index + 1);
                batch.events[index].id = first;
                batch.events[index + 1].id = second;
                Some((first.seq, second.seq))
            }
            AttackKind::CutMiddle => {
                if n_events < 3 {
                    return None;
                }
                // Keep at least the first and the last event.
                let start = 1 + dice::index(&mut self.rng, n_events - 2);
                let n_cut = 1 + dice::index(&mut self.rng, n_events - 1 - start);
                let cut: Vec<_> = batch.events.drain(start..start + n_cut).collect();
                let seqs = (cut[0].id.seq, cut[n_cut - 1].id.seq);
                // Seqs are implicit on the wire: what follows the cut closes up.
                for event in &mut batch.events[start..] {
                    event.id.seq = Seq(event.id.seq.0 - n_cut as u64);
                }
                let last = batch.last_seq();
                move_last_seal(batch, last);
                if let Some(proof) = batch.proof.as_mut() {
                    proof.seals.retain(|seal| seal.seq < seqs.0 || seal.seq == last);
                }
                Some(seqs)
            }
            AttackKind::CutStart => {
                if n_events < 2 {
                    return None;
                }
                let n_cut = 1 + dice::index(&mut self.rng, n_events - 1);
                let cut: Vec<_> = batch.events.drain(..n_cut).collect();
                let seqs = (cut[0].id.seq, cut[n_cut - 1].id.seq);
                if let Some(proof) = batch.proof.as_mut() {
                    // The chain is a pure function of the events, so the cutter can move `prev`
                    // past what it cut; only the hole's proof needs the device's key.
                    proof.prev = proof.prev.over(&cut);
                    proof.seals.retain(|seal| seal.seq > seqs.1);
                }
                Some(seqs)
            }
            AttackKind::StripProof => {
                batch.proof = None;
                Some((batch.from, batch.last_seq()))
            }
            AttackKind::Replay => None,
            AttackKind::Splice => {
                let donors: Vec<usize> = (0..self.captured.len())
                    .filter(|index| self.captured[*index].batch.device != batch.device)
                    .collect();
                if donors.is_empty() || n_events >= BATCH_EVENTS_MAX {
                    return None;
                }
                let donor = &self.captured[donors[dice::index(&mut self.rng, donors.len())]].batch;
                let room = BATCH_EVENTS_MAX - n_events;
                let first_spliced = batch.last_seq().next();
                let offset = first_spliced.0.wrapping_sub(donor.first_seq().0);
                for event in donor.events.iter().take(room) {
                    let mut event = event.clone();
                    event.id = EventId { device: batch.device, seq: Seq(event.id.seq.0.wrapping_add(offset)) };
                    batch.events.push(event);
                }
                let last = batch.last_seq();
                if let (Some(proof), Some(donor_proof)) = (batch.proof.as_mut(), donor.proof.as_ref()) {
                    // The donor's signatures come along, moved to the seqs they now sit at.
                    let moved = donor_proof
                        .seals
                        .iter()
                        .map(|seal| Seal { seq: Seq(seal.seq.0.wrapping_add(offset)), ..*seal });
                    proof.seals.extend(moved.filter(|seal| seal.seq <= last));
                }
                move_last_seal(batch, last);
                Some((first_spliced, last))
            }
        }
    }
}

/// Makes the batch's last seal claim `last`, as a tamperer that wants the batch to look sealed
/// at its end does.
fn move_last_seal(batch: &mut EventBatch, last: Seq) {
    if let Some(proof) = batch.proof.as_mut() {
        proof.seals.retain(|seal| seal.seq <= last);
        if let Some(seal) = proof.seals.last_mut() {
            seal.seq = last;
        }
    }
}

impl World {
    /// Gives every device its key and, with `--adversaries`, draws the evil gateway and the
    /// cloned device (added as one more device with its original's identity and key).
    pub(super) fn arm_security(&mut self) {
        self.security.unsigned = self.options.unsigned;
        let mut keys_rng = ChaCha8Rng::seed_from_u64(self.options.seed);
        keys_rng.set_stream(KEY_STREAM);
        let mut keys = DeviceKeys::new();
        for device in &self.devices {
            let mut seed = [0u8; 32];
            keys_rng.fill_bytes(&mut seed);
            let signer = DeviceSigner::from_seed(device.id, seed);
            if keys.insert(device.id, signer.public_key()).is_err() {
                self.anomalies.push(format!("the key drawn for {} is not a valid Ed25519 key", device.id));
            }
            self.security.seeds.push(seed);
        }
        let keys = Arc::new(keys);
        self.security.keys = keys.clone();
        if self.options.verify_ahead && !self.options.unsigned && !self.options.bugs.skip_verify {
            let ahead = VerifyAhead::start(keys.clone());
            self.security.keys = ahead.consulted_by(&keys);
            self.security.ahead = Some(ahead);
        }
        if !self.options.adversaries {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.options.seed);
        rng.set_stream(ADVERSARY_STREAM);
        let n_gateways = self.gateways.len();
        let evil_gateway = dice::index(&mut rng, n_gateways);
        let attack_percent = dice::range(&mut rng, 10, 40) as u32;
        let clone_wanted = dice::chance(&mut rng, 50);
        let cloned_device = (clone_wanted && n_gateways > 1 && !self.devices.is_empty())
            .then(|| dice::index(&mut rng, self.devices.len()));
        let mut clone_gateway = 0;
        let mut clone_storage_events_max = None;
        if let Some(original) = cloned_device {
            let home = self.devices[original].home;
            clone_gateway = (home + 1 + dice::index(&mut rng, n_gateways - 1)) % n_gateways;
            // Half the clones run short of storage, so that they declare holes (the fork may then
            // sit right behind a hole; its proof still shows it).
            if dice::chance(&mut rng, 50) {
                let events_max = dice::range(&mut rng, CLONE_STORAGE_EVENTS_MIN, CLONE_STORAGE_EVENTS_MAX) as usize;
                self.devices[original].storage_events_max = Some(events_max);
                clone_storage_events_max = Some(events_max);
            }
            self.add_clone(original, clone_gateway, &mut rng);
        }
        let drawn =
            DrawnAdversaries { evil_gateway, attack_percent, cloned_device, clone_gateway, clone_storage_events_max };
        self.drawn.adversaries = Some(drawn.clone());
        self.security.adversary = Some(Adversary { drawn, rng, captured: Vec::new(), welcomed: BTreeMap::new() });
    }

    /// One more device with `original`'s identity and key, behind another gateway, with the
    /// original's storage budget: under pressure both drop their oldest events and declare holes.
    /// A hole proof signs the chain in front of the hole, so a clone's batch that starts with a
    /// hole right after what the cloud holds is still refused as an equivocation.
    fn add_clone(&mut self, original: usize, gateway: usize, rng: &mut ChaCha8Rng) {
        let id = self.devices[original].id;
        let clone = self.devices.len();
        let storage_events_max = self.devices[original].storage_events_max;
        let clock_offset_ms = self.devices[original].clock_offset_ms + dice::range(rng, 1, 30_000) as i64;
        self.devices.push(Device {
            id,
            disk: crate::disk::SimDisk::new(device_store(id)),
            up: true,
            home: gateway,
            session: None,
            link: LinkState::default(),
            clock_offset_ms,
            rtc_reset_at: None,
            storage_events_max,
            backoff_ms: RECONNECT_MS_MIN,
            connect_pending: false,
            n_readings: 0,
        });
        self.oracle.push(Vec::new());
        self.drops.push(Vec::new());
        let seed = self.security.seeds[original];
        self.security.seeds.push(seed);
        self.security.cloned = Some(id);
        let interval_ms = self.options.reading_interval_ms.max(1);
        let first = dice::range(rng, 0, interval_ms - 1);
        self.schedule(START_WALL.plus_ms(first), Action::Reading(clone));
        self.schedule(START_WALL.plus_ms(first), Action::DeviceCommit(clone));
        self.schedule(START_WALL, Action::ConnectDevice(clone));
    }

    /// The security figures so far.
    pub fn security_report(&self) -> SecurityReport {
        self.security.report()
    }
}

/// The security checks (see the module documentation).
pub fn check_security(world: &World) -> Vec<CheckFailure> {
    let mut failures = Vec::new();
    let mut push = |check: &'static str, detail: String, count: &mut usize| {
        *count += 1;
        if *count <= FAILURES_MAX {
            failures.push(CheckFailure { check, detail });
        }
    };
    let security = &world.security;
    let gateway_name = |gateway: usize| world.gateways.get(gateway).map(|node| node.id);
    let (detected, unexplained) = security.match_attacks();
    let mut n_undetected = 0;
    for (attack, detected) in security.attacks.iter().zip(detected) {
        if attack.examined && !detected {
            push(
                "attacks_detected",
                format!(
                    "{} of {} seqs {}..={} through gateway g{:03} at {} ms went undetected",
                    attack.kind.name(),
                    attack.device,
                    attack.seqs.0,
                    attack.seqs.1,
                    attack.gateway,
                    attack.at.since(START_WALL)
                ),
                &mut n_undetected,
            );
        }
    }
    let mut n_false = 0;
    for seen in unexplained {
        let clone = security.is_cloned(&seen.device) && matches!(seen.violation, Violation::Equivocation { .. });
        if !clone {
            push(
                "no_false_alarms",
                format!(
                    "violation {} for {} through {:?} at {} ms: no attack explains it",
                    seen.violation,
                    seen.device,
                    seen.named,
                    seen.at.since(START_WALL)
                ),
                &mut n_false,
            );
        }
    }
    let mut n_misnamed = 0;
    for seen in &security.violations {
        if seen.named != gateway_name(seen.gateway) {
            push(
                "violations_name_the_gateway",
                format!("violation for {} names {:?}, the session is g{:03}'s", seen.device, seen.named, seen.gateway),
                &mut n_misnamed,
            );
        }
    }
    let mut n_attacked = 0;
    for attacked in stored_attacked_data(world) {
        push("no_attacked_data", attacked, &mut n_attacked);
    }
    if let Some(detail) = check_clone(world) {
        push("cloned_device", detail, &mut 0);
    }
    failures
}

/// Stored events of attacked streams that differ from what the genuine device made durable.
fn stored_attacked_data(world: &World) -> Vec<String> {
    let store = &world.cloud.disk.durable().ledger;
    let mut found = Vec::new();
    for attack in &world.security.attacks {
        let Some(device) = world.devices.iter().position(|node| node.id == attack.device) else {
            continue;
        };
        if world.security.is_cloned(&attack.device) {
            continue;
        }
        for seq in attack.seqs.0 .0..=attack.seqs.1 .0 {
            let id = EventId { device: attack.device, seq: Seq(seq) };
            let Some(stored) = store.get(&id) else {
                continue;
            };
            let genuine = world.oracle[device].get(seq as usize - 1).copied();
            if genuine != Some(event_hash(stored)) {
                found.push(format!("{id} in the cloud is not the device's event ({} attack)", attack.kind.name()));
            }
        }
    }
    found
}

/// The cloned identity: the store holds one of its two histories, unmixed, and once the other
/// history exists the cloud has refused it as an equivocation.
fn check_clone(world: &World) -> Option<String> {
    let id = world.security.cloned?;
    let copies: Vec<usize> = (0..world.devices.len()).filter(|index| world.devices[*index].id == id).collect();
    let store = &world.cloud.disk.durable().ledger;
    let stored: Vec<(Seq, u64)> = store.events(&id).map(|event| (event.id.seq, event_hash(event))).collect();
    if stored.is_empty() {
        return None;
    }
    let from_copy =
        |copy: usize| stored.iter().all(|(seq, hash)| world.oracle[copy].get(seq.0 as usize - 1) == Some(hash));
    let winners: Vec<usize> = copies.iter().copied().filter(|copy| from_copy(*copy)).collect();
    if winners.is_empty() {
        return Some(format!("the cloud holds {} events of cloned {id} mixed from both histories", stored.len()));
    }
    let second_history = copies.iter().any(|copy| !winners.contains(copy) && !world.oracle[*copy].is_empty());
    let equivocations = world
        .security
        .violations
        .iter()
        .filter(|seen| seen.device == id && matches!(seen.violation, Violation::Equivocation { .. }))
        .count();
    if second_history && equivocations == 0 {
        return Some(format!("cloned {id}: the second signed history never raised an equivocation"));
    }
    None
}
