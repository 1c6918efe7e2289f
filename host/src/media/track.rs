//! Media tracks of a peer connection (`add-track`, `write-media`,
//! `request-keyframe`, `deliver-frames`, `forward` in `wit/media.wit`),
//! and the in-host forward of a two-party SFU.
//!
//! str0m runs in frame mode: hyperties write whole frames, str0m
//! packetises them (RFC 7741 VP8, RFC 7587 Opus, ...) and hands received
//! RTP back depacketised as frames ([`Event::MediaData`]). A track is one
//! m-line (its `Mid`) seen from this connection: added here (`sendonly`
//! in the next offer), or brought by the remote's offer or answer
//! (reported as a `track` event). Ids are the connection's own, counted
//! apart from channels.
//!
//! Decision on received frames: each reaches the hyperty as one `media`
//! event (base64) unless it asked for counts only (`deliver-frames`) or
//! forwards the track, and every incoming track reports its totals at
//! most once a second (`track-stats`). Media never waits: a frame the
//! hyperty's inbox has no room for is dropped and counted, so what the
//! host holds for media is bounded by the inbox, not by the sender's rate.
//!
//! The forward: frames of an incoming track are written to a sending
//! track of another (or the same) connection of the same hyperty inside
//! the host, matched to that m-line's negotiated payload type, without
//! crossing into the guest; keyframe requests on the sending track go back
//! to the source's sender. The work between two connections is carried
//! out of the source's lock ([`Relay`]) and done by its task, one lock at
//! a time.

use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use str0m::{Event, Input, Output};
use str0m::change::SdpApi;
use str0m::format::{Codec, PayloadParams};
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, MediaTime, Mid};

use super::{Conn, MediaError, Polled, State};

/// How often an incoming track's `track-stats` are reported at most.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// str0m's outputs taken right after a write (it needs `poll_output`
/// between two writes) and kept for the connection's task: one more
/// refuses the write.
const MAX_STASHED: usize = 4096;

/// A connection's tracks (at most the domain's `tracks`).
#[derive(Default)]
pub(super) struct Tracks {
    list: Vec<Track>,
    /// Ids of tracks added here that no offer carried yet.
    unoffered: Vec<u32>,
    next_id: u32,
}

struct Track {
    id: u32,
    kind: MediaKind,
    /// The codec written with: chosen at `add-track`, or the first the
    /// remote offered for its tracks.
    codec: Option<Codec>,
    mid: Option<Mid>,
    /// Seen from this connection.
    direction: Direction,
    /// Whether received frames reach the hyperty as `media` events.
    deliver: bool,
    /// Where received frames are forwarded.
    forward: Option<Link>,
    /// The incoming track forwarded to this one (its keyframe requests go
    /// there).
    fed_by: Option<Link>,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    frames: u64,
    bytes: u64,
    keyframes: u64,
    forwarded: u64,
    dropped: u64,
    next_report: Option<Instant>,
}

/// A track of a connection held weakly: a forward does not keep a closed
/// connection alive.
#[derive(Clone)]
pub(super) struct Link {
    conn: Weak<Conn>,
    track: u32,
}

/// A frame as received, to be written again elsewhere.
pub(super) struct Frame {
    params: PayloadParams,
    wallclock: Instant,
    time: MediaTime,
    data: Arc<[u8]>,
}

/// Work between two connections, done by the source's task once it let go
/// of its own lock.
pub(super) enum Relay {
    /// Write `frame`, received on `from`, to the track `to`.
    Frame { from: u32, to: Link, frame: Frame },
    /// Ask the sender of `to` for a keyframe.
    Keyframe { to: Link, kind: KeyframeRequestKind },
}

/// A codec by its name in the WIT (`opus`, `vp8`, ...).
fn codec_named(name: &str) -> Option<Codec> {
    Some(match name.to_ascii_lowercase().as_str() {
        "opus" => Codec::Opus,
        "vp8" => Codec::Vp8,
        "vp9" => Codec::Vp9,
        "h264" => Codec::H264,
        "av1" => Codec::Av1,
        _ => return None,
    })
}

fn codec_name(codec: Codec) -> String {
    format!("{codec:?}").to_ascii_lowercase()
}

fn kind_name(kind: MediaKind) -> &'static str {
    match kind {
        MediaKind::Audio => "audio",
        MediaKind::Video => "video",
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::SendOnly => "sendonly",
        Direction::RecvOnly => "recvonly",
        Direction::SendRecv => "sendrecv",
        Direction::Inactive => "inactive",
    }
}

fn no_track(id: u32) -> MediaError {
    MediaError::Invalid(format!("no track {id} on this connection"))
}

impl Tracks {
    fn get(&mut self, id: u32) -> Result<&mut Track, MediaError> {
        self.list.iter_mut().find(|t| t.id == id).ok_or_else(|| no_track(id))
    }

    fn by_mid(&mut self, mid: Mid) -> Option<&mut Track> {
        self.list.iter_mut().find(|t| t.mid == Some(mid))
    }

    fn add(&mut self, kind: MediaKind, codec: Option<Codec>, mid: Option<Mid>, direction: Direction) -> u32 {
        self.next_id += 1;
        let id = self.next_id;
        let track = Track { id, kind, codec, mid, direction, deliver: true, forward: None, fed_by: None, stats: Stats::default() };
        self.list.push(track);
        id
    }

    /// The `track-stats` of the tracks whose report is due at `now` (a
    /// second after the first frame since their last); the time the next
    /// is due, if any (hook of `poll`, which wakes then).
    pub(super) fn due_stats(&mut self, now: Instant, events: &mut Vec<Value>) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for t in &mut self.list {
            match t.stats.next_report {
                Some(at) if at <= now => {
                    events.push(t.stats());
                    t.stats.next_report = None;
                }
                Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                None => {}
            }
        }
        next
    }

    /// Adds the m-lines of the tracks no offer carried yet to the offer
    /// being made (hook of `create-offer`).
    pub(super) fn offer(&mut self, api: &mut SdpApi<'_>) {
        for id in std::mem::take(&mut self.unoffered) {
            if let Ok(track) = self.get(id) {
                track.mid = Some(api.add_media(track.kind, Direction::SendOnly, None, None, None));
            }
        }
    }
}

impl Track {
    fn receiving(&self) -> Result<Mid, MediaError> {
        match self.mid {
            Some(mid) if self.direction.is_receiving() => Ok(mid),
            _ => Err(MediaError::Invalid(format!("track {} does not receive ({})", self.id, direction_name(self.direction)))),
        }
    }

    fn sending(&self) -> Result<Mid, MediaError> {
        match self.mid {
            Some(mid) if self.direction.is_sending() => Ok(mid),
            None => Err(MediaError::Invalid(format!("track {} is not negotiated yet: make an offer", self.id))),
            _ => Err(MediaError::Invalid(format!("track {} does not send ({})", self.id, direction_name(self.direction)))),
        }
    }

    fn stats(&self) -> Value {
        let s = &self.stats;
        json!({ "event": "track-stats", "track": self.id, "frames": s.frames, "bytes": s.bytes,
                "keyframes": s.keyframes, "forwarded": s.forwarded, "dropped": s.dropped })
    }
}

impl Conn {
    /// `add-track`: a new sending track, offered with the next offer.
    pub(super) fn add_track(&self, kind: MediaKind, codec: &str) -> Result<u32, MediaError> {
        let codec = codec_named(codec).ok_or_else(|| MediaError::Invalid(format!("unknown codec {codec:?}")))?;
        if codec.kind() != kind {
            return Err(MediaError::Invalid(format!("{} is not a codec for {}", codec_name(codec), kind_name(kind))));
        }
        let mut state = self.lock()?;
        if state.rtc.codec_config().find(|p| p.spec().codec == codec).is_none() {
            return Err(MediaError::Invalid(format!("{} is not enabled in this host", codec_name(codec))));
        }
        let max = self.settings.tracks;
        if state.tracks.list.len() >= max as usize {
            return Err(MediaError::LimitReached(format!("tracks: the connection has {} (tracks = {max})", state.tracks.list.len())));
        }
        let id = state.tracks.add(kind, Some(codec), None, Direction::SendOnly);
        state.tracks.unoffered.push(id);
        Ok(id)
    }

    /// `write-media`: one frame on a sending track.
    pub(super) fn write_media(&self, track: u32, frame: &[u8], timestamp_us: u64) -> Result<(), MediaError> {
        let max = self.settings.message_bytes;
        if frame.len() > max as usize {
            return Err(MediaError::LimitReached(format!("message-bytes: a frame of {} bytes, the limit is {max}", frame.len())));
        }
        let mut guard = self.lock()?;
        let state = &mut *guard;
        let t = state.tracks.get(track)?;
        let mid = t.sending()?;
        let codec = t.codec;
        room_to_write(state)?;
        let writer = state.rtc.writer(mid).ok_or_else(|| MediaError::Invalid(format!("track {track} is not negotiated yet")))?;
        let pt = writer
            .payload_params()
            .find(|p| Some(p.spec().codec) == codec)
            .map(|p| p.pt())
            .ok_or_else(|| MediaError::Invalid(format!("track {track}: its codec was not negotiated")))?;
        self.charge(frame.len())?;
        writer
            .write(pt, Instant::now(), MediaTime::from_micros(timestamp_us), frame.to_vec())
            .map_err(|e| MediaError::Invalid(format!("cannot write on track {track}: {e}")))?;
        stash_outputs(state)?;
        drop(guard);
        self.wake.notify_one();
        Ok(())
    }

    /// Takes `bytes` from the domain's `media-bytes-per-second`.
    fn charge(&self, bytes: usize) -> Result<(), MediaError> {
        let mut media = self.held.media.lock().unwrap_or_else(PoisonError::into_inner);
        if media.has(bytes as f64) {
            media.take_n(bytes as f64);
            return Ok(());
        }
        Err(MediaError::LimitReached(format!(
            "media-bytes-per-second: the domain sends more than {} media bytes a second",
            self.settings.media_bytes_per_second
        )))
    }

    /// `request-keyframe` (PLI by default).
    pub(super) fn request_keyframe(&self, track: u32, kind: KeyframeRequestKind) -> Result<(), MediaError> {
        let mut guard = self.lock()?;
        let state = &mut *guard;
        let mid = state.tracks.get(track)?.receiving()?;
        let mut writer = state.rtc.writer(mid).ok_or_else(|| MediaError::Invalid(format!("track {track} is not negotiated yet")))?;
        writer.request_keyframe(None, kind).map_err(|e| MediaError::Invalid(format!("track {track}: cannot ask for a keyframe: {e}")))?;
        drop(guard);
        self.wake.notify_one();
        Ok(())
    }

    /// `deliver-frames`.
    pub(super) fn deliver_frames(&self, track: u32, on: bool) -> Result<(), MediaError> {
        self.lock()?.tracks.get(track)?.deliver = on;
        Ok(())
    }

    /// `forward`: frames of `track` (receiving, here) go to `to_track`
    /// (sending, on `to`, which may be this connection).
    pub(super) fn forward(self: &Arc<Conn>, track: u32, to: &Arc<Conn>, to_track: u32) -> Result<(), MediaError> {
        self.lock()?.tracks.get(track)?.receiving()?;
        {
            let mut state = to.lock()?;
            let t = state.tracks.get(to_track)?;
            t.sending()?;
            t.fed_by = Some(Link { conn: Arc::downgrade(self), track });
        }
        let replaced = {
            let mut state = self.lock()?;
            let t = state.tracks.get(track)?;
            t.deliver = false;
            t.forward.replace(Link { conn: Arc::downgrade(to), track: to_track })
        };
        // The track it fed before no longer takes its keyframe requests here.
        if let Some(old) = replaced
            && !(std::ptr::eq(old.conn.as_ptr(), Arc::as_ptr(to)) && old.track == to_track)
            && let Some(conn) = old.conn.upgrade()
        {
            conn.stop_fed_by(old.track, Arc::as_ptr(self));
        }
        tracing::info!(connection = %self.address, to = %to.address, "track {track} forwarded to track {to_track}");
        Ok(())
    }

    /// The hook of `poll`: handles str0m's media events (turning them into
    /// the hyperty's events and `out.relays`), and gives back any other.
    pub(super) fn track_event(&self, state: &mut State, event: Event, out: &mut Polled) -> Option<Event> {
        match event {
            Event::MediaAdded(added) => {
                if let Some(t) = state.tracks.by_mid(added.mid) {
                    t.direction = added.direction;
                    return None;
                }
                if state.tracks.list.len() >= self.settings.tracks as usize {
                    tracing::info!(connection = %self.address, "a track the remote added is over the domain's tracks limit: ignored");
                    return None;
                }
                let codec = state.rtc.media(added.mid).and_then(|m| m.remote_pts().first().copied()).and_then(|pt| {
                    state.rtc.codec_config().find(|p| p.pt() == pt).map(|p| p.spec().codec)
                });
                let id = state.tracks.add(added.kind, codec, Some(added.mid), added.direction);
                out.events.push(json!({ "event": "track", "track": id, "kind": kind_name(added.kind),
                    "codec": codec.map(codec_name), "direction": direction_name(added.direction) }));
                None
            }
            Event::MediaChanged(changed) => {
                if let Some(t) = state.tracks.by_mid(changed.mid) {
                    t.direction = changed.direction;
                }
                None
            }
            Event::MediaData(data) => {
                let limit = self.settings.message_bytes as usize;
                let t = state.tracks.by_mid(data.mid)?;
                let s = &mut t.stats;
                s.frames += 1;
                s.bytes += data.data.len() as u64;
                let keyframe = data.is_keyframe();
                s.keyframes += u64::from(keyframe);
                if let Some(to) = t.forward.clone() {
                    s.forwarded += 1;
                    let frame = Frame { params: data.params, wallclock: data.network_time, time: data.time, data: data.data.clone() };
                    out.relays.push(Relay::Frame { from: t.id, to, frame });
                }
                if t.deliver {
                    if data.data.len() > limit {
                        s.dropped += 1;
                    } else {
                        out.events.push(json!({ "event": "media", "track": t.id,
                            "bytes": base64::engine::general_purpose::STANDARD.encode(&data.data),
                            "codec": codec_name(data.params.spec().codec), "timestamp-us": data.time.as_micros(),
                            "keyframe": keyframe, "contiguous": data.contiguous }));
                    }
                }
                if t.stats.next_report.is_none() {
                    t.stats.next_report = Some(Instant::now() + STATS_EVERY);
                }
                None
            }
            Event::KeyframeRequest(req) => {
                let t = state.tracks.by_mid(req.mid)?;
                match t.fed_by.clone() {
                    Some(to) if to.conn.strong_count() > 0 => out.relays.push(Relay::Keyframe { to, kind: req.kind }),
                    _ => out.events.push(json!({ "event": "keyframe-request", "track": t.id })),
                }
                None
            }
            other => Some(other),
        }
    }

    /// Counts a frame of `track` the hyperty's inbox had no room for.
    pub(super) fn count_dropped(&self, track: u32) {
        if let Ok(t) = self.state.lock().unwrap_or_else(PoisonError::into_inner).tracks.get(track) {
            t.stats.dropped += 1;
        }
    }

    /// Does `relay` (from this connection's task, holding no lock).
    pub(super) fn relay(&self, relay: Relay) {
        match relay {
            Relay::Frame { from, to, frame } => {
                let Some(target) = to.conn.upgrade() else {
                    return self.stop_forward(from, to.conn.as_ptr());
                };
                match target.write_frame(to.track, &frame) {
                    Ok(()) => {}
                    Err(MediaError::Closed(_)) => self.stop_forward(from, to.conn.as_ptr()),
                    Err(e) => {
                        tracing::debug!(connection = %self.address, "a frame of track {from} was not forwarded: {e}");
                        self.count_dropped(from);
                    }
                }
            }
            Relay::Keyframe { to, kind } => {
                if let Some(source) = to.conn.upgrade()
                    && let Err(e) = source.request_keyframe(to.track, kind)
                {
                    tracing::debug!(connection = %self.address, "a keyframe request was not passed on: {e}");
                }
            }
        }
    }

    /// Writes a forwarded `frame` on the sending `track`, with the payload
    /// type this m-line negotiated for its codec.
    fn write_frame(&self, track: u32, frame: &Frame) -> Result<(), MediaError> {
        let mut guard = self.lock()?;
        let state = &mut *guard;
        let mid = state.tracks.get(track)?.sending()?;
        room_to_write(state)?;
        let writer = state.rtc.writer(mid).ok_or_else(|| MediaError::Invalid(format!("track {track} is not negotiated yet")))?;
        let pt = writer.match_params(frame.params).ok_or_else(|| MediaError::Invalid(format!("track {track} did not negotiate the codec")))?;
        self.charge(frame.data.len())?;
        writer
            .write(pt, frame.wallclock, frame.time, frame.data.clone())
            .map_err(|e| MediaError::Invalid(format!("cannot write on track {track}: {e}")))?;
        stash_outputs(state)?;
        drop(guard);
        self.wake.notify_one();
        Ok(())
    }

    /// The hook of `close`: the tracks forwarded to this connection stop
    /// being forwarded (each source's lock taken after this one's is let go).
    /// Also the tracks this connection forwarded to stop taking their
    /// keyframe requests here (they reach their hyperty again). Idempotent.
    pub(super) fn unlink(&self) {
        let (sources, targets): (Vec<Link>, Vec<Link>) = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let sources = state.tracks.list.iter_mut().filter_map(|t| t.fed_by.take()).collect();
            let targets = state.tracks.list.iter_mut().filter_map(|t| t.forward.take()).collect();
            (sources, targets)
        };
        for source in sources {
            if let Some(conn) = source.conn.upgrade() {
                conn.stop_forward(source.track, self);
            }
        }
        for target in targets {
            if let Some(conn) = target.conn.upgrade() {
                conn.stop_fed_by(target.track, self);
            }
        }
    }

    /// `track` here is no longer fed by the connection at `source` (it
    /// closed, or forwards elsewhere now): its keyframe requests reach the
    /// hyperty again. A track fed by another source since is left alone.
    fn stop_fed_by(&self, track: u32, source: *const Conn) {
        if let Ok(t) = self.state.lock().unwrap_or_else(PoisonError::into_inner).tracks.get(track)
            && t.fed_by.as_ref().is_some_and(|f| std::ptr::eq(f.conn.as_ptr(), source))
        {
            t.fed_by = None;
        }
    }

    /// Stops forwarding `track` to the connection at `target` (closed); its
    /// frames reach the hyperty again. A forward since replaced by one to
    /// another connection goes on.
    fn stop_forward(&self, track: u32, target: *const Conn) {
        if let Ok(t) = self.state.lock().unwrap_or_else(PoisonError::into_inner).tracks.get(track)
            && t.forward.as_ref().is_some_and(|f| std::ptr::eq(f.conn.as_ptr(), target))
        {
            t.forward = None;
            t.deliver = true;
            tracing::info!(connection = %self.address, "track {track} no longer forwarded: its target closed");
        }
    }
}

/// The receive buffer asked for each connection's socket, in bytes (the
/// kernel caps it at `net.core.rmem_max`): media comes in bursts (a video
/// keyframe is tens of packets, a forward passes a burst on at once), and
/// the default (~208 KiB, a few dozen full datagrams with their kernel
/// overhead) dropped packets of a 40-frame burst on loopback.
pub(super) const RECEIVE_BUFFER: usize = 2 << 20;

/// Asks for [`RECEIVE_BUFFER`] on `socket`; a refusal leaves the default.
pub(super) fn size_receive_buffer(socket: &std::net::UdpSocket) {
    if let Err(e) = socket2::SockRef::from(socket).set_recv_buffer_size(RECEIVE_BUFFER) {
        tracing::debug!("SO_RCVBUF not set on a media socket: {e}");
    }
}

/// Refuses a write while the connection's task has not taken the outputs
/// of the writes before ([`MAX_STASHED`]).
fn room_to_write(state: &State) -> Result<(), MediaError> {
    if state.stash.len() >= MAX_STASHED {
        return Err(MediaError::LimitReached(format!(
            "the connection's send queue is full: {} packets and events wait for its task",
            state.stash.len()
        )));
    }
    Ok(())
}

/// Packetises a frame just written (str0m does it on a timeout, one frame
/// a track each time, and refuses writes past 512 waiting) and keeps its
/// outputs, in order, for the connection's task, which handles them
/// before polling str0m again.
fn stash_outputs(state: &mut State) -> Result<(), MediaError> {
    if let Err(e) = state.rtc.handle_input(Input::Timeout(Instant::now())) {
        return Err(MediaError::Invalid(format!("the WebRTC stack failed: {e}")));
    }
    loop {
        match state.rtc.poll_output() {
            Ok(Output::Timeout(_)) => return Ok(()),
            Ok(output) => state.stash.push_back(output),
            Err(e) => return Err(MediaError::Invalid(format!("the WebRTC stack failed: {e}"))),
        }
    }
}
