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
//! Each figure is the median of 5 runs; the machines are shared and noisy.

use std::time::{Duration, Instant};

use hyperty_host::{Message, MessageType, Runtime};
use hyperty_tests::*;
use serde_json::json;

const RUNS: usize = 5;

fn main() {
    let runtime = runtime(Duration::from_secs(30));
    let bundle = TestBundle::new()
        .hyperty("alice.example", "driver", &guest("bench"), json!({ "role": "driver" }))
        .hyperty("bob.example", "sink", &guest("bench"), json!({ "role": "sink" }))
        // The bus is measured here, not the flood limiter.
        .domain("alice.example", json!({ "limits": { "rate": 100_000_000, "burst": 1_000_000 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let driver = runtime.lookup("alice.example", "driver").unwrap();
    let sink = runtime.lookup("bob.example", "sink").unwrap();
    let endpoint = runtime.endpoint("hyperty://bench.example/harness", 16).unwrap();

    let mut next_id = 0;
    let mut run = |mode: &str, count: u64| -> f64 {
        next_id += 1;
        let command = json!({ "to": sink.to_string(), "count": count, "mode": mode, "batch": 64 });
        let msg = Message::new(next_id, MessageType::Execute, endpoint.address().clone(), driver.clone(), Some(command.to_string()));
        let started = Instant::now();
        endpoint.request(msg, None).unwrap();
        let answer = endpoint.recv_timeout(Duration::from_secs(60)).expect("the driver answers");
        let elapsed = started.elapsed();
        assert_eq!(answer.body.code, Some(200), "bench run failed: {:?}", answer.body);
        count as f64 / elapsed.as_secs_f64()
    };

    run("oneway", 20_000); // warm-up
    let oneway = median((0..RUNS).map(|_| run("oneway", 200_000)).collect());
    let rr = median((0..RUNS).map(|_| run("rr", 50_000)).collect());
    println!("bus, alice.example -> bob.example, 64-byte JSON body:");
    println!("  one-way:          {:>10.0} messages/s", oneway);
    println!("  request/response: {:>10.0} round trips/s ({:.2} µs each)", rr, 1e6 / rr);

    let instantiate_us = median(
        (0..RUNS).map(|_| runtime.bench_instantiation(&guest("pong"), 1000).unwrap().as_secs_f64() * 1e6).collect(),
    );
    println!("hyperty instantiation from InstancePre (pooling allocator, fresh store):");
    println!("  {:>10.1} µs per instance", instantiate_us);
    let deploy_us = median((0..RUNS).map(|_| deploy_many(200)).collect());
    println!("hyperty deployment (instantiate + route + init), 200 per bundle:");
    println!("  {:>10.1} µs per hyperty", deploy_us);
}

/// µs per hyperty to deploy a bundle of `n` into a fresh runtime.
fn deploy_many(n: usize) -> f64 {
    let runtime: Runtime = runtime(Duration::from_secs(5));
    let mut bundle = TestBundle::new();
    for i in 0..n {
        bundle = bundle.hyperty("many.example", &format!("pong{i}"), &guest("pong"), json!({}));
    }
    let bundle = bundle.domain("many.example", json!({ "limits": { "instances": 1000 } })).load();
    // Compile (or load from the cache) once, outside the measurement.
    runtime.check(&bundle).unwrap();
    let started = Instant::now();
    runtime.deploy(&bundle).unwrap();
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
