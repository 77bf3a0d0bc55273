//! The two checksums of the firmware: Sensirion's CRC-8 (SHT3x words) and CRC-32 (flash records
//! and link frames).
//!
//! Both are bit-wise (no lookup table): the firmware checksums a few hundred bytes per sample, and
//! a 1 KiB table would cost more flash than the time it saves.

use crc::{Crc, NoTable, CRC_32_ISO_HDLC, CRC_8_NRSC_5};

/// Sensirion's CRC-8: polynomial 0x31, initial value 0xFF, no reflection, no final XOR
/// (catalogued as CRC-8/NRSC-5). The SHT3x datasheet's example: `crc8(&[0xBE, 0xEF]) == 0x92`.
const SENSIRION: Crc<u8, NoTable> = Crc::<u8, NoTable>::new(&CRC_8_NRSC_5);
/// CRC-32 (ISO-HDLC, the zlib/Ethernet one).
const CRC32: Crc<u32, NoTable> = Crc::<u32, NoTable>::new(&CRC_32_ISO_HDLC);

/// Sensirion CRC-8 of `bytes`.
pub fn crc8_sensirion(bytes: &[u8]) -> u8 {
    SENSIRION.checksum(bytes)
}

/// CRC-32 of the concatenation of `parts` (so headers and bodies need not be copied together).
pub fn crc32(parts: &[&[u8]]) -> u32 {
    let mut digest = CRC32.digest();
    for part in parts {
        digest.update(part);
    }
    digest.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensirion_datasheet_example() {
        assert_eq!(crc8_sensirion(&[0xBE, 0xEF]), 0x92);
    }

    #[test]
    fn crc32_check_value_and_split_input() {
        // The catalogue's check value for "123456789".
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"", b"56789"]), 0xCBF4_3926);
    }
}
