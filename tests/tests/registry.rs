//! Registration and discovery: by user, name, hyperty type, domain and
//! data-object scheme, from guests (the `registry` import) and embedders;
//! statuses; unregistration on undeploy and on a final failure.

use std::time::Duration;

use hyperty_host::{Address, EventKind, Query};
use hyperty_tests::*;
use serde_json::{Value, json};

fn names(found: &Value) -> Vec<String> {
    found["found"].as_array().unwrap().iter().map(|r| format!("{}/{}", r["domain"].as_str().unwrap(), r["name"].as_str().unwrap())).collect()
}

#[test]
fn discover_by_user_name_type_domain_and_scheme() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "seeker", &guest("puppet"), puppet_config(false))
        .hyperty("alice.example", "chat", &guest("pong"), json!({}))
        .hyperty("bob.example", "chat", &guest("pong"), json!({}))
        .hyperty("bob.example", "video", &guest("pong"), json!({}))
        .user("alice.example", "chat", "alice@idp.example")
        .user("bob.example", "chat", "bob@idp.example")
        .user("bob.example", "video", "bob@idp.example")
        .set("alice.example", "chat", "types", json!(["chat"]))
        .set("bob.example", "chat", "types", json!(["chat"]))
        .set("bob.example", "video", "types", json!(["audio", "video"]))
        .set("alice.example", "chat", "schemes", json!(["comm"]))
        .set("bob.example", "chat", "schemes", json!(["comm"]))
        .set("bob.example", "video", "schemes", json!(["connection"]));
    runtime.deploy(&bundle.load()).unwrap();
    let seeker = runtime.lookup("alice.example", "seeker").unwrap();
    let mut discover = |query: Value| names(&driver.command(&seeker, json!({ "op": "discover", "query": query })));

    assert_eq!(discover(json!({ "user": "bob@idp.example" })), ["bob.example/chat", "bob.example/video"]);
    assert_eq!(discover(json!({ "name": "chat" })), ["alice.example/chat", "bob.example/chat"]);
    assert_eq!(discover(json!({ "type": "video" })), ["bob.example/video"]);
    assert_eq!(discover(json!({ "domain": "alice.example" })), ["alice.example/chat", "alice.example/seeker"]);
    assert_eq!(discover(json!({ "scheme": "comm" })), ["alice.example/chat", "bob.example/chat"]);
    assert_eq!(discover(json!({ "scheme": "comm", "domain": "bob.example" })), ["bob.example/chat"]);
    assert!(discover(json!({ "user": "carol@idp.example" })).is_empty());
    assert_eq!(discover(json!({})).len(), 4);

    // A registration says what the bundle said, and that it is live.
    let found = driver.command(&seeker, json!({ "op": "discover", "query": { "name": "video" } }));
    let video = &found["found"][0];
    assert_eq!(video["user"], "bob@idp.example");
    assert_eq!(video["types"], json!(["audio", "video"]));
    assert_eq!(video["status"], "Status::Live");
    assert_eq!(video["address"], runtime.lookup("bob.example", "video").unwrap().as_str());

    // The embedder's view is the same.
    let by_type = runtime.discover(&Query { hyperty_type: Some("chat".into()), ..Query::default() });
    assert_eq!(by_type.len(), 2);

    // Undeploying unregisters.
    assert!(runtime.undeploy("bob.example", "chat"));
    assert!(!runtime.undeploy("bob.example", "chat"));
    assert_eq!(names(&driver.command(&seeker, json!({ "op": "discover", "query": { "name": "chat" } }))), ["alice.example/chat"]);
    assert!(runtime.lookup("bob.example", "chat").is_none());
}

#[test]
fn a_failing_hyperty_is_marked_failed_then_live_and_unregistered_when_stopped() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let mut events = runtime.events();
    let bundle = TestBundle::new()
        .hyperty("evil.example", "x", &guest("hostile"), json!({ "mode": "vault" }))
        .domain("evil.example", json!({ "restart": { "initial-backoff-ms": 200 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let x = runtime.lookup("evil.example", "x").unwrap();
    let status = || runtime.discover(&Query { name: Some("x".into()), ..Query::default() }).first().map(|r| r.status);

    assert_eq!(status(), Some(hyperty_host::registry::Status::Live));
    assert_eq!(driver.ask(&x, json!({ "panic": true })).body.code, Some(500));
    assert_eq!(status(), Some(hyperty_host::registry::Status::Failed), "failed while it waits for its restart");
    wait_event(&mut events, |e| e.address == x && matches!(e.kind, EventKind::Restarted { .. }));
    assert_eq!(status(), Some(hyperty_host::registry::Status::Live));

    let stopping = TestBundle::new()
        .hyperty("stop.example", "y", &guest("hostile"), json!({ "mode": "vault" }))
        .domain("stop.example", json!({ "restart": { "policy": "stop" } }));
    runtime.deploy(&stopping.load()).unwrap();
    let y = runtime.lookup("stop.example", "y").unwrap();
    assert_eq!(driver.ask(&y, json!({ "panic": true })).body.code, Some(500));
    wait_event(&mut events, |e| e.address == y && matches!(e.kind, EventKind::Stopped { .. }));
    assert!(runtime.lookup("stop.example", "y").is_none(), "a hyperty stopped for good is unregistered");
}

#[test]
fn addresses_are_kept_across_a_runtime_restart_when_asked() {
    let data = tempfile::tempdir().unwrap();
    let start = || {
        hyperty_host::Runtime::new(hyperty_host::RuntimeConfig {
            cache_dir: cache_dir(),
            data_dir: Some(data.path().to_owned()),
            ..hyperty_host::RuntimeConfig::default()
        })
        .unwrap()
    };
    let bundle = TestBundle::new()
        .hyperty("alice.example", "kept", &guest("pong"), json!({}))
        .hyperty("alice.example", "fresh", &guest("pong"), json!({}))
        .set("alice.example", "kept", "keep-address", json!(true));

    let first = start();
    first.deploy(&bundle.load()).unwrap();
    let (runtime_address, kept, fresh) =
        (first.address().clone(), first.lookup("alice.example", "kept").unwrap(), first.lookup("alice.example", "fresh").unwrap());
    assert_eq!(runtime_address.scheme(), "runtime");
    drop(first);

    let second = start();
    second.deploy(&bundle.load()).unwrap();
    assert_eq!(second.address(), &runtime_address, "the runtime keeps its address");
    assert_eq!(second.lookup("alice.example", "kept"), Some(kept.clone()), "a hyperty that asked keeps its address");
    assert_ne!(second.lookup("alice.example", "fresh"), Some(fresh), "the others get new ones");
    // And it answers there.
    let mut driver = Driver::new(&second);
    assert_eq!(driver.read(&kept).body.code, Some(200));

    // Without a data directory nothing is kept.
    let third = runtime(Duration::from_secs(5));
    assert_ne!(third.address(), &runtime_address);
}

#[test]
fn registrations_are_announced_to_the_domain_registry_with_keep_alives() {
    use hyperty_host::MessageType;
    let runtime = hyperty_host::Runtime::new(hyperty_host::RuntimeConfig {
        cache_dir: cache_dir(),
        registry_keep_alive: Duration::from_millis(50),
        ..hyperty_host::RuntimeConfig::default()
    })
    .unwrap();
    // The embedder stands in for alice.example's remote registry (a
    // protostub will carry these to the real one).
    let registry = runtime.endpoint_unchecked("domain://registry.alice.example", 1000).unwrap();
    let bundle = TestBundle::new()
        .hyperty("alice.example", "x", &guest("pong"), json!({}))
        .set("alice.example", "x", "types", json!(["chat"]));
    runtime.deploy(&bundle.load()).unwrap();
    let x = runtime.lookup("alice.example", "x").unwrap();
    let next = |pred: &dyn Fn(&hyperty_host::Message) -> bool| loop {
        let m = registry.recv_timeout(Duration::from_secs(10)).expect("an announcement");
        assert_eq!(&m.from, runtime.address(), "announced by the runtime");
        assert_eq!(m.body.resource.as_deref(), Some(x.as_str()));
        if pred(&m) {
            return serde_json::from_str::<Value>(m.body.value.as_deref().unwrap()).unwrap();
        }
    };
    let created = next(&|m| m.kind == MessageType::Create);
    assert_eq!((created["name"].as_str(), created["hyperty-types"].clone()), (Some("x"), json!(["chat"])));
    assert_eq!(next(&|m| m.kind == MessageType::Update)["status"], "live");
    assert_eq!(next(&|m| m.kind == MessageType::Update)["keep-alive"], true);
    assert_eq!(next(&|m| m.kind == MessageType::Update)["keep-alive"], true, "refreshed again");
    assert!(runtime.undeploy("alice.example", "x"));
    next(&|m| m.kind == MessageType::Delete);
}

#[test]
fn a_served_domain_registry_keeps_refreshed_registrations_and_expires_silent_ones() {
    use hyperty_host::registry::Status;
    use hyperty_host::{Message, MessageType, Query};
    use std::time::Instant;
    /// Long enough that a keep-alive sent right after the last was applied
    /// is never late, short enough to wait for a few of them.
    const EXPIRY: Duration = Duration::from_millis(1000);
    let runtime = hyperty_host::Runtime::new(hyperty_host::RuntimeConfig {
        cache_dir: cache_dir(),
        registry_keep_alive: Duration::from_millis(50),
        registry_expiry: Some(EXPIRY),
        serve_registries: vec!["alice.example".into()],
        ..hyperty_host::RuntimeConfig::default()
    })
    .unwrap();
    // This runtime's own hyperty: announced to the registry it serves, and
    // discovered once (as its own), not twice.
    let bundle = TestBundle::new().hyperty("alice.example", "local", &guest("pong"), json!({}));
    runtime.deploy(&bundle.load()).unwrap();
    // Another runtime of alice.example announcing (the embedder's endpoint
    // stands in for a remote runtime whose protostub delivers here).
    let remote = runtime.endpoint_unchecked("runtime://alice.example/remote-1", 64).unwrap();
    let registry = Address::parse("domain://registry.alice.example").unwrap();
    let far = "hyperty://alice.example/far-away";
    let announce = |id: u64, kind: MessageType, value: Value| {
        let mut m = Message::new(id, kind, remote.address().clone(), registry.clone(), Some(value.to_string()));
        m.body.resource = Some(far.into());
        remote.send(m).unwrap();
    };
    announce(1, MessageType::Create, json!({ "address": far, "kind": "hyperty", "name": "chat", "domain": "alice.example",
        "user": "carol@idp.example", "hyperty-types": ["chat"], "schemes": ["comm"], "status": "created" }));
    announce(2, MessageType::Update, json!({ "status": "live" }));
    // Bad announcements are dropped, the registry keeps serving.
    announce(3, MessageType::Create, json!({ "address": "hyperty://bob.example/x", "kind": "hyperty", "name": "x", "domain": "bob.example", "status": "live" }));
    announce(4, MessageType::Create, json!({ "nonsense": true }));
    let by_type = || runtime.discover(&Query { hyperty_type: Some("chat".into()), ..Default::default() });
    let names = |q: Query| runtime.discover(&q).into_iter().map(|r| r.name).collect::<Vec<_>>();
    let status = || by_type().first().map(|r| r.status);
    wait_until("the remote registration becomes live", || status() == Some(Status::Live));
    let found = by_type();
    assert_eq!((found.len(), found[0].address.as_str(), found[0].user.as_deref()), (1, far, Some("carol@idp.example")));
    assert_eq!(names(Query { domain: Some("alice.example".into()), ..Default::default() }), ["chat", "local"], "own hyperty once, remote one too");
    assert!(names(Query { domain: Some("bob.example".into()), ..Default::default() }).is_empty(), "a foreign registration was refused");
    // Refreshed by keep-alives it stays, well past the expiry: each
    // keep-alive flips the status, and the next goes once the registry has
    // applied it (seen through discovery), so they follow each other as
    // fast as the registry takes them, never paced against the expiry.
    let refreshing = Instant::now();
    let mut id = 10;
    while refreshing.elapsed() < 3 * EXPIRY {
        let next = if status() == Some(Status::Live) { Status::Disconnected } else { Status::Live };
        let name = if next == Status::Live { "live" } else { "disconnected" };
        announce(id, MessageType::Update, json!({ "keep-alive": true, "status": name }));
        id += 1;
        wait_until("a keep-alive is applied", || status() == Some(next));
    }
    assert_eq!(by_type().len(), 1, "kept while refreshed");
    // Silent, it expires; the local hyperty, kept alive by this runtime,
    // stays: still there once a registration announced after the first
    // one's expiry has expired too (a full expiry later).
    wait_until("the silent registration expires", || by_type().is_empty());
    let later = "hyperty://alice.example/later";
    let mut m = Message::new(40, MessageType::Create, remote.address().clone(), registry.clone(), Some(json!({ "address": later,
        "kind": "hyperty", "name": "later", "domain": "alice.example", "status": "live" }).to_string()));
    m.body.resource = Some(later.into());
    remote.send(m).unwrap();
    let alice = || names(Query { domain: Some("alice.example".into()), ..Default::default() });
    wait_until("the later registration is kept", || alice().contains(&"later".to_owned()));
    wait_until("the later registration expires", || !alice().contains(&"later".to_owned()));
    assert_eq!(alice(), ["local"]);
    // Created again, then deleted: gone at once.
    announce(50, MessageType::Create, json!({ "address": far, "kind": "hyperty", "name": "chat", "domain": "alice.example", "hyperty-types": ["chat"], "status": "live" }));
    wait_until("created again", || !by_type().is_empty());
    announce(51, MessageType::Delete, json!({}));
    wait_until("deleted", || by_type().is_empty());
}
