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
//! cost; then again with four such pairs (`alice<i>.example` ->
//! `bob<i>.example`) running at once, how the path scales with cores.
//! Each figure is the median of 5 runs; the machines are shared and
//! noisy: read the ratio, not the absolute numbers.
//!
//! For a profile (`valgrind --tool=callgrind`, `perf`), a fixed amount of
//! work and nothing else: `HYPERTY_BUS_BENCH=<oneway|rr>:<count>[:policies]`
//! runs one pair that many messages (or round trips) after a warm-up of
//! 1,000; the difference between two counts, divided by the difference in
//! count, is the cost of one.

use std::time::{Duration, Instant};

use std::sync::Arc;

use hyperty_host::{
    Address, CedarPolicies, PolicyDecisionPoint, Decision, Descriptor, EnforcementPoint, Endpoint, Message, MessageType, Parties, Runtime,
    RuntimeConfig,
};
use hyperty_tests::*;
use hyperty_tests::scale::{self, median};
use hyperty_tests::soak::{POLICIES, realistic_policies};
use serde_json::json;

const RUNS: usize = 5;

/// Two runtimes side by side: without policies, and with a realistic Cedar
/// set on both domains and the bus.
fn main() {
    let dir = tempfile::tempdir().unwrap();
    if let Ok(spec) = std::env::var("HYPERTY_BUS_BENCH") {
        return profile(&dir, &spec);
    }
    let plain = Bench::new(&dir, false, 1);
    let checked = Bench::new(&dir, true, 1);

    let [o0, o1, r0, r1] = side_by_side(&plain, &checked, 200_000, 50_000);
    println!("bus, alice.example -> bob.example, 64-byte JSON body (median of {RUNS}, interleaved):");
    println!("                        no policies     {POLICIES}+ Cedar policies   ratio");
    println!("  one-way msg/s:        {o0:>10.0}      {o1:>10.0}              {:.0}%", 100.0 * o1 / o0);
    println!("  request/response /s:  {r0:>10.0}      {r1:>10.0}              {:.0}%", 100.0 * r1 / r0);
    println!("  round trip:           {:>10.2} µs   {:>10.2} µs", 1e6 / r0, 1e6 / r1);
    println!("uncached Cedar decision ({POLICIES}+ policies): {:.1} µs", checked.cold_decision_us());
    println!("cached decision of a whole path (3 points, from this thread's cache): {:.0} ns", checked.warm_path_ns());
    drop(checked);

    let (plain4, checked4) = (Bench::new(&dir, false, PAIRS), Bench::new(&dir, true, PAIRS));
    let [f0, f1, q0, q1] = side_by_side(&plain4, &checked4, 100_000, 25_000);
    println!("bus, {PAIRS} pairs alice<i>.example -> bob<i>.example at once, in all (median of {RUNS}; ratio to one pair):");
    println!("                        no policies     {POLICIES}+ Cedar policies   ratio");
    println!("  one-way msg/s:        {f0:>10.0} ({:.2}×) {f1:>10.0} ({:.2}×)      {:.0}%", f0 / o0, f1 / o1, 100.0 * f1 / f0);
    println!("  request/response /s:  {q0:>10.0} ({:.2}×) {q1:>10.0} ({:.2}×)      {:.0}%", q0 / r0, q1 / r1, 100.0 * q1 / q0);
    drop((plain4, checked4));

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

/// One-way msg/s and round trips/s of `plain` and `checked`, interleaved,
/// after a warm-up: `[one-way plain, one-way checked, rr plain, rr checked]`,
/// each the median of [`RUNS`] of `oneway` messages and `rr` round trips
/// per pair.
fn side_by_side(plain: &Bench, checked: &Bench, oneway: u64, rr: u64) -> [f64; 4] {
    plain.run("oneway", 20_000);
    checked.run("oneway", 20_000);
    let mut runs: [Vec<f64>; 4] = Default::default();
    for _ in 0..RUNS {
        runs[0].push(plain.run("oneway", oneway));
        runs[1].push(checked.run("oneway", oneway));
        runs[2].push(plain.run("rr", rr));
        runs[3].push(checked.run("rr", rr));
    }
    runs.map(median)
}

/// `HYPERTY_BUS_BENCH=<mode>:<count>[:policies]`: one run of one pair.
fn profile(dir: &tempfile::TempDir, spec: &str) {
    let mut parts = spec.split(':');
    let mode = parts.next().filter(|m| ["oneway", "rr"].contains(m)).expect("HYPERTY_BUS_BENCH=<oneway|rr>:<count>[:policies]");
    let count: u64 = parts.next().and_then(|c| c.parse().ok()).expect("HYPERTY_BUS_BENCH=<oneway|rr>:<count>[:policies]");
    let with_policies = parts.next() == Some("policies");
    let bench = Bench::new(dir, with_policies, 1);
    bench.run(mode, 1000);
    let rate = bench.run(mode, count);
    println!("{mode} × {count} (policies: {with_policies}): {rate:.0}/s");
}


/// Pairs in the "at once" figures.
const PAIRS: usize = 4;

/// The domains of pair `i`: `alice.example` and `bob.example` for the
/// first, `alice<i>.example` and `bob<i>.example` for the others.
fn pair_domains(i: usize) -> (String, String) {
    match i {
        0 => ("alice.example".into(), "bob.example".into()),
        i => (format!("alice{i}.example"), format!("bob{i}.example")),
    }
}

struct Bench {
    runtime: Runtime,
    policies: Arc<CedarPolicies>,
    /// (driver, sink) of each pair.
    pairs: Vec<(Address, Address)>,
    endpoint: Endpoint,
    next_id: std::cell::Cell<u64>,
    _bundle: TestBundle,
}

impl Bench {
    fn new(dir: &tempfile::TempDir, with_policies: bool, pairs: usize) -> Bench {
        let policies = Arc::new(CedarPolicies::new());
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: cache_dir(),
            request_timeout: Duration::from_secs(30),
            policies: policies.clone(),
            ..RuntimeConfig::default()
        })
        .unwrap();
        let mut bundle = TestBundle::new();
        for i in 0..pairs {
            let (alice, bob) = pair_domains(i);
            bundle = bundle
                .hyperty(&alice, "driver", &guest("bench"), json!({ "role": "driver" }))
                .hyperty(&bob, "sink", &guest("bench"), json!({ "role": "sink" }))
                .user(&alice, "driver", &format!("user{}@idp.example", 2 * i))
                .user(&bob, "sink", &format!("user{}@idp.example", 2 * i + 1))
                // The bus is measured here, not the flood limiter.
                .domain(&alice, json!({ "limits": { "rate": 100_000_000, "burst": 1_000_000 } }));
        }
        if with_policies {
            let (alice, bob, bus) = (dir.path().join("alice.cedar"), dir.path().join("bob.cedar"), dir.path().join("bus.cedar"));
            std::fs::write(&alice, realistic_policies("alice")).unwrap();
            std::fs::write(&bob, realistic_policies("bob")).unwrap();
            std::fs::write(&bus, realistic_policies("bus")).unwrap();
            for i in 0..pairs {
                let (a, b) = pair_domains(i);
                bundle = bundle
                    .domain(&a, json!({ "policies": [alice.to_str().unwrap()] }))
                    .domain(&b, json!({ "policies": [bob.to_str().unwrap()] }));
            }
            policies.set_runtime_policies(&bus).unwrap();
            for g in 0..10 {
                policies.set_group(&format!("team{g}"), (0..100).map(|u| format!("user{}@idp.example", u * 10 + g)));
            }
        }
        runtime.deploy(&bundle.load()).unwrap();
        let pairs = (0..pairs)
            .map(|i| {
                let (alice, bob) = pair_domains(i);
                (runtime.lookup(&alice, "driver").unwrap(), runtime.lookup(&bob, "sink").unwrap())
            })
            .collect();
        let endpoint = runtime.endpoint("hyperty://bench.example/harness", 16).unwrap();
        Bench { runtime, policies, pairs, endpoint, next_id: Default::default(), _bundle: bundle }
    }

    /// The first pair's (driver, sink).
    fn first(&self) -> &(Address, Address) {
        &self.pairs[0]
    }

    /// Messages (or round trips) per second, all pairs together, for one
    /// run of `count` per pair, the pairs started at once.
    fn run(&self, mode: &str, count: u64) -> f64 {
        let started = Instant::now();
        for (driver, sink) in &self.pairs {
            self.next_id.set(self.next_id.get() + 1);
            let command = json!({ "to": sink.to_string(), "count": count, "mode": mode, "batch": 64 });
            let msg = Message::new(
                self.next_id.get(),
                MessageType::Execute,
                self.endpoint.address().clone(),
                driver.clone(),
                Some(command.to_string()),
            );
            self.endpoint.request(msg, None).unwrap();
        }
        for _ in &self.pairs {
            let answer = self.endpoint.recv_timeout(Duration::from_secs(120)).expect("the driver answers");
            assert_eq!(answer.body.code, Some(200), "bench run failed: {:?}", answer.body);
        }
        let elapsed = started.elapsed();
        (count * self.pairs.len() as u64) as f64 / elapsed.as_secs_f64()
    }

    /// ns per three-point decision served by the thread's cache.
    fn warm_path_ns(&self) -> f64 {
        let (driver, sink) = self.first();
        let msg = Message::new(1, MessageType::Update, driver.clone(), sink.clone(), None);
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
        let (driver, sink) = self.first();
        let msg = Message::new(1, MessageType::Update, driver.clone(), sink.clone(), None);
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


/// µs per hyperty to deploy a bundle of `n` into a fresh runtime.
fn deploy_many(n: usize) -> f64 {
    let runtime: Runtime = runtime(Duration::from_secs(5));
    scale::deploy_us(&runtime, &scale::pongs(1, n).load())
}
