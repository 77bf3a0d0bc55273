//! The frames of the sync protocol and their byte encoding.
//!
//! A frame on a stream is `[length: LEB128 u32][type: u8][body]`, where the length counts type and
//! body and is checked against [`FRAME_BYTES_MAX`] before anything is buffered for it. Bodies are
//! postcard, except event batches, which have a compact columnar-ish encoding of their own
//! ([`batch`]): ids are implicit (a batch is a contiguous run of one device's seqs), clocks are
//! delta-encoded, sensor names are a per-batch dictionary and values are decimal-scaled deltas.
//!
//! Compatibility rules (see ARCHITECTURE.md, "Wire compatibility"): frame type tags are never
//! reused; an unknown type is reported as [`DecodeError::UnknownFrameType`] and the frame can be
//! skipped, since its length is known; a body may grow only by trailing fields, which older
//! readers ignore; anything else is a new protocol version, negotiated in `Hello`/`Welcome`.
//! Golden bytes of every frame type live in `core/tests/fixtures/` and must keep decoding.

pub mod batch;
mod codec;

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

pub use batch::{BatchError, EventBatch, BATCH_EVENTS_MAX};
use codec::{read_length_prefix, LengthPrefix};

use crate::event::{DeviceId, GatewayId, Millis, Seq};
use crate::vv::VersionVector;

/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest protocol version this build still speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Largest frame (type + body), in bytes. Checked before any buffer is grown for a frame.
pub const FRAME_BYTES_MAX: usize = 1024 * 1024;
/// Most bytes a length prefix takes.
pub const LENGTH_PREFIX_BYTES_MAX: usize = 5;

/// One message of the sync protocol.
// Most frames a session moves are `Events`: boxing the batch would cost an allocation per batch to
// shrink the small control frames.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Frame {
    /// Opens a session: who the client is and what it holds.
    Hello(Hello),
    /// Accepts a session: the negotiated version and what the server holds.
    Welcome(Welcome),
    /// A contiguous run of one device's events.
    Events(EventBatch),
    /// The receiver holds the device's events up to a seq durably (gateway custody).
    Custody(Ack),
    /// The cloud store holds the device's events up to a seq durably (commit).
    Commit(Ack),
    /// The receiver will not take a device's events for now; the sender keeps them and retries.
    Backpressure(Backpressure),
    /// An automerge sync message for one device's shadow.
    ShadowSync(ShadowSync),
    /// A fatal error: the sender closes the session after it.
    Error(ErrorFrame),
    /// Keeps an idle session open and reports the sender's backlog.
    KeepAlive(KeepAlive),
    /// The sender ends the session cleanly.
    Goodbye(Goodbye),
}

/// Frame type tags. Never reuse one.
mod tag {
    pub(super) const HELLO: u8 = 1;
    pub(super) const WELCOME: u8 = 2;
    pub(super) const EVENTS: u8 = 3;
    pub(super) const CUSTODY: u8 = 4;
    pub(super) const COMMIT: u8 = 5;
    pub(super) const BACKPRESSURE: u8 = 6;
    pub(super) const SHADOW_SYNC: u8 = 7;
    pub(super) const ERROR: u8 = 8;
    pub(super) const KEEP_ALIVE: u8 = 9;
    pub(super) const GOODBYE: u8 = 10;
}

/// Who is on the other end of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// A device agent, sending its own events.
    Device(DeviceId),
    /// A gateway, sending the events its devices gave it.
    Gateway(GatewayId),
}

/// First frame of a session, client to server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the client speaks.
    pub protocol_min: u16,
    /// Newest protocol version the client speaks.
    pub protocol_max: u16,
    /// Who the client says it is (the server checks this against its certificate).
    pub peer: Peer,
    /// What the client holds.
    pub vv: VersionVector,
    /// The client's wall clock when it said hello.
    pub wall: Millis,
}

/// Server's answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both sides will speak.
    pub protocol: u16,
    /// What the server holds of the devices the client may send, counting what it already passed
    /// upstream: the client sends each device's events after its entry here.
    pub vv: VersionVector,
    /// The server's wall clock, so a device whose RTC was reset can learn the time.
    pub wall: Millis,
}

/// An acknowledgement that a device's events up to `up_to` are durable at the sender of the ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The device.
    pub device: DeviceId,
    /// Highest contiguous seq held durably.
    pub up_to: Seq,
}

/// Why a receiver refuses events for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BackpressureReason {
    /// Its store is at its byte budget (a gateway whose cloud is unreachable).
    StoreFull,
    /// The device is over its rate limit.
    RateLimited,
    /// The receiver's queue of events waiting to be made durable is full.
    Busy,
    /// The device's events failed verification (protocol 2): the sender holds them, for an
    /// operator to look at, and offers them again much later.
    Refused,
}

/// The receiver will not take a device's events for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backpressure {
    /// The device whose events are refused.
    pub device: DeviceId,
    /// What the receiver holds durably of that device; the sender resumes after it.
    pub up_to: Seq,
    /// When to try again, in ms.
    pub retry_after_ms: u32,
    /// Why.
    pub reason: BackpressureReason,
}

/// Largest automerge sync message in a [`ShadowSync`], in bytes.
pub const SHADOW_MESSAGE_BYTES_MAX: usize = 512 * 1024;

/// An automerge sync message for one device's shadow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowSync {
    /// Whose shadow.
    pub device: DeviceId,
    /// The automerge sync message bytes.
    #[serde(with = "crate::exact_bytes")]
    pub message: Vec<u8>,
}

/// Stable numeric codes of fatal session errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
#[non_exhaustive]
pub enum ErrorCode {
    /// No protocol version in common.
    ProtocolVersion,
    /// A frame did not decode.
    Malformed,
    /// A frame named a device the peer may not write for, or the peer is not who it says.
    Unauthorized,
    /// A frame was larger than [`FRAME_BYTES_MAX`].
    FrameTooLarge,
    /// A frame arrived that the session's state does not allow (e.g. events before `Hello`).
    UnexpectedFrame,
    /// A shadow sync message was refused (too large, or the shadow would exceed its bound).
    ShadowRejected,
    /// The peer sent nothing for longer than the idle timeout.
    IdleTimeout,
    /// The receiver failed internally (its store failed); the sender keeps its data and retries.
    Internal,
    /// A code this build does not know.
    Unknown(u16),
}

impl From<u16> for ErrorCode {
    fn from(code: u16) -> Self {
        match code {
            1 => ErrorCode::ProtocolVersion,
            2 => ErrorCode::Malformed,
            3 => ErrorCode::Unauthorized,
            4 => ErrorCode::FrameTooLarge,
            5 => ErrorCode::UnexpectedFrame,
            6 => ErrorCode::ShadowRejected,
            7 => ErrorCode::IdleTimeout,
            8 => ErrorCode::Internal,
            other => ErrorCode::Unknown(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        match code {
            ErrorCode::ProtocolVersion => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::Unauthorized => 3,
            ErrorCode::FrameTooLarge => 4,
            ErrorCode::UnexpectedFrame => 5,
            ErrorCode::ShadowRejected => 6,
            ErrorCode::IdleTimeout => 7,
            ErrorCode::Internal => 8,
            ErrorCode::Unknown(other) => other,
        }
    }
}

/// A fatal error, sent before closing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// What kind of error.
    pub code: ErrorCode,
    /// For people reading logs.
    pub message: String,
}

/// Keeps a session open and says how much the sender still has to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepAlive {
    /// Events the sender holds that the receiver has not acknowledged.
    pub backlog_events: u64,
}

/// Why a session ends cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GoodbyeReason {
    /// The sender is shutting down.
    Shutdown,
    /// Nothing left to do for a while.
    Idle,
    /// The sender moves to another gateway.
    Roaming,
}

/// Ends a session cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    /// Why.
    pub reason: GoodbyeReason,
}

/// Why bytes are not a frame. Decoding never panics and never allocates more than the input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix is not a LEB128 u32.
    #[error("malformed frame length prefix")]
    LengthPrefix,
    /// The declared length is over [`FRAME_BYTES_MAX`].
    #[error("frame of {len_bytes} bytes exceeds the maximum of {max_bytes}")]
    FrameTooLarge {
        /// Declared length.
        len_bytes: u64,
        /// The limit.
        max_bytes: usize,
    },
    /// A frame of length 0 (no type byte).
    #[error("empty frame")]
    Empty,
    /// The input ends inside a frame.
    #[error("input ends inside a frame: {needed_bytes} more bytes needed")]
    Truncated {
        /// How many more bytes the frame needs.
        needed_bytes: usize,
    },
    /// A frame type this build does not know; the frame can be skipped.
    #[error("unknown frame type {tag}")]
    UnknownFrameType {
        /// The type byte.
        tag: u8,
    },
    /// A postcard body that does not decode.
    #[error("{frame} frame body does not decode: {reason}")]
    Body {
        /// Which frame type.
        frame: &'static str,
        /// What postcard said.
        reason: postcard::Error,
    },
    /// An event batch that does not decode.
    #[error("event batch: {0}")]
    Batch(#[from] BatchError),
    /// A shadow sync message larger than [`SHADOW_MESSAGE_BYTES_MAX`].
    #[error("shadow sync message of {len_bytes} bytes exceeds the maximum of {max_bytes}")]
    ShadowMessageTooLarge {
        /// Its length.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
}

impl DecodeError {
    /// The error code to send to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

impl Frame {
    /// A short name of the frame's type, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Welcome(_) => "welcome",
            Frame::Events(_) => "events",
            Frame::Custody(_) => "custody",
            Frame::Commit(_) => "commit",
            Frame::Backpressure(_) => "backpressure",
            Frame::ShadowSync(_) => "shadow_sync",
            Frame::Error(_) => "error",
            Frame::KeepAlive(_) => "keep_alive",
            Frame::Goodbye(_) => "goodbye",
        }
    }

    /// The device a frame is about, for frames that carry one.
    pub fn device(&self) -> Option<DeviceId> {
        match self {
            Frame::Events(batch) => Some(batch.device),
            Frame::Custody(ack) | Frame::Commit(ack) => Some(ack.device),
            Frame::Backpressure(backpressure) => Some(backpressure.device),
            Frame::ShadowSync(sync) => Some(sync.device),
            _ => None,
        }
    }

    /// Appends the frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Frame::Events(batch) = self {
            return Frame::encode_events(batch, out);
        }
        let mut body = Vec::new();
        let tag = self.encode_body(&mut body);
        let len = body.len() + 1;
        debug_assert!(len <= FRAME_BYTES_MAX, "sessions bound what they put in a frame");
        codec::put_varint(out, len as u64);
        out.push(tag);
        out.extend_from_slice(&body);
    }

    /// Appends an events frame for `batch` without taking ownership of it: the same bytes as
    /// `Frame::Events(batch.clone()).encode(out)`, without the clone.
    pub fn encode_events(batch: &EventBatch, out: &mut Vec<u8>) {
        let mut body = Vec::with_capacity(16 + 8 * batch.events.len());
        batch.encode(&mut body);
        codec::put_varint(out, body.len() as u64 + 1);
        out.push(tag::EVENTS);
        out.extend_from_slice(&body);
    }

    /// The frame's bytes, length prefix included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Length of the encoded frame without its prefix.
    pub fn encoded_len(&self) -> usize {
        let mut body = Vec::new();
        self.encode_body(&mut body);
        body.len() + 1
    }

    fn encode_body(&self, body: &mut Vec<u8>) -> u8 {
        use crate::event::put_postcard as put;
        match self {
            Frame::Hello(hello) => {
                put(body, hello);
                tag::HELLO
            }
            Frame::Welcome(welcome) => {
                put(body, welcome);
                tag::WELCOME
            }
            Frame::Events(batch) => {
                batch.encode(body);
                tag::EVENTS
            }
            Frame::Custody(ack) => {
                put(body, ack);
                tag::CUSTODY
            }
            Frame::Commit(ack) => {
                put(body, ack);
                tag::COMMIT
            }
            Frame::Backpressure(backpressure) => {
                put(body, backpressure);
                tag::BACKPRESSURE
            }
            Frame::ShadowSync(sync) => {
                put(body, sync);
                tag::SHADOW_SYNC
            }
            Frame::Error(error) => {
                put(body, error);
                tag::ERROR
            }
            Frame::KeepAlive(keep_alive) => {
                put(body, keep_alive);
                tag::KEEP_ALIVE
            }
            Frame::Goodbye(goodbye) => {
                put(body, goodbye);
                tag::GOODBYE
            }
        }
    }

    /// Decodes one frame from the start of `bytes`; returns it and the bytes it used. An unknown
    /// frame type is an error that still reports its length (see [`FrameDecoder`] to skip it).
    pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), DecodeError> {
        let (len, prefix_bytes) = match read_length_prefix(bytes)? {
            LengthPrefix::Complete { len, prefix_bytes } => (len, prefix_bytes),
            LengthPrefix::Incomplete => return Err(DecodeError::Truncated { needed_bytes: 1 }),
        };
        let available = bytes.len() - prefix_bytes;
        if available < len {
            return Err(DecodeError::Truncated { needed_bytes: len - available });
        }
        let frame = Frame::decode_unprefixed(&bytes[prefix_bytes..prefix_bytes + len])?;
        Ok((frame, prefix_bytes + len))
    }

    /// Decodes a frame's type and body (no length prefix).
    pub fn decode_unprefixed(frame_bytes: &[u8]) -> Result<Frame, DecodeError> {
        let (&frame_tag, body) = frame_bytes.split_first().ok_or(DecodeError::Empty)?;
        fn get<'a, T: Deserialize<'a>>(frame: &'static str, body: &'a [u8]) -> Result<T, DecodeError> {
            postcard::from_bytes(body).map_err(|reason| DecodeError::Body { frame, reason })
        }
        Ok(match frame_tag {
            tag::HELLO => Frame::Hello(get("hello", body)?),
            tag::WELCOME => Frame::Welcome(get("welcome", body)?),
            tag::EVENTS => Frame::Events(EventBatch::decode(body)?),
            tag::CUSTODY => Frame::Custody(get("custody", body)?),
            tag::COMMIT => Frame::Commit(get("commit", body)?),
            tag::BACKPRESSURE => Frame::Backpressure(get("backpressure", body)?),
            tag::SHADOW_SYNC => {
                let sync: ShadowSync = get("shadow_sync", body)?;
                if sync.message.len() > SHADOW_MESSAGE_BYTES_MAX {
                    return Err(DecodeError::ShadowMessageTooLarge {
                        len_bytes: sync.message.len(),
                        max_bytes: SHADOW_MESSAGE_BYTES_MAX,
                    });
                }
                Frame::ShadowSync(sync)
            }
            tag::ERROR => Frame::Error(get("error", body)?),
            tag::KEEP_ALIVE => Frame::KeepAlive(get("keep_alive", body)?),
            tag::GOODBYE => Frame::Goodbye(get("goodbye", body)?),
            other => return Err(DecodeError::UnknownFrameType { tag: other }),
        })
    }
}

/// Splits a byte stream into frames. Push bytes as they arrive, then take frames until `None`.
/// Memory is bounded: a declared length over [`FRAME_BYTES_MAX`] is refused as soon as the prefix
/// is read, before any of its body is buffered.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    /// Bytes at the front of `buffer` already consumed.
    consumed: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.consumed > 0 && self.consumed == self.buffer.len() {
            self.buffer.clear();
            self.consumed = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet taken as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len() - self.consumed
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error other than
    /// [`DecodeError::UnknownFrameType`] (which skips that frame) the stream is not trustworthy
    /// and should be closed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let pending = &self.buffer[self.consumed..];
        let (len, prefix_bytes) = match read_length_prefix(pending)? {
            LengthPrefix::Complete { len, prefix_bytes } => (len, prefix_bytes),
            LengthPrefix::Incomplete => return Ok(None),
        };
        if pending.len() - prefix_bytes < len {
            // Nothing is reserved for the declared length: the buffer grows only with bytes that
            // actually arrive, so a peer cannot make us allocate by merely claiming a size.
            return Ok(None);
        }
        let frame_bytes = &pending[prefix_bytes..prefix_bytes + len];
        let result = Frame::decode_unprefixed(frame_bytes);
        self.consumed += prefix_bytes + len;
        if self.consumed > FRAME_BYTES_MAX {
            self.buffer.drain(..self.consumed);
            self.consumed = 0;
        }
        result.map(Some)
    }
}
