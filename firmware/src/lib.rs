//! tidesync-firmware: `no_std` sensor firmware on embedded-hal 1.0.
//!
//! It will own the sensor drivers, the sampler, the power-loss-safe flash ring log and the
//! framed hand-off link to the device agent. It builds on core without default features, so it
//! uses only core's heap-free parts ([`tidesync_core::event`], [`tidesync_core::record`]).
#![no_std]

pub use tidesync_core::record::ReadingRecord;
