//! `just bench`: the bus between real components, release build.
//!
//! - one-way messages/s from a hyperty in alice.example to one in
//!   bob.example (batches of 64 notifications, each closed by a request
//!   whose response releases the next batch: flow control inside the
//!   receiver's inbox);
//! - request/response round trips/s between the same two (one at a time);
//! - µs per hyperty instantiation from `InstancePre` into a fresh store;
//! - µs per hyperty deployment (instantiate from `InstancePre` with the
//!   pooling allocator, route, registry entry, `init` call), over a bundle of
//!   200 hyperties.
//!
//! The bus figures are measured side by side, interleaved, in two runtimes:
//! one without policies and one with 50+ Cedar policies on each domain and
//! on the bus (time windows, groups, forbids), plus the uncached decision
//! cost. Each figure is the median of 5 runs; the machines are shared and
//! noisy: read the ratio, not the absolute numbers.

use std::time::{Duration, Instant};

use std::sync::Arc;

use hyperty_host::{
    Address, CedarPolicies, PolicyDecisionPoint, Decision, Descriptor, EnforcementPoint, Endpoint, Message, MessageType, Parties, Runtime,
    RuntimeConfig,
};
use hyperty_tests::*;
use hyperty_tests::scale::{self, median};
use serde_json::json;

const RUNS: usize = 5;

/// Two runtimes side by side: without policies, and with a realistic Cedar
/// set on both domains and the bus.
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let plain = Bench::new(&dir, false);
    let checked = Bench::new(&dir, true);

    plain.run("oneway", 20_000); // warm-up
    checked.run("oneway", 20_000);
    let mut oneway = (Vec::new(), Vec::new());
    let mut rr = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        oneway.0.push(plain.run("oneway", 200_000));
        oneway.1.push(checked.run("oneway", 200_000));
        rr.0.push(plain.run("rr", 50_000));
        rr.1.push(checked.run("rr", 50_000));
    }
    let (o0, o1, r0, r1) = (median(oneway.0), median(oneway.1), median(rr.0), median(rr.1));
    println!("bus, alice.example -> bob.example, 64-byte JSON body (median of {RUNS}, interleaved):");
    println!("                        no policies     {POLICIES}+ Cedar policies   ratio");
    println!("  one-way msg/s:        {o0:>10.0}      {o1:>10.0}              {:.0}%", 100.0 * o1 / o0);
    println!("  request/response /s:  {r0:>10.0}      {r1:>10.0}              {:.0}%", 100.0 * r1 / r0);
    println!("  round trip:           {:>10.2} µs   {:>10.2} µs", 1e6 / r0, 1e6 / r1);
    println!("uncached Cedar decision ({POLICIES}+ policies): {:.1} µs", checked.cold_decision_us());
    println!("cached decision of a whole path (3 points, from this thread's cache): {:.0} ns", checked.warm_path_ns());

    let runtime = plain.runtime;
    let instantiate_us = median(
        (0..RUNS).map(|_| runtime.bench_instantiation(&guest("pong"), 1000).unwrap().as_secs_f64() * 1e6).collect(),
    );
    println!("hyperty instantiation from InstancePre (pooling allocator, fresh store):");
    println!("  {:>10.1} µs per instance", instantiate_us);
    let deploy_us = median((0..RUNS).map(|_| deploy_many(200)).collect());
    println!("hyperty deployment (instantiate + route + init), 200 per bundle:");
    println!("  {:>10.1} µs per hyperty", deploy_us);
}

/// Policies in each domain's set (the runtime's set has a few more).
const POLICIES: usize = 50;

struct Bench {
    runtime: Runtime,
    policies: Arc<CedarPolicies>,
    driver: Address,
    sink: Address,
    endpoint: Endpoint,
    next_id: std::cell::Cell<u64>,
    _bundle: TestBundle,
}

impl Bench {
    fn new(dir: &tempfile::TempDir, with_policies: bool) -> Bench {
        let policies = Arc::new(CedarPolicies::new());
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: cache_dir(),
            request_timeout: Duration::from_secs(30),
            policies: policies.clone(),
            ..RuntimeConfig::default()
        })
        .unwrap();
        let mut bundle = TestBundle::new()
            .hyperty("alice.example", "driver", &guest("bench"), json!({ "role": "driver" }))
            .hyperty("bob.example", "sink", &guest("bench"), json!({ "role": "sink" }))
            .user("alice.example", "driver", "user0@idp.example")
            .user("bob.example", "sink", "user1@idp.example")
            // The bus is measured here, not the flood limiter.
            .domain("alice.example", json!({ "limits": { "rate": 100_000_000, "burst": 1_000_000 } }));
        if with_policies {
            let (alice, bob, bus) = (dir.path().join("alice.cedar"), dir.path().join("bob.cedar"), dir.path().join("bus.cedar"));
            std::fs::write(&alice, realistic_policies("alice")).unwrap();
            std::fs::write(&bob, realistic_policies("bob")).unwrap();
            std::fs::write(&bus, realistic_policies("bus")).unwrap();
            bundle = bundle
                .domain("alice.example", json!({ "policies": [alice.to_str().unwrap()] }))
                .domain("bob.example", json!({ "policies": [bob.to_str().unwrap()] }));
            policies.set_runtime_policies(&bus).unwrap();
            for g in 0..10 {
                policies.set_group(&format!("team{g}"), (0..100).map(|u| format!("user{}@idp.example", u * 10 + g)));
            }
        }
        runtime.deploy(&bundle.load()).unwrap();
        let driver = runtime.lookup("alice.example", "driver").unwrap();
        let sink = runtime.lookup("bob.example", "sink").unwrap();
        let endpoint = runtime.endpoint("hyperty://bench.example/harness", 16).unwrap();
        Bench { runtime, policies, driver, sink, endpoint, next_id: Default::default(), _bundle: bundle }
    }

    /// Messages (or round trips) per second for one run of `count`.
    fn run(&self, mode: &str, count: u64) -> f64 {
        self.next_id.set(self.next_id.get() + 1);
        let command = json!({ "to": self.sink.to_string(), "count": count, "mode": mode, "batch": 64 });
        let msg = Message::new(
            self.next_id.get(),
            MessageType::Execute,
            self.endpoint.address().clone(),
            self.driver.clone(),
            Some(command.to_string()),
        );
        let started = Instant::now();
        self.endpoint.request(msg, None).unwrap();
        let answer = self.endpoint.recv_timeout(Duration::from_secs(120)).expect("the driver answers");
        let elapsed = started.elapsed();
        assert_eq!(answer.body.code, Some(200), "bench run failed: {:?}", answer.body);
        count as f64 / elapsed.as_secs_f64()
    }

    /// ns per three-point decision served by the thread's cache.
    fn warm_path_ns(&self) -> f64 {
        let msg = Message::new(1, MessageType::Update, self.driver.clone(), self.sink.clone(), None);
        let sender = Descriptor { domain: "alice.example".into(), name: "driver".into(), user: Some("user0@idp.example".into()) };
        let target = Descriptor { domain: "bob.example".into(), name: "sink".into(), user: Some("user1@idp.example".into()) };
        let parties = Parties { sender: Some(&sender), target: Some(&target) };
        let points = [
            (EnforcementPoint::Outgoing, "alice.example"),
            (EnforcementPoint::BusAccess, "localhost"),
            (EnforcementPoint::Incoming, "bob.example"),
        ];
        let n = 200_000;
        let started = Instant::now();
        for _ in 0..n {
            assert!(self.policies.decide_path(&points, &msg, parties).is_ok());
        }
        started.elapsed().as_secs_f64() * 1e9 / n as f64
    }

    /// µs per Cedar decision without the cache (bob.example's set, incoming).
    fn cold_decision_us(&self) -> f64 {
        let msg = Message::new(1, MessageType::Update, self.driver.clone(), self.sink.clone(), None);
        let sender = Descriptor { domain: "alice.example".into(), name: "driver".into(), user: Some("user0@idp.example".into()) };
        let target = Descriptor { domain: "bob.example".into(), name: "sink".into(), user: Some("user1@idp.example".into()) };
        let parties = Parties { sender: Some(&sender), target: Some(&target) };
        let n = 2000;
        let started = Instant::now();
        for _ in 0..n {
            let d = self.policies.decide_uncached(EnforcementPoint::Incoming, "bob.example", &msg, parties);
            assert_eq!(d, Decision::Permit);
        }
        started.elapsed().as_secs_f64() * 1e6 / n as f64
    }
}

/// A realistic policy set for `owner`: permits for the bench traffic (from
/// a group member, on weekdays or any day) and many rules that do not
/// apply to it: other domains, time windows, groups, schemes, forbids.
fn realistic_policies(owner: &str) -> String {
    let mut p = String::new();
    p.push_str(&format!(
        "@id(\"{owner}-bench\") permit (principal, action in [Rethink::Action::\"read\", Rethink::Action::\"update\", \
         Rethink::Action::\"response\", Rethink::Action::\"execute\", Rethink::Action::\"deploy\"], resource) \
         when {{ [\"alice.example\", \"bob.example\", \"bench.example\"].contains(context.sender_domain) }};\n"
    ));
    for i in 0..POLICIES {
        let rule = match i % 5 {
            0 => format!("forbid (principal, action, resource) when {{ context.sender_domain == \"blocked{i}.example\" }};"),
            1 => format!(
                "permit (principal, action == Rethink::Action::\"subscribe\", resource) \
                 when {{ context.sender_user in Rethink::Group::\"team{}\" && context.resource_scheme == \"comm\" }};",
                i % 10
            ),
            2 => format!(
                "forbid (principal, action == Rethink::Action::\"create\", resource) \
                 when {{ context.time.minute >= 1320 || context.time.minute < {} }};",
                300 + i
            ),
            3 => format!(
                "permit (principal, action == Rethink::Action::\"delete\", resource) \
                 when {{ context.time.weekday <= 5 && context.sender_user == Rethink::User::\"admin{i}@idp.example\" }};"
            ),
            _ => format!(
                "forbid (principal, action, resource) when {{ context.resource_type == \"type{i}\" && context.time.date < 20200101 }};"
            ),
        };
        p.push_str(&format!("@id(\"{owner}-{i}\") {rule}\n"));
    }
    p
}

/// µs per hyperty to deploy a bundle of `n` into a fresh runtime.
fn deploy_many(n: usize) -> f64 {
    let runtime: Runtime = runtime(Duration::from_secs(5));
    scale::deploy_us(&runtime, &scale::pongs(1, n).load())
}
