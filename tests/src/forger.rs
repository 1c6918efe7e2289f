//! `forging-stub` driven from a test: a protostub that posts whatever
//! envelopes the test orders (as anyone who can publish on a domain's node
//! could) and reports what the host gives it to carry out.

use std::time::Duration;

use hyperty_host::{Address, Digest, Message, MessageType, Runtime};
use serde_json::{Value, json};

use crate::{Driver, TestBundle, guest, reported};

/// Adds `forging-stub` as the protostub of `domain`, reporting to its
/// [`Forger`]'s observer, an address of `domain` (what comes in through a
/// stub reaches only its own domain's addresses), with `assertion` on every
/// report where `domain` requires identity.
pub fn with_forger(bundle: TestBundle, domain: &str, assertion: Option<Value>) -> TestBundle {
    let mut config = json!({ "report-to": Forger::observer(domain) });
    if let Some(assertion) = assertion {
        config["report-assertion"] = assertion;
    }
    with_forger_config(bundle, domain, config)
}

/// Adds `forging-stub` as the protostub of `domain` with `config` (see the
/// guest's documentation).
pub fn with_forger_config(bundle: TestBundle, domain: &str, config: Value) -> TestBundle {
    with_forger_entry(bundle, domain, config, json!({}))
}

/// The same, with `more` keys on the stub's bundle entry (`durable`).
pub fn with_forger_entry(bundle: TestBundle, domain: &str, config: Value, more: Value) -> TestBundle {
    let component = guest("forging-stub");
    let bytes = std::fs::read(&component).unwrap();
    let mut entry = json!({
        "component": component.display().to_string(),
        "sha256": Digest::of(&bytes).to_string(),
        // Granted, never used: the forger has no network.
        "endpoints": ["127.0.0.1:9"],
        "config": config,
    });
    for (k, v) in more.as_object().into_iter().flatten() {
        entry[k] = v.clone();
    }
    bundle.protostub(domain, &[], entry)
}

/// Orders the forging stub of a domain through the bus, and reads what it
/// reports, both through the endpoint `hyperty://<domain>/observer`.
pub struct Forger {
    address: Address,
    /// The endpoint `hyperty://<domain>/observer`.
    pub reports: Driver,
    orders: u64,
}

impl Forger {
    /// The forger of `domain` (deployed with [`with_forger`]) and its
    /// observer endpoint, opened here.
    pub fn new(runtime: &Runtime, domain: &str) -> Forger {
        let address = Address::parse(format!("hyperty://{domain}/forger")).unwrap();
        Forger { address, reports: Driver::at(runtime, &Forger::observer(domain)), orders: 0 }
    }

    /// Where the forger of `domain` reports.
    pub fn observer(domain: &str) -> String {
        format!("hyperty://{domain}/observer")
    }

    /// The stub posts `envelope` (with `post-from(vouched, …)` if given;
    /// a JSON string is posted as it is); what the host's `post` returned.
    pub fn post(&mut self, envelope: Value, vouched: Option<&str>) -> String {
        self.order(json!({ "envelope": envelope, "vouched": vouched }))
    }

    /// The stub reports the status `live` `times` times, as fast as it can
    /// (details `flood 0` …), then answers.
    pub fn flood_status(&mut self, times: u64) {
        assert_eq!(self.order(json!({ "status-flood": times })), "ok");
    }

    /// The stub reports the status `live` `times` times, as fast as it can,
    /// then traps (and is restarted); returns at once.
    pub fn flood_status_then_trap(&mut self, times: u64) {
        self.send_order(json!({ "status-flood": times, "then-trap": true }));
    }

    /// Sends `order` (given its id) and waits for the stub's report of it:
    /// its `result`.
    fn order(&mut self, order: Value) -> String {
        let id = self.send_order(order);
        let report = self.reports.expect(|m| self.is_report(m) && reported(m)["posted"] == id);
        reported(&report)["result"].as_str().unwrap().to_owned()
    }

    /// Sends `order`, given the next id, without waiting for its report;
    /// that id.
    pub fn send_order(&mut self, mut order: Value) -> u64 {
        self.orders += 1;
        let id = self.orders;
        order["id"] = json!(id);
        let from = self.reports.address().clone();
        let m = Message::new(self.reports.fresh_id(), MessageType::Update, from, self.address.clone(), Some(order.to_string()));
        self.reports.endpoint.send(m).unwrap();
        id
    }

    /// The next message the host gave the stub to carry out (its
    /// envelope), registry announcements aside.
    pub fn outbound(&self) -> Value {
        let report = self.reports.expect(|m| self.carried(m));
        reported(&report)["outbound"].clone()
    }

    /// A report of something more the stub was given to carry out, if one
    /// is there now (without waiting).
    pub fn carried_more(&self) -> Option<Message> {
        self.reports.find(|m| self.carried(m), Duration::ZERO)
    }

    /// Whether `m` reports a message the stub carried (not an announcement).
    pub fn carried(&self, m: &Message) -> bool {
        let to = reported(m)["outbound"]["to"].as_str().map(str::to_owned);
        self.is_report(m) && to.is_some_and(|to| !to.starts_with("domain://registry."))
    }

    /// Whether `m` is a report of the stub.
    pub fn is_report(&self, m: &Message) -> bool {
        m.kind == MessageType::Forward && m.from == self.address
    }
}
