//! `tidesync-gateway pki init|issue|revoke|rotate-key|revoke-key`: the fleet CA, its
//! certificates and the devices' event signing keys as files.
//!
//! A PKI directory holds `ca.pem`, `ca.key`, `crl.pem`, `serial` (the next serial number),
//! `revoked` (one revoked serial per line), `issued` (`<serial> <holder>` per certificate, so a
//! revoked serial can be traced to its device) and `device-keys.txt`, the registry of device
//! public keys the cloud verifies with (format: `tidesync_core::auth::KeyRegistry`). Every file is
//! written through a temporary file and a rename, so a crash never leaves half a key; secrets with
//! 0600 permissions, the public key registry with 0644. What each command did is written to the
//! `report` its caller passes (the CLI's stdout; the demo discards it).
//!
//! Issuing a device certificate also makes its Ed25519 signing key (`PREFIX.sign.key`, 64 hex
//! digits of the seed from the OS random number generator) and registers the public half. The
//! public key is registered before the secret is written: a crash in between leaves a listed key
//! nobody holds (harmless), never a device signing with a key the cloud does not know.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use tidesync_core::auth::{self, DeviceSigner, KeyRegistry, REGISTRY_HEADER};
use tidesync_core::event::{DeviceId, GatewayId, Millis};
use tidesync_core::net::pki::{self, FleetCa, Identity};

/// The registry of device public keys inside a PKI directory.
pub const DEVICE_KEYS_FILE: &str = "device-keys.txt";
/// The record of issued certificates inside a PKI directory.
const ISSUED_FILE: &str = "issued";

const DAY_MS: u64 = 86_400_000;
/// Certificates are valid from a little before issue, for clocks that run slow.
const BACKDATE_MS: u64 = 3_600_000;

/// What to issue a certificate for.
#[derive(Debug, Clone)]
pub enum Holder {
    /// A device.
    Device(DeviceId),
    /// A gateway.
    Gateway(GatewayId),
    /// The cloud.
    Cloud,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Writes `contents` to `path` with 0600 permissions, atomically.
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_atomically(path, contents, 0o600)
}

/// Writes `contents` to `path` with permissions `mode`, atomically.
fn write_atomically(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    // A temporary left by an earlier crash may have other permissions; start afresh.
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("cannot write {}", temporary.display()))?;
    file.sync_all().with_context(|| format!("cannot sync {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn load_ca(dir: &Path) -> anyhow::Result<FleetCa> {
    FleetCa::from_pem(&read(&dir.join("ca.pem"))?, &read(&dir.join("ca.key"))?).context("cannot load the fleet CA")
}

fn revoked(dir: &Path) -> anyhow::Result<Vec<u64>> {
    read(&dir.join("revoked"))?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.trim().parse::<u64>().with_context(|| format!("bad serial {line:?} in revoked")))
        .collect()
}

fn write_crl(dir: &Path, ca: &FleetCa, revoked_serials: &[u64], crl_days: u64) -> anyhow::Result<()> {
    let now = now_ms();
    // The CRL number only has to grow; the time does.
    let crl = ca.revocation_list(now, revoked_serials, Millis(now - BACKDATE_MS), Millis(now + crl_days * DAY_MS))?;
    write_private(&dir.join("crl.pem"), &crl)
}

/// Creates a fleet CA in `dir` (which must not hold one yet).
pub fn init(dir: &Path, fleet: &str, ca_days: u64, crl_days: u64, report: &mut dyn Write) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if dir.join("ca.key").exists() {
        bail!("{} already holds a fleet CA", dir.display());
    }
    let now = now_ms();
    let ca = FleetCa::create(fleet, Millis(now - BACKDATE_MS), Millis(now + ca_days * DAY_MS))?;
    write_private(&dir.join("ca.key"), ca.key_pem())?;
    write_private(&dir.join("ca.pem"), ca.cert_pem())?;
    write_private(&dir.join("serial"), "1\n")?;
    write_private(&dir.join("revoked"), "")?;
    write_crl(dir, &ca, &[], crl_days)?;
    writeln!(report, "fleet CA {fleet} created in {}", dir.display())?;
    Ok(())
}

/// Issues a certificate for `holder`, written as `out.pem` and `out.key`; returns its serial.
pub fn issue(dir: &Path, holder: &Holder, out: &Path, days: u64, report: &mut dyn Write) -> anyhow::Result<u64> {
    let ca = load_ca(dir)?;
    let serial: u64 = read(&dir.join("serial"))?.trim().parse().context("bad serial file")?;
    write_private(&dir.join("serial"), &format!("{}\n", serial + 1))?;
    let identity = match holder {
        Holder::Device(device) => Identity::Device(*device),
        Holder::Gateway(gateway) => Identity::Gateway(*gateway),
        Holder::Cloud => Identity::Cloud,
    };
    let now = now_ms();
    let issued = ca.issue(identity, serial, Millis(now - BACKDATE_MS), Millis(now + days * DAY_MS))?;
    let cert_path = PathBuf::from(format!("{}.pem", out.display()));
    let key_path = PathBuf::from(format!("{}.key", out.display()));
    write_private(&key_path, &issued.key_pem)?;
    write_private(&cert_path, &issued.cert_pem)?;
    record_issued(dir, serial, identity)?;
    writeln!(report, "issued serial {serial} for {identity}: {} {}", cert_path.display(), key_path.display())?;
    if let Identity::Device(device) = identity {
        new_signing_key(dir, device, out, report)?;
    }
    Ok(serial)
}

/// Makes a new signing key for `device`, written as `out.sign.key`; its earlier keys stay active
/// (events it signed before still verify) until `revoke-key`. Returns the public key.
pub fn rotate_key(
    dir: &Path,
    device: DeviceId,
    out: &Path,
    report: &mut dyn Write,
) -> anyhow::Result<[u8; auth::PUBLIC_KEY_BYTES]> {
    // Only a PKI directory gets a registry: a typo in --dir must not start a new fleet's.
    anyhow::ensure!(dir.join("ca.pem").exists(), "{} holds no fleet CA (run `pki init`)", dir.display());
    new_signing_key(dir, device, out, report)
}

/// Revokes `device`'s signing keys (all active ones, or only `public`, 64 hex digits) in the
/// registry. Returns how many were revoked; none is an error.
pub fn revoke_key(dir: &Path, device: DeviceId, public: Option<&str>, report: &mut dyn Write) -> anyhow::Result<usize> {
    let public = public
        .map(|text| auth::parse_public_key(text).with_context(|| format!("--public {text:?} is not a public key")))
        .transpose()?;
    let mut registry = load_registry(dir)?;
    let n_revoked = registry.revoke(&device, public.as_ref());
    anyhow::ensure!(
        n_revoked > 0,
        "device {device} has no such active key in {}",
        dir.join(DEVICE_KEYS_FILE).display()
    );
    save_registry(dir, &registry)?;
    writeln!(
        report,
        "revoked {n_revoked} signing key(s) of device {device}; {} active remain",
        registry.active(&device).count()
    )?;
    Ok(n_revoked)
}

/// Draws a seed, registers its public key, then writes the secret as `out.sign.key` (0600).
fn new_signing_key(
    dir: &Path,
    device: DeviceId,
    out: &Path,
    report: &mut dyn Write,
) -> anyhow::Result<[u8; auth::PUBLIC_KEY_BYTES]> {
    let seed = pki::signing_seed().context("cannot make a signing key")?;
    let public = DeviceSigner::from_seed(device, seed).public_key();
    let mut registry = load_registry(dir)?;
    // A fresh key from the OS RNG is valid and new; a clash would be a broken RNG.
    anyhow::ensure!(
        registry.add(device, public, Millis(now_ms())).context("the random key is not a valid Ed25519 key")?,
        "the new signing key is already registered: the random number generator is broken"
    );
    save_registry(dir, &registry)?;
    let sign_key_path = PathBuf::from(format!("{}.sign.key", out.display()));
    write_private(&sign_key_path, &auth::format_seed(&seed))?;
    let public_hex: String = public.iter().map(|byte| format!("{byte:02x}")).collect();
    writeln!(
        report,
        "signing key for device {device}: {} (public {public_hex}, {} active)",
        sign_key_path.display(),
        registry.active(&device).count()
    )?;
    Ok(public)
}

/// The registry in `dir` (an empty one with the header comment if there is none yet).
pub fn load_registry(dir: &Path) -> anyhow::Result<KeyRegistry> {
    let path = dir.join(DEVICE_KEYS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => REGISTRY_HEADER.to_string(),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    KeyRegistry::parse(&text).with_context(|| format!("{} is damaged", path.display()))
}

fn save_registry(dir: &Path, registry: &KeyRegistry) -> anyhow::Result<()> {
    // Public keys only: the cloud (another user, perhaps) reads it.
    write_atomically(&dir.join(DEVICE_KEYS_FILE), &registry.format(), 0o644)
}

/// Appends `serial holder` to the record of issued certificates.
fn record_issued(dir: &Path, serial: u64, identity: Identity) -> anyhow::Result<()> {
    let path = dir.join(ISSUED_FILE);
    let mut text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    text.push_str(&format!("{serial} {identity}\n"));
    write_private(&path, &text)
}

/// The device a serial was issued to, according to the record of issued certificates.
fn device_of_serial(dir: &Path, serial: u64) -> anyhow::Result<Option<DeviceId>> {
    let path = dir.join(ISSUED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        if let (Some(found), Some("device"), Some(name)) = (fields.next(), fields.next(), fields.next()) {
            if found.parse::<u64>().ok() == Some(serial) {
                return DeviceId::new(name).map(Some).with_context(|| format!("bad device name in {}", path.display()));
            }
        }
    }
    Ok(None)
}

/// Revokes a serial (or the certificate in a file) and rewrites `crl.pem`.
/// A device certificate's signing keys are revoked with it: a stolen device must not keep
/// signing through a gateway that has not seen the new revocation list.
pub fn revoke(
    dir: &Path,
    serial: Option<u64>,
    cert: Option<&Path>,
    crl_days: u64,
    report: &mut dyn Write,
) -> anyhow::Result<u64> {
    let (serial, device) = match (serial, cert) {
        (Some(serial), None) => (serial, device_of_serial(dir, serial)?),
        (None, Some(cert)) => {
            let der = pki::first_cert_der(&read(cert)?)?;
            let device = match pki::identity_of(&der)? {
                Identity::Device(device) => Some(device),
                _ => None,
            };
            (pki::serial_of(&der)?, device)
        }
        _ => bail!("name exactly one of --serial or --cert"),
    };
    let ca = load_ca(dir)?;
    let mut serials = revoked(dir)?;
    if !serials.contains(&serial) {
        serials.push(serial);
    }
    let text: String = serials.iter().map(|serial| format!("{serial}\n")).collect();
    write_private(&dir.join("revoked"), &text)?;
    write_crl(dir, &ca, &serials, crl_days)?;
    writeln!(report, "revoked serial {serial}; {} now lists {} serials", dir.join("crl.pem").display(), serials.len())?;
    match device {
        Some(device) => {
            let mut registry = load_registry(dir)?;
            let n_revoked = registry.revoke(&device, None);
            save_registry(dir, &registry)?;
            writeln!(report, "revoked {n_revoked} signing key(s) of device {device}")?;
        }
        None if cert.is_none() => writeln!(
            report,
            "serial {serial} is not a device in {}: no signing keys revoked (use `pki revoke-key` for a device's keys)",
            dir.join(ISSUED_FILE).display()
        )?,
        None => {}
    }
    Ok(serial)
}
