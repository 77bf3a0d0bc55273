//! Event authenticity: each device's hash chain, the seals it signs, and their verification.
//!
//! Gateways relay events they cannot forge. Every device stream is a hash chain: the chain value
//! after seq `n` is `SHA-256(chain(n - 1) || canonical bytes of event n)`, starting from a value
//! derived from the device's name. The chain is a pure function of the events, so any ledger that
//! holds a contiguous run can compute it; nobody stores or sends it per event.
//!
//! A device signs, with its Ed25519 key, the chain value at the last seq of each batch it sends:
//! a [`Seal`]. A batch therefore carries a [`BatchProof`]: the chain value before its first event
//! (`prev`), the seals that fall inside it (a gateway may merge several device batches, keeping
//! every seal), and, when the batch starts with a declared hole, the device-signed [`HoleProof`]
//! saying which seqs it no longer has and what the chain was on both sides of them. The cloud
//! recomputes the chain from `prev` over the events, checks each seal, and checks that `prev` (or,
//! across a hole, the proof's `before`) continues what it already holds. What a gateway could do
//! and how it shows:
//! - forge, alter or reorder events: the recomputed chain differs, so a seal does not verify;
//! - drop events from the middle: seqs are implicit in a batch, so the chain (and seal) breaks;
//! - drop events from the start and call them a hole: the hole needs a device-signed proof;
//! - replay old batches: they are below what the cloud told the gateway it holds (see
//!   `sync::Ingest`), and dedupe by id keeps them from counting twice anyway;
//! - splice two histories, or relay a cloned device's second history (equivocation): both are
//!   signed, but one of them does not continue the chain the cloud holds, or differs from the
//!   events it stored. A hole cannot hide the fork: its proof signs the chain value before the
//!   hole too (`before`), and the cloud compares it with its own when it holds that seq.
//!
//! Continuity across a hole is only as good as that comparison: a hole whose proof starts below
//! what the cloud holds and ends above it (a device that roamed to a gateway that never heard of
//! it, after dropping events the cloud never got) links to nothing the cloud can check.
//!
//! Signing is per batch, not per event, so it costs one signature per few hundred events; hashing
//! is SHA-256 over a few dozen bytes per event.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::event::{DeviceId, Event, EventId, EventKind, Hlc, Millis, Seq};

mod keys;
pub use keys::{
    format_seed, parse_public_key, parse_seed, KeyEntry, KeyRegistry, KeyState, RegistryError, SeedError,
    REGISTRY_HEADER, SEED_BYTES,
};

/// Bytes of a chain value.
pub const CHAIN_BYTES: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Bytes of an Ed25519 public key.
pub const PUBLIC_KEY_BYTES: usize = 32;

const CHAIN_DOMAIN: &[u8] = b"tidesync/chain/v1";
const SEAL_DOMAIN: &[u8] = b"tidesync/seal/v1";
/// Version 2 signs the chain value before the hole as well (version 1 proofs never shipped).
const HOLE_DOMAIN: &[u8] = b"tidesync/hole/v2";

/// A device stream's hash-chain value after some seq.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainHash(pub [u8; CHAIN_BYTES]);

impl ChainHash {
    /// The chain value before a device's first event (seq 0).
    pub fn genesis(device: &DeviceId) -> ChainHash {
        let mut hasher = Sha256::new();
        hasher.update(CHAIN_DOMAIN);
        put_name(&mut hasher, device);
        ChainHash(hasher.finalize().into())
    }

    /// The chain value after `event`, given the value before it.
    pub fn next(&self, event: &Event) -> ChainHash {
        let mut scratch = Vec::new();
        self.next_with(event, &mut scratch)
    }

    /// [`ChainHash::next`] reusing `scratch` for the payload body (no allocation per event).
    pub fn next_with(&self, event: &Event, scratch: &mut Vec<u8>) -> ChainHash {
        scratch.clear();
        event.payload.encode_body(scratch);
        self.next_encoded(&EncodedEvent {
            id: event.id,
            hlc: event.hlc,
            event_time: event.event_time,
            kind: event.kind(),
            schema_version: event.schema_version(),
            body: &scratch[..],
        })
    }

    /// [`ChainHash::next`] over an event whose payload is already encoded: a ledger that stores
    /// encoded bodies chains without decoding them.
    pub fn next_encoded(&self, event: &EncodedEvent<'_>) -> ChainHash {
        let mut hasher = Sha256::new();
        hasher.update(self.0);
        put_name(&mut hasher, &event.id.device);
        hasher.update(event.id.seq.0.to_le_bytes());
        hasher.update(event.hlc.wall_ms.to_le_bytes());
        hasher.update(event.hlc.logical.to_le_bytes());
        hasher.update(event.event_time.0.to_le_bytes());
        hasher.update(event.kind.tag().to_le_bytes());
        hasher.update(event.schema_version.to_le_bytes());
        hasher.update((event.body.len() as u32).to_le_bytes());
        hasher.update(event.body);
        ChainHash(hasher.finalize().into())
    }

    /// The chain value after all of `events`, in order, starting from `self`.
    pub fn over<'a>(self, events: impl IntoIterator<Item = &'a Event>) -> ChainHash {
        let mut scratch = Vec::new();
        events.into_iter().fold(self, |chain, event| chain.next_with(event, &mut scratch))
    }

    /// Lower-case hex, for logs and text files.
    pub fn to_hex(&self) -> alloc::string::String {
        hex(&self.0)
    }
}

/// An event as the chain hashes it, with its payload body already encoded
/// ([`crate::event::Payload::encode_body`]).
#[derive(Clone, Copy, Debug)]
pub struct EncodedEvent<'a> {
    /// The event's id.
    pub id: EventId,
    /// Its clock stamp.
    pub hlc: Hlc,
    /// Its sensor time.
    pub event_time: Millis,
    /// Its payload's kind.
    pub kind: EventKind,
    /// Its payload's schema version.
    pub schema_version: u16,
    /// Its payload's encoded body.
    pub body: &'a [u8],
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight bytes identify a value in a log; the rest is noise.
        write!(f, "ChainHash({}…)", hex(&self.0[..8]))
    }
}

fn hex(bytes: &[u8]) -> alloc::string::String {
    use core::fmt::Write as _;
    let mut out = alloc::string::String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn put_name(hasher: &mut Sha256, device: &DeviceId) {
    let name = device.as_str().as_bytes();
    // Names are at most 64 bytes, so the length fits a byte and the encoding is unambiguous.
    hasher.update([name.len() as u8]);
    hasher.update(name);
}

/// A device's signature over its chain value at `seq`: "my stream up to `seq` hashes to this".
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    /// The seq whose chain value is signed.
    pub seq: Seq,
    /// Ed25519 signature of [`seal_message`].
    pub signature: [u8; SIGNATURE_BYTES],
}

impl fmt::Debug for Seal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Seal(#{} {}…)", self.seq, hex(&self.signature[..6]))
    }
}

/// A device's signed statement that it no longer has seqs `first..=last` (dropped under storage
/// pressure, or pruned after the cloud committed them), that its chain after `first - 1` is
/// `before`, and that its chain after `last` is `chain`. `before` ties the hole to the history in
/// front of it: without it a second history (a cloned key) could start with a hole right after
/// what the cloud holds and be taken for a continuation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HoleProof {
    /// First seq of the hole (at least 1).
    pub first: Seq,
    /// Last seq of the hole.
    pub last: Seq,
    /// The chain value after `first - 1` (genesis when `first` is 1).
    pub before: ChainHash,
    /// The chain value after `last`.
    pub chain: ChainHash,
    /// Ed25519 signature of [`hole_message`].
    pub signature: [u8; SIGNATURE_BYTES],
}

impl fmt::Debug for HoleProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HoleProof({:?} {}..={} {:?})", self.before, self.first, self.last, self.chain)
    }
}

/// What makes a batch verifiable: see the [module documentation](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchProof {
    /// The chain value before the batch's first event.
    pub prev: ChainHash,
    /// Seals on seqs inside the batch, ascending.
    pub seals: Vec<Seal>,
    /// The device's proof of the hole a batch starts with, if it starts with one.
    pub hole: Option<HoleProof>,
}

/// The bytes a seal signs.
pub fn seal_message(device: &DeviceId, seq: Seq, chain: &ChainHash) -> Vec<u8> {
    let mut message = Vec::with_capacity(SEAL_DOMAIN.len() + 1 + 64 + 8 + CHAIN_BYTES);
    message.extend_from_slice(SEAL_DOMAIN);
    put_name_vec(&mut message, device);
    message.extend_from_slice(&seq.0.to_le_bytes());
    message.extend_from_slice(&chain.0);
    message
}

/// The bytes a hole proof signs: `first`, `last`, and the chain values on both sides of the hole.
pub fn hole_message(device: &DeviceId, first: Seq, last: Seq, before: &ChainHash, chain: &ChainHash) -> Vec<u8> {
    let mut message = Vec::with_capacity(HOLE_DOMAIN.len() + 1 + 64 + 16 + 2 * CHAIN_BYTES);
    message.extend_from_slice(HOLE_DOMAIN);
    put_name_vec(&mut message, device);
    message.extend_from_slice(&first.0.to_le_bytes());
    message.extend_from_slice(&last.0.to_le_bytes());
    message.extend_from_slice(&before.0);
    message.extend_from_slice(&chain.0);
    message
}

fn put_name_vec(out: &mut Vec<u8>, device: &DeviceId) {
    let name = device.as_str().as_bytes();
    out.push(name.len() as u8);
    out.extend_from_slice(name);
}

/// A device's signing key. Lives only on the device (and in tests and the simulator).
pub struct DeviceSigner {
    device: DeviceId,
    key: SigningKey,
}

impl fmt::Debug for DeviceSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "DeviceSigner({}, public {})", self.device, hex(&self.public_key()))
    }
}

impl DeviceSigner {
    /// The signer of `device` whose Ed25519 secret key is `seed`.
    pub fn from_seed(device: DeviceId, seed: [u8; 32]) -> Self {
        Self { device, key: SigningKey::from_bytes(&seed) }
    }

    /// The device this key signs for.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The public half, as registered with the cloud.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_BYTES] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs the chain value at `seq`.
    pub fn seal(&self, seq: Seq, chain: &ChainHash) -> Seal {
        let signature = self.key.sign(&seal_message(&self.device, seq, chain));
        Seal { seq, signature: signature.to_bytes() }
    }

    /// Signs the statement that seqs `first..=last` are gone, that the chain before them (after
    /// `first - 1`) is `before` and the chain after them is `chain`.
    pub fn hole(&self, first: Seq, last: Seq, before: ChainHash, chain: ChainHash) -> HoleProof {
        let signature = self.key.sign(&hole_message(&self.device, first, last, &before, &chain));
        HoleProof { first, last, before, chain, signature: signature.to_bytes() }
    }
}

/// Why a public key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The bytes are not an Ed25519 public key (not a curve point, or a weak key).
    #[error("not a valid Ed25519 public key")]
    Invalid,
}

/// The devices' public keys, as the cloud knows them. A device may have several (during a key
/// rotation both the old and the new key verify); a revoked key is simply removed.
#[derive(Clone, Debug, Default)]
pub struct DeviceKeys {
    keys: BTreeMap<DeviceId, Vec<VerifyingKey>>,
    /// Signatures found valid ahead of time, consulted before verifying one.
    verified: Option<Arc<dyn VerifiedSignatures>>,
}

/// Signatures already found valid, filled by a host that verifies batches ahead of time on
/// another core (see [`verified_signatures`]) and consulted by [`verify_batch`] before it spends
/// an Ed25519 verification. An entry is a SHA-256 over the public key, the message and the
/// signature, so it vouches for exactly that triple: an altered event changes the message, a
/// removed key is never asked about, and an entry left over from another batch matches nothing,
/// or costs a verification when it is missing. The record is part of the verifier: only entries
/// from [`verified_signatures`] may go in.
pub trait VerifiedSignatures: Send + Sync + fmt::Debug {
    /// Whether `entry` was recorded; forgets it (each batch's signatures are checked once).
    fn take(&self, entry: &[u8; 32]) -> bool;
}

/// What [`VerifiedSignatures`] holds for one valid signature.
fn verified_entry(key: &VerifyingKey, message: &[u8], signature: &Signature) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"tidesync verified signature v1");
    hasher.update(key.as_bytes());
    hasher.update((message.len() as u64).to_le_bytes());
    hasher.update(message);
    hasher.update(signature.to_bytes());
    hasher.finalize().into()
}

impl DeviceKeys {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a public key of `device`.
    pub fn insert(&mut self, device: DeviceId, public: [u8; PUBLIC_KEY_BYTES]) -> Result<(), KeyError> {
        let key = VerifyingKey::from_bytes(&public).map_err(|_| KeyError::Invalid)?;
        if key.is_weak() {
            return Err(KeyError::Invalid);
        }
        let keys = self.keys.entry(device).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
        Ok(())
    }

    /// Whether `device` has a key.
    pub fn knows(&self, device: &DeviceId) -> bool {
        self.keys.get(device).is_some_and(|keys| !keys.is_empty())
    }

    /// Number of devices with a key.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no device has a key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// These keys, consulting `verified` before each verification.
    pub fn consulting(mut self, verified: Arc<dyn VerifiedSignatures>) -> Self {
        self.verified = Some(verified);
        self
    }

    /// Whether one of `device`'s keys made `signature` over `message`.
    #[cfg(test)]
    fn verifies(&self, device: &DeviceId, message: &[u8], signature: &[u8; SIGNATURE_BYTES]) -> bool {
        self.verifies_with(device, message, signature, &mut Check::Consulting)
    }

    /// Whether one of `device`'s keys made `signature` over `message`, checked as `check` says.
    fn verifies_with(
        &self,
        device: &DeviceId,
        message: &[u8],
        signature: &[u8; SIGNATURE_BYTES],
        check: &mut Check<'_>,
    ) -> bool {
        let signature = Signature::from_bytes(signature);
        self.keys.get(device).is_some_and(|keys| {
            keys.iter().any(|key| match check {
                Check::Consulting => {
                    let known = self
                        .verified
                        .as_ref()
                        .is_some_and(|verified| verified.take(&verified_entry(key, message, &signature)));
                    known || key.verify_strict(message, &signature).is_ok()
                }
                Check::Recording(entries) => {
                    let valid = key.verify_strict(message, &signature).is_ok();
                    if valid {
                        entries.push(verified_entry(key, message, &signature));
                    }
                    valid
                }
            })
        })
    }
}

/// How [`verify_batch_with`] checks a signature.
enum Check<'a> {
    /// Known valid ([`DeviceKeys::consulting`]) or verified now: the cloud deciding.
    Consulting,
    /// Verified now, and each valid one's entry kept: ahead of time, for the cloud to consult.
    Recording(&'a mut Vec<[u8; 32]>),
}

/// What is wrong with a batch, from the cloud's point of view. Each is a security event: it names
/// the device, and the host names the gateway that relayed it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The batch carries no proof, but the device has a key and so must sign.
    #[error("unsigned events")]
    Unsigned,
    /// No key is registered for the device (or all were revoked).
    #[error("no key registered for the device")]
    UnknownDevice,
    /// The batch does not end at a seal, or its seals are not ascending inside it.
    #[error("batch {from}..={last} is not sealed at its end")]
    NotSealed {
        /// First seq covered.
        from: Seq,
        /// Last seq.
        last: Seq,
    },
    /// A seal does not verify over the events: they were forged, altered or reordered, or the
    /// signature was.
    #[error("seal at seq {seq} does not verify: events forged, altered or reordered")]
    BadSeal {
        /// The seal's seq.
        seq: Seq,
    },
    /// The batch starts with a hole the device did not sign: events were cut out.
    #[error("hole {first}..={last} has no valid device proof: events cut out")]
    BadHole {
        /// First seq of the hole.
        first: Seq,
        /// Last seq of the hole.
        last: Seq,
    },
    /// Validly signed events that contradict what the cloud holds for the same seqs: the device
    /// (or a clone with its key) signed two histories.
    #[error("two different signed histories at seq {seq}")]
    Equivocation {
        /// The first seq where they differ (or where the chain stops matching).
        seq: Seq,
    },
    /// Events the gateway was told at the start of its session that the cloud holds.
    #[error("replay of seqs up to {last}, which the gateway knew were committed")]
    Replay {
        /// Last seq of the replayed batch.
        last: Seq,
    },
}

impl Violation {
    /// A short stable name, for counters and the security-event log.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::Unsigned => "unsigned",
            Violation::UnknownDevice => "unknown_device",
            Violation::NotSealed { .. } => "not_sealed",
            Violation::BadSeal { .. } => "bad_seal",
            Violation::BadHole { .. } => "bad_hole",
            Violation::Equivocation { .. } => "equivocation",
            Violation::Replay { .. } => "replay",
        }
    }
}

/// A batch whose proof verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The chain value after the batch's last event.
    pub head: ChainHash,
    /// The chain value after `at`, when `at` was asked for and lies inside the batch.
    pub at: Option<ChainHash>,
    /// For a batch that starts with a hole: the seq before the hole proof's first and the chain
    /// value the device signed for it (the caller compares it with what it holds there).
    pub before: Option<(Seq, ChainHash)>,
}

/// Checks a batch's proof against `keys`: its hole proof, its seals over the recomputed chain.
/// `at` asks for the chain value after that seq too (the caller compares it with what it holds).
/// Pure computation: no IO, no clock.
pub fn verify_batch(
    keys: &DeviceKeys,
    batch: &crate::wire::EventBatch,
    at: Option<Seq>,
) -> Result<Verified, Violation> {
    verify_batch_with(keys, batch, at, &mut Check::Consulting)
}

/// The [`VerifiedSignatures`] entries of the signatures in `batch` that verify, found as
/// [`verify_batch`] would check them (stopping where it would stop). For a host to compute ahead
/// of time, on another core, for the cloud's `keys` to consult.
pub fn verified_signatures(keys: &DeviceKeys, batch: &crate::wire::EventBatch) -> Vec<[u8; 32]> {
    let mut entries = Vec::new();
    // Where a signature fails, the rest are not needed: the batch is refused whatever they say.
    let _ = verify_batch_with(keys, batch, None, &mut Check::Recording(&mut entries));
    entries
}

fn verify_batch_with(
    keys: &DeviceKeys,
    batch: &crate::wire::EventBatch,
    at: Option<Seq>,
    check: &mut Check<'_>,
) -> Result<Verified, Violation> {
    let device = batch.device;
    let Some(proof) = &batch.proof else {
        return Err(if keys.knows(&device) { Violation::Unsigned } else { Violation::UnknownDevice });
    };
    if !keys.knows(&device) {
        return Err(Violation::UnknownDevice);
    }
    let (from, first, last) = (batch.from, batch.first_seq(), batch.last_seq());
    let mut before = None;
    if let Some((hole_first, hole_last)) = batch.dropped() {
        let valid = proof.hole.filter(|hole| {
            hole.first >= Seq::FIRST
                && hole.first <= hole_first
                && hole.last == hole_last
                && hole.chain == proof.prev
                && keys.verifies_with(
                    &device,
                    &hole_message(&device, hole.first, hole.last, &hole.before, &hole.chain),
                    &hole.signature,
                    check,
                )
        });
        let Some(hole) = valid else {
            return Err(Violation::BadHole { first: hole_first, last: hole_last });
        };
        before = Some((Seq(hole.first.0 - 1), hole.before));
    }
    let sealed_in_order = proof.seals.windows(2).all(|pair| pair[0].seq < pair[1].seq)
        && proof.seals.first().is_some_and(|seal| seal.seq >= first)
        && proof.seals.last().is_some_and(|seal| seal.seq == last);
    if !sealed_in_order {
        return Err(Violation::NotSealed { from, last });
    }
    let mut chain = proof.prev;
    let mut at_chain = None;
    let mut seals = proof.seals.iter().peekable();
    let mut scratch = Vec::new();
    for event in &batch.events {
        chain = chain.next_with(event, &mut scratch);
        let seq = event.id.seq;
        if Some(seq) == at {
            at_chain = Some(chain);
        }
        if let Some(seal) = seals.next_if(|seal| seal.seq == seq) {
            if !keys.verifies_with(&device, &seal_message(&device, seq, &chain), &seal.signature, check) {
                return Err(Violation::BadSeal { seq });
            }
        }
    }
    if at == Some(Seq(first.0 - 1)) {
        // Just before the events (after the hole, if there is one): that value is `prev`.
        at_chain = Some(proof.prev);
    }
    Ok(Verified { head: chain, at: at_chain, before })
}

/// Whether two events are the same fact, bit for bit (floats compared by their bits, so a NaN
/// reading equals itself).
pub fn same_event(a: &Event, b: &Event) -> bool {
    let genesis = ChainHash::default();
    a.id == b.id && genesis.next(a) == genesis.next(b)
}

#[cfg(test)]
mod tests;
