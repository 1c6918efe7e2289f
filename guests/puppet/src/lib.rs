//! Test hyperty driven by the test suite through the bus itself.
//!
//! Config: `{"observer": "<address>", "echo": bool}`.
//! - An `execute` request from the observer is a command, performed with the
//!   hyperty's own imports and answered with `{"ok": true}` or
//!   `{"error": "..."}`: `{"op": "send" | "request", "message": {...},
//!   "timeout_ms": n, "pad": bytes}`, `{"op": "reply", "message": <a request>, "code": c}`
//!   (answered `code`, 200 by default, with the request's value, whatever request it names), `{"op": "lookup", "domain": d, "name": n}`
//!   or `{"op": "discover", "query": {"user"|"name"|"type"|"domain"|"scheme": ...}}`,
//!   or a syncher call: `{"op": "create", "scheme": s, "data": json}`,
//!   `{"op": "invite", "url": u, "observers": [...]}`, `{"op": "update", "url": u,
//!   "patch": json}`, `{"op": "set-child" | "remove-child", "url": u, "name": n,
//!   "data": json}`, `{"op": "delete", "url": u}` (answered `{"url"}` /
//!   `{"version"}` / `{"ok"}` or `{"error": "forbidden: ..."}`); `text`
//!   gives the JSON text as is, `pad` a JSON string of that many bytes, and
//!   `create` with `repeat: n` creates until n or the first error
//!   (`{"urls", "error"}`).
//! - With `reject_subscribe`, `subscribe` and `read` requests carrying
//!   `{"observer"}` (a syncher asking the reporter) are answered 403
//!   instead of echoed.
//! - With `provisional`, every request it echoes is first answered 100
//!   (reTHINK's subscribe flow answers 100, then 200).
//! - As an observer it keeps a `Replica` of every data object whose state a
//!   200 answer brought (subscribe, read), applies the deltas it gets, reads
//!   again after a gap, and shows it on `{"op": "replica", "url": u}`.
//! - Every other message is reported to the observer as a `forward` whose
//!   value is the message as JSON; with `echo`, requests are also answered
//!   200 with their own value. Without it the puppet never answers, which is
//!   how the tests provoke a 408.

use std::cell::RefCell;

use std::collections::BTreeMap;

use hyperty_guest::{Applied, Body, Guest, Identity, Message, MessageType, Replica, bus, registry, syncher, warn};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Config {
    observer: String,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    reject_subscribe: bool,
    #[serde(default)]
    provisional: bool,
}

struct State {
    me: String,
    config: Config,
    next_id: u64,
    /// Data objects observed, by URL.
    replicas: BTreeMap<String, Replica>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// A message as JSON, for commands and reports.
#[derive(Serialize, Deserialize, Default)]
struct MessageJson {
    #[serde(default)]
    id: u64,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    from: String,
    to: String,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// The sender's identity as the host delivered it, `[user, idp]`; in a
    /// command, an identity the puppet tries to claim (which the host refuses).
    #[serde(default)]
    identity: Option<(String, String)>,
}

impl MessageJson {
    fn from_message(m: &Message) -> Self {
        let kind = m.type_.name();
        MessageJson {
            id: m.id,
            kind: kind.to_string(),
            from: m.from.clone(),
            to: m.to.clone(),
            code: m.body.code,
            resource: m.body.resource.clone(),
            value: m.body.value.clone(),
            description: m.body.description.clone(),
            identity: m.identity.as_ref().map(|i| (i.user.clone(), i.idp.clone())),
        }
    }

    fn into_message(self) -> Result<Message, String> {
        let type_ = MessageType::parse(&self.kind).ok_or_else(|| format!("unknown message type {:?}", self.kind))?;
        Ok(Message {
            id: self.id,
            type_,
            from: self.from,
            to: self.to,
            body: Body { code: self.code, resource: self.resource, value: self.value, description: self.description },
            identity: self.identity.map(|(user, idp)| Identity { user, idp }),
        })
    }
}

#[derive(Deserialize)]
struct Command {
    op: String,
    #[serde(default)]
    message: Option<MessageJson>,
    #[serde(default)]
    timeout_ms: Option<u32>,
    #[serde(default)]
    domain: String,
    #[serde(default)]
    name: String,
    /// With `discover`: the query (`user`, `name`, `type`, `domain`, `scheme`).
    #[serde(default)]
    query: Option<serde_json::Map<String, Value>>,
    /// With `send`/`request`: replace the value by a JSON string of this
    /// many bytes (to test size limits without a huge command).
    #[serde(default)]
    pad: usize,
    /// Syncher calls: the object, its scheme, JSON data / patch, a child's
    /// name, observers to invite.
    #[serde(default)]
    url: String,
    #[serde(default)]
    scheme: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    patch: Option<Value>,
    #[serde(default)]
    observers: Vec<String>,
    /// With `create`, `set-child`, `update`: the JSON text passed as is
    /// (instead of `data` / `patch`), to send what a command cannot carry.
    #[serde(default)]
    text: Option<String>,
    /// With `create`: create up to this many objects, stopping at the
    /// first error; answered `{"urls": [...], "error": e | null}`.
    #[serde(default)]
    repeat: Option<u32>,
    /// With `reply`: the response's code (200 by default).
    #[serde(default)]
    code: Option<u16>,
}

struct Puppet;

impl Guest for Puppet {
    fn init(address: String, config: String) -> Result<(), String> {
        let config: Config = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
        STATE.with(|s| *s.borrow_mut() = Some(State { me: address, config, next_id: 1 << 32, replicas: BTreeMap::new() }));
        Ok(())
    }

    fn handle(msg: Message) {
        STATE.with(|s| {
            let mut state = s.borrow_mut();
            let Some(state) = state.as_mut() else { return };
            if msg.type_ == MessageType::Execute && msg.from == state.config.observer {
                let outcome = match run_command(state, &msg) {
                    Ok(v) => v,
                    Err(e) => json!({ "error": e }),
                };
                if let Err(e) = bus::reply(&msg, 200, Some(&outcome.to_string())) {
                    warn(&format!("cannot answer command: {}", e.describe()));
                }
                return;
            }
            observe(state, &msg);
            let report = serde_json::to_string(&MessageJson::from_message(&msg)).unwrap_or_default();
            state.next_id += 1;
            let forward = Message::new(state.next_id, MessageType::Forward, &state.me, &state.config.observer, report);
            if let Err(e) = bus::send(&forward) {
                warn(&format!("cannot report to observer: {}", e.describe()));
            }
            let asked = matches!(msg.type_, MessageType::Subscribe | MessageType::Read) && msg.value_str("observer").is_some();
            if state.config.reject_subscribe && asked {
                if let Err(e) = bus::reply(&msg, 403, None) {
                    warn(&format!("cannot refuse: {}", e.describe()));
                }
            } else if state.config.echo && msg.type_ != MessageType::Response {
                if state.config.provisional
                    && let Err(e) = bus::reply(&msg, 100, None)
                {
                    warn(&format!("cannot answer 100: {}", e.describe()));
                }
                if let Err(e) = bus::reply(&msg, 200, msg.body.value.as_deref()) {
                    warn(&format!("cannot echo: {}", e.describe()));
                }
            }
        });
    }
}

/// Keeps the replicas current: a 200 carrying an object's state (re)starts
/// one; a delta from an object's URL is applied; a gap asks for the state.
fn observe(state: &mut State, msg: &Message) {
    if msg.type_ == MessageType::Response {
        if let (Some(200), Some(url), Some(value)) = (msg.body.code, &msg.body.resource, &msg.body.value)
            && let Ok(replica) = Replica::from_state(url, value)
        {
            state.replicas.insert(url.clone(), replica);
        }
        return;
    }
    let Some(replica) = state.replicas.get_mut(&msg.from) else { return };
    match replica.apply(msg) {
        Ok(Applied::Gap { .. }) => {
            state.next_id += 1;
            let read = Message::new(state.next_id, MessageType::Read, &state.me, &msg.from, "null");
            if let Err(e) = bus::request(&read, None) {
                warn(&format!("cannot read {} again: {}", msg.from, e.describe()));
            }
        }
        Ok(_) => {}
        Err(e) => warn(&format!("bad delta from {}: {e}", msg.from)),
    }
}

fn run_command(state: &mut State, msg: &Message) -> Result<Value, String> {
    let value = msg.body.value.as_deref().ok_or("command without value")?;
    let command: Command = serde_json::from_str(value).map_err(|e| format!("bad command: {e}"))?;
    match command.op.as_str() {
        "send" | "request" => {
            let mut m = command.message.ok_or("command without message")?;
            if m.from.is_empty() {
                m.from = state.me.clone();
            }
            if command.pad > 0 {
                m.value = Some(format!("\"{}\"", "x".repeat(command.pad)));
            }
            let m = m.into_message()?;
            let sent = if command.op == "send" { bus::send(&m) } else { bus::request(&m, command.timeout_ms) };
            sent.map_err(|e| e.describe())?;
            Ok(json!({ "ok": true }))
        }
        "reply" => {
            // Answers `message` (the request, as the puppet chooses to
            // describe it) with 200 and its value.
            let request = command.message.ok_or("command without message")?.into_message()?;
            bus::reply(&request, command.code.unwrap_or(200), request.body.value.as_deref()).map_err(|e| e.describe())?;
            Ok(json!({ "ok": true }))
        }
        "lookup" => Ok(json!({ "address": registry::lookup(&command.domain, &command.name) })),
        "replica" => {
            let r = state.replicas.get(&command.url).ok_or_else(|| format!("no replica of {}", command.url))?;
            Ok(json!({ "version": r.version, "data": r.data, "children": r.children, "deleted": r.deleted }))
        }
        "discover" => {
            let q = command.query.unwrap_or_default();
            let str_field = |k: &str| q.get(k).and_then(Value::as_str).map(str::to_owned);
            let query = registry::Query {
                user: str_field("user"),
                name: str_field("name"),
                hyperty_type: str_field("type"),
                domain: str_field("domain"),
                scheme: str_field("scheme"),
            };
            let found: Vec<Value> = registry::discover(&query)
                .into_iter()
                .map(|r| json!({ "address": r.address, "name": r.name, "domain": r.domain, "user": r.user,
                    "types": r.hyperty_types, "schemes": r.schemes, "status": format!("{:?}", r.status) }))
                .collect();
            Ok(json!({ "found": found }))
        }
        "create" if command.repeat.is_some() => {
            let data = object_json(command.pad, command.text, command.data);
            let mut urls = Vec::new();
            for _ in 0..command.repeat.unwrap_or(0) {
                match syncher::create(&command.scheme, &data) {
                    Ok(url) => urls.push(url),
                    Err(e) => return Ok(json!({ "urls": urls, "error": sync_error(e) })),
                }
            }
            Ok(json!({ "urls": urls, "error": null }))
        }
        "create" | "invite" | "update" | "set-child" | "remove-child" | "delete" => {
            let text = command.text;
            let json = |v: Option<Value>| object_json(command.pad, text.clone(), v);
            let result = match command.op.as_str() {
                "create" => syncher::create(&command.scheme, &json(command.data)).map(|url| json!({ "url": url })),
                "invite" => syncher::invite(&command.url, &command.observers).map(|()| json!({ "ok": true })),
                "update" => syncher::update(&command.url, &json(command.patch)).map(|v| json!({ "version": v })),
                "set-child" => syncher::set_child(&command.url, &command.name, &json(command.data)).map(|v| json!({ "version": v })),
                "remove-child" => syncher::remove_child(&command.url, &command.name).map(|v| json!({ "version": v })),
                _ => syncher::delete(&command.url).map(|()| json!({ "ok": true })),
            };
            result.map_err(sync_error)
        }
        other => Err(format!("unknown op {other:?}")),
    }
}

/// The JSON text of a syncher command: `text` as is, else a JSON string of
/// `pad` bytes, else `value`.
fn object_json(pad: usize, text: Option<String>, value: Option<Value>) -> String {
    match text {
        Some(text) => text,
        None if pad > 0 => format!("\"{}\"", "x".repeat(pad)),
        None => value.unwrap_or(Value::Null).to_string(),
    }
}

fn sync_error(e: syncher::SyncError) -> String {
    match e {
        syncher::SyncError::Forbidden(s) => format!("forbidden: {s}"),
        syncher::SyncError::NotFound(s) => format!("not-found: {s}"),
        syncher::SyncError::Invalid(s) => format!("invalid: {s}"),
        syncher::SyncError::Limit(s) => format!("limit: {s}"),
    }
}

hyperty_guest::export!(Puppet);
