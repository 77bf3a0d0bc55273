//! Decoding allocates in proportion to the input, never to a length the input merely claims.
//! A counting global allocator measures the peak heap growth of decoding random and corrupted
//! inputs, and of inputs that lie about their sizes.
#![allow(unsafe_code)] // A GlobalAlloc implementation is unsafe by definition; it only counts.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tidesync_core::wire::{EventBatch, Frame, FrameDecoder};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator unchanged and only keeps counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Most heap bytes decoding may use per input byte, plus a constant. An event in memory is about
/// a hundred bytes and the smallest encoded row is four, so 64 is the honest ceiling.
const HEAP_BYTES_PER_INPUT_BYTE_MAX: usize = 64;
const HEAP_BYTES_BASE_MAX: usize = 64 * 1024;

fn peak_while(work: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    work();
    PEAK.load(Ordering::SeqCst) - base
}

fn check(bytes: &[u8]) {
    let peak = peak_while(|| {
        let _ = Frame::decode(bytes);
        let _ = EventBatch::decode(bytes.get(2..).unwrap_or_default());
        let mut decoder = FrameDecoder::new();
        decoder.push(bytes);
        while let Ok(Some(_)) = decoder.next_frame() {}
    });
    let bound = HEAP_BYTES_PER_INPUT_BYTE_MAX * bytes.len() + HEAP_BYTES_BASE_MAX;
    assert!(peak <= bound, "decoding {} bytes allocated {peak} bytes (bound {bound})", bytes.len());
}

#[test]
fn decoding_allocation_is_bounded_by_the_input() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Random bytes, and random bytes behind a plausible events-frame header.
    for round in 0..2_000 {
        let len = (rng.next_u32() % 4096) as usize;
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        if round % 2 == 0 && len > 8 {
            bytes[0] = 0xff;
            bytes[1] = 0x7f;
            bytes[2] = 3;
        }
        check(&bytes);
    }
    // Valid frames with bytes flipped.
    let frame = Frame::Events(
        EventBatch::new(common::device("pump-7"), tidesync_core::event::Seq(1), common::one_hz_readings(500))
            .expect("valid"),
    );
    let valid = frame.to_bytes();
    for _ in 0..500 {
        let mut bytes = valid.clone();
        for _ in 0..4 {
            let at = (rng.next_u32() as usize) % bytes.len();
            bytes[at] ^= rng.next_u32() as u8;
        }
        check(&bytes);
    }
    // Inputs that claim huge counts.
    for dir_entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz-crashers")).expect("dir") {
        check(&std::fs::read(dir_entry.expect("entry").path()).expect("read"));
    }
}
