//! WebRTC peer connections for hyperties (`wit/media.wit`), kept by the
//! host with str0m, a sans-IO WebRTC stack.
//!
//! One str0m [`Rtc`] per peer connection, never in the guest. The host owns
//! each connection's UDP socket (bound to the domain's granted `bind`
//! address, on a port of its `ports`), feeds str0m the packets and the
//! time, and turns its outputs into socket writes and events for the
//! hyperty. One thread per domain that opened a connection runs a
//! current-thread tokio runtime with one task per connection, which waits
//! on its socket, str0m's next timeout and the hyperty's calls at once:
//! no busy loop.
//!
//! Candidates: the socket's host one (unless the domain's
//! `ice-transport-policy` is `relay`), a server-reflexive one per STUN
//! server of its `stun` setting ([`stun`]) and a relayed one per TURN
//! allocation on the servers of its `turn` setting ([`turn`]), whose
//! datagrams the task wraps and unwraps.
//!
//! Decision: events reach the hyperty as messages from the connection's
//! own address (`media://<domain>/<uuid>`), through the bus and the
//! domain's one inbox, rather than through a second export. One inbox
//! gives one order (a channel's data never overtakes the message that
//! told the hyperty about the channel), one back-pressure (`inbox-full`:
//! the event waits, and a connection whose hyperty does not keep up is
//! closed past `pending-events`), and the sandbox keeps one kind of
//! instance. The cost is JSON (and base64 for binary data) per event.
//!
//! Locks: a connection's state is behind a mutex taken briefly by the
//! hyperty's calls and by its task; neither ever holds it while calling a
//! guest, sending on the bus or waiting on the socket.

pub(crate) mod glue;
pub(crate) mod identity;
mod inbox;
pub mod settings;
mod stun;
mod track;
mod turn;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

pub use settings::MediaSettings;

use crate::address::Address;
use crate::bus::{Bus, SendError};
use crate::identity::Identities;
use crate::message::{Identity, Message, MessageType};
use crate::policy::cedar::CedarPolicies;
use crate::policy::{Decision, Descriptor};
use crate::sandbox::limits::{DomainMemory, RateLimiter};

/// The longest SDP text accepted from a hyperty, in bytes.
pub const MAX_SDP_BYTES: usize = 64 << 10;
/// The longest data-channel label, in bytes.
pub const MAX_LABEL_BYTES: usize = 1024;
/// How often events refused `inbox-full` are offered again.
const RETRY: Duration = Duration::from_millis(10);
/// A received UDP datagram larger than this is not WebRTC (str0m's MTU is
/// at most 1500 bytes of payload).
const MAX_DATAGRAM: usize = 2048;

/// Why a call was refused; the WIT's `media-error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MediaError {
    #[error("malformed SDP: {0}")]
    MalformedSdp(String),
    #[error("no open channel {0}")]
    NoSuchChannel(u32),
    #[error("not granted: {0}")]
    NotGranted(String),
    #[error("limit reached: {0}")]
    LimitReached(String),
    #[error("denied: {0}")]
    Denied(String),
    #[error("closed: {0}")]
    Closed(String),
    #[error("invalid: {0}")]
    Invalid(String),
}

/// What a domain's connections hold together: how many are open (each
/// with its socket) and the bytes a second they send.
struct Held {
    open: Mutex<u32>,
    bytes: Mutex<RateLimiter>,
    /// `media-bytes-per-second`.
    media: Mutex<RateLimiter>,
    /// `opens-per-minute`: 60 tokens an open, `opens-per-minute` a second.
    opens: Mutex<RateLimiter>,
    /// Received frames waiting in the hyperty's inbox (`pending-frames`).
    frames: inbox::InboxFrames,
}

/// A connection's place in its domain's `peer-connections`, given back
/// when its task ends (its socket closed with it).
struct Place(Arc<Held>);

impl Drop for Place {
    fn drop(&mut self) {
        *self.0.open.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
    }
}

/// The media of one domain sandbox: its grant, what its connections hold
/// and the thread that drives them (started with the first connection).
pub(crate) struct DomainMedia {
    domain: String,
    settings: Option<Arc<MediaSettings>>,
    held: Arc<Held>,
    driver: Mutex<Option<Driver>>,
    policies: Arc<CedarPolicies>,
    /// The IdP proxies that bind and check fingerprints (`identity`).
    identities: Arc<Identities>,
}

impl DomainMedia {
    /// `settings`: the domain's `media` table, `None` when not granted;
    /// `memory`: the domain's, of which it may hold `total_memory` bytes
    /// (`total-memory-mb`), charged with the frames waiting in its inbox.
    pub fn new(
        domain: &str,
        settings: Option<MediaSettings>,
        memory: Arc<DomainMemory>,
        total_memory: usize,
        policies: Arc<CedarPolicies>,
        identities: Arc<Identities>,
    ) -> DomainMedia {
        let rate = settings.as_ref().map_or(1, |s| s.bytes_per_second);
        let media = settings.as_ref().map_or(1, |s| s.media_bytes_per_second);
        let opens = settings.as_ref().map_or(1, |s| s.opens_per_minute);
        let held = Held {
            open: Mutex::new(0),
            bytes: Mutex::new(RateLimiter::new(rate, rate)),
            media: Mutex::new(RateLimiter::new(media, media)),
            opens: Mutex::new(RateLimiter::new(opens, opens.saturating_mul(60))),
            frames: inbox::InboxFrames::new(memory, total_memory),
        };
        DomainMedia {
            domain: domain.to_owned(),
            settings: settings.map(Arc::new),
            held: Arc::new(held),
            driver: Mutex::default(),
            policies,
            identities,
        }
    }

    /// Asks the domain's policies whether the hyperty (`owner`,
    /// `descriptor`) may do `action` (`media-open`, `media-accept`) on
    /// `connection` with the peer named `remote`, whose identity (checked
    /// by `set-remote-identity`) is `remote_identity`.
    fn authorize(
        &self,
        action: &str,
        owner: &Address,
        descriptor: &Descriptor,
        connection: &Address,
        remote: Option<(&str, Option<&Descriptor>)>,
        remote_identity: Option<&Identity>,
    ) -> Result<(), MediaError> {
        match self.policies.authorize_media(action, owner, descriptor, connection, remote, remote_identity) {
            Decision::Permit => Ok(()),
            Decision::Deny { policies, reason } => Err(MediaError::Denied(format!(
                "{action} {reason} by the policies of {} [{}]",
                self.domain,
                policies.join(", ")
            ))),
        }
    }

    /// Opens a peer connection for the hyperty at `owner`; its events go
    /// to `owner` on `bus`.
    fn open(&self, owner: &Address, descriptor: &Arc<Descriptor>, bus: &Bus, remote: Option<&str>) -> Result<PeerConnection, MediaError> {
        let Some(settings) = self.settings.clone() else {
            return Err(MediaError::NotGranted(format!("{} is not granted `media` (grants and a `media` table in its bundle)", self.domain)));
        };
        // Kept with the connection (asked again at accept-answer).
        if let Some(remote) = remote.filter(|r| r.len() > MAX_LABEL_BYTES) {
            return Err(MediaError::Invalid(format!("a remote name of {} bytes; at most {MAX_LABEL_BYTES}", remote.len())));
        }
        let address = Address::parse(format!("media://{}/{}", self.domain, uuid::Uuid::new_v4())).expect("a valid address");
        let remote_descriptor = remote.and_then(|r| Address::parse(r).ok()).and_then(|r| bus.descriptor_of(&r));
        self.authorize("media-open", owner, descriptor, &address, remote.map(|r| (r, remote_descriptor.as_deref())), None)?;
        let place = {
            let mut open = self.held.open.lock().unwrap_or_else(PoisonError::into_inner);
            if *open >= settings.peer_connections {
                return Err(MediaError::LimitReached(format!(
                    "peer-connections: {} holds {open} open (peer-connections = {})",
                    self.domain, settings.peer_connections
                )));
            }
            // Each connection may call the IdP proxy (an assertion, a remote
            // identity): opening is what bounds how often.
            if !self.held.opens.lock().unwrap_or_else(PoisonError::into_inner).take_n(60.0) {
                return Err(MediaError::LimitReached(format!(
                    "opens-per-minute: {} opens peer connections faster than {} a minute (opens-per-minute = {})",
                    self.domain, settings.opens_per_minute, settings.opens_per_minute
                )));
            }
            *open += 1;
            Place(self.held.clone())
        };
        let socket = bind(&settings)?;
        let local = socket.local_addr().map_err(|e| MediaError::Invalid(format!("the socket has no address: {e}")))?;
        let mut rtc = Rtc::builder()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .set_sctp_max_message_size(settings.message_bytes)
            .build(Instant::now());
        // `ice-transport-policy = "relay"`: no host candidate, only relayed ones.
        let mut candidates = Vec::new();
        if !settings.relay_only {
            let host = Candidate::host(local, "udp").map_err(|e| MediaError::Invalid(format!("no host candidate for {local}: {e}")))?;
            candidates.extend(rtc.add_local_candidate(host).map(|c| c.to_sdp_string()));
        }
        let fingerprint = rtc.direct_api().local_dtls_fingerprint().to_string();
        let conn = Arc::new(Conn {
            address,
            remote: remote.map(str::to_owned),
            settings: settings.clone(),
            held: self.held.clone(),
            fingerprint,
            state: Mutex::new(State {
                rtc,
                pending_offer: None,
                unoffered: Vec::new(),
                negotiated: false,
                remote_sdp_seen: false,
                local_ids: HashMap::new(),
                open: HashMap::new(),
                next_channel: 1,
                tracks: track::Tracks::default(),
                stash: VecDeque::new(),
                closed: None,
                remote_identity: None,
                local_assertion: None,
                candidates,
                permit: Vec::new(),
            }),
            wake: tokio::sync::Notify::new(),
        });
        let (handle, shutdown) = self.driver()?;
        let socket = {
            let _entered = handle.enter();
            tokio::net::UdpSocket::from_std(socket).map_err(|e| MediaError::Invalid(format!("cannot drive the socket: {e}")))?
        };
        let sink = Sink { bus: bus.clone(), owner: owner.clone(), descriptor: descriptor.clone(), next_id: 0 };
        tracing::info!(domain = %self.domain, connection = %conn.address, %local, "peer connection opened for {owner}");
        handle.spawn(drive(conn.clone(), socket, sink, place, shutdown));
        Ok(PeerConnection { conn })
    }

    /// How many peer connections the domain holds (each with its socket).
    pub fn open_connections(&self) -> u32 {
        *self.held.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The sandbox took `message` from the domain's inbox (hook of its
    /// loop): a connection's frames sent up to it no longer wait there.
    pub fn taken(&self, message: &Message) {
        self.held.frames.taken(message);
    }


    /// The runtime of the domain's media thread, started on first use,
    /// and what tells a task that the thread stops.
    fn driver(&self) -> Result<(tokio::runtime::Handle, Shutdown), MediaError> {
        let mut driver = self.driver.lock().unwrap_or_else(PoisonError::into_inner);
        if driver.is_none() {
            let d = Driver::start(&self.domain).map_err(|e| MediaError::LimitReached(format!("cannot start the media thread: {e}")))?;
            *driver = Some(d);
        }
        let d = driver.as_ref().expect("started");
        Ok((d.handle.clone(), d.shutdown.clone().expect("until dropped")))
    }
}

/// A socket on the domain's `bind` address, on the first free port of
/// its range.
fn bind(settings: &MediaSettings) -> Result<UdpSocket, MediaError> {
    for port in settings.ports.clone() {
        if let Ok(socket) = UdpSocket::bind((settings.bind, port)) {
            socket.set_nonblocking(true).map_err(|e| MediaError::Invalid(format!("cannot use the socket: {e}")))?;
            track::size_receive_buffer(&socket);
            return Ok(socket);
        }
    }
    Err(MediaError::LimitReached(format!(
        "ports: no free UDP port on {} in {}-{}",
        settings.bind,
        settings.ports.start(),
        settings.ports.end()
    )))
}

/// The domain's media thread: a current-thread tokio runtime that runs
/// until the domain's sandbox goes away; then every connection is closed
/// and its task given at most [`DRAIN`] to release its TURN allocations
/// before it is dropped with its socket.
struct Driver {
    handle: tokio::runtime::Handle,
    /// Cloned into each task: changes when the thread stops; the thread
    /// waits (at most [`DRAIN`]) until every clone is dropped.
    shutdown: Option<Shutdown>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What tells a connection's task that the domain's media thread stops.
type Shutdown = tokio::sync::watch::Receiver<()>;

/// The longest the media thread waits, once stopped, for its tasks to end
/// (a closed connection releases its TURN allocations).
const DRAIN: Duration = Duration::from_millis(turn::RELEASE_WITHIN.as_millis() as u64 + 500);

impl Driver {
    fn start(domain: &str) -> std::io::Result<Driver> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tell, shutdown) = tokio::sync::watch::channel(());
        let thread = std::thread::Builder::new().name(format!("media {domain}")).spawn(move || {
            runtime.block_on(async move {
                let _ = stopped.await;
                let _ = tell.send(());
                let _ = tokio::time::timeout(DRAIN, tell.closed()).await;
            });
        })?;
        Ok(Driver { handle, shutdown: Some(shutdown), stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        drop(self.shutdown.take());
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// The host side of a `peer-connection` handle (public only because the
/// bindings name it); dropping it (the guest
/// dropped the handle, or its store went away after a trap or removal)
/// closes the connection and frees its socket.
pub struct PeerConnection {
    conn: Arc<Conn>,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        self.conn.close("its hyperty dropped it (closed, removed, stopped or trapped)");
    }
}

/// One connection, shared by its handle and its task.
struct Conn {
    address: Address,
    /// The peer named when it was opened, if any.
    remote: Option<String>,
    settings: Arc<MediaSettings>,
    held: Arc<Held>,
    fingerprint: String,
    state: Mutex<State>,
    /// Tells the task that the state changed (a call, a close).
    wake: tokio::sync::Notify,
}

struct State {
    rtc: Rtc,
    pending_offer: Option<SdpPendingOffer>,
    /// Channels opened before the first offer, which will carry them.
    unoffered: Vec<(u32, ChannelConfig)>,
    /// An offer/answer exchange completed: channels open in-band.
    negotiated: bool,
    /// A remote SDP was handed to str0m, whether or not it was accepted:
    /// str0m keeps the first remote fingerprint it sees even from an SDP it
    /// then refuses, so no remote identity may be set after it.
    remote_sdp_seen: bool,
    /// Ids of channels opened here, until str0m says they are open.
    local_ids: HashMap<ChannelId, u32>,
    /// Open channels by their id.
    open: HashMap<u32, ChannelId>,
    next_channel: u32,
    tracks: track::Tracks,
    /// str0m's outputs taken after a media write, for the task (first).
    stash: VecDeque<Output>,
    /// Why it closed, once it has.
    closed: Option<String>,
    /// The remote's identity, checked (`set-remote-identity`).
    remote_identity: Option<identity::RemoteIdentity>,
    /// This side's identity assertion: its text, when it was made and when
    /// it expires (Unix seconds).
    local_assertion: Option<(String, u64, u64)>,
    /// The local candidates as SDP attribute values: the host one (unless
    /// relay-only), then those learnt from the domain's STUN and TURN
    /// servers.
    candidates: Vec<String>,
    /// Remote IPs (within `peers`) the TURN allocations are to permit, for
    /// the task; at most [`turn::MAX_PERMISSIONS`].
    permit: Vec<IpAddr>,
}

impl State {
    fn channels(&self) -> usize {
        self.unoffered.len() + self.local_ids.len() + self.open.len()
    }

    fn id_of(&self, cid: ChannelId) -> Option<u32> {
        self.open.iter().find(|(_, c)| **c == cid).map(|(id, _)| *id)
    }

    /// Asks the connection's TURN allocations to permit `ips` (remote
    /// candidates' addresses, already within `peers`).
    fn want_permissions(&mut self, settings: &MediaSettings, ips: impl IntoIterator<Item = IpAddr>) {
        if settings.turn.is_empty() {
            return;
        }
        for ip in ips {
            if !self.permit.contains(&ip) && self.permit.len() < turn::MAX_PERMISSIONS {
                self.permit.push(ip);
            }
        }
    }
}

impl Conn {
    /// The connection's state, or `Closed` once it has closed. A panic
    /// inside the WebRTC stack while it held the state (a poisoned lock)
    /// closes the connection instead of taking the domain's thread down.
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, MediaError> {
        let state = self.state.lock().unwrap_or_else(|poisoned| {
            let mut state = poisoned.into_inner();
            if state.closed.is_none() {
                state.closed = Some("the WebRTC stack failed (a panic while it held the connection)".into());
            }
            state
        });
        self.state.clear_poison();
        if let Some(why) = &state.closed {
            return Err(MediaError::Closed(why.clone()));
        }
        Ok(state)
    }

    fn close(&self, why: &str) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.closed.is_none() {
            state.closed = Some(why.to_owned());
            state.rtc.disconnect();
        }
        drop(state);
        self.unlink();
        self.wake.notify_one();
    }

    /// The SDP `text` from the hyperty, checked: its size, that it parses,
    /// that it offers a transport this host can use (ICE credentials, a
    /// DTLS fingerprint, a data channel or media section), with the candidates
    /// outside the domain's `peers` (or not addresses, like mDNS names)
    /// left out.
    fn checked_sdp(&self, text: &str) -> Result<(String, Vec<IpAddr>), MediaError> {
        if text.len() > MAX_SDP_BYTES {
            return Err(MediaError::MalformedSdp(format!("{} bytes, the limit is {MAX_SDP_BYTES}", text.len())));
        }
        let mut kept = String::with_capacity(text.len());
        let mut ips = Vec::new();
        for line in text.split_inclusive('\n') {
            if let Some(attr) = line.trim_end().strip_prefix("a=candidate:") {
                match Candidate::from_sdp_string(&format!("candidate:{attr}")) {
                    Ok(c) if self.settings.allows_peer(c.addr().ip()) => ips.push(c.addr().ip()),
                    Ok(c) => {
                        tracing::debug!(connection = %self.address, "candidate {} outside the domain's peers left out", c.addr());
                        continue;
                    }
                    Err(_) => continue,
                }
            }
            kept.push_str(line);
        }
        let has = |prefix: &str| kept.lines().any(|l| l.trim_start().starts_with(prefix));
        let missing = [("a=ice-ufrag:", "ICE credentials (a=ice-ufrag)"), ("a=fingerprint:", "DTLS fingerprint (a=fingerprint)")]
            .into_iter()
            .find(|(p, _)| !has(p));
        let data = kept.lines().any(|l| {
            (l.starts_with("m=application") && l.contains("DTLS/SCTP"))
                || ((l.starts_with("m=audio") || l.starts_with("m=video")) && l.contains("UDP/TLS/RTP/SAVPF"))
        });
        match (missing, data) {
            (Some((_, what)), _) => Err(MediaError::MalformedSdp(format!("it offers no usable transport: no {what}"))),
            (None, false) => Err(MediaError::MalformedSdp(
                "it offers no usable transport: no data channel or media section (m=application ... UDP/DTLS/SCTP webrtc-datachannel, m=audio or m=video ... UDP/TLS/RTP/SAVPF)".into(),
            )),
            (None, true) => Ok((kept, ips)),
        }
    }

    fn create_offer(&self) -> Result<String, MediaError> {
        let mut guard = self.lock()?;
        if guard.pending_offer.is_some() {
            return Err(MediaError::Invalid("an offer is already waiting for its answer".into()));
        }
        let state = &mut *guard;
        let unoffered = std::mem::take(&mut state.unoffered);
        let mut api = state.rtc.sdp_api();
        let mut ids = Vec::new();
        for (id, config) in unoffered {
            ids.push((api.add_channel_with_config(config), id));
        }
        state.tracks.offer(&mut api);
        let Some((offer, pending)) = api.apply() else {
            return Err(MediaError::Invalid("nothing to offer: open a channel or add a track first".into()));
        };
        state.local_ids.extend(ids);
        state.pending_offer = Some(pending);
        drop(guard);
        self.wake.notify_one();
        Ok(offer.to_sdp_string())
    }

    fn accept_offer(&self, text: &str) -> Result<String, MediaError> {
        let (text, ips) = self.checked_sdp(text)?;
        let offer = SdpOffer::from_sdp_string(&text).map_err(|e| MediaError::MalformedSdp(e.to_string()))?;
        let state = self.lock()?;
        if state.pending_offer.is_some() {
            return Err(MediaError::Invalid("this connection's own offer is waiting for its answer".into()));
        }
        let mut state = self.check_remote_identity(state, &text)?;
        state.remote_sdp_seen = true;
        let answer = state.rtc.sdp_api().accept_offer(offer).map_err(|e| MediaError::MalformedSdp(e.to_string()))?;
        state.negotiated = true;
        state.want_permissions(&self.settings, ips);
        drop(state);
        self.wake.notify_one();
        Ok(answer.to_sdp_string())
    }

    fn accept_answer(&self, text: &str) -> Result<(), MediaError> {
        let (text, ips) = self.checked_sdp(text)?;
        let answer = SdpAnswer::from_sdp_string(&text).map_err(|e| MediaError::MalformedSdp(e.to_string()))?;
        let state = self.lock()?;
        if state.pending_offer.is_none() {
            return Err(MediaError::Invalid("no offer is waiting for an answer".into()));
        }
        let mut state = self.check_remote_identity(state, &text)?;
        let pending = state.pending_offer.take().ok_or_else(|| MediaError::Invalid("no offer is waiting for an answer".into()))?;
        state.remote_sdp_seen = true;
        state.rtc.sdp_api().accept_answer(pending, answer).map_err(|e| MediaError::MalformedSdp(e.to_string()))?;
        state.negotiated = true;
        state.want_permissions(&self.settings, ips);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// The local candidates: the host one (unless relay-only), then those
    /// learnt from STUN and TURN servers.
    fn local_candidates(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).candidates.clone()
    }

    /// Adds a local `candidate` learnt from a server (a STUN server's view of
    /// the socket, a TURN server's relayed address); its SDP attribute
    /// value, `None` when str0m finds it redundant (no NAT: a
    /// server-reflexive address that is the host candidate).
    fn add_local(&self, candidate: Candidate) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let sdp = state.rtc.add_local_candidate(candidate)?.to_sdp_string();
        state.candidates.push(sdp.clone());
        Some(sdp)
    }

    /// The remote IPs the TURN allocations are to permit, taken.
    fn take_permissions(&self) -> Vec<IpAddr> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner).permit)
    }

    /// A datagram from `source` on the connection's socket at `local`: a
    /// STUN server's answer to a Binding request (its event, if it gave a
    /// new candidate), else a packet for str0m if `source` is among the
    /// domain's `peers`.
    fn received(&self, data: &[u8], source: SocketAddr, local: SocketAddr, bindings: &mut [stun::Binding]) -> Option<Value> {
        if let Some(binding) = bindings.iter_mut().find(|b| b.server == source) {
            match binding.answer(data) {
                stun::Answer::NotOurs => {}
                stun::Answer::Mapped(mapped) => {
                    let Some(candidate) = Candidate::server_reflexive(mapped, local, "udp").ok().and_then(|c| self.add_local(c)) else {
                        tracing::debug!(connection = %self.address, "STUN server {source} sees {mapped}: the host candidate already");
                        return None;
                    };
                    tracing::info!(connection = %self.address, "server-reflexive candidate {mapped} learnt from STUN server {source}");
                    return Some(json!({ "event": "local-candidate", "candidate": candidate }));
                }
                stun::Answer::Refused(why) => {
                    tracing::info!(connection = %self.address, "{why}");
                    return None;
                }
            }
        }
        if !self.settings.allows_peer(source.ip()) {
            tracing::debug!(connection = %self.address, "datagram from {source}, outside the domain's peers, dropped");
            return None;
        }
        if self.settings.relay_only {
            tracing::debug!(connection = %self.address, "datagram from {source} not through a TURN relay, dropped (ice-transport-policy = relay)");
            return None;
        }
        self.receive(data, source, local);
        None
    }

    /// Gives str0m `data`, received from `source` on the local candidate
    /// `destination` (the socket's, or a relayed address).
    fn receive(&self, data: &[u8], source: SocketAddr, destination: SocketAddr) {
        if let Ok(contents) = data.try_into() {
            self.input(Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination, contents }));
        }
    }

    /// What a TURN allocation of the socket at `local` told: a relayed
    /// address (its `local-candidate` event), or that its server is given
    /// up on (logged; a relay-only connection left with no allocation,
    /// `none_left`, closes with the reason).
    fn allocation_step(&self, step: turn::Step, local: SocketAddr, none_left: bool) -> Option<Value> {
        match step {
            turn::Step::Relayed(relayed) => {
                let candidate = Candidate::relayed(relayed, local, "udp").ok().and_then(|c| self.add_local(c))?;
                tracing::info!(connection = %self.address, "relayed candidate {relayed} allocated on a TURN server");
                Some(json!({ "event": "local-candidate", "candidate": candidate }))
            }
            turn::Step::Failed(why) => {
                tracing::info!(connection = %self.address, "{why}");
                if self.settings.relay_only && none_left {
                    self.close(&format!("no TURN relay is left and ice-transport-policy is relay: {why}"));
                }
                None
            }
        }
    }

    fn add_remote_candidate(&self, text: &str) -> Result<(), MediaError> {
        let attr = text.trim().trim_start_matches("a=");
        if attr.len() > 1024 {
            return Err(MediaError::Invalid(format!("a candidate of {} bytes", attr.len())));
        }
        let candidate = Candidate::from_sdp_string(attr).map_err(|e| MediaError::Invalid(format!("not an ICE candidate ({e}): {attr:?}")))?;
        let ip = candidate.addr().ip();
        if !self.settings.allows_peer(ip) {
            return Err(MediaError::NotGranted(format!("{ip} is outside the domain's media peers")));
        }
        let mut state = self.lock()?;
        state.rtc.add_remote_candidate(candidate);
        state.want_permissions(&self.settings, [ip]);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    fn open_channel(&self, label: String, ordered: bool) -> Result<u32, MediaError> {
        if label.len() > MAX_LABEL_BYTES {
            return Err(MediaError::Invalid(format!("a label of {} bytes; at most {MAX_LABEL_BYTES}", label.len())));
        }
        let mut state = self.lock()?;
        let max = self.settings.channels;
        if state.channels() >= max as usize {
            return Err(MediaError::LimitReached(format!("channels: the connection has {} (channels = {max})", state.channels())));
        }
        let id = state.next_channel;
        state.next_channel += 1;
        let config = ChannelConfig { label, ordered, ..ChannelConfig::default() };
        if state.negotiated {
            let cid = state.rtc.direct_api().create_data_channel(config);
            state.local_ids.insert(cid, id);
        } else {
            state.unoffered.push((id, config));
        }
        drop(state);
        self.wake.notify_one();
        Ok(id)
    }

    fn send(&self, channel: u32, binary: bool, data: &[u8]) -> Result<(), MediaError> {
        let max = self.settings.message_bytes;
        if data.len() > max as usize {
            return Err(MediaError::LimitReached(format!("message-bytes: {} bytes, the limit is {max}", data.len())));
        }
        let mut state = self.lock()?;
        let cid = *state.open.get(&channel).ok_or(MediaError::NoSuchChannel(channel))?;
        let mut bytes = self.held.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        if !bytes.has(data.len() as f64) {
            return Err(MediaError::LimitReached(format!(
                "bytes-per-second: the domain sends more than {} bytes a second",
                self.settings.bytes_per_second
            )));
        }
        let mut ch = state.rtc.channel(cid).ok_or(MediaError::NoSuchChannel(channel))?;
        match ch.write(binary, data) {
            Ok(true) => {}
            Ok(false) => {
                return Err(MediaError::LimitReached("the channel's send buffer is full: wait for `buffered-low`".into()));
            }
            Err(e) => return Err(MediaError::Invalid(format!("cannot send: {e}"))),
        }
        bytes.take_n(data.len() as f64);
        drop(bytes);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Takes str0m's outputs: datagrams to send, events for the hyperty,
    /// and when it next needs the time.
    fn poll(&self, out: &mut Polled) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let output = match state.stash.pop_front() {
                Some(stashed) => Ok(stashed),
                None => state.rtc.poll_output(),
            };
            match output {
                Ok(Output::Transmit(t)) => out.transmits.push((t.source, t.destination, Vec::from(t.contents))),
                Ok(Output::Timeout(at)) => {
                    out.deadline = at;
                    break;
                }
                Ok(Output::Event(event)) => {
                    if let Some(event) = self.track_event(&mut state, event, out)
                        && let Some(value) = self.event(&mut state, event)
                    {
                        out.events.push(value);
                    }
                }
                Err(e) => {
                    let why = format!("the WebRTC stack failed: {e}");
                    if state.closed.is_none() {
                        state.closed = Some(why);
                    }
                    break;
                }
            }
            if state.closed.is_some() {
                break;
            }
        }
        if let Some(at) = state.tracks.due_stats(Instant::now(), &mut out.events) {
            out.deadline = out.deadline.min(at);
        }
        out.closed = state.closed.clone();
    }

    /// An str0m event in the hyperty's terms (see `wit/media.wit`); `None`
    /// for those it is not told about.
    fn event(&self, state: &mut State, event: Event) -> Option<Value> {
        match event {
            Event::Connected => {
                // DTLS is up with the certificate str0m checked against the
                // remote fingerprint it kept: that one must be bound too.
                if let Some(remote) = &state.remote_identity
                    && let Err(why) = remote.check_connected(state.rtc.direct_api().remote_dtls_fingerprint().map(ToString::to_string))
                {
                    if state.closed.is_none() {
                        state.closed = Some(why);
                    }
                    return None;
                }
                let identity = state.remote_identity.as_ref().map(identity::RemoteIdentity::to_json);
                Some(json!({ "event": "connected", "identity": identity }))
            }
            Event::IceConnectionStateChange(s) => {
                let name = match s {
                    IceConnectionState::New => "new",
                    IceConnectionState::Checking => "checking",
                    IceConnectionState::Connected => "connected",
                    IceConnectionState::Completed => "completed",
                    IceConnectionState::Disconnected => "disconnected",
                };
                if s == IceConnectionState::Disconnected && state.closed.is_none() {
                    state.closed = Some("the peer stopped answering (ICE disconnected)".into());
                }
                Some(json!({ "event": "ice-state", "state": name }))
            }
            Event::ChannelOpen(cid, label) => {
                let id = match state.local_ids.remove(&cid) {
                    Some(id) => id,
                    None if state.channels() >= self.settings.channels as usize => {
                        tracing::info!(connection = %self.address, "a channel the remote opened is over the domain's channels limit: closed");
                        state.rtc.direct_api().close_data_channel(cid);
                        return None;
                    }
                    None => {
                        state.next_channel += 1;
                        state.next_channel - 1
                    }
                };
                state.open.insert(id, cid);
                if let Some(mut ch) = state.rtc.channel(cid) {
                    ch.set_buffered_amount_low_threshold(self.settings.message_bytes as usize);
                }
                Some(json!({ "event": "channel-open", "channel": id, "label": label }))
            }
            Event::ChannelData(d) => {
                let id = state.id_of(d.id)?;
                let limit = self.settings.message_bytes as usize;
                if d.data.len() > limit {
                    return Some(json!({ "event": "message-refused", "channel": id, "bytes": d.data.len(), "limit": limit }));
                }
                match (d.binary, String::from_utf8(d.data)) {
                    (false, Ok(text)) => Some(json!({ "event": "channel-data", "channel": id, "text": text })),
                    (_, Ok(text)) => Some(channel_bytes(id, text.as_bytes())),
                    (_, Err(e)) => Some(channel_bytes(id, e.as_bytes())),
                }
            }
            Event::ChannelBufferedAmountLow(cid) => Some(json!({ "event": "buffered-low", "channel": state.id_of(cid)? })),
            Event::ChannelClose(cid) => {
                let id = state.id_of(cid)?;
                state.open.remove(&id);
                Some(json!({ "event": "channel-closed", "channel": id }))
            }
            _ => None,
        }
    }

    fn input(&self, input: Input<'_>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = state.rtc.handle_input(input)
            && state.closed.is_none()
        {
            state.closed = Some(format!("the WebRTC stack failed: {e}"));
        }
    }
}

fn channel_bytes(id: u32, data: &[u8]) -> Value {
    json!({ "event": "channel-data", "channel": id, "bytes": base64::engine::general_purpose::STANDARD.encode(data) })
}

/// What one poll of str0m gave.
struct Polled {
    /// Datagrams: from (a local candidate), to, contents.
    transmits: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    events: Vec<Value>,
    /// Forwarded frames and keyframe requests between connections.
    relays: Vec<track::Relay>,
    deadline: Instant,
    closed: Option<String>,
}

/// Where a connection's events go: messages from its address to its
/// hyperty, sent on behalf of that hyperty (its descriptor, for policies).
struct Sink {
    bus: Bus,
    owner: Address,
    descriptor: Arc<Descriptor>,
    next_id: u64,
}

impl Sink {
    fn message(&mut self, from: &Address, value: &Value) -> Message {
        self.next_id += 1;
        Message::new(self.next_id, MessageType::Update, from.clone(), self.owner.clone(), Some(value.to_string()))
    }
}

/// A connection's task: feeds str0m the socket's packets (from the
/// domain's `peers` only) and the time, sends what it says, hands its
/// events to the hyperty in order, and ends (freeing the socket and the
/// domain's place) once the connection is closed.
async fn drive(conn: Arc<Conn>, socket: tokio::net::UdpSocket, mut sink: Sink, place: Place, mut shutdown: Shutdown) {
    let local = socket.local_addr().expect("a bound socket");
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // Events waiting for room in the inbox, with the track of frames.
    let mut outbox: VecDeque<(Message, Option<u32>)> = VecDeque::new();
    let mut polled = Polled { transmits: Vec::new(), events: Vec::new(), relays: Vec::new(), deadline: Instant::now(), closed: None };
    // Relay-only: no server-reflexive candidate either.
    let stun_servers = if conn.settings.relay_only { &[][..] } else { &conn.settings.stun[..] };
    let mut bindings: Vec<stun::Binding> = stun_servers.iter().map(|&server| stun::Binding::new(server)).collect();
    let mut allocations: Vec<turn::Allocation> = conn.settings.turn.iter().map(|server| turn::Allocation::new(server, local)).collect();
    let mut to_server = Vec::new();
    loop {
        for binding in &mut bindings {
            let server = binding.server;
            match binding.poll(Instant::now()) {
                Ok(Some(request)) => {
                    if let Err(e) = socket.send_to(request, server).await {
                        tracing::debug!(connection = %conn.address, "cannot send to STUN server {server}: {e}");
                    }
                }
                Ok(None) => {}
                Err(why) => tracing::info!(connection = %conn.address, "{why}"),
            }
        }
        let now = Instant::now();
        let permits = conn.take_permissions();
        let mut steps = Vec::new();
        for allocation in &mut allocations {
            for &ip in &permits {
                allocation.permit(ip, now);
            }
            steps.extend(allocation.poll(now, &mut to_server));
            for data in to_server.drain(..) {
                if let Err(e) = socket.send_to(&data, allocation.server).await {
                    tracing::debug!(connection = %conn.address, "cannot send to TURN server {}: {e}", allocation.server);
                }
            }
        }
        let none_left = allocations.iter().all(turn::Allocation::is_gone);
        for step in steps {
            polled.events.extend(conn.allocation_step(step, local, none_left));
        }
        conn.poll(&mut polled);
        for (from, to, data) in polled.transmits.drain(..) {
            if !conn.settings.allows_peer(to.ip()) {
                tracing::debug!(connection = %conn.address, "nothing is sent to {to}, outside the domain's peers");
                continue;
            }
            // From a relayed candidate: through its TURN server, wrapped.
            let (data, to) = match allocations.iter_mut().find(|a| a.relayed() == Some(from)) {
                Some(allocation) => match allocation.wrap(to, &data, now) {
                    Some(wrapped) => (wrapped, allocation.server),
                    None => continue,
                },
                // A relayed candidate's, its allocation gone: never from the host's socket.
                None if conn.settings.relay_only || from != local => continue,
                None => (data, to),
            };
            if let Err(e) = socket.send_to(&data, to).await {
                tracing::debug!(connection = %conn.address, "cannot send to {to}: {e}");
            }
        }
        for relay in polled.relays.drain(..) {
            conn.relay(relay);
        }
        for event in polled.events.drain(..) {
            // Media never waits behind other events: dropped, counted.
            let frame = frame_of(&event);
            if let Some(track) = frame
                && !outbox.is_empty()
            {
                conn.count_dropped(track);
                continue;
            }
            let m = sink.message(&conn.address, &event);
            outbox.push_back((m, frame));
        }
        if let Some(why) = polled.closed.take() {
            let m = sink.message(&conn.address, &json!({ "event": "closed", "reason": why }));
            outbox.push_back((m, None));
            deliver(&sink, &mut outbox, &conn);
            tracing::info!(connection = %conn.address, "peer connection closed: {why}");
            // Closed by the stack or the peer (ICE disconnected): its
            // forwards end as with `close`.
            conn.unlink();
            break;
        }
        deliver(&sink, &mut outbox, &conn);
        if outbox.len() > conn.settings.pending_events as usize {
            conn.close(&format!(
                "the hyperty does not keep up: {} events wait for room in its inbox (pending-events = {})",
                outbox.len(),
                conn.settings.pending_events
            ));
            outbox.clear();
            continue;
        }
        let mut wake_at = polled.deadline;
        if !outbox.is_empty() {
            wake_at = wake_at.min(Instant::now() + RETRY);
        }
        if let Some(due) = bindings.iter().filter_map(|b| b.due).chain(allocations.iter().filter_map(|a| a.due)).min() {
            wake_at = wake_at.min(due);
        }
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, source)) => {
                    let event = match relayed_in(&conn, &mut allocations, &buf[..n], source, local) {
                        Some(relayed) => relayed,
                        None => conn.received(&buf[..n], source, local, &mut bindings),
                    };
                    if let Some(event) = event {
                        outbox.push_back((sink.message(&conn.address, &event), None));
                    }
                }
                Err(e) => tracing::debug!(connection = %conn.address, "receive error: {e}"),
            },
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake_at)) => conn.input(Input::Timeout(Instant::now())),
            () = conn.wake.notified() => {}
            Ok(()) = shutdown.changed() => conn.close("the domain's media stopped (its sandbox went away)"),
        }
    }
    release(&conn, &socket, &mut allocations, &mut buf).await;
    conn.held.frames.forget(&conn.address);
    drop(socket);
    drop(place);
}

/// Releases a closed connection's TURN `allocations` (those whose
/// Allocate is in flight once it is answered), at most
/// [`turn::RELEASE_WITHIN`]: only the servers' datagrams are read.
async fn release(conn: &Conn, socket: &tokio::net::UdpSocket, allocations: &mut [turn::Allocation], buf: &mut [u8]) {
    let Ok(local) = socket.local_addr() else { return };
    let start = Instant::now();
    let until = start + turn::RELEASE_WITHIN;
    for allocation in allocations.iter_mut() {
        allocation.release(start);
    }
    let mut out = Vec::new();
    while !allocations.iter().all(turn::Allocation::is_gone) && Instant::now() < until {
        for allocation in allocations.iter_mut() {
            allocation.poll(Instant::now(), &mut out);
            for data in out.drain(..) {
                let _ = socket.send_to(&data, allocation.server).await;
            }
        }
        let wake_at = allocations.iter().filter_map(|a| a.due).min().unwrap_or(until).min(until);
        tokio::select! {
            Ok((n, source)) = socket.recv_from(buf) => {
                if let Some(allocation) = allocations.iter_mut().find(|a| a.server == source && !a.is_gone()) {
                    let _ = allocation.received(&buf[..n], local, Instant::now());
                }
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake_at)) => {}
        }
    }
    if !allocations.iter().all(turn::Allocation::is_gone) {
        tracing::info!(connection = %conn.address, "a TURN allocation not released within {:?}", turn::RELEASE_WITHIN);
    }
}

/// A datagram from `source` on the socket at `local`, if it comes from
/// one of the connection's TURN servers and is its allocation's: data a
/// peer sent to the relayed address, given to str0m as received there
/// (from the domain's `peers` only), or a response the allocation takes.
/// `None` when it is not an allocation's; `Some(event)` when it was (with
/// the event it gave, if any).
fn relayed_in(conn: &Conn, allocations: &mut [turn::Allocation], data: &[u8], source: SocketAddr, local: SocketAddr) -> Option<Option<Value>> {
    let allocation = allocations.iter_mut().find(|a| a.server == source && !a.is_gone())?;
    let relayed = allocation.relayed();
    match allocation.received(data, local, Instant::now()) {
        Ok(turn::Received::NotOurs) => None,
        Ok(turn::Received::Handled) => Some(None),
        Ok(turn::Received::Peer(peer, data)) => {
            match relayed {
                Some(relayed) if conn.settings.allows_peer(peer.ip()) => conn.receive(&data, peer, relayed),
                _ => tracing::debug!(connection = %conn.address, "relayed datagram from {peer}, outside the domain's peers, dropped"),
            }
            Some(None)
        }
        Err(step) => {
            let none_left = allocations.iter().all(turn::Allocation::is_gone);
            Some(conn.allocation_step(step, local, none_left))
        }
    }
}

/// The track of a `media` event (a received frame), which may be dropped.
fn frame_of(event: &Value) -> Option<u32> {
    (event["event"] == "media").then(|| event["track"].as_u64().and_then(|t| u32::try_from(t).ok())).flatten()
}

/// Hands the waiting events to the hyperty in order, stopping at the first
/// its inbox has no room for (it is offered again after [`RETRY`]); a
/// frame with no room (in the inbox, or among the connection's
/// `pending-frames`, see [`inbox`]) is dropped and counted on its track
/// instead.
fn deliver(sink: &Sink, outbox: &mut VecDeque<(Message, Option<u32>)>, conn: &Conn) {
    let frames = &conn.held.frames;
    while let Some((m, frame)) = outbox.pop_front() {
        if let Some(track) = frame {
            let bytes = m.body.value.as_deref().map_or(0, str::len);
            if frames.reserve(&conn.address, m.id, bytes, conn.settings.pending_frames, conn.settings.pending_frame_bytes).is_err() {
                conn.count_dropped(track);
                continue;
            }
            // A frame refused is dropped and counted, so it is sent itself
            // (no copy of its payload). Refused for another reason than a
            // full inbox (too large for the bus): a remote peer sends
            // frames, so one log line each would be a log flood it controls.
            let id = m.id;
            if let Err(e) = sink.bus.send(m, None, Some(&sink.descriptor)) {
                frames.unreserve(&conn.address, id);
                if !matches!(e, SendError::InboxFull(_)) {
                    tracing::debug!(to = %sink.owner, "a received frame was refused: {e}");
                }
                conn.count_dropped(track);
            }
            continue;
        }
        // An event refused for a full inbox is offered again: a copy is sent.
        match sink.bus.send(m.clone(), None, Some(&sink.descriptor)) {
            Ok(()) => {}
            Err(SendError::InboxFull(_)) => {
                outbox.push_front((m, None));
                return;
            }
            Err(e) => tracing::warn!(to = %sink.owner, "a media event was refused: {e}"),
        }
    }
}
