//! Browser apps in a real browser: headless Chromium (Debian's) runs the
//! chat page (`guests/chat/app`) and the JavaScript client the gateway
//! serves, against the chat bundle (`guests/chat/bundle.toml`) on a real
//! runtime. A test page (`tests/pages/chat-driver.html`) shows the chat page
//! once per user in same-origin frames, drives their real UI and reports
//! what each shows to the test's HTTP endpoint ([`Reports`]).
//!
//! Covered: two users chat through their hyperties and each sees the
//! other's message and the room's members (then a screenshot is kept in
//! `<target>/artifacts/chat.png`); a page from an origin the gateway does
//! not allow is refused; a page without a valid login cannot send; a policy
//! forbidding bob.example → alice.example shows bob's page the 403; a page
//! keeps a replica of a data object from the deltas it gets.

use std::path::Path;
use std::time::{Duration, Instant};

use hyperty_host::gateway::{Gateway, GatewayConfig};
use hyperty_host::{Bundle, Runtime};
use hyperty_tests::browser::{Chromium, Reports, artifacts_dir, encode, one_at_a_time, screenshot};
use hyperty_tests::*;
use serde_json::{Value, json};

const ALICE: (&str, &str) = ("alice.example", "alice@alice.example");
const BOB: (&str, &str) = ("bob.example", "bob@bob.example");

/// The chat bundle on a runtime, its gateway on a free port serving the
/// chat page with the test pages beside it.
struct ChatWorld {
    runtime: Runtime,
    gateway: Gateway,
    reports: Reports,
    /// The gateway's static directory: the chat app and the test pages.
    _site: tempfile::TempDir,
}

/// Copies every file of `from` into `to`.
fn copy_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// A directory with the chat page and the test pages.
fn site() -> tempfile::TempDir {
    let site = tempfile::tempdir().unwrap();
    copy_files(&repo().join("guests/chat/app"), site.path());
    copy_files(&repo().join("tests/pages"), site.path());
    site
}

/// The gateway settings of `bundle`, serving `site` on a free port.
fn gateway_config(bundle: &Bundle, site: &Path) -> GatewayConfig {
    let spec = bundle.gateway.as_ref().expect("the chat bundle has a [gateway]");
    GatewayConfig { static_dir: Some(site.to_owned()), ..GatewayConfig::from_spec(spec) }
}

impl ChatWorld {
    fn start() -> ChatWorld {
        let runtime = runtime(Duration::from_secs(10));
        let bundle = Bundle::load(repo().join("guests/chat/bundle.toml")).expect("the chat bundle loads (re-pin it after changing a guest: `cargo run -p hyperty-host -- pin guests/chat/bundle.toml`)");
        runtime.deploy(&bundle).expect("the chat bundle deploys");
        let site = site();
        let gateway = runtime.serve_gateway("127.0.0.1:0".parse().unwrap(), gateway_config(&bundle, site.path())).expect("the gateway starts");
        ChatWorld { runtime, gateway, reports: Reports::start(), _site: site }
    }

    /// The URL of the driver page at `host` (`127.0.0.1` or another name
    /// of the gateway's address), showing `pages` and reporting to the
    /// test (`mode` "report") or only showing them for a screenshot
    /// ("hold": see `tests/pages/chat-driver.js`).
    fn driver_url(&self, host: &str, pages: &[(&str, (&str, &str))], mode: &str) -> String {
        let pages: Vec<Value> = pages.iter().map(|(name, (domain, user))| json!({ "name": name, "domain": domain, "user": user })).collect();
        let fragment = [("pages", Value::Array(pages).to_string()), (mode, self.reports.url())];
        let fragment: Vec<String> = fragment.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        format!("http://{host}:{}/chat-driver.html#{}", self.gateway.local_addr().port(), fragment.join("&"))
    }

    /// Chromium on the driver page (from the gateway's own origin).
    fn open(&self, pages: &[(&str, (&str, &str))]) -> Chromium {
        Chromium::open(&self.driver_url("127.0.0.1", pages, "report"))
    }
}

/// What a report of `page` shows, in the driver's shape.
fn is_page(r: &Value, page: &str) -> bool {
    r["page"] == page
}

fn shows_members(r: &Value, members: &[&str]) -> bool {
    members.iter().all(|m| r["members"].as_array().is_some_and(|a| a.iter().any(|x| x == m)))
}

fn messages(r: &Value) -> Vec<(String, String)> {
    r["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m["user"].as_str().unwrap_or_default().to_owned(), m["text"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

fn said(user: &str, text: &str) -> (String, String) {
    (user.to_owned(), text.to_owned())
}

fn ready(world: &ChatWorld, browser: &mut Chromium, page: &str) -> Value {
    world.reports.wait(browser, &format!("{page}'s page is ready"), |r| is_page(r, page) && r["state"] == "ready")
}

#[test]
fn two_users_chat_through_their_hyperties() {
    let _browser = one_at_a_time();
    let started = Instant::now();
    let w = ChatWorld::start();
    let mut browser = w.open(&[("alice", ALICE), ("bob", BOB)]);
    ready(&w, &mut browser, "alice");
    ready(&w, &mut browser, "bob");
    // Both joined: each page shows both members, from the room's replica.
    for page in ["alice", "bob"] {
        w.reports.wait(&mut browser, &format!("{page} sees both members"), |r| is_page(r, page) && shows_members(r, &[ALICE.1, BOB.1]));
    }
    w.reports.command(json!({ "op": "say", "page": "alice", "text": "hello bob" }));
    w.reports.wait(&mut browser, "bob sees alice's message", |r| is_page(r, "bob") && messages(r).contains(&said(ALICE.1, "hello bob")));
    w.reports.command(json!({ "op": "say", "page": "bob", "text": "hi alice, <b>not bold</b>" }));
    let expected = vec![said(ALICE.1, "hello bob"), said(BOB.1, "hi alice, <b>not bold</b>")];
    for page in ["alice", "bob"] {
        let seen = w.reports.wait(&mut browser, &format!("{page} sees both messages"), |r| is_page(r, page) && messages(r) == expected);
        assert!(shows_members(&seen, &[ALICE.1, BOB.1]), "{seen}");
        assert_eq!(seen["status"], "", "{seen}");
    }
    // The room is the host's: bob's hyperty observed it too (its replica
    // is what it logs from); nothing is left waiting.
    drop(browser);
    wait_until("the pages' requests are all answered", || w.runtime.pending_requests() == 0);

    // A screenshot of both pages after the exchange, for a person to look at.
    let png = artifacts_dir().join("chat.png");
    screenshot(&w.driver_url("127.0.0.1", &[("alice", ALICE), ("bob", BOB)], "hold"), &png, (1200, 520), Duration::from_secs(5));
    println!("the chat after the exchange: {}", png.display());
    println!("two_users_chat_through_their_hyperties took {:?}", started.elapsed());
}

#[test]
fn a_page_from_an_origin_not_allowed_is_refused() {
    let _browser = one_at_a_time();
    let w = ChatWorld::start();
    // The same gateway and page, by another name: origin
    // http://localhost:<port>, not the gateway's own (http://127.0.0.1:<port>).
    let mut browser = Chromium::open(&w.driver_url("localhost", &[("alice", ALICE)], "report"));
    let refused = w.reports.wait(&mut browser, "alice's page from localhost is refused", |r| is_page(r, "alice") && r["state"] == "error");
    let status = refused["status"].as_str().unwrap();
    assert!(status.starts_with("cannot log in: cannot connect to ws://localhost:"), "{refused}");
    // Its own WebSocket gets no further: the handshake fails (1006 to a page).
    w.reports.command(json!({ "op": "raw", "id": 1, "frames": [{ "type": "login", "domain": ALICE.0, "user": ALICE.1 }] }));
    let raw = w.reports.wait(&mut browser, "the raw connection from localhost closes", |r| is_page(r, "raw"));
    assert_eq!((raw["code"].as_u64(), raw["received"].as_array().map(Vec::len)), (Some(1006), Some(0)), "{raw}");
    assert!(w.reports.all().iter().all(|r| r["state"] != "ready"), "a page from localhost got in: {:?}", w.reports.all());
    // Nobody joined the room.
    drop(browser);
    wait_until("no connection is left open", || w.gateway.connections() == 0);
}

#[test]
fn a_page_without_a_valid_login_cannot_send() {
    let _browser = one_at_a_time();
    let w = ChatWorld::start();
    // mallory is no development user of alice.example.
    let mut browser = w.open(&[("alice", ALICE), ("mallory", (ALICE.0, "mallory@alice.example"))]);
    ready(&w, &mut browser, "alice");
    let refused = w.reports.wait(&mut browser, "mallory's login is refused", |r| is_page(r, "mallory") && r["state"] == "error");
    let status = refused["status"].as_str().unwrap();
    assert!(status.starts_with("cannot log in:") && status.contains("mallory@alice.example"), "{refused}");
    // Its form has nothing to send with.
    w.reports.command(json!({ "op": "say", "page": "mallory", "text": "let me in" }));
    w.reports.wait(&mut browser, "mallory's page says it cannot send", |r| is_page(r, "mallory") && r["status"] == "not sent: not logged in");
    // A hand-made connection fares no better: a message before the login,
    // or a forged assertion, closes it with 1008 and why.
    let forged = jwt([9; 32], ALICE.0, ALICE.1, unix_now() + 300);
    for (id, (frame, why)) in [
        (json!({ "id": 1, "type": "execute", "to": "hyperty://alice.example/x", "body": { "value": { "op": "say", "text": "let me in" } } }), "the first frame must be a login"),
        (json!({ "type": "login", "domain": ALICE.0, "assertion": { "idp": ALICE.0, "token": forged } }), "identity assertion of IdP alice.example refused"),
    ]
    .into_iter()
    .enumerate()
    {
        w.reports.command(json!({ "op": "raw", "id": id, "frames": [frame] }));
        let raw = w.reports.wait(&mut browser, "the raw connection closes", |r| is_page(r, "raw") && r["id"] == id);
        assert_eq!(raw["code"], 1008, "{raw}");
        assert!(raw["reason"].as_str().unwrap().contains(why), "{raw}");
        assert_eq!(raw["received"], json!([]), "{raw}");
    }
    // alice's room never shows mallory's words: once alice's own later
    // message is there, anything before it would be too.
    w.reports.command(json!({ "op": "say", "page": "alice", "text": "anyone?" }));
    w.reports.wait(&mut browser, "alice sees her message", |r| is_page(r, "alice") && messages(r) == vec![said(ALICE.1, "anyone?")]);
    assert!(!w.reports.all().iter().any(|r| r.to_string().contains("let me in") && is_page(r, "alice")), "{:?}", w.reports.all());
}

#[test]
fn a_policy_forbidding_bob_to_alice_shows_bobs_page_the_403() {
    let _browser = one_at_a_time();
    let w = ChatWorld::start();
    let mut browser = w.open(&[("alice", ALICE), ("bob", BOB)]);
    ready(&w, &mut browser, "alice");
    ready(&w, &mut browser, "bob");
    w.reports.command(json!({ "op": "say", "page": "bob", "text": "before" }));
    w.reports.wait(&mut browser, "alice sees bob's first message", |r| is_page(r, "alice") && messages(r) == vec![said(BOB.1, "before")]);
    // Now alice.example refuses everything from bob.example.
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("alice.cedar");
    std::fs::write(
        &policy,
        r#"@id("everything") permit (principal, action, resource);
@id("not-bob") forbid (principal, action, resource) when { context.point == "incoming" && context.sender_domain == "bob.example" };"#,
    )
    .unwrap();
    w.runtime.policies().set_domain_policies(ALICE.0, &[policy]).unwrap();
    w.reports.command(json!({ "op": "say", "page": "bob", "text": "after" }));
    let denied = w.reports.wait(&mut browser, "bob's page shows the 403", |r| is_page(r, "bob") && r["status"].as_str().is_some_and(|s| s.starts_with("not sent: 403")));
    assert!(denied["status"].as_str().unwrap().contains("not-bob"), "the 403 names the policy: {denied}");
    // alice's room has only bob's first message, and alice still talks.
    w.reports.command(json!({ "op": "say", "page": "alice", "text": "still here" }));
    let alice = w.reports.wait(&mut browser, "alice sees her message", |r| is_page(r, "alice") && messages(r).len() == 2);
    assert_eq!(messages(&alice), vec![said(BOB.1, "before"), said(ALICE.1, "still here")], "{alice}");
}

#[test]
fn a_page_keeps_a_replica_of_a_data_object_across_a_reconnect() {
    let _browser = one_at_a_time();
    let runtime = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&runtime);
    let bundle = TestBundle::new().hyperty(ALICE.0, "reporter", &guest("puppet"), puppet_config(true));
    runtime.deploy(&bundle.load()).unwrap();
    let reporter = runtime.lookup(ALICE.0, "reporter").unwrap();
    let site = site();
    let config = GatewayConfig {
        dev_users: [(ALICE.0.to_owned(), vec![ALICE.1.to_owned()])].into(),
        static_dir: Some(site.path().to_owned()),
        ..GatewayConfig::default()
    };
    let gateway = runtime.serve_gateway("127.0.0.1:0".parse().unwrap(), config.clone()).unwrap();
    let addr = gateway.local_addr();
    let reports = Reports::start();
    let created = driver.command(&reporter, json!({ "op": "create", "scheme": "comm", "data": { "n": 0, "list": [] } }));
    let url = created["url"].as_str().unwrap().to_owned();
    let page = format!(
        "http://{addr}/replica.html#report={}&domain={}&user={}&url={}",
        encode(&reports.url()),
        encode(ALICE.0),
        encode(ALICE.1),
        encode(&url)
    );
    let mut browser = Chromium::open(&page);
    let shows = |browser: &mut Chromium, what: &str, data: Value, children: Value| {
        reports.wait(browser, what, |r| r["page"] == "replica" && r["data"] == data && r["children"] == children)
    };
    let first = shows(&mut browser, "the page subscribed", json!({ "n": 0, "list": [] }), json!({}));
    assert_eq!(first["change"], "subscribed", "{first}");
    // Deltas: a patch of every kind of operation, children, and their versions.
    let update = |driver: &mut Driver, patch: Value| {
        let answer = driver.command(&reporter, json!({ "op": "update", "url": url, "patch": patch }));
        answer["version"].as_u64().unwrap_or_else(|| panic!("{answer}"))
    };
    update(&mut driver, json!([{ "op": "replace", "path": "/n", "value": 1 }, { "op": "add", "path": "/list/-", "value": "a" }]));
    shows(&mut browser, "the first patch", json!({ "n": 1, "list": ["a"] }), json!({}));
    let v = update(
        &mut driver,
        json!([
            { "op": "add", "path": "/list/0", "value": "z" },
            { "op": "copy", "from": "/list", "path": "/copy" },
            { "op": "move", "from": "/n", "path": "/m~1n" },
            { "op": "test", "path": "/m~1n", "value": 1 },
            { "op": "remove", "path": "/copy/1" }
        ]),
    );
    let seen = shows(&mut browser, "the second patch", json!({ "list": ["z", "a"], "copy": ["z"], "m/n": 1 }), json!({}));
    assert_eq!(seen["version"].as_u64(), Some(v), "{seen}");
    driver.command(&reporter, json!({ "op": "set-child", "url": url, "name": "c", "data": { "x": 1 } }));
    shows(&mut browser, "a child", json!({ "list": ["z", "a"], "copy": ["z"], "m/n": 1 }), json!({ "c": { "x": 1 } }));
    driver.command(&reporter, json!({ "op": "remove-child", "url": url, "name": "c" }));
    shows(&mut browser, "the child removed", json!({ "list": ["z", "a"], "copy": ["z"], "m/n": 1 }), json!({}));

    // The gateway goes away and comes back on the same port: the page is
    // told what it lost, reconnects, subscribes again and catches up.
    drop(gateway);
    update(&mut driver, json!([{ "op": "replace", "path": "/list", "value": ["while away"] }]));
    let lost = reports.wait(&mut browser, "the page is told it lost the connection", |r| r["status"]["state"] == "disconnected");
    assert_eq!(lost["status"]["lost"]["subscriptions"], json!([url]), "{lost}");
    let gateway = runtime.serve_gateway(addr, config).expect("the gateway binds its port again");
    let back = reports.wait(&mut browser, "the page reconnects", |r| r["status"]["state"] == "connected");
    assert_eq!(back["status"]["resubscribed"], json!([url]), "{back}");
    shows(&mut browser, "the state missed while away", json!({ "list": ["while away"], "copy": ["z"], "m/n": 1 }), json!({}));
    update(&mut driver, json!([{ "op": "add", "path": "/list/-", "value": "back" }]));
    shows(&mut browser, "a delta after the reconnect", json!({ "list": ["while away", "back"], "copy": ["z"], "m/n": 1 }), json!({}));
    driver.command(&reporter, json!({ "op": "delete", "url": url }));
    reports.wait(&mut browser, "the object deleted", |r| r["page"] == "replica" && r["deleted"] == true);
    drop(browser);
    wait_until("the page's connection is gone", || gateway.connections() == 0);
}
