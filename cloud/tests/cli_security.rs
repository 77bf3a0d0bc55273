//! `tidesync-cloud run` says on stdout whether it verifies device signatures (with the registry
//! it uses) or takes events unsigned, before anything else.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use tidesync_core::auth::DeviceSigner;
use tidesync_core::event::{DeviceId, Millis};
use tidesync_core::net::pki::{FleetCa, Identity};

/// Runs the cloud with `extra` config lines until it prints its first stdout line; returns it.
fn first_line(extra: &str, keys: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let ca = FleetCa::create("cli", Millis(now - 3_600_000), Millis(now + 86_400_000)).unwrap();
    let issued = ca.issue(Identity::Cloud, 1, Millis(now - 3_600_000), Millis(now + 86_400_000)).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("cloud.pem"), &issued.cert_pem).unwrap();
    std::fs::write(dir.path().join("cloud.key"), &issued.key_pem).unwrap();
    if let Some(keys) = keys {
        std::fs::write(dir.path().join("device-keys.txt"), keys).unwrap();
    }
    let config = dir.path().join("cloud.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{extra}\n\
             [tls]\nca = \"ca.pem\"\ncert = \"cloud.pem\"\nkey = \"cloud.key\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidesync-cloud"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    assert!(child.wait().unwrap().success());
    line
}

#[test]
fn run_says_whether_it_verifies_signatures() {
    let unsigned = first_line("", None);
    assert!(unsigned.contains("UNSIGNED INGEST"), "{unsigned}");

    let signer = DeviceSigner::from_seed(DeviceId::new("meter-1").unwrap(), [5; 32]);
    let hex: String = signer.public_key().iter().map(|byte| format!("{byte:02x}")).collect();
    let registry = format!("# keys\nmeter-1 {hex} active 1700000000000\n");
    let verifying = first_line("device_keys = \"device-keys.txt\"", Some(&registry));
    assert!(verifying.contains("verifying device signatures against"), "{verifying}");
    assert!(verifying.contains("device-keys.txt") && verifying.contains("1 devices with keys"), "{verifying}");
}
