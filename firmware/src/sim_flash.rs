//! `SimFlash`: a NOR flash in RAM with real NOR semantics and injectable power cuts, for host
//! tests and simulations of the log (it is `no_std` and heap-free like the rest of the crate).
//!
//! Semantics: erase sets a whole sector to 0xFF; a write can only clear bits (the result is the
//! AND of old and new), and writing over an already programmed byte is counted as an overwrite
//! (real parts with ECC forbid it, so the log must never do it). A power cut can be armed to hit
//! after a given number of programmed bytes (the byte it hits is half-programmed: only the
//! bits not in `torn_mask` take effect) or during a given erase (only some bytes of the sector
//! are erased). After a cut every operation fails until [`SimFlash::power_on`].

use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash};

/// Why a simulated operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SimFlashError {
    /// The power was cut (during this operation or before it).
    PowerLost,
    /// Offset or length not aligned to the operation's size.
    NotAligned,
    /// Outside the flash.
    OutOfBounds,
}

impl NorFlashError for SimFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            SimFlashError::PowerLost => NorFlashErrorKind::Other,
            SimFlashError::NotAligned => NorFlashErrorKind::NotAligned,
            SimFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
        }
    }
}

/// How a torn erase leaves the sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornErase {
    /// Bytes erased from the start of the sector before the cut.
    pub prefix_bytes: usize,
    /// Seed for a scattered part: when nonzero, about half of the remaining bytes are erased too
    /// (chips erase in internal blocks whose order is not documented).
    pub scatter_seed: u32,
}

/// A `BYTES`-byte NOR flash with `ERASE`-byte sectors and `WRITE`-byte write units.
#[derive(Debug, Clone)]
pub struct SimFlash<const BYTES: usize, const ERASE: usize, const WRITE: usize> {
    bytes: [u8; BYTES],
    powered: bool,
    /// Bytes that may still be programmed before the armed cut.
    program_budget: Option<usize>,
    torn_mask: u8,
    /// Erases that may still complete before the armed cut, and how the cut one ends.
    erase_budget: Option<(usize, TornErase)>,
    /// Bytes programmed and erases done so far (to plan cuts).
    programmed_bytes: usize,
    erases: usize,
    overwrites: usize,
}

impl<const BYTES: usize, const ERASE: usize, const WRITE: usize> Default for SimFlash<BYTES, ERASE, WRITE> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const BYTES: usize, const ERASE: usize, const WRITE: usize> SimFlash<BYTES, ERASE, WRITE> {
    /// A fully erased flash, powered.
    pub const fn new() -> Self {
        Self {
            bytes: [0xFF; BYTES],
            powered: true,
            program_budget: None,
            torn_mask: 0,
            erase_budget: None,
            programmed_bytes: 0,
            erases: 0,
            overwrites: 0,
        }
    }

    /// Cuts the power once `bytes` more bytes have been programmed; the byte after them is
    /// half-programmed (bits set in `torn_mask` keep their old value).
    pub fn cut_after_program_bytes(&mut self, bytes: usize, torn_mask: u8) {
        self.program_budget = Some(bytes);
        self.torn_mask = torn_mask;
    }

    /// Cuts the power during the erase after `erases` more complete ones.
    pub fn cut_during_erase(&mut self, erases: usize, torn: TornErase) {
        self.erase_budget = Some((erases, torn));
    }

    /// Restores power and disarms pending cuts (a reboot).
    pub fn power_on(&mut self) {
        self.powered = true;
        self.program_budget = None;
        self.erase_budget = None;
    }

    /// Whether the power is on.
    pub fn is_powered(&self) -> bool {
        self.powered
    }

    /// Bytes programmed since creation.
    pub fn programmed_bytes(&self) -> usize {
        self.programmed_bytes
    }

    /// Erases since creation.
    pub fn erases(&self) -> usize {
        self.erases
    }

    /// Bytes programmed over already programmed ones (must stay 0).
    pub fn overwrites(&self) -> usize {
        self.overwrites
    }

    /// The raw contents.
    pub fn contents(&self) -> &[u8; BYTES] {
        &self.bytes
    }

    /// Mutable raw contents (to inject decay).
    pub fn contents_mut(&mut self) -> &mut [u8; BYTES] {
        &mut self.bytes
    }

    fn range(&self, offset: u32, len: usize, align: usize) -> Result<core::ops::Range<usize>, SimFlashError> {
        if !self.powered {
            return Err(SimFlashError::PowerLost);
        }
        let start = offset as usize;
        if start % align != 0 || len % align != 0 {
            return Err(SimFlashError::NotAligned);
        }
        let end = start.checked_add(len).ok_or(SimFlashError::OutOfBounds)?;
        if end > BYTES {
            return Err(SimFlashError::OutOfBounds);
        }
        Ok(start..end)
    }
}

impl<const BYTES: usize, const ERASE: usize, const WRITE: usize> ErrorType for SimFlash<BYTES, ERASE, WRITE> {
    type Error = SimFlashError;
}

impl<const BYTES: usize, const ERASE: usize, const WRITE: usize> ReadNorFlash for SimFlash<BYTES, ERASE, WRITE> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        let range = self.range(offset, bytes.len(), 1)?;
        bytes.copy_from_slice(self.bytes.get(range).ok_or(SimFlashError::OutOfBounds)?);
        Ok(())
    }

    fn capacity(&self) -> usize {
        BYTES
    }
}

impl<const BYTES: usize, const ERASE: usize, const WRITE: usize> NorFlash for SimFlash<BYTES, ERASE, WRITE> {
    const WRITE_SIZE: usize = WRITE;
    const ERASE_SIZE: usize = ERASE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        let range = self.range(from, (to as usize).saturating_sub(from as usize), ERASE)?;
        for sector_start in range.step_by(ERASE) {
            let sector = self.bytes.get_mut(sector_start..sector_start + ERASE).ok_or(SimFlashError::OutOfBounds)?;
            match &mut self.erase_budget {
                Some((0, torn)) => {
                    let prefix = torn.prefix_bytes.min(ERASE);
                    sector.iter_mut().take(prefix).for_each(|byte| *byte = 0xFF);
                    if torn.scatter_seed != 0 {
                        let mut state = torn.scatter_seed;
                        for byte in sector.iter_mut().skip(prefix) {
                            // xorshift32: a fixed, seed-determined scatter.
                            state ^= state << 13;
                            state ^= state >> 17;
                            state ^= state << 5;
                            if state & 1 == 1 {
                                *byte = 0xFF;
                            }
                        }
                    }
                    self.powered = false;
                    return Err(SimFlashError::PowerLost);
                }
                Some((left, _)) => *left -= 1,
                None => {}
            }
            sector.iter_mut().for_each(|byte| *byte = 0xFF);
            self.erases += 1;
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        let range = self.range(offset, bytes.len(), WRITE)?;
        for (target, &value) in self.bytes.get_mut(range).ok_or(SimFlashError::OutOfBounds)?.iter_mut().zip(bytes) {
            if let Some(budget) = &mut self.program_budget {
                if *budget == 0 {
                    *target &= value | self.torn_mask;
                    self.powered = false;
                    return Err(SimFlashError::PowerLost);
                }
                *budget -= 1;
            }
            if *target != 0xFF {
                self.overwrites += 1;
            }
            *target &= value;
            self.programmed_bytes += 1;
        }
        Ok(())
    }
}
