//! The embedder API as an embedder uses it (issue 13, "Embedder API"):
//! request/reply with other messages kept in order, endpoints bound to a
//! user or an assertion, message builders, the typed bundle builder, the
//! crate's event receiver and the addresses an endpoint may take — each
//! through the public API against real components on the real bus.

use std::time::Duration;

use hyperty_host::bundle::{Component, Domain, Hyperty};
use hyperty_host::events::{RecvError, RecvTimeoutError, TryRecvError};
use hyperty_host::message::Assertion;
use hyperty_host::{Acting, Bundle, Digest, EndpointError, EventKind, Limits, MessageType, RequestError, SendError};
use hyperty_tests::*;
use serde_json::{Value, json};

const IDP: &str = "idp.example";
const IDP_KEY: [u8; 32] = [7; 32];

/// The value of a message, as JSON.
fn value(m: &hyperty_host::Message) -> Value {
    serde_json::from_str(m.body.value.as_deref().unwrap_or("null")).unwrap()
}

#[test]
fn request_reply_returns_the_response_and_keeps_every_other_message_in_order_for_recv() {
    let runtime = runtime(Duration::from_secs(5));
    let bundle = TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), puppet_config(true));
    runtime.deploy(&bundle.load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    // The endpoint is b's observer: b reports every message it gets to it.
    let observer = runtime.endpoint(OBSERVER, 64).unwrap();
    let mut sent = Vec::new();
    for n in 0..3 {
        let m = observer.message(MessageType::Update, b.as_str()).value(json!({ "n": n }).to_string()).build().unwrap();
        sent.push(m.id);
        observer.send(m).unwrap();
    }
    let request = observer.message(MessageType::Read, b.as_str()).value(r#"{"q":1}"#).build().unwrap();
    let id = request.id;
    let response = observer.request_reply(request, None).unwrap();
    assert_eq!((response.kind, response.id, response.body.code), (MessageType::Response, id, Some(200)));
    assert_eq!((&response.from, value(&response)), (&b, json!({ "q": 1 })));
    // b's reports of the three notifications and of the request came
    // before its response: all kept, in order.
    sent.push(id);
    let reported: Vec<Value> = (0..4).map(|_| reported(&observer.recv_timeout(Duration::from_secs(10)).expect("a report"))["id"].clone()).collect();
    assert_eq!(reported, sent.iter().map(|&i| json!(i)).collect::<Vec<_>>());
    assert!(observer.try_recv().is_none(), "nothing else came");
}

#[test]
fn request_reply_returns_the_hosts_answers_and_refusals() {
    let runtime = runtime(Duration::from_secs(5));
    let bundle = TestBundle::new().hyperty("bob.example", "mute", &guest("puppet"), puppet_config(false));
    runtime.deploy(&bundle.load()).unwrap();
    let mute = runtime.lookup("bob.example", "mute").unwrap();
    let e = runtime.endpoint("hyperty://app.example/e", 16).unwrap();
    let nobody = e.request_reply(e.message(MessageType::Read, "hyperty://bob.example/nobody").build().unwrap(), None).unwrap();
    assert_eq!(nobody.body.code, Some(404));
    assert!(nobody.body.description.unwrap().contains("hyperty://bob.example/nobody"));
    let silent = e.message(MessageType::Read, mute.as_str()).build().unwrap();
    let timed_out = e.request_reply(silent, Some(Duration::from_millis(200))).unwrap();
    assert_eq!((timed_out.body.code, &timed_out.from), (Some(408), &mute));
    // A request the bus refuses at once is an error, not a response.
    let bad = e.message(MessageType::Read, mute.as_str()).value("\"x\"").build().unwrap();
    let mut spoofed = bad.clone();
    spoofed.from = mute.clone();
    assert!(matches!(e.request_reply(spoofed, None), Err(RequestError::Send(SendError::SpoofedFrom(_)))));
    assert_eq!(runtime.pending_requests(), 0, "nothing left pending");
}

#[test]
fn concurrent_request_replies_on_one_endpoint_each_get_their_own_response() {
    let runtime = runtime(Duration::from_secs(10));
    let bundle = TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), puppet_config(true));
    runtime.deploy(&bundle.load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    let e = runtime.endpoint("hyperty://app.example/e", 64).unwrap();
    std::thread::scope(|s| {
        for t in 0..3 {
            let (e, b) = (&e, &b);
            s.spawn(move || {
                for n in 0..30 {
                    let m = e.message(MessageType::Execute, b.as_str()).value(json!({ "t": t, "n": n }).to_string()).build().unwrap();
                    let answer = e.request_reply(m, None).unwrap();
                    assert_eq!((answer.body.code, value(&answer)), (Some(200), json!({ "t": t, "n": n })));
                }
            });
        }
    });
    assert!(e.try_recv().is_none(), "no response was left over for recv");
}

#[test]
fn an_endpoint_bound_to_a_user_speaks_for_that_user() {
    let runtime = runtime(Duration::from_secs(5));
    let bundle = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(true));
    runtime.deploy(&bundle.load()).unwrap();
    let a = runtime.lookup("alice.example", "a").unwrap();
    let driver = Driver::new(&runtime);
    let app = runtime.endpoint_as("app://alice.example/console", 16, Acting::User("alice@alice.example".into())).unwrap();
    assert_eq!(app.user(), Some("alice@alice.example"));
    let anonymous = runtime.endpoint("app://alice.example/anonymous", 16).unwrap();
    for (e, identity) in [(&app, json!(["alice@alice.example", "alice.example"])), (&anonymous, Value::Null)] {
        let m = e.message(MessageType::Update, a.as_str()).build().unwrap();
        let id = m.id;
        e.send(m).unwrap();
        let report = driver.report(&a, |r| r["id"] == id && r["from"] == e.address().as_str());
        assert_eq!(report["identity"], identity, "{report}");
    }
    for bad in ["", "alice\n@x"] {
        let refused = runtime.endpoint_as("app://alice.example/bad", 16, Acting::User(bad.into())).err().unwrap();
        assert!(matches!(&refused, EndpointError::Identity(why) if why.contains("is not a user name")), "{refused}");
    }
}

#[test]
fn an_endpoint_bound_to_an_assertion_gets_the_validated_user_and_is_asserted_across_domains() {
    let runtime = runtime(Duration::from_secs(5));
    let bundle = TestBundle::new()
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(true))
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(true))
        .idp(IDP, IDP_KEY, &["alice.example", "bob.example"])
        // b is bound to no user: its answers into alice.example carry no
        // assertion.
        .domain("alice.example", json!({ "require-identity": false }));
    runtime.deploy(&bundle.load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    let token = jwt(IDP_KEY, IDP, "alice@idp.example", unix_now() + 600);
    let assertion = Assertion { idp: IDP.into(), token: token.into() };
    let app = runtime.endpoint_as("app://alice.example/web", 16, Acting::Assertion(assertion.clone())).unwrap();
    assert_eq!(app.user(), Some("alice@idp.example"));
    // bob.example requires identity: the bound endpoint's request is
    // asserted and answered; an unbound one of alice.example gets 401.
    let answer = app.request_reply(app.message(MessageType::Read, b.as_str()).build().unwrap(), None).unwrap();
    assert_eq!(answer.body.code, Some(200), "{answer:?}");
    let anonymous = runtime.endpoint("app://alice.example/anonymous", 16).unwrap();
    let refused = anonymous.request_reply(anonymous.message(MessageType::Read, b.as_str()).build().unwrap(), None).unwrap();
    assert_eq!(refused.body.code, Some(401), "{refused:?}");
    let driver = Driver::new(&runtime);
    let m = app.message(MessageType::Update, b.as_str()).build().unwrap();
    let id = m.id;
    app.send(m).unwrap();
    assert_eq!(driver.report(&b, |r| r["id"] == id)["identity"], json!(["alice@idp.example", IDP]));
    // Refused assertions: expired, another key, an IdP the domain does not
    // trust, a domain with no IdP; each names why.
    let expired = Assertion { idp: IDP.into(), token: jwt(IDP_KEY, IDP, "alice@idp.example", unix_now() - 3600).into() };
    let forged = Assertion { idp: IDP.into(), token: jwt([9; 32], IDP, "alice@idp.example", unix_now() + 600).into() };
    let other = Assertion { idp: "other.example".into(), token: assertion.token.clone() };
    for (address, assertion, why) in [
        ("app://alice.example/x1", expired, "expired"),
        ("app://alice.example/x2", forged, "signature not made by a key of idp.example"),
        ("app://alice.example/x3", other, "alice.example trusts IdP idp.example, not other.example"),
        ("app://carol.example/x4", assertion, "carol.example trusts no IdP, not idp.example"),
    ] {
        let e = runtime.endpoint_as(address, 16, Acting::Assertion(assertion)).err().expect("refused");
        assert!(matches!(&e, EndpointError::Identity(reason) if reason.contains(why)), "{address}: {e}");
    }
}

#[test]
fn message_builders_fill_from_and_ids_and_name_the_field_that_is_wrong() {
    let runtime = runtime(Duration::from_secs(5));
    let e = runtime.endpoint("hyperty://app.example/builder", 16).unwrap();
    let m = e.message(MessageType::Create, "hyperty://b.example/x").value(r#"{"a":[1,2]}"#).resource("room").build().unwrap();
    assert_eq!((m.from.as_str(), m.to.as_str(), m.kind), ("hyperty://app.example/builder", "hyperty://b.example/x", MessageType::Create));
    assert_eq!((m.body.value.as_deref(), m.body.resource.as_deref(), m.body.code), (Some(r#"{"a":[1,2]}"#), Some("room"), None));
    let next = e.message(MessageType::Read, "hyperty://b.example/x").build().unwrap();
    assert_eq!(next.id, m.id + 1, "fresh ids");
    let reply = e.reply(&next, 201).value("true").build().unwrap();
    let builder_address = "hyperty://app.example/builder";
    assert_eq!((reply.id, reply.kind, reply.from.as_str(), reply.to.as_str(), reply.body.code), (next.id, MessageType::Response, builder_address, builder_address, Some(201)));
    for (built, field, why) in [
        (e.message(MessageType::Create, "b.example/x").build(), "to", "is not an address"),
        (e.message(MessageType::Create, "hyperty://b.example/a b").build(), "to", "' ' at byte 21"),
        (e.message(MessageType::Update, "hyperty://b.example/x").value("{\"a\":").build(), "body.value", "not JSON"),
        (e.message(MessageType::Update, "hyperty://b.example/x").value("[1e999]").build(), "body.value", "out of a double's range"),
        (e.message(MessageType::Update, "hyperty://b.example/x").code(200).build(), "body.code", "only a response has a code, not a update"),
        (e.reply(&next, 600).build(), "body.code", "600 is not a response code"),
        (hyperty_host::Message::builder(1, MessageType::Read, "nowhere", "hyperty://b.example/x").build(), "from", "is not an address"),
    ] {
        let err = built.unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().starts_with(&format!("{field}: ")) && err.reason.contains(why), "{err}");
    }
}

#[test]
fn endpoints_take_hyperty_and_app_addresses_only() {
    let runtime = runtime(Duration::from_secs(5));
    let _ok = runtime.endpoint("hyperty://alice.example/me", 4).unwrap();
    let _app = runtime.endpoint("app://alice.example/page-1", 4).unwrap();
    let refused = |address: &str| runtime.endpoint(address, 4).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{address} accepted"));
    for (address, why) in [
        ("domain://registry.alice.example", "domain:// addresses are the domain's own services"),
        ("domain://idp.alice.example", "domain:// addresses are the domain's own services"),
        (runtime.address().as_str(), "runtime:// addresses are runtimes' own"),
        ("runtime://alice.example/other", "runtime:// addresses are runtimes' own"),
        ("comm://alice.example/room", "comm:// is a data object's scheme"),
        ("hyperty://alice.example", "needs a path"),
        ("hyperty://alice.example/", "needs a path"),
        ("alice", "is not an address"),
    ] {
        let shown = refused(address);
        assert!(shown.starts_with("endpoint address") && shown.contains(why), "{address}: {shown}");
    }
    assert_eq!(runtime.endpoint("hyperty://alice.example/me", 4).err(), Some(EndpointError::InUse(hyperty_host::Address::parse("hyperty://alice.example/me").unwrap())));
    // A hyperty's address is in use too.
    let bundle = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false));
    runtime.deploy(&bundle.load()).unwrap();
    let a = runtime.lookup("alice.example", "a").unwrap();
    assert!(matches!(runtime.endpoint(a.as_str(), 4), Err(EndpointError::InUse(_))));
    // A refusal takes nothing: the registry address still reaches nobody
    // but the runtime's own route.
    let e = runtime.endpoint("hyperty://alice.example/asker", 4).unwrap();
    let answer = e.request_reply(e.message(MessageType::Read, "domain://registry.alice.example").build().unwrap(), None).unwrap();
    assert_eq!(answer.body.code, Some(404), "{answer:?}");
}

#[test]
fn a_built_bundle_equals_the_same_bundle_read_from_toml_and_runs_components_given_as_bytes() {
    let puppet = guest("puppet");
    let builder = Bundle::builder("built")
        .domain("alice.example", Domain::new().limits(Limits { memory_mb: 32, rate: 500, ..Limits::default() }).require_identity(false))
        .hyperty("alice.example", Hyperty::new("a", Component::file(&puppet)).config(puppet_config(true)).user("alice@alice.example").types(["chat"]))
        .hyperty("bob.example", Hyperty::new("b", Component::file(&puppet)).config(puppet_config(false)).keep_address(true));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("built.toml");
    std::fs::write(&path, builder.to_toml().unwrap()).unwrap();
    let mut built = builder.build().unwrap();
    let loaded = Bundle::load(&path).unwrap();
    assert_eq!(built.path, std::path::PathBuf::from("<bundle built>"));
    built.path = loaded.path.clone();
    assert_eq!(format!("{built:?}"), format!("{loaded:?}"));
    assert_eq!(built.domains[0].hyperties[0].sha256, Digest::of(&std::fs::read(&puppet).unwrap()), "the pin is computed");
    assert_eq!(built.domains[0].settings.limits.memory_mb, 32);

    // Components as bytes: deployed and running.
    let runtime = runtime(Duration::from_secs(5));
    let bytes = std::fs::read(&puppet).unwrap();
    let in_memory = Bundle::builder("memory")
        .hyperty("carol.example", Hyperty::new("c", Component::bytes("puppet.wasm", bytes.clone())).config(puppet_config(true)))
        .build()
        .unwrap();
    runtime.deploy(&in_memory).unwrap();
    let c = runtime.lookup("carol.example", "c").unwrap();
    let e = runtime.endpoint("hyperty://app.example/e", 4).unwrap();
    let answer = e.request_reply(e.message(MessageType::Read, c.as_str()).value("7").build().unwrap(), None).unwrap();
    assert_eq!((answer.body.code, value(&answer)), (Some(200), json!(7)));

    // A pin given is checked at deployment, naming both digests.
    let wrong = Digest::of(b"something else");
    let pinned = Bundle::builder("pinned")
        .hyperty("dave.example", Hyperty::new("d", Component::bytes("puppet.wasm", bytes)).config(puppet_config(true)))
        .hyperty("dave.example", Hyperty::new("e", Component::file(&puppet).pinned(wrong)).config(puppet_config(true)))
        .build()
        .unwrap();
    let shown = runtime.deploy(&pinned).unwrap_err().to_string();
    assert!(shown.contains("domains.\"dave.example\".hyperties[1].sha256") && shown.contains(&format!("pins {wrong}")), "{shown}");
    assert!(runtime.lookup("dave.example", "d").is_none(), "all or nothing");
}

#[test]
fn the_bundle_builder_names_the_field_of_each_problem() {
    let shown = |b: hyperty_host::bundle::BundleBuilder| b.build().unwrap_err().to_string();
    let missing = shown(Bundle::builder("x").hyperty("a.example", Hyperty::new("h", Component::file("/no/such/file.wasm"))));
    assert!(missing.contains("<bundle x>: domains.\"a.example\".hyperties[0].component: cannot read /no/such/file.wasm"), "{missing}");
    let limits = shown(
        Bundle::builder("x")
            .domain("a.example", Domain::new().limits(Limits { memory_mb: 0, ..Limits::default() }))
            .hyperty("a.example", Hyperty::new("h", Component::bytes("h.wasm", vec![1]))),
    );
    assert!(limits.contains("domains.\"a.example\".limits: memory-mb must be in"), "{limits}");
    let name = shown(Bundle::builder("x").hyperty("a.example", Hyperty::new("no/slash", Component::bytes("h.wasm", vec![1]))));
    assert!(name.contains("domains.\"a.example\".hyperties[0].name: \"no/slash\" is not a name"), "{name}");
    let empty = shown(Bundle::builder("x").domain("a.example", Domain::new()));
    assert!(empty.contains("domains.\"a.example\".hyperties: the domain has no hyperty"), "{empty}");
    let twice = shown(
        Bundle::builder("x")
            .hyperty("a.example", Hyperty::new("h", Component::bytes("h.wasm", vec![1])))
            .hyperty("a.example", Hyperty::new("g", Component::bytes("h.wasm", vec![2]))),
    );
    assert!(twice.contains("hyperties[1].component: two different components are named h.wasm"), "{twice}");
    let bytes = Bundle::builder("x").hyperty("a.example", Hyperty::new("h", Component::bytes("h.wasm", vec![1]))).to_toml().unwrap_err().to_string();
    assert!(bytes.contains("<memory>/h.wasm is given as bytes"), "{bytes}");
}

#[test]
fn events_come_through_the_crates_receiver_blocking_or_not() {
    let runtime = runtime(Duration::from_secs(5));
    let mut events = runtime.events();
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(events.recv_timeout(Duration::from_millis(20)), Err(RecvTimeoutError::Timeout));
    let bundle = TestBundle::new().hyperty("evil.example", "x", &guest("hostile"), json!({ "mode": "trap", "owner": OBSERVER, "secret": "s" }));
    runtime.deploy(&bundle.load()).unwrap();
    let evil = runtime.lookup("evil.example", "x").unwrap();
    let e = runtime.endpoint("hyperty://app.example/e", 4).unwrap();
    // A thread blocked in `recv` gets the trap as it happens.
    let trapped = std::thread::scope(|s| {
        let waiter = s.spawn(|| events.recv());
        let answer = e.request_reply(e.message(MessageType::Read, evil.as_str()).build().unwrap(), None).unwrap();
        assert_eq!(answer.body.code, Some(500), "{answer:?}");
        waiter.join().unwrap()
    });
    let trapped = trapped.unwrap();
    assert!(trapped.address == evil && matches!(&trapped.kind, EventKind::Trapped { reason } if reason.contains("panic")), "{trapped:?}");
    // Once the runtime is gone, a receiver waiting is told so rather than
    // left waiting (after the events still kept for it).
    let mut late = runtime.events();
    drop(e);
    let end = std::thread::scope(|s| {
        let waiter = s.spawn(move || {
            loop {
                match late.recv_timeout(Duration::from_secs(10)) {
                    Ok(_) => continue,
                    Err(end) => break (end, late),
                }
            }
        });
        drop(runtime);
        waiter.join().unwrap()
    });
    let (end, mut late) = end;
    assert_eq!(end, RecvTimeoutError::Closed);
    assert!(matches!(late.recv(), Err(RecvError::Closed)));
    assert_eq!(late.try_recv(), Err(TryRecvError::Closed));
}

#[test]
fn what_an_endpoint_sets_aside_is_bounded_by_its_capacity_and_nothing_is_lost() {
    let runtime = runtime(Duration::from_secs(5));
    // The observer, holding 3 messages: a filler's 3 updates fill it (an
    // endpoint's delivery is synchronous: they are in its channel now).
    let observer = runtime.endpoint(OBSERVER, 3).unwrap();
    let filler = runtime.endpoint("hyperty://app.example/filler", 10).unwrap();
    let sent: Vec<u64> = (0..3)
        .map(|_| {
            let m = filler.message(MessageType::Update, OBSERVER).build().unwrap();
            let id = m.id;
            filler.send(m).unwrap();
            id
        })
        .collect();
    // A responder that answers at once, sending again while the observer
    // is full (a patient sender obeying back-pressure): its answer lands
    // while request_reply is setting the updates aside, or after.
    let responder = runtime.endpoint("hyperty://app.example/responder", 10).unwrap();
    let answering = std::thread::spawn(move || {
        let request = responder.recv_timeout(Duration::from_secs(10)).expect("the request reaches the responder");
        loop {
            match responder.send(responder.reply(&request, 200).build().unwrap()) {
                Err(SendError::InboxFull(_)) => std::thread::sleep(Duration::from_millis(1)),
                other => return other,
            }
        }
    });
    // request_reply sets the 3 updates aside, then takes no more: the
    // answer stays in the channel and it gives up, saying why.
    let request = observer.message(MessageType::Read, "hyperty://app.example/responder").build().unwrap();
    let id = request.id;
    match observer.request_reply(request, Some(Duration::from_secs(1))) {
        Err(RequestError::NoResponse { id: no, unread, .. }) => assert_eq!((no, unread), (id, 3)),
        other => panic!("{other:?}"),
    }
    answering.join().unwrap().expect("the answer was taken");
    // Nothing was lost: the updates in order, then the response nobody
    // waits for any more.
    let mut got: Vec<(MessageType, u64)> = Vec::new();
    while got.len() < 4 {
        let m = observer.recv_timeout(Duration::from_secs(10)).expect("every message is kept");
        got.push((m.kind, m.id));
    }
    let expected: Vec<(MessageType, u64)> = sent.iter().map(|&i| (MessageType::Update, i)).chain([(MessageType::Response, id)]).collect();
    assert_eq!(got, expected);
}
