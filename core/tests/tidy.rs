//! Tidy checks of the rules in STYLE.md that a compiler does not enforce: core does no IO, and
//! every source file says what it owns in a `//!` line.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != "fuzz" && !name.to_string_lossy().starts_with('.') {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn core_does_no_io() {
    // Words that mean IO, threads, wall clocks or ambient randomness. The QUIC glue, when it comes,
    // lives in `src/net.rs` and `src/net/` behind the `net` feature, and is exempt.
    let forbidden = [
        "std::fs",
        "std::net",
        "std::thread",
        "std::process",
        "std::env",
        "Instant::now",
        "SystemTime::now",
        "tokio",
        "rusqlite",
        "quinn",
        "thread_rng",
        "getrandom",
        "rand::",
    ];
    let mut files = Vec::new();
    rust_files(&workspace_root().join("core/src"), &mut files);
    assert!(files.len() > 10, "found the sources");
    let mut offenders = Vec::new();
    for file in files {
        let relative = file.strip_prefix(workspace_root()).unwrap_or(&file).to_string_lossy().into_owned();
        if relative.contains("src/net") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read");
        // Comments may name these things (e.g. "in the manner of quinn-proto"); code may not.
        let code: String =
            text.lines().filter(|line| !line.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        for word in forbidden {
            if code.contains(word) {
                offenders.push(format!("{relative}: {word}"));
            }
        }
    }
    assert!(offenders.is_empty(), "core must not do IO:\n{}", offenders.join("\n"));
}

#[test]
fn every_source_file_starts_with_a_module_doc() {
    let mut files = Vec::new();
    for crate_dir in ["core", "device", "gateway", "cloud", "firmware", "simulator", "tests"] {
        rust_files(&workspace_root().join(crate_dir), &mut files);
    }
    let missing: Vec<String> = files
        .iter()
        .filter(|file| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|file| file.strip_prefix(workspace_root()).unwrap_or(file).display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a `//!` line saying what they own:\n{}", missing.join("\n"));
}
