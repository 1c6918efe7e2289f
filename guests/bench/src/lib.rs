//! Benchmark hyperty. With config `{"role": "sink"}` it answers `read`
//! requests with 200 and silently counts everything else. With `{"role": "driver"}` an
//! `execute` request `{"to": sink, "count": n, "mode": "oneway" | "rr",
//! "batch": b}` makes it send `n` messages to the sink and answer the execute
//! request when they are all through:
//! - `rr`: one request at a time, the next sent when the response arrives;
//! - `oneway`: batches of `b` notifications, each batch closed by a request
//!   whose response releases the next batch (flow control within the
//!   receiver's inbox); with `"windows": w`, `w` batches are in flight at
//!   once (a sliding window: each response releases one more). An answer
//!   other than 200, or a refused send, stops the run: it answers 500
//!   once every request it sent is answered.
//!
//! The sink also checks the sequence: a driver numbers each run's messages
//! 1, 2, 3…, so a message whose id is neither the previous one + 1 nor 1 (a
//! new run) is lost, duplicated or reordered, and counted as an anomaly. An
//! `execute` request to the sink answers `{"received": n, "anomalies": n,
//! "identified": n}` (the soak test's ledger; `identified` counts messages
//! that carried the sender's identity).
//!
//! For the durable-delivery tests: a sink with `"ids": true` also keeps
//! every id it saw and adds `"duplicates"` (ids seen before), `"lowest"`
//! and `"highest"` to its ledger. A driver's `"mode": "notify"` run sends
//! `count` notifications numbered from `"first"` (default 1) at once, and
//! answers when every `send` returned; a driver's config may hold such a
//! run as `"start"`, which it sends from `init` (and logs
//! `notify run done: <n> sent` or why it stopped). A sink with `"slow":
//! {"from", "to", "spin"}` spins `spin` rounds on each id in `from..=to`,
//! then logs `handled <id>`. A sink with `"trap_at": id` traps on that id
//! (and starts again with an empty ledger).

use std::cell::RefCell;

use hyperty_guest::{Guest, Message, MessageType, bus};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Config {
    role: String,
    #[serde(default)]
    ids: bool,
    #[serde(default)]
    start: Option<Run>,
    #[serde(default)]
    slow: Option<Slow>,
    /// A sink traps (panics) on the message with this id.
    #[serde(default)]
    trap_at: Option<u64>,
}

/// Ids `from..=to` each cost the sink `spin` loop rounds, after which it
/// logs `handled <id>` (a test knows what was handled before a crash).
#[derive(Deserialize, Clone, Copy)]
struct Slow {
    from: u64,
    to: u64,
    spin: u64,
}

#[derive(Deserialize)]
struct Run {
    to: String,
    count: u64,
    mode: String,
    #[serde(default = "default_batch")]
    batch: u64,
    #[serde(default = "default_first")]
    first: u64,
    /// `oneway`: batches in flight at once (each closed by its request; the
    /// next sent as a response comes back). Default 1.
    #[serde(default = "default_windows")]
    windows: u64,
}

fn default_windows() -> u64 {
    1
}

fn default_first() -> u64 {
    1
}

fn default_batch() -> u64 {
    64
}

struct Active {
    run: Run,
    command: Message,
    sent: u64,
    /// Requests sent and not yet answered.
    outstanding: u64,
    /// The code of the first answer that was not 200: nothing more is
    /// sent, and the run fails once every request it sent is answered
    /// (so no answer of it reaches a later run).
    failed: Option<serde_json::Value>,
}

struct State {
    me: String,
    sink: bool,
    received: u64,
    anomalies: u64,
    identified: u64,
    last_id: u64,
    active: Option<Active>,
    /// Ids seen (a sink with `ids`).
    ids: Option<std::collections::BTreeSet<u64>>,
    duplicates: u64,
    slow: Option<Slow>,
    trap_at: Option<u64>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

const PAYLOAD: &str = r#"{"bench":"0123456789012345678901234567890123456789"}"#;

struct Bench;

impl Guest for Bench {
    fn init(address: String, config: String) -> Result<(), String> {
        let config: Config = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
        let sink = match config.role.as_str() {
            "sink" => true,
            "driver" => false,
            other => return Err(format!("unknown role {other:?}")),
        };
        let ids = config.ids.then(Default::default);
        if let Some(run) = &config.start {
            match notify(&address, run) {
                Ok(n) => hyperty_guest::info(&format!("notify run done: {n} sent")),
                Err(e) => hyperty_guest::warn(&format!("notify run stopped: {e}")),
            }
        }
        STATE.with(|s| {
            *s.borrow_mut() =
                Some(State { me: address, sink, received: 0, anomalies: 0, identified: 0, last_id: 0, active: None, ids, duplicates: 0, slow: config.slow, trap_at: config.trap_at })
        });
        Ok(())
    }

    fn handle(msg: Message) {
        STATE.with(|s| {
            let mut state = s.borrow_mut();
            let Some(state) = state.as_mut() else { return };
            if state.sink {
                if msg.type_ == MessageType::Execute {
                    let mut ledger = json!({ "received": state.received, "anomalies": state.anomalies, "identified": state.identified });
                    if let Some(ids) = &state.ids {
                        ledger["duplicates"] = state.duplicates.into();
                        ledger["lowest"] = ids.first().copied().into();
                        ledger["highest"] = ids.last().copied().into();
                    }
                    let _ = bus::reply(&msg, 200, Some(&ledger.to_string()));
                    return;
                }
                if state.trap_at == Some(msg.id) {
                    panic!("asked to trap at id {}", msg.id);
                }
                state.received += 1;
                if let Some(ids) = &mut state.ids
                    && !ids.insert(msg.id)
                {
                    state.duplicates += 1;
                }
                if msg.id != state.last_id + 1 && msg.id != 1 {
                    state.anomalies += 1;
                }
                state.last_id = msg.id;
                state.identified += u64::from(msg.identity.is_some());
                if let Some(slow) = state.slow.filter(|s| (s.from..=s.to).contains(&msg.id)) {
                    let mut x = msg.id;
                    for i in 0..slow.spin {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                    std::hint::black_box(x);
                    hyperty_guest::info(&format!("handled {}", msg.id));
                }
                // Only `read`s are requests here (the driver's); the
                // `update`s of a one-way run are notifications: no answer.
                if msg.type_ == MessageType::Read {
                    let _ = bus::reply(&msg, 200, None);
                }
                return;
            }
            if msg.type_ == MessageType::Execute {
                let Some(run) = msg.body.value.as_deref().and_then(|v| serde_json::from_str::<Run>(v).ok()) else {
                    let _ = bus::reply(&msg, 400, None);
                    return;
                };
                if run.mode == "notify" {
                    let _ = match notify(&state.me, &run) {
                        Ok(n) => bus::reply(&msg, 200, Some(&json!({ "sent": n }).to_string())),
                        Err(e) => bus::reply(&msg, 500, Some(&json!({ "failed": e }).to_string())),
                    };
                    return;
                }
                let windows = if run.mode == "oneway" { run.windows.max(1) } else { 1 };
                state.active = Some(Active { run, command: msg, sent: 0, outstanding: 0, failed: None });
                for _ in 0..windows {
                    step(state);
                    if state.active.as_ref().is_none_or(|a| a.sent >= a.run.count || a.failed.is_some()) {
                        break;
                    }
                }
            } else if msg.type_ == MessageType::Response {
                let Some(active) = state.active.as_mut() else { return };
                active.outstanding = active.outstanding.saturating_sub(1);
                if msg.body.code != Some(200) && active.failed.is_none() {
                    active.failed = Some(json!(msg.body.code));
                }
                step(state);
            }
        });
    }
}

/// Sends the notifications of a `notify` run from `me`: how many, or why
/// not all.
fn notify(me: &str, run: &Run) -> Result<u64, String> {
    for id in run.first..run.first + run.count {
        let m = Message::new(id, MessageType::Update, me, &run.to, PAYLOAD);
        bus::send(&m).map_err(|e| format!("message {id}: {}", e.describe()))?;
    }
    Ok(run.count)
}

/// Sends the next request (rr) or batch (oneway), or reports completion.
fn step(state: &mut State) {
    let Some(active) = state.active.as_mut() else { return };
    if let Some(why) = &active.failed {
        if active.outstanding == 0 {
            let _ = bus::reply(&active.command, 500, Some(&json!({ "failed": why }).to_string()));
            state.active = None;
        }
        return;
    }
    if active.sent >= active.run.count {
        if active.outstanding > 0 {
            return;
        }
        let done = json!({ "sent": active.sent }).to_string();
        let _ = bus::reply(&active.command, 200, Some(&done));
        state.active = None;
        return;
    }
    let mut fail = None;
    if active.run.mode == "oneway" {
        let batch = active.run.batch.min(active.run.count - active.sent);
        for _ in 1..batch {
            active.sent += 1;
            let m = Message::new(active.sent, MessageType::Update, &state.me, &active.run.to, PAYLOAD);
            if let Err(e) = bus::send(&m) {
                fail = Some(e.describe());
                break;
            }
        }
    }
    if fail.is_none() {
        active.sent += 1;
        let m = Message::new(active.sent, MessageType::Read, &state.me, &active.run.to, PAYLOAD);
        match bus::request(&m, None) {
            Ok(_) => active.outstanding += 1,
            Err(e) => fail = Some(e.describe()),
        }
    }
    if let Some(e) = fail {
        active.failed = Some(json!(e));
        step(state);
    }
}

hyperty_guest::export!(Bench);
