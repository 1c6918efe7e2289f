//! Metrics scraped over HTTP show the counts a test produced (issue 20,
//! "Seeing inside"): messages through the real bus, policy denials, host
//! answers, instances and restarts; the endpoint refuses bad requests
//! clearly and keeps serving.

use std::sync::Arc;
use std::time::Duration;

use hyperty_host::message::{Message, MessageType};
use hyperty_host::policy::{Decision, EnforcementPoint, Parties, PolicyDecisionPoint};
use hyperty_host::{EventKind, Runtime, RuntimeConfig};
use hyperty_tests::metrics::{Samples, http, scrape};
use hyperty_tests::*;
use serde_json::json;

const MESSAGES: &str = "hyperty_messages_total";
const ANSWERS: &str = "hyperty_answers_total";
const DENIALS: &str = "hyperty_policy_denials_total";

/// Denies `delete` messages at the incoming point; permits the rest.
struct NoDeletes;

impl PolicyDecisionPoint for NoDeletes {
    fn decide(&self, point: EnforcementPoint, _domain: &str, message: &Message, _: Parties<'_>) -> Decision {
        if point == EnforcementPoint::Incoming && message.kind == MessageType::Delete {
            return Decision::Deny { policies: vec!["no-deletes".into()], reason: "no deletes here".into() };
        }
        Decision::Permit
    }
}

fn runtime_with(policy: Option<Arc<dyn PolicyDecisionPoint>>) -> Runtime {
    Runtime::new(RuntimeConfig {
        cache_dir: cache_dir(),
        request_timeout: Duration::from_secs(60),
        custom_policy: policy,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

/// Waits until `name{labels}` reaches `at_least`, then returns the scrape.
fn scrape_when(addr: std::net::SocketAddr, name: &str, labels: &[(&str, &str)], at_least: f64) -> Samples {
    let mut last = None;
    wait_until(&format!("{name}{labels:?} >= {at_least}"), || {
        let samples = scrape(addr);
        let reached = samples.get(name, labels) >= at_least;
        last = Some(samples);
        reached
    });
    last.unwrap()
}

#[test]
fn n_requests_through_the_bus_show_as_exactly_n_in_the_scraped_counters() {
    const N: u32 = 25;
    let runtime = runtime_with(None);
    let server = runtime.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr();
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = healthy_pair(&runtime);
    let before = scrape(addr);
    assert_eq!(before.get("hyperty_instances", &[("domain", "alice.example")]), 1.0);
    assert_eq!(before.get("hyperty_instances", &[("domain", "bob.example")]), 1.0);
    let durations_before = before.get("hyperty_request_duration_seconds_count", &[]);
    for _ in 0..N {
        driver.still_works(&a, &b);
    }
    let reads = [("domain", "alice.example"), ("type", "read")];
    let responses = [("domain", "bob.example"), ("type", "response")];
    let after = scrape_when(addr, MESSAGES, &responses, f64::from(N));
    // a's reads to b and b's responses, each exactly N (the observer's own
    // commands come from app.example, which the bundle does not name).
    assert_eq!(after.get(MESSAGES, &reads) - before.get(MESSAGES, &reads), f64::from(N));
    assert_eq!(after.get(MESSAGES, &responses) - before.get(MESSAGES, &responses), f64::from(N));
    assert_eq!(after.get(MESSAGES, &[("domain", "other"), ("type", "execute")]), f64::from(N), "the observer's commands to a");
    assert_eq!(after.get(MESSAGES, &[("domain", "bob.example"), ("type", "read")]), 0.0);
    // Every request (N commands, N reads) got its final response.
    let finished = after.get("hyperty_request_duration_seconds_count", &[]) - durations_before;
    assert_eq!(finished, f64::from(2 * N), "request durations");
    assert_eq!(after.get(DENIALS, &[("point", "incoming")]), 0.0);
    // Gauges read at the scrape: memory held, and nothing queued once idle.
    assert!(runtime.wait_idle(Duration::from_secs(30)));
    let idle = scrape(addr);
    assert!(idle.get("hyperty_memory_bytes", &[("domain", "alice.example")]) >= 65536.0, "a puppet holds at least one wasm page");
    assert_eq!(idle.get("hyperty_inbox_messages", &[("domain", "bob.example")]), 0.0);
    assert_eq!(idle.get("hyperty_pending_requests", &[]), 0.0);
    // A label is a bundle domain or "other", never a domain the bundle does not name.
    assert_eq!(after.get(MESSAGES, &[("domain", "app.example"), ("type", "execute")]), 0.0);
}

#[test]
fn a_policy_denial_and_its_403_show_in_the_denials_and_answers_counters() {
    let runtime = runtime_with(Some(Arc::new(NoDeletes)));
    let server = runtime.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = healthy_pair(&runtime);
    let id = driver.fresh_id();
    let cmd = json!({ "op": "request", "message": { "id": id, "type": "delete", "to": b.to_string() } });
    assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
    let answer = driver.report(&a, |m| m["type"] == "response" && m["id"] == id);
    assert_eq!(answer["code"], 403, "{answer}");
    let samples = scrape(server.local_addr());
    assert_eq!(samples.get(DENIALS, &[("point", "incoming")]), 1.0);
    assert_eq!(samples.get(DENIALS, &[("point", "outgoing")]), 0.0);
    assert_eq!(samples.get(DENIALS, &[("point", "bus-access")]), 0.0);
    assert_eq!(samples.get(ANSWERS, &[("domain", "alice.example"), ("code", "403")]), 1.0);
    assert_eq!(samples.get(MESSAGES, &[("domain", "alice.example"), ("type", "delete")]), 0.0, "a denied message is not accepted");
}

#[test]
fn a_restart_after_a_trap_shows_in_the_restarts_counter() {
    let runtime = runtime_with(None);
    let mut driver = Driver::new(&runtime);
    let mut events = runtime.events();
    let bundle = TestBundle::new()
        .hyperty("evil.example", "x", &guest("hostile"), json!({ "mode": "trap", "owner": OBSERVER, "secret": "s" }))
        .domain("evil.example", json!({ "restart": { "initial-backoff-ms": 20, "max-backoff-ms": 200 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let evil = runtime.lookup("evil.example", "x").unwrap();
    let server = runtime.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    assert_eq!(scrape(server.local_addr()).get("hyperty_restarts_total", &[("domain", "evil.example")]), 0.0);
    let answer = driver.ask(&evil, json!({}));
    assert_eq!(answer.body.code, Some(500));
    wait_event(&mut events, |e| e.address == evil && matches!(e.kind, EventKind::Restarted { .. }));
    let samples = scrape(server.local_addr());
    assert_eq!(samples.get("hyperty_restarts_total", &[("domain", "evil.example")]), 1.0);
    assert_eq!(samples.get("hyperty_instances", &[("domain", "evil.example")]), 1.0);
    assert_eq!(samples.get(ANSWERS, &[("domain", "other"), ("code", "500")]), 1.0, "the observer's 500");
}

#[test]
fn bad_requests_get_a_clear_http_error_and_the_endpoint_keeps_serving() {
    let runtime = runtime_with(None);
    let server = runtime.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr();
    let post = http(addr, b"POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(post.status, 405, "{}", post.body);
    assert!(post.body.contains("POST is not served here"), "{}", post.body);
    assert_eq!(post.headers["allow"], "GET, HEAD");
    let elsewhere = http(addr, b"GET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(elsewhere.status, 404, "{}", elsewhere.body);
    assert!(elsewhere.body.contains("the metrics are at /metrics"), "{}", elsewhere.body);
    let huge = format!("GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n", "a".repeat(20 * 1024));
    let refused = http(addr, huge.as_bytes());
    assert_eq!(refused.status, 431, "{}", refused.body);
    assert!(refused.body.contains("over 16384 bytes"), "{}", refused.body);
    let garbage = http(addr, b"\x01\x02 not http\r\n\r\n");
    assert_eq!(garbage.status, 400, "{}", garbage.body);
    let head = http(addr, b"HEAD /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    // Still serving, with every family.
    let samples = scrape(addr);
    assert_eq!(samples.get("hyperty_pending_requests", &[]), 0.0);
    assert_eq!(samples.get(DENIALS, &[("point", "bus-access")]), 0.0);
    let text = http(addr, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n").body;
    // (A family with no sample yet, like the answers here, has no lines.)
    for family in ["hyperty_messages", "hyperty_policy_denials", "hyperty_instances", "hyperty_restarts", "hyperty_pending_requests", "hyperty_request_duration_seconds"] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family} missing:\n{text}");
    }
}

#[test]
fn past_the_connection_limit_a_client_gets_503_and_a_freed_slot_serves_again() {
    use hyperty_host::metrics::serve::MAX_CONNECTIONS;
    let runtime = runtime_with(None);
    let server = runtime.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr();
    // Connections that send nothing hold their slots (up to the timeout).
    let idle: Vec<_> = (0..MAX_CONNECTIONS).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    let over = http(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(over.status, 503, "{}", over.body);
    assert!(over.body.contains("too many connections"), "{}", over.body);
    drop(idle);
    wait_until("a slot is free again", || http(addr, b"GET /metrics HTTP/1.1\r\n\r\n").status == 200);
}

#[test]
fn hyperty_run_metrics_takes_a_port_or_an_address_and_names_a_taken_one() {
    let dirs = CliDirs::new();
    let bundle = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false));
    let path = bundle.write();
    let run = |metrics: &str| dirs.cli(&["run", path.to_str().unwrap(), "--exit-when-idle", "--metrics", metrics]);
    assert_eq!(run("0"), std::process::ExitCode::SUCCESS, "a bare port is one on loopback");
    assert_eq!(run("127.0.0.1:0"), std::process::ExitCode::SUCCESS);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert_ne!(run(&taken.local_addr().unwrap().to_string()), std::process::ExitCode::SUCCESS, "a taken port fails the run");
    assert_ne!(run("not-an-address"), std::process::ExitCode::SUCCESS);
}

#[test]
fn a_protostub_queue_shows_its_length_and_its_overflow_the_503s() {
    // The node is down (nothing listens on the granted port): the queue fills.
    let closed = closed_port();
    let runtime = runtime_with(None);
    let mut driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .protostub("bob.example", &[format!("127.0.0.1:{}", closed.port)], json!({ "queue": 5 }));
    runtime.deploy(&bundle.load()).unwrap();
    let server = runtime.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = runtime.lookup("alice.example", "a").unwrap();
    for n in 0..8 {
        let cmd = json!({ "op": "send", "message": { "type": "update", "to": "hyperty://bob.example/far", "value": json!({ "n": n }).to_string() } });
        assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
    }
    for _ in 0..3 {
        assert_eq!(driver.report(&a, |m| m["type"] == "response")["code"], 503);
    }
    let samples = scrape(server.local_addr());
    assert_eq!(samples.get("hyperty_stub_queue_messages", &[("domain", "bob.example")]), 5.0);
    assert_eq!(samples.get(ANSWERS, &[("domain", "alice.example"), ("code", "503")]), 3.0);
    assert_eq!(samples.get(MESSAGES, &[("domain", "alice.example"), ("type", "update")]), 5.0, "only what the queue took");
}

#[test]
fn the_gateway_connections_gauge_follows_open_connections() {
    let runtime = runtime_with(None);
    let (_bundle, _a, _b) = healthy_pair(&runtime);
    let server = runtime.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    let gateway = runtime.serve_gateway("127.0.0.1:0".parse().unwrap(), hyperty_host::gateway::GatewayConfig::default()).unwrap();
    let open: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(gateway.local_addr()).unwrap()).collect();
    wait_until("3 gateway connections", || gateway.connections() == 3);
    assert_eq!(scrape(server.local_addr()).get("hyperty_gateway_connections", &[]), 3.0);
    drop(open);
    wait_until("the connections are gone", || gateway.connections() == 0);
    assert_eq!(scrape(server.local_addr()).get("hyperty_gateway_connections", &[]), 0.0);
    let reopened = std::net::TcpStream::connect(gateway.local_addr()).unwrap();
    wait_until("1 gateway connection", || gateway.connections() == 1);
    drop(gateway);
    drop(reopened);
    assert_eq!(scrape(server.local_addr()).get("hyperty_gateway_connections", &[]), 0.0, "a stopped gateway counts no more");
}

#[test]
fn data_objects_subscribers_and_stub_status_show_in_the_scrape() {
    let nats = Nats::start();
    let runtime = runtime_with(None);
    let server = runtime.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr();
    let mut driver = Driver::new(&runtime);
    let closed = closed_port();
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(true))
        .protostub("bob.example", &[nats.endpoint()], json!({ "preload": true }))
        .protostub("carol.example", &[format!("127.0.0.1:{}", closed.port)], json!({ "preload": true }));
    runtime.deploy(&bundle.load()).unwrap();
    let a = runtime.lookup("alice.example", "a").unwrap();
    // Two objects; two subscribers to the first.
    let url = hyperty_tests::rethink::create(&mut driver, &a, json!({ "n": 0 }));
    hyperty_tests::rethink::create(&mut driver, &a, json!({ "n": 1 }));
    let watchers: Vec<_> = ["hyperty://dave.example/w1", "hyperty://dave.example/w2"].map(|w| runtime.endpoint(w, 16).unwrap()).into();
    for (i, watcher) in watchers.iter().enumerate() {
        let to = hyperty_host::Address::parse(&url).unwrap();
        let subscribe = Message::new(i as u64 + 1, MessageType::Subscribe, watcher.address().clone(), to, None);
        assert_eq!(watcher.request_reply(subscribe, None).unwrap().body.code, Some(200));
    }
    let samples = scrape(addr);
    assert_eq!(samples.get("hyperty_data_objects", &[("domain", "alice.example")]), 2.0);
    assert_eq!(samples.get("hyperty_data_object_subscribers", &[("domain", "alice.example")]), 2.0);
    // The stub that reaches its node is up; the one whose node is down is not.
    let samples = scrape_when(addr, "hyperty_stub_up", &[("domain", "bob.example")], 1.0);
    assert_eq!(samples.get("hyperty_stub_up", &[("domain", "carol.example")]), 0.0);
    // The object deleted: counted no more.
    assert_eq!(driver.command(&a, json!({ "op": "delete", "url": url })), json!({ "ok": true }));
    let samples = scrape(addr);
    assert_eq!(samples.get("hyperty_data_objects", &[("domain", "alice.example")]), 1.0);
    assert_eq!(samples.get("hyperty_data_object_subscribers", &[("domain", "alice.example")]), 0.0);
}
