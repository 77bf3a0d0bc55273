//! Serial ingest: reads the firmware's hand-off frames from a tty (or a pseudo-terminal) and
//! records each reading in the ledger exactly once, acknowledging it back to the firmware.
//!
//! The firmware numbers its readings gap-free from 1 and resends everything above its ack
//! watermark until acknowledged (at-least-once). The agent keeps, per source, the highest firmware
//! seq it holds (`source_high`), raised in the same SQLite transaction as the events, so:
//! a record at or below it is a duplicate (not stored, but acknowledged again, since the earlier
//! ack may have been lost); the record right after it is new; a record further ahead means one
//! in between was lost on the line, so it is dropped and the firmware's resend fills the hole.
//! An ack is sent only after the events are durable (`Pending::wait`). An intact record whose
//! reading the ledger refuses (a NaN value, say) is recorded at its seq as an error log line that
//! keeps all its fields, so one bad sample neither halts the port nor is lost.
//!
//! Frame decoding is the firmware crate's `no_std` decoder; this module only moves bytes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::termios::{self, SetArg, SpecialCharacterIndices};
use tidesync_core::event::{LogLevel, LogLine, Payload, Seq};
use tidesync_core::record::ReadingRecord;
use tidesync_firmware::link::{encode_frame, FrameDecoder, FrameError, Message};

use crate::agent::Agent;
use crate::error::StoreError;
use crate::store::NewEvent;

/// Most records recorded in one transaction (one ack per batch).
pub const BATCH_RECORDS_MAX: usize = 256;
/// How long one read waits for bytes before the loop checks `stop`, in deciseconds (termios VTIME).
const READ_TIMEOUT_DS: u8 = 1;

/// Why the serial ingest stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SerialError {
    /// The serial path could not be opened.
    #[error("cannot open serial port {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Raw mode could not be set (not a terminal?).
    #[error("cannot set raw mode on {path}")]
    Termios {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Reading or writing the port failed (device unplugged, other end closed).
    #[error("serial i/o on {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The ledger refused the records.
    #[error("recording serial records")]
    Store(#[from] StoreError),
}

/// What one ingest run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IngestStats {
    /// Record frames received.
    pub records_received: u64,
    /// New records recorded in the ledger.
    pub records_stored: u64,
    /// Records at or below the watermark (re-sent after a lost ack): acknowledged again only.
    pub records_duplicate: u64,
    /// Records ahead of the next expected seq (a frame in between was lost): dropped.
    pub records_ahead: u64,
    /// Frames rejected by the decoder (noise, CRC, oversize, unknown type).
    pub frames_rejected: u64,
    /// Intact records whose reading the ledger refuses (a NaN, an empty sensor name): each is
    /// recorded at its seq as an error log line that keeps every field, and acknowledged.
    pub records_quarantined: u64,
    /// Ack frames written.
    pub acks_sent: u64,
}

/// Sets `fd` (a terminal) to raw mode: no echo, no line editing, no translation of bytes (the
/// frames carry arbitrary bytes), and reads that return after [`READ_TIMEOUT_DS`] with whatever
/// arrived, so a reader can notice a stop request.
pub fn set_raw(fd: impl AsFd) -> Result<(), nix::Error> {
    let mut attributes = termios::tcgetattr(&fd)?;
    termios::cfmakeraw(&mut attributes);
    attributes.control_chars[SpecialCharacterIndices::VMIN as usize] = 0;
    attributes.control_chars[SpecialCharacterIndices::VTIME as usize] = READ_TIMEOUT_DS;
    termios::tcsetattr(&fd, SetArg::TCSANOW, &attributes)
}

/// Opens `path` read-write in raw mode (without making it the controlling terminal).
pub fn open_port(path: &Path) -> Result<File, SerialError> {
    let port = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits())
        .open(path)
        .map_err(|source| SerialError::Open { path: path.to_path_buf(), source })?;
    set_raw(&port).map_err(|source| SerialError::Termios { path: path.to_path_buf(), source })?;
    Ok(port)
}

/// Runs the ingest on the serial port at `path` for the firmware log named `source` until `stop`
/// is set (checked at least every 100 ms) or the port fails.
pub fn run_ingest(agent: &Agent, path: &Path, source: &str, stop: &AtomicBool) -> Result<IngestStats, SerialError> {
    let span = tracing::info_span!("serial_ingest", path = %path.display(), source);
    let _entered = span.enter();
    let mut port = open_port(path)?;
    let mut ingest = Ingest::new(agent, source)?;
    tracing::info!(source_high = ingest.high, "serial ingest started");
    let mut chunk = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let len = match port.read(&mut chunk) {
            Ok(len) => len,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(SerialError::Io { path: path.to_path_buf(), source }),
        };
        // Zero bytes means the read timed out (VMIN = 0): loop to check `stop`.
        if let Some(up_to) = ingest.handle_bytes(chunk.get(..len).unwrap_or_default())? {
            let frame = encode_frame(&Message::Ack { up_to: Seq(up_to) }).map_err(|_| SerialError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other("ack does not encode"),
            })?;
            port.write_all(frame.as_bytes()).map_err(|source| SerialError::Io { path: path.to_path_buf(), source })?;
            ingest.stats.acks_sent += 1;
            tracing::debug!(up_to, "acknowledged");
        }
    }
    tracing::info!(?ingest.stats, "serial ingest stopped");
    Ok(ingest.stats)
}

/// The log line that stands for `record`, which the ledger refused for `error`: the value also as
/// its bits, so a NaN's payload or a negative zero survives.
fn quarantined(record: &ReadingRecord<'_>, error: &StoreError) -> Payload {
    Payload::Log(LogLine {
        level: LogLevel::Error,
        message: format!(
            "firmware record {} refused ({error}): sensor {:?}, value {:?} (bits {:#018x}), unit {:?}, hlc {}.{}",
            record.seq.0,
            record.sensor,
            record.value,
            record.value.to_bits(),
            record.unit,
            record.hlc.wall_ms,
            record.hlc.logical,
        ),
    })
}

/// The ingest's state between reads: the decoder, the source's watermark and the counters.
struct Ingest<'a> {
    agent: &'a Agent,
    source: String,
    decoder: FrameDecoder,
    /// The highest firmware seq durable in the ledger.
    high: u64,
    stats: IngestStats,
}

impl<'a> Ingest<'a> {
    fn new(agent: &'a Agent, source: &str) -> Result<Self, StoreError> {
        let high = agent.source_high(source)?;
        Ok(Self {
            agent,
            source: source.to_string(),
            decoder: FrameDecoder::new(),
            high,
            stats: IngestStats::default(),
        })
    }

    /// Decodes `bytes`, records the new readings durably and returns the watermark to
    /// acknowledge, if any record (new or duplicate) arrived.
    fn handle_bytes(&mut self, bytes: &[u8]) -> Result<Option<u64>, StoreError> {
        let mut events: Vec<NewEvent> = Vec::new();
        let mut batch_high = self.high;
        let mut acknowledge = false;
        let mut rejected: Vec<FrameError> = Vec::new();
        let mut invalid: Option<StoreError> = None;
        let stats = &mut self.stats;
        self.decoder.feed(bytes, |frame| match frame {
            Ok(Message::Record(record)) => {
                stats.records_received += 1;
                acknowledge = true;
                let seq = record.seq.0;
                if seq <= batch_high {
                    stats.records_duplicate += 1;
                } else if seq == batch_high + 1 && events.len() < BATCH_RECORDS_MAX {
                    let event = NewEvent::new(record.event_time, &record.to_payload()).or_else(|error| {
                        // The frame arrived intact, so the firmware will not send it otherwise:
                        // refusing it would halt the port, acking it unrecorded would lose it.
                        // It takes its seq as an error log line holding every field instead.
                        tracing::warn!(seq, %error, "record refused by the ledger: kept as a log line");
                        stats.records_quarantined += 1;
                        NewEvent::new(record.event_time, &quarantined(&record, &error))
                    });
                    match event {
                        Ok(event) => {
                            events.push(event);
                            batch_high = seq;
                        }
                        Err(error) => invalid = Some(error),
                    }
                } else {
                    stats.records_ahead += 1;
                }
            }
            Ok(_) => stats.frames_rejected += 1,
            Err(error) => {
                stats.frames_rejected += 1;
                rejected.push(error);
            }
        });
        for error in rejected {
            tracing::warn!(code = error.code(), %error, "frame rejected");
        }
        if let Some(error) = invalid {
            // A record the ledger cannot hold stops the ingest: acking past it would lose it.
            return Err(error);
        }
        if !events.is_empty() {
            let count = events.len() as u64;
            match self.agent.submit_from_source(self.source.clone(), batch_high, events)?.wait() {
                Ok(_) => {
                    self.high = batch_high;
                    self.stats.records_stored += count;
                    tracing::debug!(source_high = batch_high, count, "recorded");
                }
                // Another writer recorded them first: they are durable either way.
                Err(StoreError::AlreadyRecorded { high, .. }) => self.high = high,
                Err(error) => return Err(error),
            }
        }
        Ok(acknowledge.then_some(self.high))
    }
}
