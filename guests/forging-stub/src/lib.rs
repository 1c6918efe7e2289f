//! A hostile protostub for the trust-boundary tests (`tests/tests/trust.rs`):
//! it stands for whoever can publish on a domain's messaging node. It has
//! no network; it posts into its host whatever envelopes the test orders,
//! and tells the test what the host gives it to carry out.
//!
//! Configuration: `{"report-to": "<address>", "report-assertion": {"idp":
//! "…", "token": "…"}, "init-sleep-ms": n}` (other keys are ignored;
//! `init-sleep-ms`, optional, makes `init` sleep that long first). What comes in through the
//! stub of a domain goes only to that domain's addresses, so `report-to` is
//! an address of the stub's own domain; `report-assertion`, optional, is
//! attached to every report (for a domain that requires identity).
//!
//! - A message the host queues for `hyperty://<domain>/forger` is an order:
//!   its value is `{"id": n, "envelope": <envelope as JSON, or a string
//!   posted as is>, "vouched": "<domain>"}` (`vouched` optional). The stub
//!   posts the envelope — with `post-from(vouched, …)` when `vouched` is
//!   given, as a node with per-subject permissions would — and reports
//!   `{"posted": n, "result": "ok" | "<the host's error>"}`.
//! - An order `{"id": n, "status-flood": k}` reports the status `live` k
//!   times (details `flood 0` … `flood k-1`), as fast as it can, then
//!   reports `{"posted": n, "result": "ok"}` — or, with `"then-trap":
//!   true`, panics instead.
//! - Any other message queued is reported as `{"outbound": <its envelope>}`.
//!
//! Reports are `forward` envelopes from `hyperty://<domain>/forger` to
//! `report-to`, posted like anything received. Every queued message is
//! taken as delivered at once.

use std::cell::RefCell;

use serde_json::{Value, json};

wit_bindgen::generate!({
    path: "../../wit",
    world: "protostub",
    generate_all,
});

use exports::rethink::hyperty::stub::Guest;
use rethink::hyperty::log::{Level, log};
use rethink::hyperty::stub_host::{self as host, StubStatus, Work};
use wasi::clocks::monotonic_clock;
use wasi::io::poll;

struct Forger {
    /// `hyperty://<domain>/forger`: where orders go.
    address: String,
    report_to: String,
    /// Attached to every report as its `assertion` (or `null`).
    report_assertion: Value,
    /// The origin of this instance's reports (fresh per instance).
    origin: String,
    next: u64,
}

thread_local! {
    static FORGER: RefCell<Option<Forger>> = const { RefCell::new(None) };
}

impl Forger {
    fn report(&mut self, value: Value) {
        self.next += 1;
        let envelope = json!({ "v": 1, "origin": self.origin, "seq": self.next, "id": self.next, "type": "forward",
            "from": self.address, "to": self.report_to, "body": { "value": value.to_string() },
            "assertion": self.report_assertion });
        if let Err(e) = host::post(&envelope.to_string()) {
            log(Level::Warn, &format!("report not taken: {e}"));
        }
    }

    fn work(&mut self) {
        while let Some(work) = host::next_work() {
            let Work::Send(outbound) = work else { continue };
            host::delivered(outbound.seq);
            let envelope: Value = serde_json::from_str(&outbound.envelope).unwrap_or(Value::Null);
            if outbound.to != self.address {
                self.report(json!({ "outbound": envelope }));
                continue;
            }
            let order: Value = envelope["body"]["value"].as_str().and_then(|v| serde_json::from_str(v).ok()).unwrap_or(Value::Null);
            if let Some(k) = order["status-flood"].as_u64() {
                for i in 0..k {
                    host::report_status(StubStatus::Live, &format!("flood {i}"));
                }
                if order["then-trap"] == json!(true) {
                    panic!("the forging stub traps after its status flood, as ordered");
                }
                self.report(json!({ "posted": order["id"], "result": "ok" }));
                continue;
            }
            let text = match &order["envelope"] {
                Value::String(raw) => raw.clone(),
                other => other.to_string(),
            };
            let result = match order["vouched"].as_str() {
                Some(domain) => host::post_from(domain, &text),
                None => host::post(&text),
            };
            self.report(json!({ "posted": order["id"], "result": result.err().unwrap_or_else(|| "ok".into()) }));
        }
    }
}

struct ForgingStub;

impl Guest for ForgingStub {
    fn init(domain: String, config: String) -> Result<(), String> {
        let config: Value = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
        if let Some(ms) = config["init-sleep-ms"].as_u64() {
            // A stub that hangs at deployment: the host runs `init` to check
            // the config on the deployer's thread.
            monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
        }
        let report_to = config["report-to"].as_str().ok_or("report-to is missing")?.to_owned();
        let forger = Forger {
            address: format!("hyperty://{domain}/forger"),
            report_to,
            report_assertion: config["report-assertion"].clone(),
            origin: format!("forger-{}", monotonic_clock::now()),
            next: 0,
        };
        FORGER.with(|f| *f.borrow_mut() = Some(forger));
        host::report_status(StubStatus::Live, "forging");
        Ok(())
    }

    fn poll(wait_ms: u32) {
        FORGER.with(|f| {
            let mut f = f.borrow_mut();
            let Some(forger) = f.as_mut() else { return };
            forger.work();
            let timer = monotonic_clock::subscribe_duration(u64::from(wait_ms) * 1_000_000);
            let ready = host::work_ready();
            poll::poll(&[&timer, &ready]);
            forger.work();
        });
    }
}

export!(ForgingStub);
