//! BMP280 barometric pressure and temperature sensor driver over embedded-hal 1.0 I2C.
//!
//! Follows the Bosch datasheet (BST-BMP280-DS001): the chip id register 0xD0 must read 0x58;
//! the factory calibration (`dig_T1` .. `dig_P9`, registers 0x88..0xA1, little-endian) is read
//! once at start; each measurement runs in *forced mode* (one conversion, then sleep, the
//! datasheet's recommendation for low-rate weather monitoring), polls `status.measuring`, and
//! burst-reads the six data registers 0xF7..0xFC. Compensation is the datasheet's integer code
//! (section 8.2: 32-bit temperature, 64-bit pressure) with wrapping arithmetic, so hostile
//! calibration bytes give a wrong number or an error, never a panic.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::{ErrorKind, I2c};

/// The I2C address with SDO low; 0x77 with SDO high.
pub const ADDRESS_DEFAULT: u8 = 0x76;
/// The I2C address with SDO high.
pub const ADDRESS_ALTERNATE: u8 = 0x77;
/// The BMP280's chip id (the BME280 answers 0x60, the BMP180 0x55).
pub const CHIP_ID: u8 = 0x58;

const REG_CALIBRATION: u8 = 0x88;
const REG_CHIP_ID: u8 = 0xD0;
const REG_RESET: u8 = 0xE0;
const REG_STATUS: u8 = 0xF3;
const REG_CTRL_MEAS: u8 = 0xF4;
const REG_DATA: u8 = 0xF7;
const RESET_WORD: u8 = 0xB6;
const CALIBRATION_BYTES: usize = 24;
/// `status` bit 3: a conversion is running.
const STATUS_MEASURING: u8 = 1 << 3;
/// ctrl_meas: temperature oversampling x1 (bits 7:5 = 001), pressure x4 (bits 4:2 = 011), forced
/// mode (bits 1:0 = 01): the datasheet's "weather monitoring" is x1/x1; x4 pressure halves noise
/// for 3 ms more conversion time.
const CTRL_MEAS_FORCED: u8 = (0b001 << 5) | (0b011 << 2) | 0b01;
/// Typical conversion time at x1/x4 is 13.3 ms max; poll every 2 ms for up to 20 ms.
const POLL_INTERVAL_MS: u32 = 2;
const POLLS_MAX: u32 = 10;
/// A data register that reads 0x80000 was skipped (its oversampling is off or no conversion ran).
const ADC_SKIPPED: i32 = 0x80000;
/// Start-up time after power-on or reset (datasheet table 2: 2 ms).
const STARTUP_MS: u32 = 2;

/// Why a BMP280 operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Bmp280Error<E> {
    /// The bus reported an error other than a NACK.
    #[error("i2c bus error: {0:?}")]
    Bus(E),
    /// No device acknowledged the address.
    #[error("no bmp280 answers at address {address:#04x}")]
    Absent {
        /// The address tried.
        address: u8,
    },
    /// A device answered but its chip id is not the BMP280's.
    #[error("chip id {found:#04x} at {address:#04x} is not a bmp280 ({CHIP_ID:#04x})")]
    WrongChip {
        /// The address.
        address: u8,
        /// The id it reported.
        found: u8,
    },
    /// The calibration block is unusable (`dig_T1` or `dig_P1` zero: an erased or broken NVM).
    #[error("bmp280 calibration is invalid")]
    Calibration,
    /// The conversion did not finish in time, or the data registers hold the "skipped" value.
    #[error("bmp280 measurement not ready")]
    NotReady,
}

/// The factory calibration coefficients (datasheet table 17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)] // The names are the datasheet's.
pub struct Calibration {
    pub dig_t1: u16,
    pub dig_t2: i16,
    pub dig_t3: i16,
    pub dig_p1: u16,
    pub dig_p2: i16,
    pub dig_p3: i16,
    pub dig_p4: i16,
    pub dig_p5: i16,
    pub dig_p6: i16,
    pub dig_p7: i16,
    pub dig_p8: i16,
    pub dig_p9: i16,
}

impl Calibration {
    /// Parses the 24 calibration bytes read from 0x88.
    pub fn from_bytes(bytes: &[u8; CALIBRATION_BYTES]) -> Self {
        let word = |idx: usize| [bytes[2 * idx], bytes[2 * idx + 1]];
        let signed = |idx: usize| i16::from_le_bytes(word(idx));
        Self {
            dig_t1: u16::from_le_bytes(word(0)),
            dig_t2: signed(1),
            dig_t3: signed(2),
            dig_p1: u16::from_le_bytes(word(3)),
            dig_p2: signed(4),
            dig_p3: signed(5),
            dig_p4: signed(6),
            dig_p5: signed(7),
            dig_p6: signed(8),
            dig_p7: signed(9),
            dig_p8: signed(10),
            dig_p9: signed(11),
        }
    }

    /// Datasheet `bmp280_compensate_T_int32`: returns `(temperature in 0.01 °C, t_fine)`.
    pub fn compensate_temperature(&self, adc_t: i32) -> (i32, i32) {
        let dig_t1 = i32::from(self.dig_t1);
        let var1 = ((adc_t >> 3).wrapping_sub(dig_t1 << 1)).wrapping_mul(i32::from(self.dig_t2)) >> 11;
        let delta = (adc_t >> 4).wrapping_sub(dig_t1);
        let var2 = ((delta.wrapping_mul(delta) >> 12).wrapping_mul(i32::from(self.dig_t3))) >> 14;
        let t_fine = var1.wrapping_add(var2);
        (t_fine.wrapping_mul(5).wrapping_add(128) >> 8, t_fine)
    }

    /// Datasheet `bmp280_compensate_P_int64`: pressure in Pa as Q24.8 (value / 256 = Pa), or
    /// `None` where the datasheet returns 0 (a zero divisor).
    pub fn compensate_pressure(&self, adc_p: i32, t_fine: i32) -> Option<u32> {
        let mut var1: i64 = i64::from(t_fine) - 128_000;
        let mut var2: i64 = var1.wrapping_mul(var1).wrapping_mul(i64::from(self.dig_p6));
        var2 = var2.wrapping_add(var1.wrapping_mul(i64::from(self.dig_p5)) << 17);
        var2 = var2.wrapping_add(i64::from(self.dig_p4) << 35);
        var1 = (var1.wrapping_mul(var1).wrapping_mul(i64::from(self.dig_p3)) >> 8)
            .wrapping_add(var1.wrapping_mul(i64::from(self.dig_p2)) << 12);
        var1 = ((1i64 << 47).wrapping_add(var1)).wrapping_mul(i64::from(self.dig_p1)) >> 33;
        if var1 == 0 {
            return None;
        }
        let mut pressure: i64 = 1_048_576 - i64::from(adc_p);
        pressure = ((pressure << 31).wrapping_sub(var2)).wrapping_mul(3125).checked_div(var1)?;
        var1 = i64::from(self.dig_p9).wrapping_mul(pressure >> 13).wrapping_mul(pressure >> 13) >> 25;
        var2 = i64::from(self.dig_p8).wrapping_mul(pressure) >> 19;
        pressure = (pressure.wrapping_add(var1).wrapping_add(var2) >> 8).wrapping_add(i64::from(self.dig_p7) << 4);
        Some(pressure as u32)
    }
}

/// One compensated BMP280 measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bmp280Measurement {
    /// Temperature in hundredths of a degree Celsius.
    pub temperature_cdeg_c: i32,
    /// Pressure in Pa as Q24.8 (divide by 256 for Pa).
    pub pressure_q24_8_pa: u32,
}

/// A BMP280 on an I2C bus that the driver owns.
#[derive(Debug)]
pub struct Bmp280<I2C> {
    i2c: I2C,
    address: u8,
    calibration: Calibration,
}

impl<I2C: I2c> Bmp280<I2C> {
    /// Probes the chip at `address`: checks its id and reads its calibration. On failure the bus
    /// is returned with the error so the caller can try another address or sensor.
    pub fn new(i2c: I2C, address: u8) -> Result<Self, (I2C, Bmp280Error<I2C::Error>)> {
        let mut driver = Self { i2c, address, calibration: Calibration::default() };
        match driver.init() {
            Ok(()) => Ok(driver),
            Err(error) => Err((driver.i2c, error)),
        }
    }

    fn init(&mut self) -> Result<(), Bmp280Error<I2C::Error>> {
        let mut id = [0u8; 1];
        self.read_registers(REG_CHIP_ID, &mut id)?;
        if id[0] != CHIP_ID {
            return Err(Bmp280Error::WrongChip { address: self.address, found: id[0] });
        }
        let mut bytes = [0u8; CALIBRATION_BYTES];
        self.read_registers(REG_CALIBRATION, &mut bytes)?;
        let calibration = Calibration::from_bytes(&bytes);
        if calibration.dig_t1 == 0 || calibration.dig_p1 == 0 {
            return Err(Bmp280Error::Calibration);
        }
        self.calibration = calibration;
        Ok(())
    }

    /// The calibration read at start.
    pub fn calibration(&self) -> &Calibration {
        &self.calibration
    }

    /// Gives the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }

    /// Soft-resets the chip (it then sleeps until the next forced measurement).
    pub fn reset(&mut self, delay: &mut impl DelayNs) -> Result<(), Bmp280Error<I2C::Error>> {
        self.write_register(REG_RESET, RESET_WORD)?;
        delay.delay_ms(STARTUP_MS);
        Ok(())
    }

    /// Runs one forced-mode conversion and returns the compensated values.
    pub fn measure(&mut self, delay: &mut impl DelayNs) -> Result<Bmp280Measurement, Bmp280Error<I2C::Error>> {
        self.write_register(REG_CTRL_MEAS, CTRL_MEAS_FORCED)?;
        let mut finished = false;
        for _ in 0..POLLS_MAX {
            delay.delay_ms(POLL_INTERVAL_MS);
            let mut status = [0u8; 1];
            self.read_registers(REG_STATUS, &mut status)?;
            if status[0] & STATUS_MEASURING == 0 {
                finished = true;
                break;
            }
        }
        if !finished {
            return Err(Bmp280Error::NotReady);
        }
        let mut data = [0u8; 6];
        self.read_registers(REG_DATA, &mut data)?;
        let adc_p = adc20(data[0], data[1], data[2]);
        let adc_t = adc20(data[3], data[4], data[5]);
        if adc_p == ADC_SKIPPED || adc_t == ADC_SKIPPED {
            return Err(Bmp280Error::NotReady);
        }
        let (temperature_cdeg_c, t_fine) = self.calibration.compensate_temperature(adc_t);
        let pressure_q24_8_pa = self.calibration.compensate_pressure(adc_p, t_fine).ok_or(Bmp280Error::Calibration)?;
        Ok(Bmp280Measurement { temperature_cdeg_c, pressure_q24_8_pa })
    }

    fn read_registers(&mut self, register: u8, buffer: &mut [u8]) -> Result<(), Bmp280Error<I2C::Error>> {
        let address = self.address;
        self.i2c.write_read(address, &[register], buffer).map_err(|error| classify(address, error))
    }

    fn write_register(&mut self, register: u8, value: u8) -> Result<(), Bmp280Error<I2C::Error>> {
        let address = self.address;
        self.i2c.write(address, &[register, value]).map_err(|error| classify(address, error))
    }
}

/// A NACK means nobody is at the address (the BMP280 ACKs every byte while powered).
fn classify<E: embedded_hal::i2c::Error>(address: u8, error: E) -> Bmp280Error<E> {
    match error.kind() {
        ErrorKind::NoAcknowledge(_) => Bmp280Error::Absent { address },
        _ => Bmp280Error::Bus(error),
    }
}

/// A 20-bit ADC value from its msb, lsb and xlsb registers (xlsb bits 7:4).
fn adc20(msb: u8, lsb: u8, xlsb: u8) -> i32 {
    (i32::from(msb) << 12) | (i32::from(lsb) << 4) | (i32::from(xlsb) >> 4)
}

/// Temperature channel name of the readings the sampler logs.
pub const TEMPERATURE_SENSOR: &str = "bmp280.temperature";
/// Pressure channel name.
pub const PRESSURE_SENSOR: &str = "bmp280.pressure";

impl<E> From<&Bmp280Error<E>> for crate::sampler::SensorFault {
    fn from(error: &Bmp280Error<E>) -> Self {
        match error {
            Bmp280Error::Bus(_) => Self::Bus,
            Bmp280Error::Absent { .. } | Bmp280Error::WrongChip { .. } | Bmp280Error::Calibration => Self::Absent,
            Bmp280Error::NotReady => Self::NotReady,
        }
    }
}

impl<I2C: I2c> crate::sampler::Sensor for Bmp280<I2C> {
    fn measure(
        &mut self,
        mut delay: &mut dyn DelayNs,
        out: &mut [crate::sampler::Reading; crate::sampler::READINGS_PER_SENSOR_MAX],
    ) -> Result<usize, crate::sampler::SensorFault> {
        let measurement =
            Bmp280::measure(self, &mut delay).map_err(|error| crate::sampler::SensorFault::from(&error))?;
        out[0] = crate::sampler::Reading {
            sensor: TEMPERATURE_SENSOR,
            value: f64::from(measurement.temperature_cdeg_c) / 100.0,
            unit: "Cel",
        };
        out[1] = crate::sampler::Reading {
            sensor: PRESSURE_SENSOR,
            value: f64::from(measurement.pressure_q24_8_pa) / 256.0,
            unit: "Pa",
        };
        Ok(2)
    }
}
