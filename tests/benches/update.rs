//! `just bench` (update): live update (issue 20).
//!
//! - time from saving a changed bundle file to its new version taking
//!   messages, with `hyperty run`'s watcher (`Runtime::watch_bundle`,
//!   looking every 500 ms: up to that much is the polling) and with
//!   `Runtime::apply` called directly;
//! - under a steady 10,000 msg/s load, a hyperty swapped mid-stream:
//!   messages lost or doubled (the goal: none) and the longest a message
//!   took from its send to the puppet's report, over the whole run and
//!   for those sent while the update ran.
//!
//! Medians of 3 runs for the times.

use std::time::{Duration, Instant};

use hyperty_host::runtime::BundleWatch;
use hyperty_host::{Endpoint, MessageType, Runtime, RuntimeConfig};
use hyperty_tests::scale::median;
use hyperty_tests::*;
use serde_json::{Value, json};

const RUNS: usize = 3;
const V: [&str; 2] = ["hyperty://app.example/v1", "hyperty://app.example/v2"];

fn receiver(observer: &str) -> TestBundle {
    TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), json!({ "observer": observer }))
}

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig { cache_dir: cache_dir(), ..RuntimeConfig::default() }).unwrap()
}

/// Sends `update {"n": n}` to `to` every millisecond until `observer`
/// reports one; the time that took.
fn until_reported(from: &Endpoint, observer: &Endpoint, to: &hyperty_host::Address, started: Instant) -> Duration {
    let mut n = 0u64;
    loop {
        let m = from.message(MessageType::Update, to.as_str()).value(json!({ "n": n }).to_string()).build().unwrap();
        let _ = from.send(m);
        n += 1;
        if observer.recv_where(|m| m.kind == MessageType::Forward, Duration::from_millis(1)).is_some() {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the new version took no message within 30 s");
    }
}

fn main() {
    let mut watched = Vec::new();
    let mut applied = Vec::new();
    for _ in 0..RUNS {
        let runtime = runtime();
        let observers = V.map(|v| runtime.endpoint(v, 100_000).unwrap());
        let sender = runtime.endpoint("hyperty://app.example/sender", 1000).unwrap();
        let first = receiver(V[0]);
        let path = first.write();
        runtime.deploy(&first.load()).unwrap();
        let b = runtime.lookup("bob.example", "b").unwrap();
        // apply, directly.
        let second = receiver(V[1]).load();
        let started = Instant::now();
        runtime.apply(&second).unwrap();
        applied.push(until_reported(&sender, &observers[1], &b, started).as_secs_f64() * 1e3);
        // The file saved, the watcher applies it.
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let watch = BundleWatch::new(&path);
            let runtime = &runtime;
            scope.spawn(move || runtime.watch_bundle(watch, Duration::from_millis(500), stopped));
            // V2 runs now and the file says V1: first the file says V2 too
            // (applied: nothing to change), then V1 again, timed.
            let text = std::fs::read_to_string(&path).unwrap().replace(V[0], V[1]);
            std::fs::write(&path, text).unwrap();
            until_reported(&sender, &observers[1], &b, Instant::now());
            std::thread::sleep(Duration::from_millis(600));
            while observers[0].try_recv().is_some() {}
            let text = std::fs::read_to_string(&path).unwrap().replace(V[1], V[0]);
            let started = Instant::now();
            std::fs::write(&path, text).unwrap();
            watched.push(until_reported(&sender, &observers[0], &b, started).as_secs_f64() * 1e3);
            drop(stop);
        });
    }
    println!("update: from a changed bundle to the new version taking messages:");
    println!("  {:>10.1} ms  Runtime::apply", median(applied));
    println!("  {:>10.1} ms  saved file, hyperty run's watcher (looks every 500 ms)", median(watched));
    steady_load();
}

/// 10,000 msg/s for 3 s, the receiver swapped after 1 s.
fn steady_load() {
    const RATE: u64 = 10_000;
    const TOTAL: u64 = 3 * RATE;
    let runtime = runtime();
    let observers = V.map(|v| runtime.endpoint(v, 200_000).unwrap());
    runtime.deploy(&receiver(V[0]).load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    let from = runtime.endpoint("hyperty://app.example/sender", 1000).unwrap();
    let start = Instant::now();
    let (received, sent, window) = std::thread::scope(|scope| {
        let readers: Vec<_> = observers
            .iter()
            .map(|o| {
                scope.spawn(move || {
                    let mut got = Vec::new();
                    while let Some(m) = o.recv_timeout(Duration::from_secs(3)) {
                        let r: Value = serde_json::from_str(m.body.value.as_deref().unwrap_or("null")).unwrap_or_default();
                        let n: Value = serde_json::from_str(r["value"].as_str().unwrap_or("null")).unwrap_or_default();
                        if let Some(n) = n["n"].as_u64() {
                            got.push((n, start.elapsed()));
                        }
                    }
                    got
                })
            })
            .collect();
        let swap = scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(1));
            let began = start.elapsed();
            runtime.apply(&receiver(V[1]).load()).unwrap();
            (began, start.elapsed())
        });
        let mut sent = Vec::with_capacity(TOTAL as usize);
        for n in 0..TOTAL {
            let due = Duration::from_micros(n * 1_000_000 / RATE);
            while start.elapsed() < due {
                std::hint::spin_loop();
            }
            loop {
                let m = from.message(MessageType::Update, b.as_str()).value(json!({ "n": n }).to_string()).build().unwrap();
                match from.send(m) {
                    Ok(()) => break,
                    Err(hyperty_host::SendError::InboxFull(_)) => std::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
            sent.push(start.elapsed());
        }
        let window = swap.join().unwrap();
        let received: Vec<(u64, Duration)> = readers.into_iter().flat_map(|r| r.join().unwrap()).collect();
        (received, sent, window)
    });
    let mut count = vec![0u32; TOTAL as usize];
    let (mut worst, mut worst_in_window) = (Duration::ZERO, Duration::ZERO);
    for (n, at) in &received {
        count[*n as usize] += 1;
        let took = at.saturating_sub(sent[*n as usize]);
        worst = worst.max(took);
        if sent[*n as usize] >= window.0 && sent[*n as usize] <= window.1 {
            worst_in_window = worst_in_window.max(took);
        }
    }
    let lost = count.iter().filter(|c| **c == 0).count();
    let doubled = count.iter().filter(|c| **c > 1).count();
    println!("update: a hyperty swapped under {RATE} msg/s ({TOTAL} messages, apply took {:.1} ms):", (window.1 - window.0).as_secs_f64() * 1e3);
    println!("  {lost:>10} lost, {doubled} doubled");
    println!("  {:>10.1} ms  longest send→report, whole run", worst.as_secs_f64() * 1e3);
    println!("  {:>10.1} ms  longest send→report, sent during the update", worst_in_window.as_secs_f64() * 1e3);
}
