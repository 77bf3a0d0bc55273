//! Key files as text: the fleet's registry of device public keys (`device-keys.txt`) and a
//! device's signing-key file (`<name>.sign.key`). Pure text in, values out; the binaries do the
//! file IO.
//!
//! The registry holds one key per line: `<device> <64-hex public key> <active|revoked> <added unix
//! ms>`, fields separated by spaces or tabs; lines that are blank or start with `#` are comments.
//! A device may have several active keys (a rotation: old and new both verify until the old one is
//! revoked). Revoked keys stay listed, so the file is also the history of a device's keys, but
//! they never verify. A key appears at most once in the file: revoking changes its line in place.
//!
//! Invariant: every key a [`KeyRegistry`] holds is a valid Ed25519 public key (checked when it is
//! parsed or added), so [`KeyRegistry::device_keys`] cannot fail.
//!
//! Invariant: `KeyRegistry::parse(&registry.format())` equals `registry`, comments included, so an
//! edit by the PKI tool keeps what the operator wrote.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use ed25519_dalek::VerifyingKey;

use super::{DeviceKeys, KeyError, PUBLIC_KEY_BYTES};
use crate::event::{DeviceId, Millis, NameError};

/// Bytes of a device's Ed25519 secret seed.
pub const SEED_BYTES: usize = 32;

/// The comment a new registry file starts with: it names the fields of a line.
pub const REGISTRY_HEADER: &str =
    "# tidesync device keys: <device> <public key, 64 hex> <active|revoked> <added unix ms>\n";

/// Whether a listed key verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// The key verifies the device's seals.
    Active,
    /// The key was revoked: seals made with it are refused.
    Revoked,
}

impl KeyState {
    /// The word used in the registry file.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Revoked => "revoked",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One key line of the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// The device the key signs for.
    pub device: DeviceId,
    /// The Ed25519 public key.
    pub public: [u8; PUBLIC_KEY_BYTES],
    /// Whether it verifies.
    pub state: KeyState,
    /// When it was added (ms since the Unix epoch).
    pub added: Millis,
}

impl fmt::Display for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} {}", self.device, super::hex(&self.public), self.state, self.added.0)
    }
}

/// A line of the registry file: a key, or a comment (or blank line) kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Line {
    Key(KeyEntry),
    Text(String),
}

/// Why a registry file does not parse. Lines are numbered from 1.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A key line does not have the four fields.
    #[error("line {line}: expected 4 fields `<device> <public key> <active|revoked> <added unix ms>`, found {found}")]
    Fields {
        /// The line.
        line: usize,
        /// How many fields it has.
        found: usize,
    },
    /// The device name is invalid.
    #[error("line {line}: device name: {source}")]
    Device {
        /// The line.
        line: usize,
        /// Why.
        #[source]
        source: NameError,
    },
    /// The public key is not 64 hex digits.
    #[error("line {line}: the public key is not 64 hex digits")]
    KeyHex {
        /// The line.
        line: usize,
    },
    /// The public key is 32 bytes but not a usable Ed25519 key.
    #[error("line {line}: {source}")]
    Key {
        /// The line.
        line: usize,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// The state is neither `active` nor `revoked`.
    #[error("line {line}: state must be `active` or `revoked`")]
    State {
        /// The line.
        line: usize,
    },
    /// The time added is not a number of milliseconds.
    #[error("line {line}: the time added is not a number of milliseconds")]
    Added {
        /// The line.
        line: usize,
    },
    /// The key is already listed on an earlier line.
    #[error("line {line}: the key is already listed on line {first_line}")]
    Duplicate {
        /// The line.
        line: usize,
        /// The earlier line.
        first_line: usize,
    },
}

/// The registry file as a list of lines. See the [module documentation](self).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRegistry {
    lines: Vec<Line>,
}

impl KeyRegistry {
    /// An empty registry (no lines at all).
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the text of a registry file.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let mut registry = Self::new();
        for (index, text_line) in text.lines().enumerate() {
            let line = index + 1;
            let trimmed = text_line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                registry.lines.push(Line::Text(String::from(text_line)));
                continue;
            }
            let entry = parse_entry(line, trimmed)?;
            if let Some(first_line) = registry.line_of(&entry.public) {
                return Err(RegistryError::Duplicate { line, first_line });
            }
            registry.lines.push(Line::Key(entry));
        }
        Ok(registry)
    }

    /// The registry as file text: one line each, `\n`-terminated.
    pub fn format(&self) -> String {
        use core::fmt::Write as _;
        let mut out = String::new();
        for line in &self.lines {
            // Writing to a String cannot fail.
            let _ = match line {
                Line::Key(entry) => writeln!(out, "{entry}"),
                Line::Text(text) => writeln!(out, "{text}"),
            };
        }
        out
    }

    /// Every key line, in file order.
    pub fn entries(&self) -> impl Iterator<Item = &KeyEntry> + '_ {
        self.lines.iter().filter_map(|line| match line {
            Line::Key(entry) => Some(entry),
            Line::Text(_) => None,
        })
    }

    /// The active keys of `device`, in file order (oldest first).
    pub fn active(&self, device: &DeviceId) -> impl Iterator<Item = &KeyEntry> + '_ {
        let device = *device;
        self.entries().filter(move |entry| entry.device == device && entry.state == KeyState::Active)
    }

    /// Appends an active key of `device` added at `added`. Returns `false` (and changes nothing)
    /// if the key is already listed, whatever its state: a revoked key cannot come back.
    pub fn add(&mut self, device: DeviceId, public: [u8; PUBLIC_KEY_BYTES], added: Millis) -> Result<bool, KeyError> {
        check_key(&public)?;
        if self.line_of(&public).is_some() {
            return Ok(false);
        }
        self.lines.push(Line::Key(KeyEntry { device, public, state: KeyState::Active, added }));
        Ok(true)
    }

    /// Revokes the active keys of `device`: all of them, or only `public`. Returns how many were
    /// revoked.
    pub fn revoke(&mut self, device: &DeviceId, public: Option<&[u8; PUBLIC_KEY_BYTES]>) -> usize {
        let mut n_revoked = 0;
        for line in &mut self.lines {
            if let Line::Key(entry) = line {
                let chosen = public.is_none_or(|public| entry.public == *public);
                if entry.device == *device && entry.state == KeyState::Active && chosen {
                    entry.state = KeyState::Revoked;
                    n_revoked += 1;
                }
            }
        }
        n_revoked
    }

    /// The keys that verify: every active key, by device.
    pub fn device_keys(&self) -> DeviceKeys {
        let mut keys = DeviceKeys::new();
        for entry in self.entries().filter(|entry| entry.state == KeyState::Active) {
            // Every held key was checked when it was parsed or added (module invariant).
            let inserted = keys.insert(entry.device, entry.public);
            debug_assert!(inserted.is_ok(), "registry holds only valid keys");
        }
        keys
    }

    /// The 1-based line holding `public`, if listed.
    fn line_of(&self, public: &[u8; PUBLIC_KEY_BYTES]) -> Option<usize> {
        self.lines.iter().position(|line| matches!(line, Line::Key(entry) if entry.public == *public)).map(|i| i + 1)
    }
}

impl fmt::Display for KeyRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.format())
    }
}

impl DeviceKeys {
    /// The keys that verify according to the text of a `device-keys.txt` registry: every active
    /// key (several per device during a rotation); revoked keys are left out.
    pub fn parse(text: &str) -> Result<DeviceKeys, RegistryError> {
        Ok(KeyRegistry::parse(text)?.device_keys())
    }
}

/// A public key written as 64 hex digits (as in the registry), checked to be a usable Ed25519 key.
pub fn parse_public_key(text: &str) -> Result<[u8; PUBLIC_KEY_BYTES], KeyError> {
    let public = decode_hex(text.trim()).ok_or(KeyError::Invalid)?;
    check_key(&public)?;
    Ok(public)
}

fn parse_entry(line: usize, text: &str) -> Result<KeyEntry, RegistryError> {
    let fields: Vec<&str> = text.split_ascii_whitespace().collect();
    let [device, public, state, added] = fields[..] else {
        return Err(RegistryError::Fields { line, found: fields.len() });
    };
    let device = DeviceId::new(device).map_err(|source| RegistryError::Device { line, source })?;
    let public: [u8; PUBLIC_KEY_BYTES] = decode_hex(public).ok_or(RegistryError::KeyHex { line })?;
    check_key(&public).map_err(|source| RegistryError::Key { line, source })?;
    let state = match state {
        "active" => KeyState::Active,
        "revoked" => KeyState::Revoked,
        _ => return Err(RegistryError::State { line }),
    };
    // Only digits: `u64::from_str` would also take a leading `+`, which the formatter never writes.
    if !added.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(RegistryError::Added { line });
    }
    let added = added.parse::<u64>().map_err(|_| RegistryError::Added { line })?;
    Ok(KeyEntry { device, public, state, added: Millis(added) })
}

fn check_key(public: &[u8; PUBLIC_KEY_BYTES]) -> Result<(), KeyError> {
    match VerifyingKey::from_bytes(public) {
        Ok(key) if !key.is_weak() => Ok(()),
        _ => Err(KeyError::Invalid),
    }
}

/// Decodes exactly `N` bytes of hex (either case); `None` for any other text.
fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        *byte = (high * 16 + low) as u8;
    }
    Some(out)
}

/// Why a signing-key file does not hold a key. Says nothing about the contents: they are secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SeedError {
    /// The file does not hold 64 characters (besides surrounding whitespace).
    #[error("a signing key is 64 hex digits; the file holds {found_chars} characters")]
    Length {
        /// Characters found, whitespace around them excluded.
        found_chars: usize,
    },
    /// 64 characters, but not all hex digits.
    #[error("the signing key is not hex")]
    NotHex,
}

/// The text of a signing-key file: the 32-byte seed as 64 lowercase hex digits and a newline.
pub fn format_seed(seed: &[u8; SEED_BYTES]) -> String {
    let mut text = super::hex(seed);
    text.push('\n');
    text
}

/// The seed in the text of a signing-key file (see [`format_seed`]); whitespace around it is
/// ignored.
pub fn parse_seed(text: &str) -> Result<[u8; SEED_BYTES], SeedError> {
    let digits = text.trim();
    if digits.len() != 2 * SEED_BYTES {
        return Err(SeedError::Length { found_chars: digits.chars().count() });
    }
    decode_hex(digits).ok_or(SeedError::NotHex)
}

#[cfg(test)]
mod tests;
