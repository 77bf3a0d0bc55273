//! `World`: the fleet on a virtual clock. Devices, gateways and one cloud are core's sans-IO
//! sessions over [`SimDisk`]s; one event queue ordered by (time, sequence) drives them; one
//! `ChaCha8Rng` seeded from the run's seed draws every fault and every random choice.
//!
//! A run has three phases: the workload (devices record readings, shadows are edited on both
//! ends, faults happen), the heal (faults stop, every node comes back, links are clean) and the
//! checks (see [`crate::check`]), which run once the fleet is quiescent or the heal bound passes.
//!
//! The host loops here are what the device agent, the gateway and the cloud do around core:
//! deliver frames, call `handle_frame`/`handle_timeout`, act on `poll_event` (store and sync,
//! then `handle_durable`; mark commits; relay commits and shadow changes), send `poll_transmit`.
//! Invariant: nothing here reads a real clock or an unseeded random source.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use tidesync_core::event::{DeviceId, EventId, GatewayId, Millis, Payload, SensorReading, Seq, ShadowReported};
use tidesync_core::ledger::{Ledger, MemLedger};
use tidesync_core::shadow::{Section, ShadowLimits};
use tidesync_core::sync::{Ingest, MemStore, SessionConfig, SessionEvent, ShadowKeeping, Uplink};
use tidesync_core::value::Value;
use tidesync_core::wire::{BackpressureReason, Frame, GoodbyeReason};

use crate::dice;
use crate::digest::TraceDigest;
use crate::disk::{SimDisk, Synced};
use crate::options::{DrawnFaults, SimOptions};
use crate::projection::Projection;

pub mod adversary;
mod ahead;

/// Virtual time at the start of every run: 2026-01-01T00:00:00Z.
pub const START_WALL: Millis = Millis(1_767_225_600_000);
/// A device whose wall clock is further than this from its gateway's adopts the gateway's time
/// (an RTC reset to the epoch, or a wild jump).
const CLOCK_ADOPT_MS: u64 = 3_600_000;
/// First reconnect delay; it doubles up to [`RECONNECT_MS_MAX`].
const RECONNECT_MS_MIN: u64 = 1_000;
/// Longest reconnect delay.
const RECONNECT_MS_MAX: u64 = 60_000;
/// A client closes a connection whose handshake has not completed after this long (the QUIC
/// handshake timeout of a real host).
const HANDSHAKE_MS: u64 = 20_000;
/// Sync health: a connection that sends more sync frames of one shadow than this within
/// [`SHADOW_SPIN_WINDOW_MS`] is spinning (see the report) and is replaced by a fresh one. Counted
/// per shadow, not per connection: a gateway's connection carries the shadows of all its devices,
/// and a fresh one legitimately sends a few frames for each (counted per connection, 50 devices
/// per gateway tripped the watchdog on every new connection, which replaced it again: a livelock).
const SHADOW_SPIN_FRAMES_MAX: u32 = 100;
/// The window of [`SHADOW_SPIN_FRAMES_MAX`].
const SHADOW_SPIN_WINDOW_MS: u64 = 60_000;
/// Oracle entry for a seq a device skipped; matches no event.
const SEQ_SKIPPED_HASH: u64 = 0;
/// How often the heal phase looks for quiescence.
const CONVERGE_POLL_MS: u64 = 10_000;
/// With the `ack_before_fsync` bug, how often gateways and the cloud sync.
const LAZY_SYNC_MS: u64 = 10_000;
/// Points in the backlog plot.
const PLOT_POINTS: u64 = 300;
/// Sensors of every device, read in turn.
const SENSORS: [(&str, &str); 3] = [("temp", "Cel"), ("humidity", "%"), ("pressure", "hPa")];
/// Shadow keys the fleet edits.
const SHADOW_KEYS: [&str; 4] = ["fw", "mode", "rate_s", "threshold"];

/// The session configuration of the simulated fleet: production defaults, with slower
/// keep-alives so idle links do not dominate a week of simulated time. (Slower still would cut
/// the keep-alives lingering devices send between batches, but sessions that stay up longer
/// after their peer went silent make the cloned-device gap in SECURITY.md show up more often.)
pub fn session_config() -> SessionConfig {
    SessionConfig {
        batch_events_max: 256,
        keepalive_ms: 60_000,
        idle_timeout_ms: 240_000,
        stall_ms: 600_000,
        ..SessionConfig::default()
    }
}

/// One end of a connection, as an address for frames and timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    /// A device's uplink.
    Device(usize),
    /// A gateway's ingest session with a device: (gateway, device).
    GatewayIngest(usize, usize),
    /// A gateway's uplink to the cloud.
    GatewayUplink(usize),
    /// The cloud's ingest session with a gateway.
    CloudIngest(usize),
}

impl Endpoint {
    fn code(self) -> u64 {
        match self {
            Endpoint::Device(device) => 1 << 60 | device as u64,
            Endpoint::GatewayIngest(gateway, device) => 2 << 60 | (gateway as u64) << 32 | device as u64,
            Endpoint::GatewayUplink(gateway) => 3 << 60 | gateway as u64,
            Endpoint::CloudIngest(gateway) => 4 << 60 | gateway as u64,
        }
    }
}

/// A link whose faults are modelled: a device's radio link, or a gateway's backhaul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Device(usize),
    Gateway(usize),
}

/// Direction on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Towards the cloud.
    Up,
    /// Towards the device.
    Down,
}

/// Fault state of one link. Blocks count overlapping partitions.
#[derive(Clone, Copy, Debug, Default)]
struct LinkState {
    blocked_up: u32,
    blocked_down: u32,
    stall_until: Millis,
}

impl LinkState {
    fn blocked(&self, direction: Direction) -> bool {
        match direction {
            Direction::Up => self.blocked_up > 0,
            Direction::Down => self.blocked_down > 0,
        }
    }
}

/// A fault, scheduled at a time.
#[derive(Clone, Copy, Debug)]
enum Fault {
    DeviceCrash(usize),
    DeviceRestart(usize),
    GatewayCrash { gateway: usize, wipe: bool },
    GatewayRestart(usize),
    CloudCrash,
    CloudRestart,
    Block { link: Link, up: bool, down: bool, on: bool },
    Stall { link: Link, until: Millis },
    Roam { device: usize, gateway: usize },
    ClockJump { device: usize, delta_ms: i64 },
    RtcReset(usize),
}

impl Fault {
    fn code(&self) -> u64 {
        match self {
            Fault::DeviceCrash(_) => 1,
            Fault::DeviceRestart(_) => 2,
            Fault::GatewayCrash { .. } => 3,
            Fault::GatewayRestart(_) => 4,
            Fault::CloudCrash => 5,
            Fault::CloudRestart => 6,
            Fault::Block { .. } => 7,
            Fault::Stall { .. } => 8,
            Fault::Roam { .. } => 9,
            Fault::ClockJump { .. } => 10,
            Fault::RtcReset(_) => 11,
        }
    }
}

#[derive(Debug)]
enum Action {
    Deliver { to: Endpoint, conn: u64, bytes: Vec<u8> },
    Timer { at: Endpoint, conn: u64 },
    HandshakeDeadline { at: Endpoint, conn: u64 },
    Reading(usize),
    DeviceCommit(usize),
    ConnectDevice(usize),
    ConnectGateway(usize),
    Fault(Fault),
    EditReported(usize),
    EditDesired(usize),
    LazySync,
    Heal,
    Converged,
    PlotPoint,
}

/// An entry of the event queue: when, in which order, and where its action waits in
/// [`EventQueue::actions`]. Kept small (24 bytes) because the heap moves entries on every push
/// and pop; the actions (a delivery carries its frame's bytes) stay put.
#[derive(Debug, Clone, Copy)]
struct Scheduled {
    at: Millis,
    seq: u64,
    slot: u32,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Reversed: `BinaryHeap` pops the largest, the queue wants the earliest (then the first queued).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The one event queue, ordered by (time, sequence): a heap of small entries and a slab of the
/// actions they name, whose free slots are reused.
#[derive(Debug, Default)]
struct EventQueue {
    heap: BinaryHeap<Scheduled>,
    actions: Vec<Option<Action>>,
    free: Vec<u32>,
    seq: u64,
}

impl EventQueue {
    fn push(&mut self, at: Millis, action: Action) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.actions[slot as usize] = Some(action);
                slot
            }
            None => {
                self.actions.push(Some(action));
                // More than 4 billion actions pending at once would not fit in memory anyway.
                u32::try_from(self.actions.len() - 1).unwrap_or_else(|_| unreachable!("queue slots fit in u32"))
            }
        };
        self.heap.push(Scheduled { at, seq: self.seq, slot });
    }

    fn pop(&mut self) -> Option<(Millis, Action)> {
        let next = self.heap.pop()?;
        self.free.push(next.slot);
        let action = self.actions[next.slot as usize].take();
        debug_assert!(action.is_some(), "a queued slot holds its action");
        action.map(|action| (next.at, action))
    }
}

/// Endpoints to pump, in order, each at most once however often it was poked.
#[derive(Debug, Default)]
struct WorkQueue {
    order: VecDeque<Endpoint>,
    queued: BTreeSet<Endpoint>,
}

impl WorkQueue {
    fn push(&mut self, endpoint: Endpoint) {
        if self.queued.insert(endpoint) {
            self.order.push_back(endpoint);
        }
    }

    fn pop(&mut self) -> Option<Endpoint> {
        let endpoint = self.order.pop_front()?;
        self.queued.remove(&endpoint);
        Some(endpoint)
    }
}

/// A session of either end with its connection id and armed timer.
#[derive(Debug)]
struct Conn<S> {
    id: u64,
    session: S,
    timer_at: Option<Millis>,
}

#[derive(Debug)]
struct DeviceConn {
    gateway: usize,
    conn: Conn<Uplink>,
}

/// A simulated device: ledger and shadow on a [`SimDisk`], an uplink to its current gateway.
#[derive(Debug)]
pub(crate) struct Device {
    pub(crate) id: DeviceId,
    pub(crate) disk: SimDisk,
    up: bool,
    home: usize,
    session: Option<DeviceConn>,
    link: LinkState,
    clock_offset_ms: i64,
    rtc_reset_at: Option<Millis>,
    storage_events_max: Option<usize>,
    backoff_ms: u64,
    connect_pending: bool,
    n_readings: u64,
}

impl Device {
    /// The device's wall clock: skewed, possibly jumped or reset to the epoch.
    fn wall(&self, now: Millis) -> Millis {
        match self.rtc_reset_at {
            Some(reset_at) => Millis(now.since(reset_at)),
            None => Millis(now.0.saturating_add_signed(self.clock_offset_ms)),
        }
    }
}

/// A simulated gateway: a spool on a [`SimDisk`], ingest sessions with devices, an uplink.
#[derive(Debug)]
pub(crate) struct Gateway {
    pub(crate) id: GatewayId,
    pub(crate) disk: SimDisk,
    up: bool,
    ingest: BTreeMap<usize, Conn<Ingest>>,
    uplink: Option<Conn<Uplink>>,
    link: LinkState,
    pending_acks: Vec<(Endpoint, u64, DeviceId, Seq)>,
    backoff_ms: u64,
    connect_pending: bool,
}

/// The simulated cloud: the event store (a [`SimDisk`] plus the log of global positions), its
/// projection, and ingest sessions with gateways.
#[derive(Debug)]
pub(crate) struct Cloud {
    pub(crate) disk: SimDisk,
    up: bool,
    ingest: BTreeMap<usize, Conn<Ingest>>,
    pending_acks: Vec<(Endpoint, u64, DeviceId, Seq)>,
    needs_sync: bool,
    /// Event ids by global position, durable.
    pub(crate) log: Vec<EventId>,
    /// Ids appended since the last sync; a crash loses them with the events.
    log_unsynced: Vec<EventId>,
    /// Folded as events become durable (a subscriber at the log's head).
    pub(crate) projection: Projection,
}

/// Counters of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Readings and shadow reports recorded (including ones later lost in a crash).
    pub n_recorded: u64,
    /// Frames handed to the network.
    pub n_frames_sent: u64,
    /// Bytes handed to the network.
    pub n_bytes_sent: u64,
    /// Frames delivered to a live session.
    pub n_frames_delivered: u64,
    /// Frames lost (loss, partitions) or arriving for a connection that is gone.
    pub n_frames_lost: u64,
    /// Extra copies delivered by duplication.
    pub n_frames_duplicated: u64,
    /// Sessions that completed a handshake (sync rounds).
    pub n_sessions: u64,
    /// Frames a session refused (the session closed).
    pub n_session_errors: u64,
    /// Stall reports from uplinks.
    pub n_stalls_reported: u64,
    /// Resend-loop reports from uplinks.
    pub n_resend_loops: u64,
    /// Backpressure received.
    pub n_throttled: u64,
    /// Events dropped under storage pressure.
    pub n_dropped: u64,
    /// Syncs (fsyncs) over all nodes.
    pub n_syncs: u64,
    /// Faults injected.
    pub n_faults: u64,
    /// Actions processed.
    pub n_actions: u64,
    /// Shadow edits (device reported and cloud desired).
    pub n_shadow_edits: u64,
    /// Connections a client gave up on because the handshake did not complete.
    pub n_handshake_timeouts: u64,
    /// Events a cloud session handed over that the store already held (deduped by the host).
    pub n_duplicates_at_cloud: u64,
    /// Connections replaced because their shadow sync spun.
    pub n_shadow_spins: u64,
    /// Frames sent, by frame type.
    pub n_frames_by_type: BTreeMap<&'static str, u64>,
}

/// One point of the backlog plot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlotPoint {
    /// Simulated time since the start.
    pub at_ms: u64,
    /// Events on devices not yet committed by the cloud.
    pub backlog_events: u64,
    /// Devices whose shadow differs between device and cloud.
    pub shadows_diverged: u64,
}

/// The fleet and its clock. Build with [`World::new`], drive with [`World::run`].
#[derive(Debug)]
pub struct World {
    pub(crate) options: SimOptions,
    drawn: DrawnFaults,
    rng: ChaCha8Rng,
    config: SessionConfig,
    now: Millis,
    heal_at: Millis,
    healed: bool,
    queue: EventQueue,
    next_conn: u64,
    pub(crate) devices: Vec<Device>,
    pub(crate) gateways: Vec<Gateway>,
    pub(crate) cloud: Cloud,
    device_index: BTreeMap<DeviceId, usize>,
    work: WorkQueue,
    digest: TraceDigest,
    stats: Stats,
    /// Per device, a hash of every event it made durable, by seq - 1: what its ledger acknowledged.
    pub(crate) oracle: Vec<Vec<u64>>,
    /// Per device, the seq ranges it durably dropped under storage pressure: the ground truth of
    /// what may be missing in the cloud.
    pub(crate) drops: Vec<Vec<(Seq, Seq)>>,
    /// Things that must never happen (a store refused a batch the session handed over, a frame
    /// we encoded did not decode); each fails the run.
    pub(crate) anomalies: Vec<String>,
    plot: Vec<PlotPoint>,
    converged_at: Option<Millis>,
    finished: bool,
    /// Per connection and shadow: start of the current window and sync frames sent in it.
    shadow_rate: BTreeMap<(u64, DeviceId), (Millis, u32)>,
    /// Connections found spinning, as (client endpoint, connection).
    spinning: Vec<(Endpoint, u64)>,
    /// Device keys, adversaries and the cloud's security events (see [`adversary`]).
    pub(crate) security: adversary::Security,
}

fn device_store(device: DeviceId) -> MemStore {
    MemStore::new(
        &format!("device:{device}"),
        MemLedger::pruning(),
        ShadowKeeping::Only(device),
        ShadowLimits::default(),
    )
}

fn gateway_store(gateway: GatewayId) -> MemStore {
    MemStore::new(&format!("gateway:{gateway}"), MemLedger::pruning(), ShadowKeeping::All, ShadowLimits::default())
}

fn cloud_store() -> MemStore {
    MemStore::new("cloud", MemLedger::new(), ShadowKeeping::All, ShadowLimits::default())
}

impl World {
    /// Builds the fleet of `options` and draws its faults from the seed.
    pub fn new(options: SimOptions) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
        let drawn = DrawnFaults::draw(&options, &mut rng);
        let n_gateways = options.n_gateways.max(1);
        let gateways: Vec<Gateway> = (0..n_gateways)
            .map(|index| {
                let id = GatewayId::new(&format!("g{index:03}")).unwrap_or_else(|_| unreachable!("valid name"));
                Gateway {
                    id,
                    disk: SimDisk::new(gateway_store(id)),
                    up: true,
                    ingest: BTreeMap::new(),
                    uplink: None,
                    link: LinkState::default(),
                    pending_acks: Vec::new(),
                    backoff_ms: RECONNECT_MS_MIN,
                    connect_pending: false,
                }
            })
            .collect();
        let mut devices = Vec::with_capacity(options.n_devices);
        let mut device_index = BTreeMap::new();
        for index in 0..options.n_devices {
            let id = DeviceId::new(&format!("d{index:05}")).unwrap_or_else(|_| unreachable!("valid name"));
            let skew_ms = drawn.skew_ms_max as i64;
            let clock_offset_ms = dice::range(&mut rng, 0, 2 * skew_ms as u64) as i64 - skew_ms;
            device_index.insert(id, index);
            devices.push(Device {
                id,
                disk: SimDisk::new(device_store(id)),
                up: true,
                home: index % n_gateways,
                session: None,
                link: LinkState::default(),
                clock_offset_ms,
                rtc_reset_at: None,
                storage_events_max: None,
                backoff_ms: RECONNECT_MS_MIN,
                connect_pending: false,
                n_readings: 0,
            });
        }
        let heal_at = START_WALL.plus_ms(options.duration_ms);
        let mut world = Self {
            oracle: vec![Vec::new(); options.n_devices],
            drops: vec![Vec::new(); options.n_devices],
            options,
            drawn,
            rng,
            config: session_config(),
            now: START_WALL,
            heal_at,
            healed: false,
            queue: EventQueue::default(),
            next_conn: 1,
            devices,
            gateways,
            cloud: Cloud {
                disk: SimDisk::new(cloud_store()),
                up: true,
                ingest: BTreeMap::new(),
                pending_acks: Vec::new(),
                needs_sync: false,
                log: Vec::new(),
                log_unsynced: Vec::new(),
                projection: Projection::new(),
            },
            device_index,
            work: WorkQueue::default(),
            digest: TraceDigest::new(),
            stats: Stats::default(),
            anomalies: Vec::new(),
            plot: Vec::new(),
            converged_at: None,
            finished: false,
            shadow_rate: BTreeMap::new(),
            spinning: Vec::new(),
            security: adversary::Security::default(),
        };
        world.schedule_start();
        world.arm_security();
        world
    }

    /// The drawn fault parameters.
    pub fn drawn(&self) -> &DrawnFaults {
        &self.drawn
    }

    /// The options of the run.
    pub fn options(&self) -> &SimOptions {
        &self.options
    }

    /// Signatures the cloud found verified ahead of time, on another core, instead of verifying
    /// them itself (see [`crate::options::SimOptions::verify_ahead`]). Depends on thread timing,
    /// so it is reported beside the wall time, never in the outcome.
    pub fn n_signatures_verified_ahead(&self) -> u64 {
        self.security.n_verified_ahead()
    }

    /// The trace digest so far.
    pub fn digest(&self) -> u64 {
        self.digest.value()
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The backlog plot so far.
    pub fn plot(&self) -> &[PlotPoint] {
        &self.plot
    }

    /// Simulated time since the start.
    pub fn elapsed_ms(&self) -> u64 {
        self.now.since(START_WALL)
    }

    /// When the heal phase starts, since the start.
    pub fn heal_start_ms(&self) -> u64 {
        self.heal_at.since(START_WALL)
    }

    /// How long the heal took until the fleet was quiescent, if it got there.
    pub fn converge_ms(&self) -> Option<u64> {
        self.converged_at.map(|at| at.since(self.heal_at))
    }

    fn schedule(&mut self, at: Millis, action: Action) {
        self.queue.push(at, action);
    }

    fn fault_time(&mut self) -> Millis {
        START_WALL.plus_ms(dice::range(&mut self.rng, 0, self.options.duration_ms.saturating_sub(1)))
    }

    fn window_ms(&mut self, low_ms: u64, high_ms: u64) -> u64 {
        dice::range(&mut self.rng, low_ms, high_ms.max(low_ms))
    }

    /// Schedules the workload, every fault, the heal and the plot.
    fn schedule_start(&mut self) {
        let duration_ms = self.options.duration_ms;
        let n_devices = self.devices.len();
        let n_gateways = self.gateways.len();
        let interval_ms = self.options.reading_interval_ms.max(1);
        for device in 0..n_devices {
            let first = dice::range(&mut self.rng, 0, interval_ms - 1);
            self.schedule(START_WALL.plus_ms(first), Action::Reading(device));
            let commit = dice::range(&mut self.rng, 0, self.drawn.device_commit_ms);
            self.schedule(START_WALL.plus_ms(commit), Action::DeviceCommit(device));
            self.schedule(START_WALL, Action::ConnectDevice(device));
        }
        for gateway in 0..n_gateways {
            self.schedule(START_WALL, Action::ConnectGateway(gateway));
        }
        // Shadow edits: about two per device and day on each side.
        let days = duration_ms.div_ceil(86_400_000).max(1) as usize;
        if n_devices > 0 {
            for _ in 0..2 * days * n_devices {
                let (at, device) = (self.fault_time(), dice::index(&mut self.rng, n_devices));
                self.schedule(at, Action::EditReported(device));
                let (at, device) = (self.fault_time(), dice::index(&mut self.rng, n_devices));
                self.schedule(at, Action::EditDesired(device));
            }
        }
        self.schedule_faults();
        if self.options.bugs.ack_before_fsync {
            self.schedule(START_WALL.plus_ms(LAZY_SYNC_MS), Action::LazySync);
        }
        self.schedule(self.heal_at, Action::Heal);
        self.schedule(START_WALL, Action::PlotPoint);
    }

    fn schedule_faults(&mut self) {
        let drawn = self.drawn.clone();
        let duration_ms = self.options.duration_ms.max(1);
        let n_devices = self.devices.len();
        let n_gateways = self.gateways.len();
        for _ in 0..drawn.n_stalls {
            let link = self.pick_link();
            let at = self.fault_time();
            let until = at.plus_ms(self.window_ms(10_000, (duration_ms / 50).min(600_000)));
            self.schedule(at, Action::Fault(Fault::Stall { link, until }));
        }
        for _ in 0..drawn.n_partitions {
            let link = self.pick_link();
            let (up, down) = match dice::range(&mut self.rng, 0, 3) {
                0 => (true, false),
                1 => (false, true),
                _ => (true, true),
            };
            let at = self.fault_time();
            let end = at.plus_ms(self.window_ms(10_000, duration_ms / 10));
            self.schedule(at, Action::Fault(Fault::Block { link, up, down, on: true }));
            self.schedule(end, Action::Fault(Fault::Block { link, up, down, on: false }));
        }
        if n_devices > 0 {
            for _ in 0..drawn.n_device_crashes {
                let device = dice::index(&mut self.rng, n_devices);
                let at = self.fault_time();
                let end = at.plus_ms(self.window_ms(10_000, (duration_ms / 10).min(1_800_000)));
                self.schedule(at, Action::Fault(Fault::DeviceCrash(device)));
                self.schedule(end, Action::Fault(Fault::DeviceRestart(device)));
            }
            for _ in 0..drawn.n_clock_jumps {
                let device = dice::index(&mut self.rng, n_devices);
                let at = self.fault_time();
                if dice::chance(&mut self.rng, 50) {
                    self.schedule(at, Action::Fault(Fault::RtcReset(device)));
                } else {
                    let magnitude_ms = self.window_ms(60_000, 2 * 3_600_000) as i64;
                    let delta_ms = if dice::chance(&mut self.rng, 50) { magnitude_ms } else { -magnitude_ms };
                    self.schedule(at, Action::Fault(Fault::ClockJump { device, delta_ms }));
                }
            }
            for _ in 0..drawn.n_offline {
                let device = dice::index(&mut self.rng, n_devices);
                let at = self.fault_time();
                let end = at.plus_ms(self.window_ms(duration_ms / 10, drawn.offline_ms_max));
                let link = Link::Device(device);
                self.schedule(at, Action::Fault(Fault::Block { link, up: true, down: true, on: true }));
                self.schedule(end, Action::Fault(Fault::Block { link, up: true, down: true, on: false }));
            }
            if n_gateways > 1 {
                for _ in 0..drawn.n_roams {
                    let device = dice::index(&mut self.rng, n_devices);
                    let gateway = dice::index(&mut self.rng, n_gateways);
                    let at = self.fault_time();
                    self.schedule(at, Action::Fault(Fault::Roam { device, gateway }));
                }
            }
            for _ in 0..drawn.n_small_storage {
                let device = dice::index(&mut self.rng, n_devices);
                self.devices[device].storage_events_max = Some(drawn.storage_events_max);
            }
        }
        for _ in 0..drawn.n_gateway_crashes {
            let gateway = dice::index(&mut self.rng, n_gateways);
            let wipe = dice::chance(&mut self.rng, drawn.wipe_percent);
            let at = self.fault_time();
            let end = at.plus_ms(self.window_ms(10_000, (duration_ms / 10).min(3_600_000)));
            self.schedule(at, Action::Fault(Fault::GatewayCrash { gateway, wipe }));
            self.schedule(end, Action::Fault(Fault::GatewayRestart(gateway)));
        }
        for _ in 0..drawn.n_cloud_outages {
            let at = self.fault_time();
            let end = at.plus_ms(self.window_ms(10_000, (duration_ms / 20).min(3_600_000)));
            self.schedule(at, Action::Fault(Fault::CloudCrash));
            self.schedule(end, Action::Fault(Fault::CloudRestart));
        }
    }

    fn pick_link(&mut self) -> Link {
        if !self.devices.is_empty() && dice::chance(&mut self.rng, 30) {
            Link::Device(dice::index(&mut self.rng, self.devices.len()))
        } else {
            Link::Gateway(dice::index(&mut self.rng, self.gateways.len()))
        }
    }

    /// Runs until the fleet is quiescent after the heal or the heal bound passes. `progress` is
    /// called now and then with (simulated ms so far, simulated ms expected at most).
    pub fn run(&mut self, mut progress: impl FnMut(u64, u64)) {
        let total_ms = self.options.duration_ms + self.options.heal_ms_max;
        while !self.finished {
            let Some((at, action)) = self.queue.pop() else {
                break;
            };
            debug_assert!(at >= self.now, "time runs forward");
            self.now = at;
            self.stats.n_actions += 1;
            if self.stats.n_actions % 16_384 == 0 {
                progress(self.elapsed_ms(), total_ms);
            }
            self.act(action);
            self.settle();
        }
        progress(self.elapsed_ms(), total_ms);
        self.stats.n_syncs = self.devices.iter().map(|device| device.disk.n_syncs()).sum::<u64>()
            + self.gateways.iter().map(|gateway| gateway.disk.n_syncs()).sum::<u64>()
            + self.cloud.disk.n_syncs();
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Deliver { to, conn, bytes } => self.deliver(to, conn, &bytes),
            Action::Timer { at, conn } => self.fire_timer(at, conn),
            Action::HandshakeDeadline { at, conn } => self.handshake_deadline(at, conn),
            Action::Reading(device) => self.reading(device),
            Action::DeviceCommit(device) => {
                if !self.healed {
                    let next = self.now.plus_ms(self.drawn.device_commit_ms.max(1));
                    self.schedule(next, Action::DeviceCommit(device));
                }
                if self.devices[device].up {
                    self.sync_device(device);
                }
            }
            Action::ConnectDevice(device) => {
                self.devices[device].connect_pending = false;
                self.connect_device(device);
            }
            Action::ConnectGateway(gateway) => {
                self.gateways[gateway].connect_pending = false;
                self.connect_gateway(gateway);
            }
            Action::Fault(fault) => {
                if !self.healed {
                    self.stats.n_faults += 1;
                    self.digest.u64(fault.code());
                    tracing::debug!(?fault, at_ms = self.elapsed_ms(), "fault");
                    self.inject(fault);
                }
            }
            Action::EditReported(device) => self.edit_reported(device),
            Action::EditDesired(device) => self.edit_desired(device),
            Action::LazySync => {
                for gateway in 0..self.gateways.len() {
                    if self.gateways[gateway].up {
                        self.gateways[gateway].disk.sync();
                    }
                }
                if self.cloud.up {
                    self.sync_cloud();
                }
                self.schedule(self.now.plus_ms(LAZY_SYNC_MS), Action::LazySync);
            }
            Action::Heal => self.heal(),
            Action::Converged => {
                if self.is_quiescent() {
                    self.converged_at = Some(self.now);
                    self.finished = true;
                    self.plot_point();
                    tracing::info!(converge_ms = self.converge_ms(), "fleet converged");
                } else if self.now.since(self.heal_at) >= self.options.heal_ms_max {
                    self.finished = true;
                    self.plot_point();
                    tracing::warn!("fleet did not converge within the heal bound");
                } else {
                    self.schedule(self.now.plus_ms(CONVERGE_POLL_MS), Action::Converged);
                }
            }
            Action::PlotPoint => {
                self.plot_point();
                let step_ms = (self.options.duration_ms / PLOT_POINTS).max(60_000);
                self.schedule(self.now.plus_ms(step_ms), Action::PlotPoint);
            }
        }
    }

    // ----- the network -----

    fn link_of(&self, from: Endpoint) -> (Link, Direction) {
        match from {
            Endpoint::Device(device) => (Link::Device(device), Direction::Up),
            Endpoint::GatewayIngest(_, device) => (Link::Device(device), Direction::Down),
            Endpoint::GatewayUplink(gateway) => (Link::Gateway(gateway), Direction::Up),
            Endpoint::CloudIngest(gateway) => (Link::Gateway(gateway), Direction::Down),
        }
    }

    fn link_state(&mut self, link: Link) -> &mut LinkState {
        match link {
            Link::Device(device) => &mut self.devices[device].link,
            Link::Gateway(gateway) => &mut self.gateways[gateway].link,
        }
    }

    /// Puts a frame on the network: maybe lost, maybe twice, with latency and jitter, held
    /// while the link stalls.
    fn send(&mut self, from: Endpoint, to: Endpoint, conn: u64, frame: &Frame) {
        let mut bytes = frame.to_bytes();
        self.stats.n_frames_sent += 1;
        *self.stats.n_frames_by_type.entry(frame.name()).or_default() += 1;
        self.stats.n_bytes_sent += bytes.len() as u64;
        self.digest.u64(self.now.0);
        self.digest.u64(to.code());
        self.digest.bytes(&bytes);
        if let (Frame::ShadowSync(sync), true) = (frame, self.options.spin_watchdog) {
            self.count_shadow_frame(from, conn, sync.device);
        }
        let (link, direction) = self.link_of(from);
        let state = *self.link_state(link);
        if state.blocked(direction) || dice::chance(&mut self.rng, self.drawn.loss_percent) {
            self.stats.n_frames_lost += 1;
            return;
        }
        if let (Endpoint::Device(_), Frame::Events(batch)) = (from, frame) {
            self.security.verify_ahead(batch);
        }
        // Workaround (see the report): core's shadow sync answers every sync message it receives,
        // so duplicated sync frames multiply without bound; QUIC never duplicates a frame, so
        // only event, ack and control frames are duplicated here.
        let duplicable = !matches!(frame, Frame::ShadowSync(_)) || self.options.duplicate_shadow_sync;
        let copies = if duplicable && dice::chance(&mut self.rng, self.drawn.duplicate_percent) { 2 } else { 1 };
        self.stats.n_frames_duplicated += copies - 1;
        for copy in 0..copies {
            let delay_ms = self.drawn.latency_ms + dice::range(&mut self.rng, 0, self.drawn.jitter_ms);
            let at = self.now.plus_ms(delay_ms).max(state.stall_until);
            self.digest.u64(at.0 ^ copy);
            // The last copy takes the encoded frame itself.
            let bytes = if copy + 1 == copies { std::mem::take(&mut bytes) } else { bytes.clone() };
            self.schedule(at, Action::Deliver { to, conn, bytes });
        }
    }

    /// Sync health: counts sync frames per connection and shadow, and flags a connection on
    /// which one shadow's sync spins.
    fn count_shadow_frame(&mut self, from: Endpoint, conn: u64, device: DeviceId) {
        let now = self.now;
        let (window_start, n_frames) = self.shadow_rate.entry((conn, device)).or_insert((now, 0));
        if now.since(*window_start) >= SHADOW_SPIN_WINDOW_MS {
            *window_start = now;
            *n_frames = 0;
        }
        *n_frames += 1;
        if *n_frames == SHADOW_SPIN_FRAMES_MAX {
            let client = match from {
                Endpoint::Device(device) | Endpoint::GatewayIngest(_, device) => Endpoint::Device(device),
                Endpoint::GatewayUplink(gateway) | Endpoint::CloudIngest(gateway) => Endpoint::GatewayUplink(gateway),
            };
            tracing::warn!(?client, conn, %device, "shadow sync spins: replacing the connection");
            self.spinning.push((client, conn));
        }
    }

    /// Closes the connections found spinning; their clients connect again.
    fn replace_spinning(&mut self) {
        for (client, conn) in std::mem::take(&mut self.spinning) {
            self.shadow_rate.retain(|(counted, _), _| *counted != conn);
            match client {
                Endpoint::Device(device) => {
                    let node = &mut self.devices[device];
                    if let Some(session) = node.session.take_if(|session| session.conn.id == conn) {
                        self.stats.n_shadow_spins += 1;
                        self.gateways[session.gateway].ingest.retain(|_, ingest| ingest.id != conn);
                        self.schedule_device_connect(device);
                    }
                }
                Endpoint::GatewayUplink(gateway) => {
                    let node = &mut self.gateways[gateway];
                    if node.uplink.take_if(|session| session.id == conn).is_some() {
                        self.stats.n_shadow_spins += 1;
                        self.cloud.ingest.retain(|_, ingest| ingest.id != conn);
                        self.schedule_gateway_connect(gateway);
                    }
                }
                Endpoint::GatewayIngest(..) | Endpoint::CloudIngest(_) => {}
            }
        }
    }

    fn deliver(&mut self, to: Endpoint, conn: u64, bytes: &[u8]) {
        let frame = match Frame::decode(bytes) {
            Ok((frame, _)) => frame,
            Err(error) => {
                self.anomalies.push(format!("a frame the simulator encoded does not decode: {error}"));
                return;
            }
        };
        let now = self.now;
        let shadow_device = match &frame {
            Frame::ShadowSync(sync) => Some(sync.device),
            _ => None,
        };
        let result = match to {
            Endpoint::Device(device) => {
                let node = &mut self.devices[device];
                match node.session.as_mut().filter(|session| session.conn.id == conn && node.up) {
                    Some(session) => {
                        if let Some(shadow_device) = shadow_device {
                            node.disk.touch_shadow(shadow_device);
                        }
                        Some(session.conn.session.handle_frame(now, frame, node.disk.live_mut()))
                    }
                    None => None,
                }
            }
            Endpoint::GatewayIngest(gateway, device) => {
                let node = &mut self.gateways[gateway];
                match node.ingest.get_mut(&device).filter(|session| session.id == conn) {
                    Some(session) => {
                        if let Some(shadow_device) = shadow_device {
                            node.disk.touch_shadow(shadow_device);
                        }
                        Some(session.session.handle_frame(now, frame, node.disk.live_mut()))
                    }
                    None => None,
                }
            }
            Endpoint::GatewayUplink(gateway) => {
                let node = &mut self.gateways[gateway];
                match node.uplink.as_mut().filter(|session| session.id == conn) {
                    Some(session) => {
                        if let Some(shadow_device) = shadow_device {
                            node.disk.touch_shadow(shadow_device);
                        }
                        Some(session.session.handle_frame(now, frame, node.disk.live_mut()))
                    }
                    None => None,
                }
            }
            Endpoint::CloudIngest(gateway) => {
                let node = &mut self.cloud;
                match node.ingest.get_mut(&gateway).filter(|session| session.id == conn) {
                    Some(session) => {
                        if let Some(shadow_device) = shadow_device {
                            node.disk.touch_shadow(shadow_device);
                            node.needs_sync = true;
                        }
                        let store = node.disk.live_mut();
                        Some(self.security.deliver_to_cloud(now, gateway, conn, frame, &mut session.session, store))
                    }
                    None => None,
                }
            }
        };
        match result {
            None => self.stats.n_frames_lost += 1,
            Some(result) => {
                self.stats.n_frames_delivered += 1;
                self.digest.u64(to.code() ^ 0xd11e);
                if let Err(error) = result {
                    self.stats.n_session_errors += 1;
                    tracing::debug!(?to, %error, "session refused a frame");
                }
                self.work.push(to);
            }
        }
    }

    fn fire_timer(&mut self, at: Endpoint, conn: u64) {
        let now = self.now;
        let fired = match at {
            Endpoint::Device(device) => self.devices[device]
                .session
                .as_mut()
                .map(|session| &mut session.conn)
                .and_then(|session| fire(session, conn, now, Uplink::handle_timeout)),
            Endpoint::GatewayIngest(gateway, device) => self.gateways[gateway]
                .ingest
                .get_mut(&device)
                .and_then(|session| fire(session, conn, now, Ingest::handle_timeout)),
            Endpoint::GatewayUplink(gateway) => self.gateways[gateway]
                .uplink
                .as_mut()
                .and_then(|session| fire(session, conn, now, Uplink::handle_timeout)),
            Endpoint::CloudIngest(gateway) => {
                self.cloud.ingest.get_mut(&gateway).and_then(|session| fire(session, conn, now, Ingest::handle_timeout))
            }
        };
        if fired.is_some() {
            self.work.push(at);
        }
    }

    fn arm_timer(
        &mut self,
        at: Endpoint,
        conn: u64,
        deadline: Option<Millis>,
        timer_at: Option<Millis>,
    ) -> Option<Millis> {
        let wanted = deadline.map(|deadline| deadline.max(self.now.plus_ms(1)));
        // A timer armed for no later than wanted stays: when it fires, the session finds nothing
        // due yet (every timeout checks its own deadline) and is armed again. Most deadlines only
        // move later (each frame sent pushes the keep-alive back), so this saves a queue entry
        // per frame.
        match (timer_at, wanted) {
            (Some(armed), Some(wanted)) if armed <= wanted => Some(armed),
            (_, Some(when)) => {
                self.schedule(when, Action::Timer { at, conn });
                Some(when)
            }
            (_, None) => None,
        }
    }

    // ----- host loops -----

    /// Pumps every endpoint with work until none has any, syncing and acknowledging in between.
    fn settle(&mut self) {
        loop {
            while let Some(endpoint) = self.work.pop() {
                match endpoint {
                    Endpoint::Device(device) => self.pump_device(device),
                    Endpoint::GatewayIngest(gateway, device) => self.pump_gateway_ingest(gateway, device),
                    Endpoint::GatewayUplink(gateway) => self.pump_gateway_uplink(gateway),
                    Endpoint::CloudIngest(gateway) => self.pump_cloud_ingest(gateway),
                }
            }
            if !self.flush_durable() {
                break;
            }
        }
        if !self.spinning.is_empty() {
            self.replace_spinning();
        }
    }

    /// Group commit: nodes sync what they were handed, then acknowledge it. (With the
    /// `ack_before_fsync` bug they acknowledged already and sync only on a timer.)
    fn flush_durable(&mut self) -> bool {
        let mut acted = false;
        let now = self.now;
        for gateway in 0..self.gateways.len() {
            if self.gateways[gateway].pending_acks.is_empty() {
                continue;
            }
            acted = true;
            let node = &mut self.gateways[gateway];
            node.disk.sync();
            for (endpoint, conn, device_id, high) in std::mem::take(&mut node.pending_acks) {
                if let Endpoint::GatewayIngest(_, device) = endpoint {
                    if let Some(session) = node.ingest.get_mut(&device).filter(|session| session.id == conn) {
                        session.session.handle_durable(now, device_id, high);
                        self.work.push(endpoint);
                    }
                }
            }
        }
        if !self.cloud.pending_acks.is_empty() || self.cloud.needs_sync {
            acted = true;
            self.sync_cloud();
            for (endpoint, conn, device_id, high) in std::mem::take(&mut self.cloud.pending_acks) {
                if let Endpoint::CloudIngest(gateway) = endpoint {
                    if let Some(session) = self.cloud.ingest.get_mut(&gateway).filter(|session| session.id == conn) {
                        session.session.handle_durable(now, device_id, high);
                        self.work.push(endpoint);
                    }
                }
            }
        }
        acted
    }

    fn sync_cloud(&mut self) {
        self.cloud.needs_sync = false;
        self.cloud.disk.sync();
        for id in std::mem::take(&mut self.cloud.log_unsynced) {
            match self.cloud.disk.live().ledger.get(&id) {
                Some(event) => self.cloud.projection.fold(event),
                None => self.anomalies.push(format!("cloud log names {id}, which its store does not hold")),
            }
            self.cloud.log.push(id);
        }
    }

    fn sync_device(&mut self, device: usize) {
        let synced = self.devices[device].disk.sync();
        self.note_synced(device, synced);
    }

    /// Adds what a device made durable to the oracle.
    fn note_synced(&mut self, device: usize, synced: Synced) {
        self.drops[device].extend(synced.dropped);
        let oracle = &mut self.oracle[device];
        for (id, hash) in synced.recorded {
            let expected = oracle.len() as u64 + 1;
            if id.seq.0 != expected {
                // Only a broken host gets here (a commit for seqs the device lost in a crash).
                self.anomalies.push(format!("device made {id} durable, expected seq {expected} next"));
                oracle.resize(id.seq.0.saturating_sub(1) as usize, SEQ_SKIPPED_HASH);
            }
            oracle.push(hash);
        }
    }

    fn pump_device(&mut self, device: usize) {
        let now = self.now;
        let node = &mut self.devices[device];
        if !node.up {
            return;
        }
        let Some(session) = node.session.as_mut() else {
            return;
        };
        let mut closed = false;
        let mut established_wall = None;
        while let Some(event) = session.conn.session.poll_event() {
            match event {
                SessionEvent::Established { peer_wall, .. } => established_wall = Some(peer_wall),
                SessionEvent::Committed { device: id, up_to } => {
                    if let Err(error) = node.disk.mark_committed(id, up_to) {
                        self.anomalies.push(format!("device {id} could not mark {up_to} committed: {error}"));
                    }
                }
                SessionEvent::ShadowChanged { device: id } => node.disk.touch_shadow(id),
                SessionEvent::Stalled { .. } => self.stats.n_stalls_reported += 1,
                SessionEvent::ResendLoop { .. } => self.stats.n_resend_loops += 1,
                SessionEvent::Throttled { .. } => self.stats.n_throttled += 1,
                SessionEvent::Closed(_) => closed = true,
                _ => {}
            }
        }
        if let Some(peer_wall) = established_wall {
            self.stats.n_sessions += 1;
            node.backoff_ms = RECONNECT_MS_MIN;
            let wall = node.wall(now);
            if wall.0.abs_diff(peer_wall.0) > CLOCK_ADOPT_MS {
                // The device agent trusts its gateway's clock over an RTC that reset or jumped.
                node.rtc_reset_at = None;
                node.clock_offset_ms = peer_wall.0 as i64 - now.0 as i64;
            }
        }
        // Events must be durable before they leave the device: after a crash the device would
        // otherwise issue their seqs again for different events.
        if node.disk.has_unsynced() && !self.options.bugs.send_unsynced {
            let synced = node.disk.sync();
            self.note_synced(device, synced);
        }
        let node = &mut self.devices[device];
        let Some(session) = node.session.as_mut() else {
            return;
        };
        let mut frames = Vec::new();
        loop {
            match session.conn.session.poll_transmit(now, node.disk.live_mut()) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => {
                    self.anomalies.push(format!("device {} uplink failed to read its ledger: {error}", node.id));
                    break;
                }
            }
        }
        while let Some(event) = session.conn.session.poll_event() {
            if let SessionEvent::Closed(_) = event {
                closed = true;
            }
        }
        let (conn, gateway) = (session.conn.id, session.gateway);
        let deadline = session.conn.session.poll_timeout();
        let timer_at = session.conn.timer_at;
        for frame in &frames {
            self.send(Endpoint::Device(device), Endpoint::GatewayIngest(gateway, device), conn, frame);
        }
        if closed {
            self.devices[device].session = None;
            self.schedule_device_connect(device);
        } else {
            let armed = self.arm_timer(Endpoint::Device(device), conn, deadline, timer_at);
            if let Some(session) = self.devices[device].session.as_mut() {
                session.conn.timer_at = armed;
            }
        }
    }

    fn pump_gateway_ingest(&mut self, gateway: usize, device: usize) {
        let now = self.now;
        let ack_before_fsync = self.options.bugs.ack_before_fsync;
        let endpoint = Endpoint::GatewayIngest(gateway, device);
        let node = &mut self.gateways[gateway];
        if !node.up {
            return;
        }
        let Some(session) = node.ingest.get_mut(&device) else {
            return;
        };
        let conn = session.id;
        let mut closed = false;
        let mut uplink_work = false;
        while let Some(event) = session.session.poll_event() {
            match event {
                SessionEvent::Established { .. } => {
                    // Tell the device what the cloud already committed, so it can prune even if
                    // the commit that the gateway relayed earlier was lost.
                    let device_id = self.devices[device].id;
                    let committed = node.disk.live().ledger.committed(&device_id);
                    session.session.handle_committed(now, device_id, committed);
                }
                SessionEvent::EventsReceived(batch) => {
                    let device_id = batch.device;
                    match node.disk.append(batch) {
                        Ok(appended) => {
                            if ack_before_fsync {
                                session.session.handle_durable(now, device_id, appended.high);
                            } else {
                                node.pending_acks.push((endpoint, conn, device_id, appended.high));
                            }
                            if let Some(uplink) = node.uplink.as_mut() {
                                uplink.session.handle_appended(device_id);
                                uplink_work = true;
                            }
                        }
                        Err(error) => {
                            self.anomalies
                                .push(format!("gateway {} refused a batch its session accepted: {error}", node.id));
                            session.session.handle_refused(now, device_id, BackpressureReason::StoreFull, 1_000);
                        }
                    }
                }
                SessionEvent::ShadowChanged { device: id } => {
                    node.disk.touch_shadow(id);
                    if let Some(uplink) = node.uplink.as_mut() {
                        uplink.session.handle_shadow_changed(id);
                        uplink_work = true;
                    }
                }
                SessionEvent::Closed(_) => closed = true,
                _ => {}
            }
        }
        let mut frames = Vec::new();
        while let Some(frame) = session.session.poll_transmit(now, node.disk.live_mut()) {
            frames.push(frame);
        }
        while let Some(event) = session.session.poll_event() {
            if let SessionEvent::Closed(_) = event {
                closed = true;
            }
        }
        let deadline = session.session.poll_timeout();
        let timer_at = session.timer_at;
        if uplink_work {
            self.work.push(Endpoint::GatewayUplink(gateway));
        }
        for frame in &frames {
            self.send(endpoint, Endpoint::Device(device), conn, frame);
        }
        if closed {
            self.gateways[gateway].ingest.remove(&device);
        } else {
            let armed = self.arm_timer(endpoint, conn, deadline, timer_at);
            if let Some(session) = self.gateways[gateway].ingest.get_mut(&device) {
                session.timer_at = armed;
            }
        }
    }

    fn pump_gateway_uplink(&mut self, gateway: usize) {
        let now = self.now;
        let endpoint = Endpoint::GatewayUplink(gateway);
        let node = &mut self.gateways[gateway];
        if !node.up {
            return;
        }
        let Some(session) = node.uplink.as_mut() else {
            return;
        };
        let conn = session.id;
        let mut closed = false;
        let mut relays: Vec<(DeviceId, Option<Seq>)> = Vec::new();
        while let Some(event) = session.session.poll_event() {
            match event {
                SessionEvent::Established { .. } => {
                    self.stats.n_sessions += 1;
                    // What the cloud's welcome says it holds arrives as `Committed` events
                    // (core's gateway uplink emits them), relayed below like any commit.
                    node.backoff_ms = RECONNECT_MS_MIN;
                }
                SessionEvent::Committed { device: id, up_to } => relays.push((id, Some(up_to))),
                SessionEvent::ShadowChanged { device: id } => {
                    node.disk.touch_shadow(id);
                    relays.push((id, None));
                }
                SessionEvent::Stalled { .. } => self.stats.n_stalls_reported += 1,
                SessionEvent::ResendLoop { .. } => self.stats.n_resend_loops += 1,
                SessionEvent::Throttled { .. } => self.stats.n_throttled += 1,
                SessionEvent::Closed(_) => closed = true,
                _ => {}
            }
        }
        for (device_id, committed) in relays {
            let device = self.device_index.get(&device_id).copied();
            if let Some(up_to) = committed {
                if let Err(error) = node.disk.mark_committed(device_id, up_to) {
                    self.anomalies.push(format!("gateway {} could not mark {device_id} committed: {error}", node.id));
                }
            }
            if let Some(ingest) = device.and_then(|device| node.ingest.get_mut(&device)) {
                match committed {
                    Some(up_to) => ingest.session.handle_committed(now, device_id, up_to),
                    None => ingest.session.handle_shadow_changed(device_id),
                }
                if let Some(device) = device {
                    self.work.push(Endpoint::GatewayIngest(gateway, device));
                }
            }
        }
        let Some(session) = node.uplink.as_mut() else {
            return;
        };
        let mut frames = Vec::new();
        loop {
            match session.session.poll_transmit(now, node.disk.live_mut()) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => {
                    self.anomalies.push(format!("gateway {} uplink failed to read its spool: {error}", node.id));
                    break;
                }
            }
        }
        while let Some(event) = session.session.poll_event() {
            if let SessionEvent::Closed(_) = event {
                closed = true;
            }
        }
        let deadline = session.session.poll_timeout();
        let timer_at = session.timer_at;
        for frame in &frames {
            self.send(endpoint, Endpoint::CloudIngest(gateway), conn, frame);
        }
        if closed {
            self.gateways[gateway].uplink = None;
            self.schedule_gateway_connect(gateway);
        } else {
            let armed = self.arm_timer(endpoint, conn, deadline, timer_at);
            if let Some(session) = self.gateways[gateway].uplink.as_mut() {
                session.timer_at = armed;
            }
        }
    }

    fn pump_cloud_ingest(&mut self, gateway: usize) {
        let now = self.now;
        let bugs = self.options.bugs;
        let endpoint = Endpoint::CloudIngest(gateway);
        let node = &mut self.cloud;
        if !node.up {
            return;
        }
        let Some(session) = node.ingest.get_mut(&gateway) else {
            return;
        };
        let conn = session.id;
        let mut closed = false;
        let mut shadow_relays = Vec::new();
        while let Some(event) = session.session.poll_event() {
            match event {
                SessionEvent::EventsReceived(batch) => {
                    // The event store dedupes by id: only events it does not hold get a position.
                    let ledger = &node.disk.live().ledger;
                    let mut fresh = Vec::with_capacity(batch.events.len());
                    for event in &batch.events {
                        let held = ledger.get(&event.id).is_some();
                        self.stats.n_duplicates_at_cloud += u64::from(held);
                        if bugs.skip_dedupe || !held {
                            fresh.push(event.id);
                        }
                    }
                    let device_id = batch.device;
                    match node.disk.append(batch) {
                        Ok(appended) => {
                            node.log_unsynced.extend(fresh);
                            if bugs.ack_before_fsync {
                                session.session.handle_durable(now, device_id, appended.high);
                            } else {
                                node.pending_acks.push((endpoint, conn, device_id, appended.high));
                            }
                        }
                        Err(error) => {
                            self.anomalies.push(format!("cloud refused a batch its session accepted: {error}"));
                            session.session.handle_refused(now, device_id, BackpressureReason::StoreFull, 1_000);
                        }
                    }
                }
                SessionEvent::ShadowChanged { device: id } => {
                    node.disk.touch_shadow(id);
                    node.needs_sync = true;
                    shadow_relays.push(id);
                }
                SessionEvent::Violation { device, gateway: named, violation } => {
                    self.security.seen(now, gateway, named, device, violation);
                }
                SessionEvent::Closed(_) => closed = true,
                _ => {}
            }
        }
        let mut frames = Vec::new();
        while let Some(frame) = session.session.poll_transmit(now, node.disk.live_mut()) {
            frames.push(frame);
        }
        while let Some(event) = session.session.poll_event() {
            if let SessionEvent::Closed(_) = event {
                closed = true;
            }
        }
        let deadline = session.session.poll_timeout();
        let timer_at = session.timer_at;
        for device_id in shadow_relays {
            for (other, session) in node.ingest.iter_mut() {
                if *other != gateway {
                    session.session.handle_shadow_changed(device_id);
                    self.work.push(Endpoint::CloudIngest(*other));
                }
            }
        }
        for frame in &frames {
            self.send(endpoint, Endpoint::GatewayUplink(gateway), conn, frame);
        }
        if closed {
            self.cloud.ingest.remove(&gateway);
        } else {
            let armed = self.arm_timer(endpoint, conn, deadline, timer_at);
            if let Some(session) = self.cloud.ingest.get_mut(&gateway) {
                session.timer_at = armed;
            }
        }
    }

    // ----- connections -----

    /// Workaround (see the report): a lost `Hello` or `Welcome` leaves both sessions waiting
    /// forever, each keeping the other alive with keep-alives. A host gives up on a handshake that
    /// takes too long and connects again.
    fn handshake_deadline(&mut self, at: Endpoint, conn: u64) {
        match at {
            Endpoint::Device(device) => {
                let node = &mut self.devices[device];
                let stuck = node
                    .session
                    .as_ref()
                    .is_some_and(|session| session.conn.id == conn && !session.conn.session.is_established());
                if stuck {
                    node.session = None;
                    self.stats.n_handshake_timeouts += 1;
                    self.schedule_device_connect(device);
                }
            }
            Endpoint::GatewayUplink(gateway) => {
                let node = &mut self.gateways[gateway];
                let stuck =
                    node.uplink.as_ref().is_some_and(|session| session.id == conn && !session.session.is_established());
                if stuck {
                    node.uplink = None;
                    self.stats.n_handshake_timeouts += 1;
                    self.schedule_gateway_connect(gateway);
                }
            }
            Endpoint::GatewayIngest(..) | Endpoint::CloudIngest(_) => {}
        }
    }

    fn schedule_device_connect(&mut self, device: usize) {
        let node = &mut self.devices[device];
        if node.connect_pending {
            return;
        }
        node.connect_pending = true;
        let delay_ms = node.backoff_ms;
        node.backoff_ms = (node.backoff_ms * 2).min(RECONNECT_MS_MAX);
        let jitter_ms = dice::range(&mut self.rng, 0, delay_ms / 2);
        self.schedule(self.now.plus_ms(delay_ms + jitter_ms), Action::ConnectDevice(device));
    }

    fn schedule_gateway_connect(&mut self, gateway: usize) {
        let node = &mut self.gateways[gateway];
        if node.connect_pending {
            return;
        }
        node.connect_pending = true;
        let delay_ms = node.backoff_ms;
        node.backoff_ms = (node.backoff_ms * 2).min(RECONNECT_MS_MAX);
        let jitter_ms = dice::range(&mut self.rng, 0, delay_ms / 2);
        self.schedule(self.now.plus_ms(delay_ms + jitter_ms), Action::ConnectGateway(gateway));
    }

    /// A device opens a connection to its home gateway, if both are up and the link is not cut.
    fn connect_device(&mut self, device: usize) {
        let node = &self.devices[device];
        if !node.up || node.session.is_some() {
            return;
        }
        let gateway = node.home;
        let reachable = node.link.blocked_up == 0 && node.link.blocked_down == 0 && self.gateways[gateway].up;
        if !reachable {
            self.schedule_device_connect(device);
            return;
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        let id = node.id;
        // A device short of storage sends each reading at once: what it held back would be the
        // first it drops. (Lingering there also makes its batches start with holes that span the
        // cloud's head far more often: the gap SECURITY.md lists under known gaps.)
        let linger_ms = if node.storage_events_max.is_some() { 0 } else { self.options.linger_ms };
        let config = SessionConfig { linger_ms, ..self.config.clone() };
        let mut uplink = Uplink::for_device(id, config, self.now);
        if let Some(signer) = self.security.signer(device, id) {
            uplink = uplink.signing(signer);
        }
        let ingest = Ingest::for_gateway(id, self.config.clone(), self.now);
        self.devices[device].session =
            Some(DeviceConn { gateway, conn: Conn { id: conn, session: uplink, timer_at: None } });
        // A new connection from the same certificate replaces the old one.
        self.gateways[gateway].ingest.insert(device, Conn { id: conn, session: ingest, timer_at: None });
        self.digest.u64(conn);
        self.schedule(self.now.plus_ms(HANDSHAKE_MS), Action::HandshakeDeadline { at: Endpoint::Device(device), conn });
        self.work.push(Endpoint::Device(device));
        self.work.push(Endpoint::GatewayIngest(gateway, device));
    }

    fn connect_gateway(&mut self, gateway: usize) {
        let node = &self.gateways[gateway];
        if !node.up || node.uplink.is_some() {
            return;
        }
        if node.link.blocked_up > 0 || node.link.blocked_down > 0 || !self.cloud.up {
            self.schedule_gateway_connect(gateway);
            return;
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        let id = node.id;
        let uplink = Uplink::for_gateway(id, self.config.clone(), self.now);
        let ingest = Ingest::for_cloud(id, self.config.clone(), self.now);
        let ingest = self.security.cloud_ingest(ingest, self.options.bugs.skip_verify);
        self.gateways[gateway].uplink = Some(Conn { id: conn, session: uplink, timer_at: None });
        self.cloud.ingest.insert(gateway, Conn { id: conn, session: ingest, timer_at: None });
        self.digest.u64(conn);
        self.schedule(
            self.now.plus_ms(HANDSHAKE_MS),
            Action::HandshakeDeadline { at: Endpoint::GatewayUplink(gateway), conn },
        );
        self.work.push(Endpoint::GatewayUplink(gateway));
        self.work.push(Endpoint::CloudIngest(gateway));
    }

    // ----- workload -----

    fn reading(&mut self, device: usize) {
        if self.healed {
            return;
        }
        self.schedule(self.now.plus_ms(self.options.reading_interval_ms.max(1)), Action::Reading(device));
        let noise = dice::range(&mut self.rng, 0, 100) as f64 / 100.0;
        let node = &mut self.devices[device];
        if !node.up {
            return;
        }
        let (sensor, unit) = SENSORS[(node.n_readings % SENSORS.len() as u64) as usize];
        node.n_readings += 1;
        let wall = node.wall(self.now);
        let hours = self.now.since(START_WALL) as f64 / 3_600_000.0;
        let value = 20.0 + 5.0 * (hours / 24.0 * std::f64::consts::TAU).sin() + noise;
        let payload = Payload::Reading(SensorReading { sensor: sensor.into(), value, unit: unit.into() });
        match node.disk.record(node.id, wall, wall, payload) {
            Ok(id) => {
                self.stats.n_recorded += 1;
                self.digest.u64(id.seq.0);
            }
            Err(error) => self.anomalies.push(format!("device {} could not record: {error}", node.id)),
        }
        self.enforce_budget(device);
    }

    /// A device over its storage budget drops its oldest uncommitted events (`drop-oldest`).
    fn enforce_budget(&mut self, device: usize) {
        let node = &mut self.devices[device];
        let Some(events_max) = node.storage_events_max else {
            return;
        };
        if node.disk.live().ledger.len() <= events_max {
            return;
        }
        let wall = node.wall(self.now);
        if let Some((first, last)) = node.disk.drop_oldest(node.id, events_max / 4 + 1, wall) {
            self.stats.n_dropped += last.0 - first.0 + 1;
            self.stats.n_recorded += 1;
            self.digest.u64(first.0 ^ last.0 << 32);
            tracing::debug!(device = %node.id, %first, %last, "storage full: dropped oldest events");
        }
    }

    fn edit_reported(&mut self, device: usize) {
        if self.healed || !self.devices[device].up {
            return;
        }
        let key = SHADOW_KEYS[dice::index(&mut self.rng, SHADOW_KEYS.len())];
        let value = Value::Int(dice::range(&mut self.rng, 0, 1_000) as i64);
        let node = &mut self.devices[device];
        let id = node.id;
        let wall = node.wall(self.now);
        let Some(shadow) = node.disk.shadow_mut(&id) else {
            return;
        };
        if shadow.set(Section::Reported, key, &value).is_err() {
            return;
        }
        let reported = shadow.reported();
        // The shadow change and the event that records it are written together and made durable
        // by the same sync, as the device agent does in one SQLite transaction.
        node.disk.touch_shadow(id);
        match node.disk.record(id, wall, wall, Payload::ShadowReported(ShadowReported { reported })) {
            Ok(_) => self.stats.n_recorded += 1,
            Err(error) => self.anomalies.push(format!("device {id} could not record its shadow: {error}")),
        }
        self.stats.n_shadow_edits += 1;
        if let Some(session) = node.session.as_mut() {
            session.conn.session.handle_shadow_changed(id);
            self.work.push(Endpoint::Device(device));
        }
        self.enforce_budget(device);
    }

    fn edit_desired(&mut self, device: usize) {
        if self.healed || !self.cloud.up {
            return;
        }
        let key = SHADOW_KEYS[dice::index(&mut self.rng, SHADOW_KEYS.len())];
        let value = Value::Int(dice::range(&mut self.rng, 0, 1_000) as i64);
        let id = self.devices[device].id;
        let Some(shadow) = self.cloud.disk.shadow_mut(&id) else {
            return;
        };
        if shadow.set(Section::Desired, key, &value).is_err() {
            return;
        }
        self.cloud.disk.touch_shadow(id);
        self.cloud.needs_sync = true;
        self.stats.n_shadow_edits += 1;
        for (gateway, session) in self.cloud.ingest.iter_mut() {
            session.session.handle_shadow_changed(id);
            self.work.push(Endpoint::CloudIngest(*gateway));
        }
    }

    // ----- faults and heal -----

    fn inject(&mut self, fault: Fault) {
        match fault {
            Fault::DeviceCrash(device) => {
                let node = &mut self.devices[device];
                node.up = false;
                node.session = None;
                node.disk.crash();
            }
            Fault::DeviceRestart(device) => self.restart_device(device),
            Fault::GatewayCrash { gateway, wipe } => {
                let node = &mut self.gateways[gateway];
                node.up = false;
                node.ingest.clear();
                node.uplink = None;
                node.pending_acks.clear();
                if wipe {
                    let empty = gateway_store(node.id);
                    node.disk.wipe(empty);
                } else {
                    node.disk.crash();
                }
            }
            Fault::GatewayRestart(gateway) => self.restart_gateway(gateway),
            Fault::CloudCrash => {
                let cloud = &mut self.cloud;
                cloud.up = false;
                cloud.ingest.clear();
                cloud.pending_acks.clear();
                cloud.log_unsynced.clear();
                cloud.needs_sync = false;
                cloud.disk.crash();
            }
            Fault::CloudRestart => self.cloud.up = true,
            Fault::Block { link, up, down, on } => {
                let state = self.link_state(link);
                let step = |count: u32| if on { count + 1 } else { count.saturating_sub(1) };
                if up {
                    state.blocked_up = step(state.blocked_up);
                }
                if down {
                    state.blocked_down = step(state.blocked_down);
                }
            }
            Fault::Stall { link, until } => {
                let state = self.link_state(link);
                state.stall_until = state.stall_until.max(until);
            }
            Fault::Roam { device, gateway } => {
                let node = &mut self.devices[device];
                if node.home == gateway || self.security.pinned(&node.id) {
                    return;
                }
                node.home = gateway;
                if let Some(session) = node.session.as_mut() {
                    session.conn.session.close(GoodbyeReason::Roaming);
                    self.work.push(Endpoint::Device(device));
                }
            }
            Fault::ClockJump { device, delta_ms } => {
                let node = &mut self.devices[device];
                node.clock_offset_ms = node.clock_offset_ms.saturating_add(delta_ms);
            }
            Fault::RtcReset(device) => self.devices[device].rtc_reset_at = Some(self.now),
        }
    }

    fn restart_device(&mut self, device: usize) {
        let node = &mut self.devices[device];
        if node.up {
            return;
        }
        node.up = true;
        node.backoff_ms = RECONNECT_MS_MIN;
        self.connect_device(device);
    }

    fn restart_gateway(&mut self, gateway: usize) {
        let node = &mut self.gateways[gateway];
        if node.up {
            return;
        }
        node.up = true;
        node.backoff_ms = RECONNECT_MS_MIN;
        self.connect_gateway(gateway);
    }

    /// Faults stop: links clean and open, every node up, every connection replaced by a fresh
    /// one (see the report: core's shadow sync does not recover a lost sync message within a
    /// session, so sessions that lived through frame loss may never finish their shadows).
    fn heal(&mut self) {
        tracing::info!(at_ms = self.elapsed_ms(), "heal");
        self.healed = true;
        for device in &mut self.devices {
            device.session = None;
        }
        for gateway in &mut self.gateways {
            gateway.ingest.clear();
            gateway.uplink = None;
            gateway.pending_acks.clear();
        }
        self.cloud.ingest.clear();
        self.cloud.pending_acks.clear();
        self.drawn.loss_percent = 0;
        self.drawn.duplicate_percent = 0;
        self.drawn.jitter_ms = 0;
        self.cloud.up = true;
        for gateway in 0..self.gateways.len() {
            self.gateways[gateway].link = LinkState::default();
            self.restart_gateway(gateway);
            self.gateways[gateway].backoff_ms = RECONNECT_MS_MIN;
            self.connect_gateway(gateway);
        }
        for device in 0..self.devices.len() {
            self.devices[device].link = LinkState::default();
            self.restart_device(device);
            self.devices[device].backoff_ms = RECONNECT_MS_MIN;
            self.connect_device(device);
        }
        self.schedule(self.now.plus_ms(CONVERGE_POLL_MS), Action::Converged);
    }

    /// Whether every device's events are committed by the cloud, nothing is in flight, and every
    /// shadow replica has the same heads.
    fn is_quiescent(&mut self) -> bool {
        if !self.cloud.log_unsynced.is_empty() || !self.cloud.pending_acks.is_empty() {
            return false;
        }
        for node in &self.devices {
            let ledger = &node.disk.live().ledger;
            let high = ledger.high(&node.id);
            let behind = ledger.committed(&node.id) != high || self.cloud.disk.live().high(&node.id) != high;
            if behind && !self.security.may_lag(&node.id) {
                return false;
            }
            if node.disk.has_unsynced() {
                return false;
            }
        }
        self.shadows_diverged(true) == 0
    }

    /// Devices whose shadow heads differ between device and cloud (and, with `all_replicas`,
    /// any gateway that keeps a copy).
    fn shadows_diverged(&mut self, all_replicas: bool) -> u64 {
        let mut diverged = 0;
        for device in 0..self.devices.len() {
            let id = self.devices[device].id;
            if self.security.is_cloned(&id) {
                // Two devices write one shadow: a clone's replicas need not agree.
                continue;
            }
            let device_heads = self.devices[device].disk.live_mut().shadows.get_mut(&id).map(|shadow| shadow.heads());
            let cloud_heads = self.cloud.disk.live_mut().shadows.get_mut(&id).map(|shadow| shadow.heads());
            let mut same = device_heads == cloud_heads;
            if same && all_replicas {
                for gateway in &mut self.gateways {
                    if let Some(shadow) = gateway.disk.live_mut().shadows.get_mut(&id) {
                        same &= Some(shadow.heads()) == device_heads;
                    }
                }
            }
            if !same {
                diverged += 1;
            }
        }
        diverged
    }

    fn plot_point(&mut self) {
        // Windows that ended would restart at the next frame anyway: forget them, so the spin
        // counters of connections long gone do not pile up.
        let now = self.now;
        self.shadow_rate.retain(|_, (window_start, _)| now.since(*window_start) < SHADOW_SPIN_WINDOW_MS);
        let backlog_events = self
            .devices
            .iter()
            .map(|node| {
                let ledger = &node.disk.live().ledger;
                ledger.high(&node.id).0.saturating_sub(ledger.committed(&node.id).0)
            })
            .sum();
        let shadows_diverged = self.shadows_diverged(false);
        self.plot.push(PlotPoint { at_ms: self.elapsed_ms(), backlog_events, shadows_diverged });
    }

    /// Whether the run is over.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Whether the heal phase ended with the fleet quiescent.
    pub fn converged(&self) -> bool {
        self.converged_at.is_some()
    }
}

/// Fires a session's timer if it is the one armed for this connection.
fn fire<S>(session: &mut Conn<S>, conn: u64, now: Millis, handle_timeout: fn(&mut S, Millis)) -> Option<()> {
    if session.id != conn || session.timer_at != Some(now) {
        return None;
    }
    session.timer_at = None;
    handle_timeout(&mut session.session, now);
    Some(())
}
