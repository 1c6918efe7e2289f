//! A hyperty that calls another over a WebRTC data channel (held by the
//! host), signalling through reTHINK's Connection data object, and whose
//! peers prove who they are with identity-bound fingerprints (W3C
//! webrtc-identity). It tells the setup in words in the host's log.
//!
//! Config: `{"peer"?: "<domain>/<name>", "message": <text>, "identity"?:
//! bool (default true), "observer"?: <address>}`.
//!
//! - **Caller** (with `peer`): at init it opens a peer connection with a
//!   channel `chat`, creates a `connection://` object whose data is the
//!   call — `{"caller", "callee", "offer": {"sdp", "identity"}}` (the
//!   identity assertion binding its fingerprint to its user) — and invites
//!   the callee. When the callee's child `answer` (`{"sdp", "identity"}`)
//!   arrives, it sets the remote identity and accepts the answer. Once the
//!   channel is open it sends `message`; when the callee's reply arrives it
//!   hangs up: closes the connection and deletes the object.
//! - **Callee** (without `peer`): invited to a `connection://` object, it
//!   subscribes; the answer brings the state, whose offer it accepts (after
//!   setting the remote identity) and answers by writing the child
//!   `answer`. It replies `message` to the first message it receives, and
//!   closes its connection when the object is deleted.
//!
//! Each line it logs is also sent to `observer`, if any, as a `forward`
//! `{"said": <line>, "url"?: <object>}` (for the tests).

wit_bindgen::generate!({
    path: "../../wit",
    world: "hyperty-media",
});

use std::cell::RefCell;

use rethink::hyperty::log::{Level, log};
use rethink::hyperty::media::{MediaError, PeerConnection};
use rethink::hyperty::types::{Body, Message, MessageType};
use rethink::hyperty::{bus, registry, syncher};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    peer: Option<String>,
    message: String,
    #[serde(default = "yes")]
    identity: bool,
    #[serde(default)]
    observer: Option<String>,
}

fn yes() -> bool {
    true
}

/// One call: the Connection object and the peer connection.
struct Call {
    url: String,
    pc: PeerConnection,
    /// Whether this side sent its message (the caller) or replied (the callee).
    spoke: bool,
}

struct State {
    me: String,
    config: Config,
    /// The callee's address (caller only).
    peer: Option<String>,
    call: Option<Call>,
    /// The `subscribe` this callee sent: its id and the object.
    subscribing: Option<(u64, String)>,
    next_id: u64,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn describe(e: &MediaError) -> String {
    match e {
        MediaError::MalformedSdp(s) => format!("malformed SDP: {s}"),
        MediaError::NoSuchChannel(c) => format!("no channel {c}"),
        MediaError::NotGranted(s) => format!("not granted: {s}"),
        MediaError::LimitReached(s) => format!("limit reached: {s}"),
        MediaError::Denied(s) => format!("denied: {s}"),
        MediaError::Closed(s) => format!("closed: {s}"),
        MediaError::Invalid(s) => format!("invalid: {s}"),
    }
}

fn message(id: u64, kind: MessageType, from: &str, to: &str, value: Option<String>) -> Message {
    Message {
        id,
        type_: kind,
        from: from.to_owned(),
        to: to.to_owned(),
        body: Body { code: None, resource: None, value, description: None },
        identity: None,
    }
}

impl State {
    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Logs `line` (a warning if `warn`) and tells the observer.
    fn say(&mut self, warn: bool, line: &str) {
        log(if warn { Level::Warn } else { Level::Info }, line);
        if let Some(observer) = self.config.observer.clone() {
            let url = self.call.as_ref().map(|c| c.url.clone()).or_else(|| self.subscribing.as_ref().map(|(_, u)| u.clone()));
            let id = self.fresh_id();
            let _ = bus::send(&message(id, MessageType::Forward, &self.me, &observer, Some(json!({ "said": line, "url": url }).to_string())));
        }
    }

    /// This side's identity assertion for `pc`, if it carries one.
    fn assertion(&mut self, pc: &PeerConnection) -> Option<String> {
        if !self.config.identity {
            return None;
        }
        match pc.identity_assertion() {
            Ok(a) => Some(a),
            Err(e) => {
                self.say(true, &format!("no identity assertion for this call ({}); the peer will see us unauthenticated", describe(&e)));
                None
            }
        }
    }

    /// Caller: opens the connection, puts the offer into a new Connection
    /// object and invites the callee.
    fn call(&mut self, peer: &str) -> Result<(), String> {
        let pc = PeerConnection::open(Some(peer)).map_err(|e| describe(&e))?;
        pc.open_channel("chat", true).map_err(|e| describe(&e))?;
        let identity = self.assertion(&pc);
        let sdp = pc.create_offer().map_err(|e| describe(&e))?;
        let data = json!({ "caller": self.me, "callee": peer, "offer": { "sdp": sdp, "identity": identity } });
        let url = syncher::create("connection", &data.to_string()).map_err(|e| format!("cannot create the Connection object: {e:?}"))?;
        syncher::invite(&url, &[peer.to_owned()]).map_err(|e| format!("cannot invite {peer}: {e:?}"))?;
        self.call = Some(Call { url: url.clone(), pc, spoke: false });
        let bound = if identity.is_some() { ", with our identity assertion" } else { "" };
        self.say(false, &format!("offer sent to {} in the Connection object {url}{bound}", self.config.peer.clone().unwrap_or_default()));
        Ok(())
    }

    /// Callee: the state of the Connection object it subscribed to.
    fn offered(&mut self, url: String, state: &Value, from: Option<String>) {
        let data = &state["data"];
        let caller = data["caller"].as_str().unwrap_or_default().to_owned();
        let who = from.unwrap_or_else(|| "an unauthenticated caller".into());
        self.say(false, &format!("offer received from {who} ({caller}) in the Connection object {url}"));
        let answered = PeerConnection::open(Some(&caller)).map_err(|e| describe(&e)).and_then(|pc| {
            if let Some(identity) = data["offer"]["identity"].as_str() {
                let user = pc.set_remote_identity(identity).map_err(|e| describe(&e))?;
                self.say(false, &format!("the caller's identity assertion is valid: {user}; its fingerprint is checked with the offer"));
            }
            let sdp = pc.accept_offer(data["offer"]["sdp"].as_str().unwrap_or_default(), Some(&caller)).map_err(|e| describe(&e))?;
            Ok((pc, sdp))
        });
        let (pc, sdp) = match answered {
            Ok(answered) => answered,
            Err(why) => return self.say(true, &format!("cannot answer the call: {why}")),
        };
        let identity = self.assertion(&pc);
        let answer = json!({ "sdp": sdp, "identity": identity });
        match syncher::set_child(&url, "answer", &answer.to_string()) {
            Ok(_) => {
                self.call = Some(Call { url: url.clone(), pc, spoke: false });
                self.say(false, &format!("answer written into the Connection object {url}"));
            }
            Err(e) => self.say(true, &format!("cannot write the answer: {e:?}")),
        }
    }

    /// Caller: the callee's answer, a child of the Connection object.
    fn answered(&mut self, answer: &Value) {
        let Some(call) = self.call.as_ref() else { return };
        let accepted = (|| {
            let mut user = None;
            if let Some(identity) = answer["identity"].as_str() {
                user = Some(call.pc.set_remote_identity(identity).map_err(|e| describe(&e))?);
            }
            call.pc.accept_answer(answer["sdp"].as_str().unwrap_or_default()).map_err(|e| describe(&e))?;
            Ok::<_, String>(user)
        })();
        match accepted {
            Ok(Some(user)) => self.say(false, &format!("answer received from {user} (its identity assertion is valid; its fingerprint checked)")),
            Ok(None) => self.say(false, "answer received, without an identity assertion"),
            Err(why) => self.say(true, &format!("cannot accept the answer: {why}")),
        }
    }

    /// An event of the peer connection.
    fn event(&mut self, event: &Value) {
        let Some(call) = self.call.as_mut() else { return };
        match event["event"].as_str().unwrap_or_default() {
            "connected" => {
                let line = match event["identity"]["user"].as_str() {
                    Some(user) => format!("connected: identity of the peer verified: {user} (IdP {})", event["identity"]["idp"].as_str().unwrap_or_default()),
                    None => "connected: the peer is unauthenticated (no identity assertion)".to_owned(),
                };
                self.say(false, &line);
            }
            "channel-open" => {
                let channel = event["channel"].as_u64().unwrap_or_default() as u32;
                let caller = self.peer.is_some();
                let mut line = format!("channel {} open", event["label"]);
                if caller && !call.spoke {
                    call.spoke = true;
                    match call.pc.send_text(channel, &self.config.message) {
                        Ok(()) => line = format!("{line}; sent \"{}\"", self.config.message),
                        Err(e) => line = format!("{line}; cannot send: {}", describe(&e)),
                    }
                }
                self.say(false, &line);
            }
            "channel-data" => {
                let channel = event["channel"].as_u64().unwrap_or_default() as u32;
                let text = event["text"].as_str().unwrap_or("(binary)").to_owned();
                self.say(false, &format!("message exchanged: received \"{text}\""));
                let Some(call) = self.call.as_mut() else { return };
                if self.peer.is_some() {
                    call.pc.close();
                    let url = call.url.clone();
                    let _ = syncher::delete(&url);
                    self.say(false, "hanging up: connection closed, Connection object deleted");
                } else if !call.spoke {
                    call.spoke = true;
                    let sent = call.pc.send_text(channel, &self.config.message);
                    let line = match sent {
                        Ok(()) => format!("replied \"{}\"", self.config.message),
                        Err(e) => format!("cannot reply: {}", describe(&e)),
                    };
                    self.say(false, &line);
                }
            }
            "closed" => {
                let reason = event["reason"].as_str().unwrap_or_default().to_owned();
                self.call = None;
                self.say(false, &format!("call ended: {reason}"));
            }
            _ => {}
        }
    }

    fn handle(&mut self, msg: Message) {
        let value: Value = msg.body.value.as_deref().and_then(|v| serde_json::from_str(v).ok()).unwrap_or(Value::Null);
        if msg.from.starts_with("media://") {
            return self.event(&value);
        }
        let from_object = msg.from.starts_with("connection://");
        // The object itself (not a child) is what the message is about.
        let whole = msg.body.resource.as_deref().is_none_or(|r| r == msg.from);
        match msg.type_ {
            // Callee: an invitation to a call.
            MessageType::Create if from_object && whole && self.call.is_none() && self.subscribing.is_none() => {
                let id = self.fresh_id();
                let subscribe = message(id, MessageType::Subscribe, &self.me, &msg.from, None);
                match bus::request(&subscribe, None) {
                    Ok(()) => self.subscribing = Some((id, msg.from.clone())),
                    Err(e) => self.say(true, &format!("cannot subscribe to {}: {e:?}", msg.from)),
                }
            }
            MessageType::Response if self.subscribing.as_ref().is_some_and(|(id, _)| *id == msg.id) => {
                let (_, url) = self.subscribing.take().expect("checked");
                if msg.body.code == Some(200) {
                    let user = msg.identity.as_ref().map(|i| i.user.clone());
                    self.offered(url, &value, user);
                } else {
                    self.say(true, &format!("cannot subscribe to {url}: {:?} {:?}", msg.body.code, msg.body.description));
                }
            }
            // Caller: the callee's answer.
            MessageType::Create | MessageType::Update
                if from_object && msg.body.resource.as_deref().is_some_and(|r| r.ends_with("/children/answer")) && self.peer.is_some() =>
            {
                self.answered(&value["data"]);
            }
            // Callee: the caller hung up.
            MessageType::Delete if from_object && whole => {
                if let Some(call) = self.call.as_ref() {
                    call.pc.close();
                    self.say(false, "the caller hung up (the Connection object is deleted): closing");
                }
            }
            _ => {}
        }
    }
}

struct MediaCaller;

impl exports::rethink::hyperty::handler::Guest for MediaCaller {
    fn init(address: String, config: String) -> Result<(), String> {
        let config: Config = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
        let peer = match &config.peer {
            Some(p) => {
                let (domain, name) = p.split_once('/').ok_or_else(|| format!("peer {p:?} is not <domain>/<name>"))?;
                Some(registry::lookup(domain, name).ok_or_else(|| format!("the bundle has no hyperty {p:?}"))?)
            }
            None => None,
        };
        let mut state = State { me: address, config, peer: peer.clone(), call: None, subscribing: None, next_id: 0 };
        if let Some(peer) = peer {
            if let Err(why) = state.call(&peer) {
                state.say(true, &format!("cannot call: {why}"));
            }
        } else {
            state.say(false, "waiting for calls");
        }
        STATE.with(|s| *s.borrow_mut() = Some(state));
        Ok(())
    }

    fn handle(msg: Message) {
        STATE.with(|s| {
            if let Some(state) = s.borrow_mut().as_mut() {
                state.handle(msg);
            }
        });
    }
}

export!(MediaCaller);
