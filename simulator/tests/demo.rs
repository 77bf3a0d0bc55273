//! The demo (`tidesync-sim demo --exit`) run as a real process: a cloud, two gateways and a small
//! fleet over QUIC on 127.0.0.1 go through a gateway outage and offline devices, and the run must
//! end with every event in the cloud exactly once, every ledger pruned and every desired state
//! delivered (the binary exits non-zero otherwise).

use std::process::Command;

#[test]
fn the_demo_converges_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_tidesync-sim"))
        .args([
            "demo",
            "--devices",
            "6",
            "--phase-secs",
            "1",
            "--rate-hz",
            "20",
            "--http-port",
            "0",
            "--exit",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("devices with every event once:   6 of 6"), "{stdout}");
    assert!(stdout.contains("result:                          PASS"), "{stdout}");
    assert!(dir.path().join("cloud.sqlite3").exists(), "the cloud's store is a real file");
    assert!(stdout.contains("HTTP on http://127.0.0.1:"), "{stdout}");
}
