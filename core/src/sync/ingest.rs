//! `Ingest`: the server end of a session, taking events from downstream.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::{negotiate, CloseReason, Common, SessionConfig, SessionError, SessionEvent, Store};
use crate::auth::{same_event, verify_batch, ChainHash, DeviceKeys, Violation};
use crate::event::{DeviceId, GatewayId, Millis, Seq};
use crate::vv::VersionVector;
use crate::wire::{
    Ack, Backpressure, BackpressureReason, EventBatch, Frame, Goodbye, GoodbyeReason, Hello, Peer, Welcome,
};

/// The server end of a session: a gateway taking one device's events (acknowledged as custody),
/// or the cloud taking a gateway's (acknowledged as commit). The peer's identity comes from its
/// certificate; a peer that claims to be someone else, or sends for a device it may not, is
/// refused and the session closed. See the [module documentation](super).
#[derive(Debug)]
pub struct Ingest {
    role: Role,
    common: Common,
    established: bool,
    streams: BTreeMap<DeviceId, InStream>,
    /// Devices this session talks about (the cloud syncs only these devices' shadows).
    known_devices: BTreeSet<DeviceId>,
    n_out_of_order: u64,
    n_duplicates: u64,
    /// The devices' keys when this end verifies signatures (the cloud does).
    keys: Option<Arc<DeviceKeys>>,
    /// What the `Welcome` told the client this end holds: a client that sends only that again
    /// replays.
    welcomed: VersionVector,
    /// Negotiated protocol version.
    protocol: u16,
    /// When the session started (the client's hello must come by `handshake_timeout_ms` after).
    started: Millis,
}

#[derive(Debug, Clone, Copy)]
enum Role {
    /// A gateway serving the device with this (authenticated) id.
    Gateway { device: DeviceId },
    /// The cloud serving the gateway with this (authenticated) id.
    Cloud { gateway: GatewayId },
}

#[derive(Debug, Default, Clone)]
struct InStream {
    /// Highest seq handed to the host (or covered before the session).
    accepted: Seq,
    /// Highest seq the host reported durable.
    durable: Seq,
    /// Highest seq acknowledged to the peer.
    acked: Seq,
    /// Highest commit relayed to the peer (gateway role).
    committed_sent: Seq,
    /// Known chain values (see [`crate::auth`]): at `durable` first, then after each accepted
    /// batch, ascending. Empty when unknown.
    chains: VecDeque<(Seq, ChainHash)>,
}

impl InStream {
    fn at(high: Seq, chain: Option<ChainHash>) -> Self {
        Self {
            accepted: high,
            durable: high,
            acked: high,
            committed_sent: Seq::ZERO,
            chains: chain.map(|chain| (high, chain)).into_iter().collect(),
        }
    }

    fn chain_at(&self, seq: Seq) -> Option<ChainHash> {
        self.chains.iter().find(|(at, _)| *at == seq).map(|(_, chain)| *chain)
    }
}

impl Ingest {
    /// A gateway's session with the device whose certificate names `device`.
    pub fn for_gateway(device: DeviceId, config: SessionConfig, now: Millis) -> Self {
        Self::new(Role::Gateway { device }, config, now)
    }

    /// The cloud's session with the gateway whose certificate names `gateway`.
    pub fn for_cloud(gateway: GatewayId, config: SessionConfig, now: Millis) -> Self {
        Self::new(Role::Cloud { gateway }, config, now)
    }

    fn new(role: Role, config: SessionConfig, now: Millis) -> Self {
        Self {
            role,
            common: Common::new(config, now),
            established: false,
            streams: BTreeMap::new(),
            known_devices: BTreeSet::new(),
            n_out_of_order: 0,
            n_duplicates: 0,
            keys: None,
            welcomed: VersionVector::new(),
            protocol: crate::wire::PROTOCOL_VERSION_MIN,
            started: now,
        }
    }

    /// Verifies every batch against the devices' keys before taking it (see [`crate::auth`]):
    /// a batch that fails is refused, reported as [`SessionEvent::Violation`], and the client is
    /// told to hold that device's events (nothing is acknowledged, nothing stored).
    pub fn verifying(mut self, keys: Arc<DeviceKeys>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// Replaces the keys (after a rotation or revocation) for batches from now on.
    pub fn set_keys(&mut self, keys: Arc<DeviceKeys>) {
        self.keys = Some(keys);
    }

    /// Whether the handshake is done and the session is open.
    pub fn is_established(&self) -> bool {
        self.established && !self.common.closed
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.common.closed
    }

    /// Batches dropped because they arrived after a gap (a lost frame), so far.
    pub fn n_out_of_order(&self) -> u64 {
        self.n_out_of_order
    }

    /// Batches that held nothing new, so far.
    pub fn n_duplicates(&self) -> u64 {
        self.n_duplicates
    }

    /// Handles a frame from the client. On error the session is closed and an error frame is
    /// queued for the client.
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
        result.map_err(|error| {
            if let SessionError::Unauthorized { reason } = &error {
                self.common.emit(SessionEvent::Unauthorized { reason: reason.clone() });
            }
            self.common.fail(error)
        })
    }

    fn dispatch<S: Store + ?Sized>(&mut self, now: Millis, frame: Frame, store: &mut S) -> Result<(), SessionError> {
        match (self.established, frame) {
            (false, Frame::Hello(hello)) => self.on_hello(now, hello, store),
            (true, Frame::Events(batch)) => self.on_events(batch, store),
            (true, Frame::ShadowSync(sync)) => {
                self.authorize(&sync.device)?;
                self.known_devices.insert(sync.device);
                self.common.receive_shadow(sync, store)
            }
            (_, Frame::KeepAlive(keep_alive)) => {
                self.common.emit(SessionEvent::PeerBacklog { backlog_events: keep_alive.backlog_events });
                Ok(())
            }
            (_, Frame::Goodbye(goodbye)) => {
                self.common.close(CloseReason::Goodbye(goodbye.reason));
                Ok(())
            }
            (_, Frame::Error(error)) => {
                tracing::warn!(code = ?error.code, message = %error.message, "client closed the session with an error");
                self.common.close(CloseReason::PeerError { code: error.code, message: error.message });
                Ok(())
            }
            (established, frame) => Err(SessionError::UnexpectedFrame {
                frame: frame.name(),
                state: if established { "established" } else { "waiting for hello" },
            }),
        }
    }

    fn authorize(&self, device: &DeviceId) -> Result<(), SessionError> {
        match self.role {
            Role::Gateway { device: own } if own != *device => {
                Err(SessionError::Unauthorized { reason: format!("device {own} sent a frame for device {device}") })
            }
            _ => Ok(()),
        }
    }

    fn on_hello<S: Store + ?Sized>(&mut self, now: Millis, hello: Hello, store: &mut S) -> Result<(), SessionError> {
        let protocol = negotiate(hello.protocol_min, hello.protocol_max)?;
        match (self.role, hello.peer) {
            (Role::Gateway { device }, Peer::Device(claimed)) if device == claimed => {}
            (Role::Cloud { gateway }, Peer::Gateway(claimed)) if gateway == claimed => {}
            (role, claimed) => {
                return Err(SessionError::Unauthorized {
                    reason: format!("peer authenticated as {role:?} says it is {claimed:?}"),
                })
            }
        }
        for (device, _) in hello.vv.iter() {
            self.authorize(device)?;
        }
        let devices: Vec<DeviceId> = match self.role {
            Role::Gateway { device } => vec![device],
            Role::Cloud { .. } => hello.vv.iter().map(|(device, _)| *device).collect(),
        };
        let mut vv = VersionVector::new();
        for device in devices {
            let high = store.high(&device);
            vv.set(device, high);
            self.streams.insert(device, InStream::at(high, store.chain_head(&device)));
            self.known_devices.insert(device);
        }
        self.welcomed = vv.clone();
        self.protocol = protocol;
        // Offer shadow sync: a gateway syncs its device's shadow, the cloud the shadows it keeps
        // of the devices this gateway serves.
        let kept: BTreeSet<DeviceId> = store.shadow_devices().into_iter().collect();
        for device in self.known_devices.clone() {
            if matches!(self.role, Role::Gateway { .. }) || kept.contains(&device) {
                self.common.mark_shadow_dirty(device);
            }
        }
        self.common.send(Frame::Welcome(Welcome { protocol, vv, wall: now }));
        self.established = true;
        self.common.emit(SessionEvent::Established { protocol, peer_wall: hello.wall });
        tracing::debug!(peer = ?hello.peer, protocol, "session established");
        Ok(())
    }

    fn on_events<S: Store + ?Sized>(&mut self, batch: EventBatch, store: &mut S) -> Result<(), SessionError> {
        self.authorize(&batch.device)?;
        if self.known_devices.insert(batch.device) {
            // A device first heard of in this session: the cloud offers the shadow it keeps of it,
            // so desired state set while the gateway did not serve the device flows down now.
            if matches!(self.role, Role::Cloud { .. }) && store.shadow_devices().contains(&batch.device) {
                self.common.mark_shadow_dirty(batch.device);
            }
        }
        let pending_events_max = self.common.config.pending_events_max as u64;
        let retry_after_ms = u32::try_from(self.common.config.retransmit_ms).unwrap_or(u32::MAX);
        let stream = self
            .streams
            .entry(batch.device)
            .or_insert_with(|| InStream::at(store.high(&batch.device), store.chain_head(&batch.device)));
        if batch.from > stream.accepted.next() {
            // An earlier batch was lost; the client will go back and resend from its last ack.
            self.n_out_of_order += 1;
            tracing::trace!(device = %batch.device, from = %batch.from, accepted = %stream.accepted, "out-of-order batch dropped");
            return Ok(());
        }
        let head = match &self.keys {
            None => None,
            Some(keys) => match check(keys, &batch, stream, self.welcomed.get(&batch.device), store) {
                Ok(head) => Some(head),
                Err(violation) => {
                    self.refuse(batch.device, violation);
                    return Ok(());
                }
            },
        };
        let Some(stream) = self.streams.get_mut(&batch.device) else {
            return Ok(());
        };
        let Some(fresh) = batch.after(stream.accepted) else {
            // All of it is here already: repeat the acknowledgement the client may have missed.
            self.n_duplicates += 1;
            if stream.durable >= batch.last_seq() {
                let ack = Ack { device: batch.device, up_to: stream.durable };
                self.common.send(self.ack_frame(ack));
            }
            return Ok(());
        };
        let pending = stream.accepted.0 - stream.durable.0 + fresh.events.len() as u64;
        if pending > pending_events_max {
            let up_to = stream.durable;
            stream.accepted = stream.durable;
            self.common.send(Frame::Backpressure(Backpressure {
                device: batch.device,
                up_to,
                retry_after_ms,
                reason: BackpressureReason::Busy,
            }));
            return Ok(());
        }
        stream.accepted = fresh.last_seq();
        if let Some(head) = head {
            let first = fresh.first_seq();
            stream.chains.retain(|(seq, _)| *seq < first);
            stream.chains.push_back((fresh.last_seq(), head));
        }
        self.common.emit(SessionEvent::EventsReceived(fresh));
        Ok(())
    }

    /// Refuses a batch that failed verification: reports it and tells the client to hold the
    /// device's events (they stay in its spool for an operator to look at).
    fn refuse(&mut self, device: DeviceId, violation: Violation) {
        let gateway = match self.role {
            Role::Cloud { gateway } => Some(gateway),
            Role::Gateway { .. } => None,
        };
        tracing::warn!(%device, ?gateway, %violation, "batch refused: verification failed");
        let Some(stream) = self.streams.get_mut(&device) else {
            return;
        };
        stream.accepted = stream.durable;
        let up_to = stream.durable;
        // A protocol-1 client does not know `Refused`; to it this is a long pause.
        let reason = if self.protocol >= 2 { BackpressureReason::Refused } else { BackpressureReason::Busy };
        let retry_after_ms = u32::try_from(self.common.config.refused_retry_ms).unwrap_or(u32::MAX);
        self.common.send(Frame::Backpressure(Backpressure { device, up_to, retry_after_ms, reason }));
        self.common.emit(SessionEvent::Violation { device, gateway, violation });
    }

    fn ack_frame(&self, ack: Ack) -> Frame {
        match self.role {
            Role::Gateway { .. } => Frame::Custody(ack),
            Role::Cloud { .. } => Frame::Commit(ack),
        }
    }

    /// The host made `device`'s events durable up to `high`: acknowledge them (custody from a
    /// gateway, commit from the cloud).
    pub fn handle_durable(&mut self, _now: Millis, device: DeviceId, high: Seq) {
        let Some(stream) = self.streams.get_mut(&device) else {
            return;
        };
        stream.durable = stream.durable.max(high);
        stream.accepted = stream.accepted.max(stream.durable);
        while stream.chains.get(1).is_some_and(|(seq, _)| *seq <= stream.durable) {
            stream.chains.pop_front();
        }
        if stream.durable > stream.acked && !self.common.closed {
            stream.acked = stream.durable;
            let ack = Ack { device, up_to: stream.durable };
            self.common.send(self.ack_frame(ack));
        }
    }

    /// The host could not store `device`'s events it was handed after `durable` (its store is
    /// full, or the device is over its rate): tell the client to keep them and retry later.
    pub fn handle_refused(&mut self, _now: Millis, device: DeviceId, reason: BackpressureReason, retry_after_ms: u32) {
        let Some(stream) = self.streams.get_mut(&device) else {
            return;
        };
        stream.accepted = stream.durable;
        let up_to = stream.durable;
        self.common.send(Frame::Backpressure(Backpressure { device, up_to, retry_after_ms, reason }));
    }

    /// (Gateway) The cloud committed `device`'s events up to `up_to`: tell the device, so it can
    /// prune them.
    pub fn handle_committed(&mut self, _now: Millis, device: DeviceId, up_to: Seq) {
        if let Role::Gateway { device: own } = self.role {
            if own != device || self.common.closed || !self.established {
                return;
            }
            let stream = self.streams.entry(device).or_default();
            if up_to > stream.committed_sent {
                stream.committed_sent = up_to;
                self.common.send(Frame::Commit(Ack { device, up_to }));
            }
        }
    }

    /// The shadow of `device` changed locally or through another session.
    pub fn handle_shadow_changed(&mut self, device: DeviceId) {
        let syncs = match self.role {
            Role::Gateway { device: own } => own == device,
            Role::Cloud { .. } => self.known_devices.contains(&device),
        };
        if syncs && self.established {
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

    /// The next frame to send.
    pub fn poll_transmit<S: Store + ?Sized>(&mut self, now: Millis, store: &mut S) -> Option<Frame> {
        if let Some(frame) = self.common.poll_transmit_queued(now) {
            return Some(frame);
        }
        if self.common.closed || !self.established {
            return None;
        }
        let frame = self.common.next_shadow_frame(store);
        if frame.is_some() {
            self.common.last_sent = now;
        }
        frame
    }

    /// The next event for the host.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.common.events.pop_front()
    }

    /// Keep-alives and the idle timeout.
    pub fn handle_timeout(&mut self, now: Millis) {
        if !self.established && self.common.handshake_overdue(now, self.started) {
            return;
        }
        self.common.handle_timeout_common(now, 0);
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let deadline = self.common.common_timeout()?;
        if self.established {
            return Some(deadline);
        }
        Some(deadline.min(self.started.plus_ms(self.common.config.handshake_timeout_ms)))
    }
}

/// Verifies `batch` for a stream that has accepted up to `stream.accepted`: its proof, that it
/// continues the chain held (also across a hole it starts with, where the hole proof's `before`
/// meets a chain value held), that what it repeats equals what is stored, and that it is not a
/// replay of what the client was welcomed with. Returns the chain value after the batch.
fn check<S: Store + ?Sized>(
    keys: &DeviceKeys,
    batch: &EventBatch,
    stream: &InStream,
    welcomed: Seq,
    store: &S,
) -> Result<ChainHash, Violation> {
    let held = stream.accepted;
    let expected = stream.chain_at(held);
    let verified = verify_batch(keys, batch, expected.map(|_| held))?;
    if let (Some(expected), Some(got)) = (expected, verified.at) {
        if expected != got {
            // Validly signed, yet not the history held: the device signed two.
            return Err(Violation::Equivocation { seq: held });
        }
    }
    if let Some((seq, before)) = verified.before {
        // Across a hole only the proof's `before` links the batch to what came earlier: where
        // this end knows the chain there, a different signed value is a second history (a cloned
        // key whose batch starts with a hole right after what the cloud holds).
        let known = if seq == Seq::ZERO { Some(ChainHash::genesis(&batch.device)) } else { stream.chain_at(seq) };
        if known.is_some_and(|known| known != before) {
            return Err(Violation::Equivocation { seq });
        }
    }
    if batch.last_seq() <= held {
        // Nothing new: what it repeats must be what is stored.
        if let Some(seq) = first_difference(batch, stream.durable, store) {
            return Err(Violation::Equivocation { seq });
        }
        if batch.last_seq() <= welcomed {
            return Err(Violation::Replay { last: batch.last_seq() });
        }
    }
    Ok(verified.head)
}

/// The first seq at or below `durable` where `batch` differs from the stored event, if any.
fn first_difference<S: Store + ?Sized>(batch: &EventBatch, durable: Seq, store: &S) -> Option<Seq> {
    let mut next = batch.first_seq();
    let mut events = batch.events.iter().take_while(|event| event.id.seq <= durable).peekable();
    while events.peek().is_some() {
        let Ok(Some(stored)) = store.read(&batch.device, next, crate::wire::BATCH_EVENTS_MAX) else {
            return None;
        };
        if stored.events.is_empty() {
            return None;
        }
        for held in &stored.events {
            // Skip what the store no longer has (a hole) or has beyond.
            while events.next_if(|event| event.id.seq < held.id.seq).is_some() {}
            match events.next_if(|event| event.id.seq == held.id.seq) {
                Some(event) if !same_event(event, held) => return Some(event.id.seq),
                Some(_) => {}
                None => return None,
            }
        }
        next = stored.last_seq().next();
    }
    None
}
