//! reTHINK behaviours applications relied on (issue 13: bus, registry,
//! syncher), each driven the way a user would: puppet hyperties built from
//! `guests/`, the runtime's bus, an embedder's endpoints.
//!
//! Bus: provisional (1xx) responses keep their request pending; a 408
//! carries its request; a response denied by policy is answered 403 to the
//! requester at once and its responder is told. Registry: a bundle entry
//! may ask for its exact address. Syncher: subscribers add children they
//! own; a non-subscriber's read asks the reporter; the reporter hears who
//! unsubscribed; an invitation carries the object's state.

use std::sync::Arc;
use std::time::Duration;

use hyperty_host::{
    Address, Decision, EnforcementPoint, Message, MessageType, Parties, PolicyDecisionPoint, Runtime, RuntimeConfig,
};
use hyperty_tests::rethink::{ask, create};
use hyperty_tests::*;
use serde_json::{Value, json};

/// `a` sends `b` a `read` request `id` with `value`, `resource` and `timeout_ms`.
fn request(driver: &mut Driver, a: &Address, b: &Address, id: u64, value: Value, timeout_ms: u32) {
    let message = json!({ "id": id, "type": "read", "to": b.to_string(), "resource": "res", "value": value.to_string() });
    assert_eq!(driver.command(a, json!({ "op": "request", "message": message, "timeout_ms": timeout_ms })), json!({ "ok": true }));
}

/// Has `b` answer the request `r` (as b reported it) with `code`.
fn reply(driver: &mut Driver, b: &Address, r: &Value, code: u16) {
    let message = json!({ "id": r["id"], "type": r["type"], "from": r["from"], "to": r["to"], "value": r["value"] });
    assert_eq!(driver.command(b, json!({ "op": "reply", "message": message, "code": code })), json!({ "ok": true }));
}

#[test]
fn a_provisional_response_keeps_the_request_and_its_timer_pending_until_the_first_final_one() {
    let runtime = runtime(Duration::from_secs(60));
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, false);
    request(&mut driver, &a, &b, 7, json!({ "n": 1 }), 60_000);
    let at_b = driver.report(&b, |m| m["type"] == "read" && m["id"] == 7);
    for code in [100, 101] {
        reply(&mut driver, &b, &at_b, code);
        let at_a = driver.report(&a, |m| m["type"] == "response" && m["id"] == 7);
        assert_eq!(at_a["code"], code, "{at_a}");
        assert_eq!(runtime.pending_requests(), 1, "a 1xx leaves the request pending");
    }
    reply(&mut driver, &b, &at_b, 200);
    let at_a = driver.report(&a, |m| m["type"] == "response" && m["id"] == 7);
    assert_eq!((&at_a["code"], &at_a["value"]), (&json!(200), &json!(r#"{"n":1}"#)), "{at_a}");
    assert_eq!(runtime.pending_requests(), 0, "the first final response closes it");
    // A second final response answers nothing: a hears nothing more.
    reply(&mut driver, &b, &at_b, 404);
    let late = driver.before_marker(&a);
    assert!(late.iter().all(|m| reported(m)["type"] != "response"), "{late:?}");
    // At most 16 provisional responses a request: a responder cannot flood
    // through `reply`, which has no rate limit. The final one still closes it.
    request(&mut driver, &a, &b, 13, json!(null), 60_000);
    let at_b = driver.report(&b, |m| m["type"] == "read" && m["id"] == 13);
    for _ in 0..20 {
        reply(&mut driver, &b, &at_b, 100);
    }
    let seen = driver.before_marker(&a);
    assert_eq!(seen.iter().filter(|m| reported(m)["type"] == "response" && reported(m)["id"] == 13).count(), 16);
    reply(&mut driver, &b, &at_b, 200);
    assert_eq!(driver.report(&a, |m| m["type"] == "response" && m["id"] == 13)["code"], 200);
    // The timer keeps running after a 1xx: with no final answer, a 408.
    request(&mut driver, &a, &b, 8, json!(null), 300);
    let at_b = driver.report(&b, |m| m["type"] == "read" && m["id"] == 8);
    reply(&mut driver, &b, &at_b, 100);
    assert_eq!(driver.report(&a, |m| m["type"] == "response" && m["id"] == 8)["code"], 100);
    assert_eq!(driver.report(&a, |m| m["type"] == "response" && m["id"] == 8)["code"], 408);
    assert_eq!(runtime.pending_requests(), 0);
}

#[test]
fn a_408_carries_the_request_it_answers() {
    let runtime = runtime(Duration::from_secs(60));
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, false);
    request(&mut driver, &a, &b, 9, json!({ "n": [1, "two"] }), 200);
    let timeout = driver.report(&a, |m| m["type"] == "response" && m["id"] == 9);
    assert_eq!(timeout["code"], 408, "{timeout}");
    let carried: Value = serde_json::from_str(timeout["value"].as_str().expect("the 408 has a value")).unwrap();
    let expected = json!({ "id": 9, "type": "read", "from": a.as_str(), "to": b.as_str(),
        "body": { "resource": "res", "value": r#"{"n":[1,"two"]}"# } });
    assert_eq!(carried, expected);
    // A value larger than the host keeps for a 408 (16 KiB): its length instead.
    let pad = 16 * 1024;
    let message = json!({ "id": 10, "type": "update", "to": b.to_string() });
    assert_eq!(driver.command(&a, json!({ "op": "request", "message": message, "timeout_ms": 200, "pad": pad })), json!({ "ok": true }));
    let timeout = driver.report(&a, |m| m["type"] == "response" && m["id"] == 10);
    let carried: Value = serde_json::from_str(timeout["value"].as_str().unwrap()).unwrap();
    assert_eq!(carried["type"], "update");
    assert_eq!(carried["body"], json!({ "resource": null, "value-bytes": pad + 2 }), "{carried}");
}

#[test]
fn a_408_past_the_message_size_limit_leaves_the_value_out() {
    let config = RuntimeConfig { cache_dir: cache_dir(), max_message_bytes: 2048, ..RuntimeConfig::default() };
    let runtime = Runtime::new(config).unwrap();
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, false);
    // 1,802 bytes of value fit in a request; inside the 408, with the
    // addresses twice and the description, they would not.
    let message = json!({ "id": 11, "type": "read", "to": b.to_string() });
    assert_eq!(driver.command(&a, json!({ "op": "request", "message": message, "timeout_ms": 200, "pad": 1800 })), json!({ "ok": true }));
    let timeout = driver.report(&a, |m| m["type"] == "response" && m["id"] == 11);
    assert_eq!(timeout["code"], 408);
    let carried: Value = serde_json::from_str(timeout["value"].as_str().unwrap()).unwrap();
    assert_eq!(carried["body"]["value-bytes"], 1802, "{carried}");
    assert_eq!(carried["to"], b.as_str());
}

/// Denies every response from bob.example to alice.example.
struct NoAnswersToAlice;

impl PolicyDecisionPoint for NoAnswersToAlice {
    fn decide(&self, _: EnforcementPoint, _: &str, m: &Message, _: Parties<'_>) -> Decision {
        if m.kind == MessageType::Response && m.from.domain() == "bob.example" && m.to.domain() == "alice.example" {
            return Decision::Deny { policies: vec!["no-answers".into()], reason: "bob may not answer alice".into() };
        }
        Decision::Permit
    }
}

#[test]
fn a_response_denied_by_policy_is_answered_403_at_once_and_its_responder_is_told() {
    // A request timeout of 60 s: the 403 must not wait for it.
    let config =
        RuntimeConfig { cache_dir: cache_dir(), request_timeout: Duration::from_secs(60), custom_policy: Some(Arc::new(NoAnswersToAlice)), ..RuntimeConfig::default() };
    let runtime = Runtime::new(config).unwrap();
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, true);
    request(&mut driver, &a, &b, 12, json!({ "n": 1 }), 60_000);
    let at_a = driver.report(&a, |m| m["type"] == "response" && m["id"] == 12);
    assert_eq!((&at_a["code"], &at_a["from"]), (&json!(403), &json!(b.as_str())), "{at_a}");
    let why = at_a["description"].as_str().unwrap();
    assert!(why.starts_with("the response was refused: denied at the") && why.contains("[no-answers]"), "{why}");
    assert!(at_a["value"].is_null(), "nothing of the refused response reaches a: {at_a}");
    // b learns its response was refused: a response of the same code and id.
    let at_b = driver.report(&b, |m| m["type"] == "response" && m["id"] == 12);
    assert_eq!((&at_b["code"], &at_b["from"]), (&json!(403), &json!(a.as_str())), "{at_b}");
    assert!(at_b["description"].as_str().unwrap().starts_with(&format!("your response to {a} was refused: denied at the")), "{at_b}");
    assert!(runtime.wait_idle(Duration::from_secs(5)));
    assert_eq!(runtime.pending_requests(), 0, "nothing left waiting for a 408");
}

fn address_bundle(address: &str) -> TestBundle {
    TestBundle::new().hyperty("alice.example", "fixed", &guest("puppet"), puppet_config(true)).set("alice.example", "fixed", "address", json!(address))
}

#[test]
fn a_bundle_hyperty_gets_the_address_it_asks_for_in_its_own_domain_when_free() {
    let runtime = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&runtime);
    let bundle = address_bundle("hyperty://alice.example/the-one");
    runtime.deploy(&bundle.load()).unwrap();
    let fixed = Address::parse("hyperty://alice.example/the-one").unwrap();
    assert_eq!(runtime.lookup("alice.example", "fixed"), Some(fixed.clone()));
    assert_eq!(driver.ask(&fixed, json!({ "op": "lookup", "domain": "alice.example", "name": "fixed" }))
        .body.value.map(|v| serde_json::from_str::<Value>(&v).unwrap()), Some(json!({ "address": fixed.as_str() })));
    // Taken: by that hyperty, and by an endpoint. The running one goes on.
    let again = TestBundle::new()
        .hyperty("alice.example", "other", &guest("puppet"), puppet_config(true))
        .set("alice.example", "other", "address", json!("hyperty://alice.example/the-one"));
    let _endpoint = runtime.endpoint("hyperty://alice.example/an-endpoint", 4).unwrap();
    let at_endpoint = TestBundle::new()
        .hyperty("alice.example", "third", &guest("puppet"), puppet_config(true))
        .set("alice.example", "third", "address", json!("hyperty://alice.example/an-endpoint"));
    for (taken, name, address) in [(&again, "other", "the-one"), (&at_endpoint, "third", "an-endpoint")] {
        let path = taken.write();
        let e = runtime.deploy(&hyperty_host::Bundle::load(&path).unwrap()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&format!("{}", path.display())), "names the file: {text}");
        assert!(text.contains(r#"domains."alice.example".hyperties[0].address: hyperty://alice.example/"#), "names the field: {text}");
        assert!(text.contains(&format!("hyperty://alice.example/{address} is taken")), "{text}");
        assert_eq!(runtime.lookup("alice.example", name), None);
    }
    assert_eq!(driver.ask(&fixed, json!({ "op": "lookup", "domain": "alice.example", "name": "fixed" })).body.code, Some(200));
    // Undeployed, the address is free again.
    assert!(runtime.undeploy("alice.example", "fixed"));
    runtime.deploy(&again.load()).unwrap();
    assert_eq!(runtime.lookup("alice.example", "other"), Some(fixed));
}

#[test]
fn an_address_of_another_domain_or_asked_twice_is_refused_naming_the_field_and_the_file() {
    for (address, why) in [
        ("hyperty://bob.example/x", "hyperty://bob.example/x is not an address of this domain"),
        ("comm://alice.example/x", "comm://alice.example/x is not an address of this domain"),
        ("hyperty://alice.example/", "names no hyperty"),
        ("hyperty://alice.example/a b", "is not allowed in an address path"),
    ] {
        let bundle = address_bundle(address);
        let path = bundle.write();
        let e = hyperty_host::Bundle::load(&path).unwrap_err().to_string();
        assert!(e.contains(&format!("{}:", path.display())) && e.contains(r#"domains."alice.example".hyperties[0].address: "#), "{e}");
        assert!(e.contains(why), "{address}: {e}");
    }
    let twice = TestBundle::new()
        .hyperty("alice.example", "one", &guest("puppet"), puppet_config(true))
        .hyperty("alice.example", "two", &guest("puppet"), puppet_config(true))
        .set("alice.example", "one", "address", json!("hyperty://alice.example/x"))
        .set("alice.example", "two", "address", json!("hyperty://alice.example/x"));
    let e = hyperty_host::Bundle::load(twice.write()).unwrap_err().to_string();
    assert!(e.contains(r#"hyperties[1].address: hyperty://alice.example/x is taken: alice.example/one asks for it too"#), "{e}");
    let kept = address_bundle("hyperty://alice.example/x").set("alice.example", "fixed", "keep-address", json!(true));
    let e = hyperty_host::Bundle::load(kept.write()).unwrap_err().to_string();
    assert!(e.contains("leave out keep-address"), "{e}");
}

/// alice.example/reporter (echoing, so it accepts what it is asked unless
/// `picky`) and bob.example/observer, reporting to the driver.
fn world(picky: bool, timeout: Duration) -> (Runtime, Driver, Address, Address, TestBundle) {
    let runtime = runtime(timeout);
    let driver = Driver::new(&runtime);
    let reporter_config = json!({ "observer": OBSERVER, "echo": true, "reject_subscribe": picky });
    let bundle = TestBundle::new()
        .hyperty("alice.example", "reporter", &guest("puppet"), reporter_config)
        .hyperty("bob.example", "observer", &guest("puppet"), puppet_config(false))
        .domain("alice.example", json!({ "limits": { "object-children": 3 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let reporter = runtime.lookup("alice.example", "reporter").unwrap();
    let observer = runtime.lookup("bob.example", "observer").unwrap();
    (runtime, driver, reporter, observer, bundle)
}

/// The next delta about `resource` a puppet reported.
fn delta(driver: &Driver, puppet: &Address, url: &str, kind: &str, resource: &str) -> Value {
    let m = driver.report(puppet, |m| m["from"] == url && m["type"] == kind && m["resource"] == resource);
    serde_json::from_str(m["value"].as_str().unwrap()).unwrap()
}

#[test]
fn subscribers_add_children_their_creators_own_and_everyone_sees_them_in_one_stream() {
    let (runtime, mut driver, reporter, observer, _bundle) = world(false, Duration::from_secs(10));
    let url = create(&mut driver, &reporter, json!({ "title": "chat" }));
    // Not yet a subscriber: no child, by the import or by message.
    let answer = driver.command(&observer, json!({ "op": "set-child", "url": url, "name": "m1", "data": { "text": "hi" } }));
    assert!(answer["error"].as_str().unwrap().starts_with("forbidden: only its reporter"), "{answer}");
    let child = format!("{url}/children/m1");
    assert_eq!(ask(&mut driver, &observer, "create", &child, Some(json!({ "text": "hi" })))["code"], 403);
    assert_eq!(ask(&mut driver, &observer, "subscribe", &url, None)["code"], 200);
    // A second subscriber: an embedder's endpoint standing for a hyperty.
    let carol = runtime.endpoint("hyperty://carol.example/carol", 64).unwrap();
    carol.request(Message::new(1, MessageType::Subscribe, carol.address().clone(), Address::parse(&url).unwrap(), None), None).unwrap();
    assert_eq!(carol.recv_timeout(Duration::from_secs(10)).unwrap().body.code, Some(200));
    let carol_gets = |kind: MessageType, resource: &str| -> Value {
        let m = carol.recv_timeout(Duration::from_secs(10)).expect("a delta for carol");
        assert_eq!((m.kind, m.from.as_str(), m.body.resource.as_deref()), (kind, url.as_str(), Some(resource)), "{m:?}");
        serde_json::from_str(m.body.value.as_deref().unwrap()).unwrap()
    };
    // The observer adds a child by the import: version 2, its creator named
    // to the reporter, to itself and to carol.
    assert_eq!(driver.command(&observer, json!({ "op": "set-child", "url": url, "name": "m1", "data": { "text": "hi" } })), json!({ "version": 2 }));
    let expected = json!({ "version": 2, "data": { "text": "hi" }, "creator": observer.as_str() });
    assert_eq!(delta(&driver, &reporter, &url, "create", &child), expected);
    assert_eq!(delta(&driver, &observer, &url, "create", &child), expected);
    assert_eq!(carol_gets(MessageType::Create, &child), expected);
    // Carol adds one by message, and updates it; the observer may not.
    let carols = format!("{url}/children/c1");
    let to = Address::parse(&carols).unwrap();
    carol.request(Message::new(2, MessageType::Create, carol.address().clone(), to.clone(), Some(r#"{"text":"yo"}"#.into())), None).unwrap();
    let created = carol_gets(MessageType::Create, &carols);
    assert_eq!(created, json!({ "version": 3, "data": { "text": "yo" }, "creator": "hyperty://carol.example/carol" }));
    let answer = carol.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!((answer.id, answer.body.code, answer.body.value.as_deref()), (2, Some(200), Some(r#"{"version":3}"#)), "{answer:?}");
    assert_eq!(delta(&driver, &reporter, &url, "create", &carols)["creator"], "hyperty://carol.example/carol");
    let denied = ask(&mut driver, &observer, "update", &carols, Some(json!({ "text": "mine now" })));
    assert_eq!(denied["code"], 403, "{denied}");
    assert!(denied["description"].as_str().unwrap().contains("was created by hyperty://carol.example/carol"), "{denied}");
    let answer = driver.command(&observer, json!({ "op": "remove-child", "url": url, "name": "c1" }));
    assert!(answer["error"].as_str().unwrap().starts_with("forbidden"), "{answer}");
    // The reporter may remove any child, but not rewrite an observer's.
    let answer = driver.command(&reporter, json!({ "op": "set-child", "url": url, "name": "m1", "data": "edited" }));
    assert!(answer["error"].as_str().unwrap().starts_with("forbidden"), "{answer}");
    assert_eq!(driver.command(&observer, json!({ "op": "set-child", "url": url, "name": "m1", "data": { "text": "hi!" } })), json!({ "version": 4 }));
    assert_eq!(carol_gets(MessageType::Update, &child)["creator"], observer.as_str());
    assert_eq!(driver.command(&reporter, json!({ "op": "remove-child", "url": url, "name": "c1" })), json!({ "version": 5 }));
    assert_eq!(carol_gets(MessageType::Delete, &carols), json!({ "version": 5, "creator": "hyperty://carol.example/carol" }));
    // Its creator deletes its own by message.
    assert_eq!(ask(&mut driver, &observer, "delete", &child, None)["code"], 200);
    assert_eq!(carol_gets(MessageType::Delete, &child)["version"], 6);
    // The versions made one stream: the observer's replica has it all.
    let kept = driver.command(&observer, json!({ "op": "replica", "url": url }));
    assert_eq!((&kept["version"], &kept["children"]), (&json!(6), &json!({})), "{kept}");
    // Children are charged to the object: object-children = 3 for the
    // reporter's domain, whoever creates them.
    for n in 0..3 {
        assert!(driver.command(&observer, json!({ "op": "set-child", "url": url, "name": format!("n{n}"), "data": n }))["version"].is_u64());
    }
    let answer = driver.command(&observer, json!({ "op": "set-child", "url": url, "name": "n3", "data": 3 }));
    assert!(answer["error"].as_str().unwrap().starts_with(&format!("limit: {url} has 3 children (object-children = 3)")), "{answer}");
    let by_message = ask(&mut driver, &observer, "create", &format!("{url}/children/n3"), Some(json!(3)));
    assert_eq!(by_message["code"], 413, "{by_message}");
    assert!(by_message["description"].as_str().unwrap().contains("object-children = 3"), "{by_message}");
    // The state names who created what.
    let state = ask(&mut driver, &observer, "read", &url, None);
    let state: Value = serde_json::from_str(state["value"].as_str().unwrap()).unwrap();
    assert_eq!(state["creators"]["n0"], observer.as_str(), "{state}");
}

#[test]
fn a_read_from_a_non_subscriber_asks_the_reporter() {
    // Accepted: 200 with the state, and no subscription comes of it.
    let (_runtime, mut driver, reporter, observer, _bundle) = world(false, Duration::from_secs(10));
    let url = create(&mut driver, &reporter, json!({ "n": 1 }));
    let answer = ask(&mut driver, &observer, "read", &url, None);
    assert_eq!(answer["code"], 200, "{answer}");
    assert_eq!(serde_json::from_str::<Value>(answer["value"].as_str().unwrap()).unwrap()["data"], json!({ "n": 1 }));
    let asked = driver.report(&reporter, |m| m["type"] == "read" && m["from"] == url);
    assert_eq!(asked["value"], json!({ "observer": observer.as_str() }).to_string());
    driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "replace", "path": "/n", "value": 2 }] }));
    let seen = driver.before_marker(&observer);
    assert!(seen.iter().all(|m| reported(m)["type"] != "update"), "a reader is not a subscriber: {seen:?}");
    // Refused: 401 naming the reporter's answer.
    let (_runtime, mut driver, reporter, observer, _bundle) = world(true, Duration::from_secs(10));
    let url = create(&mut driver, &reporter, json!({ "n": 1 }));
    let answer = ask(&mut driver, &observer, "read", &url, None);
    assert_eq!(answer["code"], 401, "{answer}");
    assert!(answer["description"].as_str().unwrap().contains("did not accept the read (it answered 403)"), "{answer}");
}

#[test]
fn a_read_the_reporter_leaves_unanswered_is_401() {
    let runtime = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, false);
    let url = create(&mut driver, &a, json!({ "n": 1 }));
    let id = driver.fresh_id();
    let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": url }, "timeout_ms": 60_000 });
    assert_eq!(driver.command(&b, cmd), json!({ "ok": true }));
    // The reporter has 10 s to answer.
    let answer = driver
        .find(|m| m.kind == MessageType::Forward && m.from == b && reported(m)["id"] == id, Duration::from_secs(30))
        .expect("an answer after the reporter's 10 s");
    let answer = reported(&answer);
    assert_eq!(answer["code"], 401, "{answer}");
    assert!(answer["description"].as_str().unwrap().contains("(it answered 408"), "{answer}");
}

#[test]
fn a_subscription_waiting_on_the_reporter_is_answered_404_when_it_deletes_the_object() {
    let runtime = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, false);
    let url = create(&mut driver, &a, json!({ "n": 1 }));
    let id = driver.fresh_id();
    let cmd = json!({ "op": "request", "message": { "id": id, "type": "subscribe", "to": url }, "timeout_ms": 60_000 });
    assert_eq!(driver.command(&b, cmd), json!({ "ok": true }));
    // The reporter (which answers nothing) is asked, then deletes the object.
    let asked = driver.find(|m| m.kind == MessageType::Forward && m.from == a && reported(m)["from"] == url.as_str(), Duration::from_secs(30));
    assert!(asked.is_some(), "the reporter was asked");
    assert_eq!(driver.command(&a, json!({ "op": "delete", "url": url })), json!({ "ok": true }));
    // Its answer could only come to the deleted route: the syncher answers
    // at once, not the subscriber's own 408 a minute later.
    let answer = driver
        .find(|m| m.kind == MessageType::Forward && m.from == b && reported(m)["id"] == id, Duration::from_secs(30))
        .expect("an answer well before the subscriber's 60 s");
    let answer = reported(&answer);
    assert_eq!(answer["code"], 404, "{answer}");
    assert!(answer["description"].as_str().unwrap().contains("was deleted while its reporter was asked"), "{answer}");
}

#[test]
fn a_reporter_answering_100_then_200_accepts_a_subscription() {
    let runtime = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "reporter", &guest("puppet"), json!({ "observer": OBSERVER, "echo": true, "provisional": true }))
        .hyperty("bob.example", "observer", &guest("puppet"), puppet_config(false));
    runtime.deploy(&bundle.load()).unwrap();
    let (reporter, observer) = (runtime.lookup("alice.example", "reporter").unwrap(), runtime.lookup("bob.example", "observer").unwrap());
    let url = create(&mut driver, &reporter, json!({ "n": 1 }));
    let answer = ask(&mut driver, &observer, "subscribe", &url, None);
    assert_eq!(answer["code"], 200, "{answer}");
}

#[test]
fn the_reporter_hears_which_observer_left() {
    let (_runtime, mut driver, reporter, observer, _bundle) = world(false, Duration::from_secs(10));
    let url = create(&mut driver, &reporter, json!({ "n": 1 }));
    assert_eq!(ask(&mut driver, &observer, "subscribe", &url, None)["code"], 200);
    assert_eq!(ask(&mut driver, &observer, "unsubscribe", &url, None)["code"], 200);
    let told = driver.report(&reporter, |m| m["type"] == "unsubscribe" && m["from"] == url);
    assert_eq!((&told["value"], &told["resource"]), (&json!(json!({ "observer": observer.as_str() }).to_string()), &json!(url)));
    // An unsubscribe from one that was not subscribed tells nothing.
    assert_eq!(ask(&mut driver, &observer, "unsubscribe", &url, None)["code"], 200);
    let seen = driver.before_marker(&reporter);
    assert!(seen.iter().all(|m| reported(m)["type"] != "unsubscribe"), "{seen:?}");
}

#[test]
fn an_invitation_carries_the_objects_version_and_data() {
    let (runtime, mut driver, reporter, _observer, _bundle) = world(false, Duration::from_secs(10));
    let url = create(&mut driver, &reporter, json!({ "title": "chat" }));
    driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "add", "path": "/n", "value": 1 }] }));
    driver.command(&reporter, json!({ "op": "set-child", "url": url, "name": "m", "data": "hi" }));
    let invitee = runtime.endpoint("hyperty://carol.example/carol", 8).unwrap();
    driver.command(&reporter, json!({ "op": "invite", "url": url, "observers": [invitee.address().to_string()] }));
    let invitation = invitee.recv_timeout(Duration::from_secs(10)).expect("an invitation");
    assert_eq!((invitation.kind, invitation.from.as_str()), (MessageType::Create, url.as_str()));
    let value: Value = serde_json::from_str(invitation.body.value.as_deref().unwrap()).unwrap();
    assert_eq!((&value["url"], &value["reporter"], &value["scheme"]), (&json!(url), &json!(reporter.as_str()), &json!("comm")));
    assert_eq!((&value["version"], &value["data"], &value["children"]), (&json!(3), &json!({ "title": "chat", "n": 1 }), &json!({ "m": "hi" })));
}

#[test]
fn an_invitation_past_the_message_size_limit_leaves_the_state_to_the_subscription() {
    let config = RuntimeConfig { cache_dir: cache_dir(), max_message_bytes: 4096, ..RuntimeConfig::default() };
    let runtime = Runtime::new(config).unwrap();
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, _b) = pair(&runtime, true);
    // 3,000 bytes: an object the limits take, a state that fits a
    // message, but not with the invitation's addresses around it.
    let url = driver.command(&a, json!({ "op": "create", "scheme": "comm", "pad": 3000 }))["url"].as_str().unwrap().to_owned();
    let invitee = runtime.endpoint("hyperty://carol.example/carol", 8).unwrap();
    driver.command(&a, json!({ "op": "invite", "url": url, "observers": [invitee.address().to_string()] }));
    let invitation = invitee.recv_timeout(Duration::from_secs(10)).expect("an invitation");
    let value: Value = serde_json::from_str(invitation.body.value.as_deref().unwrap()).unwrap();
    assert_eq!(value, json!({ "url": url, "scheme": "comm", "reporter": a.as_str() }));
}
