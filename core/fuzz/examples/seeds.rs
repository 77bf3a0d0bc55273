//! Writes seed corpora for every target of this crate from real encoded values and from core's
//! committed wire fixtures: `cargo run --example seeds -- <corpus dir>` creates
//! `<corpus dir>/<target>/seed-*` (existing files are kept; the fuzzer dedupes by coverage).

use std::path::{Path, PathBuf};

use tidesync_core::wire::Frame;
use tidesync_core_fuzz::all_seeds;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)
}

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".to_string()));
    let mut total = 0;
    for (target, seeds) in all_seeds() {
        for (index, seed) in seeds.iter().enumerate() {
            write(&root.join(target), &format!("seed-{index:03}"), seed)?;
            total += 1;
        }
    }
    // The golden fixtures: every frame type as committed bytes.
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v1");
    for entry in std::fs::read_dir(&fixtures)? {
        let path = entry?.path();
        let bytes = std::fs::read(&path)?;
        let name = format!("fixture-{}", path.file_name().map(|name| name.to_string_lossy()).unwrap_or_default());
        write(&root.join("frame_decoder"), &name, &bytes)?;
        total += 1;
        match Frame::decode(&bytes) {
            Ok((Frame::Events(batch), _)) => {
                let mut body = Vec::new();
                batch.encode(&mut body);
                write(&root.join("event_batch"), &name, &body)?;
                total += 1;
            }
            Ok((Frame::ShadowSync(sync), _)) => {
                for selector in [0u8, 1] {
                    let mut seed = vec![selector];
                    seed.extend_from_slice(&sync.message);
                    write(&root.join("shadow_sync"), &format!("{name}-{selector}"), &seed)?;
                    total += 1;
                }
            }
            _ if name.contains("reading_record") => {
                write(&root.join("firmware_link"), &name, &bytes)?;
                total += 1;
            }
            _ => {}
        }
    }
    println!("wrote {total} seed files under {}", root.display());
    Ok(())
}
