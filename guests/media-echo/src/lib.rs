//! A hyperty that answers WebRTC calls from browser pages (through the app
//! gateway) and sends each caller's tracks back to it: its camera and
//! microphone, forwarded inside the host (the two-party SFU's `forward`,
//! on the same connection), so the page shows its own video as the remote
//! one. The `just video` demo (`guests/demo/video.toml`, page in `app/`).
//!
//! Config: `{"observer"?: <address>}`.
//!
//! - An `execute` request `{"op": "call", "sdp": <offer>}` opens a peer
//!   connection for its sender, accepts the offer and is answered 200
//!   `{"sdp": <answer>}` (or 500 `{"error"}`). Candidates ride in the SDP.
//! - Each track the caller offers `sendrecv` is forwarded back to it.
//! - An `execute` request `{"op": "stats", ...}` (what the page's
//!   `getStats()` shows) is answered 200 and told in the log.
//! - Each line it logs is also sent to `observer`, if any, as a `forward`
//!   `{"said": <line>}`; so is each page's stats, as `{"page": <value>}`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "hyperty-media",
});

use std::cell::RefCell;

use rethink::hyperty::bus;
use rethink::hyperty::log::{Level, log};
use rethink::hyperty::media::{MediaError, PeerConnection};
use rethink::hyperty::types::{Body, Message, MessageType};
use serde_json::{Value, json};

/// The most calls held at once: the oldest is closed for a new one.
const MAX_CALLS: usize = 4;

struct State {
    me: String,
    observer: Option<String>,
    next_id: u64,
    /// Calls by their caller, oldest first.
    calls: Vec<(String, PeerConnection)>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// The error in words (the WIT's variant and its text).
fn describe(e: &MediaError) -> String {
    format!("{e:?}")
}

fn message(id: u64, kind: MessageType, from: &str, to: &str, value: Value) -> Message {
    Message {
        id,
        type_: kind,
        from: from.to_owned(),
        to: to.to_owned(),
        body: Body { code: None, resource: None, value: Some(value.to_string()), description: None },
        identity: None,
    }
}

impl State {
    /// Tells `value` to the observer, if any.
    fn tell(&mut self, value: Value) {
        if let Some(observer) = self.observer.clone() {
            self.next_id += 1;
            let _ = bus::send(&message(self.next_id, MessageType::Forward, &self.me, &observer, value));
        }
    }

    fn say(&mut self, warn: bool, line: &str) {
        log(if warn { Level::Warn } else { Level::Info }, line);
        self.tell(json!({ "said": line }));
    }

    /// Answers `offer` from `caller`: the SDP answer.
    fn call(&mut self, caller: &str, offer: &str) -> Result<String, MediaError> {
        let pc = PeerConnection::open(Some(caller))?;
        let answer = pc.accept_offer(offer, Some(caller))?;
        if self.calls.len() >= MAX_CALLS {
            let (old, pc) = self.calls.remove(0);
            pc.close();
            self.say(false, &format!("call from {old} closed for a new one"));
        }
        self.calls.push((caller.to_owned(), pc));
        Ok(answer)
    }

    /// An event of the connection at `from`.
    fn event(&mut self, from: &str, event: &Value) {
        let Some(i) = self.calls.iter().position(|(_, pc)| pc.address() == from) else { return };
        let caller = self.calls[i].0.clone();
        match event["event"].as_str().unwrap_or_default() {
            "connected" => self.say(false, &format!("call from {caller} connected")),
            "track" if event["direction"] == "sendrecv" => {
                let track = event["track"].as_u64().unwrap_or(u64::MAX) as u32;
                let kind = event["kind"].as_str().unwrap_or("?").to_owned();
                let pc = &self.calls[i].1;
                match pc.forward(track, pc, track) {
                    Ok(()) => self.say(false, &format!("{caller}'s {kind} is sent back to it (forwarded in the host)")),
                    Err(e) => self.say(true, &format!("{caller}'s {kind} cannot be sent back: {}", describe(&e))),
                }
            }
            "closed" => {
                self.calls.remove(i);
                let reason = event["reason"].as_str().unwrap_or_default().to_owned();
                self.say(false, &format!("call from {caller} ended: {reason}"));
            }
            _ => {}
        }
    }

    /// A request from a page; its answer's code and value.
    fn request(&mut self, from: &str, command: &Value) -> (u16, Value) {
        match command["op"].as_str().unwrap_or_default() {
            "call" => match self.call(from, command["sdp"].as_str().unwrap_or_default()) {
                Ok(sdp) => {
                    self.say(false, &format!("call from {from}: offer accepted, answer sent"));
                    (200, json!({ "sdp": sdp }))
                }
                Err(e) => {
                    let why = describe(&e);
                    self.say(true, &format!("call from {from} refused: {why}"));
                    (500, json!({ "error": why }))
                }
            },
            "stats" => {
                self.tell(json!({ "page": command }));
                (200, json!({ "ok": true }))
            }
            other => (400, json!({ "error": format!("unknown op {other:?}") })),
        }
    }
}

struct MediaEcho;

impl exports::rethink::hyperty::handler::Guest for MediaEcho {
    fn init(address: String, config: String) -> Result<(), String> {
        let config: Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let observer = config["observer"].as_str().map(str::to_owned);
        STATE.with(|s| *s.borrow_mut() = Some(State { me: address, observer, next_id: 0, calls: Vec::new() }));
        Ok(())
    }

    fn handle(msg: Message) {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let s = s.as_mut().expect("initialised");
            let value: Value = serde_json::from_str(msg.body.value.as_deref().unwrap_or("null")).unwrap_or(Value::Null);
            if msg.from.starts_with("media://") {
                return s.event(&msg.from, &value);
            }
            if msg.type_ == MessageType::Execute {
                let (code, answer) = s.request(&msg.from, &value);
                let _ = bus::reply(&msg, code, Some(&answer.to_string()));
            }
        });
    }
}

export!(MediaEcho);
