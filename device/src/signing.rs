//! `SigningKey`: the device's Ed25519 signing key, loaded from the `<name>.sign.key` file that
//! `tidesync-gateway pki issue --device` (or `pki rotate-key`) wrote: 64 hex digits of the secret
//! seed. The uplink seals every batch it sends with it (see `tidesync_core::auth`).
//!
//! The secret never leaves this type in printable form: `Debug` shows the public key only, and
//! errors describe the file, not its contents.

use std::fmt;
use std::path::{Path, PathBuf};

use tidesync_core::auth::{parse_seed, DeviceSigner, SeedError, PUBLIC_KEY_BYTES, SEED_BYTES};
use tidesync_core::event::DeviceId;

/// Why a signing-key file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SigningKeyError {
    /// No file at the path.
    #[error("no signing key at {path} (issue one with `tidesync-gateway pki issue --device` or `pki rotate-key`)")]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The file could not be read.
    #[error("cannot read the signing key at {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a key (wrong length, not hex).
    #[error("the signing key at {path} is damaged")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the contents).
        #[source]
        source: SeedError,
    },
}

/// A device signing key. Cloning copies the secret; `Debug` shows only the public key.
#[derive(Clone)]
pub struct SigningKey {
    seed: [u8; SEED_BYTES],
    public: [u8; PUBLIC_KEY_BYTES],
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public {})", self.public_hex())
    }
}

impl SigningKey {
    /// The key whose secret seed is `seed`.
    pub fn from_seed(seed: [u8; SEED_BYTES]) -> Self {
        // The public key does not depend on the device name the signer is made for.
        let public = DeviceSigner::from_seed(placeholder_device(), seed).public_key();
        Self { seed, public }
    }

    /// Reads a signing-key file.
    pub fn load(path: &Path) -> Result<Self, SigningKeyError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(SigningKeyError::Missing { path: path.to_path_buf() })
            }
            // Bytes that are not UTF-8 are not hex either.
            Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                return Err(SigningKeyError::Corrupt { path: path.to_path_buf(), source: SeedError::NotHex })
            }
            Err(source) => return Err(SigningKeyError::Io { path: path.to_path_buf(), source }),
        };
        let seed = parse_seed(&text).map_err(|source| SigningKeyError::Corrupt { path: path.to_path_buf(), source })?;
        warn_if_readable_by_others(path);
        Ok(Self::from_seed(seed))
    }

    /// The signer for `device`'s sessions.
    pub fn signer(&self, device: DeviceId) -> DeviceSigner {
        DeviceSigner::from_seed(device, self.seed)
    }

    /// The public key, as listed in the fleet's `device-keys.txt`.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_BYTES] {
        self.public
    }

    /// The public key as lowercase hex.
    pub fn public_hex(&self) -> String {
        self.public.iter().map(|byte| format!("{byte:02x}")).collect()
    }
}

fn placeholder_device() -> DeviceId {
    // A constant valid name; only the public key is taken from this signer.
    DeviceId::new("key").unwrap_or_else(|_| unreachable!("\"key\" is a valid device name"))
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the signing key is readable by other users; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

#[cfg(test)]
mod tests;
