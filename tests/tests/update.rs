//! Live update (issue 20): `Runtime::apply` swaps a hyperty under steady
//! load without losing, duplicating or reordering a message and keeps its
//! address; a failing new version leaves the old one running; domains come
//! and go; a protostub is updated with messages queued; bad bundles change
//! nothing; re-applying the previous bundle rolls back.

use std::time::Duration;

use hyperty_host::runtime::Action;
use hyperty_host::{Address, Digest, MessageType, Runtime};
use hyperty_tests::update::{CliProcess, Reports, Sender, collect};
use hyperty_tests::*;
use serde_json::json;

const V1: &str = "hyperty://app.example/v1";
const V2: &str = "hyperty://app.example/v2";

/// bob.example/b, a puppet reporting every message to `observer`.
fn receiver(observer: &str) -> TestBundle {
    TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), json!({ "observer": observer, "echo": true }))
}

/// Asks `to` for a read and returns the answer's code.
fn read_code(runtime: &Runtime, to: &Address) -> u16 {
    let endpoint = runtime.endpoint("hyperty://app.example/reader", 4).unwrap();
    let request = endpoint.message(MessageType::Read, to.as_str()).build().unwrap();
    endpoint.request_reply(request, None).unwrap().body.code.unwrap()
}

#[test]
fn a_hyperty_updated_under_steady_load_keeps_its_address_and_loses_nothing() {
    let runtime = runtime(Duration::from_secs(10));
    let v1 = runtime.endpoint(V1, 200_000).unwrap();
    let v2 = runtime.endpoint(V2, 200_000).unwrap();
    runtime.deploy(&receiver(V1).load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    let sender = Sender::start(&runtime, "hyperty://app.example/sender", &b);
    // The first version is taking the load...
    let mut first = Reports::new();
    first.wait_for(&v1, &b, 200);
    // ...when the second one (another config: it reports to V2) replaces it.
    let next = receiver(V2);
    let applied = runtime.apply(&next.load()).expect("the update applies");
    assert_eq!(applied.changes.len(), 1, "{applied}");
    assert_eq!(applied.changes[0].action, Action::Updated);
    assert!(applied.to_string().contains(&format!("updated hyperty bob.example/b at {b} (config)")), "{applied}");
    assert_eq!(runtime.lookup("bob.example", "b"), Some(b.clone()), "the address stays");
    // The new version takes the load from then on.
    let mut second = Reports::new();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while second.numbers.len() < 200 {
        assert!(std::time::Instant::now() < until, "the new version got {} messages within 30 s", second.numbers.len());
        first.take(&v1, &b, Duration::from_millis(10));
        second.take(&v2, &b, Duration::from_millis(10));
    }
    let sent = sender.stop();
    let (old, new) = collect(&v1, &v2, &b, sent, first, second);
    // Every number exactly once, in order: the old version's then the new's.
    let all: Vec<u64> = old.iter().chain(&new).copied().collect();
    let expected: Vec<u64> = (0..sent).collect();
    assert!(all == expected, "sent 0..{sent}; the old version got {} (last {:?}), the new {} (first {:?})", old.len(), old.last(), new.len(), new.first());
    assert!(!old.is_empty() && !new.is_empty());
    // Requests still answered by the new version, at the same address.
    assert_eq!(read_code(&runtime, &b), 200);
}

#[test]
fn a_new_version_whose_init_fails_or_traps_leaves_the_old_one_running() {
    let runtime = runtime(Duration::from_secs(10));
    let v1 = runtime.endpoint(V1, 1000).unwrap();
    runtime.deploy(&receiver(V1).load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    // The puppet's init refuses a config without an observer.
    let refused = TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), json!({ "echo": true }));
    let e = runtime.apply(&refused.load()).expect_err("the new version's init fails");
    let text = e.to_string();
    assert!(text.contains("bob.example/b: the new version failed: init refused: bad config"), "{text}");
    // A component that traps while it is instantiated.
    let trapping = TestBundle::new().hyperty("bob.example", "b", &guest("start-trap"), json!({}));
    let e = runtime.apply(&trapping.load()).expect_err("the new version traps");
    assert!(e.to_string().contains("bob.example/b: the new version failed: instantiation failed"), "{e}");
    // The old one still runs, at its address, with its config.
    assert_eq!(runtime.lookup("bob.example", "b"), Some(b.clone()));
    assert_eq!(read_code(&runtime, &b), 200);
    let mut reports = Reports::new();
    let sender = runtime.endpoint("hyperty://app.example/sender", 4).unwrap();
    sender.send(sender.message(MessageType::Update, b.as_str()).value(json!({ "n": 7 }).to_string()).build().unwrap()).unwrap();
    reports.wait_for(&v1, &b, 1);
    assert_eq!(reports.numbers, [7]);
}

#[test]
fn a_domain_is_added_then_removed_and_its_senders_get_404() {
    let runtime = runtime(Duration::from_secs(10));
    let alice = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(true));
    runtime.deploy(&alice.load()).unwrap();
    let a = runtime.lookup("alice.example", "a").unwrap();
    // Add bob.example.
    let both = alice.hyperty("bob.example", "b", &guest("puppet"), puppet_config(true));
    let applied = runtime.apply(&both.load()).unwrap();
    let b = runtime.lookup("bob.example", "b").expect("b was added");
    let text = applied.to_string();
    assert!(text.contains("added domain bob.example") && text.contains(&format!("added hyperty bob.example/b at {b}")), "{text}");
    assert!(!text.contains("alice.example"), "alice.example did not change: {text}");
    assert_eq!(read_code(&runtime, &b), 200);
    // Remove it again: its address answers 404, a keeps running.
    let alice = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(true));
    let applied = runtime.apply(&alice.load()).unwrap();
    let text = applied.to_string();
    assert!(text.contains("removed domain bob.example") && text.contains(&format!("removed hyperty bob.example/b at {b}")), "{text}");
    assert_eq!(runtime.lookup("bob.example", "b"), None);
    assert_eq!(read_code(&runtime, &b), 404);
    assert_eq!(runtime.memory_used("bob.example"), None, "its sandbox is gone");
    assert_eq!(read_code(&runtime, &a), 200);
    // The same bundle again changes nothing.
    assert!(runtime.apply(&alice.load()).unwrap().is_empty());
}

#[test]
fn bad_bundles_are_refused_with_every_problem_and_change_nothing() {
    let runtime = runtime(Duration::from_secs(10));
    let v1 = runtime.endpoint(V1, 1000).unwrap();
    runtime.deploy(&receiver(V1).load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    // A bad pin on the changed hyperty, a component that is not a hyperty
    // for a new one: both reported, neither applied.
    let bad = receiver(V2).hyperty("bob.example", "c", &guest("not-a-hyperty"), json!({}));
    let path = bad.write();
    let text = std::fs::read_to_string(&path).unwrap();
    let pin = Digest::of(&std::fs::read(guest("puppet")).unwrap()).to_string();
    std::fs::write(&path, text.replacen(&pin, &"0".repeat(64), 1)).unwrap();
    let e = runtime.apply(&hyperty_host::Bundle::load(&path).unwrap()).expect_err("refused");
    assert_eq!(e.problems.len(), 2, "{e}");
    assert!(e.problems.iter().any(|p| p.field.ends_with("sha256") && p.message.contains("does not match its pin")), "{e}");
    assert!(e.problems.iter().any(|p| p.message.contains("not-a-hyperty")), "{e}");
    // Nothing changed: b still reports to V1, c does not exist.
    assert_eq!(runtime.lookup("bob.example", "c"), None);
    assert_eq!(runtime.lookup("bob.example", "b"), Some(b.clone()));
    let sender = runtime.endpoint("hyperty://app.example/sender", 4).unwrap();
    sender.send(sender.message(MessageType::Update, b.as_str()).value(json!({ "n": 1 }).to_string()).build().unwrap()).unwrap();
    let mut reports = Reports::new();
    reports.wait_for(&v1, &b, 1);
    // A running domain's inbox size cannot change while it runs.
    let inbox = receiver(V1).domain("bob.example", json!({ "limits": { "inbox": 7 } }));
    let e = runtime.apply(&inbox.load()).expect_err("refused");
    assert!(e.to_string().contains("bob.example runs with another inbox size"), "{e}");
    // Nor its size in bytes (the inbox takes it at its start).
    let inbox_bytes = receiver(V1).domain("bob.example", json!({ "limits": { "inbox-bytes": 65_536 } }));
    let e = runtime.apply(&inbox_bytes.load()).expect_err("refused");
    assert!(e.to_string().contains("bob.example runs with another inbox size"), "{e}");
}

#[test]
fn re_applying_the_previous_bundle_rolls_back_at_the_same_address() {
    let runtime = runtime(Duration::from_secs(10));
    let v1 = runtime.endpoint(V1, 1000).unwrap();
    let v2 = runtime.endpoint(V2, 1000).unwrap();
    let first = receiver(V1);
    runtime.deploy(&first.load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    let sender = runtime.endpoint("hyperty://app.example/sender", 4).unwrap();
    let send = |n: u64| sender.send(sender.message(MessageType::Update, b.as_str()).value(json!({ "n": n }).to_string()).build().unwrap()).unwrap();
    let expect = |observer: &hyperty_host::Endpoint, n: u64| {
        let mut reports = Reports::new();
        reports.wait_for(observer, &b, 1);
        assert_eq!(reports.numbers, [n]);
    };
    runtime.apply(&receiver(V2).load()).unwrap();
    send(1);
    expect(&v2, 1);
    let applied = runtime.apply(&first.load()).unwrap();
    assert!(applied.to_string().contains(&format!("updated hyperty bob.example/b at {b} (config)")), "{applied}");
    send(2);
    expect(&v1, 2);
    assert!(v2.recv_where(|m| m.kind == MessageType::Forward, Duration::from_millis(200)).is_none(), "v2 is gone");
    assert_eq!(runtime.lookup("bob.example", "b"), Some(b));
}

#[test]
fn a_protostub_updated_with_messages_queued_delivers_each_once() {
    let nats = Nats::start();
    let live = [nats.endpoint()];
    let closed = closed_port();
    let dead = [format!("127.0.0.1:{}", closed.port)];
    let r1 = runtime(Duration::from_secs(30));
    let r2 = runtime(Duration::from_secs(30));
    let observer = r2.endpoint(V1, 1000).unwrap();
    // Runtime 1 sends to bob.example through a stub whose node is down.
    let alice = || TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(true));
    let on = |servers: &[String]| alice().protostub("bob.example", servers, json!({}));
    let before = on(&dead);
    r1.deploy(&before.load()).unwrap();
    let b2 = receiver(V1).protostub("bob.example", &live, json!({}));
    r2.deploy(&b2.load()).unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();
    let sender = r1.endpoint("hyperty://app.example/sender", 4).unwrap();
    const N: u64 = 50;
    for n in 0..N {
        sender.send(sender.message(MessageType::Update, b.as_str()).value(json!({ "n": n }).to_string()).build().unwrap()).unwrap();
    }
    let queued = |r: &Runtime| hyperty_tests::metrics::Samples::parse(&r.metrics_text()).get("hyperty_stub_queue_messages", &[("domain", "bob.example")]);
    assert_eq!(queued(&r1), N as f64, "queued while the node is down");
    // The update points the stub at the live node: the queue goes there.
    let applied = r1.apply(&on(&live).load()).unwrap();
    assert!(applied.to_string().contains("updated protostub of bob.example (config, endpoints)"), "{applied}");
    let mut reports = Reports::new();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while (reports.numbers.len() as u64) < N && std::time::Instant::now() < until {
        reports.take(&observer, &b, Duration::from_millis(200));
    }
    reports.take(&observer, &b, Duration::from_millis(500));
    let mut seen = reports.numbers.clone();
    seen.sort();
    assert_eq!(seen, (0..N).collect::<Vec<_>>(), "each queued message once: {:?}", reports.numbers);
    wait_until("the queue drained", || queued(&r1) == 0.0);
    // Removing the stub takes it off the bus: bob.example is unknown there.
    let applied = r1.apply(&alice().load()).unwrap();
    assert!(applied.to_string().contains("removed protostub of bob.example"), "{applied}");
    assert_eq!(read_code(&r1, &b), 404);
}

#[test]
fn hyperty_run_applies_saved_edits_reports_bad_ones_and_rolls_back() {
    let first = receiver(V1);
    let path = first.write();
    let original = std::fs::read_to_string(&path).unwrap();
    let mut cli = CliProcess::start(&["run", path.to_str().unwrap()]);
    cli.wait_log("changes to", 1);
    let address = {
        let log = cli.wait_log("deployed bob.example/b at ", 1);
        let at = log.find("deployed bob.example/b at ").unwrap() + "deployed bob.example/b at ".len();
        log[at..].split(' ').next().unwrap().to_owned()
    };
    // A syntax error: reported, nothing applied.
    std::fs::write(&path, format!("{original}\n[domains.\"broken")).unwrap();
    cli.wait_log("not applied, nothing running changed", 1);
    // A bad pin: reported with the problem, nothing applied.
    let pin = Digest::of(&std::fs::read(guest("puppet")).unwrap()).to_string();
    std::fs::write(&path, original.replacen(&pin, &"0".repeat(64), 1)).unwrap();
    let log = cli.wait_log("not applied, nothing running changed", 2);
    assert!(log.contains("does not match its pin"), "{log}");
    // A component that does not fit: the same.
    let not_hyperty = receiver(V1).hyperty("bob.example", "c", &guest("not-a-hyperty"), json!({}));
    std::fs::write(&path, std::fs::read_to_string(not_hyperty.write()).unwrap()).unwrap();
    let log = cli.wait_log("not applied, nothing running changed", 3);
    assert!(!log.contains("updated hyperty") && !log.contains("added hyperty"), "nothing was applied:\n{log}");
    // A good edit: applied and logged in words, at the same address.
    let second = receiver(V2);
    std::fs::write(&path, std::fs::read_to_string(second.write()).unwrap()).unwrap();
    cli.wait_log(&format!("updated hyperty bob.example/b at {address} (config)"), 1);
    // Rollback: the previous file again.
    std::fs::write(&path, &original).unwrap();
    let log = cli.wait_log(&format!("updated hyperty bob.example/b at {address} (config)"), 2);
    assert_eq!(log.matches("not applied").count(), 3, "{log}");
}

/// The child process of the CLI tests (see [`CliProcess`]).
#[test]
#[ignore = "run by the CLI tests in a child process"]
fn cli_child() {
    hyperty_tests::update::cli_child();
}

#[test]
fn an_updated_hyperty_keeps_its_pending_requests_and_its_data_objects() {
    let runtime = runtime(Duration::from_secs(30));
    let mut driver = Driver::new(&runtime);
    // a reports a data object and asks b, who does not answer yet.
    let bundle = |version: u32| {
        TestBundle::new()
            .hyperty("alice.example", "a", &guest("puppet"), json!({ "observer": OBSERVER, "echo": true, "version": version }))
            .hyperty("bob.example", "b", &guest("puppet"), puppet_config(false))
    };
    runtime.deploy(&bundle(1).load()).unwrap();
    let a = runtime.lookup("alice.example", "a").unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    let url = hyperty_tests::rethink::create(&mut driver, &a, json!({ "n": 0 }));
    let watcher = runtime.endpoint("hyperty://carol.example/watcher", 64).unwrap();
    driver.command(&a, json!({ "op": "invite", "url": url, "observers": [watcher.address().to_string()] }));
    watcher.recv_timeout(Duration::from_secs(10)).expect("an invitation");
    let subscribe = hyperty_host::Message::new(1, MessageType::Subscribe, watcher.address().clone(), Address::parse(&url).unwrap(), None);
    let subscribed = watcher.request_reply(subscribe, None).unwrap();
    assert_eq!(subscribed.body.code, Some(200), "{subscribed:?}");
    let id = driver.fresh_id();
    let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": b.to_string() }, "timeout_ms": 30_000 });
    assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
    let request = driver.report(&b, |m| m["type"] == "read" && m["id"] == id);
    // a is updated (another config) while its request is pending.
    let applied = runtime.apply(&bundle(2).load()).unwrap();
    assert!(applied.to_string().contains(&format!("updated hyperty alice.example/a at {a} (config)")), "{applied}");
    assert_eq!(runtime.pending_requests(), 1, "a's request is still pending");
    // b answers now: the new version of a gets the response.
    assert_eq!(driver.command(&b, json!({ "op": "reply", "message": request })), json!({ "ok": true }));
    let answer = driver.report(&a, |m| m["type"] == "response" && m["id"] == id);
    assert_eq!(answer["code"], 200, "{answer}");
    // The new version changes the object the old one created: its reporter
    // is the address.
    let patch = json!([{ "op": "replace", "path": "/n", "value": 1 }]);
    assert_eq!(driver.command(&a, json!({ "op": "update", "url": url, "patch": patch }))["version"], 2);
    let delta = watcher.recv_where(|m| m.kind == MessageType::Update, Duration::from_secs(10)).expect("the watcher hears the change");
    assert_eq!(delta.from.as_str(), url);
}
