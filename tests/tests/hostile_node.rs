//! A hostile NATS node: scripted fake nodes on loopback that try to make
//! the `nats-stub` guest or its host misbehave (a node, and whoever can
//! publish on it, is untrusted: `host/SECURITY.md`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyperty_host::{Address, EventKind, Runtime};
use hyperty_tests::*;
use serde_json::{Value, json};

const DOMAINS: [&str; 3] = ["alice.example", "bob.example", "app.example"];
const LABEL: &str = "protostub bob.example";

/// A fake node: `handler(index, stream)` runs for each accepted connection
/// on its own thread. Returns the port and the count of connections.
fn node(handler: impl Fn(usize, TcpStream) + Send + Sync + 'static) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let index = counted.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            std::thread::spawn(move || handler(index, stream));
        }
    });
    (port, count)
}

fn info(port: u16, max_payload: Value) -> String {
    let info = json!({ "server_id": "hostile", "version": "2.10.0", "proto": 1, "host": "127.0.0.1", "port": port,
        "headers": true, "max_payload": max_payload });
    format!("INFO {info}\r\n")
}

/// INFO, then the handshake (CONNECT, PING answered PONG). The reader for
/// what the stub sends next.
fn greet(stream: &mut TcpStream, port: u16, max_payload: Value) -> Option<BufReader<TcpStream>> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    stream.write_all(info(port, max_payload).as_bytes()).ok()?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line.trim_end() == "PING" {
            break;
        }
    }
    stream.write_all(b"PONG\r\n").ok()?;
    Some(reader)
}

/// Reads every line the stub sends into `lines` until it hangs up.
fn drain(mut reader: BufReader<TcpStream>, lines: Arc<Mutex<Vec<String>>>) {
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        lines.lock().unwrap().push(line.trim_end().to_owned());
        line.clear();
    }
}

/// [`drain`], keeping in `writer` the connection of bob.example's stub
/// (the one that subscribes to a bob.example subject).
fn drain_bob(mut reader: BufReader<TcpStream>, lines: Arc<Mutex<Vec<String>>>, stream: TcpStream, writer: Arc<Mutex<Option<TcpStream>>>) {
    let mut line = String::new();
    let mut stream = Some(stream);
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line.starts_with("SUB rethink.bob_example.")
            && let Some(s) = stream.take()
        {
            *writer.lock().unwrap() = Some(s);
        }
        lines.lock().unwrap().push(line.trim_end().to_owned());
        line.clear();
    }
}

/// Runtime: alice.example/a and bob.example/b (puppets reporting to the
/// driver), every domain's stub on `endpoint`; bob.example's stub loaded
/// by a message to a remote bob.example address.
fn runtime_on(endpoint: &str, config: Value) -> (Runtime, Driver, Address, Address, hyperty_host::EventReceiver, TestBundle) {
    runtime_with(endpoint, endpoint, config)
}

/// [`runtime_on`] with bob.example's stub on `bob` and the others on `others`.
fn runtime_with(bob: &str, others: &str, config: Value) -> (Runtime, Driver, Address, Address, hyperty_host::EventReceiver, TestBundle) {
    let r = runtime(Duration::from_secs(30));
    let events = r.events();
    let mut driver = Driver::new(&r);
    let mut bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(false));
    for domain in DOMAINS {
        let endpoint = if domain == "bob.example" { bob } else { others };
        bundle = bundle.protostub(domain, &[endpoint.to_owned()], json!({ "config": config.clone() }));
    }
    r.deploy(&bundle.load()).unwrap();
    let a = r.lookup("alice.example", "a").unwrap();
    let b = r.lookup("bob.example", "b").unwrap();
    let cmd = json!({ "op": "send", "message": { "id": 1, "type": "update", "to": "hyperty://bob.example/elsewhere", "value": "{}" } });
    assert_eq!(driver.command(&a, cmd), json!({ "ok": true }));
    (r, driver, a, b, events, bundle)
}

/// An envelope as a runtime writes it.
fn envelope(origin: &str, seq: u64, from: &str, to: &Address, resource: &str) -> String {
    json!({ "v": 1, "origin": origin, "seq": seq, "id": seq, "type": "update", "from": from, "to": to.to_string(),
        "body": { "resource": resource, "value": "{}" } })
    .to_string()
}

fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < until, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// bob.example's stub statuses until one says `disconnected`, failing on
/// a trap before it; that status's detail.
fn disconnected_within(events: &mut hyperty_host::EventReceiver, within: Duration) -> String {
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let e = events.recv_timeout(left).unwrap_or_else(|e| panic!("no disconnection within {within:?}: {e:?}"));
        if e.hyperty != LABEL {
            continue;
        }
        match e.kind {
            EventKind::Trapped { reason } => panic!("the stub trapped: {reason}"),
            EventKind::StubStatus { status, detail } if status == "disconnected" => return detail,
            _ => {}
        }
    }
}

/// Counts in `counted` the PONGs the stub sends, until it hangs up.
fn count_pongs(mut reader: BufReader<TcpStream>, counted: &AtomicUsize) {
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line.trim_end() == "PONG" {
            counted.fetch_add(1, Ordering::Relaxed);
        }
        line.clear();
    }
}

/// A runtime whose bob.example stub is on a scripted node that greets it
/// and keeps what it sends (`lines`) and its connection (`writer`), the
/// other stubs on a closed port; made once the stub subscribed for b.
struct ScriptedBob {
    writer: Arc<Mutex<Option<TcpStream>>>,
    lines: Arc<Mutex<Vec<String>>>,
    driver: Driver,
    b: Address,
    events: hyperty_host::EventReceiver,
    _runtime: (Runtime, TestBundle),
}

impl ScriptedBob {
    fn subscribed() -> ScriptedBob {
        let writer: Arc<Mutex<Option<TcpStream>>> = Arc::default();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (w, l) = (writer.clone(), lines.clone());
        let (port, _) = node(move |_, mut stream| {
            let port = stream.local_addr().unwrap().port();
            let Some(reader) = greet(&mut stream, port, json!(1_048_576)) else { return };
            drain_bob(reader, l.clone(), stream, w.clone());
        });
        let (r, driver, _a, b, events, bundle) = runtime_with(&format!("127.0.0.1:{port}"), &closed_port(), json!({}));
        let sub = nats_subject("bob.example", b.as_str(), "*");
        wait_for("the stub subscribes for b", Duration::from_secs(15), || lines.lock().unwrap().iter().any(|l| l.starts_with(&format!("SUB {sub} "))));
        ScriptedBob { writer, lines, driver, b, events, _runtime: (r, bundle) }
    }
}

/// A port nothing listens on (bound, then freed): connections to it are
/// refused at once.
fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", listener.local_addr().unwrap().port())
}

/// A node sending without pause does not keep its stub reading until its
/// call deadline: the stub reads a bounded amount a round, answers what it
/// read, and stays up (before, it read on, its buffer growing, answered
/// nothing and was stopped at its deadline, again at every reconnection).
#[test]
fn a_node_flooding_its_stub_is_answered_as_it_floods_and_the_stub_stays_up() {
    let pongs = Arc::new(AtomicUsize::new(0));
    let counted = pongs.clone();
    let (port, _) = node(move |_, mut stream| {
        let port = stream.local_addr().unwrap().port();
        let Some(reader) = greet(&mut stream, port, json!(1_048_576)) else { return };
        let counted = counted.clone();
        std::thread::spawn(move || count_pongs(reader, &counted));
        // Until the runtime is gone and the connection with it.
        let flood = b"PING\r\n".repeat(10_000);
        while stream.write_all(&flood).is_ok() {}
    });
    let (_r, _driver, _a, _b, mut events, _bundle) = runtime_on(&format!("127.0.0.1:{port}"), json!({}));
    wait_event(&mut events, |e| e.hyperty == LABEL && matches!(&e.kind, EventKind::StubStatus { status, .. } if status == "live"));
    // Answered while it floods: a million PINGs' worth of PONGs, long
    // before a poll's deadline.
    wait_for("a million PONGs", Duration::from_secs(60), || pongs.load(Ordering::Relaxed) >= 1_000_000);
    // No stub (each domain's is on the flood) trapped or disconnected
    // meanwhile; every event is seen.
    let mut seen = Vec::new();
    loop {
        match events.try_recv() {
            Ok(e) if e.hyperty.starts_with("protostub ") => seen.push(format!("{} {:?}", e.hyperty, e.kind)),
            Ok(_) => {}
            Err(hyperty_host::events::TryRecvError::Empty) => break,
            Err(e) => panic!("events lost: {e:?}"),
        }
    }
    assert!(seen.iter().all(|k| !k.contains("Trapped") && !k.contains("disconnected")), "{seen:?}");
}

/// A node that announces a `max_payload` of 10 GB, then sends a message
/// header claiming 100 MB: the stub takes the announced limit only up to
/// 8 MiB (a message is held two or three times over in a stub's 64 MiB),
/// so it drops the connection at the header, naming the limit, instead of
/// holding what the node sends until its memory runs out.
#[test]
fn a_nodes_announced_max_payload_is_taken_up_to_8_mib() {
    let (port, _) = node(move |_, mut stream| {
        let port = stream.local_addr().unwrap().port();
        let Some(_reader) = greet(&mut stream, port, json!(10_000_000_000u64)) else { return };
        let _ = stream.write_all(b"MSG rethink.x 1 100000000\r\n");
        // Then bytes of it, slowly, until the stub hangs up.
        while stream.write_all(&[b'x'; 1024]).is_ok() {
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let (_r, _driver, _a, _b, mut events, _bundle) = runtime_with(&format!("127.0.0.1:{port}"), &closed_port(), json!({}));
    let why = disconnected_within(&mut events, Duration::from_secs(10));
    assert!(why.contains("100000000 bytes, above its own max_payload (8388608)"), "{why}");
}

/// A node announcing a 64 MiB `max_payload` sends a message just under the
/// stub's own cap of 8 MiB: the stub takes it in its memory (64 MiB) and
/// answers the PING after it. (With the cap at 64 MiB, a 40 MB message ran
/// the stub out of memory, trapping it again at every reconnection.)
#[test]
fn a_message_just_under_the_stubs_payload_cap_is_read_within_its_memory() {
    let answered = Arc::new(AtomicUsize::new(0));
    let counted = answered.clone();
    let (port, _) = node(move |_, mut stream| {
        let port = stream.local_addr().unwrap().port();
        let Some(reader) = greet(&mut stream, port, json!(64 * 1024 * 1024)) else { return };
        let size = 8 * 1024 * 1024 - 1024;
        let mut msg = format!("MSG rethink.bob_example.x.alice_example 2 {size}\r\n").into_bytes();
        msg.extend(std::iter::repeat_n(b'x', size));
        msg.extend_from_slice(b"\r\nPING\r\n");
        if stream.write_all(&msg).is_err() {
            return;
        }
        count_pongs(reader, &counted);
    });
    let (_r, _driver, _a, _b, mut events, _bundle) = runtime_with(&format!("127.0.0.1:{port}"), &closed_port(), json!({}));
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    while answered.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < until, "the PING after the message was not answered in 30 s: {seen:?}");
        while let Ok(e) = events.try_recv() {
            if e.hyperty == LABEL {
                assert!(!matches!(e.kind, EventKind::Trapped { .. }), "{:?}", e.kind);
                seen.push(format!("{:?}", e.kind));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A node that makes the stub write (a PING flood), takes a little of what
/// it writes, then nothing, keeping the connection open. The stub gives the connection up within a poll (5 s
/// without progress, or 8 s of writes in one poll: each bit taken used to
/// restart the 5 s, so a poll ran past its 10 s deadline and trapped), and
/// giving it up no longer waits for the node: wasmtime-wasi's drop of an
/// output stream waited for its pending write, in a host call no deadline
/// cuts, so a node that stopped reading held the stub's thread for ever
/// (`protostub::glue::link_output_stream_drop`).
#[test]
fn a_node_reading_slowly_is_given_up_within_a_poll_without_holding_the_stubs_thread() {
    let (port, _) = node(move |_, mut stream| {
        let port = stream.local_addr().unwrap().port();
        let Some(mut reader) = greet(&mut stream, port, json!(1_048_576)) else { return };
        let mut flood = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let pings = b"PING\r\n".repeat(10_000);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) && flood.write_all(&pings).is_ok() {}
        });
        // A little, then nothing more, the connection kept open.
        let mut buf = vec![0u8; 256 * 1024];
        for _ in 0..3 {
            std::thread::sleep(Duration::from_secs(1));
            if reader.read_exact(&mut buf).is_err() {
                return;
            }
        }
        std::thread::sleep(Duration::from_secs(60));
    });
    let (_r, _driver, _a, _b, mut events, _bundle) = runtime_with(&format!("127.0.0.1:{port}"), &closed_port(), json!({}));
    wait_event(&mut events, |e| e.hyperty == LABEL && matches!(&e.kind, EventKind::StubStatus { status, .. } if status == "live"));
    let why = disconnected_within(&mut events, Duration::from_secs(20));
    assert!(why.contains("within a poll (8 s): too slowly") || why.contains("took nothing of what was sent for 5 s"), "{why}");
}

/// A node that completes the handshake, then hangs up at once, every time,
/// was reconnected to every ~70 ms: every handshake reset the backoff. It
/// now doubles (50 ms to 2 s) unless a connection stayed up 10 s.
#[test]
fn a_node_hanging_up_after_each_handshake_is_reconnected_to_with_backoff() {
    let (port, conns) = node(move |_, mut stream| {
        let port = stream.local_addr().unwrap().port();
        let _ = greet(&mut stream, port, json!(1_048_576));
        std::thread::sleep(Duration::from_millis(20));
    });
    let (_r, _driver, _a, _b, mut events, _bundle) = runtime_with(&format!("127.0.0.1:{port}"), &closed_port(), json!({}));
    wait_event(&mut events, |e| e.hyperty == LABEL && matches!(&e.kind, EventKind::StubStatus { status, .. } if status == "live"));
    let before = conns.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(6));
    let made = conns.load(Ordering::SeqCst) - before;
    // Pauses of 0.1, 0.2, 0.4, 0.8, 1.6, 2, 2 s: 7 in 6 s, and some slack.
    assert!((2..=10).contains(&made), "{made} connections in 6 s");
}

/// A MSG whose payload is not followed by CRLF where its line says (the
/// declared size is wrong) is a protocol error, as for NATS's clients: the
/// connection is dropped, nothing of it delivered. It was taken as if
/// framed, the two bytes after it skipped unread.
#[test]
fn a_msg_not_ended_by_crlf_is_a_protocol_error() {
    let ScriptedBob { writer, lines: _, driver, b, mut events, _runtime } = ScriptedBob::subscribed();
    let subject = nats_subject("bob.example", b.as_str(), "alice.example");
    let e = envelope("o", 1, "hyperty://alice.example/x", &b, "unframed");
    let msg = format!("MSG {subject} 2 _INBOX.node.1 {}\r\n{e}ZZPING\r\n", e.len());
    writer.lock().unwrap().as_mut().unwrap().write_all(msg.as_bytes()).unwrap();
    let why = disconnected_within(&mut events, Duration::from_secs(15));
    assert!(why.contains("not ended by CRLF"), "{why}");
    let taken = driver.find(|m| m.kind == hyperty_host::MessageType::Forward && m.from == b && reported(m)["resource"] == "unframed", Duration::ZERO);
    assert!(taken.is_none(), "taken: {taken:?}");
}

/// A message on a subject that is not UTF-8 (a node's subjects may hold
/// any bytes; no runtime publishes on one) is read as text (U+FFFD for
/// the rest), as before the stub borrowed what it reads: refused and
/// answered so, its payload read whole (a `PING` line inside it is no
/// command). A `-ERR` with a lone CR in it is
/// one line (a `PING` after the CR is no command either). The connection
/// stays, and the message after them is taken and acknowledged in the
/// bulk ok.
#[test]
fn a_subject_that_is_not_utf8_is_refused_and_the_connection_kept() {
    let ScriptedBob { writer, lines, driver, b, mut events, _runtime } = ScriptedBob::subscribed();
    let subject = nats_subject("bob.example", b.as_str(), "alice.example");
    let bad = format!("{}\r\nPING", envelope("o", 1, "hyperty://alice.example/x", &b, "not-utf8"));
    let good = envelope("o", 2, "hyperty://alice.example/x", &b, "after");
    let mut bytes = format!("MSG {subject}").into_bytes();
    bytes.extend_from_slice(b"\xff\xfe");
    bytes.extend_from_slice(format!(" 2 _INBOX.node.1-x {}\r\n{bad}\r\n", bad.len()).as_bytes());
    bytes.extend_from_slice(b"-ERR a lone\rXPING\r\n");
    bytes.extend_from_slice(format!("MSG {subject} 2 _INBOX.node.2-y {}\r\n{good}\r\n", good.len()).as_bytes());
    writer.lock().unwrap().as_mut().unwrap().write_all(&bytes).unwrap();
    let taken = driver.find(|m| m.kind == hyperty_host::MessageType::Forward && m.from == b && reported(m)["resource"] == "after", Duration::from_secs(15));
    assert!(taken.is_some(), "the message after them is taken");
    wait_for("the bulk ok for it", Duration::from_secs(15), || lines.lock().unwrap().iter().any(|l| l == "ok 2-y"));
    let refused = driver.find(|m| m.kind == hyperty_host::MessageType::Forward && m.from == b && reported(m)["resource"] == "not-utf8", Duration::ZERO);
    assert!(refused.is_none(), "taken: {refused:?}");
    let lines = lines.lock().unwrap().clone();
    let answer = lines.iter().position(|l| l.starts_with("PUB _INBOX.node.1-x ")).map(|i| &lines[i + 1]);
    assert!(answer.is_some_and(|a| a.starts_with("refused: ")), "the message is answered refused: {lines:?}");
    assert!(!lines.iter().any(|l| l == "PONG"), "a PING inside a payload or after a lone CR was taken as a command: {lines:?}");
    while let Ok(e) = events.try_recv() {
        let kind = format!("{:?}", e.kind);
        assert!(e.hyperty != LABEL || !(kind.contains("Trapped") || kind.contains("disconnected")), "{kind}");
    }
}

/// Bad greetings, one per connection: max_payload 0, -1, a string; no
/// INFO at all; closed right after INFO; -ERR to CONNECT; an INFO in 40
/// slow pieces; then a good one. The stub names each, backs off, and ends
/// live.
#[test]
fn bad_greetings_are_named_and_backed_off_from() {
    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let t = times.clone();
    let (port, _) = node(move |i, mut stream| {
        t.lock().unwrap().push(Instant::now());
        let port = stream.local_addr().unwrap().port();
        match i {
            0 => drop(greet(&mut stream, port, json!(0))),
            1 => drop(greet(&mut stream, port, json!(-1))),
            2 => drop(greet(&mut stream, port, json!("1024"))),
            3 => std::thread::sleep(Duration::from_secs(4)),
            4 => drop(stream.write_all(info(port, json!(1024)).as_bytes())),
            5 => {
                let _ = stream.write_all(info(port, json!(1024)).as_bytes());
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(b"-ERR 'Authorization Violation'\r\n");
                std::thread::sleep(Duration::from_millis(500));
            }
            6 => {
                // Within the stub's 2 s handshake limit, then a good handshake.
                let text = info(port, json!(1_048_576));
                for piece in text.as_bytes().chunks(text.len() / 30 + 1) {
                    let _ = stream.write_all(piece);
                    std::thread::sleep(Duration::from_millis(30));
                }
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line.trim_end() != "PING" {
                    line.clear();
                }
                let _ = stream.write_all(b"PONG\r\n");
                drain(reader, Arc::default());
            }
            _ => {
                let Some(reader) = greet(&mut stream, port, json!(1_048_576)) else { return };
                drain(reader, Arc::default());
            }
        }
    });
    let (_r, _driver, _a, _b, mut events, _bundle) = runtime_on(&format!("127.0.0.1:{port}"), json!({}));
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(40);
    while let Ok(e) = events.recv_timeout(until.saturating_duration_since(Instant::now())) {
        if let (true, EventKind::StubStatus { status, detail }) = (e.hyperty == LABEL, &e.kind) {
            seen.push(format!("{status}: {detail}"));
            if status == "live" {
                break;
            }
        }
        if e.hyperty == LABEL && matches!(e.kind, EventKind::Trapped { .. }) {
            panic!("trapped: {:?}", e.kind);
        }
    }
    let times = times.lock().unwrap();
    let gaps: Vec<_> = times.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("statuses: {seen:#?}\ngaps: {gaps:?}");
    assert!(seen.last().is_some_and(|s| s.starts_with("live")), "{seen:?}");
}
