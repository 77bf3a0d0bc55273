//! The hand-off link between the firmware and the device agent: frames, their decoder, and the
//! firmware's sending side.
//!
//! A frame is `COBS(message ++ crc32_le(message)) ++ 0x00`. The message is a type byte and a
//! postcard body: [`TAG_RECORD`] + a [`ReadingRecord`] (firmware → agent) or [`TAG_ACK`] + a seq
//! (`Ack { up_to }`, agent → firmware). COBS removes every zero byte from the frame, so 0x00 only
//! ever delimits: after line noise, a reset or a frame cut short, the [`FrameDecoder`] reports one
//! error and is back in step at the next delimiter. Empty frames (two zeros in a row) are ignored,
//! so a sender may start with a zero to flush a half-received frame on the other side.
//!
//! The decoder is plain `no_std` code with a fixed buffer; the device agent runs the same code.
//!
//! Wire compatibility: type bytes are never reused; a reader reports an unknown type as
//! [`FrameError::UnknownType`] and goes on with the next frame.

use embedded_io::{Read, ReadReady, Write};
use embedded_storage::nor_flash::NorFlash;
use tidesync_core::event::Seq;
use tidesync_core::record::{ReadingRecord, RecordError, READING_RECORD_BYTES_MAX};

use crate::checksum::crc32;
use crate::log::{record_buffer, LogError, RingLog};

/// Type byte of a reading record message.
pub const TAG_RECORD: u8 = 0x01;
/// Type byte of an acknowledgement message.
pub const TAG_ACK: u8 = 0x02;
/// Largest message: a type byte and the largest record.
pub const MESSAGE_BYTES_MAX: usize = 1 + READING_RECORD_BYTES_MAX;
/// Bytes of the frame check sequence.
const CRC_BYTES: usize = 4;
/// Largest frame before COBS.
const RAW_BYTES_MAX: usize = MESSAGE_BYTES_MAX + CRC_BYTES;
/// Largest COBS-encoded frame without its delimiter (one code byte per 254 data bytes, plus one).
pub const FRAME_BYTES_MAX: usize = RAW_BYTES_MAX + RAW_BYTES_MAX / 254 + 1;
/// The frame delimiter.
pub const DELIMITER: u8 = 0x00;

/// A message of the link.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Message<'a> {
    /// A logged reading (firmware → agent).
    Record(ReadingRecord<'a>),
    /// Every reading up to `up_to` is durable in the agent's ledger (agent → firmware).
    Ack {
        /// The highest acknowledged seq.
        up_to: Seq,
    },
}

/// Why a frame was rejected. The decoder is back in step at the next delimiter either way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// More bytes than any valid frame before the delimiter; they were dropped.
    #[error("frame of {len_bytes} bytes exceeds {max_bytes}")]
    Oversized {
        /// Bytes received before the delimiter.
        len_bytes: usize,
        /// The bound.
        max_bytes: usize,
    },
    /// The COBS stuffing is inconsistent (a code byte points past the frame).
    #[error("malformed cobs stuffing")]
    Cobs,
    /// Too short to hold a type byte and the CRC.
    #[error("frame of {len_bytes} bytes is too short")]
    Short {
        /// Decoded length.
        len_bytes: usize,
    },
    /// The CRC-32 does not match: the frame was corrupted.
    #[error("frame crc mismatch: received {received:#010x}, computed {computed:#010x}")]
    Crc {
        /// The CRC in the frame.
        received: u32,
        /// The CRC of the frame's message.
        computed: u32,
    },
    /// A type byte this build does not know (a newer peer).
    #[error("unknown frame type {tag:#04x}")]
    UnknownType {
        /// The type byte.
        tag: u8,
    },
    /// The body does not decode as its type.
    #[error("malformed frame body: {0}")]
    Body(RecordError),
}

impl FrameError {
    /// A stable numeric code for logs and counters.
    pub fn code(&self) -> u16 {
        match self {
            FrameError::Oversized { .. } => 1,
            FrameError::Cobs => 2,
            FrameError::Short { .. } => 3,
            FrameError::Crc { .. } => 4,
            FrameError::UnknownType { .. } => 5,
            FrameError::Body(_) => 6,
        }
    }
}

/// A frame, encoded and delimited, ready to write.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    bytes: [u8; FRAME_BYTES_MAX + 1],
    len: usize,
}

impl EncodedFrame {
    /// The frame's bytes, delimiter included.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

/// Encodes `message` as one delimited frame.
pub fn encode_frame(message: &Message<'_>) -> Result<EncodedFrame, RecordError> {
    let mut raw = [0u8; RAW_BYTES_MAX];
    let message_len = match message {
        Message::Record(record) => {
            raw[0] = TAG_RECORD;
            let body = raw.get_mut(1..MESSAGE_BYTES_MAX).unwrap_or_default();
            1 + record.encode(body)?.len()
        }
        Message::Ack { up_to } => {
            raw[0] = TAG_ACK;
            let body = raw.get_mut(1..MESSAGE_BYTES_MAX).unwrap_or_default();
            1 + postcard::to_slice(up_to, body).map_err(RecordError::Codec)?.len()
        }
    };
    let crc = crc32(&[raw.get(..message_len).unwrap_or_default()]);
    let crc_slot = raw.get_mut(message_len..message_len + CRC_BYTES).unwrap_or_default();
    crc_slot.copy_from_slice(&crc.to_le_bytes());
    let mut frame = EncodedFrame { bytes: [0u8; FRAME_BYTES_MAX + 1], len: 0 };
    let encoded_len = cobs_encode(raw.get(..message_len + CRC_BYTES).unwrap_or_default(), &mut frame.bytes);
    // The buffer was zeroed, so the delimiter is already there.
    frame.len = encoded_len + 1;
    Ok(frame)
}

/// COBS-encodes `input` into `output` (which must hold `input.len() + input.len() / 254 + 1`
/// bytes); returns the encoded length.
fn cobs_encode(input: &[u8], output: &mut [u8]) -> usize {
    let mut code_idx = 0;
    let mut out_idx = 1;
    let mut code: u8 = 1;
    let put = |output: &mut [u8], idx: usize, byte: u8| {
        if let Some(slot) = output.get_mut(idx) {
            *slot = byte;
        }
    };
    for &byte in input {
        if byte == 0 {
            put(output, code_idx, code);
            code_idx = out_idx;
            out_idx += 1;
            code = 1;
        } else {
            put(output, out_idx, byte);
            out_idx += 1;
            code += 1;
            if code == 0xFF {
                put(output, code_idx, code);
                code_idx = out_idx;
                out_idx += 1;
                code = 1;
            }
        }
    }
    put(output, code_idx, code);
    out_idx
}

/// Decodes COBS in place (the output is never longer than the input); returns the decoded length.
fn cobs_decode_in_place(buffer: &mut [u8]) -> Option<usize> {
    let mut read = 0;
    let mut write = 0;
    while read < buffer.len() {
        let code = *buffer.get(read)?;
        if code == 0 {
            return None;
        }
        read += 1;
        let run = usize::from(code) - 1;
        if read + run > buffer.len() {
            return None;
        }
        buffer.copy_within(read..read + run, write);
        write += run;
        read += run;
        if code != 0xFF && read < buffer.len() {
            *buffer.get_mut(write)? = 0;
            write += 1;
        }
    }
    Some(write)
}

/// Splits a byte stream into frames and decodes them. Fixed memory: one frame's worth.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    buffer: [u8; FRAME_BYTES_MAX],
    len: usize,
    /// Bytes received for the current frame (beyond the buffer when oversized).
    received: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder waiting for the first frame (bytes before the first delimiter are a frame too:
    /// a valid one if the stream starts on a boundary, an error otherwise).
    pub const fn new() -> Self {
        Self { buffer: [0u8; FRAME_BYTES_MAX], len: 0, received: 0 }
    }

    /// Takes one byte; returns a decoded frame (or why it was rejected) when it completes one.
    pub fn push(&mut self, byte: u8) -> Option<Result<Message<'_>, FrameError>> {
        if byte != DELIMITER {
            if let Some(slot) = self.buffer.get_mut(self.len) {
                *slot = byte;
                self.len += 1;
            }
            self.received = self.received.saturating_add(1);
            return None;
        }
        let (len, received) = (self.len, self.received);
        self.len = 0;
        self.received = 0;
        if received == 0 {
            return None;
        }
        if received > len {
            return Some(Err(FrameError::Oversized { len_bytes: received, max_bytes: FRAME_BYTES_MAX }));
        }
        Some(decode_raw(self.buffer.get_mut(..len).unwrap_or_default()))
    }

    /// Feeds `bytes` and calls `on_frame` for every frame they complete.
    pub fn feed(&mut self, bytes: &[u8], mut on_frame: impl FnMut(Result<Message<'_>, FrameError>)) {
        for &byte in bytes {
            if let Some(frame) = self.push(byte) {
                on_frame(frame);
            }
        }
    }
}

/// Decodes one frame's COBS bytes (in place), checks its CRC and parses the message.
fn decode_raw(frame: &mut [u8]) -> Result<Message<'_>, FrameError> {
    let raw_len = cobs_decode_in_place(frame).ok_or(FrameError::Cobs)?;
    let raw: &[u8] = frame.get(..raw_len).unwrap_or_default();
    if raw_len < 1 + CRC_BYTES {
        return Err(FrameError::Short { len_bytes: raw_len });
    }
    let (message, crc_bytes) = raw.split_at(raw_len - CRC_BYTES);
    let received = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let computed = crc32(&[message]);
    if received != computed {
        return Err(FrameError::Crc { received, computed });
    }
    let (&tag, body) = message.split_first().ok_or(FrameError::Short { len_bytes: raw_len })?;
    match tag {
        TAG_RECORD => ReadingRecord::decode(body).map(Message::Record).map_err(FrameError::Body),
        TAG_ACK => postcard::from_bytes::<Seq>(body)
            .map(|up_to| Message::Ack { up_to })
            .map_err(|error| FrameError::Body(RecordError::Codec(error))),
        tag => Err(FrameError::UnknownType { tag }),
    }
}

/// Why the firmware's side of the link failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError<E> {
    /// The serial port failed.
    #[error("serial: {0:?}")]
    Serial(E),
    /// The log failed.
    #[error("log: {0}")]
    Log(#[from] LogError),
    /// A logged record does not encode (cannot happen for records the log accepted).
    #[error("record: {0}")]
    Record(RecordError),
}

/// Counters of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    /// Record frames written.
    pub frames_sent: u32,
    /// Acks applied to the log.
    pub acks: u32,
    /// Frames rejected by the decoder.
    pub frames_rejected: u32,
    /// Times the sender went back to the ack watermark because no ack came.
    pub rewinds: u32,
}

/// The firmware's end of the link: sends logged readings after the last ack, at most
/// `window` ahead of it, and applies the agent's acks to the log. When no ack arrives for
/// `resend_after_ms`, it goes back and sends again from the watermark (the agent stores each
/// record once, so a resend is harmless).
#[derive(Debug)]
pub struct Link {
    decoder: FrameDecoder,
    /// Highest seq written to the serial port.
    sent_up_to: Seq,
    /// When the last ack (or the start) happened.
    progress_ms: u64,
    window: u64,
    resend_after_ms: u64,
    stats: LinkStats,
}

impl Link {
    /// A link that starts sending after `acked` (the log's watermark).
    pub fn new(acked: Seq, now_ms: u64, window: u64, resend_after_ms: u64) -> Self {
        Self {
            decoder: FrameDecoder::new(),
            sent_up_to: acked,
            progress_ms: now_ms,
            window: window.max(1),
            resend_after_ms,
            stats: LinkStats::default(),
        }
    }

    /// Writes the next records (up to the window) to `writer`. Returns how many were sent.
    pub fn send_pending<W: Write, F: NorFlash, const SECTORS: usize>(
        &mut self,
        now_ms: u64,
        log: &mut RingLog<F, SECTORS>,
        writer: &mut W,
    ) -> Result<usize, LinkError<W::Error>> {
        let acked = log.acked();
        if self.sent_up_to < acked {
            self.sent_up_to = acked;
        }
        if self.sent_up_to > acked && now_ms.saturating_sub(self.progress_ms) >= self.resend_after_ms {
            self.sent_up_to = acked;
            self.progress_ms = now_ms;
            self.stats.rewinds = self.stats.rewinds.saturating_add(1);
        }
        let mut sent = 0;
        let mut buffer = record_buffer();
        while self.sent_up_to.0 < acked.0.saturating_add(self.window) {
            let Some(record) = log.read_after(self.sent_up_to, &mut buffer)? else {
                break;
            };
            let seq = record.seq;
            let frame = encode_frame(&Message::Record(record)).map_err(LinkError::Record)?;
            writer.write_all(frame.as_bytes()).map_err(LinkError::Serial)?;
            self.sent_up_to = seq;
            self.stats.frames_sent = self.stats.frames_sent.saturating_add(1);
            sent += 1;
        }
        if sent > 0 {
            writer.flush().map_err(LinkError::Serial)?;
        }
        Ok(sent)
    }

    /// Applies the acks in `bytes` (received from the agent) to the log.
    pub fn handle_rx<F: NorFlash, const SECTORS: usize>(
        &mut self,
        now_ms: u64,
        bytes: &[u8],
        log: &mut RingLog<F, SECTORS>,
    ) -> Result<(), LogError> {
        for &byte in bytes {
            let up_to = match self.decoder.push(byte) {
                Some(Ok(Message::Ack { up_to })) => up_to,
                Some(Ok(_)) | Some(Err(_)) => {
                    self.stats.frames_rejected = self.stats.frames_rejected.saturating_add(1);
                    continue;
                }
                None => continue,
            };
            if up_to > log.acked() {
                self.progress_ms = now_ms;
            }
            log.ack(up_to)?;
            self.stats.acks = self.stats.acks.saturating_add(1);
        }
        Ok(())
    }

    /// Reads whatever the serial port has ready (without blocking) and applies it.
    pub fn poll_rx<R: Read + ReadReady, F: NorFlash, const SECTORS: usize>(
        &mut self,
        now_ms: u64,
        reader: &mut R,
        log: &mut RingLog<F, SECTORS>,
    ) -> Result<(), LinkError<R::Error>> {
        let mut chunk = [0u8; 32];
        while reader.read_ready().map_err(LinkError::Serial)? {
            let len = reader.read(&mut chunk).map_err(LinkError::Serial)?;
            if len == 0 {
                break;
            }
            self.handle_rx(now_ms, chunk.get(..len).unwrap_or_default(), log)?;
        }
        Ok(())
    }

    /// The highest seq written so far.
    pub fn sent_up_to(&self) -> Seq {
        self.sent_up_to
    }

    /// Counters since start.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cobs_known_vectors() {
        // From the COBS paper / Wikipedia examples.
        let cases: [(&[u8], &[u8]); 4] = [
            (&[0x00], &[0x01, 0x01]),
            (&[0x00, 0x00], &[0x01, 0x01, 0x01]),
            (&[0x11, 0x22, 0x00, 0x33], &[0x03, 0x11, 0x22, 0x02, 0x33]),
            (&[0x11, 0x00, 0x00, 0x00], &[0x02, 0x11, 0x01, 0x01, 0x01]),
        ];
        for (plain, encoded) in cases {
            let mut out = [0u8; 16];
            let len = cobs_encode(plain, &mut out);
            assert_eq!(&out[..len], encoded);
            let mut back = [0u8; 16];
            back[..len].copy_from_slice(encoded);
            let decoded = cobs_decode_in_place(&mut back[..len]).expect("valid cobs");
            assert_eq!(&back[..decoded], plain);
        }
    }

    #[test]
    fn cobs_long_run_without_zeros() {
        let plain = [0x42u8; 300];
        let mut out = [0u8; 310];
        let len = cobs_encode(&plain, &mut out);
        assert_eq!(len, 302);
        assert!(!out[..len].contains(&0));
        let decoded = cobs_decode_in_place(&mut out[..len]).expect("valid cobs");
        assert_eq!(&out[..decoded], &plain[..]);
    }
}
