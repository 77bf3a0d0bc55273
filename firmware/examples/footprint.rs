//! Sample firmware for the footprint figures: SHT3x and BMP280 on I2C, the sampler, the flash
//! ring log in the MCU's own flash and the serial link, wired together for an nRF52840.
//!
//! The peripheral drivers below are deliberately minimal register-level ones (TWI, UART, NVMC,
//! RTC of the nRF52840, polled, no interrupts) so the binary carries no HAL crate: they exist to
//! make the size figures honest (the code is reachable and not optimised away), and have not
//! been run on hardware. Built only with the `mcu` feature for a `thumbv7em-none-eabihf` target:
//!
//! ```text
//! cargo rustc -p tidesync-firmware --example footprint --features mcu --release \
//!     --target thumbv7em-none-eabihf -- -C link-arg=-T$PWD/firmware/examples/nrf52840.x
//! ```
#![no_std]
#![no_main]
// Memory-mapped registers, the reset vector and RAM initialisation cannot be written without
// `unsafe`; every use is a volatile access to a documented nRF52840 register or a linker symbol.
#![allow(unsafe_code)]

use core::ptr::{read_volatile, write_volatile};

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, NoAcknowledgeSource, Operation};
use embedded_storage::nor_flash::{NorFlash, NorFlashErrorKind, ReadNorFlash};
use tidesync_core::event::Millis;
use tidesync_firmware::bmp280::{self, Bmp280};
use tidesync_firmware::link::Link;
use tidesync_firmware::log::RingLog;
use tidesync_firmware::sampler::Sampler;
use tidesync_firmware::sht3x::{self, Sht3x};

/// Reads a 32-bit register.
fn reg_read(address: u32) -> u32 {
    // SAFETY: `address` is one of the nRF52840 peripheral registers named below.
    unsafe { read_volatile(address as *const u32) }
}

/// Writes a 32-bit register.
fn reg_write(address: u32, value: u32) {
    // SAFETY: as for `reg_read`.
    unsafe { write_volatile(address as *mut u32, value) }
}

const TWI0: u32 = 0x4000_3000;
const UART0: u32 = 0x4000_2000;
const NVMC: u32 = 0x4001_E000;
const RTC0: u32 = 0x4000_B000;

/// Legacy TWI master, polled.
struct Twi;

impl Twi {
    fn wait_event(&mut self, event: u32) -> Result<(), ErrorKind> {
        for _ in 0..100_000 {
            if reg_read(TWI0 + event) != 0 {
                reg_write(TWI0 + event, 0);
                return Ok(());
            }
            if reg_read(TWI0 + 0x124) != 0 {
                reg_write(TWI0 + 0x124, 0);
                let source = reg_read(TWI0 + 0x4C4);
                reg_write(TWI0 + 0x4C4, source);
                reg_write(TWI0 + 0x014, 1);
                return Err(match source {
                    0b010 => ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address),
                    0b100 => ErrorKind::NoAcknowledge(NoAcknowledgeSource::Data),
                    _ => ErrorKind::Overrun,
                });
            }
        }
        Err(ErrorKind::Bus)
    }
}

impl ErrorType for Twi {
    type Error = ErrorKind;
}

impl I2c for Twi {
    fn transaction(&mut self, address: u8, operations: &mut [Operation<'_>]) -> Result<(), Self::Error> {
        reg_write(TWI0 + 0x588, u32::from(address));
        for operation in operations.iter_mut() {
            match operation {
                Operation::Write(bytes) => {
                    reg_write(TWI0 + 0x008, 1);
                    for byte in bytes.iter() {
                        reg_write(TWI0 + 0x51C, u32::from(*byte));
                        self.wait_event(0x11C)?;
                    }
                }
                Operation::Read(buffer) => {
                    reg_write(TWI0, 1); // TASKS_STARTRX (offset 0)
                    for byte in buffer.iter_mut() {
                        self.wait_event(0x108)?;
                        *byte = reg_read(TWI0 + 0x518) as u8;
                        reg_write(TWI0 + 0x020, 1);
                    }
                }
            }
        }
        reg_write(TWI0 + 0x014, 1);
        self.wait_event(0x104)
    }
}

/// UART0, polled.
struct Uart;

impl embedded_io::ErrorType for Uart {
    type Error = embedded_io::ErrorKind;
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        for byte in buf {
            reg_write(UART0 + 0x51C, u32::from(*byte));
            while reg_read(UART0 + 0x11C) == 0 {}
            reg_write(UART0 + 0x11C, 0);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let Some(first) = buf.first_mut() else { return Ok(0) };
        while reg_read(UART0 + 0x108) == 0 {}
        reg_write(UART0 + 0x108, 0);
        *first = reg_read(UART0 + 0x518) as u8;
        Ok(1)
    }
}

impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        Ok(reg_read(UART0 + 0x108) != 0)
    }
}

/// The log's partition of the internal flash: 8 pages of 4 KiB at 0xF0000.
struct InternalFlash;
const LOG_BASE: u32 = 0x000F_0000;
const PAGE_BYTES: usize = 4096;
const LOG_PAGES: usize = 8;

impl InternalFlash {
    fn wait_ready() {
        while reg_read(NVMC + 0x400) == 0 {}
    }
}

impl embedded_storage::nor_flash::ErrorType for InternalFlash {
    type Error = NorFlashErrorKind;
}

impl ReadNorFlash for InternalFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        if offset as usize + bytes.len() > PAGE_BYTES * LOG_PAGES {
            return Err(NorFlashErrorKind::OutOfBounds);
        }
        for (idx, byte) in bytes.iter_mut().enumerate() {
            // SAFETY: inside the log's flash partition (checked above); flash is memory-mapped.
            *byte = unsafe { read_volatile((LOG_BASE + offset + idx as u32) as *const u8) };
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        PAGE_BYTES * LOG_PAGES
    }
}

impl NorFlash for InternalFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = PAGE_BYTES;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        reg_write(NVMC + 0x504, 2);
        let mut page = from;
        while page < to {
            reg_write(NVMC + 0x508, LOG_BASE + page);
            Self::wait_ready();
            page += PAGE_BYTES as u32;
        }
        reg_write(NVMC + 0x504, 0);
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        if offset % 4 != 0 || bytes.len() % 4 != 0 {
            return Err(NorFlashErrorKind::NotAligned);
        }
        reg_write(NVMC + 0x504, 1);
        for (idx, word) in bytes.chunks_exact(4).enumerate() {
            reg_write(LOG_BASE + offset + 4 * idx as u32, u32::from_le_bytes([word[0], word[1], word[2], word[3]]));
            Self::wait_ready();
        }
        reg_write(NVMC + 0x504, 0);
        Ok(())
    }
}

/// Milliseconds from RTC0 (32768 Hz, 24 bits; the wrap is handled by the caller's u64).
struct Ticks {
    last_counter: u32,
    total_ticks: u64,
}

impl Ticks {
    fn now_ms(&mut self) -> u64 {
        let counter = reg_read(RTC0 + 0x504) & 0x00FF_FFFF;
        self.total_ticks += u64::from(counter.wrapping_sub(self.last_counter) & 0x00FF_FFFF);
        self.last_counter = counter;
        self.total_ticks * 1000 / 32_768
    }
}

/// A busy-wait delay (64 MHz core, about 4 cycles per loop turn).
struct BusyDelay;

impl DelayNs for BusyDelay {
    fn delay_ns(&mut self, ns: u32) {
        let mut turns = ns / 62;
        while turns > 0 {
            // Volatile so the loop is not removed.
            turns = core::hint::black_box(turns) - 1;
        }
    }
}

fn app() -> ! {
    reg_write(TWI0 + 0x500, 5);
    reg_write(UART0 + 0x500, 4);
    reg_write(UART0 + 0x008, 1);
    reg_write(UART0, 1); // TASKS_STARTRX (offset 0)
    reg_write(RTC0, 1);
    let mut delay = BusyDelay;
    let mut ticks = Ticks { last_counter: 0, total_ticks: 0 };
    let mut uart = Uart;
    let mut log = match RingLog::<InternalFlash, LOG_PAGES>::open(InternalFlash) {
        Ok(log) => log,
        Err(_) => halt(),
    };
    let mut humidity = Sht3x::new(Twi, sht3x::ADDRESS_DEFAULT);
    let mut pressure = match Bmp280::new(Twi, bmp280::ADDRESS_DEFAULT) {
        Ok(sensor) => sensor,
        Err(_) => halt(),
    };
    let mut sampler = Sampler::<2>::new(log.last_hlc());
    if sampler.add(&mut humidity, 10_000, 0).is_err() || sampler.add(&mut pressure, 60_000, 0).is_err() {
        halt();
    }
    let mut link = Link::new(log.acked(), ticks.now_ms(), 32, 5_000);
    loop {
        let now_ms = ticks.now_ms();
        // No RTC calendar on this board: the tick count stands in for the wall clock.
        sampler.poll(now_ms, Millis(now_ms), &mut delay, |sample| {
            // A refusal is counted by the log; nothing else to do until the agent acks.
            let _ = log.append_reading(sample.to_record());
        });
        let _ = link.poll_rx(now_ms, &mut uart, &mut log);
        let _ = link.send_pending(now_ms, &mut log, &mut uart);
        delay.delay_ms(10);
    }
}

fn halt() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The reset handler: copies `.data`, zeroes `.bss`, runs the application.
#[no_mangle]
extern "C" fn reset() -> ! {
    extern "C" {
        static mut __sdata: u32;
        static mut __edata: u32;
        static __sidata: u32;
        static mut __sbss: u32;
        static mut __ebss: u32;
    }
    // SAFETY: the linker script defines these symbols around word-aligned RAM sections; nothing
    // else runs yet.
    unsafe {
        let mut target = &raw mut __sdata;
        let mut source = &raw const __sidata;
        while target < &raw mut __edata {
            write_volatile(target, read_volatile(source));
            target = target.add(1);
            source = source.add(1);
        }
        let mut target = &raw mut __sbss;
        while target < &raw mut __ebss {
            write_volatile(target, 0);
            target = target.add(1);
        }
    }
    app()
}

#[link_section = ".vector_table.reset_vector"]
#[no_mangle]
static RESET_VECTOR: extern "C" fn() -> ! = reset;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    halt()
}
