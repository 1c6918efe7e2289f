//! Everything a hyperty can make the host hold through its imports is
//! bounded: pending requests (a cap per requester, a longest timeout, a
//! shutdown that does not wait on them), log lines (a rate, escaped text),
//! JSON values, the fields only the host or a responder sets, and the
//! characters of addresses. Each case is the `greedy` guest doing it
//! through the real bus, and each checks that other domains keep working.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hyperty_host::{Address, EventKind, Message, MessageType, Runtime};
use hyperty_tests::forger::{Forger, with_forger};
use hyperty_tests::*;
use serde_json::{Value, json};

/// What the host logged (every test of this binary), captured by the
/// global tracing subscriber [`capture_log`] installs.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber (before any runtime exists, so the
/// test helper's own subscriber is not installed).
fn capture_log() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .init();
    });
}

/// The captured log lines that contain `needle`.
fn logged(needle: &str) -> Vec<String> {
    let log = LOG.lock().unwrap();
    String::from_utf8_lossy(&log).lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
}

/// A runtime with the healthy pair, the test's driver and the greedy
/// hyperty `<domain>/g`, its domain set up with `settings`.
struct Case {
    runtime: Runtime,
    driver: Driver,
    events: hyperty_host::EventReceiver,
    a: Address,
    b: Address,
    greedy: Address,
    _bundles: (TestBundle, TestBundle),
}

fn case(domain: &str, settings: Value) -> Case {
    capture_log();
    let runtime = runtime(Duration::from_secs(5));
    let events = runtime.events();
    let driver = Driver::new(&runtime);
    let (healthy, a, b) = healthy_pair(&runtime);
    let bundle = TestBundle::new().hyperty(domain, "g", &guest("greedy"), json!({ "observer": OBSERVER })).domain(domain, settings);
    runtime.deploy(&bundle.load()).expect("the greedy bundle deploys");
    let greedy = runtime.lookup(domain, "g").unwrap();
    Case { runtime, driver, events, a, b, greedy, _bundles: (healthy, bundle) }
}

impl Case {
    /// Asks the greedy hyperty to do `op` and returns its answer's value.
    fn ask(&mut self, op: Value) -> Value {
        let answer = self.driver.ask(&self.greedy.clone(), op);
        assert_eq!(answer.body.code, Some(200), "{answer:?}");
        serde_json::from_str(answer.body.value.as_deref().unwrap()).unwrap()
    }

    /// A sink that never answers: an endpoint nobody reads.
    fn sink(&self, capacity: usize) -> hyperty_host::Endpoint {
        self.runtime.endpoint("hyperty://sink.example/never", capacity).unwrap()
    }
}

fn errors(answer: &Value) -> Vec<String> {
    answer["errors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_owned()).collect()
}

#[test]
fn pending_requests_are_capped_per_requester_and_other_domains_keep_working() {
    let mut c = case("greedy-cap.example", json!({ "limits": { "max-pending": 100 } }));
    let sink = c.sink(1000);
    let counts = c.ask(json!({ "op": "pending", "to": sink.address().to_string(), "count": 150, "timeout_ms": u32::MAX }));
    assert_eq!((counts["sent"].as_u64(), counts["too_many_pending"].as_u64(), counts["other"].as_u64()), (Some(100), Some(50), Some(0)), "{counts}");
    let why = counts["errors"]["too-many-pending"].as_str().unwrap();
    assert!(why.contains("has 100 requests waiting for their response (max-pending = 100)"), "{why}");
    assert_eq!(c.runtime.pending_requests(), 100);
    let greedy = c.greedy.clone();
    wait_event(&mut c.events, |e| e.address == greedy && matches!(&e.kind, EventKind::Refused { reason } if reason.contains("max-pending = 100")));
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn a_request_timeout_beyond_the_domains_maximum_is_clamped() {
    let mut c = case("greedy-clamp.example", json!({ "limits": { "max-request-timeout-ms": 200 } }));
    let sink = c.sink(10);
    let counts = c.ask(json!({ "op": "pending", "to": sink.address().to_string(), "count": 1, "timeout_ms": u32::MAX }));
    assert_eq!(counts["sent"], 1, "{counts}");
    // u32::MAX ms is 49 days: the 408 comes only if it was clamped.
    let greedy = c.greedy.clone();
    let report = c.driver.expect(|m| m.from == greedy && m.kind == MessageType::Forward);
    let report = reported(&report);
    assert_eq!(report["code"], 408, "{report}");
    assert!(report["description"].as_str().unwrap().contains("within 200 ms"), "{report}");
    assert_eq!(c.runtime.pending_requests(), 0);
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn an_endpoint_request_with_an_unbounded_timeout_is_pending_not_a_panic() {
    // `Instant::now() + Duration::MAX` panicked inside the pending map's
    // lock, poisoning the bus for every domain.
    let mut c = case("greedy-forever.example", json!({}));
    let sink = c.sink(10);
    let id = c.driver.fresh_id();
    let read = Message::new(id, MessageType::Read, c.driver.address().clone(), sink.address().clone(), None);
    c.driver.endpoint.request(read, Some(Duration::MAX)).unwrap();
    assert_eq!(c.runtime.pending_requests(), 1);
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn shutdown_does_not_wait_on_pending_requests() {
    let limits = json!({ "limits": { "max-pending": 20_000, "burst": 20_000, "call-timeout-ms": 30_000 } });
    let mut c = case("greedy-stop.example", limits);
    let sink = c.sink(20_000);
    let counts = c.ask(json!({ "op": "pending", "to": sink.address().to_string(), "count": 12_000, "timeout_ms": u32::MAX }));
    assert_eq!(counts["sent"], 12_000, "{counts}");
    assert!(c.runtime.pending_requests() >= 12_000);
    let Case { runtime, driver, _bundles, .. } = c;
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime.shutdown();
        let left = runtime.pending_requests();
        drop((driver, sink));
        drop(runtime);
        let _ = done.send(left);
    });
    let left = stopped.recv_timeout(Duration::from_secs(60)).expect("the runtime shut down (within a generous 60 s)");
    assert_eq!(left, 0, "the pending requests were forgotten");
}

#[test]
fn shutdown_does_not_wait_for_a_busy_domains_queue() {
    let mut c = case("greedy-busy.example", json!({ "limits": { "call-timeout-ms": 5000 } }));
    // One second each: 100 queued would hold a shutdown that handles them
    // for 100 s.
    let greedy = c.greedy.clone();
    for _ in 0..100 {
        let id = c.driver.fresh_id();
        let busy = Message::new(id, MessageType::Execute, c.driver.address().clone(), greedy.clone(), Some(json!({ "op": "busy", "ms": 1000 }).to_string()));
        c.driver.endpoint.send(busy).unwrap();
    }
    let Case { runtime, driver, _bundles, .. } = c;
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime.shutdown();
        drop((driver, runtime));
        let _ = done.send(());
    });
    stopped.recv_timeout(Duration::from_secs(60)).expect("the runtime shut down (within a generous 60 s)");
}

#[test]
fn a_log_flood_is_rate_limited_and_said_once_when_it_resumes() {
    let limits = json!({ "limits": { "log-lines": 20, "log-bytes": 16384, "call-timeout-ms": 30_000 } });
    let mut c = case("greedy-log.example", limits);
    let label = "greedy-log.example/g: ";
    let started = Instant::now();
    assert_eq!(c.ask(json!({ "op": "log", "count": 300, "bytes": 64 << 10 }))["logged"], 300);
    let elapsed = started.elapsed().as_secs_f64();
    let lines = logged(&format!("{label}xxx"));
    let bytes: usize = lines.iter().map(|l| l.len() - l.find(label).unwrap() - label.len()).sum();
    // Lines are cut at 4 KiB; 16 KiB a second (and at once) is 4 of them.
    assert!(lines.iter().all(|l| l.ends_with('…')), "lines are cut");
    let (max_lines, max_bytes) = (4.0 + 4.0 * elapsed + 1.0, 16384.0 * (1.0 + elapsed) + 4096.0);
    assert!(!lines.is_empty() && lines.len() as f64 <= max_lines, "{} lines in {elapsed:.3} s", lines.len());
    assert!(bytes as f64 <= max_bytes, "{bytes} bytes in {elapsed:.3} s");
    // The next line written says how many were dropped, once.
    let until = Instant::now() + Duration::from_secs(10);
    let said = loop {
        c.ask(json!({ "op": "log", "line": "after the flood" }));
        if let Some(line) = logged(label).into_iter().find(|l| l.contains("log lines suppressed")) {
            break line;
        }
        assert!(Instant::now() < until, "no suppressed-lines line within 10 s");
    };
    let n: usize = said.split(label).nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(n + lines.len() >= 300, "{said} ({} lines kept)", lines.len());
    assert_eq!(logged("log lines suppressed").iter().filter(|l| l.contains(label)).count(), 1);
    assert!(!logged(&format!("{label}after the flood")).is_empty());
    c.driver.still_works(&c.a, &c.b);
}

/// A runtime running the forging stub of a domain, its [`Forger`], and a
/// driver subscribed to the stub's status (`stub`).
struct Watched {
    runtime: Runtime,
    driver: Driver,
    forger: Forger,
    stub: String,
    _bundle: TestBundle,
}

fn watched_forger(domain: &str) -> Watched {
    let runtime = runtime(Duration::from_secs(5));
    let driver = Driver::new(&runtime);
    let stub = format!("domain://protostub.{domain}");
    let bundle = with_forger(TestBundle::new(), domain, None);
    runtime.deploy(&bundle.load()).unwrap();
    let forger = Forger::new(&runtime, domain);
    let subscribe = driver.endpoint.message(MessageType::Subscribe, &stub).build().unwrap();
    assert_eq!(driver.endpoint.request_reply(subscribe, None).unwrap().body.code, Some(200));
    Watched { runtime, driver, forger, stub, _bundle: bundle }
}

/// A stub reporting its status in a loop: every report takes effect (the
/// last one holds), but the host logs them at the stub's log rate (100
/// lines a second) and tells them (events, updates to subscribers) at 20
/// a second, the last one included.
#[test]
fn a_stub_reporting_its_status_in_a_loop_is_logged_and_told_at_their_rates() {
    capture_log();
    let domain = "status-flood.example";
    let Watched { runtime, driver, mut forger, stub, _bundle } = watched_forger(domain);
    let mut events = runtime.events();
    let started = Instant::now();
    forger.flood_status(2000);
    let elapsed = started.elapsed().as_secs_f64();
    let lines = logged(&format!("protostub {domain}: status live (flood ")).len();
    assert!(lines >= 1 && lines as f64 <= 100.0 + 100.0 * elapsed + 1.0, "{lines} lines in {elapsed:.3} s");
    // Subscribers are told the last status, after fewer updates.
    let last = json!({ "status": "live", "detail": "flood 1999" });
    let mut updates = 0;
    loop {
        let m = driver.endpoint.recv_timeout(Duration::from_secs(10)).expect("the last status is told within 10 s");
        assert_eq!(m.from.as_str(), stub, "{m:?}");
        updates += 1;
        if serde_json::from_str::<Value>(m.body.value.as_deref().unwrap()).unwrap() == last {
            break;
        }
    }
    let told = started.elapsed().as_secs_f64();
    assert!(updates as f64 <= 20.0 + 20.0 * told + 1.0, "{updates} updates in {told:.3} s");
    let flood = std::iter::from_fn(|| events.try_recv().ok())
        .filter(|e| matches!(&e.kind, EventKind::StubStatus { detail, .. } if detail.starts_with("flood")))
        .count();
    assert!(flood >= 1 && flood as f64 <= 20.0 + 20.0 * told + 1.0, "{flood} events in {told:.3} s");
    // And each report took effect: the last one holds.
    let subscribe = driver.endpoint.message(MessageType::Subscribe, &stub).build().unwrap();
    let status = driver.endpoint.request_reply(subscribe, None).unwrap();
    assert_eq!(serde_json::from_str::<Value>(status.body.value.as_deref().unwrap()).unwrap(), last);
}

#[test]
fn a_stub_that_fails_after_spending_its_status_rate_is_still_told_failed() {
    // The host's own statuses (loaded, failed) are told past the rate, or
    // a stub reporting in a loop until it traps would hide its failure: the
    // restart's status would replace it before the rate told it.
    let Watched { runtime: _runtime, driver, mut forger, _bundle, .. } = watched_forger("fails-quietly.example");
    forger.flood_status_then_trap(2000);
    loop {
        let m = driver.endpoint.recv_timeout(Duration::from_secs(10)).expect("the failure is told within 10 s");
        let status: Value = serde_json::from_str(m.body.value.as_deref().unwrap()).unwrap();
        if status["status"] == "failed" {
            assert!(status["detail"].as_str().unwrap().contains("panicked"), "{status}");
            break;
        }
    }
}

#[test]
fn json_values_too_deep_or_with_unbounded_numbers_are_refused_malformed() {
    let mut c = case("greedy-json.example", json!({}));
    let b = c.b.clone();
    let errors = errors(&c.ask(json!({ "op": "json", "to": b.to_string() })));
    assert_eq!(errors.len(), 9, "{errors:?}");
    let reasons = ["nested deeper than 128 levels (at byte 128)", "out of a double's range at byte 1: 1e999999", "has a number of 500000 characters at byte 0"];
    // send, request and reply of each value
    for (e, reason) in errors.iter().zip(reasons.iter().flat_map(|r| [r; 3])) {
        assert!(e.starts_with("malformed: body.value") && e.contains(reason), "{e}");
    }
    assert!(c.driver.find(|m| m.from == b, Duration::from_millis(200)).is_none(), "nothing reached b");
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn fields_only_the_host_or_a_responder_sets_are_refused_naming_the_field() {
    let mut c = case("greedy-fields.example", json!({}));
    let b = c.b.clone();
    let errors = errors(&c.ask(json!({ "op": "fields", "to": b.to_string() })));
    let expected = [
        "malformed: body.code (200): a response's code is set by its responder through `reply`",
        "malformed: body.code (200)",
        "malformed: body.description: only the host sets it",
        "malformed: body.description",
        "malformed: body.code (200)",
        "malformed: cannot reply to a response",
        "malformed: code 1000 is not a status code (100..=599)",
        "accepted",
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:?}");
    for (e, want) in errors.iter().zip(expected) {
        assert!(e.starts_with(want), "{e:?} should start with {want:?}");
    }
    // Only the message with a resource (a guest's field) reached b.
    let at_b = c.driver.report(&b, |m| m["type"] == "update");
    assert_eq!((at_b["resource"].as_str(), at_b["code"].as_u64(), at_b["description"].as_str()), (Some("comm://alice.example/room"), None, None));
    assert!(c.driver.find(|m| m.from == b, Duration::from_millis(200)).is_none(), "nothing else reached b");
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn addresses_with_bidi_or_invisible_characters_are_refused_and_never_echoed_raw() {
    let mut c = case("greedy-address.example", json!({}));
    let paths = ["x\u{202E}gpj.exe", "x\u{200B}y", "caf\u{e9}", "a b", "a?b"];
    let errors = errors(&c.ask(json!({ "op": "address", "paths": paths })));
    assert_eq!(errors.len(), 2 * paths.len(), "{errors:?}");
    let shown = ["'\\u{202e}' at byte 25", "'\\u{200b}' at byte 25", "'é' at byte 27", "' ' at byte 25", "'?' at byte 25"];
    for (e, shown) in errors.iter().zip(shown.iter().flat_map(|s| [s; 2])) {
        assert!(e.starts_with("malformed: to:") && e.contains(shown) && e.contains("is not allowed in an address path"), "{e}");
    }
    // A line with an override and a forged line break is logged escaped.
    c.ask(json!({ "op": "log", "line": "invoice\u{202E}fdp.exe\nINFO forged line" }));
    let label = "greedy-address.example/g: ";
    let until = Instant::now() + Duration::from_secs(10);
    while logged(&format!("{label}invoice")).is_empty() {
        assert!(Instant::now() < until, "the line was not logged");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(logged(&format!("{label}invoice\\u{{202e}}fdp.exe\\nINFO forged line")).len() == 1, "{:?}", logged(label));
    let log = String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned();
    assert!(!log.contains(['\u{202E}', '\u{200B}']), "a bidi or invisible character reached the log raw");
    assert!(!log.lines().any(|l| l.starts_with("INFO forged line")), "a guest forged a log line");
    c.driver.still_works(&c.a, &c.b);
}

/// The instance pool is a limit of the runtime's configuration
/// (`max_instances`): a bundle needing more instances than it holds is
/// refused as a whole, the error names the limit and how to raise it, and
/// the slots taken by the refused bundle's first instances are free again
/// for the next deployment.
#[test]
fn a_bundle_past_the_instance_pool_is_refused_naming_max_instances() {
    let config = hyperty_host::RuntimeConfig { cache_dir: cache_dir(), max_instances: 3, ..Default::default() };
    let runtime = Runtime::new(config).unwrap();
    let mut bundle = TestBundle::new();
    for i in 0..4 {
        bundle = bundle.hyperty("pool.example", &format!("pong{i}"), &guest("pong"), json!({}));
    }
    let error = runtime.deploy(&bundle.load()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("instance pool is full"), "{message}");
    assert!(message.contains("max-instances") && message.contains("RuntimeConfig::max_instances"), "{message}");
    assert!(message.contains("hyperties[3]"), "the entry past the pool is named: {message}");
    assert!(runtime.hyperties().is_empty(), "nothing of the refused bundle runs");

    let mut fits = TestBundle::new();
    for i in 0..3 {
        fits = fits.hyperty("pool.example", &format!("pong{i}"), &guest("pong"), json!({}));
    }
    assert_eq!(runtime.deploy(&fits.load()).unwrap().len(), 3);
    let pong = runtime.lookup("pool.example", "pong2").unwrap();
    let e = runtime.endpoint("hyperty://tester.example/t", 8).unwrap();
    let ping = Message::new(1, MessageType::Execute, e.address().clone(), pong, Some(r#"{"text":"ping"}"#.into()));
    let answer = e.request_reply(ping, None).unwrap();
    assert_eq!(answer.body.code, Some(200), "{answer:?}");
}

/// A greedy hyperty g (a-flood.example) whose init sends `count`
/// requests (with `pad` bytes more each, and each refused `inbox-full`
/// sent again) to b (b-starting.example, under `b_domain`), instantiated and routed but
/// not yet initialised; every one of `count` is taken. Then each of them
/// that did not reach b is answered 503 with a description containing
/// each of `why`. Returns how many reached b (what waited for its init,
/// then what its inbox held).
fn flood_a_starting_hyperty(count: usize, pad: Option<u64>, b_domain: Value, why: &[&str]) -> usize {
    capture_log();
    let runtime = runtime(Duration::from_secs(30));
    let mut driver = Driver::new(&runtime);
    let target = "hyperty://b-starting.example/b";
    let mut flood = json!({ "op": "pending", "to": target, "count": count, "timeout_ms": 30_000, "retry_full": true });
    if let Some(pad) = pad {
        flood["pad"] = pad.into();
    }
    let bundle = TestBundle::new()
        .hyperty("a-flood.example", "g", &guest("greedy"), json!({ "observer": OBSERVER, "at_init": flood }))
        .hyperty("b-starting.example", "b", &guest("puppet"), puppet_config(false))
        .set("b-starting.example", "b", "address", json!(target))
        .domain("b-starting.example", b_domain);
    runtime.deploy(&bundle.load()).expect("the bundle deploys");
    let (g, b) = (runtime.lookup("a-flood.example", "g").unwrap(), runtime.lookup("b-starting.example", "b").unwrap());
    let at_init = driver.command(&g, json!({ "op": "init" }));
    assert_eq!((at_init["sent"].as_u64(), at_init["other"].as_u64()), (Some(count as u64), Some(0)), "{at_init}");
    let reached = driver.before_marker(&b).iter().filter(|m| reported(m)["from"] == g.as_str()).count();
    for _ in reached.min(count)..count {
        let answer = driver.expect(|m| m.from == g && m.kind == MessageType::Forward);
        let answer = reported(&answer);
        assert_eq!(answer["code"], 503, "{answer}");
        let description = answer["description"].as_str().unwrap();
        assert!(why.iter().all(|w| description.contains(w)), "{description}");
    }
    reached
}

#[test]
fn messages_for_a_hyperty_whose_init_has_not_run_wait_at_most_its_inbox_and_the_rest_are_answered_503() {
    // The greedy hyperty's init (run before b's: its domain comes first)
    // sends 900 requests to b, instantiated and routed but not yet
    // initialised; it sends each again while b's inbox is full, so all
    // 900 are taken from b's inbox while b waits for its init. What
    // waited for b's init (its backlog, at most `inbox`) and what was
    // still in its inbox then (at most `inbox` again) reach b, and every
    // other one is answered 503, naming why.
    let why = ["b-starting.example/b is starting and already holds 16 messages for after its init (inbox = 16)"];
    let reached = flood_a_starting_hyperty(900, None, json!({ "limits": { "inbox": 16 } }), &why);
    assert!(reached <= 32, "{reached} of 900 requests reached b: its backlog held more than its inbox (16)");
}

/// The same bound in bytes (`inbox-bytes`): 10 KB requests wait for b's
/// init at most 64 KiB of them, however many fit the count (`inbox`, 1,024
/// here); every other one is answered 503 naming `inbox-bytes`.
#[test]
fn messages_for_a_hyperty_whose_init_has_not_run_wait_at_most_its_inbox_bytes() {
    let why = ["b-starting.example/b is starting and already holds", "up to its inbox-bytes (65536)"];
    let reached = flood_a_starting_hyperty(200, Some(10_000), json!({ "limits": { "inbox-bytes": 65_536 } }), &why);
    // Its backlog and then its inbox each held at most 64 KiB: 6 of them.
    assert!(reached <= 14, "{reached} of 200 requests of 10 KB reached b: more than two inboxes of 64 KiB");
}

#[test]
fn a_megabyte_long_init_error_is_cut_to_a_log_line_and_escaped() {
    capture_log();
    let runtime = runtime(Duration::from_secs(5));
    let bundle = TestBundle::new().hyperty("refuses.example", "r", &guest("greedy"), json!({ "refuse_init_bytes": 1_000_000 }));
    let e = runtime.deploy(&bundle.load()).expect_err("its init fails").to_string();
    // It is said once, and what waited for that init (answered 503 with
    // the same reason) is as short: never a megabyte per message.
    assert!(e.contains("init refused: xxxx") && e.contains('…'), "{}", &e[..e.len().min(300)]);
    assert!(e.len() < 5000, "the deploy error is {} bytes", e.len());
}

/// The same with a deployment large enough to be instantiated on several
/// threads (2 cores or more): the entry named is still the first past the
/// pool, whichever thread took the last slot first (the stores after a
/// failure are built again one by one).
#[test]
fn a_large_bundle_past_the_instance_pool_names_the_first_entry_past_it() {
    let config = hyperty_host::RuntimeConfig { cache_dir: cache_dir(), max_instances: 30, ..Default::default() };
    let runtime = Runtime::new(config).unwrap();
    for _ in 0..3 {
        let message = runtime.deploy(&hyperty_tests::scale::pongs(1, 48).load()).unwrap_err().to_string();
        assert!(message.contains("instance pool is full"), "{message}");
        assert!(message.contains("hyperties[30]"), "the first entry past the pool is named: {message}");
        assert!(runtime.hyperties().is_empty(), "nothing of the refused bundle runs");
    }
    assert_eq!(runtime.deploy(&hyperty_tests::scale::pongs(1, 30).load()).unwrap().len(), 30);
}

/// A domain's inbox is bounded in bytes too (`inbox-bytes`): while its
/// hyperty is busy, 100 KB messages wait until 1 MiB of them does, then
/// senders get `inbox-full`, far below the inbox's 1,024 messages; once
/// what waited was handled, the inbox takes messages again. (Before, 1,024
/// messages of up to 1 MiB could wait for one slow domain.)
#[test]
fn a_domains_inbox_is_bounded_in_bytes() {
    capture_log();
    let runtime = runtime(Duration::from_secs(30));
    let mut driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("slow.example", "s", &guest("hostile"), json!({ "mode": "sleep" }))
        .domain("slow.example", json!({ "limits": { "inbox-bytes": 1 << 20, "call-timeout-ms": 10_000 } }));
    runtime.deploy(&bundle.load()).expect("the bundle deploys");
    let s = runtime.lookup("slow.example", "s").unwrap();
    // Busy for 2 s: what comes meanwhile waits in the domain's inbox.
    let id = driver.fresh_id();
    let busy = Message::new(id, MessageType::Read, driver.address().clone(), s.clone(), Some(r#"{"ms":2000}"#.into()));
    driver.endpoint.request(busy, None).unwrap();
    let big = |id: u64| {
        let value = json!({ "ms": 1, "pad": "x".repeat(100_000) }).to_string();
        Message::new(id, MessageType::Update, driver.address().clone(), s.clone(), Some(value))
    };
    let mut waiting = 0;
    loop {
        match driver.endpoint.send(big(10_000 + waiting)) {
            Ok(()) => waiting += 1,
            Err(hyperty_host::SendError::InboxFull(to)) => {
                assert!(to.contains(s.as_str()), "the full inbox is the slow domain's: {to}");
                break;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(waiting <= 1024, "1,024 messages of 100 KB waited: the inbox is not bounded in bytes");
    }
    assert!((9..=11).contains(&waiting), "{waiting} messages of 100 KB waited in an inbox of 1 MiB");
    let answer = driver.expect(|m| m.kind == MessageType::Response && m.id == id);
    assert_eq!(answer.body.code, Some(200), "{answer:?}");
    // What waited is handled (1 ms each), and its bytes are taken off.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match driver.endpoint.send(big(20_000)) {
            Ok(()) => break,
            Err(hyperty_host::SendError::InboxFull(_)) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("the inbox takes nothing once what waited was handled: {e}"),
        }
    }
}
