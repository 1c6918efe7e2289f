//! `just bench` (second part): runtime to runtime through NATS, beside
//! NATS's own client-to-client figures measured in the same run on the same
//! server (the physical limit of this path).
//!
//! - request/response latency, p50 and p99 over 2,000 sequential round
//!   trips: raw NATS clients (request with a reply subject, answered by a
//!   subscriber) vs. an embedder endpoint in runtime 1 asking a hyperty in
//!   runtime 2 (endpoint → bus → protostub → NATS → protostub → bus →
//!   hyperty, and back the same way, with acknowledged delivery each hop);
//! - one-way messages/s: a raw publisher to a raw subscriber vs. the bench
//!   driver hyperty (runtime 1) to the bench sink (runtime 2), in windows
//!   of [`WINDOW`] messages, each closed by a request whose response
//!   releases the next (flow control); and again in windows of
//!   [`DEEP_WINDOW`], half the sink's inbox (1024 by default), where the
//!   path is bound by its CPU rather than by one round trip per 64
//!   messages; and with [`SLIDING`] windows of [`DEEP_WINDOW`] in flight
//!   at once (a sliding window, as TCP's: each response releases the next
//!   window, so the path does not drain and refill at every window's edge,
//!   while at most 1,024 messages are on their way). The raw publisher has
//!   no flow control at all.
//!
//! Then the CPU each costs, this process's and nats-server's together:
//! rates on a shared machine move with its other tenants, CPU time much
//! less.
//!
//! Last, the round trips again, raw and ours, with this process and its
//! nats-server pinned to one core (a child run of this bench,
//! `HYPERTY_NATS_BENCH=rr-one-core:<count>`): there no thread is woken on
//! another core. On a VM a wake-up that crosses cores costs what an idle
//! virtual CPU takes to resume (30–36 µs on the 2-core VM this project is
//! measured on, against a few µs on one core), so the two rows tell the
//! wake-ups a round trip crosses from the work it does.
//!
//! Both runtimes live in this process (each with its own stubs and NATS
//! connections); the two-process path is exercised by the tests.
//!
//! For `perf stat`, the runtime-to-runtime work and nothing else:
//! `HYPERTY_NATS_BENCH=<oneway|oneway-deep|oneway-sliding|rr>:<count>[:policies]`
//! runs that many one-way messages (windows of 64, 512, or two of 512 in
//! flight) or round trips after
//! the warm-up, with `policies` under
//! the bus bench's realistic Cedar set on both domains and both runtimes'
//! buses; the difference between two counts, divided by the difference in
//! count, is the cost of one.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hyperty_host::{Message, MessageType, Runtime};
use hyperty_tests::*;
use serde_json::json;

const ROUND_TRIPS: usize = 2000;
/// One-way messages a run: long enough that its start (the stubs' buffers
/// growing, the first windows) weighs little; at 20,000 the sliding run
/// measured ~10 % under its rate at 50,000.
const ONE_WAY: u64 = 50_000;
const RUNS: usize = 3;
/// Messages a one-way window: each closed by a request.
const WINDOW: u64 = 64;
/// A deeper window: half the sink domain's inbox.
const DEEP_WINDOW: u64 = 512;
/// Windows in flight at once on the sliding run: the next is sent as the
/// oldest one's response comes back, so at most 1,024 messages (what a
/// domain's default inbox holds; this bench's sink has a larger one) are
/// on their way and the path never drains between windows.
const SLIDING: u64 = 2;

fn main() {
    let spec = std::env::var("HYPERTY_NATS_BENCH").ok();
    let one_core = spec.as_deref().and_then(|s| s.strip_prefix("rr-one-core:")).map(|n| n.parse::<usize>().expect("rr-one-core:<count>"));
    if one_core.is_some() {
        // Before any thread (or the node) starts: they all inherit it.
        pin_to_one_core();
    }
    let nats = Nats::start();
    let servers = [nats.endpoint()];
    let usage = "HYPERTY_NATS_BENCH=<oneway|oneway-deep|oneway-sliding|rr|rr-one-core>:<count>[:policies]";
    let policies = spec.as_deref().is_some_and(|s| s.ends_with(":policies"));
    let policies_dir = tempfile::tempdir().unwrap();
    let path = RuntimePath::new(&servers, policies.then_some(policies_dir.path()));
    path.round_trips(200); // warm-up: stubs loaded, subscriptions in place
    path.one_way(2_000, WINDOW, 1);
    if let Some(n) = one_core {
        let (raw, ours): (Vec<f64>, Vec<f64>) =
            (0..RUNS).map(|_| (percentiles(raw_round_trips(nats.port, n)).0, percentiles(path.round_trips(n)).0)).unzip();
        println!("{ONE_CORE_LINE} raw {:.1} ours {:.1}", median(raw), median(ours));
        return;
    }
    if let Some(spec) = spec {
        let mut parts = spec.split(':');
        let kind = parts.next().unwrap_or_default();
        let count: u64 = parts.next().and_then(|c| c.parse().ok()).expect(usage);
        match kind {
            "oneway" => println!("one-way: {:.0} msg/s", path.one_way(count, WINDOW, 1)),
            "oneway-deep" => println!("one-way, windows of {DEEP_WINDOW}: {:.0} msg/s", path.one_way(count, DEEP_WINDOW, 1)),
            "oneway-sliding" => println!("one-way, {SLIDING} windows of {DEEP_WINDOW} in flight: {:.0} msg/s", path.one_way(count, DEEP_WINDOW, SLIDING)),
            "rr" => println!("round trips: p50 {:.1} µs", percentiles(path.round_trips(count as usize)).0),
            _ => panic!("{usage}, not {spec}"),
        }
        return;
    }
    // Runtime to runtime, one-way: (window, windows in flight).
    let kinds = [(WINDOW, 1), (DEEP_WINDOW, 1), (DEEP_WINDOW, SLIDING)];
    let label = |(window, windows): (u64, u64)| match windows {
        1 if window == WINDOW => String::new(),
        1 => format!(", windows of {window}"),
        n => format!(", {n} windows of {window} in flight"),
    };
    // Medians' samples: p50, p99 (µs) and CPU (µs) a round trip, raw and
    // ours; rate and CPU (µs) a message, raw one-way and each kind.
    let (mut raw_rr, mut ours_rr) = ((Vec::new(), Vec::new(), Vec::new()), (Vec::new(), Vec::new(), Vec::new()));
    let mut raw_one = (Vec::new(), Vec::new());
    let mut ours_one = kinds.map(|_| (Vec::new(), Vec::new()));
    let server = nats.pid().expect("the bench's own nats-server");
    for _ in 0..RUNS {
        let ((p50, p99), used) = on_cpu(server, || percentiles(raw_round_trips(nats.port, ROUND_TRIPS)));
        raw_rr.0.push(p50);
        raw_rr.1.push(p99);
        raw_rr.2.push(used / ROUND_TRIPS as f64);
        let (rate, used) = on_cpu(server, || raw_one_way(nats.port, ONE_WAY));
        raw_one.0.push(rate);
        raw_one.1.push(used / ONE_WAY as f64);
        let ((p50, p99), used) = on_cpu(server, || percentiles(path.round_trips(ROUND_TRIPS)));
        ours_rr.0.push(p50);
        ours_rr.1.push(p99);
        ours_rr.2.push(used / ROUND_TRIPS as f64);
        for ((window, windows), samples) in kinds.iter().zip(&mut ours_one) {
            let (rate, used) = on_cpu(server, || path.one_way(ONE_WAY, *window, *windows));
            samples.0.push(rate);
            samples.1.push(used / ONE_WAY as f64);
        }
    }
    let ours_one = ours_one.map(|(rates, cpu)| (median(rates), median(cpu)));
    let (raw_rate, raw_cpu) = (median(raw_one.0), median(raw_one.1));
    let row = |what: &str, raw: &str, ours: &str, ratio: &str| println!("  {what:<46}{raw:>12}   {ours:>18}   {ratio:>5}");
    println!("through NATS (one nats-server on loopback, same run, median of {RUNS}):");
    row("", "raw NATS", "runtime to runtime", "ratio");
    let (a, b) = (median(raw_rr.0), median(ours_rr.0));
    row("request/response p50 (µs)", &format!("{a:.1}"), &format!("{b:.1}"), &format!("{:.1}x", b / a));
    let (a, b) = (median(raw_rr.1), median(ours_rr.1));
    row("request/response p99 (µs)", &format!("{a:.1}"), &format!("{b:.1}"), &format!("{:.1}x", b / a));
    for (kind, (rate, _)) in kinds.iter().zip(&ours_one) {
        row(&format!("one-way msg/s{}", label(*kind)), &format!("{raw_rate:.0}"), &format!("{rate:.0}"), &format!("{:.0}%", 100.0 * rate / raw_rate));
    }
    // CPU, less disturbed than rates by whatever else the machine runs.
    println!("CPU used (this process and nats-server, µs; median of {RUNS}):");
    let (a, b) = (median(raw_rr.2), median(ours_rr.2));
    row("a round trip", &format!("{a:.1}"), &format!("{b:.1}"), &format!("{:.1}x", b / a));
    for (kind, (_, cpu)) in kinds.iter().zip(&ours_one) {
        row(&format!("a one-way message{}", label(*kind)), &format!("{raw_cpu:.2}"), &format!("{cpu:.2}"), &format!("{:.1}x", cpu / raw_cpu));
    }
    drop((path, nats));
    println!("everything on one core (this bench again, pinned with its nats-server; median of {RUNS}):");
    let (a, b) = round_trips_on_one_core();
    row("request/response p50 (µs)", &format!("{a:.1}"), &format!("{b:.1}"), &format!("{:.1}x", b / a));
}

/// What the child run on one core prints before its two p50s.
const ONE_CORE_LINE: &str = "one core, round-trip p50 (µs):";

/// Runs this bench again pinned to one core
/// (`HYPERTY_NATS_BENCH=rr-one-core:<ROUND_TRIPS>`): the p50 (µs) of raw
/// NATS's round trips and of ours, when no wake-up crosses cores.
fn round_trips_on_one_core() -> (f64, f64) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--bench")
        .env("HYPERTY_NATS_BENCH", format!("rr-one-core:{ROUND_TRIPS}"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let parse = || -> Option<(f64, f64)> {
        let line = text.lines().find_map(|l| l.strip_prefix(ONE_CORE_LINE))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["raw", raw, "ours", ours] => Some((raw.parse().ok()?, ours.parse().ok()?)),
            _ => None,
        }
    };
    parse().unwrap_or_else(|| panic!("the run on one core ({}) printed no figures: {text}", out.status))
}

/// Pins this process to the first core it may run on: threads started
/// after this, and children (the nats-server), inherit it.
fn pin_to_one_core() {
    // SAFETY: sched_{get,set}affinity read and write the set they are given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set), 0);
        let first = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set)).expect("a core to run on");
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(first, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "{}", std::io::Error::last_os_error());
    }
}

/// Runs `work`: what it returns and the CPU time (µs) this process and
/// process `server` used meanwhile. This process's comes from
/// `getrusage` (threads that ended count too), the server's from the
/// scheduler's per-thread run time (`/proc/<pid>/task/*/schedstat`, ns;
/// Linux: elsewhere it counts 0).
fn on_cpu<R>(server: u32, work: impl FnOnce() -> R) -> (R, f64) {
    fn ours() -> f64 {
        // SAFETY: getrusage fills the struct it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
        let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
        us(usage.ru_utime) + us(usage.ru_stime)
    }
    fn theirs(pid: u32) -> f64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
        let ns: u64 = tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        ns as f64 / 1e3
    }
    let before = ours() + theirs(server);
    let result = work();
    (result, ours() + theirs(server) - before)
}

/// Runtime 1 (bench driver in alice.example, the harness endpoint in
/// bench.example) and runtime 2 (bench sink in bob.example), each with NATS
/// stubs for the three domains; with `policies` (a directory for their
/// files), the bus bench's realistic Cedar set on both domains and buses.
struct RuntimePath {
    r1: Runtime,
    _r2: Runtime,
    harness: hyperty_host::Endpoint,
    driver: hyperty_host::Address,
    sink: hyperty_host::Address,
    next_id: std::cell::Cell<u64>,
    _bundles: (TestBundle, TestBundle),
}

impl RuntimePath {
    fn new(servers: &[String], policies: Option<&std::path::Path>) -> RuntimePath {
        let stubs = |mut b: TestBundle| {
            for d in ["alice.example", "bob.example", "bench.example"] {
                b = b.protostub(d, servers, json!({ "queue": 100_000 }));
            }
            b
        };
        let unlimited = json!({ "limits": { "rate": 100_000_000, "burst": 1_000_000, "inbox": 65_536 } });
        let files = policies.map(|dir| {
            let file = |owner: &str| {
                let path = dir.join(format!("{owner}.cedar"));
                std::fs::write(&path, hyperty_tests::soak::realistic_policies(owner)).unwrap();
                path.to_str().unwrap().to_owned()
            };
            (file("alice"), file("bob"), file("bus"))
        });
        // Each runtime has the policies of the domain it runs.
        let checked = |b: TestBundle, domain: &str, file: Option<&String>| match file {
            Some(file) => b.domain(domain, json!({ "policies": [file] })),
            None => b,
        };
        let b1 = stubs(TestBundle::new().hyperty("alice.example", "driver", &guest("bench"), json!({ "role": "driver" })))
            .domain("alice.example", unlimited.clone());
        let b1 = checked(b1, "alice.example", files.as_ref().map(|f| &f.0));
        let b2 = stubs(TestBundle::new().hyperty("bob.example", "sink", &guest("bench"), json!({ "role": "sink" })))
            .domain("bob.example", unlimited);
        let b2 = checked(b2, "bob.example", files.as_ref().map(|f| &f.1));
        let r1 = runtime(Duration::from_secs(60));
        let r2 = runtime(Duration::from_secs(60));
        if let Some((_, _, bus)) = &files {
            for r in [&r1, &r2] {
                r.policies().set_runtime_policies(std::path::Path::new(bus)).unwrap();
            }
        }
        r1.deploy(&b1.load()).unwrap();
        r2.deploy(&b2.load()).unwrap();
        let harness = r1.endpoint("hyperty://bench.example/harness", 1024).unwrap();
        let driver = r1.lookup("alice.example", "driver").unwrap();
        let sink = r2.lookup("bob.example", "sink").unwrap();
        RuntimePath { r1, _r2: r2, harness, driver, sink, next_id: Default::default(), _bundles: (b1, b2) }
    }

    fn id(&self) -> u64 {
        self.next_id.set(self.next_id.get() + 1);
        self.next_id.get()
    }

    /// µs per round trip, harness (runtime 1) → sink (runtime 2) and back.
    fn round_trips(&self, n: usize) -> Vec<f64> {
        let mut times = Vec::with_capacity(n);
        while times.len() < n {
            let id = self.id();
            let msg = Message::new(id, MessageType::Read, self.harness.address().clone(), self.sink.clone(), Some("{}".into()));
            let started = Instant::now();
            self.harness.request(msg, None).unwrap();
            let answer = self.harness.recv_timeout(Duration::from_secs(60)).expect("an answer");
            let elapsed = started.elapsed();
            // Until the stubs are live and subscribed, answers are 503/408.
            if answer.body.code == Some(200) {
                times.push(elapsed.as_secs_f64() * 1e6);
            }
        }
        let _ = &self.r1;
        times
    }

    /// Messages/s from the driver (runtime 1) to the sink (runtime 2), in
    /// windows of `window` messages, `windows` of them in flight at once.
    /// Every message reaches the sink once and in order: what it received
    /// grows by `count`, its anomalies (an id neither the last + 1 nor 1)
    /// not at all.
    fn one_way(&self, count: u64, window: u64, windows: u64) -> f64 {
        let before = self.ledger();
        let command = json!({ "to": self.sink.to_string(), "count": count, "mode": "oneway", "batch": window, "windows": windows });
        let msg = Message::new(self.id(), MessageType::Execute, self.harness.address().clone(), self.driver.clone(), Some(command.to_string()));
        let started = Instant::now();
        self.harness.request(msg, None).unwrap();
        let answer = self.harness.recv_timeout(Duration::from_secs(120)).expect("the driver answers");
        let elapsed = started.elapsed();
        assert_eq!(answer.body.code, Some(200), "{:?}", answer.body);
        let after = self.ledger();
        assert_eq!((after.0 - before.0, after.1 - before.1), (count, 0), "received and anomalies at the sink");
        count as f64 / elapsed.as_secs_f64()
    }

    /// The sink's ledger: messages received and anomalies.
    fn ledger(&self) -> (u64, u64) {
        let msg = Message::new(self.id(), MessageType::Execute, self.harness.address().clone(), self.sink.clone(), Some("{}".into()));
        self.harness.request(msg, None).unwrap();
        let answer = self.harness.recv_timeout(Duration::from_secs(60)).expect("the sink answers");
        assert_eq!(answer.body.code, Some(200), "{:?}", answer.body);
        let ledger: serde_json::Value = serde_json::from_str(answer.body.value.as_deref().unwrap_or("null")).unwrap();
        (ledger["received"].as_u64().unwrap(), ledger["anomalies"].as_u64().unwrap())
    }
}

/// A plain NATS client over TCP, enough for the baseline.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut c = Client { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream };
        let mut line = String::new();
        c.reader.read_line(&mut line).unwrap();
        c.writer.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n").unwrap();
        c.expect_pong();
        c
    }

    fn expect_pong(&mut self) {
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            if line.starts_with("PONG") {
                return;
            }
        }
    }

    /// The next MSG: (reply subject, payload).
    fn next_msg(&mut self) -> (Option<String>, Vec<u8>) {
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first() {
                Some(&"MSG") => {
                    let len: usize = words.last().unwrap().parse().unwrap();
                    let reply = (words.len() == 5).then(|| words[3].to_owned());
                    let mut payload = vec![0; len + 2];
                    self.reader.read_exact(&mut payload).unwrap();
                    payload.truncate(len);
                    return (reply, payload);
                }
                Some(&"PING") => self.writer.write_all(b"PONG\r\n").unwrap(),
                _ => {}
            }
        }
    }
}

/// A payload the size of a small envelope.
fn payload() -> String {
    "x".repeat(300)
}

/// µs per NATS request/reply between two raw clients.
fn raw_round_trips(port: u16, n: usize) -> Vec<f64> {
    let mut responder = Client::connect(port);
    responder.writer.write_all(b"SUB bench.echo 1\r\nPING\r\n").unwrap();
    responder.expect_pong();
    let echo = std::thread::spawn(move || {
        for _ in 0..n {
            let (reply, payload) = responder.next_msg();
            let reply = reply.unwrap();
            let mut out = format!("PUB {reply} {}\r\n", payload.len()).into_bytes();
            out.extend_from_slice(&payload);
            out.extend_from_slice(b"\r\n");
            responder.writer.write_all(&out).unwrap();
        }
    });
    let mut requester = Client::connect(port);
    requester.writer.write_all(b"SUB bench.inbox 1\r\nPING\r\n").unwrap();
    requester.expect_pong();
    let body = payload();
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        requester.writer.write_all(format!("PUB bench.echo bench.inbox {}\r\n{body}\r\n", body.len()).as_bytes()).unwrap();
        requester.next_msg();
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    echo.join().unwrap();
    times
}

/// Messages/s from a raw publisher to a raw subscriber.
fn raw_one_way(port: u16, n: u64) -> f64 {
    let mut subscriber = Client::connect(port);
    subscriber.writer.write_all(b"SUB bench.oneway 1\r\nPING\r\n").unwrap();
    subscriber.expect_pong();
    let counter = std::thread::spawn(move || {
        for _ in 0..n {
            subscriber.next_msg();
        }
    });
    let mut publisher = Client::connect(port);
    let body = payload();
    let started = Instant::now();
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(format!("PUB bench.oneway {}\r\n{body}\r\n", body.len()).as_bytes());
        if i % 64 == 63 {
            publisher.writer.write_all(&batch).unwrap();
            batch.clear();
        }
    }
    publisher.writer.write_all(&batch).unwrap();
    counter.join().unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
