//! The `tidesync-cloud run` binary: starts from a config file, serves HTTP, and on SIGTERM
//! shuts down gracefully with exit status 0; a bad config is a clear error.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tidesync_core::event::Millis;
use tidesync_core::net::pki::{FleetCa, Identity};

#[test]
fn run_serves_until_sigterm_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let ca = FleetCa::create("cli", Millis(now - 3_600_000), Millis(now + 86_400_000)).unwrap();
    let issued = ca.issue(Identity::Cloud, 1, Millis(now - 3_600_000), Millis(now + 86_400_000)).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("cloud.pem"), &issued.cert_pem).unwrap();
    std::fs::write(dir.path().join("cloud.key"), &issued.key_pem).unwrap();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("cloud.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:{http_port}\"\ndata_dir = \"data\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"cloud.pem\"\nkey = \"cloud.key\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidesync-cloud"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains("http api listening") {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the cloud exited early: {log}");
        log.push_str(&line);
    }
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", http_port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(dir.path().join("data/cloud.sqlite3").exists());
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    stderr.read_to_string(&mut log).unwrap();
    assert!(status.success(), "exit {status}: {log}");
    assert!(log.contains("SIGTERM received") && log.contains("ingest server stopped"), "{log}");
}

#[test]
fn a_bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cloud.toml");
    std::fs::write(&config, "listen = \"not an address\"\n").unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_tidesync-cloud")).args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cloud.toml"), "{stderr}");
}
