//! `RingLog`: the power-loss-safe ring of records in NOR flash that keeps every reading until
//! the device agent acknowledged it.
//!
//! Layout. The log owns `SECTORS` erase sectors of a [`NorFlash`] (offsets `0 ..
//! SECTORS * ERASE_SIZE`), used in ring order. Each sector starts with a header, written right
//! after the sector is erased:
//!
//! ```text
//! magic u32 | erase_count u32 | sector_seq u32 | crc32 u32 | seq_base u64 | acked u64   (32 bytes)
//! ```
//!
//! `sector_seq` orders sectors (the newest is the head, appended to); `seq_base` is the next
//! reading seq when the sector was opened and `acked` the acknowledgement watermark then, so
//! both survive even when every record that carried them has been erased. Records follow, each
//! padded to the flash's write size:
//!
//! ```text
//! len u16 | kind u8 | 0 u8 | crc32 u32 | seq u64 | body[len]   (crc over all but itself)
//! ```
//!
//! A reading record's body is a postcard [`ReadingRecord`]; an ack record has no body and its seq
//! field is the watermark.
//!
//! Power-loss safety. Flash is only ever programmed forward into erased space, with one write per
//! record. On boot every sector is scanned: a record whose length field is still erased (0xFFFF)
//! ends the sector; any other record that fails its CRC is a torn write, and so is erased-looking
//! space that is not fully erased. A sector with a torn tail is *closed*: its valid records stay
//! readable and nothing is ever written into it again (so no byte is programmed twice), and the next
//! record opens a new sector. Records before the torn one are untouched, so no completed record is
//! lost. A torn header (or a torn erase) fails the header CRC; such a sector counts as free.
//!
//! Wear and space. Sectors are opened strictly in ring order, so erases rotate evenly (each
//! header keeps its erase count). To open a sector the log erases the oldest one, and only when
//! every reading in it is acknowledged; otherwise the new reading is refused and counted
//! ([`LogStats::refused`]).

use embedded_storage::nor_flash::{NorFlash, NorFlashError as _, NorFlashErrorKind};
use tidesync_core::event::{Hlc, Seq};
use tidesync_core::record::{ReadingRecord, RecordError, READING_RECORD_BYTES_MAX};

use crate::checksum::crc32;

/// Identifies a sector written by this log (and its layout version).
pub const SECTOR_MAGIC: u32 = 0x7D5E_C701;
/// Bytes of a sector header.
pub const SECTOR_HEADER_BYTES: usize = 32;
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 16;
/// Largest record body.
pub const RECORD_BODY_BYTES_MAX: usize = READING_RECORD_BYTES_MAX;
/// Largest write size the layout supports (headers are multiples of it).
pub const WRITE_BYTES_MAX: usize = 16;
/// Largest record on flash, padding included.
pub const RECORD_BYTES_MAX: usize = RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX + WRITE_BYTES_MAX;
/// A length field that was never programmed.
const LEN_ERASED: u16 = 0xFFFF;
const KIND_READING: u8 = 1;
const KIND_ACK: u8 = 2;

/// Why a log operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The flash driver failed (the operation may have been cut short by power loss).
    #[error("flash: {0}")]
    Flash(NorFlashErrorKind),
    /// No sector can be freed: the oldest holds unacknowledged readings. The sample was refused.
    #[error("log full: the oldest sector holds unacknowledged readings")]
    Full,
    /// The flash geometry does not fit the layout (write size, sector size or capacity).
    #[error("flash geometry unsupported: {reason}")]
    Geometry {
        /// What does not fit.
        reason: &'static str,
    },
    /// The reading does not encode.
    #[error("record: {0}")]
    Record(RecordError),
}

/// Counters an operator wants to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    /// Samples refused because the log was full of unacknowledged readings (since boot).
    pub refused: u32,
    /// Sectors erased (since boot).
    pub erases: u32,
    /// Torn records or headers found at boot.
    pub torn_found: u32,
    /// Records that failed their CRC when read back after boot (skipped).
    pub corrupt_skipped: u32,
    /// Acknowledgements kept only in RAM because no space could be freed to persist them.
    pub acks_unpersisted: u32,
}

/// What the log knows about one sector.
#[derive(Debug, Clone, Copy, Default)]
struct SectorState {
    /// The header is valid (else the sector is free: blank, torn or foreign).
    valid: bool,
    sector_seq: u32,
    erase_count: u32,
    /// Lowest and highest reading seq in the sector (0 = none).
    first_seq: u64,
    last_seq: u64,
    /// Offset just after the last valid record.
    end_offset: usize,
}

/// The ring log over `SECTORS` sectors of `F`.
#[derive(Debug)]
pub struct RingLog<F, const SECTORS: usize> {
    flash: F,
    sectors: [SectorState; SECTORS],
    /// The sector appended to, if any; `head_open` says whether more records may go into it.
    head: Option<usize>,
    head_open: bool,
    next_seq: u64,
    acked: u64,
    last_hlc: Hlc,
    stats: LogStats,
}

/// A parsed record header.
#[derive(Debug, Clone, Copy)]
struct RecordHeader {
    len: u16,
    kind: u8,
    crc: u32,
    seq: u64,
}

/// What scanning a record slot found.
enum Slot {
    /// A valid record of this many bytes on flash.
    Record(RecordHeader, usize),
    /// Erased space: the end of the sector's records.
    End,
    /// Anything else: a torn or corrupt record.
    Torn,
}

impl<F: NorFlash, const SECTORS: usize> RingLog<F, SECTORS> {
    /// Opens the log on `flash`: scans every sector, skips torn writes and recovers the seq,
    /// acknowledgement watermark and clock. Blank flash gives an empty log.
    pub fn open(flash: F) -> Result<Self, LogError> {
        check_geometry::<F>(flash.capacity(), SECTORS)?;
        let mut log = Self {
            flash,
            sectors: [SectorState::default(); SECTORS],
            head: None,
            head_open: false,
            next_seq: 1,
            acked: 0,
            last_hlc: Hlc::default(),
            stats: LogStats::default(),
        };
        let mut seq_max = 0u64;
        let mut erase_count_max = 0u32;
        let mut head_clean = false;
        for sector_idx in 0..SECTORS {
            let Some((header, clean)) = log.scan_sector(sector_idx, &mut seq_max)? else {
                continue;
            };
            erase_count_max = erase_count_max.max(header.erase_count);
            seq_max = seq_max.max(header.seq_base.saturating_sub(1));
            log.acked = log.acked.max(header.acked);
            let newer =
                log.head.and_then(|head| log.sectors.get(head)).is_none_or(|head| header.sector_seq > head.sector_seq);
            if newer {
                log.head = Some(sector_idx);
                head_clean = clean;
            }
        }
        // Free sectors inherit the highest known erase count: their own header is gone.
        for sector in log.sectors.iter_mut().filter(|sector| !sector.valid) {
            sector.erase_count = erase_count_max;
        }
        log.head_open = log.head.is_some() && head_clean;
        log.next_seq = seq_max.saturating_add(1);
        // An ack beyond what was ever logged cannot be real; never let it cover future readings.
        log.acked = log.acked.min(seq_max);
        Ok(log)
    }

    /// Scans one sector: its header and records. Returns the header and whether the space after
    /// the last record is cleanly erased, or `None` for a free sector.
    fn scan_sector(&mut self, sector_idx: usize, seq_max: &mut u64) -> Result<Option<(SectorHeader, bool)>, LogError> {
        let base = sector_idx * F::ERASE_SIZE;
        let mut header_bytes = [0u8; SECTOR_HEADER_BYTES];
        self.read(base, &mut header_bytes)?;
        let Some(header) = SectorHeader::parse(&header_bytes) else {
            if header_bytes.iter().any(|byte| *byte != 0xFF) {
                self.stats.torn_found += 1;
            }
            return Ok(None);
        };
        let mut state = SectorState {
            valid: true,
            sector_seq: header.sector_seq,
            erase_count: header.erase_count,
            first_seq: 0,
            last_seq: 0,
            end_offset: SECTOR_HEADER_BYTES,
        };
        let mut body = [0u8; RECORD_BYTES_MAX];
        let clean = loop {
            match self.read_slot(base, state.end_offset, &mut body)? {
                Slot::Record(record, total_bytes) => {
                    if record.kind == KIND_READING {
                        if state.first_seq == 0 {
                            state.first_seq = record.seq;
                        }
                        state.last_seq = record.seq;
                        *seq_max = (*seq_max).max(record.seq);
                        if let Some(reading) =
                            body.get(..usize::from(record.len)).and_then(|b| ReadingRecord::decode(b).ok())
                        {
                            self.last_hlc = self.last_hlc.max(reading.hlc);
                        }
                    } else if record.kind == KIND_ACK {
                        self.acked = self.acked.max(record.seq);
                    }
                    state.end_offset += total_bytes;
                }
                Slot::End => break self.is_erased(base + state.end_offset, F::ERASE_SIZE - state.end_offset)?,
                Slot::Torn => break false,
            }
        };
        if !clean {
            self.stats.torn_found += 1;
        }
        if let Some(slot) = self.sectors.get_mut(sector_idx) {
            *slot = state;
        }
        Ok(Some((header, clean)))
    }

    /// Reads the record slot at `offset` of the sector at `base`, its body into `body`.
    fn read_slot(&mut self, base: usize, offset: usize, body: &mut RecordBuffer) -> Result<Slot, LogError> {
        if offset + RECORD_HEADER_BYTES > F::ERASE_SIZE {
            return Ok(Slot::End);
        }
        let mut header_bytes = [0u8; RECORD_HEADER_BYTES];
        self.read(base + offset, &mut header_bytes)?;
        let record = RecordHeader::parse(&header_bytes);
        if record.len == LEN_ERASED {
            return Ok(Slot::End);
        }
        let body_len = usize::from(record.len);
        let padded_len = align_up(body_len, F::WRITE_SIZE);
        let total_bytes = RECORD_HEADER_BYTES + padded_len;
        if body_len > RECORD_BODY_BYTES_MAX || offset + total_bytes > F::ERASE_SIZE {
            return Ok(Slot::Torn);
        }
        let Some(padded) = body.get_mut(..padded_len) else {
            return Ok(Slot::Torn);
        };
        self.read(base + offset + RECORD_HEADER_BYTES, padded)?;
        let body = padded.get(..body_len).unwrap_or_default();
        let computed =
            crc32(&[header_bytes.get(..4).unwrap_or_default(), header_bytes.get(8..).unwrap_or_default(), body]);
        let kind_known = record.kind == KIND_READING || record.kind == KIND_ACK;
        if computed != record.crc || !kind_known || header_bytes[3] != 0 {
            return Ok(Slot::Torn);
        }
        Ok(Slot::Record(record, total_bytes))
    }

    /// Whether `len` bytes from `offset` are all 0xFF.
    fn is_erased(&mut self, offset: usize, len: usize) -> Result<bool, LogError> {
        let mut chunk = [0u8; WRITE_BYTES_MAX];
        let mut done = 0;
        while done < len {
            let take = (len - done).min(WRITE_BYTES_MAX);
            let part = chunk.get_mut(..take).unwrap_or_default();
            self.read(offset + done, part)?;
            if part.iter().any(|byte| *byte != 0xFF) {
                return Ok(false);
            }
            done += take;
        }
        Ok(true)
    }

    /// Appends a reading and returns the seq it was given (`record.seq` is ignored: the log
    /// numbers readings gap-free from 1). Returns [`LogError::Full`] (and counts the refusal)
    /// when the oldest sector still holds unacknowledged readings.
    pub fn append_reading(&mut self, record: ReadingRecord<'_>) -> Result<Seq, LogError> {
        let seq = self.next_seq;
        let record = ReadingRecord { seq: Seq(seq), ..record };
        let mut body = [0u8; RECORD_BODY_BYTES_MAX];
        let encoded = record.encode(&mut body).map_err(LogError::Record)?;
        let encoded_len = encoded.len();
        match self.append_raw(KIND_READING, seq, body.get(..encoded_len).unwrap_or_default()) {
            Ok(sector_idx) => {
                if let Some(sector) = self.sectors.get_mut(sector_idx) {
                    if sector.first_seq == 0 {
                        sector.first_seq = seq;
                    }
                    sector.last_seq = seq;
                }
                self.next_seq = seq + 1;
                self.last_hlc = self.last_hlc.max(record.hlc);
                Ok(Seq(seq))
            }
            Err(LogError::Full) => {
                self.stats.refused = self.stats.refused.saturating_add(1);
                Err(LogError::Full)
            }
            Err(error) => Err(error),
        }
    }

    /// Marks every reading up to `up_to` acknowledged (erasable), and persists the watermark.
    /// An ack beyond the last logged reading is clamped to it. If no space can be freed to
    /// persist it, the watermark is kept in RAM (after a power cut those readings are sent
    /// again; the agent stores them once).
    pub fn ack(&mut self, up_to: Seq) -> Result<(), LogError> {
        let up_to = up_to.0.min(self.next_seq - 1);
        if up_to <= self.acked {
            return Ok(());
        }
        self.acked = up_to;
        match self.append_raw(KIND_ACK, up_to, &[]) {
            Ok(_) => Ok(()),
            Err(LogError::Full) => {
                self.stats.acks_unpersisted = self.stats.acks_unpersisted.saturating_add(1);
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Writes one record, opening a new sector if the head has no room. Returns the sector used.
    fn append_raw(&mut self, kind: u8, seq: u64, body: &[u8]) -> Result<usize, LogError> {
        let padded_len = align_up(body.len(), F::WRITE_SIZE);
        let total_bytes = RECORD_HEADER_BYTES + padded_len;
        let fits = |state: &SectorState| state.end_offset + total_bytes <= F::ERASE_SIZE;
        let head_idx = match self.head {
            Some(head) if self.head_open && self.sectors.get(head).is_some_and(fits) => head,
            _ => self.open_next_sector()?,
        };
        let mut bytes = [0xFFu8; RECORD_BYTES_MAX];
        let len = body.len() as u16;
        bytes[..2].copy_from_slice(&len.to_le_bytes());
        bytes[2] = kind;
        bytes[3] = 0;
        bytes[8..16].copy_from_slice(&seq.to_le_bytes());
        let Some(body_slot) = bytes.get_mut(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + body.len()) else {
            return Err(LogError::Geometry { reason: "record body larger than the layout allows" });
        };
        body_slot.copy_from_slice(body);
        let crc = crc32(&[&bytes[..4], &bytes[8..16], body]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        let end_offset = self.sectors.get(head_idx).map_or(0, |state| state.end_offset);
        let offset = head_idx * F::ERASE_SIZE + end_offset;
        if let Err(error) = self.flash.write(offset as u32, bytes.get(..total_bytes).unwrap_or_default()) {
            // The record may be torn: never write into this sector again.
            self.head_open = false;
            return Err(LogError::Flash(error.kind()));
        }
        if let Some(state) = self.sectors.get_mut(head_idx) {
            state.end_offset += total_bytes;
        }
        Ok(head_idx)
    }

    /// Erases the sector after the head (the oldest) and writes its header, if every reading in
    /// it is acknowledged.
    fn open_next_sector(&mut self) -> Result<usize, LogError> {
        let next_idx = self.head.map_or(0, |head| (head + 1) % SECTORS);
        let head_sector_seq = self.head.and_then(|head| self.sectors.get(head)).map_or(0, |head| head.sector_seq);
        let target = self.sectors.get(next_idx).copied().unwrap_or_default();
        if target.valid && target.last_seq > self.acked {
            return Err(LogError::Full);
        }
        let erase_count = target.erase_count.saturating_add(1);
        let base = next_idx * F::ERASE_SIZE;
        // From here until the header is written the sector is free, whatever happens.
        if let Some(state) = self.sectors.get_mut(next_idx) {
            *state = SectorState { erase_count, ..SectorState::default() };
        }
        self.head_open = false;
        self.flash.erase(base as u32, (base + F::ERASE_SIZE) as u32).map_err(|error| LogError::Flash(error.kind()))?;
        self.stats.erases = self.stats.erases.saturating_add(1);
        let header = SectorHeader {
            erase_count,
            sector_seq: head_sector_seq.wrapping_add(1),
            seq_base: self.next_seq,
            acked: self.acked,
        };
        self.flash.write(base as u32, &header.to_bytes()).map_err(|error| LogError::Flash(error.kind()))?;
        if let Some(state) = self.sectors.get_mut(next_idx) {
            *state = SectorState {
                valid: true,
                sector_seq: header.sector_seq,
                erase_count,
                first_seq: 0,
                last_seq: 0,
                end_offset: SECTOR_HEADER_BYTES,
            };
        }
        self.head = Some(next_idx);
        self.head_open = true;
        Ok(next_idx)
    }

    /// The first reading after `after`, decoded into `buffer`; `None` when there is none.
    /// Records that no longer check out (flash decay since boot) are skipped and counted.
    pub fn read_after<'b>(
        &mut self,
        after: Seq,
        buffer: &'b mut RecordBuffer,
    ) -> Result<Option<ReadingRecord<'b>>, LogError> {
        let Some(body_len) = self.find_after(after, buffer)? else {
            return Ok(None);
        };
        let buffer: &'b RecordBuffer = buffer;
        ReadingRecord::decode(buffer.get(..body_len).unwrap_or_default()).map(Some).map_err(LogError::Record)
    }

    /// Finds the first decodable reading after `after`, leaves its body at the start of `buffer`
    /// and returns its length.
    fn find_after(&mut self, after: Seq, buffer: &mut RecordBuffer) -> Result<Option<usize>, LogError> {
        let start = self.head.map_or(0, |head| head + 1);
        for step in 0..SECTORS {
            let sector_idx = (start + step) % SECTORS;
            let Some(state) = self.sectors.get(sector_idx).copied() else { continue };
            if !state.valid || state.first_seq == 0 || state.last_seq <= after.0 {
                continue;
            }
            let base = sector_idx * F::ERASE_SIZE;
            let mut offset = SECTOR_HEADER_BYTES;
            while offset < state.end_offset {
                match self.read_slot(base, offset, buffer)? {
                    Slot::Record(record, total_bytes) => {
                        offset += total_bytes;
                        if record.kind != KIND_READING || record.seq <= after.0 {
                            continue;
                        }
                        let body_len = usize::from(record.len);
                        if ReadingRecord::decode(buffer.get(..body_len).unwrap_or_default()).is_ok() {
                            return Ok(Some(body_len));
                        }
                        self.stats.corrupt_skipped = self.stats.corrupt_skipped.saturating_add(1);
                    }
                    // Boot validated this range, so a failure now is decay: skip the rest of it.
                    Slot::End | Slot::Torn => {
                        self.stats.corrupt_skipped = self.stats.corrupt_skipped.saturating_add(1);
                        break;
                    }
                }
            }
        }
        Ok(None)
    }

    /// The seq the next reading will get.
    pub fn next_seq(&self) -> Seq {
        Seq(self.next_seq)
    }

    /// The acknowledgement watermark: readings up to it may be erased.
    pub fn acked(&self) -> Seq {
        Seq(self.acked)
    }

    /// The highest clock stamp logged: the sampler resumes its clock after it.
    pub fn last_hlc(&self) -> Hlc {
        self.last_hlc
    }

    /// Counters since boot.
    pub fn stats(&self) -> LogStats {
        self.stats
    }

    /// Each sector's erase count (free sectors whose header is gone: the highest known count).
    pub fn erase_counts(&self) -> [u32; SECTORS] {
        let mut counts = [0u32; SECTORS];
        for (count, state) in counts.iter_mut().zip(self.sectors.iter()) {
            *count = state.erase_count;
        }
        counts
    }

    /// Gives the flash back (tests reboot over it).
    pub fn into_flash(self) -> F {
        self.flash
    }

    fn read(&mut self, offset: usize, bytes: &mut [u8]) -> Result<(), LogError> {
        self.flash.read(offset as u32, bytes).map_err(|error| LogError::Flash(error.kind()))
    }
}

/// Buffer for [`RingLog::read_after`].
pub type RecordBuffer = [u8; RECORD_BYTES_MAX];

/// A new, zeroed [`RecordBuffer`].
pub const fn record_buffer() -> RecordBuffer {
    [0u8; RECORD_BYTES_MAX]
}

/// A sector header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SectorHeader {
    erase_count: u32,
    sector_seq: u32,
    seq_base: u64,
    acked: u64,
}

impl SectorHeader {
    fn to_bytes(self) -> [u8; SECTOR_HEADER_BYTES] {
        let mut bytes = [0u8; SECTOR_HEADER_BYTES];
        bytes[0..4].copy_from_slice(&SECTOR_MAGIC.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.erase_count.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.sector_seq.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.seq_base.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.acked.to_le_bytes());
        let crc = crc32(&[&bytes[..12], &bytes[16..]]);
        bytes[12..16].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    fn parse(bytes: &[u8; SECTOR_HEADER_BYTES]) -> Option<Self> {
        let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let long = |at: usize| u64::from(word(at)) | (u64::from(word(at + 4)) << 32);
        if word(0) != SECTOR_MAGIC || word(12) != crc32(&[&bytes[..12], &bytes[16..]]) {
            return None;
        }
        Some(Self { erase_count: word(4), sector_seq: word(8), seq_base: long(16), acked: long(24) })
    }
}

impl RecordHeader {
    fn parse(bytes: &[u8; RECORD_HEADER_BYTES]) -> Self {
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&bytes[8..16]);
        Self {
            len: u16::from_le_bytes([bytes[0], bytes[1]]),
            kind: bytes[2],
            crc: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            seq: u64::from_le_bytes(seq),
        }
    }
}

fn align_up(len: usize, align: usize) -> usize {
    len.div_ceil(align) * align
}

fn check_geometry<F: NorFlash>(capacity_bytes: usize, sectors: usize) -> Result<(), LogError> {
    if sectors < 2 {
        return Err(LogError::Geometry { reason: "the ring needs at least two sectors" });
    }
    if F::WRITE_SIZE == 0 || WRITE_BYTES_MAX % F::WRITE_SIZE != 0 {
        return Err(LogError::Geometry { reason: "write size must divide 16" });
    }
    if F::READ_SIZE == 0 || F::WRITE_SIZE % F::READ_SIZE != 0 {
        return Err(LogError::Geometry { reason: "read size must divide the write size" });
    }
    if F::ERASE_SIZE % F::WRITE_SIZE != 0 || F::ERASE_SIZE < SECTOR_HEADER_BYTES + RECORD_BYTES_MAX {
        return Err(LogError::Geometry { reason: "sector too small for a header and the largest record" });
    }
    if capacity_bytes < sectors.saturating_mul(F::ERASE_SIZE) {
        return Err(LogError::Geometry { reason: "flash smaller than the ring" });
    }
    Ok(())
}
