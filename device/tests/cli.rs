//! The `tidesync-device` command line, run as a real process on a real data dir: init, record
//! (all-or-nothing and `--follow`), status, shadow get/report, export, and its errors.

// Test helpers outside #[test] functions may unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_tidesync-device");

fn run(data_dir: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout_json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn init_record_status_export_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let init = stdout_json(&run(&data, &["init", "--device-id", "pump-7"], ""));
    assert_eq!(init["device_id"], "pump-7");
    // A second init refuses to overwrite.
    let again = run(&data, &["init", "--device-id", "pump-7"], "");
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already exists"), "{}", stderr(&again));

    let lines = "{\"sensor\":\"temp\",\"value\":21.5,\"unit\":\"Cel\",\"event_time_ms\":1700000000000}\n\
                 \n\
                 {\"kind\":\"log\",\"level\":\"warn\",\"message\":\"fan slow\"}\n\
                 {\"kind\":\"app\",\"content_type\":\"text/plain\",\"data\":\"hello\"}\n";
    let recorded = stdout_json(&run(&data, &["record"], lines));
    assert_eq!((recorded["recorded"].as_u64(), recorded["first_seq"].as_u64()), (Some(3), Some(1)));

    let status = stdout_json(&run(&data, &["status"], ""));
    assert_eq!(status["next_seq"], 4);
    assert_eq!(status["backlog_events"], 3);
    assert_eq!(status["device_id"], "pump-7");

    let export = run(&data, &["export"], "");
    assert!(export.status.success());
    let events: Vec<serde_json::Value> =
        String::from_utf8(export.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["seq"], 1);
    assert_eq!(events[0]["event_time_ms"], 1_700_000_000_000u64);
    let export_from = run(&data, &["export", "--from", "3"], "");
    assert_eq!(String::from_utf8(export_from.stdout).unwrap().lines().count(), 1);
}

#[test]
fn a_bad_line_is_reported_by_number_and_nothing_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    stdout_json(&run(&data, &["init", "--device-id", "pump-7"], ""));
    let lines = "{\"sensor\":\"temp\",\"value\":1}\n\
                 not json\n\
                 {\"sensor\":\"temp\",\"value\":2}\n\
                 {\"sensor\":\"\",\"value\":3}\n\
                 {\"sensor\":\"temp\",\"value\":4,\"colour\":\"red\"}\n";
    let output = run(&data, &["record"], lines);
    assert!(!output.status.success());
    let errors = stderr(&output);
    for line in ["line 2", "line 4", "line 5"] {
        assert!(errors.contains(&format!("error: {line}:")), "{line} not reported: {errors}");
    }
    assert!(!errors.contains("line 1:") && !errors.contains("line 3:"), "{errors}");
    assert_eq!(stdout_json(&run(&data, &["status"], ""))["next_seq"], 1, "no partial write");

    // --follow records the good lines one by one and reports the bad ones.
    let output = run(&data, &["record", "--follow"], lines);
    assert!(!output.status.success(), "a bad line makes the exit status non-zero");
    let acks: Vec<serde_json::Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(acks, vec![serde_json::json!({"line": 1, "seq": 1}), serde_json::json!({"line": 3, "seq": 2})]);
}

#[test]
fn shadow_report_and_get() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    stdout_json(&run(&data, &["init", "--device-id", "pump-7"], ""));
    let reported = stdout_json(&run(&data, &["shadow", "report", "mode=eco", "interval_s=30"], ""));
    assert_eq!(reported["event_seqs"], serde_json::json!([1, 2]));
    let shadow = stdout_json(&run(&data, &["shadow", "get"], ""));
    assert_eq!(shadow["reported"]["mode"], "eco");
    assert_eq!(shadow["reported"]["interval_s"], 30);
    let bad = run(&data, &["shadow", "report", "novalue"], "");
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("KEY=VALUE"), "{}", stderr(&bad));
}

#[test]
fn a_tiny_budget_refuses_with_a_clear_error_and_flags_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    stdout_json(&run(&data, &["--budget-bytes", "200", "init", "--device-id", "pump-7"], ""));
    let config = std::fs::read_to_string(data.join("tidesync-device.toml")).unwrap();
    assert!(config.contains("budget_bytes = 200"), "{config}");
    let lines: String = (0..10).map(|i| format!("{{\"sensor\":\"temp\",\"value\":{i}}}\n")).collect();
    let output = run(&data, &["record"], &lines);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("ledger is full"), "{}", stderr(&output));
    // With a larger budget from the command line, the same input goes in.
    let recorded = stdout_json(&run(&data, &["--budget-bytes", "100000", "record"], &lines));
    assert_eq!(recorded["recorded"], 10);
}

#[test]
fn commands_on_a_missing_or_foreign_data_dir_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(&dir.path().join("nowhere"), &["status"], "");
    assert!(!output.status.success());
    assert!(stderr(&output).contains("tidesync-device init"), "{}", stderr(&output));

    let data = dir.path().join("data");
    stdout_json(&run(&data, &["init", "--device-id", "pump-7"], ""));
    std::fs::write(data.join("ledger.sqlite3"), b"garbage garbage garbage").unwrap();
    let output = run(&data, &["status"], "");
    assert!(!output.status.success());
    assert!(stderr(&output).contains("not an SQLite database"), "{}", stderr(&output));
    assert_eq!(std::fs::read(data.join("ledger.sqlite3")).unwrap(), b"garbage garbage garbage");

    let bad_id = run(&dir.path().join("other"), &["init", "--device-id", "pump 7"], "");
    assert!(!bad_id.status.success());
    assert!(stderr(&bad_id).contains("invalid device id"), "{}", stderr(&bad_id));
}

#[test]
fn init_takes_a_signing_key_and_run_refuses_a_damaged_one_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "9f".repeat(32);
    let key = dir.path().join("pump-7.sign.key");
    std::fs::write(&key, format!("{secret}\n")).unwrap();

    // A missing key: init refuses and creates nothing.
    let data = dir.path().join("data");
    let missing = run(&data, &["init", "--device-id", "pump-7", "--signing-key", "/nonexistent/x.sign.key"], "");
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("no signing key at /nonexistent/x.sign.key"), "{}", stderr(&missing));
    assert!(!data.exists());

    let init = stdout_json(&run(&data, &["init", "--device-id", "pump-7", "--signing-key", key.to_str().unwrap()], ""));
    let public = init["signing_public_key"].as_str().unwrap();
    assert_eq!(public.len(), 64);
    let config = std::fs::read_to_string(data.join("tidesync-device.toml")).unwrap();
    assert!(config.contains(&format!("signing_key = \"{}\"", key.display())), "{config}");

    // The key is damaged later: `run` stops before connecting, names the file, shows no secret.
    std::fs::write(&key, format!("{}\n", &secret[..50])).unwrap();
    let damaged = run(&data, &["run", "--gateway", "127.0.0.1:9"], "");
    assert!(!damaged.status.success());
    let message = stderr(&damaged);
    assert!(message.contains("is damaged") && message.contains("64 hex digits"), "{message}");
    assert!(!message.contains(&secret[..16]), "the secret was printed: {message}");
    std::fs::remove_file(&key).unwrap();
    let gone = run(&data, &["run", "--gateway", "127.0.0.1:9"], "");
    assert!(!gone.status.success());
    assert!(stderr(&gone).contains("no signing key at"), "{}", stderr(&gone));
}
