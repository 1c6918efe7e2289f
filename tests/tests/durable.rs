//! Durable delivery between runtimes (issue #19): protostubs with
//! `durable = true` keep their queue in the runtime's data directory and
//! carry messages through NATS JetStream (a JetStream-enabled nats-server,
//! its store in a temporary directory). A sender, a receiver or the server
//! is killed with SIGKILL mid-stream and started again; each time every
//! message arrives exactly once, counted by the sink (`guests/bench` with
//! `"ids": true`: every id it saw, and those seen twice) and, on the
//! sending side, by the durable queue (what it sends again, and that it
//! ends empty).

use std::path::Path;
use std::time::Duration;

use hyperty_host::{Address, Message, MessageType, Runtime, RuntimeConfig};
use hyperty_tests::jetstream::{Ids, JetStream, RuntimeProcess, ask, ids, wait_ids};
use hyperty_tests::*;
use serde_json::{Value, json};

const SINK: &str = "hyperty://bob.example/sink";
const DRIVER: &str = "hyperty://alice.example/driver";
const HARNESS: &str = "hyperty://bench.example/harness";
/// bob.example's JetStream stream.
const BOB_STREAM: &str = "rethink_bob_example";

/// The body of the child runtime processes ([`RuntimeProcess`]).
#[test]
#[ignore = "run by the durable tests in a child process"]
fn durable_child() {
    hyperty_tests::jetstream::durable_child();
}

/// `bundle` with durable NATS protostubs for every domain of the tests
/// (`extra` adds to each stub's config).
fn durable_stubs(mut bundle: TestBundle, servers: &[String], extra: Value) -> TestBundle {
    let mut config = json!({ "ack-timeout-ms": 1000 });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    for domain in ["alice.example", "bob.example", "bench.example"] {
        bundle = bundle.protostub(domain, servers, json!({ "durable": true, "queue": 10_000, "config": config }));
    }
    bundle
}

/// The sink, at the fixed address [`SINK`] (so what is sent while its
/// runtime is down finds it again).
fn sink_bundle(servers: &[String]) -> TestBundle {
    let sink = TestBundle::new()
        .hyperty("bob.example", "sink", &guest("bench"), json!({ "role": "sink", "ids": true }))
        .set("bob.example", "sink", "address", json!(SINK));
    durable_stubs(sink, servers, json!({}))
}

/// The sink at [`SINK`] with `config`, its domain set up with `settings`.
fn sink_bundle_with(servers: &[String], config: Value, settings: Value) -> TestBundle {
    let sink = TestBundle::new()
        .hyperty("bob.example", "sink", &guest("bench"), config)
        .set("bob.example", "sink", "address", json!(SINK))
        .domain("bob.example", settings);
    durable_stubs(sink, servers, json!({}))
}

/// The driver, at [`DRIVER`]; `start`: the run (first id, count) it sends
/// from `init`; `stub`: more config of its runtime's stubs.
fn driver_bundle(servers: &[String], start: Option<(u64, u64)>, stub: Value) -> TestBundle {
    let mut config = json!({ "role": "driver" });
    if let Some((first, count)) = start {
        config["start"] = json!({ "to": SINK, "mode": "notify", "first": first, "count": count });
    }
    let driver = TestBundle::new()
        .hyperty("alice.example", "driver", &guest("bench"), config)
        .set("alice.example", "driver", "address", json!(DRIVER))
        // A run is sent within one call: each message is written to disk first.
        .domain("alice.example", json!({ "limits": { "call-timeout-ms": 120_000 } }));
    durable_stubs(driver, servers, stub)
}

/// A runtime in this process keeping its data in `data` (a runtime that
/// had it a moment ago may still be letting it go: tried for 10 s).
fn durable_runtime(data: &Path) -> Runtime {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let config = || RuntimeConfig {
        cache_dir: cache_dir(),
        data_dir: Some(data.to_owned()),
        request_timeout: Duration::from_secs(30),
        ..hyperty_tests::engines::config()
    };
    let mut runtime = None;
    wait_until("the data directory is free", || {
        runtime = Runtime::new(config()).ok();
        runtime.is_some()
    });
    runtime.unwrap()
}

/// A runtime in this process (keeping its data in `data`) with the sink,
/// and the harness endpoint there.
fn receiving_runtime(servers: &[String], data: &Path) -> (Runtime, hyperty_host::Endpoint, TestBundle) {
    let receiver = durable_runtime(data);
    let sinks = sink_bundle(servers);
    receiver.deploy(&sinks.load()).unwrap();
    let harness = receiver.endpoint(HARNESS, 1024).unwrap();
    (receiver, harness, sinks)
}

fn address(text: &str) -> Address {
    Address::parse(text).unwrap()
}

/// Messages in the protostub queue of `domain` in `runtime` (its metric).
fn stub_queue(runtime: &Runtime, domain: &str) -> u64 {
    metric(runtime, "hyperty_stub_queue_messages", domain)
}

/// The value of metric `name` of `domain` in `runtime`.
fn metric(runtime: &Runtime, name: &str, domain: &str) -> u64 {
    let text = runtime.metrics_text();
    let label = format!("domain=\"{domain}\"");
    let line = text.lines().find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label));
    line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or_else(|| panic!("no {name} of {domain}:\n{text}"))
}

/// Has the driver send the notifications `first..first + count` to the sink
/// (through `harness`); each send has returned (and is on disk) when this
/// returns.
fn notify(harness: &hyperty_host::Endpoint, first: u64, count: u64) {
    let run = json!({ "to": SINK, "mode": "notify", "first": first, "count": count });
    let answer = ask(harness, &address(DRIVER), run, Duration::from_secs(120)).expect("the driver answers");
    assert_eq!(answer.body.code, Some(200), "the run from {first}: {:?}", answer.body);
}

/// The server is killed (SIGKILL) mid-stream and started again on its
/// store: the senders' durable queue sends again what was not
/// acknowledged (the server finds the duplicates by `Nats-Msg-Id`), the
/// receiver's durable consumer goes on where it was.
#[test]
fn a_server_killed_mid_stream_and_restarted_on_its_store_loses_and_doubles_nothing() {
    let mut js = JetStream::start();
    let servers = [js.endpoint()];
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let receiver = durable_runtime(d2.path());
    let sinks = sink_bundle(&servers);
    receiver.deploy(&sinks.load()).unwrap();
    let sender = durable_runtime(d1.path());
    let drivers = driver_bundle(&servers, None, json!({}));
    sender.deploy(&drivers.load()).unwrap();
    let harness = sender.endpoint(HARNESS, 1024).unwrap();
    let sink = address(SINK);
    ids(&harness, &sink);
    let n = 2000;
    let run = json!({ "to": SINK, "mode": "notify", "first": 1, "count": n });
    let run = Message::new(1 << 40, MessageType::Execute, harness.address().clone(), address(DRIVER), Some(run.to_string()));
    harness.request(run, Some(Duration::from_secs(120))).unwrap();
    wait_ids(&harness, &sink, "a quarter of the stream arrives", |i| i.received >= n / 4);
    js.nats.kill();
    js.nats.restart();
    let done = harness.recv_where(|m| m.id == 1 << 40, Duration::from_secs(120)).expect("the driver finishes its run");
    assert_eq!(done.body.code, Some(200), "{:?}", done.body);
    notify(&harness, n + 1, 1);
    let seen = wait_ids(&harness, &sink, "the marker after the stream arrives", |i| i.highest >= Some(n + 1) && i.received > n);
    assert_eq!(seen, Ids::exactly(1, n + 1), "every message once");
    wait_until("the sender's queue is empty", || stub_queue(&sender, "bob.example") == 0);
}

/// The sender is killed (SIGKILL) with messages published but not
/// acknowledged to it (its stub ignores PubAcks after the 500th, as if
/// they were lost on the way) and started again: it publishes again what
/// it kept, which the server finds to be duplicates; nothing is lost or
/// doubled.
#[test]
fn a_sender_killed_mid_stream_sends_again_what_was_not_acknowledged_and_nothing_arrives_twice() {
    let js = JetStream::start();
    let servers = [js.endpoint()];
    let data = tempfile::tempdir().unwrap();
    let (_receiver, harness, _sinks) = receiving_runtime(&servers, data.path());
    let sink = address(SINK);
    let n = 2000;
    let first = driver_bundle(&servers, Some((1, n)), json!({ "fault-injection": { "drop-acks-after": 500 } }));
    let mut sender = RuntimeProcess::start(&first.write());
    sender.wait_log(&format!("notify run done: {n} sent"));
    wait_ids(&harness, &sink, "half the stream arrives", |i| i.received >= n / 2);
    sender.kill();
    // Started again with only a marker to send after what it kept.
    let again = driver_bundle(&servers, Some((n + 1, 1)), json!({}));
    sender.restart(&again.write());
    let log = sender.wait_log("sending again what was not acknowledged stub=\"bob.example\"");
    let line = log.lines().find(|l| l.contains("sending again") && l.contains("bob.example"));
    let line = line.unwrap_or_else(|| panic!("bob.example's queue sent nothing again:\n{log}"));
    let kept: u64 = line
        .split("messages=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("how many were sent again is not logged: {line}"));
    assert!(kept >= n - 500, "the restarted sender kept {kept} messages, fewer than the {} never acknowledged to it", n - 500);
    let seen = wait_ids(&harness, &sink, "the marker after the stream arrives", |i| i.highest >= Some(n + 1) && i.received > n);
    assert_eq!(seen, Ids::exactly(1, n + 1), "every message once");
}

/// A sender whose durable queue emptied, then killed (SIGKILL) while idle,
/// sends nothing again after its restart: the removal that emptied the
/// queue was synced (the others are not, each resent after a crash would
/// be dropped by the receiver's kept ids, but only within its window).
#[test]
fn a_sender_killed_idle_after_its_queue_emptied_sends_nothing_again() {
    let js = JetStream::start();
    let servers = [js.endpoint()];
    let data = tempfile::tempdir().unwrap();
    let (_receiver, harness, _sinks) = receiving_runtime(&servers, data.path());
    let sink = address(SINK);
    let first = driver_bundle(&servers, Some((1, 50)), json!({}));
    let mut sender = RuntimeProcess::start(&first.write());
    sender.wait_log("notify run done: 50 sent");
    wait_ids(&harness, &sink, "the run arrives", |i| i.received >= 50);
    let prefix = nats_subject("bob.example", SINK, "alice.example");
    // The receiver acknowledged every envelope, so the server had stored
    // each one and sent its PubAck to the sender.
    js.wait_all_acknowledged(BOB_STREAM, prefix.rsplit_once('.').unwrap().0);
    // Stored and acknowledged by the server is not yet read by the sender:
    // its stubs take a PubAck when they next read, and remove the envelope
    // from their disk after that (synced when the queue empties). Not only
    // bob.example's: what the sender's runtime sends its own domain's
    // services (registry announcements) waits in alice.example's.
    sender.wait_stub_queues_empty();
    sender.kill();
    let again = driver_bundle(&servers, Some((51, 1)), json!({}));
    sender.restart(&again.write());
    sender.wait_log("notify run done: 1 sent");
    let seen = wait_ids(&harness, &sink, "the marker arrives", |i| i.highest >= Some(51));
    assert_eq!(seen, Ids::exactly(1, 51));
    let log = sender.log();
    assert!(!log.contains("sending again what was not acknowledged"), "the restarted sender sent again what was delivered:\n{log}");
}

/// The sending runtime in this process (the driver, and the harness
/// endpoint there, on a data directory of its own) and `sinks` in a
/// runtime process, the sink answering.
fn sender_and_receiver_process(servers: &[String], sinks: &TestBundle) -> ((Runtime, tempfile::TempDir), hyperty_host::Endpoint, Address, RuntimeProcess) {
    let data = tempfile::tempdir().unwrap();
    let sender = durable_runtime(data.path());
    sender.deploy(&driver_bundle(servers, None, json!({})).load()).unwrap();
    let harness = sender.endpoint(HARNESS, 1024).unwrap();
    let sink = address(SINK);
    let receiver = RuntimeProcess::start(&sinks.write());
    ids(&harness, &sink);
    ((sender, data), harness, sink, receiver)
}

/// The receiver is killed (SIGKILL) while it holds messages delivered and
/// not acknowledged (it was stopped with SIGSTOP while a run was
/// published) and started again: its durable consumer goes on from what
/// it acknowledged, and what it held is delivered again after `ack_wait`.
#[test]
fn a_receiver_killed_mid_stream_gets_what_it_held_again_and_nothing_it_had() {
    let js = JetStream::start();
    let servers = [js.endpoint()];
    let sinks = sink_bundle(&servers);
    let ((sender, _data), harness, sink, mut receiver) = sender_and_receiver_process(&servers, &sinks);
    notify(&harness, 1, 500);
    let seen = wait_ids(&harness, &sink, "the first run arrives", |i| i.received >= 500);
    assert_eq!(seen, Ids::exactly(1, 500));
    let prefix = nats_subject("bob.example", SINK, "x");
    let prefix = prefix.rsplit_once('.').unwrap().0;
    js.wait_all_acknowledged(BOB_STREAM, prefix);
    receiver.pause();
    notify(&harness, 501, 1000);
    wait_until("the sender's queue is empty", || stub_queue(&sender, "bob.example") == 0);
    receiver.kill();
    receiver.restart(&sinks.write());
    let seen = wait_ids(&harness, &sink, "the second run arrives", |i| i.received >= 1000);
    notify(&harness, 1501, 1);
    let all = wait_ids(&harness, &sink, "the marker arrives", |i| i.highest >= Some(1501) && i.received > 1000);
    assert_eq!(all, Ids::exactly(501, 1501), "the restarted receiver gets the second run once, and nothing of the first ({seen:?} before the marker)");
}

/// A durable receiver acknowledges an envelope only once its hyperty has
/// handled it. Killed (SIGKILL) while envelopes wait in the sink's inbox
/// behind a slow one, the restarted receiver gets every envelope not
/// handled, and none that was: the sink logs each slow id it finished, so
/// the test knows where the crash fell. The slow ids logged may come
/// again: the one window of durable delivery (ARCHITECTURE.md) is a
/// receiver killed between its hyperty's `handle` returning and the commit
/// of the envelope's record (at once while the stub's post waits for it,
/// else at the stub's next post), and the log line is written inside
/// `handle`.
#[test]
fn a_receiver_killed_while_envelopes_wait_in_a_hyperty_s_inbox_gets_them_again_and_none_it_handled() {
    let js = JetStream::start();
    let servers = [js.endpoint()];
    // Ids 100..=104 take the sink a while each (~0.1-0.5 s).
    let slow = json!({ "role": "sink", "ids": true, "slow": { "from": 100, "to": 104, "spin": 300_000_000 } });
    let sinks = sink_bundle_with(&servers, slow, json!({ "limits": { "call-timeout-ms": 30_000 } }));
    let (_sender, harness, sink, mut receiver) = sender_and_receiver_process(&servers, &sinks);
    notify(&harness, 1, 300);
    wait_until("the sink finished id 100", || receiver.log().contains("handled 100"));
    receiver.pause();
    let log = receiver.log();
    let handled = log.lines().filter_map(|l| l.split("handled ").nth(1)?.trim().parse::<u64>().ok()).max().unwrap();
    receiver.kill();
    receiver.restart(&sinks.write());
    notify(&harness, 301, 1);
    let all = wait_ids(&harness, &sink, "what was not handled arrives", |i| {
        i.highest >= Some(301) && i.lowest.is_some_and(|lowest| lowest <= handled + 1 && i.received > 301 - lowest)
    });
    // Ids before 100 were handled at once, so recorded before their posts
    // returned; from the first slow one, an id whose post stopped waiting
    // is recorded at the stub's next post, and may come again.
    let from = all.lowest.unwrap_or(0);
    assert!(
        (100..=handled + 1).contains(&from) && all == Ids::exactly(from, 301),
        "the restarted receiver gets exactly what was not handled before the crash (up to {handled}; from 100, perhaps again): {all:?}"
    );
}

/// A runtime that undeploys a hyperty (or stops) stops pulling from its
/// durable consumer but keeps it: deployed again, the hyperty takes up
/// where it acknowledged instead of the stream's whole retention (which
/// the kept ids would catch only for the last 65,536).
#[test]
fn an_undeployed_hyperty_s_durable_consumer_is_kept_for_when_it_comes_back() {
    let js = JetStream::start();
    let servers = [js.endpoint()];
    let data = tempfile::tempdir().unwrap();
    let (receiver, harness, _sinks) = receiving_runtime(&servers, data.path());
    let sink = address(SINK);
    let prefix = nats_subject("bob.example", SINK, "alice.example");
    let again = TestBundle::new().hyperty("bob.example", "sink", &guest("bench"), json!({ "role": "sink", "ids": true })).set("bob.example", "sink", "address", json!(SINK));
    let publish = |seq: u64| {
        let envelope = json!({ "v": 1, "origin": "a-sender", "seq": seq, "id": seq, "type": "update", "from": "hyperty://alice.example/x", "to": SINK, "body": {} });
        assert_eq!(js.api(&prefix, &envelope.to_string())["stream"], BOB_STREAM);
    };
    let created = || {
        let consumer = js.consumers(BOB_STREAM).into_iter().find(|c| c["config"]["filter_subject"].as_str().is_some_and(|f| prefix.starts_with(f.trim_end_matches('*'))));
        consumer.map(|c| c["created"].clone())
    };
    wait_until("the sink's consumer is made", || created().is_some());
    publish(1);
    wait_ids(&harness, &sink, "the first envelope arrives", |i| i.received >= 1);
    let before = created();
    assert!(receiver.undeploy("bob.example", "sink"));
    receiver.deploy(&again.load()).expect("the sink deploys again, under the running stubs");
    // Pulled again (the stub forgot, then listened again, in that order).
    publish(2);
    assert_eq!(wait_ids(&harness, &sink, "the second envelope arrives", |i| i.received >= 1), Ids::exactly(2, 2));
    assert_eq!(created(), before, "the consumer was deleted and made again");
}

/// A hyperty slower than its messages arrive never makes its durable stub
/// overrun its poll deadline (a stub's posts wait for hyperties within a
/// budget of the poll, then answer `busy`): a slow sink gets every
/// message once, and the stub never traps.
#[test]
fn a_slow_hyperty_behind_a_durable_stub_gets_everything_once_and_the_stub_never_traps() {
    let js = JetStream::start();
    let servers = [js.endpoint()];
    // Ids 1..=30 take the sink a while each (~0.4 s): one pulled batch
    // takes longer to handle than a stub's poll may last (10 s).
    let slow = json!({ "role": "sink", "ids": true, "slow": { "from": 1, "to": 30, "spin": 400_000_000 } });
    let sinks = sink_bundle_with(&servers, slow, json!({ "limits": { "call-timeout-ms": 30_000 } }));
    let ((_sender, _data), harness, sink, receiver) = sender_and_receiver_process(&servers, &sinks);
    notify(&harness, 1, 60);
    let seen = wait_ids(&harness, &sink, "every message arrives", |i| i.received >= 60);
    assert_eq!(seen, Ids::exactly(1, 60));
    let log = receiver.log();
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("protostub bob.example: failed")).collect();
    assert!(failed.is_empty(), "the stub failed: {}", failed.join("\n"));
}

/// Durable envelopes that arrive while their hyperty restarts after a trap
/// are not answered 503 and acknowledged (gone), but offered again by the
/// node and handled once the hyperty is back.
#[test]
fn durable_envelopes_arriving_while_their_hyperty_restarts_are_handled_after_the_restart() {
    let js = JetStream::start();
    let servers = [js.endpoint()];
    let sinks = sink_bundle_with(&servers, json!({ "role": "sink", "ids": true, "trap_at": 10 }), json!({ "restart": { "initial-backoff-ms": 2000, "max-backoff-ms": 2000 } }));
    let ((_sender, _data), harness, sink, _receiver) = sender_and_receiver_process(&servers, &sinks);
    notify(&harness, 1, 100);
    // Its ledger starts again at the restart: 10 trapped (answered 500),
    // and 11..=100, which came during the 2 s backoff, after it (those
    // offered again come back after later ones: order is not promised
    // across a redelivery).
    let seen = wait_ids(&harness, &sink, "what came during the restart arrives", |i| i.lowest > Some(9) && i.received >= 90);
    assert_eq!(seen, Ids::exactly(11, 100));
}

/// A receiving runtime keeps the ids of the envelopes it took: the same
/// envelope stored twice by the server (published twice without a
/// message id) is dropped when it comes after a restart.
#[test]
fn a_receiver_drops_an_envelope_it_took_before_its_restart() {
    let js = JetStream::start();
    let servers = [js.endpoint()];
    let data = tempfile::tempdir().unwrap();
    let sinks = sink_bundle(&servers);
    let sink = address(SINK);
    let prefix = nats_subject("bob.example", SINK, "alice.example");
    let envelope = |seq: u64| {
        json!({ "v": 1, "origin": "a-sender", "seq": seq, "id": seq, "type": "update", "from": "hyperty://alice.example/x",
                "to": SINK, "body": {} })
        .to_string()
    };
    let publish = |seq: u64| {
        let ack = js.api(&prefix, &envelope(seq));
        assert_eq!(ack["stream"], BOB_STREAM, "stored in bob.example's stream: {ack}");
    };
    let consumer_made = || js.consumers(BOB_STREAM).iter().any(|c| c["config"]["filter_subject"].as_str().is_some_and(|f| prefix.starts_with(f.trim_end_matches('*'))));
    {
        let runtime = durable_runtime(data.path());
        runtime.deploy(&sinks.load()).unwrap();
        let harness = runtime.endpoint(HARNESS, 16).unwrap();
        wait_until("the sink's consumer is made", consumer_made);
        publish(1);
        assert_eq!(wait_ids(&harness, &sink, "the envelope arrives", |i| i.received >= 1), Ids::exactly(1, 1));
    }
    let runtime = durable_runtime(data.path());
    runtime.deploy(&sinks.load()).unwrap();
    let harness = runtime.endpoint(HARNESS, 16).unwrap();
    publish(1);
    publish(2);
    let seen = wait_ids(&harness, &sink, "the second envelope arrives", |i| i.highest >= Some(2));
    assert_eq!(seen, Ids::exactly(2, 2), "the envelope taken before the restart is not taken again");
}

/// A durable queue is bounded: past `queue` messages the sender is answered
/// 503 naming the limit (nothing is dropped); what it holds is kept on
/// disk and sent once the runtime starts again with a node to send to.
#[test]
fn a_full_durable_queue_refuses_the_sender_and_what_it_kept_is_sent_after_a_restart() {
    let closed = closed_port();
    let nowhere = [format!("127.0.0.1:{}", closed.port)];
    let data = tempfile::tempdir().unwrap();
    let stub = |servers: &[String]| TestBundle::new().protostub("bob.example", servers, json!({ "durable": true, "queue": 3 }));
    let unreachable = stub(&nowhere);
    {
        let sender = durable_runtime(data.path());
        sender.deploy(&unreachable.load()).unwrap();
        let app = sender.endpoint("hyperty://app.example/sender", 16).unwrap();
        for id in 1..=4 {
            app.send(Message::new(id, MessageType::Update, app.address().clone(), address(SINK), None)).unwrap();
        }
        let refused = app.recv_where(|m| m.kind == MessageType::Response, Duration::from_secs(10)).expect("the fourth is refused");
        assert_eq!((refused.id, refused.body.code), (4, Some(503)), "{refused:?}");
        let why = refused.body.description.unwrap_or_default();
        assert!(why.contains("the protostub queue of bob.example is full (3 messages)"), "{why}");
        assert_eq!(stub_queue(&sender, "bob.example"), 3);
    }
    let js = JetStream::start();
    let servers = [js.endpoint()];
    let receiving = tempfile::tempdir().unwrap();
    let (_receiver, harness, _sinks) = receiving_runtime(&servers, receiving.path());
    let sender = durable_runtime(data.path());
    let reachable = stub(&servers);
    sender.deploy(&reachable.load()).unwrap();
    let seen = wait_ids(&harness, &address(SINK), "the kept messages arrive", |i| i.received >= 3);
    assert_eq!(seen, Ids::exactly(1, 3));
    wait_until("the sender's queue is empty", || stub_queue(&sender, "bob.example") == 0);
}

/// `durable` needs a data directory: a runtime without one refuses the
/// entry, naming it.
#[test]
fn a_durable_stub_without_a_data_directory_is_refused() {
    let runtime = runtime(Duration::from_secs(5));
    let bundle = TestBundle::new().protostub("bob.example", &["127.0.0.1:4222".into()], json!({ "durable": true }));
    let e = runtime.deploy(&bundle.load()).unwrap_err().to_string();
    assert!(e.contains("durable") && e.contains("data directory"), "{e}");
}

/// A node (played by this test) that answers a durable stub's publish with
/// what is no PubAck of the domain's stream — another stream's, an API
/// error, a message above its own `max_payload` (a protocol error: the stub
/// drops the connection) — and then with the right PubAck twice: each
/// wrong answer leaves the message queued and it is published again under
/// the same `Nats-Msg-Id`; the right one takes it out once.
#[test]
fn answers_that_are_no_pub_ack_of_the_stream_leave_the_message_queued() {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (published, seen) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut publishes = 0;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut writer = stream.try_clone().unwrap();
            let mut reader = std::io::BufReader::new(stream);
            let _ = write!(writer, "INFO {{\"server_id\":\"fake\",\"max_payload\":4096,\"headers\":true}}\r\n");
            let answer = |w: &mut std::net::TcpStream, reply: &str, payload: &str| {
                let _ = write!(w, "MSG {reply} 1 {}\r\n{payload}\r\n", payload.len());
            };
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let words: Vec<&str> = line.split_ascii_whitespace().collect();
                match words.as_slice() {
                    ["PING"] => {
                        let _ = write!(writer, "PONG\r\n");
                    }
                    ["PUB", subject, reply, n] => {
                        let mut body = vec![0; n.parse::<usize>().unwrap() + 2];
                        reader.read_exact(&mut body).unwrap();
                        if subject.starts_with("$JS.API.STREAM.CREATE.") {
                            answer(&mut writer, reply, r#"{"type":"io.nats.jetstream.api.v1.stream_create_response","config":{}}"#);
                        }
                    }
                    ["HPUB", _, reply, h, n] => {
                        let mut body = vec![0; n.parse::<usize>().unwrap() + 2];
                        reader.read_exact(&mut body).unwrap();
                        let headers = String::from_utf8_lossy(&body[..h.parse::<usize>().unwrap()]).into_owned();
                        let id = headers.lines().find_map(|l| l.strip_prefix("Nats-Msg-Id: ")).unwrap_or_default().to_owned();
                        publishes += 1;
                        let _ = published.send(id);
                        match publishes {
                            1 => answer(&mut writer, reply, r#"{"stream":"rethink_other","seq":1}"#),
                            2 => answer(&mut writer, reply, r#"{"error":{"code":503,"err_code":10077,"description":"insufficient resources"}}"#),
                            3 => answer(&mut writer, reply, &"x".repeat(8000)),
                            4 => {
                                answer(&mut writer, reply, r#"{"stream":"rethink_bob_example","seq":1}"#);
                                answer(&mut writer, reply, r#"{"stream":"rethink_bob_example","seq":1,"duplicate":true}"#);
                            }
                            _ => answer(&mut writer, reply, r#"{"stream":"rethink_bob_example","seq":2}"#),
                        }
                    }
                    _ => {}
                }
            }
        }
    });
    let data = tempfile::tempdir().unwrap();
    let sender = durable_runtime(data.path());
    let node = [format!("127.0.0.1:{port}")];
    let bundle = TestBundle::new().protostub("bob.example", &node, json!({ "durable": true, "config": { "ack-timeout-ms": 300 } }));
    sender.deploy(&bundle.load()).unwrap();
    let harness = sender.endpoint(HARNESS, 16).unwrap();
    harness.send(Message::new(1, MessageType::Update, harness.address().clone(), address(SINK), None)).unwrap();
    let next = || seen.recv_timeout(Duration::from_secs(30)).expect("the stub publishes");
    let first: Vec<String> = (0..4).map(|_| next()).collect();
    assert!(!first[0].is_empty() && first.iter().all(|id| *id == first[0]), "one message published four times under one id: {first:?}");
    wait_until("the message leaves the queue", || stub_queue(&sender, "bob.example") == 0);
    harness.send(Message::new(2, MessageType::Update, harness.address().clone(), address(SINK), None)).unwrap();
    let marker = next();
    assert_ne!(marker, first[0], "after the PubAck (twice) the next publish is the next message, not the first again");
    wait_until("the marker leaves the queue", || stub_queue(&sender, "bob.example") == 0);
}

/// `durable` cannot change while the stub runs: a live update that flips it
/// is refused naming the field, and what runs goes on.
#[test]
fn durable_cannot_change_while_the_stub_runs() {
    let data = tempfile::tempdir().unwrap();
    let runtime = durable_runtime(data.path());
    let servers = ["127.0.0.1:4222".to_owned()];
    let plain = TestBundle::new().protostub("bob.example", &servers, json!({}));
    runtime.deploy(&plain.load()).unwrap();
    let durable = TestBundle::new().protostub("bob.example", &servers, json!({ "durable": true }));
    let e = runtime.apply(&durable.load()).unwrap_err().to_string();
    assert!(e.contains(".durable") && e.contains("cannot change while it runs"), "{e}");
}

/// A node without JetStream: the durable stub says so in its status
/// (`disconnected`, naming JetStream) instead of `live`, and keeps what it
/// was given.
#[test]
fn a_node_without_jetstream_is_reported_and_what_is_queued_stays() {
    let nats = Nats::start();
    let data = tempfile::tempdir().unwrap();
    let runtime = durable_runtime(data.path());
    let mut events = runtime.events();
    let bundle = TestBundle::new().protostub("bob.example", &[nats.endpoint()], json!({ "durable": true }));
    runtime.deploy(&bundle.load()).unwrap();
    let app = runtime.endpoint("hyperty://app.example/sender", 16).unwrap();
    app.send(Message::new(1, MessageType::Update, app.address().clone(), address(SINK), None)).unwrap();
    let said = |e: &hyperty_host::Event| {
        matches!(&e.kind, hyperty_host::EventKind::StubStatus { status, detail } if status == "disconnected" && detail.contains("no JetStream"))
    };
    wait_event(&mut events, said);
    assert_eq!(stub_queue(&runtime, "bob.example"), 1, "the message stays queued");
    assert_eq!(metric(&runtime, "hyperty_stub_up", "bob.example"), 0, "the stub is not live");
}
