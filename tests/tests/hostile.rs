//! Hostile hyperties are contained: each case is a real component, and in
//! each the runtime and the other domains keep working and the case is
//! reported (log and status event).

use std::time::Duration;

use hyperty_host::{Address, EventKind, Runtime};
use hyperty_tests::*;
use serde_json::{Value, json};

const EVIL: &str = "evil.example";

/// A runtime with the healthy pair and one hostile hyperty `evil.example/x`
/// in `mode`, its domain set up with `settings`.
struct Case {
    runtime: Runtime,
    driver: Driver,
    events: tokio::sync::broadcast::Receiver<hyperty_host::Event>,
    a: Address,
    b: Address,
    evil: Address,
    _bundles: (TestBundle, TestBundle),
}

fn case(mode: &str, settings: Value) -> Case {
    let runtime = runtime(Duration::from_secs(5));
    let driver = Driver::new(&runtime);
    let events = runtime.events();
    let (healthy, a, b) = healthy_pair(&runtime);
    let bundle = TestBundle::new()
        .hyperty(EVIL, "x", &guest("hostile"), json!({ "mode": mode, "owner": OBSERVER, "secret": "s3cr3t" }))
        .domain(EVIL, settings);
    runtime.deploy(&bundle.load()).expect("the hostile bundle deploys");
    let evil = runtime.lookup(EVIL, "x").unwrap();
    Case { runtime, driver, events, a, b, evil, _bundles: (healthy, bundle) }
}

impl Case {
    fn trapped(&mut self) -> String {
        let evil = self.evil.clone();
        match wait_event(&mut self.events, |e| e.address == evil && matches!(e.kind, EventKind::Trapped { .. })).kind {
            EventKind::Trapped { reason } => reason,
            _ => unreachable!(),
        }
    }

    /// Asks the hostile hyperty and returns the answer's code and description.
    fn poke(&mut self, value: Value) -> (u16, String) {
        let answer = self.driver.ask(&self.evil.clone(), value);
        (answer.body.code.unwrap_or(0), answer.body.description.unwrap_or_default())
    }
}

#[test]
fn infinite_loop_is_interrupted_at_the_deadline() {
    let mut c = case("loop", json!({ "limits": { "call-timeout-ms": 100 } }));
    let (code, why) = c.poke(json!({}));
    assert_eq!(code, 500);
    assert!(why.contains("ran past its call deadline (call-timeout-ms = 100)"), "{why}");
    assert!(c.trapped().contains("call deadline"));
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn fuel_budget_stops_a_loop_deterministically() {
    let mut c = case("loop", json!({ "limits": { "fuel-per-call": 1_000_000 } }));
    let (code, why) = c.poke(json!({}));
    assert_eq!(code, 500);
    assert!(why.contains("ran out of fuel (fuel-per-call = 1000000)"), "{why}");
    assert!(c.trapped().contains("ran out of fuel"));
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn memory_bomb_is_stopped_at_the_limit() {
    let mut c = case("memory", json!({ "limits": { "memory-mb": 16 } }));
    let (code, why) = c.poke(json!({}));
    assert_eq!(code, 500);
    assert!(why.contains("memory limit of the instance reached"), "{why}");
    assert!(c.trapped().contains("memory-mb = 16"));
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn domain_memory_total_is_enforced_across_instances() {
    // The domain's cap (20 MiB) binds before the instance's (64 MiB).
    let mut c = case("memory", json!({ "limits": { "memory-mb": 64, "total-memory-mb": 20 } }));
    let (code, why) = c.poke(json!({}));
    assert_eq!(code, 500);
    assert!(why.contains("memory limit of the domain reached (total-memory-mb = 20)"), "{why}");
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn deep_recursion_overflows_the_stack_and_is_contained() {
    let mut c = case("recursion", json!({}));
    let (code, why) = c.poke(json!({}));
    assert_eq!(code, 500);
    assert!(why.contains("stack overflow"), "{why}");
    assert!(c.trapped().contains("stack overflow"));
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn trap_on_every_message_is_restarted_with_backoff_and_keeps_its_address() {
    let mut c = case("trap", json!({ "restart": { "initial-backoff-ms": 20, "max-backoff-ms": 200 } }));
    for _ in 0..3 {
        let (code, why) = c.poke(json!({}));
        // 500 for the message it died on, 503 while it is restarting.
        assert!(code == 500 || code == 503, "{code} {why}");
        assert!(c.trapped().contains("panicked"));
        let evil = c.evil.clone();
        wait_event(&mut c.events, |e| e.address == evil && matches!(e.kind, EventKind::Restarted { .. }));
    }
    assert_eq!(c.runtime.lookup(EVIL, "x"), Some(c.evil.clone()), "a restarted hyperty keeps its address");
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn restart_policy_stop_leaves_it_stopped_and_answers_503() {
    let mut c = case("vault", json!({ "restart": { "policy": "stop" } }));
    assert_eq!(c.poke(json!({ "panic": true })).0, 500);
    let evil = c.evil.clone();
    wait_event(&mut c.events, |e| e.address == evil && matches!(e.kind, EventKind::Stopped { .. }));
    let (code, why) = c.poke(json!({}));
    assert_eq!(code, 503);
    assert!(why.contains("has stopped after a failure"), "{why}");
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn restarted_hyperty_answers_again_from_a_fresh_instance() {
    let mut c = case("vault", json!({ "restart": { "initial-backoff-ms": 10 } }));
    let update = |c: &mut Case| c.driver.ask(&c.evil.clone(), json!({})); // execute: unsupported, answered
    assert_eq!(update(&mut c).body.code, Some(200));
    assert_eq!(c.poke(json!({ "panic": true })).0, 500);
    let evil = c.evil.clone();
    wait_event(&mut c.events, |e| e.address == evil && matches!(e.kind, EventKind::Restarted { .. }));
    assert_eq!(update(&mut c).body.code, Some(200), "alive again at the same address");
}

#[test]
fn flood_is_rate_limited_and_other_domains_still_get_through() {
    let mut c = case("flood", json!({ "limits": { "rate": 1000, "burst": 100, "call-timeout-ms": 30000 } }));
    let sink = TestBundle::new().hyperty("sink.example", "s", &guest("bench"), json!({ "role": "sink" }));
    c.runtime.deploy(&sink.load()).unwrap();
    let sink = c.runtime.lookup("sink.example", "s").unwrap();
    // The flood runs on evil.example's thread while the other domains work.
    let started = std::time::Instant::now();
    let id = c.driver.fresh_id();
    let flood = json!({ "to": sink.to_string(), "count": 20_000 }).to_string();
    let msg = hyperty_host::Message::new(id, hyperty_host::MessageType::Execute, c.driver.address().clone(), c.evil.clone(), Some(flood));
    c.driver.endpoint.request(msg, Some(Duration::from_secs(60))).unwrap();
    c.driver.still_works(&c.a, &c.b);
    let answer = c.driver.expect(|m| m.kind == hyperty_host::MessageType::Response && m.id == id);
    let counts: Value = serde_json::from_str(answer.body.value.as_deref().unwrap_or_else(|| panic!("{answer:?}"))).unwrap();
    let (sent, limited) = (counts["sent"].as_u64().unwrap(), counts["rate_limited"].as_u64().unwrap());
    let elapsed = started.elapsed().as_secs_f64();
    assert!(limited > 0, "the flood is refused past the rate: {counts}");
    // At most the burst plus the rate over the time it took (and a margin).
    let allowed = 100.0 + 1000.0 * elapsed;
    assert!(sent >= 100 && (sent as f64) <= allowed + 50.0, "{counts} in {elapsed:.3} s (at most {allowed:.0})");
    assert_eq!(sent + limited, 20_000, "{counts}");
    let evil = c.evil.clone();
    wait_event(&mut c.events, |e| e.address == evil && e.kind == EventKind::RateLimited);
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn oversized_message_is_refused_with_a_clear_error() {
    let mut c = case("oversize", json!({ "limits": { "memory-mb": 256 } }));
    let before = resident_bytes();
    let answer = c.driver.ask(&c.evil.clone(), json!({ "to": c.b.to_string(), "bytes": 40 << 20 }));
    let result: Value = serde_json::from_str(answer.body.value.as_deref().unwrap()).unwrap();
    let error = result["error"].as_str().unwrap();
    assert!(error.starts_with("too-large:") && error.contains("the limit is 1048576"), "{error}");
    let evil = c.evil.clone();
    wait_event(&mut c.events, |e| e.address == evil && matches!(e.kind, EventKind::Refused { .. }));
    // The host's copy of the refused message is gone (the guest's own
    // memory, 40 MiB and more, is its domain's).
    let grown = resident_bytes().saturating_sub(before);
    assert!(grown < 200 << 20, "resident memory grew by {} MiB", grown >> 20);
    assert!(c.driver.find(|m| m.from == c.b, Duration::from_millis(200)).is_none(), "nothing reached b");
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn garbage_addresses_and_bodies_are_refused_one_by_one() {
    let mut c = case("garbage", json!({}));
    let answer = c.driver.ask(&c.evil.clone(), json!({}));
    let result: Value = serde_json::from_str(answer.body.value.as_deref().unwrap()).unwrap();
    let errors: Vec<&str> = result["errors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    let malformed = errors.iter().filter(|e| e.starts_with("malformed")).count();
    assert!(malformed >= 8, "{errors:?}");
    assert!(errors.iter().any(|e| e.starts_with("malformed: from:")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("a response cannot be sent as a request")), "{errors:?}");
    assert!(errors.iter().all(|e| !e.is_empty()));
    let evil = c.evil.clone();
    wait_event(&mut c.events, |e| e.address == evil && matches!(&e.kind, EventKind::Refused { reason } if reason.contains("malformed")));
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn instantiation_that_traps_is_refused_and_nothing_else_stops() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let (_healthy, a, b) = healthy_pair(&runtime);
    let bundle = TestBundle::new().hyperty(EVIL, "x", &guest("start-trap"), json!({}));
    let err = runtime.deploy(&bundle.load()).unwrap_err().to_string();
    assert!(err.contains("instantiation failed"), "{err}");
    assert!(runtime.lookup(EVIL, "x").is_none());
    driver.still_works(&a, &b);
}

#[test]
fn wasi_imports_without_a_grant_are_refused_at_deploy() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let (_healthy, a, b) = healthy_pair(&runtime);
    for (guest_name, grant) in [("wants-sockets", "sockets"), ("wants-files", "filesystem")] {
        let bundle = TestBundle::new().hyperty(EVIL, "x", &guest(guest_name), json!({}));
        let err = runtime.deploy(&bundle.load()).unwrap_err().to_string();
        assert!(err.contains(&format!("the domain is not granted `{grant}`")), "{err}");
        assert!(err.contains(&format!("imports wasi:{grant}/")), "{err}");
        // Granted explicitly, it deploys.
        let domain = format!("{grant}.example");
        let granted = TestBundle::new()
            .hyperty(&domain, "x", &guest(guest_name), json!({}))
            .domain(&domain, json!({ "grants": ["clocks", "random", grant] }));
        runtime.deploy(&granted.load()).expect("deploys with the grant");
    }
    driver.still_works(&a, &b);
}

#[test]
fn no_import_reaches_another_domains_state() {
    // bob.example/vault keeps a secret and a counter only its owner may
    // change; alice.example/snoop tries every import against it.
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("bob.example", "vault", &guest("hostile"), json!({ "mode": "vault", "owner": OBSERVER, "secret": "s3cr3t" }))
        .hyperty("alice.example", "snoop", &guest("hostile"), json!({ "mode": "snoop", "victim": "bob.example/vault" }));
    runtime.deploy(&bundle.load()).unwrap();
    let vault = runtime.lookup("bob.example", "vault").unwrap();
    let snoop = runtime.lookup("alice.example", "snoop").unwrap();

    let mut events = runtime.events();
    let seen = driver.ask(&snoop, json!({}));
    let seen = seen.body.value.unwrap();
    assert!(!seen.contains("s3cr3t"), "{seen}");
    let seen: Value = serde_json::from_str(&seen).unwrap();
    let seen = seen["seen"].as_array().unwrap();
    assert_eq!(seen[0]["lookup"], vault.as_str(), "discovery yields an address, nothing more");
    assert!(seen[1]["result"].as_str().unwrap().starts_with("spoofed-from"), "cannot send as the vault");
    assert!(seen[2]["result"].as_str().unwrap().starts_with("spoofed-from"), "cannot send as its owner");
    assert_eq!(seen[3]["result"], Value::Null, "may send as itself...");
    assert!(seen[4]["reply"].as_str().unwrap().starts_with("spoofed-from"), "cannot answer for the vault");
    assert_eq!(seen[5]["env"], json!([]), "no environment");
    let spoofing = wait_event(&mut events, |e| e.address == snoop && matches!(e.kind, EventKind::Refused { .. }));
    assert!(matches!(spoofing.kind, EventKind::Refused { reason } if reason.contains("spoofed from")), "reported");

    // ... and the vault refused the honest update: its state is unchanged.
    let read = driver.ask(&vault, json!({}));
    let state: Value = serde_json::from_str(read.body.value.as_deref().unwrap()).unwrap();
    assert_eq!(state["counter"], 0, "{state}");
    assert_eq!(state["holds_secret"], true);
}
