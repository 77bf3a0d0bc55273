//! `Uplink`: the client end of a session, sending a ledger's events upstream.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;

use super::{CloseReason, Common, SessionConfig, SessionError, SessionEvent, Store};
use crate::auth::DeviceSigner;
use crate::event::{DeviceId, GatewayId, Millis, Seq};
use crate::vv::VersionVector;
use crate::wire::{
    Ack, Backpressure, Frame, Goodbye, GoodbyeReason, Hello, Peer, Welcome, BATCH_EVENTS_MAX, FRAME_BYTES_MAX,
    PROTOCOL_VERSION, PROTOCOL_VERSION_MIN,
};

/// The client end of a session: a device towards a gateway, or a gateway towards the cloud.
/// See the [module documentation](super) for the protocol and the handle/poll shape.
#[derive(Debug)]
pub struct Uplink {
    me: Peer,
    common: Common,
    state: State,
    streams: BTreeMap<DeviceId, OutStream>,
    /// Device served last, so batches of many devices take turns.
    last_served: Option<DeviceId>,
    /// Streams that may have something to send: added when events are appended, acknowledged,
    /// resent or refused, removed when a look finds nothing to send. `next_batch` visits only
    /// these, so a gateway with thousands of quiet devices does not walk them all per frame.
    ready: BTreeSet<DeviceId>,
    last_progress: Millis,
    stall_reported: bool,
    backlog_events: u64,
    /// A device's key: every batch it sends is sealed (see [`crate::auth`]).
    signer: Option<DeviceSigner>,
    /// Batches sent without a proof because the ledger did not know the chain.
    n_unsigned: u64,
    /// When the session started (the handshake must be done by `handshake_timeout_ms` after).
    started: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `Hello` not sent yet.
    Start,
    /// `Hello` sent, waiting for `Welcome`.
    AwaitWelcome,
    /// Sending.
    Established,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Start => "starting",
            State::AwaitWelcome => "waiting for welcome",
            State::Established => "established",
        }
    }
}

#[derive(Debug, Default)]
struct OutStream {
    /// What the receiver holds durably.
    acked: Seq,
    /// Next seq to send; everything before it is sent or acknowledged.
    next: Seq,
    /// Last seq and send time of each batch not yet acknowledged, oldest first.
    in_flight: VecDeque<(Seq, Millis)>,
    /// Backpressure: send nothing before this time.
    paused_until: Option<Millis>,
    /// The ledger's high when last looked at.
    known_high: Seq,
    /// Resends of the same run without progress.
    resends: u32,
    resend_from: Seq,
    /// When the events waiting to be sent must leave (`linger_ms` after they were first seen);
    /// `None` while none wait.
    due: Option<Millis>,
    /// Set while the stream holds events back for `due`: when the host must wake the session.
    wake_at: Option<Millis>,
}

impl Uplink {
    /// A device's session towards a gateway, sending its own events.
    pub fn for_device(device: DeviceId, config: SessionConfig, now: Millis) -> Self {
        Self::new(Peer::Device(device), config, now)
    }

    /// A gateway's session towards the cloud, sending every device's events from its spool.
    pub fn for_gateway(gateway: GatewayId, config: SessionConfig, now: Millis) -> Self {
        Self::new(Peer::Gateway(gateway), config, now)
    }

    fn new(me: Peer, mut config: SessionConfig, now: Millis) -> Self {
        config.batch_events_max = config.batch_events_max.clamp(1, BATCH_EVENTS_MAX);
        config.batches_in_flight_max = config.batches_in_flight_max.max(1);
        Self {
            me,
            common: Common::new(config, now),
            state: State::Start,
            streams: BTreeMap::new(),
            last_served: None,
            ready: BTreeSet::new(),
            last_progress: now,
            stall_reported: false,
            backlog_events: 0,
            signer: None,
            n_unsigned: 0,
            started: now,
        }
    }

    /// Seals every batch with the device's key (a device's session; see [`crate::auth`]).
    pub fn signing(mut self, signer: DeviceSigner) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Batches sent unsigned although this session has a key, because the ledger did not know
    /// the chain value before them.
    pub fn n_unsigned(&self) -> u64 {
        self.n_unsigned
    }

    /// Whether the handshake is done and the session is open.
    pub fn is_established(&self) -> bool {
        self.state == State::Established && !self.common.closed
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.common.closed
    }

    /// Events the ledger holds that the receiver has not acknowledged, as last seen.
    pub fn backlog_events(&self) -> u64 {
        self.backlog_events
    }

    /// What the receiver has acknowledged of `device`.
    pub fn acked(&self, device: &DeviceId) -> Seq {
        self.streams.get(device).map_or(Seq::ZERO, |stream| stream.acked)
    }

    /// Tells the session that `device`'s events were appended to the ledger (a gateway learns of
    /// new devices this way). A device's session also looks at its ledger on every poll.
    pub fn handle_appended(&mut self, device: DeviceId) {
        if self.sends_for(&device) {
            let stream = self.streams.entry(device).or_default();
            if stream.next == Seq::ZERO {
                stream.next = stream.acked.next();
            }
            self.ready.insert(device);
        }
    }

    /// Tells the session that the shadow of `device` changed locally (or through another session).
    pub fn handle_shadow_changed(&mut self, device: DeviceId) {
        if self.sends_for(&device) {
            self.common.mark_shadow_dirty(device);
        }
    }

    /// Ends the session cleanly with a goodbye.
    pub fn close(&mut self, reason: GoodbyeReason) {
        if !self.common.closed {
            self.common.send(Frame::Goodbye(Goodbye { reason }));
            self.common.close(CloseReason::LocalGoodbye(reason));
        }
    }

    fn sends_for(&self, device: &DeviceId) -> bool {
        match self.me {
            Peer::Device(own) => own == *device,
            Peer::Gateway(_) => true,
        }
    }

    /// Handles a frame from the server. On error the session is closed and an error frame is
    /// queued for the server.
    pub fn handle_frame<S: Store + ?Sized>(
        &mut self,
        now: Millis,
        frame: Frame,
        store: &mut S,
    ) -> Result<(), SessionError> {
        if self.common.closed {
            return Ok(());
        }
        self.common.last_received = now;
        let result = self.dispatch(now, frame, store);
        result.map_err(|error| self.common.fail(error))
    }

    fn dispatch<S: Store + ?Sized>(&mut self, now: Millis, frame: Frame, store: &mut S) -> Result<(), SessionError> {
        match (self.state, frame) {
            (State::AwaitWelcome, Frame::Welcome(welcome)) => self.on_welcome(now, welcome, store),
            (State::Established, Frame::Custody(ack)) => {
                self.on_ack(now, ack)?;
                self.common.emit(SessionEvent::Custody { device: ack.device, up_to: ack.up_to });
                Ok(())
            }
            (State::Established, Frame::Commit(ack)) => {
                self.on_ack(now, ack)?;
                self.common.emit(SessionEvent::Committed { device: ack.device, up_to: ack.up_to });
                Ok(())
            }
            (State::Established, Frame::Backpressure(backpressure)) => self.on_backpressure(now, backpressure),
            (State::Established, Frame::ShadowSync(sync)) => {
                if !self.sends_for(&sync.device) {
                    return Err(SessionError::Unauthorized {
                        reason: format!("server sent the shadow of {}, which this replica does not keep", sync.device),
                    });
                }
                self.common.receive_shadow(sync, store)
            }
            (_, Frame::KeepAlive(_)) => Ok(()),
            (_, Frame::Goodbye(goodbye)) => {
                self.common.close(CloseReason::Goodbye(goodbye.reason));
                Ok(())
            }
            (_, Frame::Error(error)) => {
                #[cfg(feature = "std")]
                tracing::warn!(code = ?error.code, message = %error.message, "server closed the session with an error");
                self.common.close(CloseReason::PeerError { code: error.code, message: error.message });
                Ok(())
            }
            (state, frame) => Err(SessionError::UnexpectedFrame { frame: frame.name(), state: state.name() }),
        }
    }

    fn on_welcome<S: Store + ?Sized>(
        &mut self,
        now: Millis,
        welcome: Welcome,
        store: &mut S,
    ) -> Result<(), SessionError> {
        if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&welcome.protocol) {
            return Err(SessionError::ProtocolVersion { peer_min: welcome.protocol, peer_max: welcome.protocol });
        }
        for (device, high) in self.hello_vv(store).iter() {
            let acked = welcome.vv.get(device);
            // A backlog from before the session has waited long enough: it leaves at once.
            let due = (high > acked).then_some(now);
            self.streams.insert(*device, OutStream { acked, next: acked.next(), due, ..OutStream::default() });
            self.ready.insert(*device);
            // The cloud's welcome says what its store holds: events this gateway forwarded
            // earlier, or that reached the cloud through another gateway, are committed, and the
            // spool may drop them now rather than keep them forever.
            if let Peer::Gateway(_) = self.me {
                let committed = acked.min(high);
                if committed > Seq::ZERO {
                    self.common.emit(SessionEvent::Committed { device: *device, up_to: committed });
                }
            }
        }
        for device in store.shadow_devices() {
            self.handle_shadow_changed(device);
        }
        self.state = State::Established;
        self.last_progress = now;
        self.common.emit(SessionEvent::Established { protocol: welcome.protocol, peer_wall: welcome.wall });
        Ok(())
    }

    fn stream_for(&mut self, device: &DeviceId) -> Result<&mut OutStream, SessionError> {
        if !self.sends_for(device) {
            return Err(SessionError::Unauthorized { reason: format!("server acknowledged events of {device}") });
        }
        Ok(self.streams.entry(*device).or_default())
    }

    fn on_ack(&mut self, now: Millis, ack: Ack) -> Result<(), SessionError> {
        let stream = self.stream_for(&ack.device)?;
        if ack.up_to <= stream.acked {
            return Ok(());
        }
        let before = contribution(stream);
        stream.acked = ack.up_to;
        stream.in_flight.retain(|(last, _)| *last > ack.up_to);
        stream.next = stream.next.max(ack.up_to.next());
        stream.resends = 0;
        let after = contribution(stream);
        self.backlog_events = self.backlog_events.saturating_sub(before) + after;
        self.last_progress = now;
        self.stall_reported = false;
        self.ready.insert(ack.device);
        Ok(())
    }

    fn on_backpressure(&mut self, now: Millis, backpressure: Backpressure) -> Result<(), SessionError> {
        let stream = self.stream_for(&backpressure.device)?;
        let before = contribution(stream);
        stream.acked = stream.acked.max(backpressure.up_to);
        stream.next = stream.acked.next();
        stream.in_flight.clear();
        stream.paused_until = Some(now.plus_ms(u64::from(backpressure.retry_after_ms)));
        stream.due = Some(now);
        stream.wake_at = None;
        let after = contribution(stream);
        self.backlog_events = self.backlog_events.saturating_sub(before) + after;
        // Stays ready, so it sends again when the pause is over.
        self.ready.insert(backpressure.device);
        #[cfg(feature = "std")]
        tracing::debug!(device = %backpressure.device, reason = ?backpressure.reason, "server applies backpressure");
        self.common.emit(SessionEvent::Throttled {
            device: backpressure.device,
            reason: backpressure.reason,
            retry_after_ms: backpressure.retry_after_ms,
        });
        Ok(())
    }

    fn hello_vv<S: Store + ?Sized>(&self, store: &S) -> VersionVector {
        match self.me {
            Peer::Device(own) => [(own, store.high(&own))].into_iter().collect(),
            Peer::Gateway(_) => store.version_vector(),
        }
    }

    /// The next frame to send, reading events from `store` as needed.
    pub fn poll_transmit<S: Store + ?Sized>(
        &mut self,
        now: Millis,
        store: &mut S,
    ) -> Result<Option<Frame>, SessionError> {
        if let Some(frame) = self.common.poll_transmit_queued(now) {
            return Ok(Some(frame));
        }
        if self.common.closed {
            return Ok(None);
        }
        let frame = match self.state {
            State::Start => {
                self.state = State::AwaitWelcome;
                Some(Frame::Hello(Hello {
                    protocol_min: PROTOCOL_VERSION_MIN,
                    protocol_max: PROTOCOL_VERSION,
                    peer: self.me,
                    vv: self.hello_vv(store),
                    wall: now,
                }))
            }
            State::AwaitWelcome => None,
            State::Established => match self.common.next_shadow_frame(store) {
                Some(frame) => Some(frame),
                None => self.next_batch(now, store)?,
            },
        };
        if frame.is_some() {
            self.common.last_sent = now;
        }
        Ok(frame)
    }

    fn next_batch<S: Store + ?Sized>(&mut self, now: Millis, store: &mut S) -> Result<Option<Frame>, SessionError> {
        if let Peer::Device(own) = self.me {
            // A device's ledger grows without `handle_appended`: look at it on every poll.
            // (A ledger that was empty at the handshake has no stream yet: it starts at seq 1.)
            self.streams.entry(own).or_insert_with(|| OutStream { next: Seq::FIRST, ..OutStream::default() });
            self.ready.insert(own);
        }
        // Serve ready devices in turn, starting after the one served last.
        let mut cursor = self.last_served;
        let mut n_left = self.ready.len();
        let config = &self.common.config;
        while n_left > 0 {
            n_left -= 1;
            let after = match cursor {
                Some(last) => self.ready.range((Bound::Excluded(last), Bound::Unbounded)).next(),
                None => None,
            };
            let Some(device) = after.or_else(|| self.ready.iter().next()).copied() else {
                break;
            };
            cursor = Some(device);
            let Some(stream) = self.streams.get_mut(&device) else {
                self.ready.remove(&device);
                continue;
            };
            let before = contribution(stream);
            stream.known_high = store.high(&device);
            let backlog_before = self.backlog_events;
            self.backlog_events = self.backlog_events.saturating_sub(before) + contribution(stream);
            if backlog_before == 0 && self.backlog_events > 0 {
                // Nothing was owed until now: the stall clock starts here, not at the last ack.
                self.last_progress = now;
            }
            stream.wake_at = None;
            if stream.paused_until.is_some_and(|until| now < until) {
                // Stays ready: it sends again when the pause is over.
                continue;
            }
            stream.paused_until = None;
            if stream.next > stream.known_high {
                stream.due = None;
            }
            if stream.in_flight.len() >= config.batches_in_flight_max || stream.next > stream.known_high {
                // Ready again on an ack, a retransmit or an append.
                self.ready.remove(&device);
                continue;
            }
            if config.linger_ms > 0 {
                let due = *stream.due.get_or_insert(now.plus_ms(config.linger_ms));
                let n_waiting = stream.known_high.0 - stream.next.0 + 1;
                if now < due && n_waiting < config.batch_events_max as u64 {
                    // Held back so that more join the batch; `poll_timeout` wakes the host at `due`.
                    stream.wake_at = Some(due);
                    self.ready.remove(&device);
                    continue;
                }
            }
            let Some(mut batch) = store.read(&device, stream.next, config.batch_events_max)? else {
                // Covered but not held (pruned after commit): nothing to send for now.
                stream.next = stream.known_high.next();
                self.ready.remove(&device);
                continue;
            };
            // A relay forwards whole sealed runs: a cut elsewhere could not be verified.
            if self.signer.is_none() && batch.proof.as_ref().is_some_and(|proof| !proof.seals.is_empty()) {
                let len = batch.events.len();
                let ends_sealed = batch
                    .proof
                    .as_ref()
                    .is_some_and(|proof| proof.seals.last().map(|seal| seal.seq) == Some(batch.last_seq()));
                if !ends_sealed {
                    batch.truncate_sealed(len - 1);
                }
            }
            // Keep the frame under the size limit: large payloads mean fewer events per batch.
            let fits = |batch: &crate::wire::EventBatch| {
                batch.encoded_len_bound() < FRAME_BYTES_MAX || batch.encoded_len() < FRAME_BYTES_MAX
            };
            while batch.events.len() > 1 && !fits(&batch) {
                let keep = batch.events.len() / 2;
                if !batch.truncate_sealed(keep) {
                    break;
                }
            }
            if let Some(signer) = &self.signer {
                let dropped = batch.dropped();
                match batch.proof.as_mut() {
                    Some(proof) => {
                        let head = proof.prev.over(&batch.events);
                        proof.seals =
                            vec![signer.seal(batch.events.last().map_or(batch.from, |event| event.id.seq), &head)];
                        // A hole starts right after the last chain value the ledger knows in
                        // front of it (at `batch.from - 1` when it can), which it signs too.
                        proof.hole = dropped.map(|(from, last)| {
                            let (known, before) = store.chain_before(&device, from);
                            signer.hole(known.next(), last, before, proof.prev)
                        });
                    }
                    None => {
                        self.n_unsigned += 1;
                        #[cfg(feature = "std")]
                        tracing::warn!(%device, from = %batch.from, "sending unsigned: the ledger does not know the chain before these events");
                    }
                }
            }
            let last = batch.last_seq();
            stream.in_flight.push_back((last, now));
            stream.next = last.next();
            if stream.next > stream.known_high {
                stream.due = None;
            }
            self.last_served = Some(device);
            return Ok(Some(Frame::Events(batch)));
        }
        Ok(None)
    }

    /// The next event for the host.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.common.events.pop_front()
    }

    /// Retransmits, keep-alives, idle timeout and stall detection.
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.state != State::Established && self.common.handshake_overdue(now, self.started) {
            return;
        }
        if !self.common.handle_timeout_common(now, self.backlog_events) {
            return;
        }
        let retransmit_ms = self.common.config.retransmit_ms;
        let resends_max = self.common.config.resends_max;
        let mut loops = Vec::new();
        for (device, stream) in &mut self.streams {
            if stream.wake_at.is_some_and(|wake_at| wake_at <= now) {
                // Lingered long enough.
                stream.wake_at = None;
                self.ready.insert(*device);
            }
            let expired = stream.in_flight.front().is_some_and(|(_, sent)| now.since(*sent) >= retransmit_ms);
            if !expired {
                continue;
            }
            // Go back to the first unacknowledged seq and send everything again, at once.
            stream.in_flight.clear();
            stream.next = stream.acked.next();
            stream.due = Some(now);
            stream.wake_at = None;
            self.ready.insert(*device);
            if stream.resend_from == stream.next {
                stream.resends += 1;
            } else {
                stream.resend_from = stream.next;
                stream.resends = 1;
            }
            if stream.resends == resends_max {
                loops.push(SessionEvent::ResendLoop { device: *device, from: stream.next, n_resends: stream.resends });
            }
        }
        for event in loops {
            #[cfg(feature = "std")]
            tracing::warn!(?event, "sync resends the same events without progress");
            self.common.emit(event);
        }
        if self.backlog_events > 0 && !self.stall_reported && now.since(self.last_progress) >= self.stall_after_ms() {
            self.stall_reported = true;
            #[cfg(feature = "std")]
            tracing::warn!(backlog = self.backlog_events, "sync stalled: nothing acknowledged");
            self.common.emit(SessionEvent::Stalled { since: self.last_progress, backlog_events: self.backlog_events });
        }
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let mut deadline = self.common.common_timeout()?;
        if self.state != State::Established {
            deadline = deadline.min(self.started.plus_ms(self.common.config.handshake_timeout_ms));
        }
        for stream in self.streams.values() {
            if let Some((_, sent)) = stream.in_flight.front() {
                deadline = deadline.min(sent.plus_ms(self.common.config.retransmit_ms));
            }
            if let Some(until) = stream.paused_until {
                deadline = deadline.min(until);
            }
            if let Some(wake_at) = stream.wake_at {
                deadline = deadline.min(wake_at);
            }
        }
        if self.backlog_events > 0 && !self.stall_reported {
            deadline = deadline.min(self.last_progress.plus_ms(self.stall_after_ms()));
        }
        Some(deadline)
    }

    /// How long a backlog may go without an acknowledgement before it is reported as a stall:
    /// lingering events wait on purpose, so their wait does not count.
    fn stall_after_ms(&self) -> u64 {
        self.common.config.stall_ms.saturating_add(self.common.config.linger_ms)
    }
}

/// What a stream adds to the backlog: events the ledger holds that the receiver has not
/// acknowledged, as last seen.
fn contribution(stream: &OutStream) -> u64 {
    stream.known_high.0.saturating_sub(stream.acked.0)
}
