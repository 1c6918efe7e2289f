//! Hostile hyperties are contained: each case is a real component, and in
//! each the runtime and the other domains keep working and the case is
//! reported (log and status event).

use std::time::{Duration, Instant};

use hyperty_host::{Address, EventKind, Runtime};
use hyperty_tests::*;
use serde_json::{Value, json};

const EVIL: &str = "evil.example";

/// A runtime with the healthy pair and one hostile hyperty `evil.example/x`
/// in `mode`, its domain set up with `settings`.
struct Case {
    runtime: Runtime,
    driver: Driver,
    events: hyperty_host::EventReceiver,
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

    /// Waits for the hostile hyperty's next restart; returns its count of
    /// consecutive failures.
    fn restarted(&mut self) -> u32 {
        let evil = self.evil.clone();
        match wait_event(&mut self.events, |e| e.address == evil && matches!(e.kind, EventKind::Restarted { .. })).kind {
            EventKind::Restarted { failures } => failures,
            _ => unreachable!(),
        }
    }

    /// Asks the hostile hyperty and returns the answer's code and description.
    fn poke(&mut self, value: Value) -> (u16, String) {
        let answer = self.driver.ask(&self.evil.clone(), value);
        (answer.body.code.unwrap_or(0), answer.body.description.map(String::from).unwrap_or_default())
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
fn a_sleep_within_the_call_deadline_lasts_its_time_and_one_past_it_is_stopped_there() {
    // The epoch deadline does not interrupt a host call: a timer past the
    // deadline ends there (`sandbox::timers`), and the call traps back in
    // wasm, as a loop would.
    let mut c = case("sleep", json!({ "limits": { "call-timeout-ms": 300 } }));
    let evil = c.evil.clone();
    let nap = |c: &mut Case| c.driver.command(&evil, json!({ "ms": 50 }))["slept_ms"].as_u64().unwrap();
    assert!(nap(&mut c) >= 50, "a short sleep is not cut");
    let (code, why) = c.poke(json!({ "ms": 3_600_000 }));
    assert_eq!(code, 500);
    assert!(why.contains("ran past its call deadline (call-timeout-ms = 300)"), "{why}");
    assert!(c.trapped().contains("call deadline"));
    c.restarted();
    // The next call's timers end at its own deadline, not the last one's.
    assert!(nap(&mut c) >= 50, "a short sleep after the restart is not cut");
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
    // Three instances of one domain each hold 12 MiB, under their own cap
    // (16 MiB); the sum, not any one of them, crosses the domain's (32 MiB).
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let mut events = runtime.events();
    let (_healthy, a, b) = healthy_pair(&runtime);
    let mut bundle = TestBundle::new();
    for name in ["x", "y", "z"] {
        bundle = bundle.hyperty(EVIL, name, &guest("hostile"), json!({ "mode": "hoard" }));
    }
    let bundle = bundle.domain(EVIL, json!({ "limits": { "memory-mb": 16, "total-memory-mb": 32 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let [x, y, z] = ["x", "y", "z"].map(|n| runtime.lookup(EVIL, n).unwrap());
    for holder in [&x, &y] {
        let answer = driver.ask(holder, json!({ "mb": 12 }));
        assert_eq!(answer.body.code, Some(200), "{answer:?}");
        assert_eq!(answer.body.value.as_deref(), Some(r#"{"held_mb":12}"#));
    }
    let held = runtime.memory_used(EVIL).unwrap();
    assert!(held > 24 << 20 && held <= 32 << 20, "the domain holds {} KiB", held >> 10);
    let answer = driver.ask(&z, json!({ "mb": 12 }));
    let why = answer.body.description.unwrap_or_default();
    assert_eq!(answer.body.code, Some(500), "{why}");
    assert!(why.contains("memory limit of the domain reached (total-memory-mb = 32)"), "{why}");
    let trapped = wait_event(&mut events, |e| e.address == z && matches!(e.kind, EventKind::Trapped { .. }));
    assert!(matches!(trapped.kind, EventKind::Trapped { reason } if reason.contains("total-memory-mb = 32")));
    // The others keep what they hold, and the domain's total stays bounded.
    assert_eq!(driver.ask(&x, json!({ "mb": 0 })).body.value.as_deref(), Some(r#"{"held_mb":12}"#));
    assert!(runtime.memory_used(EVIL).unwrap() <= 32 << 20);
    driver.still_works(&a, &b);
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
    for failures in 1..=3 {
        // Asked only once it is live again: the message it dies on gets 500.
        let (code, why) = c.poke(json!({}));
        assert_eq!(code, 500, "{why}");
        assert_eq!(c.runtime.pending_requests(), 0, "the 500 ends the request: no 408 follows it");
        assert!(c.trapped().contains("panicked"));
        assert_eq!(c.restarted(), failures, "consecutive failures");
    }
    assert_eq!(c.runtime.lookup(EVIL, "x"), Some(c.evil.clone()), "a restarted hyperty keeps its address");
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn a_request_to_a_restarting_hyperty_is_answered_503_and_ends_there() {
    let mut c = case("trap", json!({ "restart": { "initial-backoff-ms": 60000, "max-backoff-ms": 60000 } }));
    assert_eq!(c.poke(json!({})).0, 500);
    assert!(c.trapped().contains("panicked"));
    let (code, why) = c.poke(json!({}));
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("is restarting after a failure"), "{why}");
    assert_eq!(c.runtime.pending_requests(), 0, "the 503 ends the request: no 408 follows it");
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn restarts_back_off_doubling_up_to_the_cap_and_a_handled_message_resets_it() {
    // initial 40 ms, cap 100 ms: 40, 80, 100, 100; then, after a message
    // handled without a trap, 40 again.
    let mut c = case("vault", json!({ "restart": { "initial-backoff-ms": 40, "max-backoff-ms": 100 } }));
    let crash = |c: &mut Case| {
        let asked = Instant::now();
        assert_eq!(c.poke(json!({ "panic": true })).0, 500);
        let failures = c.restarted();
        (failures, asked.elapsed())
    };
    for (failures, backoff) in [(1, 40), (2, 80), (3, 100), (4, 100)] {
        let (seen, waited) = crash(&mut c);
        assert_eq!(seen, failures);
        // A lower bound only (a slow machine waits longer, never shorter).
        assert!(waited >= Duration::from_millis(backoff), "failure {failures}: restarted after {waited:?}, before its {backoff} ms backoff");
    }
    assert_eq!(c.poke(json!({})).0, 200, "handled without a trap");
    let (seen, waited) = crash(&mut c);
    assert_eq!(seen, 1, "a handled message resets the count");
    assert!(waited >= Duration::from_millis(40), "{waited:?}");
}

#[test]
fn messages_reaching_a_restarting_hyperty_are_answered_503() {
    // The restart is an hour away: it is certainly still restarting.
    let mut c = case("vault", json!({ "restart": { "initial-backoff-ms": 3_600_000, "max-backoff-ms": 3_600_000 } }));
    assert_eq!(c.poke(json!({ "panic": true })).0, 500);
    assert!(c.trapped().contains("panicked"));
    let (code, why) = c.poke(json!({}));
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("is restarting after a failure"), "{why}");
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
    let mut c = case("oversize", json!({ "limits": { "memory-mb": 256, "call-timeout-ms": 30_000 } }));
    let answer = c.driver.ask(&c.evil.clone(), json!({ "to": c.b.to_string(), "bytes": 40 << 20 }));
    let result: Value = serde_json::from_str(answer.body.value.as_deref().unwrap_or_else(|| panic!("{answer:?}"))).unwrap();
    let error = result["error"].as_str().unwrap();
    assert!(error.starts_with("too-large:") && error.contains("the limit is 1048576"), "{error}");
    let evil = c.evil.clone();
    wait_event(&mut c.events, |e| e.address == evil && matches!(e.kind, EventKind::Refused { .. }));
    // That the host kept no copy is measured in crash_cycles.rs (resident
    // memory needs a process to itself).
    let b = c.b.clone();
    assert_eq!(c.driver.before_marker(&b), [], "nothing reached b");
    c.driver.still_works(&c.a, &c.b);
}

#[test]
fn garbage_addresses_and_bodies_are_refused_one_by_one() {
    let mut c = case("garbage", json!({}));
    let answer = c.driver.ask(&c.evil.clone(), json!({}));
    let result: Value = serde_json::from_str(answer.body.value.as_deref().unwrap_or_else(|| panic!("{answer:?}"))).unwrap();
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
        // ... and still opens no directory and uses no address: a listener
        // here, which it tries to reach, accepts nothing.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let granted = runtime.lookup(&domain, "x").unwrap();
        let answer = driver.ask(&granted, json!({ "port": port }));
        let tried: Value = serde_json::from_str(answer.body.value.as_deref().unwrap_or_else(|| panic!("{answer:?}"))).unwrap();
        let tried = tried["tried"].as_array().unwrap();
        assert_eq!(tried.len(), 4, "{tried:?}");
        for attempt in tried {
            assert_eq!(attempt["ok"], false, "{guest_name} with the grant: {attempt}");
        }
        assert_eq!(listener.accept().map(|_| ()).unwrap_err().kind(), std::io::ErrorKind::WouldBlock, "no connection came");
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
        .hyperty("alice.example", "snoop", &guest("hostile"), json!({ "mode": "snoop", "victim": "bob.example/vault", "owner": OBSERVER }));
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
    let as_owner = seen[2]["result"].as_str().unwrap();
    assert!(as_owner.starts_with("spoofed-from") && as_owner.contains(OBSERVER), "cannot send as its owner: {as_owner}");
    assert_eq!(seen[3]["result"], Value::Null, "may send as itself...");
    assert!(seen[4]["reply"].as_str().unwrap().starts_with("spoofed-from"), "cannot answer for the vault");
    assert_eq!(seen[5]["env"], json!([]), "no environment");
    assert_eq!(seen[5]["args"], json!([]), "no arguments");
    let spoofing = wait_event(&mut events, |e| e.address == snoop && matches!(e.kind, EventKind::Refused { .. }));
    assert!(matches!(spoofing.kind, EventKind::Refused { reason } if reason.contains("spoofed from")), "reported");

    // ... and the vault refused the honest update: its state is unchanged.
    let read = driver.ask(&vault, json!({}));
    let state: Value = serde_json::from_str(read.body.value.as_deref().unwrap()).unwrap();
    assert_eq!(state["counter"], 0, "{state}");
    assert_eq!(state["holds_secret"], true);
}
