//! The backbone end to end: real components in two provider domains, the
//! bus between them, and the embedder's endpoint.

use std::time::Duration;

use hyperty_host::{Address, Message, MessageType, SendError};
use hyperty_tests::*;
use serde_json::{Value, json};

fn request_to(to: &Address, value: Value) -> Value {
    json!({ "op": "request", "message": { "id": 7, "type": "read", "to": to.to_string(), "value": value.to_string() } })
}

#[test]
fn messages_cross_domains_and_responses_find_their_request() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, true);
    assert_eq!(a.domain(), "alice.example");
    assert_eq!(b.domain(), "bob.example");

    let answer = driver.command(&a, request_to(&b, json!({ "n": 1 })));
    assert_eq!(answer, json!({ "ok": true }));

    // b (bob.example) received the request from a (alice.example) ...
    let at_b = driver.report(&b, |m| m["type"] == "read");
    assert_eq!(at_b["from"], a.as_str());
    assert_eq!(at_b["id"], 7);
    assert_eq!(at_b["value"], r#"{"n":1}"#);
    // ... and a received b's echo as the response to request 7.
    let at_a = driver.report(&a, |m| m["type"] == "response");
    assert_eq!(at_a["from"], b.as_str());
    assert_eq!(at_a["id"], 7);
    assert_eq!(at_a["code"], 200);
    assert_eq!(at_a["value"], r#"{"n":1}"#);
    assert!(runtime.wait_idle(Duration::from_secs(5)));
    assert_eq!(runtime.pending_requests(), 0);
}

#[test]
fn unknown_local_address_is_answered_404_at_once() {
    // A long request timeout: a 404 must not wait for it.
    let runtime = runtime(Duration::from_secs(60));
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, _) = pair(&runtime, false);
    let nobody = Address::parse("hyperty://bob.example/nobody").unwrap();

    // From the embedder's endpoint.
    let id = driver.fresh_id();
    let msg = Message::new(id, MessageType::Read, driver.address().clone(), nobody.clone(), None);
    driver.endpoint.request(msg, None).unwrap();
    let answer = driver.find(|m| m.id == id, Duration::from_secs(10)).expect("an answer well before the 60 s timeout");
    assert_eq!(answer.kind, MessageType::Response);
    assert_eq!(answer.body.code, Some(404));
    assert_eq!(answer.from, nobody);
    assert!(answer.body.description.unwrap().contains("hyperty://bob.example/nobody"));

    // From a hyperty.
    driver.command(&a, request_to(&nobody, json!(null)));
    let at_a = driver.report(&a, |m| m["type"] == "response");
    assert_eq!(at_a["code"], 404);
    assert_eq!(at_a["id"], 7);
    assert_eq!(runtime.pending_requests(), 0);
}

#[test]
fn unanswered_request_gets_408_and_leaves_nothing_behind() {
    let runtime = runtime(Duration::from_millis(1000));
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, false); // b never answers

    // The endpoint's request to b times out with 408 carrying its id.
    let id = driver.fresh_id();
    let msg = Message::new(id, MessageType::Read, driver.address().clone(), b.clone(), None);
    driver.endpoint.request(msg, None).unwrap();
    assert_eq!(runtime.pending_requests(), 1);
    let answer = driver.expect(|m| m.kind == MessageType::Response && m.id == id);
    assert_eq!(answer.body.code, Some(408));
    assert_eq!(answer.from, b);

    // A hyperty's request with its own timeout does the same.
    let cmd = json!({ "op": "request", "timeout_ms": 100,
        "message": { "id": 9, "type": "execute", "to": b.to_string() } });
    driver.command(&a, cmd);
    let at_a = driver.report(&a, |m| m["type"] == "response" && m["id"] == 9);
    assert_eq!(at_a["code"], 408);
    assert_eq!(at_a["from"], b.as_str());

    assert!(runtime.wait_idle(Duration::from_secs(5)));
    assert_eq!(runtime.pending_requests(), 0, "no map entry or timer outlives its request");
}

/// The bus timer sleeps up to a second when nothing is due sooner, and a
/// request due before then wakes it: a 50 ms request sent just after the
/// timer went back to sleep (it had just answered another one 408) is
/// answered at its deadline, not at the timer's next tick.
#[test]
fn a_request_due_before_the_timer_wakes_is_answered_408_at_its_deadline() {
    let runtime = runtime(Duration::from_secs(60));
    let mut driver = Driver::new(&runtime);
    let (_bundle, _a, b) = pair(&runtime, false); // b never answers
    for round in 0..3 {
        let id = driver.fresh_id();
        let sent = std::time::Instant::now();
        let msg = Message::new(id, MessageType::Read, driver.address().clone(), b.clone(), None);
        driver.endpoint.request(msg, Some(Duration::from_millis(50))).unwrap();
        let answer = driver.expect(|m| m.kind == MessageType::Response && m.id == id);
        assert_eq!(answer.body.code, Some(408));
        // A wake-up missed would take ~1 s (the slack is for a loaded CI).
        assert!(sent.elapsed() < Duration::from_millis(800), "round {round}: a 50 ms request answered 408 after {:?}", sent.elapsed());
    }
}

#[test]
fn answered_request_leaves_no_pending_entry() {
    let runtime = runtime(Duration::from_secs(60));
    let mut driver = Driver::new(&runtime);
    let (_bundle, _a, b) = pair(&runtime, true);
    for _ in 0..50 {
        assert_eq!(driver.read(&b).body.code, Some(200));
    }
    assert!(runtime.wait_idle(Duration::from_secs(5)));
    assert_eq!(runtime.pending_requests(), 0);
}

#[test]
fn a_response_from_anyone_but_the_requests_addressee_is_dropped() {
    // The requester waits on b; c, an endpoint, and d, a hyperty, answer in
    // b's place (same id, to the requester), before b itself does.
    let runtime = runtime(Duration::from_secs(60));
    let mut driver = Driver::new(&runtime);
    let (_bundle, _a, d) = pair(&runtime, false);
    let b = runtime.endpoint("hyperty://bob.example/b-endpoint", 16).unwrap();
    let c = runtime.endpoint("hyperty://carol.example/c", 16).unwrap();
    let id = driver.fresh_id();
    let request = Message::new(id, MessageType::Read, driver.address().clone(), b.address().clone(), None);
    driver.endpoint.request(request, None).unwrap();
    assert_eq!(b.recv_timeout(Duration::from_secs(10)).expect("b gets the request").id, id);

    let mut forged = Message::response(id, c.address().clone(), driver.address().clone(), 200);
    forged.body.value = Some(r#""from c""#.into());
    c.send(forged).expect("a response is sent like any message; the bus drops it");
    let cmd = json!({ "op": "send", "message": { "id": id, "type": "response", "to": OBSERVER, "code": 200, "value": r#""from d""# } });
    let sent = driver.command(&d, cmd);
    assert!(sent == json!({ "ok": true }) || sent["error"].is_string(), "{sent}");
    assert_eq!(runtime.pending_requests(), 1, "still waiting for b");

    let mut answer = Message::response(id, b.address().clone(), driver.address().clone(), 200);
    answer.body.value = Some(r#""from b""#.into());
    b.send(answer).unwrap();
    let first = driver.expect(|m| m.kind == MessageType::Response && m.id == id);
    assert_eq!((&first.from, first.body.value.as_deref()), (b.address(), Some(r#""from b""#)), "{first:?}");
    assert!(runtime.wait_idle(Duration::from_secs(5)));
    assert_eq!(runtime.pending_requests(), 0);
    // b's answer was the first and only one: nothing else came.
    assert_eq!(driver.before_marker(&d).iter().filter(|m| m.kind == MessageType::Response).count(), 0);
}

#[test]
fn duplicate_pending_request_id_is_refused() {
    let runtime = runtime(Duration::from_secs(60));
    let driver = Driver::new(&runtime);
    let (_bundle, _a, b) = pair(&runtime, false);
    let msg = Message::new(5, MessageType::Read, driver.address().clone(), b.clone(), None);
    driver.endpoint.request(msg.clone(), None).unwrap();
    assert_eq!(driver.endpoint.request(msg, None), Err(SendError::DuplicateId(5)));
}

#[test]
fn spoofed_from_is_refused_and_goes_nowhere() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, true);

    // a pretends to be b, then a hyperty of another domain that does not exist.
    for forged in [b.to_string(), "hyperty://bob.example/forged".to_string(), "hyperty://alice.example/other".into()] {
        let cmd = json!({ "op": "send", "message": { "id": 1, "type": "update", "from": forged, "to": b.to_string() } });
        let answer = driver.command(&a, cmd);
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("spoofed-from"), "{answer}");
        assert!(error.contains(&forged), "the error names the forged address: {error}");
    }
    let cmd = json!({ "op": "send", "message": { "id": 1, "type": "update", "from": "not an address", "to": b.to_string() } });
    assert!(driver.command(&a, cmd)["error"].as_str().unwrap().starts_with("malformed"));

    // Nothing reached b.
    assert_eq!(driver.before_marker(&b), []);

    // The embedder's endpoint is stamped the same way.
    let forged = Message::new(1, MessageType::Update, a.clone(), b.clone(), None);
    assert!(matches!(driver.endpoint.send(forged), Err(SendError::SpoofedFrom(_))));

    // And a still works.
    assert_eq!(driver.command(&a, request_to(&b, json!(1))), json!({ "ok": true }));
    driver.report(&b, |m| m["type"] == "read");
}

#[test]
fn malformed_messages_are_refused_at_the_import() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, false);
    let bad_to = json!({ "op": "send", "message": { "type": "read", "to": "nowhere" } });
    assert!(driver.command(&a, bad_to)["error"].as_str().unwrap().starts_with("malformed: to:"));
    let bad_json = json!({ "op": "send", "message": { "type": "read", "to": b.to_string(), "value": "{not json" } });
    assert!(driver.command(&a, bad_json)["error"].as_str().unwrap().contains("not JSON"));
    let too_big = json!({ "op": "send", "pad": 2 << 20, "message": { "type": "read", "to": b.to_string() } });
    assert!(driver.command(&a, too_big)["error"].as_str().unwrap().starts_with("too-large"));
    assert_eq!(driver.before_marker(&b), [], "nothing reached b");
}

#[test]
fn registry_lookup_resolves_bundle_names() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, false);
    let found = driver.command(&a, json!({ "op": "lookup", "domain": "bob.example", "name": "b" }));
    assert_eq!(found["address"], b.as_str());
    let missing = driver.command(&a, json!({ "op": "lookup", "domain": "bob.example", "name": "zz" }));
    assert_eq!(missing["address"], Value::Null);
}

/// A deployment large enough to be instantiated on several threads at
/// once (`SandboxHandle::instantiate_all`) still routes every address to
/// its own instance: each answers from the address it was asked at (a
/// response from any other address would be dropped, and the request
/// would end in 408). Several threads need at least 2 cores (CI has 2).
#[test]
fn a_large_deployment_instantiated_side_by_side_routes_each_address_to_its_own_instance() {
    let runtime = runtime(Duration::from_secs(5));
    let bundle = hyperty_tests::scale::pongs(2, 48).load();
    let deployed = runtime.deploy(&bundle).unwrap();
    assert_eq!(deployed.len(), 96);
    let endpoint = runtime.endpoint("hyperty://bench.example/harness", 16).unwrap();
    for (id, hyperty) in (1..).zip(&deployed) {
        let asked = Message::new(id, MessageType::Read, endpoint.address().clone(), hyperty.address.clone(), Some(r#"{"text":"ping"}"#.into()));
        let answer = endpoint.request_reply(asked, None).unwrap();
        assert_eq!((answer.body.code, &answer.from), (Some(200), &hyperty.address), "{}/{}", hyperty.domain, hyperty.name);
    }
}

/// A large deployment whose 30th hyperty cannot be instantiated (past its
/// domain's `instances`, one of which a running hyperty holds) is refused
/// naming that entry, and leaves nothing behind in the domain, which goes
/// on: the same bundle within the limit deploys afterwards.
#[test]
fn a_large_deployment_failing_midway_is_refused_naming_the_entry_and_leaves_nothing() {
    let runtime = runtime(Duration::from_secs(5));
    let limits = json!({ "limits": { "instances": 30, "total-memory-mb": 2048 } });
    let first = TestBundle::new().hyperty("d0.example", "first", &guest("pong"), json!({})).domain("d0.example", limits.clone());
    let first = runtime.deploy(&first.load()).unwrap();
    let too_many = hyperty_tests::scale::pongs(1, 40).domain("d0.example", limits.clone());
    let err = runtime.deploy(&too_many.load()).unwrap_err().to_string();
    assert!(err.contains("the domain already holds 30 instances (instances = 30)"), "{err}");
    assert!(err.contains(r#"domains."d0.example".hyperties[29].component"#), "the 30th entry is named: {err}");
    assert_eq!(runtime.hyperties().len(), 1);
    let fits = hyperty_tests::scale::pongs(1, 29).domain("d0.example", limits);
    assert_eq!(runtime.deploy(&fits.load()).unwrap().len(), 29);
    let endpoint = runtime.endpoint("hyperty://bench.example/harness", 16).unwrap();
    let asked = Message::new(1, MessageType::Read, endpoint.address().clone(), first[0].address.clone(), Some(r#"{"text":"ping"}"#.into()));
    assert_eq!(endpoint.request_reply(asked, None).unwrap().body.code, Some(200), "the running hyperty went on");
}
