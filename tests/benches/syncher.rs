//! `just bench` (third part): the syncher.
//!
//! - subscribe latency: an observer's `subscribe` to the object's URL until
//!   its 200 with the state, when the reporter hyperty is asked (and
//!   accepts), and when the observer was invited (no question);
//! - update → all observers: from the command that makes the reporter
//!   hyperty apply a JSON Patch until its answer comes back (fanned out:
//!   the `update` import returns once the delta is in every observer's
//!   inbox, or refused there), until this one thread has taken the delta
//!   out of every observer's endpoint (received: the observers' reading,
//!   done serially here), and until this one thread has applied it
//!   to every observer's replica as well (applied: the observers' own work,
//!   done serially here), for 1, 100, 1,000 and 10,000 observers, beside
//!   issue 17's targets (1,000 in ≤ 1 ms, 10,000 in ≤ 10 ms); every
//!   observer must see every version (the lost count is printed and must
//!   be 0).
//!
//! Without a data directory (no disk writes): the fan-out is measured.

use std::time::{Duration, Instant};

use hyperty_host::syncher::{Applied, Replica};
use hyperty_host::{Address, Endpoint, Message, MessageType};
use hyperty_tests::*;
use serde_json::json;

const UPDATES: u64 = 20;

fn main() {
    let runtime = runtime(Duration::from_secs(60));
    let mut driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "reporter", &guest("puppet"), puppet_config(true))
        .domain("alice.example", json!({ "limits": { "rate": 100_000_000, "burst": 1_000_000, "inbox": 65_536 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let reporter = runtime.lookup("alice.example", "reporter").unwrap();
    let answer = driver.command(&reporter, json!({ "op": "create", "scheme": "comm", "data": { "n": 0 } }));
    let url = answer["url"].as_str().unwrap().to_owned();
    let object = Address::parse(url.as_str()).unwrap();

    // Subscribe latency, asked and invited.
    let mut asked = Vec::new();
    let mut invited = Vec::new();
    for i in 0..1000 {
        let e = runtime.endpoint(&format!("hyperty://crowd.example/s{i}"), 8).unwrap();
        asked.push(subscribe_us(&e, &object));
        let e = runtime.endpoint(&format!("hyperty://crowd.example/i{i}"), 8).unwrap();
        driver.command(&reporter, json!({ "op": "invite", "url": url, "observers": [e.address().to_string()] }));
        invited.push(subscribe_us(&e, &object));
    }
    // Drain the reporter's reports of the subscriptions it was asked about.
    while driver.find(|_| true, Duration::from_millis(200)).is_some() {}
    println!("syncher, one object, reporter hyperty in alice.example, observers are embedder endpoints:");
    println!("  subscribe, reporter asked:   p50 {:>8.1} µs  p99 {:>8.1} µs", pct(&mut asked, 50), pct(&mut asked, 99));
    println!("  subscribe, invited:          p50 {:>8.1} µs  p99 {:>8.1} µs", pct(&mut invited, 50), pct(&mut invited, 99));

    let mut version = 1;
    for observers in [1usize, 100, 1_000, 10_000] {
        // A fresh object per size, so the earlier subscribers do not count.
        let answer = driver.command(&reporter, json!({ "op": "create", "scheme": "comm", "data": { "n": 0 } }));
        let url = answer["url"].as_str().unwrap().to_owned();
        let object = Address::parse(url.as_str()).unwrap();
        let watchers: Vec<Endpoint> =
            (0..observers).map(|i| runtime.endpoint(&format!("hyperty://fan{observers}.example/w{i}"), 64).unwrap()).collect();
        let list: Vec<String> = watchers.iter().map(|w| w.address().to_string()).collect();
        driver.command(&reporter, json!({ "op": "invite", "url": url, "observers": list }));
        let mut replicas: Vec<Replica> = watchers.iter().map(|w| subscribe(w, &object)).collect();
        let (mut fanned, mut delivered, mut applied) = (Vec::new(), Vec::new(), Vec::new());
        let mut lost = 0u64;
        for n in 1..=UPDATES {
            let started = Instant::now();
            let answer = driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "replace", "path": "/n", "value": n }] }));
            assert!(answer["version"].is_u64(), "{answer}");
            // Fanned out: the reporter's update returned, every delivery made.
            fanned.push(started.elapsed().as_secs_f64() * 1e6);
            // Received: this thread took the delta out of every endpoint.
            let deltas: Vec<Option<Message>> = watchers.iter().map(|w| w.recv_timeout(Duration::from_secs(30))).collect();
            delivered.push(started.elapsed().as_secs_f64() * 1e6);
            // Applied: each replica patched, here one after the other on
            // this one thread (observers would do it each on their own).
            for (m, r) in deltas.iter().zip(replicas.iter_mut()) {
                match m {
                    Some(m) if r.apply(m) == Ok(Applied::Applied) => {}
                    _ => lost += 1,
                }
            }
            applied.push(started.elapsed().as_secs_f64() * 1e6);
        }
        version += UPDATES;
        let (out, got, all) = (pct(&mut fanned, 50), pct(&mut delivered, 50), pct(&mut applied, 50));
        // Issue 17: 1,000 observers in 1 ms, 10,000 in 10 ms (1 µs each).
        let target_us = observers.max(1_000) as f64;
        println!(
            "  update -> all {observers:>6} observers: fanned out p50 {out:>9.1} µs ({:>5.2} µs per observer; {:>5.2}× the target of {target_us:.0} µs); received by one thread p50 {got:>9.1} µs; applied by one thread p50 {all:>9.1} µs; {lost} of {} lost",
            out / observers as f64,
            out / target_us,
            UPDATES * observers as u64
        );
    }
    let _ = version;
}

fn subscribe(e: &Endpoint, object: &Address) -> Replica {
    e.request(Message::new(1, MessageType::Subscribe, e.address().clone(), object.clone(), None), None).unwrap();
    // An invitation may come first.
    let answer = loop {
        let m = e.recv_timeout(Duration::from_secs(30)).expect("subscribed");
        if m.kind == MessageType::Response {
            break m;
        }
    };
    assert_eq!(answer.body.code, Some(200), "{answer:?}");
    Replica::from_state(object.as_str(), answer.body.value.as_deref().unwrap()).unwrap()
}

fn subscribe_us(e: &Endpoint, object: &Address) -> f64 {
    let started = Instant::now();
    subscribe(e, object);
    started.elapsed().as_secs_f64() * 1e6
}

fn pct(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[(v.len() * p / 100).min(v.len() - 1)]
}
