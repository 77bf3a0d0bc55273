//! Byte-level primitives shared by the frame envelope and the batch codec: LEB128 varints (the
//! same as postcard's), zigzag for signed deltas, and a bounds-checked reader.

use alloc::vec::Vec;

use super::{BatchError, DecodeError, FRAME_BYTES_MAX, LENGTH_PREFIX_BYTES_MAX};

/// Appends `value` as an LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Maps signed to unsigned so that small magnitudes of either sign give short varints.
pub(crate) fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

/// Inverse of [`zigzag`].
pub(crate) fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// What a length prefix at the start of a buffer says.
pub(crate) enum LengthPrefix {
    /// More bytes are needed to read the prefix.
    Incomplete,
    /// The frame is `len` bytes long after a prefix of `prefix_bytes`.
    Complete { len: usize, prefix_bytes: usize },
}

/// Reads a frame's length prefix, refusing lengths over [`FRAME_BYTES_MAX`] right away.
pub(crate) fn read_length_prefix(bytes: &[u8]) -> Result<LengthPrefix, DecodeError> {
    let mut value: u64 = 0;
    for (index, &byte) in bytes.iter().enumerate().take(LENGTH_PREFIX_BYTES_MAX) {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            if value > FRAME_BYTES_MAX as u64 {
                return Err(DecodeError::FrameTooLarge { len_bytes: value, max_bytes: FRAME_BYTES_MAX });
            }
            if value == 0 {
                return Err(DecodeError::Empty);
            }
            return Ok(LengthPrefix::Complete { len: value as usize, prefix_bytes: index + 1 });
        }
    }
    // Even an incomplete prefix can already be too large: refuse early. Checked before the
    // prefix's own length, so the error does not depend on how the bytes were split into reads.
    if value > FRAME_BYTES_MAX as u64 {
        return Err(DecodeError::FrameTooLarge { len_bytes: value, max_bytes: FRAME_BYTES_MAX });
    }
    if bytes.len() >= LENGTH_PREFIX_BYTES_MAX {
        return Err(DecodeError::LengthPrefix);
    }
    Ok(LengthPrefix::Incomplete)
}

/// A cursor over untrusted bytes; every read is bounds-checked and reports its offset.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    pub(crate) fn u8(&mut self) -> Result<u8, BatchError> {
        let byte = *self.bytes.get(self.pos).ok_or(BatchError::Truncated { offset: self.pos })?;
        self.pos += 1;
        Ok(byte)
    }

    pub(crate) fn varint(&mut self) -> Result<u64, BatchError> {
        let start = self.pos;
        let mut value: u64 = 0;
        for shift in 0..10 {
            let byte = self.u8()?;
            // The tenth byte may only carry the top bit of a u64.
            if shift == 9 && byte > 1 {
                return Err(BatchError::Varint { offset: start });
            }
            value |= u64::from(byte & 0x7f) << (7 * shift);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(BatchError::Varint { offset: start })
    }

    pub(crate) fn zigzag(&mut self) -> Result<i64, BatchError> {
        self.varint().map(unzigzag)
    }

    /// A length that must fit in what is left of the input (so it is safe to allocate).
    pub(crate) fn len_within_input(&mut self) -> Result<usize, BatchError> {
        let offset = self.pos;
        let len = self.varint()?;
        if len > self.remaining() as u64 {
            return Err(BatchError::Truncated { offset });
        }
        Ok(len as usize)
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Result<&'a [u8], BatchError> {
        let end = self.pos.checked_add(len).filter(|end| *end <= self.bytes.len());
        let end = end.ok_or(BatchError::Truncated { offset: self.pos })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    pub(crate) fn str(&mut self) -> Result<&'a str, BatchError> {
        let offset = self.pos;
        let len = self.len_within_input()?;
        let bytes = self.bytes(len)?;
        core::str::from_utf8(bytes).map_err(|_| BatchError::Utf8 { offset })
    }

    pub(crate) fn f64(&mut self) -> Result<f64, BatchError> {
        let bytes = self.bytes(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(f64::from_le_bytes(array))
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }
}

pub(crate) fn put_str(out: &mut Vec<u8>, text: &str) {
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}
