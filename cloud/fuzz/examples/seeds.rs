//! Writes the seed corpora: for `http_bodies`, real desired-state bodies and query strings as the
//! dashboard and the API's users send them; for `sqlite_segment`, segments as the SQLite store
//! writes them. `cargo run --example seeds -- <corpus dir>`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".to_string()));
    let dir = root.join("http_bodies");
    std::fs::create_dir_all(&dir)?;
    let deep = format!("{{\"deep\": {}1{}}}", "[".repeat(16), "]".repeat(16));
    let seeds: Vec<(u8, String)> = vec![
        (0, r#"{"rate_s": 5}"#.into()),
        (0, r#"{"limits": {"max": 80.5, "min": -3}, "gone": null}"#.into()),
        (0, r#"{"tags": ["roof", true, null, 1.5e3, "\u00e9\n"]}"#.into()),
        (0, deep),
        (0, "{}".into()),
        (0, "[1, 2]".into()),
        (1, "from_seq=1&to_seq=100&limit=10".into()),
        (1, "from_ms=0&to_ms=1763900000000&after_ms=1763899999000&after_seq=42&limit=1000".into()),
        (1, "from_seq=%31%30&limit=0".into()),
        (2, "sensor=sht31.temperature&resolution=hour&limit=5".into()),
        (2, "resolution=minute".into()),
        (3, "device=pump-7&limit=3".into()),
        (3, "device=a%7Cb".into()),
        (4, "pump-7".into()),
        (4, "site-1.gw_2".into()),
    ];
    for (index, (selector, text)) in seeds.iter().enumerate() {
        let mut bytes = vec![*selector];
        bytes.extend_from_slice(text.as_bytes());
        std::fs::write(dir.join(format!("seed-{index:03}")), bytes)?;
    }
    println!("wrote {} seed files under {}", seeds.len(), dir.display());
    segment_seeds(&root)
}

/// Segments of readings, logs and an unknown kind, with times out of order, prefixed by their
/// event count as the target reads it.
fn segment_seeds(root: &std::path::Path) -> std::io::Result<()> {
    use tidesync_cloud::store::sqlite::segment::{RawEvent, SegmentEncoder};
    let dir = root.join("sqlite_segment");
    std::fs::create_dir_all(&dir)?;
    let bodies: [&[u8]; 3] = [b"\x04temp\x00\x00\x00\x00\x00\x00\x39\x40\x03Cel", b"\x01\x05hello", b""];
    for (index, n_events) in [0u16, 1, 3, 40].into_iter().enumerate() {
        let mut encoder = SegmentEncoder::new();
        for seq in 0..u64::from(n_events) {
            encoder.push(&RawEvent {
                hlc_wall_ms: 1_763_900_000_000 + seq,
                hlc_logical: (seq % 2) as u32,
                event_time_ms: 1_763_900_000_000 + (seq * 7_919) % 5_000,
                kind: [1, 3, 77][(seq % 3) as usize],
                schema_version: 1,
                body: bodies[(seq % 3) as usize],
            });
        }
        let mut bytes = n_events.to_le_bytes().to_vec();
        bytes.extend_from_slice(encoder.finish());
        std::fs::write(dir.join(format!("seed-{index:03}")), bytes)?;
    }
    println!("wrote 4 seed files under {}", dir.display());
    Ok(())
}
