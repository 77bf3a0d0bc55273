//! SHT3x and BMP280 drivers against embedded-hal-mock I2C transactions: datasheet vectors, CRC
//! errors, NACKs and bus errors.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as I2cTransaction};
use tidesync_firmware::bmp280::{self, Bmp280, Bmp280Error, Calibration};
use tidesync_firmware::checksum::crc8_sensirion;
use tidesync_firmware::sampler::{Reading, Sensor, SensorFault, READINGS_PER_SENSOR_MAX};
use tidesync_firmware::sht3x::{self, Sht3x, Sht3xError, Sht3xMeasurement};

/// A delay that adds up how long the driver asked to wait.
#[derive(Default)]
struct RecordingDelay {
    total_ns: u64,
}

impl DelayNs for RecordingDelay {
    fn delay_ns(&mut self, ns: u32) {
        self.total_ns += u64::from(ns);
    }
}

const SHT: u8 = sht3x::ADDRESS_DEFAULT;

fn sht_reply(temperature_raw: u16, humidity_raw: u16) -> Vec<u8> {
    let [t_msb, t_lsb] = temperature_raw.to_be_bytes();
    let [h_msb, h_lsb] = humidity_raw.to_be_bytes();
    vec![t_msb, t_lsb, crc8_sensirion(&[t_msb, t_lsb]), h_msb, h_lsb, crc8_sensirion(&[h_msb, h_lsb])]
}

#[test]
fn sht3x_single_shot_measurement() {
    let expectations =
        [I2cTransaction::write(SHT, vec![0x24, 0x00]), I2cTransaction::read(SHT, sht_reply(0x6666, 0x8000))];
    let mut i2c = I2cMock::new(&expectations);
    let mut delay = RecordingDelay::default();
    let mut sensor = Sht3x::new(i2c.clone(), SHT);
    let measurement = sensor.measure(&mut delay).expect("measurement");
    // 0x6666 is 0.4 of full scale: T = -45 + 0.4 * 175 = 25 °C exactly; RH = 100 * 0x8000 / 65535 = 50.0008 %.
    assert_eq!(measurement, Sht3xMeasurement { temperature_mdeg_c: 25_000, humidity_mpct: 50_000 });
    assert!(delay.total_ns >= 15_500_000, "waited only {} ns", delay.total_ns);
    i2c.done();
}

#[test]
fn sht3x_conversion_extremes() {
    assert_eq!(Sht3xMeasurement::from_raw(0, 0), Sht3xMeasurement { temperature_mdeg_c: -45_000, humidity_mpct: 0 });
    assert_eq!(
        Sht3xMeasurement::from_raw(u16::MAX, u16::MAX),
        Sht3xMeasurement { temperature_mdeg_c: 130_000, humidity_mpct: 100_000 }
    );
}

#[test]
fn sht3x_crc_mismatch_on_each_word() {
    for word_idx in 0..2u8 {
        let mut reply = sht_reply(0x6666, 0x8000);
        reply[usize::from(word_idx) * 3 + 2] ^= 0x01;
        let expectations = [I2cTransaction::write(SHT, vec![0x24, 0x00]), I2cTransaction::read(SHT, reply.clone())];
        let mut i2c = I2cMock::new(&expectations);
        let mut sensor = Sht3x::new(i2c.clone(), SHT);
        let error = sensor.measure(&mut RecordingDelay::default()).expect_err("corrupted word");
        let received = reply[usize::from(word_idx) * 3 + 2];
        assert_eq!(error, Sht3xError::Crc { word_idx, received, computed: received ^ 0x01 });
        i2c.done();
    }
}

#[test]
fn sht3x_nack_on_command_is_absent() {
    let expectations =
        [I2cTransaction::write(SHT, vec![0x24, 0x00])
            .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address))];
    let mut i2c = I2cMock::new(&expectations);
    let mut sensor = Sht3x::new(i2c.clone(), SHT);
    assert_eq!(sensor.measure(&mut RecordingDelay::default()), Err(Sht3xError::Absent { address: SHT }));
    i2c.done();
}

#[test]
fn sht3x_nack_on_read_is_not_ready_and_bus_errors_pass_through() {
    let expectations = [
        I2cTransaction::write(SHT, vec![0x24, 0x00]),
        I2cTransaction::read(SHT, vec![0; 6]).with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)),
        I2cTransaction::write(SHT, vec![0x24, 0x00]),
        I2cTransaction::read(SHT, vec![0; 6]).with_error(ErrorKind::ArbitrationLoss),
    ];
    let mut i2c = I2cMock::new(&expectations);
    let mut sensor = Sht3x::new(i2c.clone(), SHT);
    assert_eq!(sensor.measure(&mut RecordingDelay::default()), Err(Sht3xError::NotReady));
    assert_eq!(sensor.measure(&mut RecordingDelay::default()), Err(Sht3xError::Bus(ErrorKind::ArbitrationLoss)));
    i2c.done();
}

#[test]
fn sht3x_status_is_crc_checked() {
    let status = [0x80, 0x10];
    let expectations = [
        I2cTransaction::write(SHT, vec![0xF3, 0x2D]),
        I2cTransaction::read(SHT, vec![status[0], status[1], crc8_sensirion(&status)]),
        I2cTransaction::write(SHT, vec![0xF3, 0x2D]),
        I2cTransaction::read(SHT, vec![status[0], status[1], crc8_sensirion(&status) ^ 0x80]),
    ];
    let mut i2c = I2cMock::new(&expectations);
    let mut sensor = Sht3x::new(i2c.clone(), SHT);
    assert_eq!(sensor.status(), Ok(0x8010));
    assert!(matches!(sensor.status(), Err(Sht3xError::Crc { word_idx: 0, .. })));
    i2c.done();
}

#[test]
fn sht3x_as_scheduled_sensor_reports_two_channels_and_faults() {
    let expectations = [
        I2cTransaction::write(SHT, vec![0x24, 0x00]),
        I2cTransaction::read(SHT, sht_reply(0x6666, 0x8000)),
        I2cTransaction::write(SHT, vec![0x24, 0x00]),
        I2cTransaction::read(SHT, vec![0x66, 0x66, 0x00, 0x80, 0x00, 0x00]),
    ];
    let mut i2c = I2cMock::new(&expectations);
    let mut sensor = Sht3x::new(i2c.clone(), SHT);
    let mut out = [Reading { sensor: "", value: 0.0, unit: "" }; READINGS_PER_SENSOR_MAX];
    let mut delay = RecordingDelay::default();
    assert_eq!(Sensor::measure(&mut sensor, &mut delay, &mut out), Ok(2));
    assert_eq!(out[0], Reading { sensor: sht3x::TEMPERATURE_SENSOR, value: 25.0, unit: "Cel" });
    assert_eq!(out[1], Reading { sensor: sht3x::HUMIDITY_SENSOR, value: 50.0, unit: "%" });
    assert_eq!(Sensor::measure(&mut sensor, &mut delay, &mut out), Err(SensorFault::Crc));
    i2c.done();
}

const BMP: u8 = bmp280::ADDRESS_DEFAULT;

/// The calibration of the datasheet's worked example (BST-BMP280-DS001, section 8.1 table).
fn datasheet_calibration_bytes() -> Vec<u8> {
    let words: [i32; 12] = [27504, 26435, -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000];
    words.iter().flat_map(|word| (*word as u16).to_le_bytes()).collect()
}

fn bmp_probe() -> Vec<I2cTransaction> {
    vec![
        I2cTransaction::write_read(BMP, vec![0xD0], vec![0x58]),
        I2cTransaction::write_read(BMP, vec![0x88], datasheet_calibration_bytes()),
    ]
}

#[test]
fn bmp280_datasheet_compensation_vector() {
    let calibration = Calibration::from_bytes(&datasheet_calibration_bytes().try_into().expect("24 bytes"));
    let (temperature, t_fine) = calibration.compensate_temperature(519_888);
    assert_eq!((temperature, t_fine), (2508, 128_422));
    let pressure = calibration.compensate_pressure(415_148, t_fine).expect("pressure");
    // The datasheet's worked example gives 100653.27 Pa (floating-point routine); the 64-bit
    // integer routine has 1/256 Pa resolution.
    assert_eq!(pressure / 256, 100_653);
    assert!((f64::from(pressure) / 256.0 - 100_653.27).abs() < 0.05, "pressure {}", f64::from(pressure) / 256.0);
}

#[test]
fn bmp280_forced_measurement() {
    let mut expectations = bmp_probe();
    expectations.extend([
        // Forced mode, temperature x1, pressure x4.
        I2cTransaction::write(BMP, vec![0xF4, 0b0010_1101]),
        I2cTransaction::write_read(BMP, vec![0xF3], vec![0x08]),
        I2cTransaction::write_read(BMP, vec![0xF3], vec![0x00]),
        // adc_P = 415148 = 0x655AC, adc_T = 519888 = 0x7EED0.
        I2cTransaction::write_read(BMP, vec![0xF7], vec![0x65, 0x5A, 0xC0, 0x7E, 0xED, 0x00]),
    ]);
    let mut i2c = I2cMock::new(&expectations);
    let mut sensor = Bmp280::new(i2c.clone(), BMP).map_err(|(_, error)| error).expect("probe");
    assert_eq!(sensor.calibration().dig_t1, 27504);
    assert_eq!(sensor.calibration().dig_p9, 6000);
    let mut delay = RecordingDelay::default();
    let measurement = sensor.measure(&mut delay).expect("measurement");
    assert_eq!(measurement.temperature_cdeg_c, 2508);
    assert_eq!(measurement.pressure_q24_8_pa / 256, 100_653);
    assert_eq!(delay.total_ns, 4_000_000, "two 2 ms polls");
    i2c.done();
}

#[test]
fn bmp280_absent_wrong_chip_and_bus_error() {
    let cases = [
        (
            I2cTransaction::write_read(BMP, vec![0xD0], vec![0])
                .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)),
            Bmp280Error::Absent { address: BMP },
        ),
        (I2cTransaction::write_read(BMP, vec![0xD0], vec![0x60]), Bmp280Error::WrongChip { address: BMP, found: 0x60 }),
        (
            I2cTransaction::write_read(BMP, vec![0xD0], vec![0]).with_error(ErrorKind::Bus),
            Bmp280Error::Bus(ErrorKind::Bus),
        ),
    ];
    for (transaction, expected) in cases {
        let mut i2c = I2cMock::new(&[transaction]);
        let (_, error) = Bmp280::new(i2c.clone(), BMP).expect_err("probe fails");
        assert_eq!(error, expected);
        i2c.done();
    }
}

#[test]
fn bmp280_erased_calibration_is_rejected() {
    let expectations = [
        I2cTransaction::write_read(BMP, vec![0xD0], vec![0x58]),
        I2cTransaction::write_read(BMP, vec![0x88], vec![0; 24]),
    ];
    let mut i2c = I2cMock::new(&expectations);
    let (_, error) = Bmp280::new(i2c.clone(), BMP).expect_err("bad calibration");
    assert_eq!(error, Bmp280Error::Calibration);
    i2c.done();
}

#[test]
fn bmp280_not_ready_when_conversion_never_ends_or_data_skipped() {
    let mut expectations = bmp_probe();
    expectations.push(I2cTransaction::write(BMP, vec![0xF4, 0b0010_1101]));
    expectations.extend((0..10).map(|_| I2cTransaction::write_read(BMP, vec![0xF3], vec![0x08])));
    expectations.push(I2cTransaction::write(BMP, vec![0xF4, 0b0010_1101]));
    expectations.push(I2cTransaction::write_read(BMP, vec![0xF3], vec![0x00]));
    expectations.push(I2cTransaction::write_read(BMP, vec![0xF7], vec![0x80, 0x00, 0x00, 0x80, 0x00, 0x00]));
    let mut i2c = I2cMock::new(&expectations);
    let mut sensor = Bmp280::new(i2c.clone(), BMP).map_err(|(_, error)| error).expect("probe");
    let mut delay = RecordingDelay::default();
    assert_eq!(sensor.measure(&mut delay), Err(Bmp280Error::NotReady));
    assert_eq!(sensor.measure(&mut delay), Err(Bmp280Error::NotReady));
    i2c.done();
}

#[test]
fn bmp280_nack_mid_measurement_is_absent() {
    let mut expectations = bmp_probe();
    expectations.push(
        I2cTransaction::write(BMP, vec![0xF4, 0b0010_1101])
            .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Data)),
    );
    let mut i2c = I2cMock::new(&expectations);
    let mut sensor = Bmp280::new(i2c.clone(), BMP).map_err(|(_, error)| error).expect("probe");
    let mut out = [Reading { sensor: "", value: 0.0, unit: "" }; READINGS_PER_SENSOR_MAX];
    assert_eq!(Sensor::measure(&mut sensor, &mut RecordingDelay::default(), &mut out), Err(SensorFault::Absent));
    i2c.done();
}

proptest::proptest! {
    /// Hostile calibration and ADC values never panic the compensation (wrapping maths).
    #[test]
    fn bmp280_compensation_never_panics(bytes in proptest::array::uniform24(proptest::num::u8::ANY), adc_t in 0i32..(1 << 20), adc_p in 0i32..(1 << 20)) {
        let calibration = Calibration::from_bytes(&bytes);
        let (_, t_fine) = calibration.compensate_temperature(adc_t);
        let _ = calibration.compensate_pressure(adc_p, t_fine);
    }
}
