//! Scheduling of deliveries: the hand-off path (a domain's thread running
//! the delivery to an idle domain itself) keeps the guarantees of the
//! queued path — a receiver on a sender's thread is still stopped by its
//! own call deadline and does not make its sender fail, and messages of
//! one sender reach one receiver in the order they were sent.

use std::collections::BTreeMap;
use std::time::Duration;

use hyperty_host::{Address, EventKind, Message, MessageType};
use hyperty_tests::*;
use serde_json::{Value, json};

/// Asks the hostile `flood` hyperty at `flooder` to send `count`
/// notifications to `to` (without waiting for its answer); the request id.
fn start_flood(driver: &mut Driver, flooder: &Address, to: &Address, count: u64) -> u64 {
    let id = driver.fresh_id();
    let value = json!({ "to": to.to_string(), "count": count }).to_string();
    let msg = Message::new(id, MessageType::Execute, driver.address().clone(), flooder.clone(), Some(value));
    driver.endpoint.request(msg, Some(Duration::from_secs(60))).unwrap();
    id
}

/// The answer to the flood request `id`: its code and its counts.
fn flood_result(driver: &Driver, id: u64) -> (u16, Value) {
    let answer = driver.expect(|m| m.kind == MessageType::Response && m.id == id);
    let counts = answer.body.value.as_deref().map_or(Value::Null, |v| serde_json::from_str(v).unwrap());
    (answer.body.code.unwrap_or(0), json!({ "counts": counts, "description": answer.body.description }))
}

#[test]
fn a_hyperty_looping_in_handle_on_the_hand_off_path_is_stopped_at_its_deadline_and_its_sender_goes_on() {
    let runtime = runtime(Duration::from_secs(30));
    let mut driver = Driver::new(&runtime);
    let mut events = runtime.events();
    // The looping receiver's deadline is longer than its sender's whole
    // deadline: run on the sender's thread, its time is given back to the
    // sender, or the sender would be interrupted too.
    let bundle = TestBundle::new()
        .hyperty("sender.example", "flood", &guest("hostile"), json!({ "mode": "flood" }))
        .hyperty("sender.example", "other", &guest("puppet"), puppet_config(true))
        .domain("sender.example", json!({ "limits": { "call-timeout-ms": 100 } }))
        .hyperty("looper.example", "loop", &guest("hostile"), json!({ "mode": "loop" }))
        .domain("looper.example", json!({ "limits": { "call-timeout-ms": 300 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let (flooder, looper) = (runtime.lookup("sender.example", "flood").unwrap(), runtime.lookup("looper.example", "loop").unwrap());

    // The flooder runs on sender.example's thread; looper.example is idle,
    // so the first notification is handled right there, and loops.
    let id = start_flood(&mut driver, &flooder, &looper, 3);
    let (code, result) = flood_result(&driver, id);
    assert_eq!(code, 200, "the sender finished its call: {result}");
    assert_eq!(result["counts"]["sent"], 3, "{result}");
    let trapped = wait_event(&mut events, |e| e.address == looper && matches!(e.kind, EventKind::Trapped { .. }));
    assert!(matches!(&trapped.kind, EventKind::Trapped { reason } if reason.contains("ran past its call deadline (call-timeout-ms = 300)")), "{trapped:?}");
    // The looper restarts, and loops again on its next message: the sender
    // still finishes, and so does its domain's next call.
    wait_event(&mut events, |e| e.address == looper && matches!(e.kind, EventKind::Restarted { .. }));
    let id = start_flood(&mut driver, &flooder, &looper, 2);
    let (code, result) = flood_result(&driver, id);
    assert_eq!((code, &result["counts"]["sent"]), (200, &json!(2)), "{result}");
    wait_event(&mut events, |e| e.address == looper && matches!(e.kind, EventKind::Trapped { .. }));
    let other = runtime.lookup("sender.example", "other").unwrap();
    assert_eq!(driver.read(&other).body.code, Some(200), "the sender's domain still answers");
    let (healthy, a, b) = healthy_pair(&runtime);
    driver.still_works(&a, &b);
    drop((healthy, bundle));
}

#[test]
fn a_hyperty_sleeping_in_a_host_call_on_the_hand_off_path_is_stopped_at_its_deadline() {
    let runtime = runtime(Duration::from_secs(30));
    let mut driver = Driver::new(&runtime);
    let mut events = runtime.events();
    let bundle = TestBundle::new()
        .hyperty("sender.example", "flood", &guest("hostile"), json!({ "mode": "flood" }))
        .hyperty("sender.example", "other", &guest("puppet"), puppet_config(true))
        .hyperty("sleeper.example", "sleep", &guest("hostile"), json!({ "mode": "sleep" }))
        .domain("sleeper.example", json!({ "limits": { "call-timeout-ms": 300 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let (flooder, sleeper) = (runtime.lookup("sender.example", "flood").unwrap(), runtime.lookup("sleeper.example", "sleep").unwrap());
    let id = start_flood(&mut driver, &flooder, &sleeper, 2);
    let (code, result) = flood_result(&driver, id);
    assert_eq!((code, &result["counts"]["sent"]), (200, &json!(2)), "{result}");
    let trapped = wait_event(&mut events, |e| e.address == sleeper && matches!(e.kind, EventKind::Trapped { .. }));
    assert!(matches!(&trapped.kind, EventKind::Trapped { reason } if reason.contains("ran past its call deadline (call-timeout-ms = 300)")), "{trapped:?}");
    let other = runtime.lookup("sender.example", "other").unwrap();
    assert_eq!(driver.read(&other).body.code, Some(200), "the sender's domain still answers");
    drop(bundle);
}

#[test]
fn messages_of_one_sender_reach_one_receiver_in_order_under_hand_off() {
    const SENDERS: usize = 6;
    const COUNT: u64 = 1000;
    const ROUNDS: usize = 4;
    let runtime = runtime(Duration::from_secs(30));
    let mut driver = Driver::new(&runtime);
    let mut bundle = TestBundle::new()
        .hyperty("receiver.example", "r", &guest("puppet"), puppet_config(false))
        .domain("receiver.example", json!({ "limits": { "inbox": 8192 } }));
    for s in 0..SENDERS {
        bundle = bundle.hyperty(&format!("s{s}.example"), "flood", &guest("hostile"), json!({ "mode": "flood" }));
    }
    runtime.deploy(&bundle.load()).unwrap();
    let receiver = runtime.lookup("receiver.example", "r").unwrap();
    let flooders: Vec<Address> = (0..SENDERS).map(|s| runtime.lookup(&format!("s{s}.example"), "flood").unwrap()).collect();

    // All senders at once, each on its domain's thread: deliveries run on
    // the senders' threads when the receiver is idle, queue when it is not.
    // Which of the two each message takes is up to the race: a few rounds.
    for _ in 0..ROUNDS {
        let ids: Vec<u64> = flooders.iter().map(|f| start_flood(&mut driver, f, &receiver, COUNT)).collect();
        let mut sent = BTreeMap::new();
        for (flooder, id) in flooders.iter().zip(ids) {
            let (code, result) = flood_result(&driver, id);
            assert_eq!(code, 200, "{result}");
            let n = result["counts"]["sent"].as_u64().unwrap();
            assert!(n > 0, "{result}");
            sent.insert(flooder.to_string(), n);
        }
        // The receiver reports each message it handles, in the order it
        // handles them.
        let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for _ in 0..sent.values().sum::<u64>() {
            let m = driver.expect(|m| m.kind == MessageType::Forward && m.from == receiver);
            let r = reported(&m);
            got.entry(r["from"].as_str().unwrap().to_owned()).or_default().push(r["id"].as_u64().unwrap());
        }
        for (flooder, n) in &sent {
            let ids = got.get(flooder).map_or(&[][..], Vec::as_slice);
            assert_eq!(ids.len() as u64, *n, "every message of {flooder} accepted was handled");
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "{flooder}'s messages were handled out of order: {ids:?}");
        }
    }
    // Nothing more came: everything handled was reported above.
    assert!(driver.before_marker(&receiver).is_empty());
}

/// A guest that loops while lending a little work to a fast receiver at
/// every epoch tick cannot buy itself time: its call is still stopped (the
/// lent time is credited rounded down, and a call lends at most its own
/// deadline). Found in review: a credit rounded up to a whole tick per
/// deadline check let such a call run for as long as it kept sending.
#[test]
fn a_call_that_keeps_lending_to_a_fast_receiver_is_still_stopped_at_its_deadline() {
    let runtime = runtime(Duration::from_secs(30));
    let mut driver = Driver::new(&runtime);
    let mut events = runtime.events();
    let bundle = TestBundle::new()
        .hyperty("sender.example", "flood", &guest("hostile"), json!({ "mode": "flood" }))
        .domain("sender.example", json!({ "limits": { "call-timeout-ms": 100, "rate": 100_000_000, "burst": 1_000_000 } }))
        .hyperty("sink.example", "sink", &guest("bench"), json!({ "role": "sink" }))
        .domain("sink.example", json!({ "limits": { "rate": 100_000_000, "burst": 1_000_000 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let (flooder, sink) = (runtime.lookup("sender.example", "flood").unwrap(), runtime.lookup("sink.example", "sink").unwrap());
    // A hundred million notifications: hours, unless the deadline stops it.
    start_flood(&mut driver, &flooder, &sink, 100_000_000);
    let trapped = wait_event(&mut events, |e| e.address == flooder && matches!(e.kind, EventKind::Trapped { .. }));
    assert!(matches!(&trapped.kind, EventKind::Trapped { reason } if reason.contains("ran past its call deadline")), "{trapped:?}");
    drop(bundle);
}
