//! `just bench`: JavaScript hyperties beside Rust ones, in the same run.
//!
//! - messages/s from the Rust `bench` driver in alice.example to a sink in
//!   bob.example written in Rust (`bench`, role sink) or JavaScript
//!   (`guests/js/sink`): one-way (batches of 64, each closed by a request)
//!   and request/response, interleaved, median of 5;
//! - per component (Rust pong, JS pong built with the QuickJS backend):
//!   file size, compile time (empty cache), load time from the
//!   cache, µs per instantiation from `InstancePre`, memory per instance
//!   (linear memory charged to the domain, and process RSS growth, over 20
//!   instances), and µs per request/response round trip from an endpoint.
//!
//! The machines are shared and noisy: read the ratios, not the absolute
//! numbers.

use std::path::Path;
use std::time::{Duration, Instant};

use hyperty_host::{Address, Endpoint, Message, MessageType, Runtime, RuntimeConfig};
use hyperty_tests::js::js_guest;
use hyperty_tests::*;
use serde_json::json;

const RUNS: usize = 5;

fn main() {
    let rust = Pair::new(&guest("bench"));
    let js = Pair::new(&js_guest("sink"));
    rust.run("oneway", 20_000); // warm-up
    js.run("oneway", 20_000);
    let (mut oneway, mut rr) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for _ in 0..RUNS {
        oneway.0.push(rust.run("oneway", 100_000));
        oneway.1.push(js.run("oneway", 100_000));
        rr.0.push(rust.run("rr", 20_000));
        rr.1.push(js.run("rr", 20_000));
    }
    let (o0, o1, r0, r1) = (median(oneway.0), median(oneway.1), median(rr.0), median(rr.1));
    println!("bus, Rust driver in alice.example -> sink in bob.example (median of {RUNS}, interleaved):");
    println!("                        Rust sink       JavaScript sink   ratio");
    println!("  one-way msg/s:        {o0:>10.0}      {o1:>10.0}        {:.0}%", 100.0 * o1 / o0);
    println!("  request/response /s:  {r0:>10.0}      {r1:>10.0}        {:.0}%", 100.0 * r1 / r0);
    println!("  round trip:           {:>10.2} µs   {:>10.2} µs", 1e6 / r0, 1e6 / r1);
    drop((rust, js));

    let components = [("Rust pong", guest("pong")), ("JS pong (QuickJS, componentize-qjs --sync)", js_guest("pong"))];
    println!("per component:");
    println!("  {:<42} {:>9} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}", "", "size", "compile", "cached", "instance", "mem/inst", "RSS/inst", "round trip");
    for (name, path) in components {
        match Figures::measure(&path) {
            Ok(f) => println!(
                "  {name:<42} {:>6} KiB {:>7.0} ms {:>7.1} ms {:>7.0} µs {:>8.0} KiB {:>6.0} KiB {:>7.1} µs",
                f.size >> 10,
                f.compile.as_secs_f64() * 1e3,
                f.cached.as_secs_f64() * 1e3,
                f.instantiate_us,
                f.memory_per_instance / 1024.0,
                f.rss_per_instance / 1024.0,
                f.round_trip_us
            ),
            Err(e) => println!("  {name:<42} refused: {e}"),
        }
    }
}

/// A Rust bench driver in alice.example and a sink in bob.example.
struct Pair {
    _runtime: Runtime,
    driver: Address,
    sink: Address,
    endpoint: Endpoint,
    next_id: std::cell::Cell<u64>,
    _bundle: TestBundle,
}

impl Pair {
    fn new(sink: &Path) -> Pair {
        let runtime = runtime(Duration::from_secs(30));
        let bundle = TestBundle::new()
            .hyperty("alice.example", "driver", &guest("bench"), json!({ "role": "driver" }))
            .hyperty("bob.example", "sink", sink, json!({ "role": "sink" }))
            .domain("alice.example", json!({ "limits": { "rate": 100_000_000, "burst": 1_000_000 } }));
        runtime.deploy(&bundle.load()).unwrap();
        let driver = runtime.lookup("alice.example", "driver").unwrap();
        let sink = runtime.lookup("bob.example", "sink").unwrap();
        let endpoint = runtime.endpoint("hyperty://bench.example/harness", 16).unwrap();
        Pair { _runtime: runtime, driver, sink, endpoint, next_id: Default::default(), _bundle: bundle }
    }

    /// Messages (or round trips) per second for one run of `count`.
    fn run(&self, mode: &str, count: u64) -> f64 {
        self.next_id.set(self.next_id.get() + 1);
        let command = json!({ "to": self.sink.to_string(), "count": count, "mode": mode, "batch": 64 });
        let msg = Message::new(self.next_id.get(), MessageType::Execute, self.endpoint.address().clone(), self.driver.clone(), Some(command.to_string()));
        let started = Instant::now();
        self.endpoint.request(msg, None).unwrap();
        let answer = self.endpoint.recv_timeout(Duration::from_secs(300)).expect("the driver answers");
        let elapsed = started.elapsed();
        assert_eq!(answer.body.code, Some(200), "bench run failed: {:?}", answer.body);
        count as f64 / elapsed.as_secs_f64()
    }
}

struct Figures {
    size: u64,
    compile: Duration,
    cached: Duration,
    instantiate_us: f64,
    memory_per_instance: f64,
    rss_per_instance: f64,
    round_trip_us: f64,
}

const INSTANCES: usize = 20;

impl Figures {
    fn measure(path: &Path) -> Result<Figures, String> {
        let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        let cache = tempfile::tempdir().unwrap();
        let one = TestBundle::new().hyperty("m.example", "pong", path, json!({}));
        let new_runtime = || Runtime::new(RuntimeConfig { cache_dir: cache.path().to_owned(), ..RuntimeConfig::default() }).unwrap();
        // Compile into an empty cache, then load from it in a new runtime.
        let started = Instant::now();
        new_runtime().check(&one.load()).map_err(|e| e.to_string())?;
        let compile = started.elapsed();
        let runtime = new_runtime();
        let started = Instant::now();
        runtime.check(&one.load()).map_err(|e| e.to_string())?;
        let cached = started.elapsed();
        let instantiate_us = median((0..RUNS).map(|_| runtime.bench_instantiation(path, 200).unwrap().as_secs_f64() * 1e6).collect());

        // Memory: INSTANCES instances in one domain.
        let mut many = TestBundle::new();
        for i in 0..INSTANCES {
            many = many.hyperty("m.example", &format!("pong{i}"), path, json!({}));
        }
        let many = many.domain("m.example", json!({ "limits": { "total-memory-mb": 4096 } })).load();
        let rss_before = resident_bytes();
        runtime.deploy(&many).map_err(|e| e.to_string())?;
        let rss_per_instance = resident_bytes().saturating_sub(rss_before) as f64 / INSTANCES as f64;
        let memory_per_instance = runtime.memory_used("m.example").unwrap() as f64 / INSTANCES as f64;

        // Round trips from an endpoint to one of them.
        let endpoint = runtime.endpoint("hyperty://bench.example/harness", 16).unwrap();
        let pong = runtime.lookup("m.example", "pong0").unwrap();
        let value = Some(json!({ "text": "ping" }).to_string());
        let mut trip = |id: u64| {
            let msg = Message::new(id, MessageType::Execute, endpoint.address().clone(), pong.clone(), value.clone());
            endpoint.request(msg, None).unwrap();
            let answer = endpoint.recv_timeout(Duration::from_secs(30)).expect("pong answers");
            assert_eq!(answer.body.code, Some(200));
        };
        (0..200).for_each(&mut trip);
        let n = 5000;
        let started = Instant::now();
        (1000..1000 + n).for_each(&mut trip);
        let round_trip_us = started.elapsed().as_secs_f64() * 1e6 / n as f64;
        Ok(Figures { size, compile, cached, instantiate_us, memory_per_instance, rss_per_instance, round_trip_us })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
