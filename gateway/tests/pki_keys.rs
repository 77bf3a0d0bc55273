//! The `tidesync-gateway pki` commands for device signing keys, on real files: `issue --device`
//! writes a 0600 `.sign.key` and registers its public key; `rotate-key` adds a second active key;
//! `revoke-key` and the revocation of a device certificate (by file or by serial) revoke keys; a
//! damaged registry stops every command with its line number. Whether a key "verifies" is checked
//! the way the cloud does: a batch sealed with it through `core::auth::verify_batch`.
// Helpers outside #[test] functions unwrap too: a failing setup is a failing test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use tidesync_core::auth::{parse_seed, verify_batch, DeviceKeys, DeviceSigner, KeyRegistry, KeyState};
use tidesync_core::event::{DeviceId, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::{Ledger, MemLedger};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidesync-gateway")).args(args).output().unwrap()
}

fn gateway_cmd(args: &[&str]) -> String {
    let output = run(args);
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn seed_of(path: &Path) -> [u8; 32] {
    parse_seed(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn keys(dir: &Path) -> DeviceKeys {
    DeviceKeys::parse(&std::fs::read_to_string(dir.join("device-keys.txt")).unwrap()).unwrap()
}

/// Whether the cloud, holding `keys`, accepts a batch of `device` sealed with the key in `sign_key`.
fn verifies(keys: &DeviceKeys, name: &str, sign_key: &Path) -> bool {
    let device = device(name);
    let mut ledger = MemLedger::new();
    let reading = Payload::Reading(SensorReading { sensor: "t".into(), value: 1.5, unit: "Cel".into() });
    ledger.record(device, Millis(1_000), Millis(1_000), reading).unwrap();
    let mut batch = ledger.read(&device, Seq(1), 10).unwrap().unwrap();
    let signer = DeviceSigner::from_seed(device, seed_of(sign_key));
    let last = batch.last_seq();
    let proof = batch.proof.as_mut().unwrap();
    let head = proof.prev.over(&batch.events);
    proof.seals = vec![signer.seal(last, &head)];
    verify_batch(keys, &batch, None).is_ok()
}

fn issue_device(dir: &Path, name: &str) -> String {
    let out = dir.join(name);
    gateway_cmd(&["pki", "issue", "--dir", dir.to_str().unwrap(), "--device", name, "--out", out.to_str().unwrap()])
}

#[test]
fn issue_rotate_and_revoke_device_signing_keys() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("pki");
    let dir_arg = dir.to_str().unwrap();
    gateway_cmd(&["pki", "init", "--dir", dir_arg, "--fleet", "test"]);

    // Issue: a 0600 key file with 64 hex digits, its public key registered and verifying.
    let printed = issue_device(&dir, "pump-7");
    let first_key = dir.join("pump-7.sign.key");
    assert!(printed.contains("pump-7.sign.key"), "{printed}");
    assert_eq!(mode(&first_key), 0o600);
    assert_eq!(std::fs::read_to_string(&first_key).unwrap().len(), 65);
    assert_eq!(mode(&dir.join("device-keys.txt")), 0o644);
    let registry = KeyRegistry::parse(&std::fs::read_to_string(dir.join("device-keys.txt")).unwrap()).unwrap();
    let entries: Vec<_> = registry.entries().copied().collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].device, device("pump-7"));
    assert_eq!(entries[0].public, DeviceSigner::from_seed(device("pump-7"), seed_of(&first_key)).public_key());
    assert_eq!(entries[0].state, KeyState::Active);
    assert!(!printed.contains(&std::fs::read_to_string(&first_key).unwrap()[..16]), "the secret was printed");
    assert!(verifies(&keys(&dir), "pump-7", &first_key));

    // A gateway certificate gets no signing key.
    let gw_out = dir.join("gw");
    gateway_cmd(&["pki", "issue", "--dir", dir_arg, "--gateway", "gw-1", "--out", gw_out.to_str().unwrap()]);
    assert!(!dir.join("gw.sign.key").exists());
    assert_eq!(
        KeyRegistry::parse(&std::fs::read_to_string(dir.join("device-keys.txt")).unwrap()).unwrap().entries().count(),
        1
    );

    // Rotate: a new key; the old one still verifies until revoked.
    let second_out = dir.join("pump-7-b");
    gateway_cmd(&["pki", "rotate-key", "--dir", dir_arg, "pump-7", "--out", second_out.to_str().unwrap()]);
    let second_key = dir.join("pump-7-b.sign.key");
    assert_eq!(mode(&second_key), 0o600);
    assert_ne!(seed_of(&first_key), seed_of(&second_key), "each key is fresh from the OS RNG");
    let fleet_keys = keys(&dir);
    assert!(verifies(&fleet_keys, "pump-7", &first_key));
    assert!(verifies(&fleet_keys, "pump-7", &second_key));

    // Revoke the old key only.
    let old_public: String = DeviceSigner::from_seed(device("pump-7"), seed_of(&first_key))
        .public_key()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    gateway_cmd(&["pki", "revoke-key", "--dir", dir_arg, "pump-7", "--public", &old_public]);
    let fleet_keys = keys(&dir);
    assert!(!verifies(&fleet_keys, "pump-7", &first_key));
    assert!(verifies(&fleet_keys, "pump-7", &second_key));
    // Nothing left to revoke under that key: an error, and the registry is unchanged.
    let before = std::fs::read_to_string(dir.join("device-keys.txt")).unwrap();
    let again = run(&["pki", "revoke-key", "--dir", dir_arg, "pump-7", "--public", &old_public]);
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(dir.join("device-keys.txt")).unwrap(), before);
    let not_a_key = run(&["pki", "revoke-key", "--dir", dir_arg, "pump-7", "--public", "abc"]);
    assert!(!not_a_key.status.success());

    // Revoking the device's certificate revokes all its keys.
    gateway_cmd(&["pki", "revoke", "--dir", dir_arg, "--cert", dir.join("pump-7.pem").to_str().unwrap()]);
    let fleet_keys = keys(&dir);
    assert!(!fleet_keys.knows(&device("pump-7")));
    assert!(!verifies(&fleet_keys, "pump-7", &second_key));
    // The revoked keys stay listed as history.
    let text = std::fs::read_to_string(dir.join("device-keys.txt")).unwrap();
    assert_eq!(text.lines().filter(|line| line.starts_with("pump-7 ") && line.contains(" revoked ")).count(), 2);
}

#[test]
fn revoking_a_device_serial_revokes_its_keys_and_a_damaged_registry_stops_the_tool() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("pki");
    let dir_arg = dir.to_str().unwrap();
    gateway_cmd(&["pki", "init", "--dir", dir_arg, "--fleet", "test"]);
    issue_device(&dir, "meter-1");
    let printed = issue_device(&dir, "meter-2");
    let serial: String = printed.split_whitespace().nth(2).unwrap().to_string();
    assert!(serial.parse::<u64>().is_ok(), "{printed}");
    gateway_cmd(&["pki", "revoke", "--dir", dir_arg, "--serial", &serial]);
    let fleet_keys = keys(&dir);
    assert!(!fleet_keys.knows(&device("meter-2")));
    assert!(verifies(&fleet_keys, "meter-1", &dir.join("meter-1.sign.key")));

    // rotate-key outside a PKI directory is refused (a typo must not start a registry).
    let elsewhere = temp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let refused = run(&["pki", "rotate-key", "--dir", elsewhere.to_str().unwrap(), "meter-1", "--out", "/dev/null/x"]);
    assert!(!refused.status.success());
    assert!(!elsewhere.join("device-keys.txt").exists());

    // A damaged line: every command that edits the registry refuses, naming the line.
    let registry_path = dir.join("device-keys.txt");
    let mut text = std::fs::read_to_string(&registry_path).unwrap();
    text.push_str("meter-3 nothex active 5\n");
    std::fs::write(&registry_path, &text).unwrap();
    let line = text.lines().count();
    let out = dir.join("meter-1-b");
    let failed = run(&["pki", "rotate-key", "--dir", dir_arg, "meter-1", "--out", out.to_str().unwrap()]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains(&format!("line {line}:")), "{stderr}");
    assert!(!dir.join("meter-1-b.sign.key").exists(), "no key may be written that is not registered");
    assert_eq!(std::fs::read_to_string(&registry_path).unwrap(), text);
}
