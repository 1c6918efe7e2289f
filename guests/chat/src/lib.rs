//! The chat hyperty: one per provider domain, bound to its domain's user,
//! serving that domain's chat pages (browser apps behind the gateway).
//!
//! The room is a synchronised data object of scheme `comm` (reTHINK's
//! communication object) reported by the *host* chat hyperty; its data is
//! `{"title": s, "members": [user, ...], "messages": [{"seq": n, "user": u,
//! "text": t}, ...]}`, the last [`MAX_MESSAGES`] messages. Pages and other
//! chat hyperties observe it through the syncher (subscribe, deltas).
//!
//! Config: `{"title": "..."}` makes the host of a room; `{"host":
//! "<domain>/<name>"}` a chat hyperty that relays its pages to that host and
//! observes the room itself (it logs every new message).
//!
//! Requests (`execute`, value `{"op": ...}`), answered 200 or an error code
//! with `{"error": why}`:
//! - `{"op": "join"}` → `{"room": url, "title": s}`: the sender's user (the
//!   identity the host stamped) becomes a member and the sender is invited
//!   to the room, so its `subscribe` is accepted at once. A relay names the
//!   page to invite, `{"op": "join", "observer": address}` (an address of
//!   the relay's own domain).
//! - `{"op": "say", "text": t}` → `{"version": n}`: appends `t` (1 to
//!   [`MAX_TEXT`] characters) as a message of the sender's user.
//! - `{"op": "observe"}` (between chat hyperties): invites the sender without
//!   making its user a member.
//!
//! A relay forwards `join` and `say` from pages of its own domain to the
//! host and answers each page with the host's answer (code and value); the
//! host sees the relay's own user, the one its bundle binds it to. Requests
//! without an identity are answered 401; subscribe asks for anyone not
//! invited, 403. Every collection held is bounded (the invitations by the
//! syncher's `object-subscribers` limit: 409 "the room is full").

use std::cell::RefCell;
use std::collections::BTreeMap;

use hyperty_guest::{Applied, Body, Guest, Message, MessageType, Replica, bus, info, registry, syncher, warn};
use serde::Deserialize;
use serde_json::{Value, json};

/// Messages the room keeps; older ones are dropped from its data.
pub const MAX_MESSAGES: usize = 100;
/// Characters in one message's text.
pub const MAX_TEXT: usize = 500;
/// Members of a room.
pub const MAX_MEMBERS: usize = 64;
/// Requests a relay forwards at once.
pub const MAX_RELAYED: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    title: Option<String>,
    host: Option<String>,
}

/// A request's value.
#[derive(Deserialize)]
struct Request {
    op: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    observer: Option<String>,
}

/// The host's state: the room it reports.
struct Room {
    url: String,
    title: String,
    members: Vec<String>,
    /// Messages in the data now.
    messages: usize,
    next_seq: u64,
}

/// What a relay waits for, by request id.
enum Waiting {
    /// The host's answer to `observe`: the room's URL.
    Observe,
    /// The room's state, answering our `subscribe` or `read`.
    State,
    /// The host's answer to a page's request, to pass back.
    Page(Message),
}

/// A relay's state.
struct Relay {
    host: String,
    room: Option<String>,
    replica: Option<Replica>,
    waiting: BTreeMap<u64, Waiting>,
    next_id: u64,
}

enum Role {
    Host(Room),
    Relay(Relay),
}

struct State {
    me: String,
    domain: String,
    role: Role,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// The domain of `address` (`scheme://<domain>/...`).
fn domain_of(address: &str) -> &str {
    let rest = address.split_once("://").map_or("", |(_, rest)| rest);
    rest.split('/').next().unwrap_or_default()
}

/// Answers `request` with `code` and `value`, logging a refusal.
fn answer(request: &Message, code: u16, value: Value) {
    if let Err(e) = bus::reply(request, code, Some(&value.to_string())) {
        warn(&format!("cannot answer {} {}: {}", request.from, request.id, e.describe()));
    }
}

fn refuse(request: &Message, code: u16, why: &str) {
    answer(request, code, json!({ "error": why }));
}

struct Chat;

impl Guest for Chat {
    fn init(address: String, config: String) -> Result<(), String> {
        let config: Config = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
        let domain = domain_of(&address).to_owned();
        let role = match (config.title, config.host) {
            (Some(title), None) => {
                let data = json!({ "title": title, "members": [], "messages": [] });
                let url = syncher::create("comm", &data.to_string()).map_err(|e| format!("cannot create the room: {e:?}"))?;
                info(&format!("room {title:?} is {url}"));
                Role::Host(Room { url, title, members: Vec::new(), messages: 0, next_seq: 1 })
            }
            (None, Some(host)) => {
                let (d, name) = host.split_once('/').ok_or_else(|| format!("host {host:?} is not <domain>/<name>"))?;
                let host = registry::lookup(d, name).ok_or_else(|| format!("the bundle has no hyperty {host:?}"))?;
                let mut relay = Relay { host, room: None, replica: None, waiting: BTreeMap::new(), next_id: 1 };
                relay.ask(&address, json!({ "op": "observe" }), Waiting::Observe);
                Role::Relay(relay)
            }
            _ => return Err("bad config: give either `title` (host a room) or `host` (relay to a room's host)".into()),
        };
        STATE.with(|s| *s.borrow_mut() = Some(State { me: address, domain, role }));
        Ok(())
    }

    fn handle(msg: Message) {
        STATE.with(|s| {
            let mut state = s.borrow_mut();
            let Some(state) = state.as_mut() else { return };
            let (me, domain) = (state.me.as_str(), state.domain.as_str());
            match &mut state.role {
                Role::Host(room) => room.handle(msg),
                Role::Relay(relay) => relay.handle(me, domain, msg),
            }
        });
    }
}

impl Room {
    fn handle(&mut self, msg: Message) {
        match msg.type_ {
            // The syncher asks about an observer that was not invited.
            MessageType::Subscribe if msg.from == self.url => refuse(&msg, 403, "join the room first"),
            MessageType::Execute => self.request(msg),
            _ => {}
        }
    }

    fn request(&mut self, msg: Message) {
        let Some(user) = msg.identity.as_ref().map(|i| i.user.clone()) else {
            return refuse(&msg, 401, "the chat needs to know who you are: log in");
        };
        let request: Request = match msg.body.value.as_deref().map(serde_json::from_str) {
            Some(Ok(r)) => r,
            _ => return refuse(&msg, 400, "expected {\"op\": \"join\" | \"say\" | \"observe\", ...}"),
        };
        match request.op.as_str() {
            "observe" => self.invite(&msg, &msg.from.clone()),
            "join" => {
                let observer = request.observer.unwrap_or_else(|| msg.from.clone());
                if domain_of(&observer) != domain_of(&msg.from) {
                    return refuse(&msg, 403, "a relay invites only addresses of its own domain");
                }
                if !self.members.contains(&user) {
                    if self.members.len() >= MAX_MEMBERS {
                        return refuse(&msg, 409, &format!("the room is full ({MAX_MEMBERS} members)"));
                    }
                    let patch = json!([{ "op": "add", "path": "/members/-", "value": user }]);
                    if let Err(e) = syncher::update(&self.url, &patch.to_string()) {
                        return refuse(&msg, 503, &format!("cannot add the member: {e:?}"));
                    }
                    self.members.push(user.clone());
                    info(&format!("{user} joined"));
                }
                self.invite(&msg, &observer);
            }
            "say" => {
                let text = request.text.unwrap_or_default();
                let text = text.trim();
                let chars = text.chars().count();
                if chars == 0 || chars > MAX_TEXT {
                    return refuse(&msg, 400, &format!("a message has 1 to {MAX_TEXT} characters, not {chars}"));
                }
                if !self.members.contains(&user) {
                    return refuse(&msg, 403, &format!("{user} has not joined the room"));
                }
                let mut patch = vec![json!({ "op": "add", "path": "/messages/-", "value": { "seq": self.next_seq, "user": user, "text": text } })];
                if self.messages >= MAX_MESSAGES {
                    patch.push(json!({ "op": "remove", "path": "/messages/0" }));
                }
                match syncher::update(&self.url, &Value::Array(patch).to_string()) {
                    Ok(version) => {
                        self.next_seq += 1;
                        self.messages = (self.messages + 1).min(MAX_MESSAGES);
                        answer(&msg, 200, json!({ "version": version }));
                    }
                    Err(e) => refuse(&msg, 503, &format!("cannot post: {e:?}")),
                }
            }
            op => refuse(&msg, 400, &format!("unknown op {op:?}")),
        }
    }

    /// Invites `observer` to the room and answers `msg` with the room.
    /// The syncher keeps (and bounds: `object-subscribers`) the
    /// invitations, and forgets those of connections that close.
    fn invite(&self, msg: &Message, observer: &str) {
        match syncher::invite(&self.url, &[observer.to_owned()]) {
            Ok(()) => answer(msg, 200, json!({ "room": self.url, "title": self.title })),
            Err(syncher::SyncError::Limit(why)) => refuse(msg, 409, &format!("the room is full: {why}")),
            Err(e) => refuse(msg, 503, &format!("cannot invite {observer}: {e:?}")),
        }
    }
}

impl Relay {
    /// Sends a request to the host, remembering what the answer is for.
    fn ask(&mut self, me: &str, value: Value, waiting: Waiting) -> bool {
        let to = self.host.clone();
        self.request(me, &to, MessageType::Execute, Some(value), waiting)
    }

    fn request(&mut self, me: &str, to: &str, kind: MessageType, value: Option<Value>, waiting: Waiting) -> bool {
        let id = self.next_id;
        self.next_id += 1;
        let body = Body { code: None, resource: None, value: value.map(|v| v.to_string()), description: None };
        let m = Message { id, type_: kind, from: me.to_owned(), to: to.to_owned(), body, identity: None };
        match bus::request(&m, None) {
            Ok(()) => {
                self.waiting.insert(id, waiting);
                true
            }
            Err(e) => {
                warn(&format!("cannot ask {to}: {}", e.describe()));
                false
            }
        }
    }

    fn handle(&mut self, me: &str, domain: &str, msg: Message) {
        match msg.type_ {
            MessageType::Response => self.answered(me, msg),
            MessageType::Execute => self.relay(me, domain, msg),
            // Deltas of the room (its invitation, a `create` with no
            // version, is ignored: `observe` already subscribes).
            _ if Some(&msg.from) == self.room.as_ref() => self.delta(me, &msg),
            _ => {}
        }
    }

    /// A page's `join` or `say`, forwarded to the host.
    fn relay(&mut self, me: &str, domain: &str, msg: Message) {
        if domain_of(&msg.from) != domain {
            return refuse(&msg, 403, &format!("this chat hyperty serves the pages of {domain}"));
        }
        if msg.identity.is_none() {
            return refuse(&msg, 401, "the chat needs to know who you are: log in");
        }
        let forwarded = match msg.body.value.as_deref().map(serde_json::from_str::<Request>) {
            Some(Ok(r)) if r.op == "join" => json!({ "op": "join", "observer": msg.from }),
            Some(Ok(r)) if r.op == "say" => json!({ "op": "say", "text": r.text }),
            _ => return refuse(&msg, 400, "expected {\"op\": \"join\" | \"say\", ...}"),
        };
        if self.waiting.len() >= MAX_RELAYED {
            return refuse(&msg, 503, &format!("{MAX_RELAYED} requests are being relayed already; try again"));
        }
        if !self.ask(me, forwarded, Waiting::Page(msg.clone())) {
            refuse(&msg, 503, "cannot reach the room's host");
        }
    }

    fn answered(&mut self, me: &str, msg: Message) {
        let Some(waiting) = self.waiting.remove(&msg.id) else { return };
        let code = msg.body.code.unwrap_or(500);
        let value = msg.body.value.as_deref().and_then(|v| serde_json::from_str::<Value>(v).ok());
        match waiting {
            Waiting::Page(request) => {
                // The host's description (a 403, 404, 408 of the bus) is
                // the host's field: it travels in the value.
                let value = match (value, &msg.body.description) {
                    (Some(v), _) => v,
                    (None, Some(why)) => json!({ "error": why }),
                    (None, None) => Value::Null,
                };
                answer(&request, code, value);
            }
            Waiting::Observe if code == 200 => {
                let Some(room) = value.as_ref().and_then(|v| v["room"].as_str()) else { return };
                info(&format!("observing room {room}"));
                self.room = Some(room.to_owned());
                self.request(me, room, MessageType::Subscribe, None, Waiting::State);
            }
            Waiting::State if code == 200 => {
                let (Some(room), Some(state)) = (&self.room, msg.body.value.as_deref()) else { return };
                match Replica::from_state(room, state) {
                    Ok(replica) => self.replica = Some(replica),
                    Err(e) => warn(&format!("the room's state: {e}")),
                }
            }
            Waiting::Observe | Waiting::State => {
                warn(&format!("the room answered {code}: {}", msg.body.description.as_deref().unwrap_or("no reason given")));
            }
        }
    }

    /// Applies a delta of the room, logging the messages it adds.
    fn delta(&mut self, me: &str, msg: &Message) {
        let Some(replica) = self.replica.as_mut() else { return };
        let before = replica.data["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["seq"].as_u64()).unwrap_or(0);
        match replica.apply(msg) {
            Ok(Applied::Applied) => {
                for m in replica.data["messages"].as_array().into_iter().flatten().filter(|m| m["seq"].as_u64() > Some(before)) {
                    info(&format!("{}: {}", m["user"].as_str().unwrap_or("?"), m["text"].as_str().unwrap_or("")));
                }
            }
            Ok(Applied::Gap { .. }) => {
                let room = replica.url.clone();
                self.request(me, &room, MessageType::Read, None, Waiting::State);
            }
            Ok(_) => {}
            Err(e) => warn(&format!("a delta of the room: {e}")),
        }
    }
}

hyperty_guest::export!(Chat);
