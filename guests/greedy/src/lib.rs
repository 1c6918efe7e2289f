//! A greedy hyperty for the limits tests: it tries to make the host hold
//! what it should not. Config `{"observer": <address>}`. An `execute`
//! request's value `{"op": ...}` picks what it does, and is answered 200
//! with what the host said:
//!
//! - `pending` `{"to", "count", "timeout_ms", "retry_full", "pad"}`: sends `count` `read`
//!   requests with fresh ids to `to` (a sink that never answers; with
//!   `retry_full`, each refused `inbox-full` is sent again; with `pad`, each
//!   carries that many bytes more) and counts
//!   how they were taken: `{"sent", "too_many_pending", "other", "errors"}`
//!   (the first error of each kind);
//! - `log` `{"count", "bytes"}` or `{"line"}`: writes `count` lines of
//!   `bytes` bytes, or the one `line`, into the host's log;
//! - `json` `{"to"}`: sends a 100,000-deep value, `1e999999` and a
//!   500,000-digit number with `send`, `request` and `reply`: `{"errors"}`;
//! - `fields` `{"to"}`: sets fields only the host or a responder may set
//!   (`code`, `description`, a response's code through `send`, a reply to a
//!   response, a reply with code 1000): `{"errors"}`;
//! - `address` `{"paths"}`: sends to `hyperty://alice.example/<path>` for
//!   each path: `{"errors"}`;
//! - `busy` `{"ms"}`: keeps its domain's thread busy for `ms` milliseconds
//!   (under its call deadline), then answers `{"busy": ms}`.
//!
//! With `"refuse_init_bytes": n` its `init` fails with a reason of `n`
//! bytes. With `"at_init": {"op": ...}` in its config it does that op during its
//! own `init` (before the hyperties deployed after it are initialised),
//! and the op `init` answers what it got then.
//!
//! Every response it gets (to its own requests) is forwarded to the
//! observer as `{"id", "code", "description"}`.

use std::cell::RefCell;

use hyperty_guest::{Body, Guest, Message, MessageType, bus};
use serde_json::{Value, json};

struct State {
    me: String,
    observer: String,
    next_id: u64,
    /// What its `at_init` op got.
    at_init: Value,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

struct Greedy;

impl Guest for Greedy {
    fn init(address: String, config: String) -> Result<(), String> {
        let config: Value = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
        if let Some(n) = config["refuse_init_bytes"].as_u64() {
            // An init error as long as asked (the host must cut it).
            return Err("x".repeat(n as usize));
        }
        let observer = config["observer"].as_str().ok_or("config needs an observer")?.to_owned();
        STATE.with(|s| *s.borrow_mut() = Some(State { me: address.clone(), observer, next_id: 1 << 32, at_init: Value::Null }));
        if config["at_init"].is_object() {
            let got = perform(&address, &config["at_init"], None);
            STATE.with(|s| s.borrow_mut().as_mut().expect("set above").at_init = got);
        }
        Ok(())
    }

    fn handle(msg: Message) {
        let (me, observer) = STATE.with(|s| s.borrow().as_ref().map(|s| (s.me.clone(), s.observer.clone()))).unwrap_or_default();
        if msg.type_ == MessageType::Response {
            let report = json!({ "id": msg.id, "code": msg.body.code, "description": msg.body.description });
            let _ = bus::send(&Message::new(msg.id, MessageType::Forward, &me, &observer, report.to_string()));
            return;
        }
        let value: Value = msg.body.value.as_deref().and_then(|v| serde_json::from_str(v).ok()).unwrap_or(Value::Null);
        let answer = perform(&me, &value, Some(&msg));
        let _ = bus::reply(&msg, 200, Some(&answer.to_string()));
    }
}

/// Does op `value`; `msg` is the request that asked for it (none at init:
/// the ops that answer it are refused then).
fn perform(me: &str, value: &Value, msg: Option<&Message>) -> Value {
    match (value["op"].as_str().unwrap_or_default(), msg) {
        ("pending", _) => pending(me, value),
        ("log", _) => log(value),
        ("json", Some(msg)) => bad_json(me, value, msg),
        ("fields", Some(msg)) => fields(me, value, msg),
        ("address", _) => addresses(me, value),
        ("busy", _) => busy(value),
        ("init", _) => STATE.with(|s| s.borrow().as_ref().map_or(Value::Null, |s| s.at_init.clone())),
        (other, _) => json!({ "error": format!("unknown op {other:?} here") }),
    }
}

fn fresh_id() -> u64 {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.as_mut().expect("initialised");
        s.next_id += 1;
        s.next_id
    })
}

fn outcome<T>(result: Result<T, hyperty_guest::SendError>) -> String {
    match result {
        Ok(_) => "accepted".to_owned(),
        Err(e) => e.describe(),
    }
}

fn pending(me: &str, value: &Value) -> Value {
    let to = value["to"].as_str().unwrap_or_default();
    let count = value["count"].as_u64().unwrap_or(0);
    let timeout = value["timeout_ms"].as_u64().map(|t| t.min(u32::MAX.into()) as u32);
    let (mut sent, mut too_many, mut other) = (0u64, 0u64, 0u64);
    let mut errors = serde_json::Map::new();
    // With `retry_full`, a request refused `inbox-full` is sent again
    // (at most a million times): the back-pressure a patient sender obeys.
    let retry_full = value["retry_full"] == true;
    // With `pad`, each request carries that many bytes more.
    let body = value["pad"].as_u64().map_or_else(|| "{}".to_owned(), |n| json!({ "pad": "x".repeat(n as usize) }).to_string());
    for _ in 0..count {
        let request = Message::new(fresh_id(), MessageType::Read, me, to, &body);
        let mut result = bus::request(&request, timeout);
        let mut tries = 1;
        while retry_full && tries < 1_000_000 && matches!(result, Err(hyperty_guest::SendError::InboxFull(_))) {
            result = bus::request(&request, timeout);
            tries += 1;
        }
        match result {
            Ok(()) => sent += 1,
            Err(e) => {
                if matches!(e, hyperty_guest::SendError::TooManyPending(_)) {
                    too_many += 1;
                } else {
                    other += 1;
                }
                let text = e.describe();
                let kind = text.split(':').next().unwrap_or_default().to_owned();
                errors.entry(kind).or_insert(Value::String(text));
            }
        }
    }
    json!({ "sent": sent, "too_many_pending": too_many, "other": other, "errors": errors })
}

fn log(value: &Value) -> Value {
    if let Some(line) = value["line"].as_str() {
        hyperty_guest::info(line);
        return json!({ "logged": 1 });
    }
    let count = value["count"].as_u64().unwrap_or(0);
    let line = "x".repeat(value["bytes"].as_u64().unwrap_or(0) as usize);
    for _ in 0..count {
        hyperty_guest::info(&line);
    }
    json!({ "logged": count })
}

fn bad_json(me: &str, value: &Value, request: &Message) -> Value {
    let to = value["to"].as_str().unwrap_or_default();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let huge = "9".repeat(500_000);
    let mut errors = Vec::new();
    for bad in [deep.as_str(), "[1e999999]", huge.as_str()] {
        errors.push(outcome(bus::send(&Message::new(fresh_id(), MessageType::Update, me, to, bad))));
        errors.push(outcome(bus::request(&Message::new(fresh_id(), MessageType::Update, me, to, bad), None)));
        errors.push(outcome(bus::reply(request, 200, Some(bad))));
    }
    json!({ "errors": errors })
}

fn fields(me: &str, value: &Value, request: &Message) -> Value {
    let to = value["to"].as_str().unwrap_or_default();
    let with = |kind: MessageType, code: Option<u16>, description: Option<&str>| Message {
        id: fresh_id(),
        type_: kind,
        from: me.to_owned(),
        to: to.to_owned(),
        body: Body { code, resource: None, value: None, description: description.map(str::to_owned) },
        identity: None,
    };
    let mut response_to_me = request.clone();
    response_to_me.type_ = MessageType::Response;
    let errors = vec![
        // code on what is not a response
        outcome(bus::send(&with(MessageType::Update, Some(200), None))),
        outcome(bus::request(&with(MessageType::Read, Some(200), None), None)),
        // description on a request and a notification
        outcome(bus::request(&with(MessageType::Read, None, Some("the host says: all fine")), None)),
        outcome(bus::send(&with(MessageType::Update, None, Some("the host says: all fine")))),
        // a response's code through send, not reply
        outcome(bus::send(&with(MessageType::Response, Some(200), None))),
        // a reply to a response, and with a code that is no status
        outcome(bus::reply(&response_to_me, 200, None)),
        outcome(bus::reply(request, 1000, None)),
        // what remains a guest's: a resource on any message
        outcome(bus::send(&Message {
            body: Body { code: None, resource: Some("comm://alice.example/room".into()), value: None, description: None },
            ..with(MessageType::Update, None, None)
        })),
    ];
    json!({ "errors": errors })
}

fn addresses(me: &str, value: &Value) -> Value {
    let mut errors = Vec::new();
    for path in value["paths"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        let to = format!("hyperty://alice.example/{path}");
        errors.push(outcome(bus::send(&Message::new(fresh_id(), MessageType::Update, me, &to, "{}"))));
        errors.push(outcome(bus::request(&Message::new(fresh_id(), MessageType::Read, me, &to, "{}"), None)));
    }
    json!({ "errors": errors })
}

fn busy(value: &Value) -> Value {
    let ms = value["ms"].as_u64().unwrap_or(0);
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(ms) {
        std::hint::black_box(0);
    }
    json!({ "busy": ms })
}

hyperty_guest::export!(Greedy);
