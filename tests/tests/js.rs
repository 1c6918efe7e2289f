//! Hyperties written in JavaScript (`guests/js`, built with jco's QuickJS
//! backend) on the same host, under the same guarantees as Rust ones: they
//! talk to Rust hyperties across domains, observe and report data objects,
//! see the host's 403/404/408 as rejected promises, are contained when
//! hostile, restart after an exception with its message in the log, and are
//! pinned, signed, cached and checked like any component.
//!
//! Its own test binary: it captures the process's log (`host_log`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hyperty_host::{Address, EventKind, Runtime, RuntimeConfig};
use hyperty_tests::js::{host_log, js_guest};
use hyperty_tests::*;
use serde_json::{Value, json};

const IDP_KEY: [u8; 32] = [7; 32];

/// The value of an answer, as JSON.
fn answer_value(m: &hyperty_host::Message) -> Value {
    serde_json::from_str(m.body.value.as_deref().unwrap_or("null")).unwrap()
}

fn start() -> (Runtime, Driver) {
    host_log();
    let runtime = runtime(Duration::from_secs(10));
    let driver = Driver::new(&runtime);
    (runtime, driver)
}

#[test]
fn js_pong_answers_a_rust_hyperty_across_domains_with_the_senders_identity() {
    let (runtime, mut driver) = start();
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .hyperty("bob.example", "pong", &js_guest("pong"), json!({}))
        .user("alice.example", "a", "alice@idp.example")
        .idp("idp.example", IDP_KEY, &["alice.example", "bob.example"])
        .domain("alice.example", json!({ "require-identity": false }));
    runtime.deploy(&bundle.load()).expect("a Rust and a JavaScript hyperty deploy together");
    let a = runtime.lookup("alice.example", "a").unwrap();
    let pong = runtime.lookup("bob.example", "pong").unwrap();

    for round in 1..=3 {
        let cmd = json!({ "op": "request", "message": { "id": round, "type": "execute", "to": pong.to_string(),
            "value": json!({ "text": format!("ping {round}") }).to_string() } });
        assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
        let answer = driver.report(&a, |m| m["type"] == "response" && m["id"] == round);
        assert_eq!(answer["code"], 200, "{answer}");
        assert_eq!(answer["from"], pong.as_str());
        let value: Value = serde_json::from_str(answer["value"].as_str().unwrap()).unwrap();
        assert_eq!(value["text"], format!("pong {round}"));
        // The JS code saw the stamped sender and the identity bob.example's
        // IdP proxy validated.
        assert_eq!(value["from"], a.as_str());
        assert_eq!(value["identity"], json!({ "user": "alice@idp.example", "idp": "idp.example" }));
    }
    assert!(host_log().contains("got \"ping 3\" from alice@idp.example (asserted by idp.example)"));
    assert!(runtime.wait_idle(Duration::from_secs(5)));
    assert_eq!(runtime.pending_requests(), 0);
}

/// A JS probe in alice.example, a Rust puppet in bob.example that never
/// answers, and bob.example's policies refusing carol.example's probe.
fn probes() -> (Runtime, Driver, Address, Address, Address, TestBundle) {
    let (runtime, driver) = start();
    let bundle = TestBundle::new()
        .hyperty("alice.example", "probe", &js_guest("probe"), json!({}))
        .hyperty("carol.example", "probe", &js_guest("probe"), json!({}))
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(false));
    let policies = bundle.dir().join("bob.cedar");
    std::fs::write(
        &policies,
        r#"@id("no-carol") forbid (principal, action, resource) when { context.sender_domain == "carol.example" };
@id("open") permit (principal, action, resource);"#,
    )
    .unwrap();
    let bundle = bundle.domain("bob.example", json!({ "policies": [policies.to_str().unwrap()] }));
    runtime.deploy(&bundle.load()).unwrap();
    let [alice, carol] = ["alice.example", "carol.example"].map(|d| runtime.lookup(d, "probe").unwrap());
    let b = runtime.lookup("bob.example", "b").unwrap();
    (runtime, driver, alice, carol, b, bundle)
}

/// The probe's outcome of a request it made with the SDK.
fn probe_asks(driver: &mut Driver, probe: &Address, ask: Value) -> Value {
    let answer = driver.ask(probe, json!({ "ask": ask }));
    assert_eq!(answer.body.code, Some(200), "{answer:?}");
    answer_value(&answer)
}

#[test]
fn host_answers_reach_js_code_as_rejected_promises_and_spoofing_is_refused() {
    let (runtime, mut driver, alice, carol, b, _bundle) = probes();

    // Denied by bob.example's policy: 403 naming the point, domain and policy.
    let denied = probe_asks(&mut driver, &carol, json!({ "to": b.to_string(), "type": "read" }));
    assert_eq!(denied["rejected"]["name"], "ResponseError", "{denied}");
    assert_eq!(denied["rejected"]["code"], 403, "{denied}");
    let why = denied["rejected"]["description"].as_str().unwrap();
    assert!(why.contains("bob.example") && why.contains("no-carol"), "{why}");
    // The same request from alice.example reaches b (which never answers):
    // 408 after the probe's own timeout.
    let late = probe_asks(&mut driver, &alice, json!({ "to": b.to_string(), "type": "read", "timeoutMs": 100 }));
    assert_eq!(late["rejected"]["code"], 408, "{late}");
    let seen = driver.report(&b, |m| m["type"] == "read");
    assert_eq!(seen["from"], alice.as_str(), "stamped with the JS hyperty's own address");
    // No such address: 404.
    let nobody = probe_asks(&mut driver, &alice, json!({ "to": "hyperty://bob.example/nobody", "type": "read" }));
    assert_eq!(nobody["rejected"]["code"], 404, "{nobody}");
    // A response that is not an error resolves: the JS probe asks the other one.
    let fine = probe_asks(&mut driver, &alice, json!({ "to": carol.to_string(), "type": "execute", "value": {} }));
    assert_eq!(fine["code"], 200, "{fine}");
    assert_eq!(serde_json::from_str::<Value>(fine["value"].as_str().unwrap()).unwrap()["from"], alice.as_str());
    // Refused at the import, synchronously: a SendError with its kind.
    let malformed = probe_asks(&mut driver, &alice, json!({ "to": "not an address", "type": "read" }));
    assert_eq!(malformed["refused"]["kind"], "malformed", "{malformed}");
    let spoof = driver.ask(&alice, json!({ "spoof": b.to_string() }));
    assert_eq!(answer_value(&spoof)["refused"]["kind"], "spoofed-from");

    assert!(runtime.wait_idle(Duration::from_secs(5)));
    assert_eq!(runtime.pending_requests(), 0, "every promise was settled and nothing is left waiting");
}

/// A JS probe in evil.example set up with `settings`, beside the healthy
/// Rust pair.
struct Hostile {
    runtime: Runtime,
    driver: Driver,
    events: hyperty_host::EventReceiver,
    a: Address,
    b: Address,
    probe: Address,
    _bundles: (TestBundle, TestBundle),
}

fn hostile(settings: Value) -> Hostile {
    let (runtime, driver) = start();
    let events = runtime.events();
    let (healthy, a, b) = healthy_pair(&runtime);
    let bundle = TestBundle::new().hyperty("evil.example", "x", &js_guest("probe"), json!({})).domain("evil.example", settings);
    runtime.deploy(&bundle.load()).expect("the JS probe deploys");
    let probe = runtime.lookup("evil.example", "x").unwrap();
    Hostile { runtime, driver, events, a, b, probe, _bundles: (healthy, bundle) }
}

impl Hostile {
    /// Asks the probe to misbehave: the answer's code and description.
    fn poke(&mut self, command: Value) -> (u16, String) {
        let answer = self.driver.ask(&self.probe.clone(), command);
        (answer.body.code.unwrap_or(0), answer.body.description.map(String::from).unwrap_or_default())
    }

    fn trapped(&mut self) -> String {
        let probe = self.probe.clone();
        match wait_event(&mut self.events, |e| e.address == probe && matches!(e.kind, EventKind::Trapped { .. })).kind {
            EventKind::Trapped { reason } => reason,
            _ => unreachable!(),
        }
    }

    /// The probe answers normally again (after its restart).
    fn answers_again(&mut self) {
        let probe = self.probe.clone();
        wait_event(&mut self.events, |e| e.address == probe && matches!(e.kind, EventKind::Restarted { .. }));
        let (code, _) = self.poke(json!({}));
        assert_eq!(code, 200, "the restarted JS instance answers");
    }
}

#[test]
fn a_js_infinite_loop_is_stopped_at_the_call_deadline() {
    let mut h = hostile(json!({ "limits": { "call-timeout-ms": 100 }, "restart": { "initial-backoff-ms": 10 } }));
    let (code, why) = h.poke(json!({ "spin": true }));
    assert_eq!(code, 500, "{why}");
    assert!(why.contains("ran past its call deadline (call-timeout-ms = 100)"), "{why}");
    assert!(h.trapped().contains("call deadline"));
    h.driver.still_works(&h.a, &h.b);
    h.answers_again();
}

#[test]
fn a_js_infinite_loop_runs_out_of_fuel() {
    let mut h = hostile(json!({ "limits": { "fuel-per-call": 50_000_000 }, "restart": { "initial-backoff-ms": 10 } }));
    let (code, why) = h.poke(json!({ "spin": true }));
    assert_eq!(code, 500, "{why}");
    assert!(why.contains("ran out of fuel (fuel-per-call = 50000000)"), "{why}");
    h.driver.still_works(&h.a, &h.b);
    h.answers_again();
}

#[test]
fn a_js_allocation_bomb_is_stopped_at_the_memory_limit() {
    let mut h = hostile(json!({ "limits": { "memory-mb": 24 }, "restart": { "initial-backoff-ms": 10 } }));
    let (code, why) = h.poke(json!({ "bomb": true }));
    assert_eq!(code, 500, "{why}");
    let trapped = h.trapped();
    // Either the growth past the limit trapped, or QuickJS turned the
    // failed allocation into an exception (logged, then trapped).
    let log = host_log();
    assert!(
        trapped.contains("memory-mb = 24") || log.contains("out of memory"),
        "trapped: {trapped}; log: {log}"
    );
    assert!(h.runtime.memory_used("evil.example").unwrap() <= 24 << 20);
    h.driver.still_works(&h.a, &h.b);
    h.answers_again();
}

#[test]
fn a_js_exception_in_handle_traps_restarts_the_instance_and_is_logged() {
    let mut h = hostile(json!({ "restart": { "initial-backoff-ms": 10 } }));
    let (code, why) = h.poke(json!({ "throw": "the JS error text 42" }));
    assert_eq!(code, 500, "{why}");
    h.trapped();
    let log = host_log();
    let line = log
        .lines()
        .find(|l| l.contains("uncaught exception in handle: Error: the JS error text 42"))
        .unwrap_or_else(|| panic!("the JS error message is in the log:\n{log}"));
    assert!(line.contains("evil.example"), "tagged with the hyperty: {line}");
    h.driver.still_works(&h.a, &h.b);
    h.answers_again();
}

/// `{"version", "data", "children", "deleted"}` of a state or replica.
fn view(version: u64, data: Value, children: Value, deleted: bool) -> Value {
    json!({ "version": version, "data": data, "children": children, "deleted": deleted })
}

#[test]
fn a_js_reporter_and_a_rust_observer_converge_through_deltas() {
    let (runtime, mut driver) = start();
    let bundle = TestBundle::new()
        .hyperty("alice.example", "room", &js_guest("reporter"), json!({ "title": "chat", "observers": ["bob.example/watcher"] }))
        .hyperty("bob.example", "watcher", &guest("puppet"), puppet_config(false));
    runtime.deploy(&bundle.load()).unwrap();
    let room = runtime.lookup("alice.example", "room").unwrap();
    let watcher = runtime.lookup("bob.example", "watcher").unwrap();

    // The JS reporter created the object in init and invited the watcher.
    let invitation = driver.report(&watcher, |m| m["type"] == "create");
    let url = invitation["from"].as_str().unwrap().to_owned();
    assert!(url.starts_with("comm://alice.example/"), "{url}");
    let id = driver.fresh_id();
    let subscribe = json!({ "op": "request", "message": { "id": id, "type": "subscribe", "to": url } });
    assert_eq!(driver.command(&watcher, subscribe), json!({ "ok": true }));
    assert_eq!(driver.report(&watcher, |m| m["type"] == "response" && m["id"] == id)["code"], 200);

    for (command, version) in [
        (json!({ "say": "hello" }), 2),
        (json!({ "title": "team" }), 3),
        (json!({ "attach": "m1", "data": { "text": "hi" } }), 4),
        (json!({ "attach": "m2", "data": [1, 2] }), 5),
        (json!({ "detach": "m1" }), 6),
    ] {
        let answer = driver.ask(&room, command);
        assert_eq!(answer_value(&answer), json!({ "version": version }), "{answer:?}");
    }
    let want = view(6, json!({ "title": "team", "messages": ["hello"] }), json!({ "m2": [1, 2] }), false);
    wait_until("the Rust observer's replica reaches version 6", || {
        driver.command(&watcher, json!({ "op": "replica", "url": url }))["version"] == 6
    });
    assert_eq!(driver.command(&watcher, json!({ "op": "replica", "url": url })), want);
    // A refusal reaches the JS code as a SyncError, answered 400.
    let bad = driver.ask(&room, json!({ "invite": "not an address" }));
    assert_eq!(bad.body.code, Some(400), "{bad:?}");
    assert!(answer_value(&bad)["error"].as_str().unwrap().starts_with("invalid: "), "{bad:?}");
    // Closing the room deletes the object; the observer is told.
    assert_eq!(answer_value(&driver.ask(&room, json!({ "close": true }))), json!({ "ok": true }));
    wait_until("the Rust observer sees the deletion", || {
        driver.command(&watcher, json!({ "op": "replica", "url": url }))["deleted"] == true
    });
}

#[test]
fn a_rust_reporter_and_a_js_observer_converge_through_deltas() {
    let (runtime, mut driver) = start();
    let bundle = TestBundle::new()
        .hyperty("alice.example", "reporter", &guest("puppet"), puppet_config(true))
        .hyperty("bob.example", "watcher", &js_guest("observer"), json!({}));
    runtime.deploy(&bundle.load()).unwrap();
    let reporter = runtime.lookup("alice.example", "reporter").unwrap();
    let watcher = runtime.lookup("bob.example", "watcher").unwrap();
    let created = driver.command(&reporter, json!({ "op": "create", "scheme": "comm", "data": { "title": "chat", "members": [] } }));
    let url = created["url"].as_str().unwrap().to_owned();
    let replica = |driver: &mut Driver| driver.ask(&watcher, json!({ "replica": url }));

    // Invited, the JS observer subscribes by itself.
    let invite = json!({ "op": "invite", "url": url, "observers": [watcher.to_string()] });
    assert_eq!(driver.command(&reporter, invite), json!({ "ok": true }));
    wait_until("the JS observer holds a replica", || replica(&mut driver).body.code == Some(200));
    assert_eq!(answer_value(&replica(&mut driver)), view(1, json!({ "title": "chat", "members": [] }), json!({}), false));

    let changes = [
        json!({ "op": "update", "url": url, "patch": [{ "op": "add", "path": "/members/-", "value": "bob" },
            { "op": "replace", "path": "/title", "value": "team" }] }),
        json!({ "op": "update", "url": url, "patch": [{ "op": "add", "path": "/members/0", "value": "alice" },
            { "op": "copy", "from": "/title", "path": "/topic" }, { "op": "move", "from": "/topic", "path": "/subject" },
            { "op": "test", "path": "/members/1", "value": "bob" }, { "op": "add", "path": "/a~1b", "value": { "x": null } },
            { "op": "remove", "path": "/a~1b/x" }] }),
        json!({ "op": "set-child", "url": url, "name": "m1", "data": { "text": "hi" } }),
        json!({ "op": "set-child", "url": url, "name": "m1", "data": { "text": "hi!" } }),
        json!({ "op": "set-child", "url": url, "name": "m2", "data": true }),
        json!({ "op": "remove-child", "url": url, "name": "m2" }),
    ];
    for change in changes {
        let answer = driver.command(&reporter, change);
        assert!(answer["version"].is_u64(), "{answer}");
    }
    // Every operation of RFC 6902 went through the JS replica as the host applied it.
    let want = view(
        7,
        json!({ "title": "team", "subject": "team", "members": ["alice", "bob"], "a/b": {} }),
        json!({ "m1": { "text": "hi!" } }),
        false,
    );
    wait_until("the JS observer's replica reaches version 7", || answer_value(&replica(&mut driver))["version"] == 7);
    assert_eq!(answer_value(&replica(&mut driver)), want);
    // Deleted: the JS observer is told.
    assert_eq!(driver.command(&reporter, json!({ "op": "delete", "url": url })), json!({ "ok": true }));
    wait_until("the JS observer sees the deletion", || answer_value(&replica(&mut driver))["deleted"] == true);
}

/// The JS pong copied into `dir` (so a signature can sit beside it).
fn js_copy(dir: &Path) -> PathBuf {
    let path = dir.join("pong.wasm");
    std::fs::copy(js_guest("pong"), &path).unwrap();
    path
}

fn cached_artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "cwasm")).collect();
    v.sort();
    v
}

#[test]
fn a_js_component_is_pinned_signed_cached_and_refused_when_tampered() {
    host_log();
    let dirs = CliDirs::new();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("provider.key");
    assert_eq!(dirs.cli(&["keygen", key.to_str().unwrap()]), ExitCode::SUCCESS);
    let public = hyperty_host::signing::keygen_public(&key).unwrap().to_string();
    let component = js_copy(dir.path());
    assert_eq!(dirs.cli(&["sign", "--key", key.to_str().unwrap(), component.to_str().unwrap()]), ExitCode::SUCCESS);
    let bundle =
        || TestBundle::new().hyperty("bob.example", "pong", &component, json!({})).domain("bob.example", json!({ "trusted-keys": [public] }));
    let cache = tempfile::tempdir().unwrap();
    let config = || RuntimeConfig { cache_dir: cache.path().to_owned(), ..RuntimeConfig::default() };

    // `hyperty check` (the same function): signed and pinned, it fits; the
    // component is compiled once, into the empty cache.
    let signed = bundle();
    let started = Instant::now();
    hyperty_host::runtime::check_file(&signed.write(), config()).expect("the signed, pinned JS component checks");
    let compiled = started.elapsed();
    let artifacts = cached_artifacts(cache.path());
    assert_eq!(artifacts.len(), 1, "the JS component was compiled once and cached");
    let written = std::fs::metadata(&artifacts[0]).unwrap().modified().unwrap();

    // A new runtime deploys it from the cache and it answers.
    let runtime = Runtime::new(config()).unwrap();
    let started = Instant::now();
    runtime.deploy(&signed.load()).expect("the signed JS component deploys");
    let loaded = started.elapsed();
    let mut driver = Driver::new(&runtime);
    let pong = runtime.lookup("bob.example", "pong").unwrap();
    assert_eq!(answer_value(&driver.ask(&pong, json!({ "text": "ping" })))["text"], "pong");
    assert_eq!(cached_artifacts(cache.path()), artifacts);
    assert_eq!(std::fs::metadata(&artifacts[0]).unwrap().modified().unwrap(), written, "loaded from the cache, not compiled again");
    eprintln!(
        "JS pong ({} KiB): checked in {compiled:?} compiling, deployed in {loaded:?} from the cache",
        std::fs::metadata(&component).unwrap().len() >> 10
    );
    drop((driver, runtime));

    // Tampered: one byte of the component changed after signing and pinning.
    let mut bytes = std::fs::read(&component).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&component, &bytes).unwrap();
    let runtime = Runtime::new(config()).unwrap();
    let err = runtime.deploy(&signed.load()).unwrap_err().to_string();
    assert!(err.contains("does not match its pin"), "the pin no longer matches: {err}");
    // Re-pinned to the tampered bytes, the signature still refuses it.
    let repinned = bundle();
    let err = runtime.deploy(&repinned.load()).unwrap_err().to_string();
    assert!(err.contains("does not verify: the component or its signature was tampered with"), "{err}");
    let err = hyperty_host::runtime::check_file(&repinned.write(), config()).expect_err("check refuses it too").to_string();
    assert!(err.contains("does not verify"), "{err}");
    assert!(runtime.lookup("bob.example", "pong").is_none());
}

#[test]
fn a_js_component_of_another_world_is_refused_as_clearly_as_a_rust_one() {
    let (runtime, mut driver) = start();
    let (_healthy, a, b) = healthy_pair(&runtime);
    let refusal = |component: &Path| {
        let bundle = TestBundle::new().hyperty("carol.example", "c", component, json!({}));
        // `hyperty check` is this function and an exit code.
        let config = RuntimeConfig { cache_dir: cache_dir(), ..RuntimeConfig::default() };
        let checked = hyperty_host::runtime::check_file(&bundle.write(), config).expect_err("check refuses it").to_string();
        let deployed = runtime.deploy(&bundle.load()).unwrap_err().to_string();
        (checked, deployed)
    };
    let (js_check, js_deploy) = refusal(&js_guest("wrong-world"));
    let (rust_check, _) = refusal(&guest("not-a-hyperty"));
    for shown in [&js_check, &js_deploy, &rust_check] {
        assert!(shown.contains("does not fit the hyperty world"), "{shown}");
        assert!(shown.contains("rethink:hyperty/handler"), "the reason names the missing export: {shown}");
    }
    assert!(js_check.contains("hyperties[0]"), "names where: {js_check}");
    assert!(runtime.lookup("carol.example", "c").is_none());
    driver.still_works(&a, &b);
}

#[test]
fn the_mixed_demo_plays_every_round_between_rust_and_javascript() {
    host_log();
    // `just js-demo` re-pins guests/demo/mixed.toml before running it (JS
    // builds are not byte-reproducible): the same on a copy whose paths
    // point at the guests built for this test run.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("guests/demo/mixed.toml")).unwrap();
    let bundle = dir.path().join("mixed.toml");
    std::fs::write(&bundle, text.replace("\"../target/", &format!("\"{}/guests/target/", repo().display()))).unwrap();
    let dirs = CliDirs::new();
    assert_eq!(dirs.cli(&["pin".as_ref(), bundle.as_os_str()]), ExitCode::SUCCESS);
    let code = dirs.cli(&["run".as_ref(), bundle.as_os_str(), "--exit-when-idle".as_ref()]);
    let log = host_log();
    assert!(code == ExitCode::SUCCESS, "the mixed demo failed:\n{log}");
    for round in 1..=3 {
        let from = format!("got \"ping {round}\" from alice@idp.example (asserted by idp.example) at hyperty://alice.example/");
        assert!(log.contains(&from), "the JS pong heard round {round}: {log}");
        assert!(log.contains(&format!("bob.example/pong answered \"pong {round}\" (round {round} of 3)")), "{log}");
    }
    assert!(log.contains("bob.example/pong: ready to answer pings (JavaScript)"), "{log}");
    assert!(log.contains("game over: every ping got its pong"), "{log}");
}
