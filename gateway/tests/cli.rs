//! The `tidesync-gateway` binary: `pki init|issue|revoke` write 0600 files that the TLS layer
//! accepts (and refuses once revoked); `status` reads a spool.
// Helpers outside #[test] functions unwrap too: a failing setup is a failing test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use tidesync_core::event::{DeviceId, GatewayId};
use tidesync_core::net::pki::{self, Identity};
use tidesync_core::net::quic::{Client, Server, TransportLimits};
use tidesync_core::net::tls::Credentials;

fn gateway_cmd(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tidesync-gateway")).args(args).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn credentials(dir: &Path, prefix: &str) -> Credentials {
    Credentials {
        ca_pem: read(&dir.join("ca.pem")),
        cert_pem: read(&dir.join(format!("{prefix}.pem"))),
        key_pem: read(&dir.join(format!("{prefix}.key"))),
        crl_pem: Some(read(&dir.join("crl.pem"))),
    }
}

/// Whether the device's handshake with the gateway (both as issued by the CLI) succeeds.
async fn handshake_succeeds(dir: &Path) -> bool {
    let server =
        Server::bind("127.0.0.1:0".parse().unwrap(), &credentials(dir, "gw"), TransportLimits::default()).unwrap();
    let addr = server.local_addr().unwrap();
    let client =
        Client::bind("127.0.0.1:0".parse().unwrap(), &credentials(dir, "dev"), &TransportLimits::default()).unwrap();
    let (_client, accepted) = tokio::join!(client.connect(addr, pki::GATEWAY_SERVER_NAME, 5_000), async {
        server.accept().await.unwrap().establish().await
    });
    accepted.is_ok()
}

#[tokio::test]
async fn pki_commands_write_private_files_that_tls_accepts_until_revoked() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("pki");
    let dir_arg = dir.to_str().unwrap();
    gateway_cmd(&["pki", "init", "--dir", dir_arg, "--fleet", "test"]);
    let out = gateway_cmd(&[
        "pki",
        "issue",
        "--dir",
        dir_arg,
        "--gateway",
        "site-1",
        "--out",
        dir.join("gw").to_str().unwrap(),
    ]);
    assert!(out.contains("issued serial 1 for gateway site-1"), "{out}");
    let out = gateway_cmd(&[
        "pki",
        "issue",
        "--dir",
        dir_arg,
        "--device",
        "pump-7",
        "--out",
        dir.join("dev").to_str().unwrap(),
    ]);
    assert!(out.contains("issued serial 2 for device pump-7"), "{out}");
    for name in ["ca.pem", "ca.key", "crl.pem", "serial", "revoked", "gw.pem", "gw.key", "dev.pem", "dev.key"] {
        let mode = std::fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
    }
    let device_der = pki::first_cert_der(&read(&dir.join("dev.pem"))).unwrap();
    assert_eq!(pki::identity_of(&device_der).unwrap(), Identity::Device(DeviceId::new("pump-7").unwrap()));
    let gateway_der = pki::first_cert_der(&read(&dir.join("gw.pem"))).unwrap();
    assert_eq!(pki::identity_of(&gateway_der).unwrap(), Identity::Gateway(GatewayId::new("site-1").unwrap()));
    assert!(handshake_succeeds(&dir).await);

    let out = gateway_cmd(&["pki", "revoke", "--dir", dir_arg, "--cert", dir.join("dev.pem").to_str().unwrap()]);
    assert!(out.contains("revoked serial 2"), "{out}");
    assert_eq!(read(&dir.join("revoked")), "2\n");
    assert!(!handshake_succeeds(&dir).await, "revoked device still accepted");
}

#[test]
fn status_reports_the_spool() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let spool = tidesync_gateway::spool::Spool::open(
        &dir.join("spool.db"),
        "gateway:site-1",
        1_000,
        tidesync_core::shadow::ShadowLimits::default(),
    )
    .unwrap();
    drop(spool);
    std::fs::write(
        dir.join("gateway.toml"),
        "gateway = \"site-1\"\nlisten = \"127.0.0.1:0\"\nspool = \"spool.db\"\nspool_budget_bytes = 1000\n\
         [tls]\nca = \"ca.pem\"\ncert = \"gw.pem\"\nkey = \"gw.key\"\n",
    )
    .unwrap();
    let out = gateway_cmd(&["status", "--config", dir.join("gateway.toml").to_str().unwrap()]);
    assert!(out.contains("gateway site-1"), "{out}");
    assert!(out.contains("spool: 0 devices, 0 events held, 0 of 1000 bytes"), "{out}");
    assert!(out.contains("no metrics endpoint configured"), "{out}");
}
