//! Protostubs are a trust boundary: what arrives through one is remote,
//! whatever it claims. Driven through `forging-stub`, a protostub that
//! posts whatever envelopes the test orders (as anyone who can publish on a
//! domain's node could), and through a real nats-server whose per-subject
//! permissions decide who may publish as a domain.

use std::time::Duration;

use hyperty_host::{Address, Message, MessageType, Query, Runtime, RuntimeConfig};
use hyperty_tests::forger::{Forger, with_forger};
use hyperty_tests::*;
use serde_json::{Value, json};

const IDP: &str = "idp.example";
const IDP_KEY: [u8; 32] = [42; 32];

/// A runtime with the puppet alice.example/a (answering requests if
/// `echo`) and the forger as the protostub of alice.example.
fn alice_and_forger(echo: bool) -> (Runtime, Driver, Address, Forger) {
    let r = runtime(Duration::from_secs(10));
    let driver = Driver::new(&r);
    let bundle = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(echo));
    r.deploy(&with_forger(bundle, "alice.example", None).load()).unwrap();
    let a = r.lookup("alice.example", "a").unwrap();
    let forger = Forger::new(&r, "alice.example");
    (r, driver, a, forger)
}

/// An envelope as a remote runtime would send it.
fn envelope(seq: u64, kind: &str, from: &str, to: &str, value: Option<&str>) -> Value {
    json!({ "v": 1, "origin": "forged", "seq": seq, "id": seq, "type": kind, "from": from, "to": to,
        "body": { "value": value } })
}

fn assertion(user: &str) -> Value {
    json!({ "idp": IDP, "token": jwt(IDP_KEY, IDP, user, unix_now() + 300) })
}

/// Whether a puppet reported a message with `id` (already, without waiting).
fn was_reported(driver: &Driver, puppet: &Address, id: u64) -> bool {
    driver.find(|m| m.kind == MessageType::Forward && &m.from == puppet && reported(m)["id"] == id, Duration::ZERO).is_some()
}

#[test]
fn nothing_arriving_through_a_stub_is_local_traffic() {
    let r = runtime(Duration::from_secs(10));
    let driver = Driver::new(&r);
    // bob.example requires identity; its stub is the forger.
    let bundle = TestBundle::new()
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(true))
        .idp_verifier(IDP, IDP_KEY, &["bob.example"])
        .domain("bob.example", json!({ "require-identity": true }));
    r.deploy(&with_forger(bundle, "bob.example", Some(assertion("forger@idp.example"))).load()).unwrap();
    let b = r.lookup("bob.example", "b").unwrap();
    let mut forger = Forger::new(&r, "bob.example");
    // A sender of bob.example itself, through the stub, with no assertion:
    // 401, not delivered (the answer goes back out through the stub).
    let insider = "hyperty://bob.example/forged-insider";
    let mut forged = envelope(5, "read", insider, b.as_str(), Some("{}"));
    forged["timeout-ms"] = json!(5000);
    assert_eq!(forger.post(forged, None), "ok");
    let answer = forger.outbound();
    assert_eq!((answer["type"].as_str(), answer["id"].as_u64(), answer["to"].as_str()), (Some("response"), Some(5), Some(insider)));
    assert_eq!(answer["body"]["code"], 401, "{answer}");
    assert!(answer["body"]["description"].as_str().unwrap().contains("bob.example requires an identity assertion"), "{answer}");
    // With a valid assertion it is delivered, as the validated user.
    let mut asserted = envelope(6, "read", insider, b.as_str(), Some("{}"));
    asserted["assertion"] = assertion("mallory@idp.example");
    assert_eq!(forger.post(asserted, None), "ok");
    let seen = driver.report(&b, |m| m["id"] == 6);
    assert_eq!(seen["identity"], json!(["mallory@idp.example", IDP]), "{seen}");
    // b handles messages in order: the first one never reached it.
    assert!(!was_reported(&driver, &b, 5), "the unasserted insider was delivered");
}

#[test]
fn a_stub_cannot_speak_for_an_address_routed_here() {
    let r = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&r);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(false));
    r.deploy(&with_forger(bundle, "alice.example", None).load()).unwrap();
    let a = r.lookup("alice.example", "a").unwrap();
    let b = r.lookup("bob.example", "b").unwrap();
    let created = driver.command(&a, json!({ "op": "create", "scheme": "room", "data": { "n": 1 } }));
    let url = created["url"].as_str().expect("a object").to_owned();
    let mut forger = Forger::new(&r, "alice.example");
    // The reporter's forged JSON Patch to its own object.
    let patch = r#"[{"op":"add","path":"/pwned","value":true}]"#;
    let refused = forger.post(envelope(1, "update", a.as_str(), &url, Some(patch)), None);
    assert!(refused.contains("spoofed from") && refused.contains(&format!("{a} is an address of this runtime")), "{refused}");
    // A local hyperty of another domain, the runtime itself, the test's
    // endpoint, the data object: none may be claimed.
    let runtime_address = r.address().to_string();
    // Nor a child of the object (whose answers would go to the object).
    let child = format!("{url}/children/x");
    for (seq, from) in [(2, b.as_str()), (3, runtime_address.as_str()), (4, OBSERVER), (5, url.as_str()), (8, child.as_str())] {
        let refused = forger.post(envelope(seq, "read", from, a.as_str(), Some("{}")), None);
        assert!(refused.contains(&format!("{from} is an address of this runtime")), "{from}: {refused}");
    }
    // A node that vouches for the sender's domain: the envelope must agree.
    let remote = "hyperty://alice.example/remote-peer";
    let refused = forger.post(envelope(6, "read", remote, a.as_str(), Some("{}")), Some("bob.example"));
    assert!(refused.contains("the node vouches for a sender of bob.example"), "{refused}");
    // A remote sender of the same domain (not routed here) is delivered.
    assert_eq!(forger.post(envelope(7, "read", remote, a.as_str(), Some("{}")), Some("alice.example")), "ok");
    let seen = driver.report(&a, |m| m["id"] == 7);
    assert_eq!(seen["from"], remote);
    for id in 1..=6 {
        assert!(!was_reported(&driver, &a, id), "forged message {id} reached a");
    }
    // The object did not move: the reporter's next write makes version 2.
    let written = driver.command(&a, json!({ "op": "update", "url": url, "patch": [{ "op": "add", "path": "/ok", "value": 1 }] }));
    assert_eq!(written, json!({ "version": 2 }));
}

#[test]
fn a_stub_reaches_only_the_addresses_of_its_own_domain() {
    let r = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&r);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(true))
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(true));
    r.deploy(&with_forger(bundle, "bob.example", None).load()).unwrap();
    let a = r.lookup("alice.example", "a").unwrap();
    let b = r.lookup("bob.example", "b").unwrap();
    let mut forger = Forger::new(&r, "bob.example");
    // A sender of bob.example in another runtime, vouched for by the node.
    let asker = "hyperty://bob.example/asker";
    // A request to alice.example's hyperty through bob.example's stub:
    // answered 404 back out through the stub, as if nothing were there.
    let mut request = envelope(101, "read", asker, a.as_str(), Some("{}"));
    request["timeout-ms"] = json!(5000);
    assert_eq!(forger.post(request, Some("bob.example")), "ok");
    let answer = forger.outbound();
    assert_eq!((answer["id"].as_u64(), answer["to"].as_str(), answer["body"]["code"].as_u64()), (Some(101), Some(asker), Some(404)), "{answer}");
    let why = format!("{a} is not an address of bob.example, and it came through the protostub of bob.example");
    assert_eq!(answer["body"]["description"], why, "{answer}");
    // Nor an endpoint of another domain (the test's observer), one-way.
    assert_eq!(forger.post(envelope(102, "update", asker, OBSERVER, Some("{}")), Some("bob.example")), "ok");
    let forged = driver.find(|m| m.from.as_str() == asker, Duration::ZERO);
    assert!(forged.is_none(), "{forged:?}");
    let answer = forger.outbound();
    assert_eq!((answer["id"].as_u64(), answer["body"]["code"].as_u64()), (Some(102), Some(404)), "{answer}");
    // The same request to bob.example's hyperty is delivered and answered.
    let mut request = envelope(103, "read", asker, b.as_str(), Some("{}"));
    request["timeout-ms"] = json!(5000);
    assert_eq!(forger.post(request, Some("bob.example")), "ok");
    assert_eq!(driver.report(&b, |m| m["id"] == 103)["from"], asker);
    let answer = forger.outbound();
    assert_eq!((answer["id"].as_u64(), answer["body"]["code"].as_u64()), (Some(103), Some(200)), "{answer}");
    // a handles messages in order: the forged request never reached it.
    driver.still_works(&a, &b);
    assert!(!was_reported(&driver, &a, 101), "the request through bob.example's stub reached alice.example");
}

#[test]
fn no_write_reaches_a_data_object_through_a_stub_even_once_its_reporter_is_gone() {
    let (r, mut driver, a, mut forger) = alice_and_forger(false);
    let created = driver.command(&a, json!({ "op": "create", "scheme": "room", "data": { "n": 1 } }));
    let url = created["url"].as_str().expect("a object").to_owned();
    // The object outlives its reporter's route; its address is free to claim.
    assert!(r.undeploy("alice.example", "a"));
    let mut forged = envelope(1, "update", a.as_str(), &url, Some(r#"[{"op":"add","path":"/pwned","value":true}]"#));
    forged["timeout-ms"] = json!(5000);
    assert_eq!(forger.post(forged, None), "ok");
    let answer = forger.outbound();
    assert_eq!((answer["id"].as_u64(), answer["body"]["code"].as_u64()), (Some(1), Some(403)), "{answer}");
    assert!(answer["body"]["description"].as_str().unwrap().contains("only its reporter, a hyperty of this runtime"), "{answer}");
}

#[test]
fn a_served_registry_takes_announcements_only_from_who_may_make_them() {
    let r = Runtime::new(RuntimeConfig {
        cache_dir: cache_dir(),
        request_timeout: Duration::from_secs(10),
        serve_registries: vec!["bob.example".into()],
        ..RuntimeConfig::default()
    })
    .unwrap();
    // b reports to it.
    let _observer = Driver::new(&r);
    let bundle = TestBundle::new()
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(false))
        .idp_verifier(IDP, IDP_KEY, &["bob.example"])
        .domain("bob.example", json!({ "require-identity": true }));
    r.deploy(&with_forger(bundle, "bob.example", Some(assertion("forger@idp.example"))).load()).unwrap();
    let b = r.lookup("bob.example", "b").unwrap();
    let mut forger = Forger::new(&r, "bob.example");
    let registry = "domain://registry.bob.example";
    let announce = |seq: u64, from: &str, address: &str, name: &str, user: Option<&str>, asserted: Option<&str>| {
        let registration = json!({ "address": address, "kind": "hyperty", "name": name, "domain": "bob.example",
            "user": user, "hyperty-types": [], "schemes": [], "status": "live" });
        let mut e = envelope(seq, "create", from, registry, Some(&registration.to_string()));
        e["body"]["resource"] = json!(address);
        if let Some(user) = asserted {
            e["assertion"] = assertion(user);
        }
        e
    };
    let other = "runtime://localhost/another-runtime";
    let mallory = "mallory@idp.example";
    // No assertion where bob.example requires one: 401 on the path.
    assert_eq!(forger.post(announce(1, other, "hyperty://bob.example/fake-1", "fake-1", None, None), None), "ok");
    // Asserted as mallory, announcing carol's hyperty.
    let carols = announce(2, other, "hyperty://bob.example/fake-2", "fake-2", Some("carol@idp.example"), Some(mallory));
    assert_eq!(forger.post(carols, None), "ok");
    // Asserted, but announcing an address that lives here.
    assert_eq!(forger.post(announce(3, other, b.as_str(), "fake-3", Some(mallory), Some(mallory)), None), "ok");
    // As this runtime itself.
    let own = r.address().to_string();
    let refused = forger.post(announce(4, &own, "hyperty://bob.example/fake-4", "fake-4", Some(mallory), Some(mallory)), None);
    assert!(refused.contains("is an address of this runtime"), "{refused}");
    // As itself, with its user's assertion: taken.
    let real = announce(5, other, "hyperty://bob.example/mallorys", "mallorys", Some(mallory), Some(mallory));
    assert_eq!(forger.post(real, None), "ok");
    let by_domain = Query { domain: Some("bob.example".into()), ..Default::default() };
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !r.discover(&by_domain).iter().any(|r| r.name == "mallorys") {
        assert!(std::time::Instant::now() < until, "the legitimate announcement was not taken");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The registry handles announcements in order: the forged ones were refused.
    let listed: Vec<(String, String)> = r.discover(&by_domain).into_iter().map(|r| (r.name, r.address.to_string())).collect();
    assert!(listed.iter().all(|(name, _)| !name.starts_with("fake")), "{listed:?}");
    assert_eq!(listed.iter().filter(|(_, address)| address == b.as_str()).count(), 1, "{listed:?}");
}

#[test]
fn responses_leave_through_a_stub_only_to_answer_a_request_that_came_through_one() {
    let (_r, mut driver, a, mut forger) = alice_and_forger(true);
    // A sender of alice.example in another runtime.
    let asker = "hyperty://alice.example/asker";
    // a answers requests nobody made, through `reply` and as plain sends.
    for id in 1000..1020 {
        let request = json!({ "id": id, "type": "read", "from": asker, "to": a.as_str(), "value": "{}" });
        assert_eq!(driver.command(&a, json!({ "op": "reply", "message": request })), json!({ "ok": true }));
        // (Refused at the import or dropped on the path: either way nothing leaves.)
        let response = json!({ "id": id + 1000, "type": "response", "to": asker, "code": 200 });
        driver.command(&a, json!({ "op": "send", "message": response }));
    }
    // A real request through the stub is answered, once.
    for id in [77, 78] {
        let mut request = envelope(id, "read", asker, a.as_str(), Some(&json!({ "n": id }).to_string()));
        request["timeout-ms"] = json!(5000);
        assert_eq!(forger.post(request.clone(), None), "ok");
        let seen = driver.report(&a, |m| m["id"] == id);
        assert_eq!(driver.command(&a, json!({ "op": "reply", "message": seen })), json!({ "ok": true }), "a second answer");
        let answer = forger.outbound();
        assert_eq!((answer["type"].as_str(), answer["id"].as_u64()), (Some("response"), Some(id)), "{answer}");
        assert_eq!(answer["body"]["value"], json!({ "n": id }).to_string());
    }
    // Nothing else went out: the queue carried the two answers in order,
    // none of the fabricated ones nor the repeated replies before them.
    let more = forger.carried_more();
    assert!(more.is_none(), "{more:?}");
}

/// nats-server users: each runtime publishes only as its own domain and
/// reads only its own domain's subjects; mallory may publish as
/// mallory.example only.
const PERMISSIONS: &str = r#"
  users = [
    { user: "alice-rt", password: "alice-pw", permissions: {
        publish: { allow: ["rethink.*.*.alice_example", "_INBOX.>"] },
        subscribe: { allow: ["rethink.alice_example.>", "_INBOX.>"] } } },
    { user: "bob-rt", password: "bob-pw", permissions: {
        publish: { allow: ["rethink.*.*.bob_example", "_INBOX.>"] },
        subscribe: { allow: ["rethink.bob_example.>", "_INBOX.>"] } } },
    { user: "mallory", password: "mallory-pw", permissions: {
        publish: { allow: ["rethink.*.*.mallory_example"] },
        subscribe: { allow: ["_INBOX.>"] } } }
  ]
"#;

/// A runtime of `domain` hosting `bundle` with NATS stubs for alice.example
/// and bob.example, logged in as `user`.
fn runtime_of(domain: &str, bundle: TestBundle, nats: &Nats, user: &str, pass: &str) -> (Runtime, TestBundle) {
    let r = Runtime::new(RuntimeConfig {
        cache_dir: cache_dir(),
        domain: domain.into(),
        request_timeout: Duration::from_secs(10),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let credentials = json!({ "config": { "user": user, "pass": pass } });
    let bundle = bundle
        .protostub("alice.example", &[nats.endpoint()], credentials.clone())
        .protostub("bob.example", &[nats.endpoint()], credentials);
    r.deploy(&bundle.load()).unwrap();
    (r, bundle)
}

/// a requests b until the answer is 200 (stubs connect asynchronously).
fn answered(driver: &mut Driver, a: &Address, b: &Address) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let id = driver.fresh_id();
        let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": b.to_string(), "value": "{}" }, "timeout_ms": 3000 });
        assert_eq!(driver.command(a, cmd), json!({ "ok": true }));
        let answer = driver.report(a, |m| m["type"] == "response" && m["id"] == id);
        if answer["code"] == 200 {
            return;
        }
        assert!(std::time::Instant::now() < until, "no answer through NATS: {answer}");
    }
}

#[test]
fn the_nodes_permissions_decide_who_publishes_as_a_domain() {
    let nats = Nats::with_config(&format!("authorization {{\n{PERMISSIONS}\n}}\n"));
    let b1 = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false));
    let b2 = TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), puppet_config(true));
    let (r1, _b1) = runtime_of("alice.example", b1, &nats, "alice-rt", "alice-pw");
    let (r2, _b2) = runtime_of("bob.example", b2, &nats, "bob-rt", "bob-pw");
    let mut driver = Driver::new(&r1);
    let a = r1.lookup("alice.example", "a").unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();
    // The legitimate path: alice's runtime publishes as alice.example.
    answered(&mut driver, &a, &b);
    // mallory publishing as alice.example is refused by the node itself.
    let mut mallory = NatsClient::connect(nats.port, Some(("mallory", "mallory-pw")));
    let forged = json!({ "v": 1, "origin": "mallory", "seq": 1, "id": 1, "type": "read", "from": a.as_str(),
        "to": b.as_str(), "body": {} });
    let refused = mallory.publish(&nats_subject("bob.example", b.as_str(), "alice.example"), None, &forged.to_string());
    let refused = refused.expect_err("the node let mallory publish as alice.example");
    assert!(refused.contains("Permissions Violation for Publish"), "{refused}");
    // As its own domain the node lets it publish, and bob's runtime refuses
    // an envelope claiming a sender of another domain.
    mallory.subscribe("_INBOX.mallory.*").unwrap();
    let subject = nats_subject("bob.example", b.as_str(), "mallory.example");
    mallory.publish(&subject, Some("_INBOX.mallory.1"), &forged.to_string()).expect("mallory publishes as itself");
    let answer = mallory.next_msg().expect("the receiving stub answers");
    assert!(answer.payload.contains("the node vouches for a sender of mallory.example"), "{answer:?}");
    // And the legitimate path still works.
    answered(&mut driver, &a, &b);
}

#[test]
fn a_runtime_announces_its_users_hyperties_with_their_assertions() {
    let nats = Nats::start();
    let servers = [nats.endpoint()];
    // Runtime 1 serves bob.example's registry; bob.example requires identity
    // there (it holds only the IdP's public key).
    let r1 = Runtime::new(RuntimeConfig {
        cache_dir: cache_dir(),
        request_timeout: Duration::from_secs(10),
        serve_registries: vec!["bob.example".into()],
        ..RuntimeConfig::default()
    })
    .unwrap();
    let b1 = TestBundle::new()
        .hyperty("bob.example", "keeper", &guest("puppet"), puppet_config(false))
        .idp_verifier(IDP, IDP_KEY, &["bob.example"])
        .domain("bob.example", json!({ "require-identity": true }))
        .protostub("bob.example", &servers, json!({}));
    r1.deploy(&b1.load()).unwrap();
    // Runtime 2 hosts bob's hyperty and one bound to nobody.
    let r2 = runtime(Duration::from_secs(10));
    let b2 = TestBundle::new()
        .hyperty("bob.example", "anonymous", &guest("puppet"), puppet_config(false))
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(false))
        .user("bob.example", "b", "bob@idp.example")
        .idp(IDP, IDP_KEY, &["bob.example"])
        .protostub("bob.example", &servers, json!({}));
    r2.deploy(&b2.load()).unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();
    // b's registration arrives with bob's assertion and is taken.
    let by_domain = Query { domain: Some("bob.example".into()), ..Default::default() };
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let found = loop {
        let found = r1.discover(&by_domain);
        if found.iter().any(|r| r.address == b && r.status == hyperty_host::registry::Status::Live) {
            break found;
        }
        assert!(std::time::Instant::now() < until, "b was never announced to runtime 1: {found:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let b_entry = found.iter().find(|r| r.address == b).unwrap();
    assert_eq!(b_entry.user.as_deref(), Some("bob@idp.example"));
    // The hyperty nobody vouches for was announced first, and refused.
    assert!(found.iter().all(|r| r.name != "anonymous"), "{found:?}");
}

/// [`PERMISSIONS`]' alice-rt and bob-rt, with alice-rt refused to publish
/// to carol.example's subjects, and carol-rt: a runtime user of
/// carol.example, which (as every runtime user, for acknowledgements) may
/// publish and subscribe on `_INBOX.>`.
const PERMISSIONS_WITH_CAROL: &str = r#"
  users = [
    { user: "alice-rt", password: "alice-pw", permissions: {
        publish: { allow: ["rethink.*.*.alice_example", "_INBOX.>"], deny: ["rethink.carol_example.>"] },
        subscribe: { allow: ["rethink.alice_example.>", "_INBOX.>"] } } },
    { user: "bob-rt", password: "bob-pw", permissions: {
        publish: { allow: ["rethink.*.*.bob_example", "_INBOX.>"] },
        subscribe: { allow: ["rethink.bob_example.>", "_INBOX.>"] } } },
    { user: "carol-rt", password: "carol-pw", permissions: {
        publish: { allow: ["rethink.*.*.carol_example", "_INBOX.>"] },
        subscribe: { allow: ["rethink.carol_example.>", "_INBOX.>"] } } }
  ]
"#;

#[test]
fn a_publish_the_node_forbids_is_answered_403_at_once_and_the_queue_moves_on() {
    let nats = Nats::with_config(&format!("authorization {{\n{PERMISSIONS_WITH_CAROL}\n}}\n"));
    let b1 = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false)).protostub(
        "carol.example",
        &[nats.endpoint()],
        json!({ "config": { "user": "alice-rt", "pass": "alice-pw" } }),
    );
    let b2 = TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), puppet_config(true));
    let (r1, _b1) = runtime_of("alice.example", b1, &nats, "alice-rt", "alice-pw");
    let (r2, _b2) = runtime_of("bob.example", b2, &nats, "bob-rt", "bob-pw");
    let mut events = r1.events();
    let mut driver = Driver::new(&r1);
    let a = r1.lookup("alice.example", "a").unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();
    answered(&mut driver, &a, &b);
    // Three requests to carol.example, whose subjects the node refuses
    // alice-rt, each answered 403 long before its timeout (the stub never
    // offers them again), then one to bob.example: 200.
    for _ in 0..3 {
        let id = driver.fresh_id();
        let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": "hyperty://carol.example/c", "value": "{}" },
            "timeout_ms": 120_000 });
        assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
        let refused = driver.report(&a, |m| m["type"] == "response" && m["id"] == id);
        assert_eq!(refused["code"], 403, "{refused}");
        let why = refused["description"].as_str().unwrap_or_default();
        assert!(
            why.contains("the protostub of carol.example cannot carry it") && why.contains("Permissions Violation for Publish"),
            "{why}"
        );
    }
    answered(&mut driver, &a, &b);
    assert_eq!(r1.pending_requests(), 0, "the refused requests are no longer pending");
    // The node kept the connection: the stub was never disconnected.
    let mut statuses = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let (true, hyperty_host::EventKind::StubStatus { status, detail }) = (e.hyperty == "protostub carol.example", e.kind) {
            statuses.push((status, detail));
        }
    }
    assert!(statuses.iter().any(|(s, _)| s == "live"), "{statuses:?}");
    assert!(statuses.iter().all(|(s, _)| s != "disconnected"), "{statuses:?}");
}

#[test]
fn an_acknowledgement_forged_by_another_node_user_does_not_drop_a_message() {
    let nats = Nats::with_config(&format!("authorization {{\n{PERMISSIONS_WITH_CAROL}\n}}\n"));
    const LATE: &str = "hyperty://bob.example/late";
    // Something subscribed as bob-rt takes the message and never answers:
    // it stays in flight in alice's stub (for its 3 s ack timeout).
    let mut silent = NatsClient::connect(nats.port, Some(("bob-rt", "bob-pw")));
    silent.subscribe(&nats_subject("bob.example", LATE, "*")).unwrap();
    let r1 = runtime(Duration::from_secs(60));
    let config = json!({ "config": { "user": "alice-rt", "pass": "alice-pw", "ack-timeout-ms": 3000 } });
    r1.deploy(&TestBundle::new().protostub("bob.example", &[nats.endpoint()], config).load()).unwrap();
    let (r2, _b2) = runtime_of("bob.example", TestBundle::new(), &nats, "bob-rt", "bob-pw");
    let sender = r1.endpoint("hyperty://alice.example/sender", 16).unwrap();
    let message = Message::new(7, MessageType::Update, sender.address().clone(), Address::parse(LATE).unwrap(), Some("{}".into()));
    sender.send(message).unwrap();
    let seen = silent.next_msg().expect("the message is published");
    // carol-rt, another runtime user, knows the inbox and the sequence
    // number (as anyone who reads `_INBOX.>` or guesses), not the tag.
    let reply = seen.reply.expect("published with a reply subject");
    let (inbox, token) = reply.rsplit_once('.').unwrap();
    let seq = token.split('-').next().unwrap();
    let guessed = format!("{seq}-{}", "0".repeat(32));
    let mut carol = NatsClient::connect(nats.port, Some(("carol-rt", "carol-pw")));
    for (subject, payload) in [
        (format!("{inbox}.ok"), format!("ok {seq} {guessed}")),
        (format!("{inbox}.{seq}"), "refused: forged".to_owned()),
        (format!("{inbox}.{guessed}"), "refused: forged".to_owned()),
    ] {
        carol.publish(&subject, None, &payload).expect("the node lets carol-rt publish on _INBOX.>");
    }
    drop(silent);
    // bob's runtime listens for the address now: the message is offered
    // again after the ack timeout, and arrives.
    let late = r2.endpoint(LATE, 16).unwrap();
    let arrived = late.recv_timeout(Duration::from_secs(60)).expect("the message was dropped by the forged acknowledgements");
    assert_eq!((arrived.id, arrived.kind), (7, MessageType::Update), "{arrived:?}");
}
