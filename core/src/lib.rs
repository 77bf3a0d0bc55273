//! tidesync-core: the protocol of tidesync as sans-IO state machines.
//!
//! Everything that decides *what* happens lives here: the event model and its ids, the hybrid
//! logical clock, version vectors, the wire codec, the automerge device shadow and the sync
//! sessions that move events and shadows between device, gateway and cloud. Nothing here opens a
//! socket or a file, reads a clock or draws a random number: time comes in as [`event::Millis`],
//! storage through the [`ledger::Ledger`] trait, and frames go out through `poll_transmit`. The
//! device agent, the gateway, the cloud and the simulator all drive this same code.
//!
//! The shape of every session, in the manner of `quinn-proto`:
//!
//! ```
//! use tidesync_core::event::{DeviceId, Millis, Payload, SensorReading};
//! use tidesync_core::ledger::{Ledger, MemLedger};
//! use tidesync_core::shadow::ShadowLimits;
//! use tidesync_core::sync::{Ingest, MemStore, SessionConfig, SessionEvent, ShadowKeeping, Uplink};
//!
//! let device = DeviceId::new("pump-7").unwrap();
//! let limits = ShadowLimits::default();
//! let mut on_device = MemStore::new("device:pump-7", MemLedger::pruning(), ShadowKeeping::Only(device), limits);
//! on_device.ledger.record(device, Millis(1_000), Millis(1_000), Payload::Reading(SensorReading {
//!     sensor: "temp".into(), value: 21.5, unit: "Cel".into(),
//! })).unwrap();
//! let mut on_gateway = MemStore::new("gateway:site-1", MemLedger::pruning(), ShadowKeeping::All, limits);
//!
//! let config = SessionConfig::default();
//! let mut uplink = Uplink::for_device(device, config.clone(), Millis(0));
//! // The gateway learnt `device` from the client's certificate.
//! let mut ingest = Ingest::for_gateway(device, config, Millis(0));
//! let now = Millis(5);
//! // Move frames until both sides are quiet; a real host moves bytes over QUIC instead.
//! loop {
//!     let mut moved = false;
//!     while let Some(frame) = uplink.poll_transmit(now, &mut on_device).unwrap() {
//!         ingest.handle_frame(now, frame, &mut on_gateway).unwrap();
//!         moved = true;
//!     }
//!     while let Some(event) = ingest.poll_event() {
//!         if let SessionEvent::EventsReceived(batch) = event {
//!             let appended = on_gateway.append(&batch).unwrap();
//!             ingest.handle_durable(now, batch.device, appended.high);
//!         }
//!     }
//!     while let Some(frame) = ingest.poll_transmit(now, &mut on_gateway) {
//!         uplink.handle_frame(now, frame, &mut on_device).unwrap();
//!         moved = true;
//!     }
//!     while let Some(_event) = uplink.poll_event() {}
//!     if !moved { break }
//! }
//! assert_eq!(on_gateway.high(&device).0, 1);
//! assert_eq!(uplink.acked(&device).0, 1);
//! ```
#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "alloc")]
pub mod auth;
pub mod event;
#[cfg(feature = "alloc")]
mod exact_bytes;
#[cfg(feature = "alloc")]
pub mod ledger;
#[cfg(feature = "net")]
pub mod net;
pub mod rate;
pub mod record;
#[cfg(feature = "std")]
pub mod shadow;
#[cfg(feature = "std")]
pub mod sync;
#[cfg(feature = "alloc")]
pub mod value;
#[cfg(feature = "alloc")]
pub mod vv;
#[cfg(feature = "alloc")]
pub mod wire;
