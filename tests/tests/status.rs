//! `hyperty status` (issue 20, "Seeing inside"): what a running runtime
//! runs, read from `GET /status` on its metrics endpoint, as tables.

use hyperty_host::{Runtime, RuntimeConfig};
use hyperty_tests::metrics::http;
use hyperty_tests::update::CliProcess;
use hyperty_tests::*;
use serde_json::{Value, json};

fn status(addr: std::net::SocketAddr) -> Value {
    let answer = http(addr, b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.headers["content-type"], "application/json");
    serde_json::from_str(&answer.body).unwrap()
}

#[test]
fn the_status_counts_each_hyperty_s_messages_in_and_out() {
    const N: u64 = 12;
    let runtime = Runtime::new(RuntimeConfig { cache_dir: cache_dir(), ..RuntimeConfig::default() }).unwrap();
    let server = runtime.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = pair(&runtime, false);
    for n in 0..N {
        let cmd = json!({ "op": "send", "message": { "type": "update", "to": b.to_string(), "value": json!({ "n": n }).to_string() } });
        assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
    }
    // b (not echoing) reports each update to the observer: N in, N out.
    for n in 0..N {
        let text = json!({ "n": n }).to_string();
        driver.report(&b, |m| m["type"] == "update" && m["value"].as_str() == Some(text.as_str()));
    }
    let counted = |want_in: u64, want_out: u64| move |h: &Value| h["messages_in"].as_u64() >= Some(want_in) && h["messages_out"].as_u64() >= Some(want_out);
    status_when(server.local_addr(), a.as_str(), counted(N, 2 * N));
    let status = status_when(server.local_addr(), b.as_str(), counted(N, N));
    assert_eq!(status["runtime"], runtime.address().to_string());
    let of = |address: &hyperty_host::Address| status["hyperties"].as_array().unwrap().iter().find(|h| h["address"] == address.as_str()).cloned().unwrap();
    let (ha, hb) = (of(&a), of(&b));
    assert_eq!((&ha["domain"], &ha["name"], &ha["status"]), (&json!("alice.example"), &json!("a"), &json!("live")));
    // a: N commands in, N sends and N answers out.
    assert_eq!((ha["messages_in"].as_u64(), ha["messages_out"].as_u64()), (Some(N), Some(2 * N)), "{ha}");
    assert_eq!((hb["messages_in"].as_u64(), hb["messages_out"].as_u64()), (Some(N), Some(N)), "{hb}");
    assert!(ha["memory_bytes"].as_u64().unwrap() > 0, "{ha}");
    let domains: Vec<&str> = status["domains"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(domains, ["alice.example", "bob.example"]);
    // Undeployed: gone from the status.
    runtime.undeploy("bob.example", "b");
    wait_until("b is gone from the status", || !status_of(server.local_addr()).contains(b.as_str()));
}

#[test]
fn a_hyperty_s_messages_out_go_on_counting_across_its_restart() {
    let runtime = Runtime::new(RuntimeConfig { cache_dir: cache_dir(), ..RuntimeConfig::default() }).unwrap();
    let server = runtime.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut events = runtime.events();
    let mut driver = Driver::new(&runtime);
    let bundle = TestBundle::new().hyperty("restarts.example", "h", &guest("hostile"), json!({ "mode": "hoard", "owner": OBSERVER, "secret": "s" }));
    runtime.deploy(&bundle.load()).expect("deploys");
    let h = runtime.lookup("restarts.example", "h").unwrap();
    let hoard_nothing = json!({ "mb": 0 });
    for _ in 0..3 {
        assert_eq!(driver.command(&h, hoard_nothing.clone()), json!({ "held_mb": 0 }));
    }
    // It traps (the host answers that message 500), and is restarted.
    assert_eq!(driver.ask(&h, json!({ "panic": true })).body.code, Some(500));
    wait_event(&mut events, |e| e.address == h && matches!(e.kind, hyperty_host::EventKind::Restarted { .. }));
    assert_eq!(driver.command(&h, hoard_nothing), json!({ "held_mb": 0 }));
    let status = status_when(server.local_addr(), h.as_str(), |h| h["messages_in"].as_u64() >= Some(5) && h["messages_out"].as_u64() >= Some(4));
    let hs = status["hyperties"].as_array().unwrap().iter().find(|x| x["address"] == h.as_str()).cloned().unwrap();
    // 5 in; 4 answers out: 3 before the restart, 1 after (a counter that
    // went back to 1 would read as a reset to whoever scrapes it).
    assert_eq!((hs["messages_in"].as_u64(), hs["messages_out"].as_u64()), (Some(5), Some(4)), "{hs}");
}

/// The status once `address`'s entry satisfies `done` (a hyperty's counts
/// are updated when its call returns, after what it sent in the call has
/// reached the test), within 10 s.
fn status_when(addr: std::net::SocketAddr, address: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    wait_until(&format!("the status of {address} shows its counts"), || {
        last = status(addr);
        last["hyperties"].as_array().unwrap().iter().find(|h| h["address"] == address).is_some_and(&done)
    });
    last
}

fn status_of(addr: std::net::SocketAddr) -> String {
    status(addr).to_string()
}

#[test]
fn hyperty_status_lists_a_running_bundle() {
    let closed = closed_port();
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(true))
        .protostub("carol.example", &[format!("127.0.0.1:{}", closed.port)], json!({ "preload": true }));
    let path = bundle.write();
    let mut run = CliProcess::start(&["run", path.to_str().unwrap(), "--metrics", "127.0.0.1:0"]);
    let addr = run.metrics_addr().to_string();
    let log = run.wait_log("running; press Ctrl-C", 1);
    let address = |label: &str| {
        let at = log.find(&format!("deployed {label} at ")).unwrap() + format!("deployed {label} at ").len();
        log[at..].split(' ').next().unwrap().to_owned()
    };
    let (status, table) = CliProcess::start(&["status", &addr]).finish();
    assert!(status.success(), "{table}");
    let lines: Vec<&str> = table.lines().collect();
    let row = |start: &str| lines.iter().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("no {start:?} row:\n{table}")).split_whitespace().collect::<Vec<_>>();
    assert!(lines.iter().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["DOMAIN", "INSTANCES", "MEMORY", "INBOX"]), "{table}");
    assert_eq!(row("alice.example ")[1], "1", "{table}");
    for (label, _) in [("alice.example/a", ()), ("bob.example/b", ())] {
        let r = row(label);
        assert_eq!((r[1], r[2]), (address(label).as_str(), "live"), "{table}");
    }
    let stub = row("carol.example");
    assert!(["created", "in-progress", "disconnected", "failed"].contains(&stub[1]), "{table}");
    // Nothing running there: a clear error.
    let (status, _) = CliProcess::start(&["status", &closed_port().port.to_string()]).finish();
    assert!(!status.success());
}

/// The child process of the CLI tests (see [`CliProcess`]).
#[test]
#[ignore = "run by the CLI tests in a child process"]
fn cli_child() {
    hyperty_tests::update::cli_child();
}
