//! The QUIC/TLS glue and the fleet PKI (feature `net`): the only part of core that does IO.
//!
//! It makes no protocol decision. [`pki`] makes and reads the fleet's certificates, [`tls`] turns
//! them into rustls configurations that authenticate both ends, and [`quic`] builds quinn
//! endpoints and carries core's wire frames over QUIC streams. The daemons drive core's sans-IO
//! sessions with these pieces: read a frame, `handle_frame`, `poll_transmit`, write.

pub mod pki;
pub mod quic;
pub mod tls;
