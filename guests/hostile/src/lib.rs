//! A hostile hyperty for the sandbox tests. Config `{"mode": ...}` picks
//! what it does with every request it receives (responses are ignored):
//!
//! - `loop`: never returns (interrupted at the call deadline);
//! - `sleep`: sleeps `ms` milliseconds (from the request value; an hour
//!   without it) in `wasi:io/poll` (`std::thread::sleep`, a host call its
//!   epoch deadline does not interrupt), and answers with how long it slept
//!   by its monotonic clock;
//! - `memory`: allocates until memory runs out;
//! - `hoard`: allocates `mb` MiB (from the request value), touches and keeps
//!   it, and answers with how many MiB it holds in all;
//! - `recursion`: recurses until the stack overflows;
//! - `trap`: panics;
//! - `flood`: sends `count` messages to `to` (from the request value) as
//!   fast as it can, then answers with how many were accepted or refused;
//! - `oversize`: sends a message with a `bytes`-long value, answers with the
//!   error;
//! - `garbage`: sends malformed messages of every kind, answers with the
//!   errors;
//! - `vault`: keeps `secret` (from the config) and a counter; answers `read`
//!   with the counter only and counts `update`s from its `owner`;
//! - `snoop`: tries every import against the hyperty `victim` names (whose
//!   owner is `owner`: it forges that address too) and answers with
//!   everything it saw.
//!
//! In every mode, a request whose value has `"panic": true` makes it panic.

use std::cell::RefCell;
use std::hint::black_box;

use hyperty_guest::{Body, Guest, Message, MessageType, bus, registry};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize, Default)]
struct Config {
    mode: String,
    #[serde(default)]
    secret: String,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    victim: String,
}

struct State {
    me: String,
    config: Config,
    counter: u64,
    /// What `hoard` keeps.
    hoard: Vec<Vec<u8>>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

struct Hostile;

impl Guest for Hostile {
    fn init(address: String, config: String) -> Result<(), String> {
        let config: Config = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
        STATE.with(|s| *s.borrow_mut() = Some(State { me: address, config, counter: 0, hoard: Vec::new() }));
        Ok(())
    }

    fn handle(msg: Message) {
        if msg.type_ == MessageType::Response {
            return;
        }
        let mode = STATE.with(|s| s.borrow().as_ref().map(|s| s.config.mode.clone())).unwrap_or_default();
        let value: Value = msg.body.value.as_deref().and_then(|v| serde_json::from_str(v).ok()).unwrap_or(Value::Null);
        if value["panic"] == true {
            panic!("asked to panic");
        }
        let answer = match mode.as_str() {
            "loop" => loop {
                black_box(0);
            },
            "sleep" => {
                let started = std::time::Instant::now();
                std::thread::sleep(std::time::Duration::from_millis(value["ms"].as_u64().unwrap_or(3_600_000)));
                json!({ "slept_ms": started.elapsed().as_millis() as u64 })
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "hoard" => hoard(value["mb"].as_u64().unwrap_or(0) as usize),
            "recursion" => json!(deep(black_box(u64::MAX))),
            "trap" => panic!("hostile hyperty panics on every message"),
            "flood" => flood(&value),
            "oversize" => oversize(&value),
            "garbage" => garbage(),
            "vault" => vault(&msg),
            "snoop" => snoop(),
            other => json!({ "error": format!("unknown mode {other}") }),
        };
        if answer != Value::Null {
            let _ = bus::reply(&msg, 200, Some(&answer.to_string()));
        }
    }
}

fn me() -> String {
    STATE.with(|s| s.borrow().as_ref().map(|s| s.me.clone())).unwrap_or_default()
}

fn deep(n: u64) -> u64 {
    if n == 0 { 0 } else { black_box(deep(black_box(n - 1))) + 1 }
}

fn hoard(mb: usize) -> Value {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.as_mut().unwrap();
        s.hoard.push(black_box(vec![1u8; mb << 20]));
        json!({ "held_mb": s.hoard.iter().map(Vec::len).sum::<usize>() >> 20 })
    })
}

fn flood(value: &Value) -> Value {
    let to = value["to"].as_str().unwrap_or_default().to_owned();
    let count = value["count"].as_u64().unwrap_or(0);
    let me = me();
    let (mut sent, mut rate_limited, mut other) = (0u64, 0u64, 0u64);
    for i in 0..count {
        match bus::send(&Message::new(i, MessageType::Update, &me, &to, "{}")) {
            Ok(()) => sent += 1,
            Err(hyperty_guest::SendError::RateLimited(_)) => rate_limited += 1,
            Err(_) => other += 1,
        }
    }
    json!({ "sent": sent, "rate_limited": rate_limited, "other": other })
}

fn oversize(value: &Value) -> Value {
    let bytes = value["bytes"].as_u64().unwrap_or(0) as usize;
    let to = value["to"].as_str().unwrap_or_default().to_owned();
    let big = format!("\"{}\"", "x".repeat(bytes));
    let msg = Message::new(1, MessageType::Update, &me(), &to, big);
    match bus::send(&msg) {
        Ok(()) => json!({ "ok": true }),
        Err(e) => json!({ "error": e.describe() }),
    }
}

fn garbage() -> Value {
    let me = me();
    let long = format!("hyperty://a.example/{}", "x".repeat(5000));
    let cases: Vec<Message> = vec![
        Message::new(1, MessageType::Read, &me, "", "{}"),
        Message::new(2, MessageType::Read, &me, "\0\u{1}\u{2}", "{}"),
        Message::new(3, MessageType::Read, &me, "hyperty://", "{}"),
        Message::new(4, MessageType::Read, &me, "hyperty://bad domain/x", "{}"),
        Message::new(5, MessageType::Read, &me, &long, "{}"),
        Message::new(6, MessageType::Read, &me, "hyperty://ünïcödé.example/x", "{}"),
        Message::new(7, MessageType::Read, &me, "hyperty://a.example/x", "{not json"),
        Message::new(8, MessageType::Read, &me, "hyperty://a.example/x", "\u{0}"),
        Message::new(9, MessageType::Read, "", "hyperty://a.example/x", "{}"),
        Message { id: u64::MAX, type_: MessageType::Response, from: me.clone(), to: "hyperty://a.example/x".into(), body: Body { code: Some(u16::MAX), resource: Some("\0".into()), value: None, description: Some("\u{FFFF}".into()) }, identity: None },
    ];
    let mut errors = Vec::new();
    for m in &cases {
        errors.push(match bus::send(m) {
            Ok(()) => "accepted".to_owned(),
            Err(e) => e.describe(),
        });
    }
    for m in &cases {
        if let Err(e) = bus::request(m, Some(0)) {
            errors.push(e.describe());
        }
    }
    json!({ "errors": errors })
}

fn vault(msg: &Message) -> Value {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.as_mut().unwrap();
        match msg.type_ {
            MessageType::Update if msg.from == s.config.owner => {
                s.counter += 1;
                json!({ "counter": s.counter })
            }
            MessageType::Update => json!({ "refused": "not the owner" }),
            MessageType::Read | MessageType::Execute => json!({ "counter": s.counter, "holds_secret": !s.config.secret.is_empty() }),
            _ => json!({ "error": "unsupported" }),
        }
    })
}

/// Tries every import against the victim; returns what came back.
fn snoop() -> Value {
    let (me, victim, owner) = STATE.with(|s| {
        let s = s.borrow();
        let s = s.as_ref().unwrap();
        (s.me.clone(), s.config.victim.clone(), s.config.owner.clone())
    });
    let (domain, name) = victim.split_once('/').unwrap_or(("", ""));
    let victim_address = registry::lookup(domain, name).unwrap_or_default();
    let mut seen = vec![json!({ "lookup": victim_address })];
    let attempts = [
        // Write to the vault as the vault itself, and as its real owner
        // (whose updates it counts).
        Message::new(1, MessageType::Update, &victim_address, &victim_address, "{}"),
        Message::new(2, MessageType::Update, &owner, &victim_address, "{}"),
        // Update it honestly (the vault refuses: not the owner).
        Message::new(3, MessageType::Update, &me, &victim_address, "{}"),
    ];
    for m in &attempts {
        seen.push(json!({ "send": m.id, "result": bus::send(m).err().map(|e| e.describe()) }));
    }
    // Answer a request "from" the vault that was never made.
    let forged = Message::new(4, MessageType::Read, &me, &victim_address, "{}");
    seen.push(json!({ "reply": bus::reply(&forged, 200, Some("{}")).err().map(|e| e.describe()) }));
    // What WASI gives: no environment, no arguments (and no files: the
    // filesystem is not even importable without a grant).
    seen.push(json!({ "env": std::env::vars().collect::<Vec<_>>(), "args": std::env::args().collect::<Vec<_>>() }));
    json!({ "seen": seen })
}

hyperty_guest::export!(Hostile);
