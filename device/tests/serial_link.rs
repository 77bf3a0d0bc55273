//! End to end through a real pseudo-terminal: the firmware's log and link (on a simulated flash)
//! on the master side, `serial::run_ingest` on the slave path, into a real device ledger.
//! Checks exactly-once across a lost ack and a restart of the ingest, and that noise on the line
//! costs nothing.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::openpty;
use tidesync_core::event::{DeviceId, Hlc, Millis, Payload, Seq};
use tidesync_core::record::ReadingRecord;
use tidesync_device::serial::{run_ingest, set_raw, IngestStats};
use tidesync_device::{Agent, DeviceStore, LedgerConfig};
use tidesync_firmware::link::Link;
use tidesync_firmware::log::RingLog;
use tidesync_firmware::sim_flash::SimFlash;

type Flash = SimFlash<8192, 1024, 4>;
type Log = RingLog<Flash, 8>;
const SOURCE: &str = "mcu-1";
/// The firmware resends from its watermark after this long without an ack.
const RESEND_AFTER_MS: u64 = 300;

/// The master end of the pty as the firmware's `embedded_io` serial port.
struct Port {
    master: File,
}

impl embedded_io::ErrorType for Port {
    type Error = embedded_io::ErrorKind;
}

fn kind(_error: std::io::Error) -> embedded_io::ErrorKind {
    embedded_io::ErrorKind::Other
}

impl embedded_io::Write for Port {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.master.write(buf).map_err(kind)
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        self.master.flush().map_err(kind)
    }
}

impl embedded_io::Read for Port {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        self.master.read(buf).map_err(kind)
    }
}

impl embedded_io::ReadReady for Port {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::ZERO).map_err(|_| embedded_io::ErrorKind::Other)?;
        Ok(ready > 0)
    }
}

/// The firmware: its flash log, its link and a millisecond clock.
struct Firmware {
    log: Log,
    link: Link,
    port: Port,
    start: Instant,
    readings: u64,
}

impl Firmware {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn sample(&mut self, count: u64) -> Result<()> {
        for _ in 0..count {
            self.readings += 1;
            let record = ReadingRecord {
                seq: Seq::ZERO,
                hlc: Hlc { wall_ms: 1_700_000_000_000 + self.readings, logical: 0 },
                event_time: Millis(1_700_000_000_000 + self.readings),
                sensor: "sht3x.temperature",
                value: self.readings as f64 / 4.0,
                unit: "Cel",
            };
            self.log.append_reading(record).context("append")?;
        }
        Ok(())
    }

    /// Sends and applies acks until the log's watermark reaches `target` (or the deadline).
    /// With `drop_acks`, received bytes are read and thrown away instead (acks lost on the line).
    fn pump_until(&mut self, target: u64, drop_acks: Option<Duration>) -> Result<()> {
        let deadline = Instant::now() + drop_acks.unwrap_or(Duration::from_secs(20));
        while Instant::now() < deadline {
            let now_ms = self.now_ms();
            self.link
                .send_pending(now_ms, &mut self.log, &mut self.port)
                .map_err(|error| anyhow::anyhow!("{error:?}"))?;
            if drop_acks.is_some() {
                let mut sink = [0u8; 256];
                while embedded_io::ReadReady::read_ready(&mut self.port)
                    .map_err(|error| anyhow::anyhow!("{error:?}"))?
                {
                    let _ = self.port.master.read(&mut sink)?;
                }
            } else {
                self.link
                    .poll_rx(now_ms, &mut self.port, &mut self.log)
                    .map_err(|error| anyhow::anyhow!("{error:?}"))?;
                if self.log.acked().0 >= target {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        ensure!(drop_acks.is_some(), "watermark stuck at {} (wanted {target})", self.log.acked());
        Ok(())
    }
}

fn slave_path(slave: &OwnedFd) -> Result<PathBuf> {
    nix::unistd::ttyname(slave.as_fd()).context("ttyname")
}

/// Runs `body` while an ingest runs on `path`; returns the ingest's stats.
fn with_ingest(agent: &Agent, path: &Path, body: impl FnOnce() -> Result<()>) -> Result<IngestStats> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let ingest = scope.spawn(|| run_ingest(agent, path, SOURCE, &stop));
        let outcome = body();
        stop.store(true, Ordering::Relaxed);
        let stats = ingest.join().map_err(|_| anyhow::anyhow!("ingest panicked"))?.context("ingest")?;
        outcome.map(|()| stats)
    })
}

fn readings_in_ledger(agent: &Agent) -> Result<Vec<f64>> {
    let events = agent.with_store(|store| store.events_from(Seq(1), 10_000))?.context("events")?;
    Ok(events
        .iter()
        .filter_map(|event| match &event.payload {
            Payload::Reading(reading) => Some(reading.value),
            _ => None,
        })
        .collect())
}

/// A fresh device ledger and agent, a pty whose slave end the ingest reads, and the firmware on
/// its master end.
struct Bench {
    _dir: tempfile::TempDir,
    agent: Agent,
    slave: OwnedFd,
    path: PathBuf,
    firmware: Firmware,
}

impl Bench {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store =
            DeviceStore::create(&dir.path().join("ledger.db"), DeviceId::new("dev-1")?, LedgerConfig::default())?;
        let agent = Agent::start(store)?;
        let pty = openpty(None, None)?;
        // Raw before any byte flows: a cooked line discipline would echo and translate frames.
        set_raw(&pty.slave)?;
        let path = slave_path(&pty.slave)?;
        let log = Log::open(Flash::new()).context("open log")?;
        let link = Link::new(log.acked(), 0, 64, RESEND_AFTER_MS);
        let firmware =
            Firmware { log, link, port: Port { master: File::from(pty.master) }, start: Instant::now(), readings: 0 };
        Ok(Self { _dir: dir, agent, slave: pty.slave, path, firmware })
    }
}

#[test]
fn serial_ingest_is_exactly_once_across_lost_acks_and_restarts() -> Result<()> {
    let Bench { _dir, agent, slave, path, mut firmware } = Bench::new()?;

    // 1. Twenty readings, with line noise first: all recorded and acknowledged.
    firmware.sample(20)?;
    let first = with_ingest(&agent, &path, || {
        firmware.port.master.write_all(&[0x13, 0x37, 0xFF, 0x00])?;
        firmware.pump_until(20, None)
    })?;
    assert_eq!(first.records_stored, 20);
    assert!(first.frames_rejected >= 1, "the noise was a rejected frame: {first:?}");
    assert_eq!(agent.source_high(SOURCE)?, 20);

    // 2. Ten more; the ingest stores them but every ack is lost, then the ingest restarts.
    firmware.sample(10)?;
    let second = with_ingest(&agent, &path, || firmware.pump_until(30, Some(Duration::from_millis(1500))))?;
    assert_eq!(second.records_stored, 10);
    assert!(second.records_duplicate >= 10, "the firmware resent without acks: {second:?}");
    assert_eq!(firmware.log.acked(), Seq(20), "no ack reached the firmware");
    assert_eq!(agent.source_high(SOURCE)?, 30);

    // 3. A fresh ingest: whether the firmware resends 21..30 first (acknowledged, not stored
    // again) or its new records 31..35 arrive first (their ack covers 21..30 too) depends on its
    // resend timer; either way only the five new readings are stored.
    firmware.sample(5)?;
    let third = with_ingest(&agent, &path, || firmware.pump_until(35, None))?;
    assert_eq!(third.records_stored, 5, "{third:?}");
    assert_eq!(third.records_received, third.records_stored + third.records_duplicate + third.records_ahead);
    assert_eq!(firmware.log.acked(), Seq(35));

    // Exactly once, in order.
    let values = readings_in_ledger(&agent)?;
    let expected: Vec<f64> = (1..=35).map(|idx| idx as f64 / 4.0).collect();
    assert_eq!(values, expected);

    // 4. The firmware reboots: its ack watermark survived on flash, so nothing is resent.
    let log = Log::open(firmware.log.into_flash()).context("reopen log")?;
    assert_eq!(log.acked(), Seq(35));
    agent.close()?;
    drop(slave);
    Ok(())
}

#[test]
fn an_intact_record_the_ledger_refuses_is_kept_as_a_log_line_and_the_port_goes_on() -> Result<()> {
    let Bench { _dir, agent, slave, path, mut firmware } = Bench::new()?;
    // Three good readings, a NaN (a sensor fault: valid CRC, refused by the ledger), two more.
    firmware.sample(3)?;
    let nan = ReadingRecord {
        seq: Seq::ZERO,
        hlc: Hlc { wall_ms: 1_700_000_000_004, logical: 0 },
        event_time: Millis(1_700_000_000_004),
        sensor: "sht3x.temperature",
        value: f64::NAN,
        unit: "Cel",
    };
    firmware.log.append_reading(nan).context("append")?;
    firmware.readings += 1;
    firmware.sample(2)?;
    let stats = with_ingest(&agent, &path, || firmware.pump_until(6, None))?;
    assert_eq!(stats.records_quarantined, 1, "{stats:?}");
    assert_eq!(stats.records_stored, 6, "{stats:?}");
    assert_eq!(firmware.log.acked(), Seq(6), "acknowledged past the refused record");
    assert_eq!(agent.source_high(SOURCE)?, 6);
    let events = agent.with_store(|store| store.events_from(Seq(1), 100))?.context("events")?;
    assert_eq!(events.len(), 6, "one ledger event per firmware record");
    let Payload::Log(line) = &events[3].payload else { panic!("seq 4 is a log line: {:?}", events[3].payload) };
    assert!(line.message.starts_with("firmware record 4 refused"), "{}", line.message);
    assert!(line.message.contains(&format!("{:#018x}", f64::NAN.to_bits())), "the value's bits: {}", line.message);
    assert!(line.message.contains("\"sht3x.temperature\""), "{}", line.message);
    assert_eq!(events[3].event_time, Millis(1_700_000_000_004));
    assert_eq!(readings_in_ledger(&agent)?, [0.25, 0.5, 0.75, 1.25, 1.5]);
    agent.close()?;
    drop(slave);
    Ok(())
}
