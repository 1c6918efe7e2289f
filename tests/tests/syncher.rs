//! The syncher: data objects created by a reporter, observed by
//! subscribers through versioned JSON Patch deltas, reporter-only writes,
//! persistence across a restart, and 10,000 observers; no deadlock whatever
//! the interleaving; bounds on objects (number, size, children,
//! subscribers, the domain's memory) and on their depth.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use hyperty_host::syncher::{Applied, Replica};
use hyperty_host::{Address, Endpoint, EventKind, Message, MessageType, Runtime, RuntimeConfig, Text};
use hyperty_tests::rethink::{ask, create};
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

/// A delta the observer puppet reported, as the message it got.
fn delta(report: &Value) -> Message {
    let mut m = Message::new(
        report["id"].as_u64().unwrap(),
        MessageType::parse(report["type"].as_str().unwrap()).unwrap(),
        Address::parse(report["from"].as_str().unwrap()).unwrap(),
        Address::parse(report["to"].as_str().unwrap()).unwrap(),
        report["value"].as_str().map(str::to_owned),
    );
    m.body.resource = report["resource"].as_str().map(Text::from);
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
        assert_eq!((d.kind.as_str(), d.body.resource.clone().unwrap().to_string()), (kind, format!("{url}/children/msg1")));
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

/// A runtime keeping its state in `data`, with alice.example/reporter
/// (echoing, keeping its address across restarts) deployed: the runtime, its
/// driver, the reporter's address and the bundle.
fn start_kept(data: &std::path::Path) -> (Runtime, Driver, Address, TestBundle) {
    let config = RuntimeConfig {
        cache_dir: cache_dir(),
        data_dir: Some(data.to_owned()),
        request_timeout: Duration::from_secs(10),
        ..hyperty_tests::engines::config()
    };
    let runtime = Runtime::new(config).unwrap();
    let driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "reporter", &guest("puppet"), puppet_config(true))
        .set("alice.example", "reporter", "keep-address", json!(true));
    runtime.deploy(&bundle.load()).unwrap();
    let reporter = runtime.lookup("alice.example", "reporter").unwrap();
    (runtime, driver, reporter, bundle)
}

#[test]
fn objects_and_subscriptions_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let (first, mut driver, reporter, _bundle) = start_kept(data.path());
    let url = create(&mut driver, &reporter, json!({ "log": [] }));
    driver.command(&reporter, json!({ "op": "set-child", "url": url, "name": "a", "data": { "x": 1 } }));
    let watcher = first.endpoint("hyperty://carol.example/watcher", 64).unwrap();
    driver.command(&reporter, json!({ "op": "invite", "url": url, "observers": [watcher.address().to_string()] }));
    let mut replica = subscribe(&watcher, &url, 1);
    driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "add", "path": "/log/-", "value": "one" }] }));
    assert_eq!(replica.apply(&watcher.recv_timeout(Duration::from_secs(10)).unwrap()), Ok(Applied::Applied));
    // A subscriber's child, and that it created it, are kept too.
    let child = Address::parse(format!("{url}/children/w")).unwrap();
    watcher.request(Message::new(5, MessageType::Create, watcher.address().clone(), child.clone(), Some("1".into())), None).unwrap();
    assert_eq!(replica.apply(&watcher.recv_timeout(Duration::from_secs(10)).unwrap()), Ok(Applied::Applied));
    assert_eq!(watcher.recv_timeout(Duration::from_secs(10)).unwrap().body.code, Some(200));
    drop((driver, watcher));
    first.shutdown();
    drop(first);

    // The same data directory: the object, its child and the subscription are back.
    let (second, mut driver, kept, _bundle) = start_kept(data.path());
    assert_eq!(kept, reporter, "the reporter kept its address");
    let watcher = second.endpoint("hyperty://carol.example/watcher", 64).unwrap();
    let state = read(&watcher, &url, 2);
    assert_eq!((state.version, &state.data, &state.children), (replica.version, &replica.data, &replica.children));
    assert_eq!(state.data, json!({ "log": ["one"] }));
    // Still subscribed: the next change arrives without subscribing again.
    driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "add", "path": "/log/-", "value": "two" }] }));
    assert_eq!(replica.apply(&watcher.recv_timeout(Duration::from_secs(10)).unwrap()), Ok(Applied::Applied));
    assert_eq!(replica.data, json!({ "log": ["one", "two"] }));
    // Its creator still owns the child: it may rewrite it.
    watcher.request(Message::new(6, MessageType::Update, watcher.address().clone(), child, Some("2".into())), None).unwrap();
    assert_eq!(replica.apply(&watcher.recv_timeout(Duration::from_secs(10)).unwrap()), Ok(Applied::Applied));
    let answer = watcher.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(answer.body.code, Some(200), "{answer:?}");
    assert_eq!(replica.children["w"], json!(2));
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

/// The version a delta carries.
fn version_of(delta: &Message) -> u64 {
    let value: Value = serde_json::from_str(delta.body.value.as_deref().unwrap()).unwrap();
    value["version"].as_u64().unwrap_or_else(|| panic!("no version in {delta:?}"))
}

/// The fan-out (one delta, sent to each subscriber through the bus's
/// `send_each`) keeps every observer's own path: its domain's incoming
/// policies decide for each observer, not once for the domain (two
/// observers of dave.example, one denied by its address); a reload takes
/// effect on the next delta (the decision kept beside the route is not
/// used again); an observer whose inbox is full misses the delta
/// (back-pressure) while the others get it; and each gets its deltas in
/// order, none lost.
#[test]
fn each_observer_of_a_fan_out_is_decided_and_bounded_on_its_own() {
    let (runtime, mut driver, reporter, _observer, _bundle) = world(false);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dave.cedar");
    let open = "permit (principal, action, resource);";
    let deny = r#"forbid (principal, action == Rethink::Action::"update", resource == Rethink::Hyperty::"hyperty://dave.example/denied") when { context.point == "incoming" };"#;
    std::fs::write(&file, format!("{open}\n{deny}\n")).unwrap();
    runtime.policies().set_domain_policies("dave.example", std::slice::from_ref(&file)).unwrap();
    let url = create(&mut driver, &reporter, json!({ "n": 0 }));
    let allowed = runtime.endpoint("hyperty://dave.example/allowed", 64).unwrap();
    let denied = runtime.endpoint("hyperty://dave.example/denied", 64).unwrap();
    let elsewhere = runtime.endpoint("hyperty://carol.example/elsewhere", 64).unwrap();
    // Room for one message: the answer to its subscription, then one delta.
    let full = runtime.endpoint("hyperty://carol.example/full", 1).unwrap();
    for (i, e) in [&allowed, &denied, &elsewhere, &full].into_iter().enumerate() {
        subscribe(e, &url, i as u64 + 1);
    }
    let update = |driver: &mut Driver, n: u64| {
        let answer = driver.command(&reporter, json!({ "op": "update", "url": url, "patch": [{ "op": "replace", "path": "/n", "value": n }] }));
        assert_eq!(answer["version"], n + 1, "{answer}");
    };
    let next = |e: &Endpoint| e.recv_timeout(Duration::from_secs(10)).map(|m| version_of(&m));
    update(&mut driver, 1);
    update(&mut driver, 2);
    assert_eq!(next(&full), Some(2), "its one place held version 2; version 3 found it full");
    // The forbid goes: the next delta reaches the observer it denied.
    std::fs::write(&file, format!("{open}\n")).unwrap();
    runtime.policies().reload().unwrap();
    update(&mut driver, 3);
    for e in [&allowed, &elsewhere] {
        assert_eq!([next(e), next(e), next(e)], [Some(2), Some(3), Some(4)], "{}: every version, in order", e.address());
    }
    assert_eq!(next(&denied), Some(4), "denied versions 2 and 3 by its domain's policies, then allowed after the reload");
    assert_eq!(next(&full), Some(4), "back-pressure cost it version 3 alone");
}

/// Runs `f` on a thread of its own and returns its result; fails naming
/// `what` if it has not returned within 60 s (a deadlock). The thread keeps
/// a handle on `runtime`, so a failing test never joins a hung domain
/// thread (the runtime is then never dropped).
fn returns<T: Send + 'static>(what: &str, runtime: &Arc<Runtime>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let keep = runtime.clone();
    std::thread::spawn(move || {
        let _ = tx.send(f());
        drop(keep);
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not return within 60 s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

#[test]
fn a_reporter_inviting_its_own_object_is_refused_and_nothing_hangs() {
    let (runtime, driver, reporter, observer, _bundle) = world(false);
    let runtime = Arc::new(runtime);
    let (answer, url, mut driver) = returns("a reporter inviting its own object", &runtime, move || {
        let mut driver = driver;
        let url = create(&mut driver, &reporter, json!({ "n": 0 }));
        let answer = driver.command(&reporter, json!({ "op": "invite", "url": url, "observers": [url] }));
        (answer, url, driver)
    });
    let error = answer["error"].as_str().unwrap_or_else(|| panic!("accepted: {answer}"));
    assert!(error.starts_with(&format!("invalid: {url} cannot observe a data object")), "{answer}");
    // Every domain still creates objects; the object took no invitation.
    let other = returns("a create in another domain after it", &runtime, move || create(&mut driver, &observer, json!({})));
    assert!(other.starts_with("comm://bob.example/"), "{other}");
}

#[test]
fn only_hyperties_observe() {
    let (runtime, mut driver, reporter, _observer, _bundle) = world(false);
    let url = create(&mut driver, &reporter, json!({ "n": 0 }));
    let other = create(&mut driver, &reporter, json!({}));
    for bad in [other.as_str(), "runtime://alice.example/x", "domain://registry.alice.example"] {
        let answer = driver.command(&reporter, json!({ "op": "invite", "url": url, "observers": ["hyperty://bob.example/fine", bad] }));
        assert_eq!(answer["error"], format!("invalid: {bad} cannot observe a data object: observers are hyperties or apps (hyperty://, app:// addresses)"), "{answer}");
    }
    // A non-hyperty endpoint subscribing: 403, and nothing was invited by the refused calls.
    let stranger = runtime.endpoint_unchecked("runtime://carol.example/stranger", 16).unwrap();
    stranger.request(Message::new(7, MessageType::Subscribe, stranger.address().clone(), Address::parse(&url).unwrap(), None), None).unwrap();
    let answer = stranger.recv_timeout(Duration::from_secs(10)).expect("an answer");
    assert_eq!((answer.kind, answer.body.code), (MessageType::Response, Some(403)), "{answer:?}");
    assert!(answer.body.description.unwrap().contains("observers are hyperties"));
    let fine = runtime.endpoint("hyperty://bob.example/fine", 16).unwrap();
    assert!(fine.recv_timeout(Duration::from_millis(200)).is_none(), "no invitation from a refused invite");
}

/// An endpoint that commands one puppet (the puppet's `observer`) and
/// ignores what else it gets.
struct Commander {
    endpoint: Endpoint,
    puppet: Address,
    next_id: u64,
}

impl Commander {
    /// Sends `kind` to `to` (a command to the puppet, or a request of the
    /// endpoint's own) and waits for the answer: the response (its value as
    /// JSON for a command, its code otherwise).
    fn request(&mut self, kind: MessageType, to: &Address, value: Option<Value>) -> Message {
        self.next_id += 1;
        let id = self.next_id;
        let m = Message::new(id, kind, self.endpoint.address().clone(), to.clone(), value.map(|v| v.to_string()));
        self.endpoint.request(m, None).unwrap();
        loop {
            let m = self.endpoint.recv_timeout(Duration::from_secs(120)).expect("an answer within 120 s");
            if m.kind == MessageType::Response && m.id == id {
                return m;
            }
        }
    }

    fn command(&mut self, command: Value) -> Value {
        let puppet = self.puppet.clone();
        let answer = self.request(MessageType::Execute, &puppet, Some(command));
        serde_json::from_str(answer.body.value.as_deref().unwrap_or("null")).unwrap()
    }
}

/// Which operation each worker is in, and since when.
#[derive(Default)]
struct Watchdog(Mutex<BTreeMap<usize, (String, Instant)>>);

impl Watchdog {
    fn run<T>(&self, worker: usize, what: String, f: impl FnOnce() -> T) -> T {
        self.0.lock().unwrap().insert(worker, (what, Instant::now()));
        let result = f();
        self.0.lock().unwrap().remove(&worker);
        result
    }

    /// An operation running for longer than `limit`, if any.
    fn stuck(&self, limit: Duration) -> Option<String> {
        self.0.lock().unwrap().values().find(|(_, since)| since.elapsed() > limit).map(|(what, _)| what.clone())
    }
}

#[test]
fn interleaved_writes_reads_and_subscriptions_all_return() {
    const REPORTERS: usize = 3;
    const WATCHERS: usize = 3;
    let runtime = Arc::new(runtime(Duration::from_secs(10)));
    let mut bundle = TestBundle::new();
    for i in 0..REPORTERS {
        // Answering every ask 100, then 200: provisional answers interleave too.
        let config = json!({ "observer": format!("hyperty://stress.example/cmd{i}"), "echo": true, "provisional": true });
        bundle = bundle.hyperty(&format!("r{i}.example"), "reporter", &guest("puppet"), config);
    }
    runtime.deploy(&bundle.load()).unwrap();
    let reporters: Vec<Address> = (0..REPORTERS).map(|i| runtime.lookup(&format!("r{i}.example"), "reporter").unwrap()).collect();
    let watchers: Vec<Endpoint> = (0..WATCHERS).map(|i| runtime.endpoint(&format!("hyperty://watch.example/w{i}"), 10_000).unwrap()).collect();
    let watcher_addresses: Vec<String> = watchers.iter().map(|w| w.address().to_string()).collect();
    let live: Arc<Mutex<Vec<String>>> = Arc::default();
    let watchdog: Arc<Watchdog> = Arc::default();
    let until = Instant::now() + Duration::from_secs(3);
    let (done, finished) = mpsc::channel::<(usize, BTreeMap<&'static str, u64>)>();
    let mut threads = Vec::new();
    for (i, reporter) in reporters.iter().enumerate() {
        let endpoint = runtime.endpoint(&format!("hyperty://stress.example/cmd{i}"), 10_000).unwrap();
        let mut commander = Commander { endpoint, puppet: reporter.clone(), next_id: 0 };
        let others: Vec<String> = reporters.iter().filter(|r| *r != reporter).map(Address::to_string).chain(watcher_addresses.clone()).collect();
        let (live, watchdog, done) = (live.clone(), watchdog.clone(), done.clone());
        threads.push(std::thread::spawn(move || {
            let mut counts = BTreeMap::new();
            let mut mine: Vec<String> = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                let mut run = |op: &'static str, command: Value| {
                    *counts.entry(op).or_default() += 1;
                    watchdog.run(i, format!("reporter {i}: {command}"), || commander.command(command))
                };
                let url = run("create", json!({ "op": "create", "scheme": "stress", "data": { "n": 0, "log": [] } }))["url"].as_str().unwrap().to_owned();
                live.lock().unwrap().push(url.clone());
                // A self-invite among the others is refused, the rest are invited.
                let refused = run("invite", json!({ "op": "invite", "url": url, "observers": [url.clone()] }));
                assert!(refused["error"].as_str().unwrap().starts_with("invalid:"), "{refused}");
                assert_eq!(run("invite", json!({ "op": "invite", "url": url, "observers": others })), json!({ "ok": true }));
                let patch = json!([{ "op": "replace", "path": "/n", "value": n }, { "op": "add", "path": "/log/-", "value": n }]);
                assert!(run("update", json!({ "op": "update", "url": url, "patch": patch }))["version"].is_u64());
                assert!(run("set-child", json!({ "op": "set-child", "url": url, "name": format!("c{n}"), "data": { "n": n } }))["version"].is_u64());
                // Subscribe to and read someone else's object, as a hyperty.
                let theirs = live.lock().unwrap().iter().rev().find(|u| !mine.contains(u) && **u != url).cloned();
                if let Some(theirs) = theirs {
                    for kind in ["subscribe", "read"] {
                        let message = json!({ "id": n, "type": kind, "to": theirs });
                        run(kind, json!({ "op": "request", "message": message }));
                    }
                }
                mine.push(url);
                if mine.len() > 3 {
                    let old = mine.remove(0);
                    live.lock().unwrap().retain(|u| *u != old);
                    assert_eq!(run("delete", json!({ "op": "delete", "url": old })), json!({ "ok": true }));
                }
            }
            done.send((i, counts)).unwrap();
        }));
    }
    for (j, watcher) in watchers.into_iter().enumerate() {
        let worker = REPORTERS + j;
        let mut commander = Commander { puppet: watcher.address().clone(), endpoint: watcher, next_id: 0 };
        let (live, watchdog, done) = (live.clone(), watchdog.clone(), done.clone());
        threads.push(std::thread::spawn(move || {
            let mut counts = BTreeMap::new();
            let mut k = 0;
            while Instant::now() < until {
                k += 1;
                let url = {
                    let live = live.lock().unwrap();
                    if live.is_empty() { None } else { Some(live[k % live.len()].clone()) }
                };
                let Some(url) = url else { std::thread::yield_now(); continue };
                let to = Address::parse(&url).unwrap();
                for kind in [MessageType::Subscribe, MessageType::Read, MessageType::Unsubscribe, MessageType::Delete] {
                    let answer = watchdog.run(worker, format!("watcher {j}: {} {url}", kind.as_str()), || commander.request(kind, &to, None));
                    let code = answer.body.code.unwrap_or(0);
                    // Deleted meanwhile: 404; never writable by an observer.
                    assert!(code == 200 || code == 401 || code == 403 || code == 404, "{answer:?}");
                    assert!(kind != MessageType::Delete || code != 200, "an observer deleted {url}");
                    *counts.entry(if code == 200 { kind.as_str() } else { "refused" }).or_default() += 1;
                    if kind == MessageType::Subscribe && code == 200 {
                        // A subscriber's own child: created, rewritten, removed.
                        let child = Address::parse(format!("{url}/children/w{j}-{k}")).unwrap();
                        for (op, value) in [(MessageType::Create, Some(json!({ "k": k }))), (MessageType::Update, Some(json!(k))), (MessageType::Delete, None)] {
                            let what = format!("watcher {j}: {} {child}", op.as_str());
                            let answer = watchdog.run(worker, what, || commander.request(op, &child, value));
                            let code = answer.body.code.unwrap_or(0);
                            assert!(code == 200 || code == 404, "{answer:?}");
                            *counts.entry(if code == 200 { "child" } else { "refused" }).or_default() += 1;
                        }
                    }
                }
            }
            done.send((worker, counts)).unwrap();
        }));
    }
    drop(done);
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    let mut reported = 0;
    while reported < threads.len() {
        match finished.recv_timeout(Duration::from_millis(100)) {
            Ok((_, counts)) => {
                reported += 1;
                for (op, n) in counts {
                    *totals.entry(op).or_default() += n;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(what) = watchdog.stuck(Duration::from_secs(30)) {
                    // Dropping the runtime would join the hung domain thread.
                    std::mem::forget(runtime.clone());
                    panic!("stuck for 30 s: {what}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for t in threads {
        t.join().expect("a worker failed");
    }
    eprintln!("calls made in 3 s: {totals:?}");
    for op in ["create", "update", "set-child", "delete", "subscribe", "read", "unsubscribe", "child"] {
        assert!(totals.get(op).is_some_and(|n| *n > 0), "no {op} done: {totals:?}");
    }
}

/// `n` arrays nested in each other, the innermost empty: depth `n`.
fn nested(n: usize) -> Value {
    (1..n).fold(json!([]), |inner, _| json!([inner]))
}

#[test]
fn deep_json_built_by_patches_is_refused_and_every_accepted_object_is_restored() {
    let data = tempfile::tempdir().unwrap();
    let (first, mut driver, reporter, _bundle) = start_kept(data.path());
    let url = create(&mut driver, &reporter, nested(100));
    // The copy of the root into its own depth: 200 deep. Refused, with six
    // such operations too (nothing aborts), and the object is unchanged.
    let copy = json!({ "op": "copy", "from": "", "path": format!("{}/-", "/0".repeat(99)) });
    for patch in [json!([copy]), json!([copy, copy, copy, copy, copy, copy])] {
        let answer = driver.command(&reporter, json!({ "op": "update", "url": url, "patch": patch }));
        assert_eq!(answer["error"], "invalid: result too deep: after operation 0 the data is nested deeper than 125 levels", "{answer}");
    }
    let state = ask(&mut driver, &reporter, "read", &url, None);
    let state: Value = serde_json::from_str(state["value"].as_str().unwrap()).unwrap();
    assert_eq!((&state["version"], &state["data"]), (&json!(1), &nested(100)));
    // The bound is the object's, whatever carries the JSON: created, set as a
    // child, or text deeper than any message may be.
    let at_most = create(&mut driver, &reporter, nested(125));
    driver.command(&reporter, json!({ "op": "set-child", "url": at_most, "name": "deep", "data": nested(125) }));
    for (op, what) in [("create", "data"), ("set-child", "the child's data")] {
        let answer = driver.command(&reporter, json!({ "op": op, "scheme": "comm", "url": url, "name": "c", "data": nested(126) }));
        assert_eq!(answer["error"], format!("invalid: {what} is too deep: nested deeper than 125 levels (a data object's limit)"), "{answer}");
        let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let answer = driver.command(&reporter, json!({ "op": op, "scheme": "comm", "url": url, "name": "c", "text": text }));
        let error = answer["error"].as_str().unwrap();
        assert!(error.starts_with(&format!("invalid: {what}: ")) && error.contains("nested deeper than 128 levels"), "{answer}");
    }
    drop(driver);
    first.shutdown();
    drop(first);

    // Every accepted write comes back readable, the refused ones left no trace.
    let (_second, mut driver, kept, _bundle) = start_kept(data.path());
    assert_eq!(kept, reporter);
    for (url, version, data, children) in [(&url, 1, nested(100), json!({})), (&at_most, 2, nested(125), json!({ "deep": nested(125) }))] {
        let state = ask(&mut driver, &reporter, "read", url, None);
        assert_eq!(state["code"], 200, "{url} was not restored: {state}");
        let state: Value = serde_json::from_str(state["value"].as_str().unwrap()).unwrap();
        assert_eq!((&state["version"], &state["data"], &state["children"]), (&json!(version), &data, &children));
    }
}

#[test]
fn creating_big_objects_stops_at_the_domain_memory_which_delete_gives_back() {
    let runtime = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&runtime);
    let limits = json!({ "total-memory-mb": 64, "object-bytes": 960 << 10, "call-timeout-ms": 600_000 });
    let bundle = TestBundle::new()
        .hyperty("spam.example", "spammer", &guest("puppet"), puppet_config(false))
        .domain("spam.example", json!({ "limits": limits }));
    runtime.deploy(&bundle.load()).unwrap();
    let spammer = runtime.lookup("spam.example", "spammer").unwrap();
    let mut events = runtime.events();
    let guests = runtime.memory_used("spam.example").unwrap();
    let resident = resident_bytes();
    // 1 MB strings (within object-bytes) until the domain's 64 MiB are used up.
    let answer = driver.command(&spammer, json!({ "op": "create", "scheme": "spam", "pad": 900_000, "repeat": 1000 }));
    let urls: Vec<String> = serde_json::from_value(answer["urls"].clone()).unwrap();
    let error = answer["error"].as_str().unwrap_or_else(|| panic!("never refused: {} objects", urls.len()));
    assert!(error.starts_with("limit: the domain's memory is used up (total-memory-mb = 64"), "{error}");
    let used = runtime.memory_used("spam.example").unwrap();
    assert!(used <= 64 << 20 && used >= guests + urls.len() * 900_000, "{used} bytes for {} objects", urls.len());
    assert!(urls.len() > 40, "{} objects of 900 kB in 64 MiB", urls.len());
    let grown = resident_bytes().saturating_sub(resident);
    eprintln!("{} objects of 900 kB before the refusal; domain memory {} KiB (guests {} KiB); host grew {} MiB", urls.len(), used >> 10, guests >> 10, grown >> 20);
    assert!(grown < 384 << 20, "the host grew by {} MiB", grown >> 20);
    let event = wait_event(&mut events, |e| matches!(&e.kind, EventKind::ObjectRefused { .. }));
    assert_eq!((event.hyperty.as_str(), &event.address), ("spam.example/spammer", &spammer));
    // Deleting gives the memory back: there is room again.
    for url in &urls {
        assert_eq!(driver.command(&spammer, json!({ "op": "delete", "url": url })), json!({ "ok": true }));
    }
    let after = runtime.memory_used("spam.example").unwrap();
    assert!(after < guests + (8 << 20), "{after} bytes held after deleting every object (guests: {guests})");
    // 8 MiB is refused at once, naming the limit.
    let answer = driver.command(&spammer, json!({ "op": "create", "scheme": "spam", "pad": 8 << 20 }));
    assert_eq!(answer["error"].as_str().unwrap().split(" would be ").nth(1), Some("8388610 bytes of JSON (object-bytes = 983040)"), "{answer}");
    assert!(create(&mut driver, &spammer, json!("again")).starts_with("comm://spam.example/"));
}

#[test]
fn objects_children_subscribers_and_growth_by_patch_are_bounded() {
    let runtime = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&runtime);
    let limits = json!({ "objects": 4, "objects-per-hyperty": 3, "object-bytes": 10_000, "object-children": 2, "object-subscribers": 2 });
    let bundle = TestBundle::new()
        .hyperty("tight.example", "a", &guest("puppet"), puppet_config(true))
        .hyperty("tight.example", "b", &guest("puppet"), puppet_config(true))
        .domain("tight.example", json!({ "limits": limits }));
    runtime.deploy(&bundle.load()).unwrap();
    let a = runtime.lookup("tight.example", "a").unwrap();
    let b = runtime.lookup("tight.example", "b").unwrap();
    let url = create(&mut driver, &a, json!({ "s": "x".repeat(3000) }));
    let error = |answer: Value| answer["error"].as_str().unwrap_or_else(|| panic!("accepted: {answer}")).to_owned();
    // A patch whose second copy of the root passes object-bytes: refused
    // whole, although its last operation would bring it back under.
    let patch = json!([{ "op": "copy", "from": "", "path": "/a" }, { "op": "copy", "from": "", "path": "/b" }, { "op": "remove", "path": "/b" }]);
    let e = error(driver.command(&a, json!({ "op": "update", "url": url, "patch": patch })));
    assert!(e.starts_with("limit: ") && e.ends_with("would pass object-bytes = 10000 after operation 1 of the patch"), "{e}");
    // Children: their size counts, and their number.
    let e = error(driver.command(&a, json!({ "op": "set-child", "url": url, "name": "big", "pad": 8000 })));
    assert!(e.contains("would be 11013 bytes of JSON (object-bytes = 10000)"), "{e}");
    for name in ["c1", "c2", "c1"] {
        assert!(driver.command(&a, json!({ "op": "set-child", "url": url, "name": name, "data": 1 }))["version"].is_u64());
    }
    let e = error(driver.command(&a, json!({ "op": "set-child", "url": url, "name": "c3", "data": 1 })));
    assert_eq!(e, format!("limit: {url} has 2 children (object-children = 2)"));
    let state = ask(&mut driver, &a, "read", &url, None);
    let state: Value = serde_json::from_str(state["value"].as_str().unwrap()).unwrap();
    assert_eq!((&state["version"], &state["data"], &state["children"]), (&json!(4), &json!({ "s": "x".repeat(3000) }), &json!({ "c1": 1, "c2": 1 })));
    // Objects: 3 for a, the domain's 4th for b, then none.
    create(&mut driver, &a, json!(2));
    create(&mut driver, &a, json!(3));
    let e = error(driver.command(&a, json!({ "op": "create", "scheme": "comm", "data": 4 })));
    assert_eq!(e, format!("limit: {a} has 3 data objects (objects-per-hyperty = 3)"));
    create(&mut driver, &b, json!(4));
    let e = error(driver.command(&b, json!({ "op": "create", "scheme": "comm", "data": 5 })));
    assert_eq!(e, "limit: tight.example has 4 data objects (objects = 4)");
    // Subscribers and invitations: at most 2.
    let watchers: Vec<Endpoint> = (0..3).map(|i| runtime.endpoint(&format!("hyperty://bob.example/w{i}"), 16).unwrap()).collect();
    let all: Vec<String> = watchers.iter().map(|w| w.address().to_string()).collect();
    let e = error(driver.command(&a, json!({ "op": "invite", "url": url, "observers": all })));
    assert_eq!(e, format!("limit: {url} would have 3 invited observers (object-subscribers = 2)"));
    subscribe(&watchers[0], &url, 1);
    subscribe(&watchers[1], &url, 1);
    watchers[2].request(Message::new(1, MessageType::Subscribe, watchers[2].address().clone(), Address::parse(&url).unwrap(), None), None).unwrap();
    let answer = watchers[2].recv_timeout(Duration::from_secs(10)).expect("an answer");
    assert_eq!(answer.body.code, Some(403), "{answer:?}");
    assert_eq!(answer.body.description.unwrap(), format!("limit: {url} has 2 subscribers (object-subscribers = 2)"));
}
