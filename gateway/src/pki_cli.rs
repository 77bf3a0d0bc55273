//! `tidesync-gateway pki init|issue|revoke`: the fleet CA and its certificates as files.
//!
//! A PKI directory holds `ca.pem`, `ca.key`, `crl.pem`, `serial` (the next serial number) and
//! `revoked` (one revoked serial per line). Every file is written with 0600 permissions through a
//! temporary file and a rename, so a crash never leaves half a key.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use tidesync_core::event::{DeviceId, GatewayId, Millis};
use tidesync_core::net::pki::{self, FleetCa, Identity};

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
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
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
pub fn init(dir: &Path, fleet: &str, ca_days: u64, crl_days: u64) -> anyhow::Result<()> {
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
    println!("fleet CA {fleet} created in {}", dir.display());
    Ok(())
}

/// Issues a certificate for `holder`, written as `out.pem` and `out.key`; returns its serial.
pub fn issue(dir: &Path, holder: &Holder, out: &Path, days: u64) -> anyhow::Result<u64> {
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
    println!("issued serial {serial} for {identity}: {} {}", cert_path.display(), key_path.display());
    Ok(serial)
}

/// Revokes a serial (or the certificate in a file) and rewrites `crl.pem`.
pub fn revoke(dir: &Path, serial: Option<u64>, cert: Option<&Path>, crl_days: u64) -> anyhow::Result<u64> {
    let serial = match (serial, cert) {
        (Some(serial), None) => serial,
        (None, Some(cert)) => pki::serial_of(&pki::first_cert_der(&read(cert)?)?)?,
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
    println!("revoked serial {serial}; {} now lists {} serials", dir.join("crl.pem").display(), serials.len());
    Ok(serial)
}
