//! Protostubs: runtimes talking through a real NATS server, with the NATS
//! protocol in the `nats-stub` component.

use std::time::Duration;

use hyperty_host::{Address, Runtime};
use hyperty_tests::*;
use hyperty_tests::forger::{Forger, with_forger_entry};
use serde_json::json;

/// The domains each runtime reaches through NATS: its own (to listen) and
/// the others (to send).
const DOMAINS: [&str; 3] = ["alice.example", "bob.example", "app.example"];

fn with_stubs(mut bundle: TestBundle, servers: &[String]) -> TestBundle {
    for domain in DOMAINS {
        bundle = bundle.protostub(domain, servers, json!({}));
    }
    bundle
}

/// Runtime 1: alice.example/a and the observer (app.example); runtime 2:
/// bob.example/b, echoing. Each with stubs to `servers`.
fn two_runtimes(servers1: &[String], servers2: &[String]) -> (Runtime, Runtime, Driver, Address, Address, TestBundle, TestBundle) {
    let r1 = runtime(Duration::from_secs(10));
    let r2 = runtime(Duration::from_secs(10));
    let driver = Driver::new(&r1);
    let b1 = with_stubs(TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false)), servers1);
    let b2 = with_stubs(TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), puppet_config(true)), servers2);
    r1.deploy(&b1.load()).expect("runtime 1 deploys");
    r2.deploy(&b2.load()).expect("runtime 2 deploys");
    let a = r1.lookup("alice.example", "a").unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();
    (r1, r2, driver, a, b, b1, b2)
}

/// a requests b until one answer comes back 200 (the stubs connect and
/// subscribe asynchronously); returns the answer's JSON.
fn request_until_answered(driver: &mut Driver, a: &Address, b: &Address) -> serde_json::Value {
    request_value_until_answered(driver, a, b, "{\"n\":1}")
}

/// The same, each request carrying the JSON text `value`.
fn request_value_until_answered(driver: &mut Driver, a: &Address, b: &Address, value: &str) -> serde_json::Value {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let id = driver.fresh_id();
        let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": b.to_string(), "value": value }, "timeout_ms": 3000 });
        assert_eq!(driver.command(a, cmd), json!({ "ok": true }));
        let answer = driver.report(a, |m| m["type"] == "response" && m["id"] == id);
        if answer["code"] == 200 {
            return answer;
        }
        assert!(std::time::Instant::now() < until, "no answer through NATS: {answer}");
    }
}

#[test]
fn two_runtimes_exchange_requests_and_responses_through_nats() {
    let nats = Nats::start();
    let servers = [nats.endpoint()];
    let (r1, r2, mut driver, a, b, _b1, _b2) = two_runtimes(&servers, &servers);
    let answer = request_until_answered(&mut driver, &a, &b);
    assert_eq!(answer["from"], b.to_string());
    // b's report crossed back too (bob.example → app.example through NATS).
    let seen = driver.report(&b, |m| m["type"] == "read");
    assert_eq!(seen["from"], a.to_string());
    assert_eq!(r1.pending_requests() + r2.pending_requests(), 0);
}

/// A backlog of large messages to another runtime, more than a stub's
/// 64 MiB of memory holds at once, is carried once the node is back: 80
/// messages of ~900 KB from a to b queued while the node is down. The
/// queue takes 64 MiB of envelopes (`MAX_QUEUE_BYTES`) and answers the
/// rest 503 naming that; what it took reaches b, and b's report of each
/// (as large) comes back. (The stub took the whole backlog into one write
/// and ran out of memory, restarted and did it again, for ever; the queue
/// held any number of bytes up to its count of messages.)
#[test]
fn a_backlog_larger_than_a_stubs_memory_is_carried_and_the_queue_bounded_in_bytes() {
    let mut nats = Nats::start();
    let servers = [nats.endpoint()];
    let (r1, r2, mut driver, a, b, _b1, _b2) = two_runtimes(&servers, &servers);
    request_until_answered(&mut driver, &a, &b);
    let mut events = [r1.events(), r2.events()];
    // Every event of both runtimes so far, as "<who> <what>".
    let mut happened = move || events.iter_mut().flat_map(|e| std::iter::from_fn(|| e.try_recv().ok())).map(|e| format!("{} {:?}", e.hyperty, e.kind)).collect::<Vec<_>>();
    nats.kill();
    let value = json!({ "pad": "x".repeat(900_000) }).to_string();
    const COUNT: usize = 80;
    for i in 0..COUNT {
        let id = driver.fresh_id();
        let cmd = json!({ "op": "send", "message": { "id": id, "type": "update", "to": b.to_string(), "resource": format!("big-{i}"), "value": value } });
        assert_eq!(driver.command(&a, cmd), json!({ "ok": true }), "message {i} sent");
    }
    let mut refused = 0;
    while let Some(m) = driver.find(|m| m.kind == hyperty_host::MessageType::Forward && m.from == a && reported(m)["code"] == 503, Duration::from_secs(2)) {
        let why = reported(&m)["description"].as_str().unwrap_or_default().to_owned();
        assert!(why.contains("protostub queue of bob.example is full (67108864 bytes of envelopes)"), "{why}");
        refused += 1;
    }
    assert!((1..=10).contains(&refused), "{refused} of {COUNT} refused: the queue takes 64 MiB of them");
    nats.restart();
    let mut seen = std::collections::BTreeSet::new();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < COUNT - refused {
        let left = until.saturating_duration_since(std::time::Instant::now());
        let Some(m) = driver.find(|m| m.kind == hyperty_host::MessageType::Forward && m.from == b, left) else {
            panic!("{} of {} large messages carried within 60 s; events: {:#?}", seen.len(), COUNT - refused, happened());
        };
        let report = reported(&m);
        if let Some(resource) = report["resource"].as_str() {
            assert_eq!(report["value"].as_str().map(str::len), Some(value.len()), "{resource} whole");
            seen.insert(resource.to_owned());
        }
    }
    let trapped: Vec<String> = happened().into_iter().filter(|e| e.contains("Trapped")).collect();
    assert!(trapped.is_empty(), "{trapped:#?}");
}

/// Status events of protostub `domain`, in order, as they come within
/// `within`, until `last` is seen.
fn statuses_until(events: &mut hyperty_host::EventReceiver, domain: &str, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let label = format!("protostub {domain}");
    loop {
        let e = wait_event(events, |e| e.hyperty == label && matches!(e.kind, hyperty_host::EventKind::StubStatus { .. }));
        let hyperty_host::EventKind::StubStatus { status, .. } = e.kind else { unreachable!() };
        seen.push(status.clone());
        if status == last {
            return seen;
        }
    }
}

/// Deliveries to `domain` that a protostub's thread ran itself (the
/// hand-off), as `runtime` counts them.
fn stub_handoffs(runtime: &Runtime, domain: &str) -> f64 {
    let samples = hyperty_tests::metrics::Samples::parse(&runtime.metrics_text());
    samples.get("hyperty_handoffs_total", &[("domain", domain), ("lender", "protostub")])
}

/// a asks b once (b answers 200).
fn ask_once(driver: &mut Driver, a: &Address, b: &Address) {
    let id = driver.fresh_id();
    let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": b.to_string(), "value": "{}" }, "timeout_ms": 5000 });
    assert_eq!(driver.command(a, cmd), json!({ "ok": true }));
    let answer = driver.report(a, |m| m["type"] == "response" && m["id"] == id);
    assert_eq!(answer["code"], 200, "{answer}");
}

/// Runtime 1: alice.example/a and the observer; runtime 2: `hyperties` (of
/// bob.example and slow.example, whose call deadline is 5 s). Stubs for
/// those domains, and for alice.example and app.example, in both.
fn stub_lending_runtimes(nats: &Nats, hyperties: &[(&str, &str, &str, serde_json::Value)]) -> (Runtime, Runtime, Driver, Address, TestBundle, TestBundle) {
    let servers = [nats.endpoint()];
    let (r1, r2) = (runtime(Duration::from_secs(10)), runtime(Duration::from_secs(10)));
    let driver = Driver::new(&r1);
    let stubs = |b: TestBundle| with_stubs(b, &servers).protostub("slow.example", &servers, json!({}));
    let b1 = stubs(TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false)));
    let mut b2 = stubs(TestBundle::new());
    for (domain, name, component, config) in hyperties {
        b2 = b2.hyperty(domain, name, &guest(component), config.clone());
    }
    if hyperties.iter().any(|(domain, ..)| *domain == "slow.example") {
        b2 = b2.domain("slow.example", json!({ "limits": { "call-timeout-ms": 5000 } }));
    }
    r1.deploy(&b1.load()).unwrap();
    r2.deploy(&b2.load()).unwrap();
    let a = r1.lookup("alice.example", "a").unwrap();
    (r1, r2, driver, a, b1, b2)
}

/// A stub's thread runs what it posts to an idle hyperty of its own domain
/// (the hand-off: no wake-up of the domain's thread), but only where the
/// domain's call deadline is at most 1 s: a hyperty of slow.example (5 s)
/// is always run on its domain's thread.
#[test]
fn a_stub_runs_what_it_posts_on_its_own_thread_only_for_a_domain_with_a_short_deadline() {
    let nats = Nats::start();
    let hyperties = [
        ("bob.example", "b", "puppet", puppet_config(true)),
        ("slow.example", "s", "puppet", puppet_config(true)),
    ];
    let (_r1, r2, mut driver, a, _b1, _b2) = stub_lending_runtimes(&nats, &hyperties);
    let (b, slow) = (r2.lookup("bob.example", "b").unwrap(), r2.lookup("slow.example", "s").unwrap());
    request_until_answered(&mut driver, &a, &b);
    request_until_answered(&mut driver, &a, &slow);
    for _ in 0..20 {
        ask_once(&mut driver, &a, &b);
        ask_once(&mut driver, &a, &slow);
    }
    // One request at a time, each to an idle hyperty whose calls are short.
    assert!(stub_handoffs(&r2, "bob.example") >= 1.0, "{}", r2.metrics_text());
    assert_eq!(stub_handoffs(&r2, "slow.example"), 0.0, "{}", r2.metrics_text());
}

/// A hyperty looping on its stub's thread (its domain's deadline is the
/// default 1 s, so the stub lends to it) is stopped at its deadline and the
/// stub goes on. Having lent that second, the stub's thread lends nothing
/// more until it has earned the time back (a quarter of its time: about
/// 3 s), then lends again.
#[test]
fn a_hyperty_looping_on_a_stubs_thread_is_stopped_and_the_stub_lends_again_only_once_it_earned_the_time_back() {
    let nats = Nats::start();
    let hyperties = [
        ("bob.example", "b", "puppet", puppet_config(true)),
        ("bob.example", "loop", "hostile", json!({ "mode": "loop" })),
    ];
    let (_r1, r2, mut driver, a, _b1, _b2) = stub_lending_runtimes(&nats, &hyperties);
    let mut events = r2.events();
    let (b, looper) = (r2.lookup("bob.example", "b").unwrap(), r2.lookup("bob.example", "loop").unwrap());
    request_until_answered(&mut driver, &a, &b);
    let mut seen = Vec::new();
    // The loop is lent only if bob.example's last call was short (under
    // 1 ms, which a loaded debug build may miss): tried until it is.
    let mut attempts = 0;
    let (lent, trapped) = loop {
        attempts += 1;
        assert!(attempts <= 5, "the loop never ran on the stub's thread");
        let before = stub_handoffs(&r2, "bob.example");
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while stub_handoffs(&r2, "bob.example") == before {
            assert!(std::time::Instant::now() < until, "the stub never ran a delivery of bob.example");
            ask_once(&mut driver, &a, &b);
        }
        let lent = stub_handoffs(&r2, "bob.example");
        let cmd = json!({ "op": "send", "message": { "type": "update", "to": looper.to_string(), "value": "{}" } });
        assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
        let trapped = loop {
            let event = events.recv_timeout(Duration::from_secs(30)).expect("the looping hyperty is stopped within 30 s");
            if event.address == looper
                && let hyperty_host::EventKind::Trapped { reason } = &event.kind
            {
                break reason.clone();
            }
            seen.push(event);
        };
        if stub_handoffs(&r2, "bob.example") == lent + 1.0 {
            break (lent, trapped);
        }
        // Run on bob.example's thread: the stub's allowance is untouched.
        // The looper restarts before the next try.
        loop {
            let event = events.recv_timeout(Duration::from_secs(30)).expect("the looping hyperty restarts within 30 s");
            if event.address == looper && matches!(event.kind, hyperty_host::EventKind::Restarted { .. }) {
                break;
            }
            seen.push(event);
        }
    };
    let stopped = std::time::Instant::now();
    assert!(trapped.contains("call deadline"), "{trapped}");
    // The requests after it run on bob.example's thread: the first because
    // the domain's last call was long, the others, which find it fast
    // again, because the stub's allowance is spent (for about 3 s).
    for _ in 0..5 {
        ask_once(&mut driver, &a, &b);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stub_handoffs(&r2, "bob.example"), lent + 1.0, "lent again at once");
    let again = loop {
        assert!(stopped.elapsed() < Duration::from_secs(20), "the stub never lent again");
        std::thread::sleep(Duration::from_millis(200));
        ask_once(&mut driver, &a, &b);
        if stub_handoffs(&r2, "bob.example") > lent + 1.0 {
            break stopped.elapsed();
        }
    };
    assert!(again >= Duration::from_millis(1500), "lent again after {again:?}");
    seen.extend(std::iter::from_fn(|| events.try_recv().ok()));
    let failed: Vec<_> = seen.iter().filter(|e| e.hyperty.contains("protostub") && matches!(&e.kind, hyperty_host::EventKind::Trapped { .. })).collect();
    assert!(failed.is_empty(), "a stub failed: {failed:?}");
}

#[test]
fn a_stub_loads_on_the_first_message_for_its_domain_and_reports_its_status() {
    let mut nats = Nats::start();
    let servers = [nats.endpoint()];
    let r1 = runtime(Duration::from_secs(10));
    let mut events = r1.events();
    let mut driver = Driver::new(&r1);
    // bob.example has no hyperty here: its stub waits for a message.
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .protostub("bob.example", &servers, json!({}));
    r1.deploy(&bundle.load()).unwrap();
    let a = r1.lookup("alice.example", "a").unwrap();
    let stub = |r: &Runtime| r.discover(&hyperty_host::Query { domain: Some("bob.example".into()), ..Default::default() });
    assert_eq!(stub(&r1)[0].kind, hyperty_host::registry::Kind::Protostub);
    // a subscribes to the stub's status on the bus: nothing loaded yet
    // (deployed, a round trip later).
    let cmd = json!({ "op": "request", "message": { "id": 1, "type": "subscribe", "to": "domain://protostub.bob.example" } });
    assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
    let subscribed = driver.report(&a, |m| m["type"] == "response" && m["id"] == 1);
    assert_eq!((subscribed["code"].as_u64(), subscribed["value"].as_str()), (Some(200), Some(r#"{"status":"created","detail":"not loaded yet"}"#)));
    assert!(events.try_recv().is_err(), "nothing loaded before the first message");
    // The first message for bob.example loads it: created, in-progress, live.
    let id = driver.fresh_id();
    let b = "hyperty://bob.example/somewhere";
    let cmd = json!({ "op": "send", "message": { "id": id, "type": "update", "to": b, "value": "{}" } });
    assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
    assert_eq!(statuses_until(&mut events, "bob.example", "live"), ["created", "in-progress", "live"]);
    assert_eq!(stub(&r1)[0].status, hyperty_host::registry::Status::Live);
    let told = |status: &str| {
        let status = status.to_owned();
        move |m: &serde_json::Value| m["type"] == "update" && m["from"] == "domain://protostub.bob.example" && m["value"].as_str().unwrap_or("").contains(&format!("\"status\":\"{status}\""))
    };
    driver.report(&a, told("live"));
    // The node goes away: disconnected (and reconnecting); back: live.
    nats.kill();
    let seen = statuses_until(&mut events, "bob.example", "disconnected");
    assert_eq!(seen.last().map(String::as_str), Some("disconnected"));
    assert_eq!(stub(&r1)[0].status, hyperty_host::registry::Status::Disconnected);
    driver.report(&a, told("disconnected"));
    nats.restart();
    statuses_until(&mut events, "bob.example", "live");
    driver.report(&a, told("live"));
}

#[test]
fn a_stub_connects_only_to_its_granted_endpoints() {
    let nats = Nats::start();
    let r1 = runtime(Duration::from_secs(10));
    let mut events = r1.events();
    // The config names the server, the grant another endpoint.
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .protostub("alice.example", &[nats.endpoint()], json!({ "endpoints": ["127.0.0.1:9"] }));
    r1.deploy(&bundle.load()).unwrap();
    let label = "protostub alice.example".to_string();
    let e = wait_event(&mut events, |e| e.hyperty == label && matches!(&e.kind, hyperty_host::EventKind::StubStatus { status, .. } if status == "disconnected"));
    let hyperty_host::EventKind::StubStatus { detail, .. } = e.kind else { unreachable!() };
    assert!(detail.contains("access-denied"), "{detail}");
    // And it keeps being refused (reconnecting with backoff), never live:
    // the next two attempts.
    for _ in 0..2 {
        let seen = statuses_until(&mut events, "alice.example", "disconnected");
        assert_eq!(seen, ["in-progress", "disconnected"]);
    }
}

#[test]
fn a_message_that_came_through_a_stub_never_goes_back_out_through_it() {
    let nats = Nats::start();
    let servers = [nats.endpoint()];
    let r1 = runtime(Duration::from_secs(10));
    let mut events = r1.events();
    let observer = r1.endpoint(OBSERVER, 16).unwrap();
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .protostub("alice.example", &servers, json!({}))
        .protostub("app.example", &servers, json!({}));
    r1.deploy(&bundle.load()).unwrap();
    let a = r1.lookup("alice.example", "a").unwrap();
    statuses_until(&mut events, "alice.example", "live");
    // A remote sender (of app.example, in no runtime: this test on the node).
    let remote = "hyperty://app.example/remote";
    let mut node = NatsClient::connect(nats.port, None);
    node.subscribe(&nats_subject("app.example", remote, "*")).unwrap();
    // An envelope for an address of alice.example that does not live here,
    // arriving (on a's subject) through alice.example's own stub.
    let envelope = json!({ "v": 1, "origin": "test", "seq": 1, "id": 7, "type": "read", "from": remote,
        "to": "hyperty://alice.example/nobody", "body": {} });
    let taken = nats_publish(nats.port, &nats_subject("alice.example", a.as_str(), "app.example"), &envelope.to_string());
    assert!(taken.starts_with("ok "), "{taken}");
    let answer = node.next_msg().expect("an answer on the node");
    let answer: serde_json::Value = serde_json::from_str(&answer.payload).unwrap();
    assert_eq!((answer["id"].as_u64(), answer["body"]["code"].as_u64()), (Some(7), Some(404)), "{answer}");
    assert!(answer["body"]["description"].as_str().unwrap_or_default().contains("came through the protostub of alice.example"));
    // A malformed envelope is refused, and the stub goes on.
    let refused = nats_publish(nats.port, &nats_subject("alice.example", a.as_str(), "app.example"), "{\"v\":1,\"nonsense\":true}");
    assert!(refused.starts_with("refused: malformed envelope:"), "{refused}");
    // So is an origin that is not a runtime's short plain id: every
    // envelope taken keeps its origin (in memory, and on disk for a
    // durable stub).
    for origin in ["x".repeat(65), "a b".into(), String::new()] {
        let envelope = json!({ "v": 1, "origin": origin, "seq": 3, "id": 9, "type": "update", "from": remote, "to": a.as_str(), "body": {} });
        let refused = nats_publish(nats.port, &nats_subject("alice.example", a.as_str(), "app.example"), &envelope.to_string());
        assert!(refused.starts_with("refused: malformed envelope: origin: not 1..=64 letters, digits or '-'"), "{origin:?}: {refused}");
    }
    let envelope = json!({ "v": 1, "origin": "test", "seq": 2, "id": 8, "type": "read", "from": remote, "to": a.as_str(), "body": {} });
    nats_publish(nats.port, &nats_subject("alice.example", a.as_str(), "app.example"), &envelope.to_string());
    let report = observer.recv_timeout(Duration::from_secs(10)).expect("a's report");
    assert_eq!(reported(&report)["id"], 8, "{report:?}");
}

/// a sends `update` notifications numbered `range` to `b`; `during(n)` runs
/// before number n is sent.
fn send_numbered(driver: &mut Driver, a: &Address, b: &Address, range: std::ops::Range<u64>, mut during: impl FnMut(u64)) {
    for n in range {
        during(n);
        let cmd = json!({ "op": "send", "message": { "type": "update", "to": b.to_string(), "value": json!({ "n": n }).to_string() } });
        assert_eq!(driver.command(a, cmd), json!({ "ok": true }), "message {n}");
    }
}

/// The numbers b reported receiving, each as often as it was reported,
/// until `count` distinct ones came (or 60 s passed).
fn numbers_seen(driver: &Driver, b: &Address, count: usize) -> std::collections::BTreeMap<u64, u32> {
    let mut seen = std::collections::BTreeMap::new();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < count {
        let left = until.saturating_duration_since(std::time::Instant::now());
        let Some(m) = driver.find(|m| m.kind == hyperty_host::MessageType::Forward && &m.from == b, left) else { break };
        let r = reported(&m);
        if r["type"] == "update" {
            let n: serde_json::Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
            *seen.entry(n["n"].as_u64().unwrap()).or_insert(0) += 1;
        }
    }
    // Anything arriving late would be a duplicate.
    while let Some(m) = driver.find(|m| m.kind == hyperty_host::MessageType::Forward && &m.from == b, Duration::from_millis(500)) {
        let r = reported(&m);
        if r["type"] == "update" {
            let n: serde_json::Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
            *seen.entry(n["n"].as_u64().unwrap()).or_insert(0) += 1;
        }
    }
    seen
}

fn assert_each_once(seen: &std::collections::BTreeMap<u64, u32>, count: u64) {
    let missing: Vec<u64> = (0..count).filter(|n| !seen.contains_key(n)).collect();
    let twice: Vec<(&u64, &u32)> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(missing.is_empty() && twice.is_empty(), "missing {missing:?}, more than once {twice:?}");
}

#[test]
fn a_node_restart_mid_stream_loses_nothing_and_duplicates_nothing() {
    let mut nats = Nats::start();
    let servers = [nats.endpoint()];
    let (_r1, _r2, mut driver, a, b, _b1, _b2) = two_runtimes(&servers, &servers);
    request_until_answered(&mut driver, &a, &b);
    const N: u64 = 600;
    send_numbered(&mut driver, &a, &b, 0..N, |n| {
        if n == 200 {
            nats.kill();
        }
        if n == 400 {
            nats.restart();
        }
    });
    assert_each_once(&numbers_seen(&driver, &b, N as usize), N);
}

#[test]
fn a_stub_that_traps_is_restarted_and_its_queue_survives() {
    let nats = Nats::start();
    let servers = [nats.endpoint()];
    let r1 = runtime(Duration::from_secs(10));
    let r2 = runtime(Duration::from_secs(10));
    let mut events = r1.events();
    let mut driver = Driver::new(&r1);
    let crashing = json!({ "config": { "fault-injection": { "trap-after-messages": 50 } } });
    let b1 = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .protostub("alice.example", &servers, json!({}))
        .protostub("app.example", &servers, json!({}))
        .protostub("bob.example", &servers, crashing);
    let b2 = with_stubs(TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), puppet_config(true)), &servers);
    r1.deploy(&b1.load()).unwrap();
    r2.deploy(&b2.load()).unwrap();
    let a = r1.lookup("alice.example", "a").unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();
    request_until_answered(&mut driver, &a, &b);
    const N: u64 = 200;
    send_numbered(&mut driver, &a, &b, 0..N, |_| {});
    assert_each_once(&numbers_seen(&driver, &b, N as usize), N);
    let trapped = wait_event(&mut events, |e| e.hyperty == "protostub bob.example" && matches!(e.kind, hyperty_host::EventKind::Trapped { .. }));
    assert!(format!("{:?}", trapped.kind).contains("panicked"), "{trapped:?}");
    wait_event(&mut events, |e| e.hyperty == "protostub bob.example" && matches!(e.kind, hyperty_host::EventKind::Restarted { .. }));
}

#[test]
fn a_full_stub_queue_answers_senders_503() {
    // The node is down (nothing listens on the granted port).
    let closed = closed_port();
    let dead = format!("127.0.0.1:{}", closed.port);
    let r1 = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&r1);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .protostub("bob.example", &[dead], json!({ "queue": 5 }));
    r1.deploy(&bundle.load()).unwrap();
    let a = r1.lookup("alice.example", "a").unwrap();
    let b = Address::parse("hyperty://bob.example/far").unwrap();
    send_numbered(&mut driver, &a, &b, 0..8, |_| {});
    for _ in 0..3 {
        let answer = driver.report(&a, |m| m["type"] == "response");
        assert_eq!(answer["code"], 503, "{answer}");
        let why = answer["description"].as_str().unwrap_or_default();
        assert!(why.contains("the protostub queue of bob.example is full (5 messages)"), "{why}");
    }
    assert!(driver.find(|m| reported(m)["type"] == "response", Duration::from_millis(300)).is_none(), "only the overflow is refused");
}

#[test]
fn runtimes_on_two_nodes_of_a_nats_cluster_talk() {
    let node1 = Nats::cluster_node(&[]);
    let node2 = Nats::cluster_node(&[node1.cluster_port()]);
    let (_r1, _r2, mut driver, a, b, _b1, _b2) = two_runtimes(&[node1.endpoint()], &[node2.endpoint()]);
    let answer = request_until_answered(&mut driver, &a, &b);
    assert_eq!(answer["from"], b.to_string());
    send_numbered(&mut driver, &a, &b, 0..100, |_| {});
    assert_each_once(&numbers_seen(&driver, &b, 100), 100);
}

/// The second runtime's process in `two_processes_...`: runs the CLI on
/// the bundle named by `HYPERTY_SECOND_RUNTIME` until killed. Not a test
/// by itself (ignored; that test starts it).
#[test]
#[ignore = "the second runtime's process, started by two_runtime_processes_find_each_other_and_talk_through_nats"]
fn second_runtime_process() {
    let Ok(bundle) = std::env::var("HYPERTY_SECOND_RUNTIME") else { return };
    let data = std::env::var("HYPERTY_SECOND_DATA").unwrap();
    let code = hyperty_host::cli::main_with_args([
        "hyperty".into(),
        "--cache-dir".into(),
        cache_dir().into_os_string(),
        "--data-dir".into(),
        data.into(),
        "run".into(),
        bundle.into(),
        "--registry-keep-alive-ms".into(),
        "200".into(),
    ]);
    std::process::exit(if code == std::process::ExitCode::SUCCESS { 0 } else { 1 });
}

/// Kills the child process on drop (a failing test must not leave it).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_runtime_processes_find_each_other_and_talk_through_nats() {
    use hyperty_host::{Query, RuntimeConfig};
    let nats = Nats::start();
    let servers = [nats.endpoint()];
    // Runtime 1 (this process) serves bob.example's registry.
    let r1 = Runtime::new(RuntimeConfig {
        cache_dir: cache_dir(),
        request_timeout: Duration::from_secs(10),
        serve_registries: vec!["bob.example".into()],
        registry_expiry: Some(Duration::from_secs(1)),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let mut driver = Driver::new(&r1);
    let b1 = with_stubs(TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false)), &servers);
    r1.deploy(&b1.load()).unwrap();
    let a = r1.lookup("alice.example", "a").unwrap();
    // Runtime 2: another process, the CLI, with bob.example/b.
    let b2 = with_stubs(TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), puppet_config(true)), &servers);
    let log = b2.dir().join("second.log");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "second_runtime_process", "--ignored", "--nocapture"])
        .env("HYPERTY_SECOND_RUNTIME", b2.write())
        .env("HYPERTY_SECOND_DATA", b2.dir().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = Child(child);
    let second_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // b's registration reaches runtime 1's registry of bob.example through NATS.
    let by_name = Query { name: Some("b".into()), domain: Some("bob.example".into()), ..Default::default() };
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let b = loop {
        if let Some(r) = r1.discover(&by_name).into_iter().find(|r| r.status == hyperty_host::registry::Status::Live) {
            break r.address;
        }
        assert!(std::time::Instant::now() < until, "b was never announced to runtime 1:\n{}", second_log());
        std::thread::sleep(Duration::from_millis(20));
    };
    // Request/response across the processes, then a stream of them.
    request_until_answered(&mut driver, &a, &b);
    for i in 0..50 {
        let id = driver.fresh_id();
        let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": b.to_string(), "value": json!({ "i": i }).to_string() } });
        assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
        let answer = driver.report(&a, |m| m["type"] == "response" && m["id"] == id);
        assert_eq!((answer["code"].as_u64(), answer["value"].as_str()), (Some(200), Some(json!({ "i": i }).to_string().as_str())), "{answer}");
    }
    assert_eq!(r1.pending_requests(), 0);
    // The second runtime goes away: its registration expires here.
    let _ = child.0.kill();
    let _ = child.0.wait();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !r1.discover(&by_name).is_empty() {
        assert!(std::time::Instant::now() < until, "b's registration never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn identity_travels_through_nats_and_is_validated_by_the_receiving_runtime() {
    let nats = Nats::start();
    let servers = [nats.endpoint()];
    let key = [7; 32];
    let r1 = runtime(Duration::from_secs(10));
    let r2 = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&r1);
    // Runtime 1 issues alice's assertions; runtime 2 only holds the IdP's
    // public key, and bob.example there requires identity.
    let b1 = with_stubs(
        TestBundle::new()
            .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
            .user("alice.example", "a", "alice@idp.example")
            .idp("idp.example", key, &["alice.example"])
            .domain("alice.example", json!({ "require-identity": false })),
        &servers,
    );
    let b2 = with_stubs(
        TestBundle::new()
            .hyperty("bob.example", "b", &guest("puppet"), puppet_config(true))
            .idp_verifier("idp.example", key, &["bob.example"])
            .domain("bob.example", json!({ "require-identity": true })),
        &servers,
    );
    r1.deploy(&b1.load()).unwrap();
    r2.deploy(&b2.load()).unwrap();
    let a = r1.lookup("alice.example", "a").unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();
    request_until_answered(&mut driver, &a, &b);
    let seen = driver.report(&b, |m| m["type"] == "read");
    assert_eq!(seen["identity"], json!(["alice@idp.example", "idp.example"]), "{seen}");
    // An anonymous sender (the observer, app.example) is refused there: 401.
    let observer = &driver.endpoint;
    let m = hyperty_host::Message::new(99, hyperty_host::MessageType::Read, observer.address().clone(), b.clone(), None);
    observer.request(m, None).unwrap();
    let answer = driver.expect(|m| m.kind == hyperty_host::MessageType::Response && m.id == 99);
    assert_eq!(answer.body.code, Some(401), "{answer:?}");
    assert!(answer.body.description.unwrap_or_default().contains("bob.example requires an identity assertion"));
}

/// The statuses of protostub `domain` reported so far (events already
/// emitted), with their details.
fn statuses_so_far(events: &mut hyperty_host::EventReceiver, domain: &str) -> Vec<(String, String)> {
    let label = format!("protostub {domain}");
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let (true, hyperty_host::EventKind::StubStatus { status, detail }) = (e.hyperty == label, e.kind) {
            seen.push((status, detail));
        }
    }
    seen
}

#[test]
fn an_envelope_larger_than_the_nodes_max_payload_is_refused_at_once_and_the_queue_moves_on() {
    let mut nats = Nats::with_config("max_payload: 65536\n");
    let servers = [nats.endpoint()];
    let (r1, _r2, mut driver, a, b, _b1, _b2) = two_runtimes(&servers, &servers);
    let mut events = r1.events();
    request_until_answered(&mut driver, &a, &b);
    // 40,000 bytes of value, under the limit by itself; on the wire each
    // `\"` of it is escaped again in the envelope: about 80 KB.
    let quotes = json!({ "q": "\"".repeat(20_000) }).to_string();
    assert!(quotes.len() < 65_536, "{}", quotes.len());
    let big = driver.fresh_id();
    let cmd = json!({ "op": "request", "message": { "id": big, "type": "read", "to": b.to_string(), "value": quotes }, "timeout_ms": 20_000 });
    assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
    let small = driver.fresh_id();
    let cmd = json!({ "op": "request", "message": { "id": small, "type": "read", "to": b.to_string(), "value": "{}" }, "timeout_ms": 20_000 });
    assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
    // The big one: refused at once, naming the limit; no 408 will follow.
    let refused = driver.report(&a, |m| m["type"] == "response" && m["id"] == big);
    assert_eq!(refused["code"], 413, "{refused}");
    let why = refused["description"].as_str().unwrap_or_default();
    assert!(why.contains("the protostub of bob.example cannot carry it") && why.contains("65536") && why.contains("max_payload"), "{why}");
    // The small one behind it: answered.
    let answer = driver.report(&a, |m| m["type"] == "response" && m["id"] == small);
    assert_eq!(answer["code"], 200, "{answer}");
    assert_eq!(r1.pending_requests(), 0, "the refused request is no longer pending");
    // Nothing was disconnected, and the node never saw the big envelope.
    let statuses = statuses_so_far(&mut events, "bob.example");
    assert!(statuses.iter().all(|(s, _)| s != "disconnected"), "{statuses:?}");
    assert!(!nats.log().contains("Maximum Payload"), "{}", nats.log());
    // The node comes back taking 128 KiB: the stub learns it from the new
    // INFO, and the same request goes through.
    nats.set_config("max_payload: 131072\n");
    nats.restart();
    let answer = request_value_until_answered(&mut driver, &a, &b, &quotes);
    assert_eq!(answer["value"].as_str(), Some(quotes.as_str()));
}

/// A node that greets (INFO, and PONG to the handshake's PING), then
/// reads and ignores everything: a stale connection, as a hung server or
/// a black-holed route makes. Counts the PINGs it ignored.
struct SilentNode {
    port: u16,
    pings: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SilentNode {
    fn start() -> SilentNode {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        // Bound here and passed on: no other process can take the port.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let pings = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (counted, stopping) = (pings.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::Acquire) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let info = json!({ "server_id": "silent", "version": "2.9.10", "proto": 1, "host": "127.0.0.1", "port": port,
                        "headers": true, "max_payload": 1_048_576 });
                    if write!(stream, "INFO {info}\r\n").is_err() {
                        return;
                    }
                    let (mut seen, mut greeted, mut buf) = (Vec::new(), false, [0u8; 4096]);
                    while let Ok(n @ 1..) = stream.read(&mut buf) {
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(2).position(|w| w == b"\r\n") {
                            if &seen[..end] == b"PING" {
                                if greeted {
                                    counted.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    greeted = true;
                                    let _ = stream.write_all(b"PONG\r\n");
                                }
                            }
                            seen.drain(..end + 2);
                        }
                    }
                });
            }
        });
        SilentNode { port, pings, stop }
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for SilentNode {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[test]
fn a_silent_node_is_found_stale_by_pings_and_the_stub_fails_over_to_the_next_server() {
    let nats = Nats::start();
    let silent = SilentNode::start();
    let servers1 = [silent.endpoint(), nats.endpoint()];
    let r1 = runtime(Duration::from_secs(30));
    let r2 = runtime(Duration::from_secs(30));
    let mut events = r1.events();
    let mut driver = Driver::new(&r1);
    // Runtime 1's stubs try the silent node first, with short PINGs.
    let pings = json!({ "config": { "ping-interval-ms": 200, "max-pings-outstanding": 2 } });
    let mut b1 = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false));
    for domain in DOMAINS {
        b1 = b1.protostub(domain, &servers1, pings.clone());
    }
    let b2 = with_stubs(TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), puppet_config(true)), &[nats.endpoint()]);
    r2.deploy(&b2.load()).unwrap();
    r1.deploy(&b1.load()).unwrap();
    let a = r1.lookup("alice.example", "a").unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();
    // One request with a 25 s timeout; it loads bob.example's stub.
    let id = driver.fresh_id();
    let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": b.to_string(), "value": "{}" }, "timeout_ms": 25_000 });
    assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
    // Live on the silent node, stale after unanswered PINGs, then live on
    // the real one.
    let label = "protostub bob.example";
    let status = |events: &mut hyperty_host::EventReceiver, want: &str| {
        let e = wait_event(events, |e| e.hyperty == label && matches!(&e.kind, hyperty_host::EventKind::StubStatus { status, .. } if status == want));
        let hyperty_host::EventKind::StubStatus { detail, .. } = e.kind else { unreachable!() };
        detail
    };
    assert_eq!(status(&mut events, "live"), format!("connected to {}", silent.endpoint()));
    let stale = status(&mut events, "disconnected");
    assert!(stale.contains(&silent.endpoint()) && stale.contains("answered none of the last 2 PINGs") && stale.contains("stale"), "{stale}");
    assert_eq!(status(&mut events, "live"), format!("connected to {}", nats.endpoint()));
    assert!(silent.pings.load(std::sync::atomic::Ordering::Relaxed) >= 2, "the client sent PINGs after the handshake");
    // The request, offered again on the new connection: answered.
    let answer = driver.report(&a, |m| m["type"] == "response" && m["id"] == id);
    assert_eq!(answer["code"], 200, "{answer}");
    assert_eq!(r1.pending_requests(), 0);
}

#[test]
fn the_nats_harness_waits_for_its_own_server_and_says_why_it_did_not_start() {
    let mut nats = Nats::start();
    nats.kill();
    // Another listener takes the port meanwhile: a restart must not take
    // it for the server.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", nats.port)).unwrap();
    let why = nats.try_restart(Duration::from_millis(500)).unwrap_err();
    assert!(why.contains("it exited") && why.contains("address already in use") && why.contains("nats-server"), "{why}");
    // Freed: the restart gets it, and it is a NATS server that answers.
    drop(squatter);
    nats.restart();
    use std::io::BufRead;
    let mut info = String::new();
    std::io::BufReader::new(std::net::TcpStream::connect(("127.0.0.1", nats.port)).unwrap()).read_line(&mut info).unwrap();
    assert!(info.starts_with("INFO ") && info.contains("\"server_id\""), "{info}");
}

#[test]
fn acknowledgements_in_bulk_fit_the_nodes_max_payload() {
    let nats = Nats::with_config("max_payload: 1024\n");
    let r2 = runtime(Duration::from_secs(10));
    let mut events = r2.events();
    let bundle = TestBundle::new()
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(true))
        .protostub("bob.example", &[nats.endpoint()], json!({}));
    r2.deploy(&bundle.load()).unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();
    statuses_until(&mut events, "bob.example", "live");
    // 300 envelopes at once, each for an address of bob.example that is not
    // here (answered 404 to a sender nobody routes, and acknowledged): the
    // stub takes many in one round and acknowledges them in bulk.
    let envelopes: Vec<String> = (0..300)
        .map(|n| {
            json!({ "v": 1, "origin": "test", "seq": n, "id": n, "type": "update", "from": "hyperty://carol.example/c",
                "to": "hyperty://bob.example/nobody", "body": {} })
            .to_string()
        })
        .collect();
    let payloads: Vec<&str> = envelopes.iter().map(String::as_str).collect();
    let answers = nats_publish_all(nats.port, &nats_subject("bob.example", b.as_str(), "carol.example"), &payloads);
    let acked: usize = answers.iter().map(|a| a.split_ascii_whitespace().skip(1).count()).sum();
    assert_eq!(acked, 300, "every envelope acknowledged: {answers:?}");
    assert!(answers.len() > 1 && answers.iter().all(|a| a.starts_with("ok ") && a.len() <= 1024), "{answers:?}");
    // No message was too large for the node: the stub never lost its connection.
    let statuses = statuses_so_far(&mut events, "bob.example");
    assert!(statuses.iter().all(|(s, _)| s != "disconnected"), "{statuses:?}");
    assert!(!nats.log().contains("Maximum Payload"), "{}", nats.log());
}

#[test]
fn a_stub_sleeping_in_init_at_deployment_is_stopped_at_its_deadline() {
    // The deployer's thread runs the stub's `init` to check its config,
    // with no endpoint granted: a timer is all it can wait on, and it ends
    // at the check's deadline, 1 s (`sandbox::timers`), so the deployment
    // is refused instead of held for the hour the stub asks.
    let runtime = std::sync::Arc::new(runtime(Duration::from_secs(30)));
    let bundle = TestBundle::new().hyperty("sleepy.example", "p", &guest("puppet"), puppet_config(true));
    let config = json!({ "report-to": "hyperty://sleepy.example/observer", "init-sleep-ms": 3_600_000 });
    let bundle = hyperty_tests::forger::with_forger_config(bundle, "sleepy.example", config);
    let (done, deployed) = std::sync::mpsc::channel();
    let deploying = runtime.clone();
    let loaded = bundle.load();
    std::thread::spawn(move || done.send(deploying.deploy(&loaded).map(drop).map_err(|e| e.to_string())));
    let refused = deployed.recv_timeout(Duration::from_secs(60)).expect("the deployment is not held for the stub's hour").unwrap_err();
    assert!(refused.contains("init trapped") && refused.contains("sleepy.example"), "{refused}");
    // Nothing was deployed, and the runtime deploys again.
    assert!(runtime.lookup("sleepy.example", "p").is_none());
    let healthy = TestBundle::new().hyperty("awake.example", "p", &guest("puppet"), puppet_config(true));
    runtime.deploy(&healthy.load()).expect("the next deployment goes through");
}

/// A stub written in the blocking style (`blocking-stub`: `pollable.block`,
/// `pollable.ready`, `blocking-write-and-flush`, `blocking-read`, never
/// `poll`) is served on its thread's own I/O driver (`protostub::io`): each
/// message it carries is written to a line-echo server and read back.
#[test]
fn a_stub_written_with_blocking_calls_is_served() {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap().to_string();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = lines.clone();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            seen.lock().unwrap().push(line.clone());
            writer.write_all(format!("{line}\n").as_bytes()).unwrap();
        }
    });
    let r = runtime(Duration::from_secs(10));
    let mut events = r.events();
    let mut driver = Driver::new(&r);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .protostub("echo.example", &[server], json!({ "component": guest("blocking-stub").to_str().unwrap() }));
    r.deploy(&bundle.load()).unwrap();
    let a = r.lookup("alice.example", "a").unwrap();
    for n in 0..3 {
        let value = json!({ "n": n, "pad": "x".repeat(5000 * n) }).to_string();
        let cmd = json!({ "op": "send", "message": { "id": n + 1, "type": "update", "to": "hyperty://echo.example/x", "value": value } });
        assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
        let echoed = wait_event(&mut events, |e| {
            matches!(&e.kind, hyperty_host::EventKind::StubStatus { detail, .. } if detail.starts_with("echoed"))
        });
        let hyperty_host::EventKind::StubStatus { detail, .. } = echoed.kind else { unreachable!() };
        let line = lines.lock().unwrap().last().cloned().expect("the server read a line");
        assert!(line.contains(&format!("\"n\\\":{n}")), "{line}");
        assert_eq!(detail, format!("echoed {} bytes", line.len() + 1));
    }
}

/// A hyperty run on a stub's thread (the hand-off) that sleeps wakes on
/// time: its timer runs on `wasmtime-wasi`'s runtime, not on the stub's
/// own I/O driver, which nobody drives while the stub lends its thread.
#[test]
fn a_hyperty_sleeping_on_a_stubs_thread_wakes_on_time() {
    watchdog(Duration::from_secs(90), || {
        let nats = Nats::start();
        let hyperties = [
            ("bob.example", "b", "puppet", puppet_config(true)),
            ("bob.example", "sleeper", "hostile", json!({ "mode": "sleep" })),
        ];
        let (_r1, r2, mut driver, a, _b1, _b2) = stub_lending_runtimes(&nats, &hyperties);
        let (b, sleeper) = (r2.lookup("bob.example", "b").unwrap(), r2.lookup("bob.example", "sleeper").unwrap());
        // A domain is lent only while its last call was short (under 1 ms,
        // `handoff::LEND_MAX`): a call of b's slowed by a busy machine, or
        // the sleeper's own, keeps the next one on the domain's thread. So
        // b is asked first each time, and the sleeper's request is tried
        // until it ran on the stub's thread.
        let lent_once = (0..10).any(|_| {
            request_until_answered(&mut driver, &a, &b);
            let lent = stub_handoffs(&r2, "bob.example");
            let answer = request_value_until_answered(&mut driver, &a, &sleeper, "{\"ms\":50}");
            let slept = answer["value"].as_str().and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok()).expect("a value");
            assert!(slept["slept_ms"].as_u64().is_some_and(|ms| (50..1000).contains(&ms)), "{answer}");
            stub_handoffs(&r2, "bob.example") > lent
        });
        assert!(lent_once, "the sleeper never ran on the stub's thread: {}", r2.metrics_text());
    });
}

/// Runs `test`, aborting the whole process if it has not returned within
/// `limit`: a stub's thread hung in a host call may hold a domain's run
/// token, and dropping the runtime would then wait for it for ever.
fn watchdog(limit: Duration, test: impl FnOnce()) {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
            eprintln!("the test did not end within {limit:?}: a thread is hung; aborting");
            std::process::abort();
        }
    });
    test();
    let _ = done.send(());
}

/// What a stub posts may make an IdP proxy validate an assertion on the
/// stub's thread; a proxy that sleeps is stopped at its call deadline and
/// the stub goes on, durable or not (its timer runs outside the stub's
/// I/O driver, `protostub::io`), and another thread's validation with that
/// proxy is not held for ever.
#[test]
fn a_stub_whose_post_meets_a_sleeping_idp_proxy_goes_on() {
    for durable in [false, true] {
        watchdog(Duration::from_secs(90), || {
            let data = tempfile::tempdir().unwrap();
            let r = Runtime::new(hyperty_host::RuntimeConfig {
                cache_dir: cache_dir(),
                data_dir: Some(data.path().to_owned()),
                request_timeout: Duration::from_secs(10),
                ..hyperty_tests::engines::config()
            })
            .unwrap();
            let mut events = r.events();
            let config = json!({ "report-to": Forger::observer("bob.example"), "report-assertion": { "idp": "idp.hostile", "token": "any" } });
            let bundle = TestBundle::new()
                .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
                .idp_guest("idp.hostile", "idp-hostile", json!({ "mode": "sleep" }), &[]);
            let bundle = with_forger_entry(bundle, "bob.example", config, json!({ "durable": durable }));
            r.deploy(&bundle.load()).unwrap();
            let mut forger = Forger::new(&r, "bob.example");
            let flooded = |events: &mut hyperty_host::EventReceiver, n: u64| {
                let detail = format!("flood {n}");
                wait_event(events, |e| matches!(&e.kind, hyperty_host::EventKind::StubStatus { detail: d, .. } if *d == detail));
            };
            // The stub posts its report of this order with the sleeping IdP's assertion.
            forger.send_order(json!({ "status-flood": 2 }));
            flooded(&mut events, 1);
            // Another thread has that IdP validate meanwhile: answered.
            let mallory = r.endpoint("hyperty://mallory.example/m", 16).unwrap();
            let mut m = hyperty_host::Message::new(77, hyperty_host::MessageType::Read, mallory.address().clone(), r.lookup("alice.example", "a").unwrap(), None);
            m.assertion = Some(hyperty_host::Assertion { idp: "idp.hostile".into(), token: "other".into() });
            mallory.request(m, None).unwrap();
            let answer = mallory.recv_timeout(Duration::from_secs(20)).expect("an answer to a request whose IdP sleeps");
            assert_eq!(answer.body.code, Some(401), "durable {durable}: {:?}", answer.body);
            // The stub came back from its post and takes its next order.
            forger.send_order(json!({ "status-flood": 3 }));
            flooded(&mut events, 2);
        });
    }
}
