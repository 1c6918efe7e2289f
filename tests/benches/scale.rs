//! `just bench` (scale): many hyperties in one runtime.
//!
//! - µs per hyperty to deploy a bundle of 1,000 `pong` hyperties into a
//!   fresh runtime (instantiate + route + register + init; the component is
//!   compiled, or loaded from the cache, before the clock starts);
//! - resident memory (VmRSS) of one runtime holding 10,000 hyperties
//!   (10 domains × 1,000), and what each costs;
//! - `hyperty check` of that 10,000-hyperty bundle (read, parse, pins,
//!   fit to the world), as the CLI does it: a fresh throwaway runtime.
//!
//! Medians of 3 runs (RSS: of one run, it is not noise-bound).
//!
//! For a profile (`valgrind --tool=callgrind`, `perf`):
//! `HYPERTY_SCALE_BENCH=deploy:<n>` deploys one bundle of `n` pongs into a
//! fresh runtime and nothing else (compare two counts: the difference
//! divided by the difference in `n` is the cost of one).

use std::time::{Duration, Instant};

use hyperty_host::{Runtime, RuntimeConfig};
use hyperty_tests::scale::{deploy_us, median, pongs};
use hyperty_tests::*;

const RUNS: usize = 3;

/// Issue 17's target for one hyperty's deployment, in a bundle of 1,000.
const DEPLOY_TARGET_US: f64 = 30.0;

fn main() {
    if let Some(n) = std::env::var("HYPERTY_SCALE_BENCH").ok().and_then(|s| s.strip_prefix("deploy:").and_then(|n| n.parse().ok())) {
        println!("deploy of {n}: {:.1} µs per hyperty", deploy_many(n));
        return;
    }
    let deploy_us = median((0..RUNS).map(|_| deploy_many(1000)).collect());
    println!("scale: hyperty deployment (instantiate + route + register + init), 1,000 per bundle:");
    println!("  {deploy_us:>10.1} µs per hyperty ({:.2}× the target of {DEPLOY_TARGET_US:.0} µs)", deploy_us / DEPLOY_TARGET_US);

    let big = pongs(10, 1000);
    let path = big.write();
    let check_ms = median(
        (0..RUNS)
            .map(|_| {
                let started = Instant::now();
                hyperty_host::runtime::check_file(&path, config(1000)).unwrap();
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    println!("scale: hyperty check of a bundle of 10 domains × 1,000 hyperties:");
    println!("  {check_ms:>10.1} ms");

    let before = resident_bytes();
    let runtime = Runtime::new(config(10_000)).unwrap();
    let empty = resident_bytes();
    let started = Instant::now();
    let deployed = runtime.deploy(&big.load()).unwrap();
    let deploy_s = started.elapsed().as_secs_f64();
    assert_eq!(deployed.len(), 10_000);
    let full = resident_bytes();
    let mib = |b: usize| b as f64 / f64::from(1 << 20);
    println!("scale: one runtime holding 10,000 hyperties (pool of max-instances = 10,000):");
    println!("  VmRSS {:>8.1} MiB (process before the runtime {:.1} MiB, empty runtime {:.1} MiB)", mib(full), mib(before), mib(empty));
    println!("  {:>8.1} KiB per hyperty; deployed in {deploy_s:.2} s", (full - empty) as f64 / 1024.0 / 10_000.0);
    drop(runtime);
}

fn config(max_instances: u32) -> RuntimeConfig {
    RuntimeConfig { cache_dir: cache_dir(), request_timeout: Duration::from_secs(5), max_instances, ..RuntimeConfig::default() }
}

/// µs per hyperty to deploy a bundle of `n` into a fresh runtime.
fn deploy_many(n: usize) -> f64 {
    let runtime = Runtime::new(config(n as u32)).unwrap();
    deploy_us(&runtime, &pongs(1, n).load())
}
