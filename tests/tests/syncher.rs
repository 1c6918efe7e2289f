//! The syncher: data objects created by a reporter, observed by
//! subscribers through versioned JSON Patch deltas, reporter-only writes,
//! persistence across a restart, and 10,000 observers.

use std::time::Duration;

use hyperty_host::syncher::{Applied, Replica};
use hyperty_host::{Address, Endpoint, Message, MessageType, Runtime, RuntimeConfig};
use hyperty_tests::*;
use serde_json::{Value, json};

/// alice.example/reporter (accepts subscriptions unless `picky`) and
/// bob.example/observer (reports everything it gets).
fn world(picky: bool) -> (Runtime, Driver, Address, Address, TestBundle) {
    let runtime = runtime(Duration::from_secs(10));
    let driver = Driver::new(&runtime);
    let reporter_config = json!({ "observer": OBSERVER, "echo": true, "reject_subscribe": picky });
    let bundle = TestBundle::new()
        .hyperty("alice.example", "reporter", &guest("puppet"), reporter_config)
        .hyperty("bob.example", "observer", &guest("puppet"), puppet_config(false));
    runtime.deploy(&bundle.load()).unwrap();
    let reporter = runtime.lookup("alice.example", "reporter").unwrap();
    let observer = runtime.lookup("bob.example", "observer").unwrap();
    (runtime, driver, reporter, observer, bundle)
}

fn create(driver: &mut Driver, reporter: &Address, data: Value) -> String {
    let answer = driver.command(reporter, json!({ "op": "create", "scheme": "comm", "data": data }));
    answer["url"].as_str().unwrap_or_else(|| panic!("create failed: {answer}")).to_owned()
}

/// `puppet` sends a `kind` request to `url`; the response it got, as JSON.
fn ask(driver: &mut Driver, puppet: &Address, kind: &str, url: &str, value: Option<Value>) -> Value {
    let id = driver.fresh_id();
    let cmd = json!({ "op": "request", "message": { "id": id, "type": kind, "to": url, "value": value.map(|v| v.to_string()) } });
    assert_eq!(driver.command(puppet, cmd), json!({ "ok": true }));
    driver.report(puppet, |m| m["type"] == "response" && m["id"] == id)
}

/// A delta the observer puppet reported, as the message it got.
fn delta(report: &Value) -> Message {
    let mut m = Message::new(
        report["id"].as_u64().unwrap(),
        MessageType::parse(report["type"].as_str().unwrap()).unwrap(),
        Address::parse(report["from"].as_str().unwrap()).unwrap(),
        Address::parse(report["to"].as_str().unwrap()).unwrap(),
        report["value"].as_str().map(str::to_owned),
    );
    m.body.resource = report["resource"].as_str().map(str::to_owned);
    m
}

fn next_delta(driver: &Driver, observer: &Address, url: &str) -> Message {
    delta(&driver.report(observer, |m| m["from"] == url && m["type"] != "response"))
}

#[test]
fn the_whole_lifecycle_across_two_domains() {
    let (_runtime, mut driver, reporter, observer, _bundle) = world(false);
    let url = create(&mut driver, &reporter, json!({ "title": "chat", "members": [] }));
    assert!(url.starts_with("comm://alice.example/"), "{url}");
    // Subscribe: the reporter is asked (it accepts), the observer gets the state.
    let answer = ask(&mut driver, &observer, "subscribe", &url, None);
    assert_eq!(answer["code"], 200, "{answer}");
    let asked = driver.report(&reporter, |m| m["type"] == "subscribe" && m["from"] == url);
    assert_eq!(asked["value"], json!({ "observer": observer.to_string() }).to_string());
    let mut replica = Replica::from_state(&url, answer["value"].as_str().unwrap()).unwrap();
    assert_eq!((replica.version, &replica.data), (1, &json!({ "title": "chat", "members": [] })));
    // Update: a JSON Patch, version 2.
    let patch = json!([{ "op": "add", "path": "/members/-", "value": "bob" }, { "op": "replace", "path": "/title", "value": "team" }]);
    assert_eq!(driver.command(&reporter, json!({ "op": "update", "url": url, "patch": patch })), json!({ "version": 2 }));
    assert_eq!(replica.apply(&next_delta(&driver, &observer, &url)), Ok(Applied::Applied));
    assert_eq!(replica.data, json!({ "title": "team", "members": ["bob"] }));
    // Children: created, updated, removed, each a version.
    for (op, data, kind) in [("set-child", json!({ "text": "hi" }), "create"), ("set-child", json!({ "text": "hi!" }), "update"), ("remove-child", Value::Null, "delete")] {
        let answer = driver.command(&reporter, json!({ "op": op, "url": url, "name": "msg1", "data": data }));
        assert_eq!(answer["version"], replica.version + 1, "{answer}");
        let d = next_delta(&driver, &observer, &url);
        assert_eq!((d.kind.as_str(), d.body.resource.clone().unwrap()), (kind, format!("{url}/children/msg1")));
        assert_eq!(replica.apply(&d), Ok(Applied::Applied));
        if kind != "delete" {
            assert_eq!(replica.children["msg1"], data);
        }
    }
    assert!(replica.children.is_empty());
    // A read agrees with the replica; so does the one the observer hyperty
    // kept itself (the SDK's Replica, applying the same deltas).
    let read = ask(&mut driver, &observer, "read", &url, None);
    let state = Replica::from_state(&url, read["value"].as_str().unwrap()).unwrap();
    assert_eq!((state.version, &state.data), (replica.version, &replica.data));
    let kept = driver.command(&observer, json!({ "op": "replica", "url": url }));
    assert_eq!(kept, json!({ "version": replica.version, "data": replica.data, "children": {}, "deleted": false }));
    // Unsubscribed, it hears nothing more.
    assert_eq!(ask(&mut driver, &observer, "unsubscribe", &url, None)["code"], 200);
    driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "add", "path": "/x", "value": 1 }] }));
    assert!(driver.find(|m| reported(m)["from"] == url.as_str() && reported(m)["type"] == "update", Duration::from_millis(300)).is_none());
    // Subscribed again, then the object is deleted: the observer is told.
    assert_eq!(ask(&mut driver, &observer, "subscribe", &url, None)["code"], 200);
    assert_eq!(driver.command(&reporter, json!({ "op": "delete", "url": url })), json!({ "ok": true }));
    let d = next_delta(&driver, &observer, &url);
    assert_eq!((d.kind, d.body.resource.as_deref()), (MessageType::Delete, Some(url.as_str())));
    assert_eq!(driver.command(&observer, json!({ "op": "replica", "url": url }))["deleted"], true, "the observer dropped it");
    assert_eq!(ask(&mut driver, &observer, "read", &url, None)["code"], 404);
    assert!(_runtime.discover(&hyperty_host::Query { scheme: Some("comm".into()), ..Default::default() }).is_empty(), "unregistered");
}

#[test]
fn refusals_whatever_the_policies() {
    let (_runtime, mut driver, reporter, observer, _bundle) = world(true);
    let url = create(&mut driver, &reporter, json!({ "n": 0 }));
    // The reporter refuses the subscription: 403; reading without one: 401.
    let answer = ask(&mut driver, &observer, "subscribe", &url, None);
    assert_eq!(answer["code"], 403, "{answer}");
    assert!(answer["description"].as_str().unwrap().contains("did not accept the subscription (it answered 403)"), "{answer}");
    let answer = ask(&mut driver, &observer, "read", &url, None);
    assert_eq!(answer["code"], 401, "{answer}");
    // Only the reporter writes: by message, 403; by the import, forbidden.
    for kind in ["update", "delete"] {
        let answer = ask(&mut driver, &observer, kind, &url, Some(json!([{ "op": "replace", "path": "/n", "value": 666 }])));
        assert_eq!(answer["code"], 403, "{kind}: {answer}");
    }
    let answer = driver.command(&observer, json!({ "op": "update", "url": url, "patch": [{ "op": "replace", "path": "/n", "value": 666 }] }));
    assert!(answer["error"].as_str().unwrap().starts_with("forbidden: only its reporter"), "{answer}");
    let answer = driver.command(&observer, json!({ "op": "set-child", "url": url, "name": "c", "data": 1 }));
    assert!(answer["error"].as_str().unwrap().starts_with("forbidden"), "{answer}");
    // Bad input from the reporter: a patch that does not apply, a bad scheme.
    let answer = driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "remove", "path": "/missing" }] }));
    assert!(answer["error"].as_str().unwrap().starts_with("invalid: the patch does not apply"), "{answer}");
    let answer = driver.command(&reporter, json!({ "op": "create", "scheme": "hyperty", "data": {} }));
    assert!(answer["error"].as_str().unwrap().starts_with("invalid"), "{answer}");
    // The data is untouched.
    let state = driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [] }));
    assert_eq!(state, json!({ "version": 2 }));
}

/// `endpoint` sends a `kind` request (subscribe, read) to `url`; the state
/// its 200 carries.
fn state(endpoint: &Endpoint, kind: MessageType, url: &str, id: u64) -> Replica {
    let to = Address::parse(url).unwrap();
    endpoint.request(Message::new(id, kind, endpoint.address().clone(), to, None), None).unwrap();
    let answer = loop {
        let m = endpoint.recv_timeout(Duration::from_secs(10)).expect("an answer");
        if m.kind == MessageType::Response {
            break m;
        }
        // Only an invitation may come first.
        assert_eq!((m.kind, m.from.as_str()), (MessageType::Create, url), "{m:?}");
    };
    assert_eq!((answer.id, answer.body.code), (id, Some(200)), "{answer:?}");
    Replica::from_state(url, answer.body.value.as_deref().unwrap()).unwrap()
}

fn subscribe(endpoint: &Endpoint, url: &str, id: u64) -> Replica {
    state(endpoint, MessageType::Subscribe, url, id)
}

fn read(endpoint: &Endpoint, url: &str, id: u64) -> Replica {
    state(endpoint, MessageType::Read, url, id)
}

#[test]
fn stale_and_out_of_order_deltas_and_a_resync_after_a_gap() {
    let (runtime, mut driver, reporter, _observer, _bundle) = world(false);
    let url = create(&mut driver, &reporter, json!({ "n": 0 }));
    let watcher = runtime.endpoint("hyperty://carol.example/watcher", 64).unwrap();
    driver.command(&reporter, json!({ "op": "invite", "url": url, "observers": [watcher.address().to_string()] }));
    let invitation = watcher.recv_timeout(Duration::from_secs(10)).expect("an invitation");
    assert_eq!((invitation.kind, invitation.from.as_str()), (MessageType::Create, url.as_str()));
    assert_eq!(serde_json::from_str::<Value>(invitation.body.value.as_deref().unwrap()).unwrap()["reporter"], reporter.to_string());
    // The object is registered: discovered by its scheme.
    let found = runtime.discover(&hyperty_host::Query { scheme: Some("comm".into()), ..Default::default() });
    assert!(found.iter().any(|r| r.address.as_str() == url && r.kind == hyperty_host::registry::Kind::DataObject), "{found:?}");
    let mut replica = subscribe(&watcher, &url, 1);
    let mut deltas = Vec::new();
    for n in 1..=5 {
        driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "replace", "path": "/n", "value": n }] }));
        deltas.push(watcher.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    assert_eq!(replica.apply(&deltas[0]), Ok(Applied::Applied));
    assert_eq!(replica.apply(&deltas[0]), Ok(Applied::Stale), "a duplicate is ignored");
    assert_eq!(replica.apply(&deltas[2]), Ok(Applied::Gap { have: 2, got: 4 }), "version 3 is missing");
    assert_eq!(replica.data, json!({ "n": 1 }), "nothing applied past a gap");
    // Resync: read, then go on; what the read covered is stale.
    replica = read(&watcher, &url, 2);
    assert_eq!(replica.version, 6);
    for d in &deltas {
        assert_eq!(replica.apply(d), Ok(Applied::Stale));
    }
    assert_eq!(replica.data, json!({ "n": 5 }));
    // Out of order: 8 before 7 is a gap; 7 then 8 applies.
    let mut more = Vec::new();
    for n in 6..=7 {
        driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "replace", "path": "/n", "value": n }] }));
        more.push(watcher.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    assert!(matches!(replica.apply(&more[1]), Ok(Applied::Gap { .. })));
    assert_eq!(replica.apply(&more[0]), Ok(Applied::Applied));
    assert_eq!(replica.apply(&more[1]), Ok(Applied::Applied));
    assert_eq!((replica.version, &replica.data), (8, &json!({ "n": 7 })));
}

#[test]
fn objects_and_subscriptions_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let start = || {
        Runtime::new(RuntimeConfig {
            cache_dir: cache_dir(),
            data_dir: Some(data.path().to_owned()),
            request_timeout: Duration::from_secs(10),
            ..RuntimeConfig::default()
        })
        .unwrap()
    };
    let bundle = TestBundle::new()
        .hyperty("alice.example", "reporter", &guest("puppet"), puppet_config(true))
        .set("alice.example", "reporter", "keep-address", json!(true));
    let first = start();
    let mut driver = Driver::new(&first);
    first.deploy(&bundle.load()).unwrap();
    let reporter = first.lookup("alice.example", "reporter").unwrap();
    let url = create(&mut driver, &reporter, json!({ "log": [] }));
    driver.command(&reporter, json!({ "op": "set-child", "url": url, "name": "a", "data": { "x": 1 } }));
    let watcher = first.endpoint("hyperty://carol.example/watcher", 64).unwrap();
    driver.command(&reporter, json!({ "op": "invite", "url": url, "observers": [watcher.address().to_string()] }));
    let mut replica = subscribe(&watcher, &url, 1);
    driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "add", "path": "/log/-", "value": "one" }] }));
    assert_eq!(replica.apply(&watcher.recv_timeout(Duration::from_secs(10)).unwrap()), Ok(Applied::Applied));
    drop((driver, watcher));
    first.shutdown();
    drop(first);

    // The same data directory: the object, its child and the subscription are back.
    let second = start();
    let mut driver = Driver::new(&second);
    second.deploy(&bundle.load()).unwrap();
    assert_eq!(second.lookup("alice.example", "reporter"), Some(reporter.clone()), "the reporter kept its address");
    let watcher = second.endpoint("hyperty://carol.example/watcher", 64).unwrap();
    let state = read(&watcher, &url, 2);
    assert_eq!((state.version, &state.data, &state.children), (replica.version, &replica.data, &replica.children));
    assert_eq!(state.data, json!({ "log": ["one"] }));
    // Still subscribed: the next change arrives without subscribing again.
    driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "add", "path": "/log/-", "value": "two" }] }));
    assert_eq!(replica.apply(&watcher.recv_timeout(Duration::from_secs(10)).unwrap()), Ok(Applied::Applied));
    assert_eq!(replica.data, json!({ "log": ["one", "two"] }));
}

#[test]
fn ten_thousand_observers_receive_every_update() {
    const OBSERVERS: usize = 10_000;
    const UPDATES: u64 = 10;
    let (runtime, mut driver, reporter, _observer, _bundle) = world(false);
    let url = create(&mut driver, &reporter, json!({ "n": 0 }));
    let watchers: Vec<Endpoint> =
        (0..OBSERVERS).map(|i| runtime.endpoint(&format!("hyperty://crowd.example/w{i}"), 64).unwrap()).collect();
    let addresses: Vec<String> = watchers.iter().map(|w| w.address().to_string()).collect();
    assert_eq!(driver.command(&reporter, json!({ "op": "invite", "url": url, "observers": addresses })), json!({ "ok": true }));
    let mut replicas: Vec<Replica> = watchers.iter().map(|w| subscribe(w, &url, 1)).collect();
    for n in 1..=UPDATES {
        let answer = driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "replace", "path": "/n", "value": n }] }));
        assert_eq!(answer["version"], n + 1);
    }
    let mut lost = 0;
    for (w, r) in watchers.iter().zip(replicas.iter_mut()) {
        for _ in 0..UPDATES {
            match w.recv_timeout(Duration::from_secs(10)) {
                Some(m) => assert_eq!(r.apply(&m), Ok(Applied::Applied)),
                None => lost += 1,
            }
        }
        assert_eq!(r.data, json!({ "n": UPDATES }));
    }
    assert_eq!(lost, 0);
}
