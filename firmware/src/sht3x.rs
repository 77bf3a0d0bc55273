//! SHT3x (SHT30/31/35) humidity and temperature sensor driver over embedded-hal 1.0 I2C.
//!
//! Uses single-shot measurements with high repeatability and clock stretching disabled (command
//! 0x2400, datasheet table 9): the driver sends the command, waits the maximum measurement
//! duration (15 ms, table 4) on the delay, then reads six bytes: temperature word, CRC, humidity
//! word, CRC. Every word's CRC-8 is checked before it is used. Without clock stretching the
//! sensor NACKs a read header while it is still measuring, which is reported as
//! [`Sht3xError::NotReady`]; a NACK of the command means no sensor answers at that address.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::{Error as _, ErrorKind, I2c, NoAcknowledgeSource};

use crate::checksum::crc8_sensirion;

/// The default I2C address (ADDR pin low); 0x45 with ADDR high.
pub const ADDRESS_DEFAULT: u8 = 0x44;
/// The alternative I2C address (ADDR pin high).
pub const ADDRESS_ALTERNATE: u8 = 0x45;
/// Single shot, high repeatability, clock stretching disabled.
const CMD_SINGLE_SHOT_HIGH: [u8; 2] = [0x24, 0x00];
/// Read the status register (two bytes plus CRC).
const CMD_READ_STATUS: [u8; 2] = [0xF3, 0x2D];
/// Soft reset.
const CMD_SOFT_RESET: [u8; 2] = [0x30, 0xA2];
/// Maximum duration of a high-repeatability measurement, rounded up (datasheet: 15.5 ms).
pub const MEASUREMENT_MS: u32 = 16;
/// Time the sensor needs after a soft reset (datasheet: 1.5 ms max).
const SOFT_RESET_MS: u32 = 2;

/// Why an SHT3x operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Sht3xError<E> {
    /// The bus reported an error other than a NACK (arbitration loss, bus fault, overrun).
    #[error("i2c bus error: {0:?}")]
    Bus(E),
    /// No device acknowledged the address: the sensor is absent or unpowered.
    #[error("no sht3x answers at address {address:#04x}")]
    Absent {
        /// The address tried.
        address: u8,
    },
    /// The sensor NACKed the read: the measurement is still running.
    #[error("sht3x measurement not ready")]
    NotReady,
    /// A word's CRC-8 does not match: the reading was corrupted on the bus.
    #[error("sht3x crc mismatch in word {word_idx}: received {received:#04x}, computed {computed:#04x}")]
    Crc {
        /// Which word of the reply (0 = first).
        word_idx: u8,
        /// The CRC the sensor sent.
        received: u8,
        /// The CRC of the received word.
        computed: u8,
    },
}

/// One SHT3x measurement in fixed point (no float needed on the MCU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sht3xMeasurement {
    /// Temperature in milli-degrees Celsius.
    pub temperature_mdeg_c: i32,
    /// Relative humidity in milli-percent (0 ..= 100 000).
    pub humidity_mpct: u32,
}

impl Sht3xMeasurement {
    /// Converts the raw words with the datasheet's formulas: T = -45 + 175 * S_T / 65535 °C and
    /// RH = 100 * S_RH / 65535 %.
    pub fn from_raw(temperature_raw: u16, humidity_raw: u16) -> Self {
        let temperature_mdeg_c = -45_000 + (175_000 * i64::from(temperature_raw) / 65_535) as i32;
        let humidity_mpct = (100_000 * u64::from(humidity_raw) / 65_535) as u32;
        Self { temperature_mdeg_c, humidity_mpct }
    }
}

/// An SHT3x on an I2C bus that the driver owns.
#[derive(Debug)]
pub struct Sht3x<I2C> {
    i2c: I2C,
    address: u8,
}

impl<I2C: I2c> Sht3x<I2C> {
    /// A driver for the sensor at `address` ([`ADDRESS_DEFAULT`] or [`ADDRESS_ALTERNATE`]).
    pub fn new(i2c: I2C, address: u8) -> Self {
        Self { i2c, address }
    }

    /// Gives the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }

    /// Soft-resets the sensor and waits until it is ready again.
    pub fn soft_reset(&mut self, delay: &mut impl DelayNs) -> Result<(), Sht3xError<I2C::Error>> {
        self.command(&CMD_SOFT_RESET)?;
        delay.delay_ms(SOFT_RESET_MS);
        Ok(())
    }

    /// Reads the status register (CRC checked): a cheap presence probe.
    pub fn status(&mut self) -> Result<u16, Sht3xError<I2C::Error>> {
        self.command(&CMD_READ_STATUS)?;
        let mut reply = [0u8; 3];
        self.read(&mut reply)?;
        checked_word(&reply, 0)
    }

    /// Runs one single-shot measurement: command, wait, read, check both CRCs.
    pub fn measure(&mut self, delay: &mut impl DelayNs) -> Result<Sht3xMeasurement, Sht3xError<I2C::Error>> {
        self.command(&CMD_SINGLE_SHOT_HIGH)?;
        delay.delay_ms(MEASUREMENT_MS);
        let mut reply = [0u8; 6];
        self.read(&mut reply)?;
        let temperature_raw = checked_word(&reply, 0)?;
        let humidity_raw = checked_word(&reply, 1)?;
        Ok(Sht3xMeasurement::from_raw(temperature_raw, humidity_raw))
    }

    fn command(&mut self, command: &[u8; 2]) -> Result<(), Sht3xError<I2C::Error>> {
        let address = self.address;
        self.i2c.write(address, command).map_err(|error| match error.kind() {
            ErrorKind::NoAcknowledge(_) => Sht3xError::Absent { address },
            _ => Sht3xError::Bus(error),
        })
    }

    fn read(&mut self, reply: &mut [u8]) -> Result<(), Sht3xError<I2C::Error>> {
        let address = self.address;
        self.i2c.read(address, reply).map_err(|error| match error.kind() {
            // The sensor answered the command a moment ago, so a NACK now means "still measuring".
            ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address | NoAcknowledgeSource::Unknown) => {
                Sht3xError::NotReady
            }
            _ => Sht3xError::Bus(error),
        })
    }
}

/// The `word_idx`-th 16-bit word of a reply (three bytes per word), after checking its CRC.
fn checked_word<E>(reply: &[u8], word_idx: u8) -> Result<u16, Sht3xError<E>> {
    let start = usize::from(word_idx) * 3;
    let (Some(&msb), Some(&lsb), Some(&received)) = (reply.get(start), reply.get(start + 1), reply.get(start + 2))
    else {
        // Callers pass fixed-size replies; a short one is reported like a corrupted word.
        return Err(Sht3xError::Crc { word_idx, received: 0, computed: 0 });
    };
    let computed = crc8_sensirion(&[msb, lsb]);
    if computed != received {
        return Err(Sht3xError::Crc { word_idx, received, computed });
    }
    Ok(u16::from_be_bytes([msb, lsb]))
}

/// Sensor channel names and units of the readings the sampler logs.
pub const TEMPERATURE_SENSOR: &str = "sht3x.temperature";
/// Relative humidity channel.
pub const HUMIDITY_SENSOR: &str = "sht3x.humidity";

impl<E> From<&Sht3xError<E>> for crate::sampler::SensorFault {
    fn from(error: &Sht3xError<E>) -> Self {
        match error {
            Sht3xError::Bus(_) => Self::Bus,
            Sht3xError::Absent { .. } => Self::Absent,
            Sht3xError::NotReady => Self::NotReady,
            Sht3xError::Crc { .. } => Self::Crc,
        }
    }
}

impl<I2C: I2c> crate::sampler::Sensor for Sht3x<I2C> {
    fn measure(
        &mut self,
        mut delay: &mut dyn DelayNs,
        out: &mut [crate::sampler::Reading; crate::sampler::READINGS_PER_SENSOR_MAX],
    ) -> Result<usize, crate::sampler::SensorFault> {
        let measurement =
            Sht3x::measure(self, &mut delay).map_err(|error| crate::sampler::SensorFault::from(&error))?;
        out[0] = crate::sampler::Reading {
            sensor: TEMPERATURE_SENSOR,
            value: f64::from(measurement.temperature_mdeg_c) / 1000.0,
            unit: "Cel",
        };
        out[1] = crate::sampler::Reading {
            sensor: HUMIDITY_SENSOR,
            value: f64::from(measurement.humidity_mpct) / 1000.0,
            unit: "%",
        };
        Ok(2)
    }
}
