//! `Shadow`: a device's desired and reported state as an automerge document.
//!
//! The document's root holds two maps, `reported` (written by the device) and `desired` (written
//! by the cloud API or a gateway). The *delta* is derived, never stored: the desired entries that
//! reported does not match yet. Every replica (device, gateways, cloud) edits its own copy while
//! offline and they converge through automerge sync messages.
//!
//! Invariant: every replica starts from the same genesis change (made by a fixed actor with no
//! timestamp), so the two root maps are one object everywhere; had each replica created its own,
//! concurrent creations would conflict and one side's edits would vanish. Actor ids are derived
//! from the replica's name, so runs are reproducible. Saved shadows are plain automerge documents
//! any automerge implementation can load.

use std::collections::BTreeMap;

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue, ROOT};

use crate::value::{Value, ValueTooDeep, VALUE_DEPTH_MAX};

/// Actor of the genesis change that every replica shares.
const GENESIS_ACTOR: &[u8] = b"tidesync-genesis";
/// Root key of the reported section.
const REPORTED: &str = "reported";
/// Root key of the desired section.
const DESIRED: &str = "desired";

/// Bounds on a shadow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowLimits {
    /// Largest saved document, in bytes; edits and sync messages that would exceed it are refused.
    pub bytes_max: usize,
}

impl Default for ShadowLimits {
    fn default() -> Self {
        Self { bytes_max: 64 * 1024 }
    }
}

impl ShadowLimits {
    /// Most bytes that the DEFLATE-compressed parts of one input (a saved document, an increment,
    /// the changes of one sync message) may inflate to: twice [`ShadowLimits::bytes_max`]. A
    /// shadow within its bound saves columns that inflate to at most `bytes_max` (the uncompressed
    /// document is what the bound measures), and the changes of a sync message carry the same ops;
    /// the factor two leaves room for changes the receiver already has and for per-change
    /// headers. Anything beyond is refused before automerge inflates it.
    pub fn inflated_max(&self) -> usize {
        self.bytes_max.saturating_mul(2)
    }
}

/// The two sections of a shadow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Section {
    /// What the device reports about itself; written by the device.
    Reported,
    /// What the cloud or a gateway wants the device to be; written upstream.
    Desired,
}

impl Section {
    fn key(self) -> &'static str {
        match self {
            Section::Reported => REPORTED,
            Section::Desired => DESIRED,
        }
    }
}

/// Why a shadow operation failed. A failed operation leaves the shadow as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShadowError {
    /// The document would exceed [`ShadowLimits::bytes_max`].
    #[error("shadow would be {len_bytes} bytes, the maximum is {max_bytes}")]
    TooLarge {
        /// Size it would have.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// Saved bytes or a sync message that automerge refused.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// Bytes that are not an automerge sync message.
    #[error("not an automerge sync message: {0}")]
    SyncMessage(#[from] automerge::sync::ReadMessageError),
    /// A loaded document lacks the `reported` or `desired` map.
    #[error("document has no {section:?} map: not a tidesync shadow")]
    NotAShadow {
        /// The missing section.
        section: Section,
    },
    /// A value nests too deep.
    #[error(transparent)]
    TooDeep(#[from] ValueTooDeep),
    /// A key is empty.
    #[error("shadow keys may not be empty")]
    EmptyKey,
    /// The compressed parts of the input would inflate past [`ShadowLimits::inflated_max`] (a
    /// decompression bomb); refused before automerge inflates them, the shadow is unchanged.
    #[error("compressed automerge data would inflate past {max_bytes} bytes")]
    InflatesTooLarge {
        /// The limit, [`ShadowLimits::inflated_max`].
        max_bytes: usize,
    },
    /// automerge panicked while parsing the bytes (a library bug on malformed input, found by
    /// fuzzing); the shadow is unchanged.
    #[error("malformed automerge bytes (the parser panicked)")]
    Malformed,
}

/// Runs an automerge parse of outside bytes, turning a panic inside automerge into
/// [`ShadowError::Malformed`]: automerge 0.12 can panic on hostile input (an `unwrap` in its RLE
/// decoder, `core/tests/fuzz-crashers/shadow_doc_rle_panic.bin`), and a stored or received shadow
/// must never take the process down. Only copies are parsed, so nothing half-changed is kept.
fn guarded<T>(parse: impl FnOnce() -> Result<T, ShadowError>) -> Result<T, ShadowError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).unwrap_or(Err(ShadowError::Malformed))
}

/// Refuses `chunks` (each a run of automerge chunks) when their compressed parts would together
/// inflate past `limits.inflated_max()`, measured without keeping what is inflated (see
/// `inflate.rs`); automerge would otherwise allocate all of it before any other check runs.
fn bound_inflation<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, limits: ShadowLimits) -> Result<(), ShadowError> {
    let max_bytes = limits.inflated_max();
    let mut budget = max_bytes;
    for bytes in chunks {
        if inflate::charge(bytes, &mut budget).is_err() {
            tracing::warn!(max_bytes, "shadow bytes refused: compressed parts inflate past the limit");
            return Err(ShadowError::InflatesTooLarge { max_bytes });
        }
    }
    Ok(())
}

/// The automerge sync state of one peer (one session): what we believe the peer has.
#[derive(Debug, Default)]
pub struct PeerSync {
    state: automerge::sync::State,
}

impl PeerSync {
    /// A fresh state: we assume nothing about the peer.
    pub fn new() -> Self {
        Self::default()
    }
}

/// A device shadow. See the module documentation.
#[derive(Debug, Clone)]
pub struct Shadow {
    doc: AutoCommit,
    limits: ShadowLimits,
    /// Heads at the last `save`/`save_incremental`. Kept here rather than in automerge's own
    /// cursor, which every size check (a save) would move.
    saved_heads: Vec<automerge::ChangeHash>,
}

impl Shadow {
    /// A new, empty shadow for the replica named `replica` (for example `"device:pump-7"`,
    /// `"gateway:site-1"`, `"cloud"`); the name becomes the automerge actor id.
    pub fn new(replica: &str, limits: ShadowLimits) -> Self {
        let mut doc = AutoCommit::new().with_actor(ActorId::from(GENESIS_ACTOR));
        // The genesis is two puts on a fresh document: they cannot fail.
        let genesis =
            doc.put_object(ROOT, REPORTED, ObjType::Map).and_then(|_| doc.put_object(ROOT, DESIRED, ObjType::Map));
        debug_assert!(genesis.is_ok(), "genesis puts on an empty document");
        doc.commit();
        doc.set_actor(ActorId::from(replica.as_bytes()));
        Self { doc, limits, saved_heads: Vec::new() }
    }

    /// Loads a saved shadow (from [`Shadow::save`], possibly followed by incremental saves) and
    /// continues it as `replica`.
    pub fn load(bytes: &[u8], replica: &str, limits: ShadowLimits) -> Result<Self, ShadowError> {
        bound_inflation([bytes], limits)?;
        let mut doc = guarded(|| Ok(AutoCommit::load(bytes)?))?;
        doc.set_actor(ActorId::from(replica.as_bytes()));
        let saved_heads = doc.get_heads();
        let shadow = Self { doc, limits, saved_heads };
        shadow.section_id(Section::Reported)?;
        shadow.section_id(Section::Desired)?;
        Ok(shadow)
    }

    /// Applies bytes from [`Shadow::save_incremental`] (or whole saved documents) to this shadow.
    /// Returns the number of new operations.
    pub fn load_incremental(&mut self, bytes: &[u8]) -> Result<usize, ShadowError> {
        bound_inflation([bytes], self.limits)?;
        let mut trial = self.doc.clone();
        let n_ops = guarded(|| Ok(trial.load_incremental(bytes)?))?;
        self.accept(trial)?;
        Ok(n_ops)
    }

    /// The whole document, compacted.
    pub fn save(&mut self) -> Vec<u8> {
        self.saved_heads = self.doc.get_heads();
        self.doc.save()
    }

    /// The changes since the last `save` or `save_incremental`; empty if none.
    pub fn save_incremental(&mut self) -> Vec<u8> {
        let bytes = self.doc.save_after(&self.saved_heads);
        self.saved_heads = self.doc.get_heads();
        bytes
    }

    /// The document's heads, for comparing replicas.
    pub fn heads(&mut self) -> Vec<automerge::ChangeHash> {
        self.doc.get_heads()
    }

    /// Sets `key` of `section` to `value`.
    pub fn set(&mut self, section: Section, key: &str, value: &Value) -> Result<(), ShadowError> {
        if key.is_empty() {
            return Err(ShadowError::EmptyKey);
        }
        if value.depth() >= VALUE_DEPTH_MAX {
            return Err(ValueTooDeep.into());
        }
        let mut trial = self.doc.clone();
        let section_id = section_id(&trial, section)?;
        put_value(&mut trial, &section_id, key, value)?;
        trial.commit();
        self.accept(trial)
    }

    /// Removes `key` from `section`; removing a missing key does nothing.
    pub fn remove(&mut self, section: Section, key: &str) -> Result<(), ShadowError> {
        let section_id = self.section_id(section)?;
        if self.doc.get(&section_id, key)?.is_none() {
            return Ok(());
        }
        let mut trial = self.doc.clone();
        trial.delete(&section_id, key)?;
        trial.commit();
        self.accept(trial)
    }

    /// The value at `key` of `section`.
    pub fn get(&self, section: Section, key: &str) -> Option<Value> {
        let section_id = self.section_id(section).ok()?;
        read_prop(&self.doc, &section_id, key)
    }

    /// A whole section as a [`Value::Map`].
    pub fn section(&self, section: Section) -> Value {
        match self.section_id(section) {
            Ok(section_id) => read_object(&self.doc, &section_id, ObjType::Map),
            Err(_) => Value::empty_map(),
        }
    }

    /// The reported section.
    pub fn reported(&self) -> Value {
        self.section(Section::Reported)
    }

    /// The desired section.
    pub fn desired(&self) -> Value {
        self.section(Section::Desired)
    }

    /// The desired entries that reported does not match yet (recursively for maps).
    pub fn delta(&self) -> Value {
        delta(&self.desired(), &self.reported()).unwrap_or_else(Value::empty_map)
    }

    /// `{"reported": ..., "desired": ..., "delta": ...}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "reported": self.reported().to_json(),
            "desired": self.desired().to_json(),
            "delta": self.delta().to_json(),
        })
    }

    /// The next sync message for `peer`, if there is something to say.
    pub fn generate_sync_message(&mut self, peer: &mut PeerSync) -> Option<Vec<u8>> {
        self.doc.sync().generate_sync_message(&mut peer.state).map(|message| message.encode())
    }

    /// Applies a sync message from `peer`. Returns whether the document changed. A message that
    /// does not decode, or that would grow the shadow past its bound, leaves it unchanged.
    pub fn receive_sync_message(&mut self, peer: &mut PeerSync, message: &[u8]) -> Result<bool, ShadowError> {
        // Decoding only splits the message; the changes are inflated when applied, so they are
        // bounded in between.
        let message = guarded(|| Ok(automerge::sync::Message::decode(message)?))?;
        bound_inflation(message.changes.iter(), self.limits)?;
        let heads_before = self.doc.get_heads();
        let mut trial = self.doc.clone();
        let mut trial_state = peer.state.clone();
        guarded(|| Ok(trial.sync().receive_sync_message(&mut trial_state, message)?))?;
        // automerge keeps the peer's bloom filters in the sync state and panics on some malformed
        // ones when it next answers (found by the shadow_sync fuzz target): answer once on a copy
        // of the state now, and refuse the message as malformed if that panics.
        let mut probe_state = trial_state.clone();
        guarded(|| Ok(trial.sync().generate_sync_message(&mut probe_state)))?;
        let changed = trial.get_heads() != heads_before;
        // Accept the document even when its heads did not move: automerge may have queued changes
        // whose dependencies are still missing, and the sync state now counts them as received.
        self.accept(trial)?;
        peer.state = trial_state;
        Ok(changed)
    }

    /// Replaces the document with `trial` if it is within bounds and still a shadow.
    fn accept(&mut self, mut trial: AutoCommit) -> Result<(), ShadowError> {
        let len_bytes = trial.save_nocompress().len();
        if len_bytes > self.limits.bytes_max {
            return Err(ShadowError::TooLarge { len_bytes, max_bytes: self.limits.bytes_max });
        }
        section_id(&trial, Section::Reported)?;
        section_id(&trial, Section::Desired)?;
        self.doc = trial;
        Ok(())
    }

    fn section_id(&self, section: Section) -> Result<ObjId, ShadowError> {
        section_id(&self.doc, section)
    }
}

fn section_id(doc: &AutoCommit, section: Section) -> Result<ObjId, ShadowError> {
    match doc.get(ROOT, section.key())? {
        Some((automerge::Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(ShadowError::NotAShadow { section }),
    }
}

fn put_value(doc: &mut AutoCommit, parent: &ObjId, key: &str, value: &Value) -> Result<(), ShadowError> {
    match value {
        Value::Map(entries) => {
            let map = doc.put_object(parent, key, ObjType::Map)?;
            for (child_key, child) in entries {
                put_value(doc, &map, child_key, child)?;
            }
        }
        Value::List(items) => {
            let list = doc.put_object(parent, key, ObjType::List)?;
            for (index, item) in items.iter().enumerate() {
                insert_value(doc, &list, index, item)?;
            }
        }
        scalar => doc.put(parent, key, to_scalar(scalar))?,
    }
    Ok(())
}

fn insert_value(doc: &mut AutoCommit, list: &ObjId, index: usize, value: &Value) -> Result<(), ShadowError> {
    match value {
        Value::Map(entries) => {
            let map = doc.insert_object(list, index, ObjType::Map)?;
            for (child_key, child) in entries {
                put_value(doc, &map, child_key, child)?;
            }
        }
        Value::List(items) => {
            let inner = doc.insert_object(list, index, ObjType::List)?;
            for (inner_index, item) in items.iter().enumerate() {
                insert_value(doc, &inner, inner_index, item)?;
            }
        }
        scalar => doc.insert(list, index, to_scalar(scalar))?,
    }
    Ok(())
}

fn to_scalar(value: &Value) -> ScalarValue {
    match value {
        Value::Bool(flag) => ScalarValue::Boolean(*flag),
        Value::Int(number) => ScalarValue::Int(*number),
        Value::Float(number) => ScalarValue::F64(*number),
        Value::Text(text) => ScalarValue::Str(text.as_str().into()),
        Value::Null | Value::List(_) | Value::Map(_) => ScalarValue::Null,
    }
}

fn from_scalar(scalar: &ScalarValue) -> Value {
    match scalar {
        ScalarValue::Boolean(flag) => Value::Bool(*flag),
        ScalarValue::Int(number) => Value::Int(*number),
        ScalarValue::Uint(number) => i64::try_from(*number).map_or(Value::Float(*number as f64), Value::Int),
        ScalarValue::F64(number) => Value::Float(*number),
        ScalarValue::Counter(counter) => Value::Int(i64::from(counter)),
        ScalarValue::Timestamp(ms) => Value::Int(*ms),
        ScalarValue::Str(text) => Value::Text(text.to_string()),
        // Other implementations may write bytes or future types; show them as null rather than fail.
        ScalarValue::Bytes(_) | ScalarValue::Unknown { .. } | ScalarValue::Null => Value::Null,
    }
}

fn read_prop(doc: &AutoCommit, parent: &ObjId, key: &str) -> Option<Value> {
    match doc.get(parent, key).ok()?? {
        (automerge::Value::Scalar(scalar), _) => Some(from_scalar(&scalar)),
        (automerge::Value::Object(kind), id) => Some(read_object(doc, &id, kind)),
    }
}

fn read_object(doc: &AutoCommit, id: &ObjId, kind: ObjType) -> Value {
    match kind {
        ObjType::Map | ObjType::Table => {
            let mut entries = BTreeMap::new();
            for key in doc.keys(id) {
                if let Some(value) = read_prop(doc, id, &key) {
                    entries.insert(key, value);
                }
            }
            Value::Map(entries)
        }
        ObjType::List => {
            let mut items = Vec::new();
            for index in 0..doc.length(id) {
                let item = match doc.get(id, index) {
                    Ok(Some((automerge::Value::Scalar(scalar), _))) => from_scalar(&scalar),
                    Ok(Some((automerge::Value::Object(kind), child))) => read_object(doc, &child, kind),
                    _ => Value::Null,
                };
                items.push(item);
            }
            Value::List(items)
        }
        ObjType::Text => Value::Text(doc.text(id).unwrap_or_default()),
    }
}

/// The parts of `desired` that `reported` does not match; `None` when it matches entirely.
fn delta(desired: &Value, reported: &Value) -> Option<Value> {
    match (desired, reported) {
        (Value::Map(wanted), Value::Map(have)) => {
            let entries: BTreeMap<String, Value> = wanted
                .iter()
                .filter_map(|(key, value)| {
                    let child = match have.get(key) {
                        Some(current) => delta(value, current),
                        None => Some(value.clone()),
                    };
                    child.map(|child| (key.clone(), child))
                })
                .collect();
            (!entries.is_empty()).then_some(Value::Map(entries))
        }
        (wanted, have) if wanted == have => None,
        (wanted, _) => Some(wanted.clone()),
    }
}

mod inflate;
#[cfg(test)]
mod tests;
