//! tidesync-firmware: `no_std`, heap-free sensor firmware on embedded-hal 1.0.
//!
//! Bird's-eye view: the [`sampler::Sampler`] asks each scheduled [`sampler::Sensor`] (the
//! [`sht3x`] and [`bmp280`] drivers, generic over the `embedded-hal` I2C and delay traits) for
//! readings when its period is due and stamps them with core's hybrid logical clock over an RTC
//! that may reset. Each sample is appended to the [`log::RingLog`], a power-loss-safe ring of
//! records over any `embedded-storage` NOR flash, which assigns the firmware's gap-free seq. The
//! [`link`] sends logged records to the device agent as COBS frames (postcard body + CRC-32) over an
//! `embedded-io` serial writer, and applies the agent's `Ack { up_to }` frames to the log, which
//! may then erase acknowledged sectors. The same frame decoder runs on the host (the device
//! agent's serial ingest).
//!
//! Invariant: no heap and no `std`; every buffer is a fixed-size array sized by a named constant.
//! Invariant: a record is never erased from flash before the agent acknowledged it.
#![no_std]

pub mod bmp280;
pub mod checksum;
pub mod link;
pub mod log;
pub mod sampler;
pub mod sht3x;
pub mod sim_flash;

pub use tidesync_core::record::ReadingRecord;
