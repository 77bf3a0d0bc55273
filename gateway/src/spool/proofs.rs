//! What the spool keeps of each appended batch's proof (see `tidesync_core::auth`), one row per
//! batch: the chain value before its first event, its seals and its hole proof, and their
//! encoding in the `proofs` table.
//!
//! A row covers the seqs `first..=last` of the part of a batch that was new to the spool. Rows of
//! one device never overlap (each starts after what the spool covered when it was written), so
//! the row holding a seq is the last one starting at or before it.

use tidesync_core::auth::{BatchProof, ChainHash, HoleProof, Seal, CHAIN_BYTES, SIGNATURE_BYTES};
use tidesync_core::event::Seq;
use tidesync_core::wire::EventBatch;

/// Bytes of one stored seal: seq (u64 LE) and signature.
const SEAL_BYTES: usize = 8 + SIGNATURE_BYTES;
/// Bytes of a stored hole proof: first, last (u64 LE), the chain before and after the hole, and
/// the signature. The earlier layout without the chain before (112 bytes) never shipped; such a
/// row reads as corrupt, since its signature could not verify at the cloud anyway.
const HOLE_BYTES: usize = 16 + 2 * CHAIN_BYTES + SIGNATURE_BYTES;

/// One stored batch proof.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProofRow {
    /// First event's seq.
    pub(crate) first: Seq,
    /// Last event's seq.
    pub(crate) last: Seq,
    /// The chain value before `first`.
    pub(crate) prev: ChainHash,
    /// Seals on seqs in `first..=last`, ascending.
    pub(crate) seals: Vec<Seal>,
    /// The device's proof of the hole just before `first`, if the batch started with one.
    pub(crate) hole: Option<HoleProof>,
}

impl ProofRow {
    /// The row for what is new in `batch` to a spool covering up to `held`, if the batch has a
    /// proof and something new. Like `EventBatch::after`, without copying the events: `prev`
    /// moves past events already held, seals on them go, and the hole proof stays only if the new
    /// part still starts with the hole.
    pub(crate) fn of_fresh(batch: &EventBatch, held: Seq) -> Option<ProofRow> {
        let proof = batch.proof.as_ref()?;
        let last = batch.last_seq();
        if last <= held {
            return None;
        }
        let skipped = batch.events.iter().take_while(|event| event.id.seq <= held);
        let (prev, first) = if batch.first_seq() > held {
            (proof.prev, batch.first_seq())
        } else {
            (proof.prev.over(skipped), held.next())
        };
        let from = held.next().max(batch.from);
        Some(ProofRow {
            first,
            last,
            prev,
            seals: proof.seals.iter().filter(|seal| seal.seq >= first && seal.seq <= last).copied().collect(),
            hole: proof.hole.filter(|hole| from < first && hole.last == Seq(first.0 - 1)),
        })
    }

    /// The part of this row after `up_to` (inside it), whose chain before is `chain`: what is
    /// left once the events up to `up_to` are pruned.
    pub(crate) fn after(&self, up_to: Seq, chain: ChainHash) -> ProofRow {
        ProofRow {
            first: up_to.next(),
            last: self.last,
            prev: chain,
            seals: self.seals.iter().filter(|seal| seal.seq > up_to).copied().collect(),
            hole: None,
        }
    }
}

/// The proof of a batch read from the spool: `prev` is the chain before `first` (its first
/// event), `from` the seq the batch covers from (before `first` when it starts with a hole), and
/// `rows` the stored rows from the one holding `first` on.
pub(crate) fn batch_proof(prev: ChainHash, from: Seq, first: Seq, last: Seq, rows: &[ProofRow]) -> BatchProof {
    let seals = rows
        .iter()
        .flat_map(|row| row.seals.iter())
        .filter(|seal| seal.seq >= first && seal.seq <= last)
        .copied()
        .collect();
    let hole = rows
        .iter()
        .find(|row| row.first == first)
        .and_then(|row| row.hole)
        .filter(|hole| from < first && hole.first <= from && hole.last == Seq(first.0 - 1));
    BatchProof { prev, seals, hole }
}

/// The seals as stored: `(seq, signature)` back to back.
pub(crate) fn encode_seals(seals: &[Seal]) -> Vec<u8> {
    let mut out = Vec::with_capacity(seals.len() * SEAL_BYTES);
    for seal in seals {
        out.extend_from_slice(&seal.seq.0.to_le_bytes());
        out.extend_from_slice(&seal.signature);
    }
    out
}

/// Stored seals back, or `None` if the bytes are not a whole number of seals.
pub(crate) fn decode_seals(bytes: &[u8]) -> Option<Vec<Seal>> {
    if bytes.len() % SEAL_BYTES != 0 {
        return None;
    }
    bytes
        .chunks_exact(SEAL_BYTES)
        .map(|chunk| {
            let (seq, signature) = chunk.split_at(8);
            Some(Seal { seq: Seq(u64::from_le_bytes(seq.try_into().ok()?)), signature: signature.try_into().ok()? })
        })
        .collect()
}

/// A hole proof as stored.
pub(crate) fn encode_hole(hole: &HoleProof) -> Vec<u8> {
    let mut out = Vec::with_capacity(HOLE_BYTES);
    out.extend_from_slice(&hole.first.0.to_le_bytes());
    out.extend_from_slice(&hole.last.0.to_le_bytes());
    out.extend_from_slice(&hole.before.0);
    out.extend_from_slice(&hole.chain.0);
    out.extend_from_slice(&hole.signature);
    out
}

/// A stored hole proof back, or `None` if the bytes are not one.
pub(crate) fn decode_hole(bytes: &[u8]) -> Option<HoleProof> {
    if bytes.len() != HOLE_BYTES {
        return None;
    }
    let (first, rest) = bytes.split_at(8);
    let (last, rest) = rest.split_at(8);
    let (before, rest) = rest.split_at(CHAIN_BYTES);
    let (chain, signature) = rest.split_at(CHAIN_BYTES);
    Some(HoleProof {
        first: Seq(u64::from_le_bytes(first.try_into().ok()?)),
        last: Seq(u64::from_le_bytes(last.try_into().ok()?)),
        before: ChainHash(before.try_into().ok()?),
        chain: ChainHash(chain.try_into().ok()?),
        signature: signature.try_into().ok()?,
    })
}

/// A stored chain value back, or `None` if the bytes are not one.
pub(crate) fn decode_chain(bytes: &[u8]) -> Option<ChainHash> {
    Some(ChainHash(bytes.try_into().ok()?))
}
