//! Protostubs: runtimes talking through a real NATS server, with the NATS
//! protocol in the `nats-stub` component.

use std::time::Duration;

use hyperty_host::{Address, Runtime};
use hyperty_tests::*;
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
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let id = driver.fresh_id();
        let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": b.to_string(), "value": "{\"n\":1}" }, "timeout_ms": 3000 });
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
