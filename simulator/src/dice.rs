//! Helpers that draw from the run's one `ChaCha8Rng`. Plain functions over the generator, so that
//! every draw is visible at its call site and the order of draws is the order of the code.

use rand_chacha::ChaCha8Rng;
use rand_core::RngCore;

/// A uniform draw from `low..=high` (returns `low` when the range is empty).
pub fn range(rng: &mut ChaCha8Rng, low: u64, high: u64) -> u64 {
    if high <= low {
        return low;
    }
    let span = high - low + 1;
    // Modulo bias is at most span / 2^64: irrelevant for fault drawing.
    low + rng.next_u64() % span
}

/// True with `percent` % probability.
pub fn chance(rng: &mut ChaCha8Rng, percent: u32) -> bool {
    percent > 0 && (rng.next_u32() % 100) < percent
}

/// A uniform index below `len` (`len` must not be zero).
pub fn index(rng: &mut ChaCha8Rng, len: usize) -> usize {
    assert!(len > 0, "index into an empty set");
    (rng.next_u64() % len as u64) as usize
}
