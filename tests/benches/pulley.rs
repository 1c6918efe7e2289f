//! `just bench`: Pulley, wasmtime's interpreter, beside Cranelift's machine
//! code, in the same run (issue 18), release build:
//!
//! - one-way messages/s from a hyperty in alice.example to one in
//!   bob.example (the bench guest's batches of 64, as in the bus bench);
//! - µs per hyperty call: a request/response round trip between the two;
//! - ns per fuel unit (about one WebAssembly instruction) of a CPU-bound
//!   guest loop: the hostile guest's `loop` run until a budget of
//!   `fuel-per-call` units is spent;
//! - µs per hyperty instantiation from `InstancePre` into a fresh store.
//!
//! Each figure is the median of 3 runs; the last column is Pulley's cost
//! as a multiple of Cranelift's. The machines are shared and noisy: read
//! the ratios, not the absolute numbers.

use std::time::{Duration, Instant};

use hyperty_host::{Address, EngineKind, Runtime, RuntimeConfig};
use hyperty_tests::scale::median;
use hyperty_tests::*;
use serde_json::json;

const RUNS: usize = 3;

/// Fuel of one CPU-bound call: ~0.1 s of Cranelift's code.
const FUEL: u64 = 100_000_000;

/// One runtime of an engine kind with the bench pair and the looping guest.
struct Bench {
    runtime: Runtime,
    driver: Driver,
    sender: Address,
    sink: Address,
    looper: Address,
    _bundle: TestBundle,
}

impl Bench {
    fn new(kind: EngineKind) -> Bench {
        let config = RuntimeConfig { cache_dir: cache_dir(), engine: kind, request_timeout: Duration::from_secs(300), ..RuntimeConfig::default() };
        let runtime = Runtime::new(config).unwrap();
        let driver = Driver::new(&runtime);
        let bundle = TestBundle::new()
            .hyperty("alice.example", "driver", &guest("bench"), json!({ "role": "driver" }))
            .hyperty("bob.example", "sink", &guest("bench"), json!({ "role": "sink" }))
            .hyperty("loop.example", "x", &guest("hostile"), json!({ "mode": "loop", "owner": OBSERVER, "secret": "s" }))
            // The bus is measured here, not the flood limiter; the loop
            // stops on its fuel, not on its deadline.
            .domain("alice.example", json!({ "limits": { "rate": 100_000_000, "burst": 1_000_000 } }))
            .domain("loop.example", json!({ "limits": { "fuel-per-call": FUEL, "call-timeout-ms": 300_000 } }))
            .domain("loop.example", json!({ "restart": { "policy": "backoff", "initial-backoff-ms": 1, "max-backoff-ms": 10 } }));
        runtime.deploy(&bundle.load()).unwrap();
        let [sender, sink, looper] = [("alice.example", "driver"), ("bob.example", "sink"), ("loop.example", "x")]
            .map(|(domain, name)| runtime.lookup(domain, name).unwrap());
        Bench { runtime, driver, sender, sink, looper, _bundle: bundle }
    }

    /// Messages (or round trips, `mode` "rr") per second for one run of `count`.
    fn bus(&mut self, mode: &str, count: u64) -> f64 {
        let command = json!({ "to": self.sink.to_string(), "count": count, "mode": mode, "batch": 64 });
        let started = Instant::now();
        let answer = self.driver.ask(&self.sender.clone(), command);
        assert_eq!(answer.body.code, Some(200), "bench run failed: {:?}", answer.body);
        count as f64 / started.elapsed().as_secs_f64()
    }

    /// ns per fuel unit of the guest's loop, until its budget is spent.
    fn cpu(&mut self) -> f64 {
        let started = Instant::now();
        let answer = self.driver.ask(&self.looper.clone(), json!({}));
        let elapsed = started.elapsed();
        let why = answer.body.description.unwrap_or_default();
        assert!(why.contains("ran out of fuel"), "the loop stopped otherwise: {why}");
        elapsed.as_secs_f64() * 1e9 / FUEL as f64
    }

    fn instantiation_us(&mut self) -> f64 {
        self.runtime.bench_instantiation(&guest("pong"), 200).unwrap().as_secs_f64() * 1e6
    }
}

fn main() {
    let mut benches = EngineKind::ALL.map(Bench::new);
    for b in &mut benches {
        b.bus("oneway", 5_000); // warm-up
    }
    type Measure = fn(&mut Bench) -> f64;
    let measures: [(&str, &str, Measure); 4] = [
        ("one-way msg/s", "", |b| b.bus("oneway", 50_000)),
        ("hyperty call (round trip)", "µs", |b| 1e6 / b.bus("rr", 10_000)),
        ("CPU-bound guest loop", "ns/fuel", Bench::cpu),
        ("instantiation", "µs", Bench::instantiation_us),
    ];
    println!("Pulley beside Cranelift (median of {RUNS}, interleaved; Pulley's cost in Cranelift's):");
    println!("  {:<28} {:>19} {:>19} {:>8}", "", "cranelift", "pulley", "cost");
    for (name, unit, measure) in measures {
        let mut runs = [Vec::new(), Vec::new()];
        for _ in 0..RUNS {
            for (b, r) in benches.iter_mut().zip(&mut runs) {
                r.push(measure(b));
            }
        }
        let [c, p] = runs.map(median);
        // A rate costs more when lower, a time when higher.
        let cost = if unit.is_empty() { c / p } else { p / c };
        println!("  {name:<28} {c:>11.2} {unit:<7} {p:>11.2} {unit:<7} {cost:>7.1}x");
    }
}
