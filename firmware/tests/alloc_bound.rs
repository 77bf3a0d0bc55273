//! The hand-off link's decoders allocate nothing: the frame decoder, record decoding and the
//! firmware's ack handling run on fixed buffers, whatever the serial line delivers. The firmware
//! has no heap at all; on the host (the device agent runs the same decoder) a counting global
//! allocator checks it, over random noise, corrupted real frames and oversized frames.
#![allow(unsafe_code)] // A GlobalAlloc implementation is unsafe by definition; it only counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tidesync_core::event::{Hlc, Millis, Seq};
use tidesync_core::record::ReadingRecord;
use tidesync_firmware::link::{encode_frame, FrameDecoder, Link, Message, DELIMITER, FRAME_BYTES_MAX};
use tidesync_firmware::log::RingLog;
use tidesync_firmware::sim_flash::SimFlash;

type Flash = SimFlash<2048, 512, 4>;

struct Counting;

thread_local! {
    // Per thread, so tests running in parallel do not count each other's allocations.
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator unchanged and only keeps a counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|count| count.set(count.get() + layout.size()));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated by this thread while `work` runs.
fn allocated_while(work: impl FnOnce()) -> usize {
    let before = ALLOCATED.with(Cell::get);
    work();
    ALLOCATED.with(Cell::get) - before
}

/// A small deterministic generator (xorshift64*), so the inputs are the same on every run.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn record(seq: u64) -> ReadingRecord<'static> {
    ReadingRecord {
        seq: Seq(seq),
        hlc: Hlc { wall_ms: 1_763_900_000_000 + seq, logical: 0 },
        event_time: Millis(1_763_900_000_000 + seq),
        sensor: "sht3x.temperature",
        value: 21.37,
        unit: "Cel",
    }
}

/// Everything the link decodes from `bytes`: frames on the agent's side, the bytes as a record,
/// and acks on the firmware's side.
fn decode_everything(bytes: &[u8], decoder: &mut FrameDecoder, link: &mut Link, log: &mut RingLog<Flash, 4>) -> usize {
    let mut frames = 0;
    decoder.feed(bytes, |frame| {
        frames += 1;
        if let Ok(Message::Record(record)) = frame {
            assert!(record.sensor.len() <= 64);
        }
    });
    let _ = ReadingRecord::decode(bytes);
    let _ = link.handle_rx(1, bytes, log);
    frames
}

#[test]
fn link_decoding_allocates_nothing() {
    let mut log = RingLog::<Flash, 4>::open(Flash::new()).expect("open");
    for seq in 1..=3 {
        log.append_reading(record(seq)).expect("append");
    }
    let mut link = Link::new(log.acked(), 0, 4, 1_000);
    let mut decoder = FrameDecoder::new();
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    // Random noise, with and without delimiters.
    for round in 0..500 {
        let len = (noise.next() % 1024) as usize;
        let mut bytes = noise.bytes(len);
        if round % 2 == 0 {
            bytes.retain(|byte| *byte != DELIMITER);
            bytes.push(DELIMITER);
        }
        inputs.push(bytes);
    }
    // Real record and ack frames with bytes flipped.
    let mut real = Vec::new();
    for seq in 1..=5 {
        real.extend_from_slice(encode_frame(&Message::Record(record(seq))).expect("encodes").as_bytes());
        real.extend_from_slice(encode_frame(&Message::Ack { up_to: Seq(seq) }).expect("encodes").as_bytes());
    }
    for _ in 0..500 {
        let mut bytes = real.clone();
        for _ in 0..3 {
            let at = (noise.next() as usize) % bytes.len();
            bytes[at] ^= noise.next() as u8;
        }
        inputs.push(bytes);
    }
    // A frame far over the bound, and one exactly at it.
    let mut oversized = vec![0x42u8; FRAME_BYTES_MAX * 20];
    oversized.push(DELIMITER);
    inputs.push(oversized);
    let mut at_bound = vec![0xffu8; FRAME_BYTES_MAX];
    at_bound.push(DELIMITER);
    inputs.push(at_bound);
    let mut frames = 0;
    for bytes in &inputs {
        let allocated = allocated_while(|| frames += decode_everything(bytes, &mut decoder, &mut link, &mut log));
        assert_eq!(allocated, 0, "decoding {} bytes allocated {allocated} bytes", bytes.len());
    }
    assert!(frames > 1_000, "the inputs reached the frame decoder ({frames} frames)");
    // The counter works: this allocation is seen.
    assert!(allocated_while(|| drop(std::hint::black_box(vec![0u8; 100]))) >= 100);
}
