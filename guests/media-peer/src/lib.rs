//! Test hyperty of the `hyperty-media` world: it opens WebRTC peer
//! connections (held by the host) on the orders of the test's observer, and
//! calls another `media-peer` over the bus, signalling as reTHINK's
//! Connector did: offer in a request, answer in its response.
//!
//! Config: `{"observer": "<address>", "echo": bool}`.
//! - An `execute` request is a command, answered with its result or
//!   `{"error": "<kind>: <why>"}`: `{"op": "open", "remote"?}` →
//!   `{"pc", "address", "fingerprint"}`; `{"op": "channel", "pc", "label",
//!   "ordered"}` → `{"channel"}`; `{"op": "offer", "pc"}` → `{"sdp"}`;
//!   `{"op": "accept-offer", "pc", "sdp"}` → `{"sdp"}`; `{"op":
//!   "accept-answer", "pc", "sdp"}`; `{"op": "candidate", "pc",
//!   "candidate"}`; `{"op": "candidates", "pc"}` → `{"candidates"}`;
//!   `{"op": "send", "pc", "channel", "text" | "pad": n | "bytes": n}`;
//!   `{"op": "close" | "drop", "pc"}`; `{"op": "assertion", "pc"}` →
//!   `{"assertion"}` (its identity assertion); `{"op": "set-identity",
//!   "pc", "assertion"}` → `{"user"}`; `{"op": "call", "peer", "label",
//!   "identity"?}` (opens a connection and a channel, sends the offer to
//!   `peer` as `{"op": "incoming", "sdp", "assertion"?}` (with
//!   `identity`, the connection's identity assertion) and accepts the
//!   answer it gets back, after setting the remote identity from its
//!   `assertion` if it has one) → `{"pc"}` (with `"tracks": [[kind,
//!   codec], ...]` it adds those tracks to the offer too → `{"pc",
//!   "tracks": [ids]}`); `{"op": "incoming", "sdp", "assertion"?}` (from a
//!   caller: sets the remote identity first, and answers with its own
//!   assertion when it got one) → `{"pc", "sdp", "assertion"?}`; `{"op":
//!   "reoffer", "pc", "peer", "remote-pc"}` renegotiates a call (a new
//!   offer to `peer` as `{"op": "accept-offer", "pc": remote-pc, "sdp"}`,
//!   its answer accepted, reported as a call's); `{"op": "trap"}` panics;
//!   `{"op": "stall", "ms": n}` reports `{"stalling": n}` and then reads
//!   nothing for n ms (it sleeps: a hyperty that does not keep up).
//! - Tracks: `{"op": "add-track", "pc", "kind", "codec"}` → `{"track"}`;
//!   `{"op": "write", "pc", "track", "frames": n, "size": bytes, "at-us",
//!   "step-us"}` writes n frames (the first a VP8 keyframe, the others
//!   not) → `{"written": n}` or the first error with `"written"`;
//!   `{"op": "request-keyframe" | "deliver-frames", "pc", "track", "on"}`;
//!   `{"op": "forward", "pc", "track", "to", "to-track"}`. A `media`
//!   event is reported without its frame: `"size"` (bytes) and `"n"` (the
//!   frames of that track so far) instead.
//! - Benchmarks: `{"op": "sink", "messages": n}` counts the next n
//!   channel messages and media frames without reporting them, then
//!   reports `{"sink": "done", "messages", "bytes"}`; `{"op": "blast",
//!   "pc", "channel", "size", "count"}` sends count binary messages of size
//!   bytes, waiting for `buffered-low` whenever the channel is full.
//! - Every event from a connection (a message from its `media://`
//!   address) is reported to the observer as a `forward` whose value is
//!   the event with `"pc"` (its index here) added; so are signalling
//!   outcomes (`{"signal": "answered" | "failed", "pc", ...}`). With
//!   `echo`, text received on a channel is sent back prefixed `echo:`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "hyperty-media",
});

use std::cell::RefCell;
use std::collections::BTreeMap;

use rethink::hyperty::bus;
use rethink::hyperty::media::{MediaError, PeerConnection, TrackKind};
use rethink::hyperty::types::{Body, Message, MessageType};
use serde_json::{Value, json};

struct State {
    me: String,
    observer: String,
    echo: bool,
    next_id: u64,
    /// Peer connections by index (`None` once dropped).
    pcs: Vec<Option<PeerConnection>>,
    /// Calls waiting for their answer: request id → connection index.
    calls: BTreeMap<u64, usize>,
    /// Frames received: (connection index, track) → count.
    frames: BTreeMap<(usize, u64), u64>,
    /// Counting silently: (messages still to come, messages, bytes).
    sink: Option<(u64, u64, u64)>,
    /// Messages still to send: (connection, channel, size, count).
    blast: Option<(usize, u32, usize, u64)>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn error(e: MediaError) -> Value {
    let (kind, why) = match e {
        MediaError::MalformedSdp(s) => ("malformed-sdp", s),
        MediaError::NoSuchChannel(c) => ("no-such-channel", c.to_string()),
        MediaError::NotGranted(s) => ("not-granted", s),
        MediaError::LimitReached(s) => ("limit-reached", s),
        MediaError::Denied(s) => ("denied", s),
        MediaError::Closed(s) => ("closed", s),
        MediaError::Invalid(s) => ("invalid", s),
    };
    json!({ "error": format!("{kind}: {why}") })
}

fn ok<T>(r: Result<T, MediaError>, f: impl FnOnce(T) -> Value) -> Value {
    r.map_or_else(error, f)
}

impl State {
    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn pc(&self, c: &Value) -> Result<&PeerConnection, Value> {
        let i = c["pc"].as_u64().unwrap_or(u64::MAX) as usize;
        self.pcs.get(i).and_then(Option::as_ref).ok_or_else(|| json!({ "error": format!("no connection {}", c["pc"]) }))
    }

    fn open(&mut self, remote: Option<&str>) -> Result<usize, MediaError> {
        let pc = PeerConnection::open(remote)?;
        self.pcs.push(Some(pc));
        Ok(self.pcs.len() - 1)
    }

    /// Sends `command` to `peer` as a request whose answer (an SDP answer)
    /// goes to connection `i`.
    fn ask(&mut self, peer: &str, command: Value, i: usize) -> Result<(), Value> {
        let id = self.fresh_id();
        let ask = message(id, MessageType::Execute, &self.me, peer, command.to_string());
        bus::request(&ask, None).map_err(|e| json!({ "error": format!("{e:?}") }))?;
        self.calls.insert(id, i);
        Ok(())
    }

    /// Sends what `blast` still has to, until the channel is full.
    fn blast_on(&mut self) -> Value {
        let Some((i, channel, size, left)) = self.blast else { return json!({ "ok": true }) };
        let Some(Some(pc)) = self.pcs.get(i) else { return json!({ "error": "no connection" }) };
        let data = vec![7u8; size];
        let mut left = left;
        while left > 0 {
            match pc.send_bytes(channel, &data) {
                Ok(()) => left -= 1,
                Err(MediaError::LimitReached(_)) => break,
                Err(e) => {
                    self.blast = None;
                    return error(e);
                }
            }
        }
        self.blast = (left > 0).then_some((i, channel, size, left));
        json!({ "ok": true })
    }

    /// Counts a message or frame for `sink`; false if there is none.
    fn sunk(&mut self, v: &Value) -> bool {
        let Some((left, messages, bytes)) = self.sink.as_mut() else { return false };
        let b64 = v["bytes"].as_str().unwrap_or_default();
        *bytes += (b64.len() / 4 * 3 - b64.bytes().rev().take_while(|&b| b == b'=').count()) as u64;
        *messages += 1;
        *left -= 1;
        if *left == 0 {
            let done = json!({ "sink": "done", "messages": *messages, "bytes": *bytes });
            self.sink = None;
            self.report(done);
        }
        true
    }

    fn report(&mut self, value: Value) {
        let id = self.fresh_id();
        let m = message(id, MessageType::Forward, &self.me, &self.observer, value.to_string());
        let _ = bus::send(&m);
    }

    fn command(&mut self, c: &Value, from: &str) -> Value {
        let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        match c["op"].as_str().unwrap_or_default() {
            "open" => ok(self.open(c["remote"].as_str()), |i| {
                let pc = self.pcs[i].as_ref().expect("just opened");
                json!({ "pc": i, "address": pc.address(), "fingerprint": pc.fingerprint() })
            }),
            "incoming" => {
                let offered = self.open(Some(from)).and_then(|i| {
                    let pc = self.pcs[i].as_ref().expect("just opened");
                    let assertion = match c["assertion"].as_str() {
                        Some(remote) => {
                            pc.set_remote_identity(remote)?;
                            Some(pc.identity_assertion()?)
                        }
                        None => None,
                    };
                    pc.accept_offer(&text("sdp"), Some(from)).map(|sdp| (i, sdp, assertion))
                });
                ok(offered, |(i, sdp, assertion)| json!({ "pc": i, "sdp": sdp, "assertion": assertion }))
            }
            "call" => {
                let peer = text("peer");
                let mut tracks = Vec::new();
                let offered = self.open(Some(&peer)).and_then(|i| {
                    let pc = self.pcs[i].as_ref().expect("just opened");
                    pc.open_channel(&text("label"), true)?;
                    for t in c["tracks"].as_array().into_iter().flatten() {
                        let kind = if t[0] == "audio" { TrackKind::Audio } else { TrackKind::Video };
                        tracks.push(pc.add_track(kind, t[1].as_str().unwrap_or_default())?);
                    }
                    let assertion = if c["identity"] == true { Some(pc.identity_assertion()?) } else { None };
                    pc.create_offer().map(|sdp| (i, sdp, assertion))
                });
                match offered {
                    Ok((i, sdp, assertion)) => match self.ask(&peer, json!({ "op": "incoming", "sdp": sdp, "assertion": assertion }), i) {
                        Ok(()) => json!({ "pc": i, "tracks": tracks }),
                        Err(e) => e,
                    },
                    Err(e) => error(e),
                }
            }
            "reoffer" => {
                let i = c["pc"].as_u64().unwrap_or(u64::MAX) as usize;
                let offered = match self.pc(c) {
                    Ok(pc) => pc.create_offer(),
                    Err(e) => return e,
                };
                match offered {
                    Ok(sdp) => {
                        let ask = json!({ "op": "accept-offer", "pc": c["remote-pc"], "sdp": sdp });
                        self.ask(&text("peer"), ask, i).map_or_else(|e| e, |()| json!({ "ok": true }))
                    }
                    Err(e) => error(e),
                }
            }
            "trap" => panic!("ordered to trap"),
            "stall" => {
                let ms = c["ms"].as_u64().unwrap_or(0);
                self.report(json!({ "stalling": ms }));
                std::thread::sleep(std::time::Duration::from_millis(ms));
                json!({ "ok": true })
            }
            "sink" => {
                self.sink = Some((c["messages"].as_u64().unwrap_or(1), 0, 0));
                json!({ "ok": true })
            }
            "blast" => {
                let (i, channel) = (c["pc"].as_u64().unwrap_or(u64::MAX) as usize, c["channel"].as_u64().unwrap_or(u64::MAX) as u32);
                self.blast = Some((i, channel, c["size"].as_u64().unwrap_or(1024) as usize, c["count"].as_u64().unwrap_or(1)));
                self.blast_on()
            }
            op => {
                let pc = match self.pc(c) {
                    Ok(pc) => pc,
                    Err(e) => return e,
                };
                let channel = c["channel"].as_u64().unwrap_or(u64::MAX) as u32;
                match op {
                    "channel" => ok(pc.open_channel(&text("label"), c["ordered"].as_bool().unwrap_or(true)), |id| json!({ "channel": id })),
                    "offer" => ok(pc.create_offer(), |sdp| json!({ "sdp": sdp })),
                    "accept-offer" => ok(pc.accept_offer(&text("sdp"), c["remote"].as_str()), |sdp| json!({ "sdp": sdp })),
                    "accept-answer" => ok(pc.accept_answer(&text("sdp")), |()| json!({ "ok": true })),
                    "candidate" => ok(pc.add_remote_candidate(&text("candidate")), |()| json!({ "ok": true })),
                    "candidates" => json!({ "candidates": pc.local_candidates() }),
                    "assertion" => ok(pc.identity_assertion(), |a| json!({ "assertion": a })),
                    "set-identity" => ok(pc.set_remote_identity(&text("assertion")), |user| json!({ "user": user })),
                    "send" => {
                        let sent = if let Some(n) = c["bytes"].as_u64() {
                            pc.send_bytes(channel, &vec![7u8; n as usize])
                        } else if let Some(n) = c["pad"].as_u64() {
                            pc.send_text(channel, &"x".repeat(n as usize))
                        } else {
                            pc.send_text(channel, &text("text"))
                        };
                        ok(sent, |()| json!({ "ok": true }))
                    }
                    "add-track" => {
                        let kind = if c["kind"] == "audio" { TrackKind::Audio } else { TrackKind::Video };
                        ok(pc.add_track(kind, &text("codec")), |track| json!({ "track": track }))
                    }
                    "write" => {
                        let track = c["track"].as_u64().unwrap_or(u64::MAX) as u32;
                        let (size, at, step) = (c["size"].as_u64().unwrap_or(100) as usize, c["at-us"].as_u64().unwrap_or(0), c["step-us"].as_u64().unwrap_or(33_333));
                        let mut frame = vec![7u8; size.max(1)];
                        for n in 0..c["frames"].as_u64().unwrap_or(1) {
                            // VP8 (RFC 6386 9.1): the first byte's low bit is 0 on a keyframe.
                            frame[0] = u8::from(n > 0);
                            if let Err(e) = pc.write_media(track, &frame, at + n * step) {
                                let mut e = error(e);
                                e["written"] = json!(n);
                                return e;
                            }
                        }
                        json!({ "written": c["frames"].as_u64().unwrap_or(1) })
                    }
                    "request-keyframe" => ok(pc.request_keyframe(track_of(c)), |()| json!({ "ok": true })),
                    "deliver-frames" => ok(pc.deliver_frames(track_of(c), c["on"].as_bool().unwrap_or(true)), |()| json!({ "ok": true })),
                    "forward" => {
                        let to = c["to"].as_u64().unwrap_or(u64::MAX) as usize;
                        let Some(Some(to)) = self.pcs.get(to) else {
                            return json!({ "error": format!("no connection {}", c["to"]) });
                        };
                        let to_track = c["to-track"].as_u64().unwrap_or(u64::MAX) as u32;
                        ok(pc.forward(track_of(c), to, to_track), |()| json!({ "ok": true }))
                    }
                    "close" => {
                        pc.close();
                        json!({ "ok": true })
                    }
                    "drop" => {
                        let i = c["pc"].as_u64().unwrap_or_default() as usize;
                        self.pcs[i] = None;
                        json!({ "ok": true })
                    }
                    other => json!({ "error": format!("unknown op {other:?}") }),
                }
            }
        }
    }

    /// An event from the connection at `from`.
    fn event(&mut self, from: &str, value: &str) {
        let Some(i) = self.pcs.iter().position(|pc| pc.as_ref().is_some_and(|pc| pc.address() == from)) else {
            // A connection already dropped here (its `closed` event).
            let mut v: Value = serde_json::from_str(value).unwrap_or(Value::Null);
            v["from"] = json!(from);
            return self.report(v);
        };
        let mut v: Value = serde_json::from_str(value).unwrap_or(Value::Null);
        if v["event"] == "buffered-low" && self.blast.is_some() {
            self.blast_on();
            return;
        }
        if (v["event"] == "channel-data" || v["event"] == "media") && self.sunk(&v) {
            return;
        }
        if self.echo
            && v["event"] == "channel-data"
            && let Some(text) = v["text"].as_str()
            && !text.starts_with("echo:")
        {
            let channel = v["channel"].as_u64().unwrap_or_default() as u32;
            let pc = self.pcs[i].as_ref().expect("found");
            if let Err(e) = pc.send_text(channel, &format!("echo:{text}")) {
                v["echo-error"] = error(e)["error"].clone();
            }
        }
        if v["event"] == "media"
            && let Some(b64) = v["bytes"].as_str()
        {
            let size = b64.len() / 4 * 3 - b64.bytes().rev().take_while(|&b| b == b'=').count();
            let n = self.frames.entry((i, v["track"].as_u64().unwrap_or_default())).or_default();
            *n += 1;
            v["n"] = json!(*n);
            v["size"] = json!(size);
            v["bytes"] = Value::Null;
        }
        v["pc"] = json!(i);
        v["from"] = json!(from);
        self.report(v);
    }

    /// The answer to a call this hyperty made.
    fn answered(&mut self, m: &Message) {
        let Some(i) = self.calls.remove(&m.id) else { return };
        let value: Value = serde_json::from_str(m.body.value.as_deref().unwrap_or("null")).unwrap_or(Value::Null);
        let report = match (m.body.code, value["sdp"].as_str(), self.pcs[i].as_ref()) {
            (Some(200), Some(sdp), Some(pc)) => match value["assertion"].as_str().map_or(Ok(String::new()), |a| pc.set_remote_identity(a)).and_then(|_| pc.accept_answer(sdp)) {
                Ok(()) => json!({ "signal": "answered", "pc": i }),
                Err(e) => json!({ "signal": "failed", "pc": i, "error": error(e)["error"] }),
            },
            _ => json!({ "signal": "failed", "pc": i, "code": m.body.code, "answer": value, "description": m.body.description }),
        };
        self.report(report);
    }
}

fn track_of(c: &Value) -> u32 {
    c["track"].as_u64().unwrap_or(u64::MAX) as u32
}

fn message(id: u64, kind: MessageType, from: &str, to: &str, value: String) -> Message {
    Message {
        id,
        type_: kind,
        from: from.to_owned(),
        to: to.to_owned(),
        body: Body { code: None, resource: None, value: Some(value), description: None },
        identity: None,
    }
}

struct MediaPeer;

impl exports::rethink::hyperty::handler::Guest for MediaPeer {
    fn init(address: String, config: String) -> Result<(), String> {
        let config: Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let observer = config["observer"].as_str().ok_or("config needs an observer")?.to_owned();
        let echo = config["echo"].as_bool().unwrap_or(false);
        STATE.with(|s| {
            *s.borrow_mut() = Some(State { me: address, observer, echo, next_id: 0, pcs: Vec::new(), calls: BTreeMap::new(), frames: BTreeMap::new(), sink: None, blast: None });
        });
        Ok(())
    }

    fn handle(msg: Message) {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let s = s.as_mut().expect("initialised");
            if msg.from.starts_with("media://") {
                return s.event(&msg.from, msg.body.value.as_deref().unwrap_or("null"));
            }
            match msg.type_ {
                MessageType::Response => s.answered(&msg),
                MessageType::Execute => {
                    let command: Value = serde_json::from_str(msg.body.value.as_deref().unwrap_or("null")).unwrap_or(Value::Null);
                    let answer = s.command(&command, &msg.from);
                    let _ = bus::reply(&msg, 200, Some(&answer.to_string()));
                }
                _ => {}
            }
        });
    }
}

export!(MediaPeer);
