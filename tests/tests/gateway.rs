//! The WebSocket app gateway, driven by a Rust WebSocket client
//! (tokio-tungstenite) against puppet hyperties on the real bus: login
//! (development user, IdP assertion), request/response both ways, Origin
//! and query checks at the handshake, refusals of frames before login and
//! of bad frames after it (each with the gateway and another connection
//! still working), the rate limit, connection limits, a client that does
//! not read, and a connection dropped mid-request.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyperty_host::gateway::{CLOSE_SEND_QUEUE_FULL, Gateway, GatewayConfig};
use hyperty_host::{Address, Message, MessageType, Runtime};
use hyperty_tests::*;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const DOMAIN: &str = "alice.example";
const DEV_USER: &str = "dev@alice.example";
const IDP: &str = "idp.example";
const IDP_KEY: [u8; 32] = [7; 32];
/// How long a test waits for something that must happen.
const WAIT: Duration = Duration::from_secs(10);

struct World {
    runtime: Runtime,
    driver: Driver,
    /// alice.example/echo: answers requests with their value.
    echo: Address,
    /// alice.example/silent: never answers.
    silent: Address,
    gateway: Gateway,
    _bundle: TestBundle,
}

/// Puppets in alice.example behind a gateway of that domain, configured by
/// `config` (development user unless it says otherwise); with `idp`,
/// alice.example's users are asserted by idp.example.
fn world(config: GatewayConfig, idp: bool) -> World {
    world_with(config, idp, json!({}))
}

/// [`world`], with alice.example's `settings` (limits...).
fn world_with(config: GatewayConfig, idp: bool, settings: Value) -> World {
    let runtime = runtime(Duration::from_secs(60));
    let driver = Driver::new(&runtime);
    let mut bundle = TestBundle::new()
        .hyperty(DOMAIN, "echo", &guest("puppet"), puppet_config(true))
        .hyperty(DOMAIN, "silent", &guest("puppet"), puppet_config(false))
        .domain(DOMAIN, settings);
    if idp {
        bundle = bundle.idp(IDP, IDP_KEY, &[DOMAIN]).domain(DOMAIN, json!({ "require-identity": false }));
    }
    runtime.deploy(&bundle.load()).expect("the gateway world deploys");
    let echo = runtime.lookup(DOMAIN, "echo").unwrap();
    let silent = runtime.lookup(DOMAIN, "silent").unwrap();
    let gateway = runtime.serve_gateway("127.0.0.1:0".parse().unwrap(), config).expect("the gateway starts");
    World { runtime, driver, echo, silent, gateway, _bundle: bundle }
}

fn dev() -> GatewayConfig {
    GatewayConfig { dev_users: [(DOMAIN.to_owned(), vec![DEV_USER.to_owned()])].into(), ..GatewayConfig::default() }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Client {
    ws: Ws,
    address: String,
}

fn own_origin(gateway: &Gateway) -> String {
    format!("http://{}", gateway.local_addr())
}

/// Opens a WebSocket to `gateway` from a page of `origin` (none: no
/// Origin header), at `path`.
async fn open(gateway: &Gateway, origin: Option<&str>, path: &str) -> Result<Ws, tungstenite::Error> {
    let mut request = format!("ws://{}{path}", gateway.local_addr()).into_client_request().unwrap();
    if let Some(origin) = origin {
        request.headers_mut().insert("Origin", origin.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.map(|(ws, _)| ws)
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(WsMessage::text(frame.to_string())).await.unwrap();
}

/// The next text frame, as JSON.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next()).await.expect("a frame within 10 s");
        match frame.expect("the connection is open").expect("a frame") {
            WsMessage::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            WsMessage::Close(close) => panic!("closed: {close:?}"),
            _ => {}
        }
    }
}

/// The close frame the gateway ends the connection with.
async fn closed(ws: &mut Ws) -> CloseFrame {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next()).await.expect("a close within 10 s");
        match frame {
            Some(Ok(WsMessage::Close(Some(close)))) => return close,
            Some(Ok(WsMessage::Text(text))) => panic!("a frame instead of the close: {text}"),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

/// What still reaches a client that did not read ends with the close for
/// a full send queue, its reason containing `why`, if the client gets it
/// at all (the kernel may drop it after a reset, and the gateway's writer,
/// stuck behind frames the client does not take, gives up after a grace
/// period); the frames before it are skipped.
async fn closed_for_not_reading(ws: &mut Ws, why: &str) {
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(WAIT, ws.next()).await {
        if let WsMessage::Close(close) = frame {
            if let Some(close) = close {
                assert_eq!(u16::from(close.code), CLOSE_SEND_QUEUE_FULL, "{close:?}");
                assert!(close.reason.as_str().contains(why), "{close:?}");
            }
            return;
        }
    }
}

/// Connects from the gateway's own origin and logs in with `login`.
async fn login_with(gateway: &Gateway, login: Value) -> Client {
    let mut ws = open(gateway, Some(&own_origin(gateway)), "/").await.expect("the handshake succeeds");
    send(&mut ws, login).await;
    let answer = next(&mut ws).await;
    assert_eq!(answer["type"], "login", "{answer}");
    let address = answer["address"].as_str().unwrap().to_owned();
    Client { ws, address }
}

async fn login(gateway: &Gateway) -> Client {
    login_with(gateway, json!({ "type": "login", "user": DEV_USER })).await
}

impl Client {
    /// A request to `to`; its answer (the response frame) or the error frame.
    async fn ask(&mut self, id: u64, to: &Address, value: Value) -> Value {
        send(&mut self.ws, json!({ "id": id, "type": "execute", "to": to.as_str(), "body": { "value": value } })).await;
        next(&mut self.ws).await
    }

    /// Asserts that the echo hyperty answers a request through this
    /// connection: it works.
    async fn still_works(&mut self, id: u64, echo: &Address) {
        let answer = self.ask(id, echo, json!({ "n": id })).await;
        assert_eq!((answer["type"].as_str(), answer["id"].as_u64()), (Some("response"), Some(id)), "{answer}");
        assert_eq!((answer["body"]["code"].as_u64(), &answer["body"]["value"]), (Some(200), &json!({ "n": id })), "{answer}");
    }
}

#[tokio::test]
async fn login_then_requests_both_ways() {
    let mut w = world(dev(), false);
    let mut c = login(&w.gateway).await;
    assert!(c.address.starts_with("app://alice.example/"), "{}", c.address);
    // Client → hyperty, answered; the hyperty saw the host-stamped `from`
    // and the logged-in user as the identity.
    c.still_works(1, &w.echo).await;
    let seen = w.driver.report(&w.echo, |m| m["id"] == 1);
    assert_eq!(seen["from"], c.address.as_str(), "{seen}");
    assert_eq!(seen["identity"], json!([DEV_USER, DOMAIN]), "{seen}");
    // An explicit, correct `from` is accepted too; a notification gets no answer.
    send(&mut c.ws, json!({ "id": 2, "type": "update", "from": c.address, "to": w.echo.as_str(), "request": false })).await;
    w.driver.report(&w.echo, |m| m["id"] == 2 && m["type"] == "update");
    // Nothing at the address: the host's 404.
    let nobody = Address::parse("hyperty://alice.example/nobody").unwrap();
    let answer = c.ask(3, &nobody, json!(null)).await;
    assert_eq!(answer["body"]["code"], 404, "{answer}");
    // A request to the app, answered by it.
    let app = Address::parse(c.address.clone()).unwrap();
    let id = w.driver.fresh_id();
    let request = Message::new(id, MessageType::Read, w.driver.address().clone(), app, Some(r#"{"q":1}"#.into()));
    w.driver.endpoint.request(request, None).unwrap();
    let got = next(&mut c.ws).await;
    assert_eq!((got["type"].as_str(), got["id"].as_u64(), &got["body"]["value"]), (Some("read"), Some(id), &json!({ "q": 1 })), "{got}");
    let from = got["from"].as_str().unwrap();
    send(&mut c.ws, json!({ "id": id, "type": "response", "to": from, "body": { "code": 200, "value": { "a": 2 } } })).await;
    let response = w.driver.expect(|m| m.kind == MessageType::Response && m.id == id);
    assert_eq!((response.body.code, response.body.value.as_deref()), (Some(200), Some(r#"{"a":2}"#)));
    assert_eq!(w.runtime.pending_requests(), 0);
}

#[tokio::test]
async fn login_with_an_assertion_of_the_domains_idp() {
    let w = world(GatewayConfig::default(), true);
    let token = jwt(IDP_KEY, IDP, "carol@idp.example", unix_now() + 300);
    let mut c = login_with(&w.gateway, json!({ "type": "login", "assertion": { "idp": IDP, "token": token } })).await;
    c.still_works(1, &w.echo).await;
    // Tampered, foreign-IdP and missing assertions: refused, with why.
    let forged = jwt([9; 32], IDP, "carol@idp.example", unix_now() + 300);
    for (login, why) in [
        (json!({ "type": "login", "assertion": { "idp": IDP, "token": forged } }), "identity assertion of IdP idp.example refused"),
        (json!({ "type": "login", "assertion": { "idp": "other.example", "token": "x" } }), "alice.example trusts IdP idp.example, not other.example"),
        (json!({ "type": "login" }), "the login needs an assertion"),
    ] {
        let mut ws = open(&w.gateway, Some(&own_origin(&w.gateway)), "/").await.unwrap();
        send(&mut ws, login).await;
        let close = closed(&mut ws).await;
        assert_eq!(u16::from(close.code), 1008, "{close:?}");
        assert!(close.reason.as_str().contains(why), "{close:?}");
    }
    c.still_works(2, &w.echo).await;
}

#[tokio::test]
async fn frames_before_login_are_refused() {
    let w = world(GatewayConfig { login_timeout: Duration::from_secs(2), ..dev() }, false);
    let mut good = login(&w.gateway).await;
    let message = json!({ "id": 1, "type": "read", "to": w.echo.as_str() });
    for (first, why) in [
        (Some(WsMessage::text(message.to_string())), "the first frame must be a login: unknown field `id`"),
        (Some(WsMessage::binary(vec![1, 2, 3])), "the first frame must be a login (a text frame)"),
        (Some(WsMessage::text("{not json")), "the first frame must be a login: frame is not JSON"),
        (None, "no login within 2000 ms"),
    ] {
        let mut ws = open(&w.gateway, Some(&own_origin(&w.gateway)), "/").await.unwrap();
        if let Some(first) = first {
            ws.send(first).await.unwrap();
        }
        let close = closed(&mut ws).await;
        assert_eq!(u16::from(close.code), 1008, "{close:?}");
        assert!(close.reason.as_str().starts_with(why), "{close:?}");
    }
    // The echo saw none of them; the logged-in connection still works.
    good.still_works(2, &w.echo).await;
}

#[tokio::test]
async fn handshake_refuses_other_origins_and_query_strings() {
    let w = world(dev(), false);
    let status = |r: Result<Ws, tungstenite::Error>| match r {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        other => panic!("the handshake was not refused: {:?}", other.map(|_| ())),
    };
    assert_eq!(status(open(&w.gateway, Some("http://evil.example"), "/").await), 403);
    assert_eq!(status(open(&w.gateway, None, "/").await), 403);
    assert_eq!(status(open(&w.gateway, Some(&own_origin(&w.gateway)), "/?token=secret").await), 400);
    let mut c = login(&w.gateway).await;
    c.still_works(1, &w.echo).await;
    // An origin configured by the embedder is allowed, and then only it.
    let other = world(GatewayConfig { allowed_origins: vec!["https://app.example".into()], ..dev() }, false);
    assert!(open(&other.gateway, Some("https://app.example"), "/").await.is_ok());
    assert_eq!(status(open(&other.gateway, Some(&own_origin(&other.gateway)), "/").await), 403);
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_goes_on() {
    let mut w = world(GatewayConfig { max_frame_bytes: 64 * 1024, ..dev() }, false);
    let mut c = login(&w.gateway).await;
    let mut other = login(&w.gateway).await;
    let echo = w.echo.as_str();
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let cases: Vec<(WsMessage, Option<u64>, &str, &str)> = vec![
        (WsMessage::text("{not json"), None, "not-json", "frame is not JSON"),
        (WsMessage::text(deep), None, "not-json", "frame is nested deeper than 128 levels"),
        (WsMessage::text(json!({ "id": 5, "to": echo }).to_string()), None, "not-a-message", "missing field `type`"),
        (WsMessage::text(json!({ "id": 6, "type": "read", "to": echo, "identity": "x" }).to_string()), None, "not-a-message", "unknown field `identity`"),
        (WsMessage::text(json!({ "id": 7, "type": "shout", "to": echo }).to_string()), Some(7), "not-a-message", "unknown type \"shout\""),
        (WsMessage::text(json!({ "id": 8, "type": "read", "from": other.address, "to": echo }).to_string()), Some(8), "spoofed-from", "is not this connection's address"),
        (WsMessage::text(json!({ "id": 9, "type": "read", "to": "not an address" }).to_string()), Some(9), "bad-address", "to: \"not an address\" is not an address"),
        (WsMessage::binary(vec![0; 10]), None, "binary-frame", "binary frames are not accepted"),
    ];
    for (n, (frame, id, kind, why)) in cases.into_iter().enumerate() {
        c.ws.send(frame).await.unwrap();
        let error = next(&mut c.ws).await;
        assert_eq!((error["type"].as_str(), error["id"].as_u64(), error["error"].as_str()), (Some("error"), id, Some(kind)), "{error}");
        assert!(error["description"].as_str().unwrap().contains(why), "{error}");
        c.still_works(100 + n as u64, &w.echo).await;
    }
    // A second pending request with the same id: the bus's duplicate-id.
    send(&mut c.ws, json!({ "id": 50, "type": "read", "to": w.silent.as_str() })).await;
    let dup = c.ask(50, &w.silent, json!(null)).await;
    assert_eq!((dup["error"].as_str(), dup["id"].as_u64()), (Some("duplicate-id"), Some(50)), "{dup}");
    // None of the refused frames reached the echo (nothing but the probes).
    for m in w.driver.before_marker(&w.echo) {
        let r = reported(&m);
        assert!(r["id"].as_u64().is_some_and(|id| id >= 100), "a refused frame was delivered: {r}");
    }
    // Over the frame size: closed with 1009, naming the limit.
    let big = json!({ "id": 10, "type": "read", "to": echo, "body": { "value": "x".repeat(70_000) } });
    send(&mut c.ws, big).await;
    let close = closed(&mut c.ws).await;
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
    assert!(close.reason.as_str().contains("65536"), "{close:?}");
    other.still_works(200, &w.echo).await;
    wait_until("the closed connections's pending request is forgotten", || w.runtime.pending_requests() == 0);
    let mut again = login(&w.gateway).await;
    again.still_works(201, &w.echo).await;
}

#[tokio::test]
async fn a_flood_past_the_rate_is_refused() {
    let mut w = world(GatewayConfig { rate: 1, burst: 5, ..dev() }, false);
    let mut c = login(&w.gateway).await;
    let (sent, flood) = (w.driver.fresh_id(), 40u64);
    for i in 0..flood {
        send(&mut c.ws, json!({ "id": sent + i, "type": "update", "to": w.driver.address().as_str(), "request": false })).await;
    }
    // A frame refused before the rate is looked at marks the end: frames
    // are handled, and refusals queued, in order.
    c.ws.send(WsMessage::text("{")).await.unwrap();
    let mut refused = 0;
    loop {
        let error = next(&mut c.ws).await;
        match error["error"].as_str() {
            Some("rate-limited") => refused += 1,
            Some("not-json") => break,
            _ => panic!("{error}"),
        }
    }
    // Every frame was either refused or delivered; at least the burst got
    // through, and with a rate of 1/s most of the 40 were refused.
    let delivered = flood - refused;
    assert!(delivered >= 5 && refused >= 1, "{delivered} delivered, {refused} refused");
    for _ in 0..delivered {
        w.driver.expect(|m| m.kind == MessageType::Update && (sent..sent + flood).contains(&m.id));
    }
    // Another connection has its own bucket.
    let mut other = login(&w.gateway).await;
    other.still_works(1, &w.echo).await;
}

#[tokio::test]
async fn connection_limits_answer_503() {
    let w = world(GatewayConfig { max_connections_per_ip: 2, ..dev() }, false);
    let a = login(&w.gateway).await;
    let mut b = login(&w.gateway).await;
    match open(&w.gateway, Some(&own_origin(&w.gateway)), "/").await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 503),
        other => panic!("a third connection was not refused: {:?}", other.map(|_| ())),
    }
    b.still_works(1, &w.echo).await;
    drop(a);
    wait_until("the closed connection frees its slot", || w.gateway.connections() == 1);
    let mut c = login(&w.gateway).await;
    c.still_works(2, &w.echo).await;
}

/// Sends messages of 60 KB from the driver to the client at `app` until
/// the gateway gives up on it (its route goes: the host answers 404), or
/// `max` were taken (those refused `inbox-full` are not counted; at most
/// 100 × `max` tries), pausing `pause` between tries (else yielding).
/// Returns how many were taken and whether it went.
async fn send_until_gone(w: &World, app: &Address, max: usize, pause: Option<Duration>) -> (usize, bool) {
    let pad = json!({ "pad": "x".repeat(60_000) }).to_string();
    let mut id = 1_000;
    let mut sent = 0;
    for _ in 0..100 * max {
        if sent == max {
            break;
        }
        id += 1;
        let m = Message::new(id, MessageType::Update, w.driver.address().clone(), app.clone(), Some(pad.clone()));
        match w.driver.endpoint.send(m) {
            Ok(()) => sent += 1,
            Err(hyperty_host::SendError::InboxFull(_)) => {}
            Err(e) => panic!("{e}"),
        }
        // Once its route is gone the host answers 404 (stop there: each
        // further send would be answered too).
        if let Some(m) = w.driver.endpoint.try_recv()
            && (m.kind, m.body.code) == (MessageType::Response, Some(404))
        {
            return (sent, true);
        }
        match pause {
            Some(pause) => tokio::time::sleep(pause).await,
            None => std::thread::yield_now(),
        }
    }
    (sent, false)
}

#[tokio::test]
async fn a_client_that_does_not_read_is_disconnected() {
    let w = world(GatewayConfig { send_queue: 8, ..dev() }, false);
    let slow = login(&w.gateway).await;
    let mut fine = login(&w.gateway).await;
    let app = Address::parse(slow.address.clone()).unwrap();
    // Messages for the slow client until the gateway gives up on it: its
    // route goes (the host answers 404), nothing piles up meanwhile.
    let (_, gone) = send_until_gone(&w, &app, 100_000, None).await;
    assert!(gone, "the client that does not read is still connected");
    wait_until("the connection is gone", || w.gateway.connections() == 1);
    fine.still_works(1, &w.echo).await;
    // Its route is gone: the host answers 404 for it.
    let mut driver = w.driver;
    let id = driver.fresh_id();
    driver.endpoint.request(Message::new(id, MessageType::Read, driver.address().clone(), app, None), None).unwrap();
    let answer = driver.expect(|m| m.kind == MessageType::Response && m.id == id);
    assert_eq!(answer.body.code, Some(404), "{answer:?}");
    // What reached the slow client ends with the close that says why
    // (if the kernel still delivers it after the reset).
    let mut slow = slow;
    closed_for_not_reading(&mut slow.ws, "does not read").await;
}

/// A client that does not read is disconnected once the bytes waiting for
/// it reach `send_queue_bytes`, long before its count of frames: 60 KB
/// messages with a 1 MiB bound and room for 2,000 frames. (Without the
/// bound in bytes, a page asking for large answers and reading none made
/// the host hold `send_queue` of them: here 120 MB.)
#[tokio::test]
async fn a_client_that_does_not_read_is_disconnected_at_its_bytes_bound() {
    let w = world(GatewayConfig { send_queue: 2_000, send_queue_bytes: 1 << 20, ..dev() }, false);
    let slow = login(&w.gateway).await;
    let app = Address::parse(slow.address.clone()).unwrap();
    let (sent, gone) = send_until_gone(&w, &app, 2_000, Some(Duration::from_micros(200))).await;
    // The kernel's socket buffers on loopback take ~10 MB (~170 of
    // these) before anything waits in the queue.
    assert!(gone && sent < 1_000, "disconnected: {gone}, after {sent} messages of 60 KB");
    wait_until("the connection is gone", || w.gateway.connections() == 0);
    // The close that says why, if the client gets it at all.
    let mut slow = slow;
    closed_for_not_reading(&mut slow.ws, "(1048576 bytes)").await;
}

/// One frame alone always fits the send queue, however small its bound in
/// bytes (a frame may be larger than the message it carries): a client
/// that reads is never disconnected for one large frame.
#[tokio::test]
async fn one_frame_alone_always_fits_the_send_queue() {
    let w = world(GatewayConfig { send_queue_bytes: 1, ..dev() }, false);
    let mut c = login(&w.gateway).await;
    c.still_works(1, &w.echo).await;
}

#[tokio::test]
async fn a_connection_dropped_mid_request_leaves_nothing_pending() {
    let w = world(dev(), false);
    let mut c = login(&w.gateway).await;
    send(&mut c.ws, json!({ "id": 1, "type": "read", "to": w.silent.as_str() })).await;
    wait_until("the request is pending", || w.runtime.pending_requests() == 1);
    drop(c);
    wait_until("the closed connection's request is forgotten", || w.runtime.pending_requests() == 0);
    wait_until("the connection is gone", || w.gateway.connections() == 0);
    let mut d = login(&w.gateway).await;
    d.still_works(2, &w.echo).await;
}

#[test]
fn the_cli_serves_the_gateway_and_names_a_port_it_cannot_bind() {
    let bundle = TestBundle::new().hyperty(DOMAIN, "echo", &guest("puppet"), puppet_config(true));
    let manifest = bundle.write();
    let dirs = CliDirs::new();
    let manifest = manifest.to_str().unwrap();
    let run = |gateway: &str, extra: &[&str]| {
        let mut args = vec!["run", manifest, "--exit-when-idle", "--gateway", gateway];
        args.extend_from_slice(extra);
        dirs.cli(&args)
    };
    let dev_user = format!("{DOMAIN}={DEV_USER}");
    assert_eq!(run("127.0.0.1:0", &["--gateway-dev-user", &dev_user, "--gateway-origin", "https://app.example"]), std::process::ExitCode::SUCCESS);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(run(&taken.local_addr().unwrap().to_string(), &[]), std::process::ExitCode::FAILURE);
    // Gateway options need the gateway (the flag or the bundle's section);
    // a dev user is DOMAIN=USER.
    assert_eq!(dirs.cli(&["run", manifest, "--exit-when-idle", "--gateway-dev-user", &dev_user]), std::process::ExitCode::FAILURE);
    assert_eq!(run("127.0.0.1:0", &["--gateway-dev-user", DEV_USER]), std::process::ExitCode::from(2));
    // A bundle with a [gateway] section serves it without the flag; a
    // static directory that does not exist stops the run.
    let mut text = std::fs::read_to_string(manifest).unwrap();
    text.push_str("\n[gateway]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(manifest, &text).unwrap();
    assert_eq!(dirs.cli(&["run", manifest, "--exit-when-idle"]), std::process::ExitCode::SUCCESS);
    assert_eq!(dirs.cli(&["run", manifest, "--exit-when-idle", "--gateway-static", "/nonexistent/app"]), std::process::ExitCode::FAILURE);
}

/// Sends `request` as raw bytes on a fresh connection to `gateway` and
/// reads the answer to its end: (status, head, body).
async fn http(gateway: &Gateway, request: &[u8]) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(gateway.local_addr()).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await.expect("an answer within 10 s").unwrap();
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8(answer[..end].to_vec()).unwrap();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
    (status, head, answer[end + 4..].to_vec())
}

async fn get(gateway: &Gateway, path: &str) -> (u16, String, Vec<u8>) {
    http(gateway, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| l.split_once(": ").filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v))
}

/// The JavaScript client as the repository has it.
fn client_js() -> Vec<u8> {
    std::fs::read(repo().join("host/src/gateway/client.js")).unwrap()
}

#[tokio::test]
async fn static_files_are_served_from_their_directory_only() {
    let root = tempfile::tempdir().unwrap();
    let app = root.path().join("app");
    std::fs::create_dir_all(app.join("sub")).unwrap();
    std::fs::write(app.join("index.html"), "<h1>chat</h1>").unwrap();
    std::fs::write(app.join("chat.js"), "export const x = 1;").unwrap();
    std::fs::write(app.join("style.css"), "h1 {}").unwrap();
    std::fs::write(app.join("data.bin"), [0u8, 1, 2]).unwrap();
    std::fs::write(app.join("a b.txt"), "spaced").unwrap();
    std::fs::write(app.join("sub/index.html"), "<p>sub</p>").unwrap();
    let secret = root.path().join("secret.txt");
    std::fs::write(&secret, "SECRET").unwrap();
    std::os::unix::fs::symlink(&secret, app.join("out")).unwrap();
    std::os::unix::fs::symlink("/etc", app.join("etc")).unwrap();
    std::os::unix::fs::symlink("chat.js", app.join("inside.js")).unwrap();
    let config = GatewayConfig { static_dir: Some(app.clone()), login_timeout: Duration::from_secs(2), ..dev() };
    let mut w = world(config, false);
    let g = &w.gateway;
    for (path, content_type, body) in [
        ("/", "text/html; charset=utf-8", &b"<h1>chat</h1>"[..]),
        ("/index.html?v=2", "text/html; charset=utf-8", b"<h1>chat</h1>"),
        ("/chat.js", "text/javascript; charset=utf-8", b"export const x = 1;"),
        ("/inside.js", "text/javascript; charset=utf-8", b"export const x = 1;"),
        ("/style.css", "text/css; charset=utf-8", b"h1 {}"),
        ("/data.bin", "application/octet-stream", &[0, 1, 2]),
        ("/a%20b.txt", "text/plain; charset=utf-8", b"spaced"),
        ("/sub", "text/html; charset=utf-8", b"<p>sub</p>"),
        ("/sub/", "text/html; charset=utf-8", b"<p>sub</p>"),
    ] {
        let (status, head, got) = get(g, path).await;
        assert_eq!((status, header(&head, "content-type"), got.as_slice()), (200, Some(content_type), body), "{path}: {head}");
        assert_eq!(header(&head, "content-length"), Some(body.len().to_string().as_str()), "{path}: {head}");
    }
    // The client is served at its fixed path.
    let (status, head, got) = get(g, "/.hyperty/client.js").await;
    assert_eq!((status, header(&head, "content-type")), (200, Some("text/javascript; charset=utf-8")), "{head}");
    assert_eq!(got, client_js());
    // Nothing there, and every way out of the directory: 404, and the
    // secret beside it never in the answer.
    let absolute = format!("/{}", secret.display());
    for path in ["/nope.html", "/../secret.txt", "/%2e%2e/secret.txt", "/sub/../../secret.txt", "/sub/%2E%2E/%2E%2E/secret.txt", absolute.as_str(), "/out", "/etc/passwd", "/etc/hostname"] {
        let (status, head, got) = get(g, path).await;
        assert_eq!(status, 404, "{path}: {head}");
        assert!(!String::from_utf8_lossy(&got).contains("SECRET") && !String::from_utf8_lossy(&got).contains("root:"), "{path}");
    }
    // HEAD: the head only; other methods 405; broken paths and requests 400;
    // an oversized head 431.
    let (status, head, got) = http(g, b"HEAD /chat.js HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((status, header(&head, "content-length"), got.len()), (200, Some("19"), 0), "{head}");
    let (status, head, _) = http(g, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!((status, header(&head, "allow")), (405, Some("GET, HEAD")), "{head}");
    for (request, why) in [(&b"GET /a%zz HTTP/1.1\r\n\r\n"[..], "broken %-escape"), (b"GET /%00 HTTP/1.1\r\n\r\n", "NUL"), (b"\x01\x02 nonsense\r\n\r\n", "not an HTTP/1.1 request")] {
        let (status, _, got) = http(g, request).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(request));
        assert!(String::from_utf8_lossy(&got).contains(why), "{}", String::from_utf8_lossy(&got));
    }
    let big = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(10_000));
    let (status, _, got) = http(g, big.as_bytes()).await;
    assert_eq!(status, 431, "{}", String::from_utf8_lossy(&got));
    assert!(String::from_utf8_lossy(&got).contains("over 8192 bytes"), "{}", String::from_utf8_lossy(&got));
    // A head that never ends: 408 once the login time is over.
    let (status, _, got) = http(g, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&got));
    // WebSocket on the same listener still works; no connection left over.
    let mut c = login(&w.gateway).await;
    c.still_works(1, &w.echo).await;
    drop(c);
    wait_until("every connection is closed", || w.gateway.connections() == 0);
    // Without a static directory only the client is served.
    w.gateway = w.runtime.serve_gateway("127.0.0.1:0".parse().unwrap(), dev()).unwrap();
    assert_eq!(get(&w.gateway, "/").await.0, 404);
    assert_eq!(get(&w.gateway, "/.hyperty/client.js").await.2, client_js());
    // A static directory that does not exist: the gateway does not start.
    let missing = GatewayConfig { static_dir: Some(root.path().join("missing")), ..dev() };
    let e = w.runtime.serve_gateway("127.0.0.1:0".parse().unwrap(), missing).err().expect("refused").to_string();
    assert!(e.contains("cannot open the gateway's static directory") && e.contains("missing"), "{e}");
}

const BOB: &str = "bob.example";

/// alice.example and bob.example, each with an echo, behind the gateway the
/// bundle's `[gateway]` section describes (`section`, TOML); with
/// `policies`, alice.example's Cedar policies.
fn two_domains(section: &str, policies: Option<&str>) -> (World, Address) {
    let runtime = runtime(Duration::from_secs(60));
    let driver = Driver::new(&runtime);
    let mut bundle = TestBundle::new()
        .hyperty(DOMAIN, "echo", &guest("puppet"), puppet_config(true))
        .hyperty(DOMAIN, "silent", &guest("puppet"), puppet_config(false))
        .hyperty(BOB, "echo", &guest("puppet"), puppet_config(true));
    if let Some(policies) = policies {
        std::fs::write(bundle.dir().join("alice.cedar"), policies).unwrap();
        bundle = bundle.domain(DOMAIN, json!({ "policies": ["alice.cedar"] }));
    }
    let manifest = bundle.write();
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str(section);
    std::fs::write(&manifest, text).unwrap();
    let loaded = hyperty_host::Bundle::load(&manifest).expect("the bundle loads");
    runtime.deploy(&loaded).expect("the bundle deploys");
    let config = GatewayConfig::from_spec(loaded.gateway.as_ref().expect("a [gateway] section"));
    let gateway = runtime.serve_gateway("127.0.0.1:0".parse().unwrap(), config).expect("the gateway starts");
    let (echo, silent, bob_echo) = (runtime.lookup(DOMAIN, "echo").unwrap(), runtime.lookup(DOMAIN, "silent").unwrap(), runtime.lookup(BOB, "echo").unwrap());
    (World { runtime, driver, echo, silent, gateway, _bundle: bundle }, bob_echo)
}

#[tokio::test]
async fn one_gateway_serves_every_domain_with_the_bundles_origins_and_dev_users() {
    let (w, bob_echo) = two_domains(
        r#"
[gateway]
origins = ["https://chat.example", "http://127.0.0.1:9"]
[gateway.dev-users]
"alice.example" = ["alice@alice.example"]
"bob.example" = ["bob@bob.example", "robert@bob.example"]
"#,
        None,
    );
    // The bundle's origins, and only they.
    let refused = open(&w.gateway, Some(&own_origin(&w.gateway)), "/").await;
    assert!(matches!(&refused, Err(tungstenite::Error::Http(r)) if r.status() == 403), "{:?}", refused.map(|_| ()));
    let connect = |login: Value| {
        let gateway = &w.gateway;
        async move {
            let mut ws = open(gateway, Some("https://chat.example"), "/").await.expect("the bundle's origin is allowed");
            send(&mut ws, login).await;
            ws
        }
    };
    // Each domain's dev users, in their domain.
    let mut alice = connect(json!({ "type": "login", "domain": DOMAIN, "user": "alice@alice.example" })).await;
    let answer = next(&mut alice).await;
    assert_eq!(answer["user"], "alice@alice.example", "{answer}");
    assert!(answer["address"].as_str().unwrap().starts_with("app://alice.example/"), "{answer}");
    let mut bob = connect(json!({ "type": "login", "domain": BOB, "user": "robert@bob.example" })).await;
    let answer = next(&mut bob).await;
    assert!(answer["address"].as_str().unwrap().starts_with("app://bob.example/"), "{answer}");
    let mut bob = Client { ws: bob, address: answer["address"].as_str().unwrap().to_owned() };
    bob.still_works(1, &bob_echo).await;
    let seen = w.driver.report(&bob_echo, |m| m["id"] == 1);
    assert_eq!(seen["identity"], json!(["robert@bob.example", BOB]), "{seen}");
    // A user of another domain, an unknown domain, no domain with two,
    // an assertion where the domain has no IdP, both: refused with why.
    for (login, why) in [
        (json!({ "type": "login", "domain": BOB, "user": "alice@alice.example" }), "\"alice@alice.example\" is not a development user of bob.example"),
        (json!({ "type": "login", "domain": "carol.example", "user": "carol@carol.example" }), "\"carol.example\" is not a domain of this runtime (it has alice.example, bob.example)"),
        (json!({ "type": "login", "user": "alice@alice.example" }), "the login must name its domain, one of: alice.example, bob.example"),
        (json!({ "type": "login", "domain": DOMAIN, "assertion": { "idp": IDP, "token": "x" } }), "alice.example trusts no IdP, not idp.example"),
        (json!({ "type": "login", "domain": DOMAIN, "user": "alice@alice.example", "assertion": { "idp": IDP, "token": "x" } }), "the login has an assertion and a user"),
    ] {
        let mut ws = connect(login).await;
        let close = closed(&mut ws).await;
        assert_eq!(u16::from(close.code), 1008, "{close:?}");
        assert!(close.reason.as_str().starts_with(why), "{close:?} is not {why}");
    }
    bob.still_works(2, &bob_echo).await;
    let _ = &mut alice;
}

#[test]
fn a_bad_gateway_section_names_each_problem() {
    let bundle = TestBundle::new().hyperty(DOMAIN, "echo", &guest("puppet"), puppet_config(true));
    let manifest = bundle.write();
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str(
        r#"
[gateway]
listen = "localhost"
origins = ["http://ok.example:8080", "http://127.0.0.1:8080/", "ftp://x.example", "https://[::1]:99999"]
[gateway.dev-users]
"carol.example" = ["carol@carol.example"]
"#,
    );
    let e = hyperty_host::Bundle::parse(&text, &manifest).expect_err("refused");
    let problems: Vec<(String, String)> = e.problems.iter().map(|p| (p.field.clone(), p.message.clone())).collect();
    let expect = [
        ("gateway.listen", "\"localhost\" is not <ip>:<port>"),
        ("gateway.origins", "\"http://127.0.0.1:8080/\" is not an origin (scheme://host[:port]): the port is not a number"),
        ("gateway.origins", "\"ftp://x.example\" is not an origin (scheme://host[:port]): the scheme is not http or https"),
        ("gateway.origins", "\"https://[::1]:99999\" is not an origin (scheme://host[:port]): the port is not a number"),
        ("gateway.dev-users.\"carol.example\"", "carol.example is not a domain of the bundle"),
    ];
    assert_eq!(problems.len(), expect.len(), "{e}");
    for ((field, message), (want_field, want)) in problems.iter().zip(expect) {
        assert_eq!(field, want_field, "{e}");
        assert!(message.starts_with(want), "{message} is not {want}");
    }
}

/// Opens a connection from a page of `origin` and logs in as dev `user` of
/// `domain`.
async fn login_as(gateway: &Gateway, origin: &str, domain: &str, user: &str) -> Client {
    let mut ws = open(gateway, Some(origin), "/").await.expect("the origin is allowed");
    send(&mut ws, json!({ "type": "login", "domain": domain, "user": user })).await;
    let answer = next(&mut ws).await;
    assert_eq!(answer["type"], "login", "{answer}");
    Client { ws, address: answer["address"].as_str().unwrap().to_owned() }
}

#[tokio::test]
async fn policies_see_apps_as_principals_of_their_own_kind() {
    let (w, _) = two_domains(
        r#"
[gateway]
origins = ["https://chat.example", "https://evil.example"]
[gateway.dev-users]
"alice.example" = ["alice@alice.example"]
"bob.example" = ["bob@bob.example"]
"#,
        Some(
            r#"
@id("no-evil-pages")
forbid (principal is Rethink::App, action, resource) when { principal.origin == "https://evil.example" };
@id("not-bob-to-alice")
forbid (principal is Rethink::App, action, resource)
    when { principal.user == Rethink::User::"bob@bob.example" && principal.domain == "bob.example" && context.target_domain == "alice.example" };
@id("open")
permit (principal, action, resource);
"#,
        ),
    );
    let mut alice = login_as(&w.gateway, "https://chat.example", DOMAIN, "alice@alice.example").await;
    let mut evil = login_as(&w.gateway, "https://evil.example", DOMAIN, "alice@alice.example").await;
    let mut bob = login_as(&w.gateway, "https://chat.example", BOB, "bob@bob.example").await;
    // The same user from the allowed page is answered; from the other
    // origin, and bob's app toward alice's domain, get the host's 403
    // naming the policy.
    alice.still_works(1, &w.echo).await;
    for (client, policy) in [(&mut evil, "no-evil-pages"), (&mut bob, "not-bob-to-alice")] {
        let answer = client.ask(2, &w.echo, json!({ "n": 2 })).await;
        assert_eq!((answer["type"].as_str(), answer["id"].as_u64(), answer["body"]["code"].as_u64()), (Some("response"), Some(2), Some(403)), "{answer}");
        assert!(answer["body"]["description"].as_str().unwrap().contains(policy), "{answer}");
    }
    // Messages to an app are decided with its entity too: alice's app
    // reaches bob's (the policies are alice.example's; bob.example is open).
    let to_bob = Address::parse(bob.address.clone()).unwrap();
    send(&mut alice.ws, json!({ "id": 3, "type": "update", "to": to_bob.as_str(), "request": false, "body": { "value": "hi" } })).await;
    let got = next(&mut bob.ws).await;
    assert_eq!((got["type"].as_str(), got["from"].as_str(), &got["body"]["value"]), (Some("update"), Some(alice.address.as_str()), &json!("hi")), "{got}");
    alice.still_works(4, &w.echo).await;
    assert_eq!(w.runtime.pending_requests(), 0);
}

#[tokio::test]
async fn apps_observe_data_objects_and_closing_forgets_them() {
    let mut w = world_with(dev(), false, json!({ "limits": { "object-subscribers": 1 } }));
    let created = w.driver.command(&w.echo, json!({ "op": "create", "scheme": "comm", "data": { "members": ["alice"] } }));
    let url = created["url"].as_str().unwrap_or_else(|| panic!("{created}")).to_owned();
    let mut c = login(&w.gateway).await;
    // Subscribe (the reporter, the echo, accepts), then read: the state.
    for (id, kind) in [(1, "subscribe"), (2, "read")] {
        send(&mut c.ws, json!({ "id": id, "type": kind, "to": url })).await;
        let answer = next(&mut c.ws).await;
        assert_eq!((answer["id"].as_u64(), answer["body"]["code"].as_u64()), (Some(id), Some(200)), "{answer}");
        assert_eq!(answer["body"]["value"]["data"], json!({ "members": ["alice"] }), "{answer}");
    }
    // The reporter's change arrives as a delta from the object's URL.
    let patch = json!([{ "op": "add", "path": "/members/-", "value": "bob" }]);
    w.driver.command(&w.echo, json!({ "op": "update", "url": url, "patch": patch }));
    let delta = next(&mut c.ws).await;
    assert_eq!((delta["type"].as_str(), delta["from"].as_str()), (Some("update"), Some(url.as_str())), "{delta}");
    assert!(delta["body"]["value"]["version"].as_u64().is_some(), "{delta}");
    assert!(delta["body"]["value"].to_string().contains("bob"), "{delta}");
    // The object takes one subscriber: another connection is refused...
    let mut d = login(&w.gateway).await;
    send(&mut d.ws, json!({ "id": 1, "type": "subscribe", "to": url })).await;
    let refused = next(&mut d.ws).await;
    assert_eq!(refused["body"]["code"], 403, "{refused}");
    assert!(refused["body"]["description"].as_str().unwrap().contains("has 1 subscribers"), "{refused}");
    // ...until the first closes with a request pending: the request is
    // forgotten and the subscription taken back.
    send(&mut c.ws, json!({ "id": 3, "type": "read", "to": w.silent.as_str() })).await;
    wait_until("the request is pending", || w.runtime.pending_requests() == 1);
    drop(c);
    wait_until("the closed connection's request is forgotten", || w.runtime.pending_requests() == 0);
    wait_until("the connection is gone", || w.gateway.connections() == 1);
    send(&mut d.ws, json!({ "id": 2, "type": "subscribe", "to": url })).await;
    let answer = next(&mut d.ws).await;
    assert_eq!((answer["id"].as_u64(), answer["body"]["code"].as_u64()), (Some(2), Some(200)), "{answer}");
    assert_eq!(answer["body"]["value"]["data"], json!({ "members": ["alice", "bob"] }), "{answer}");
    d.still_works(4, &w.echo).await;
}

#[tokio::test]
async fn pending_requests_and_subscriptions_per_connection_are_bounded() {
    let w = world(GatewayConfig { max_pending: 3, max_subscriptions: 1, ..dev() }, false);
    let mut c = login(&w.gateway).await;
    let mut other = login(&w.gateway).await;
    for id in 1..=3 {
        send(&mut c.ws, json!({ "id": id, "type": "read", "to": w.silent.as_str() })).await;
    }
    wait_until("three requests are pending", || w.runtime.pending_requests() == 3);
    let error = c.ask(4, &w.silent, json!(null)).await;
    assert_eq!((error["type"].as_str(), error["id"].as_u64(), error["error"].as_str()), (Some("error"), Some(4), Some("too-many-pending")), "{error}");
    assert!(error["description"].as_str().unwrap().contains("3 requests waiting for their response (max-pending = 3)"), "{error}");
    // Notifications still go; another connection has its own count.
    send(&mut c.ws, json!({ "id": 5, "type": "update", "to": w.echo.as_str(), "request": false })).await;
    w.driver.report(&w.echo, |m| m["id"] == 5);
    other.still_works(6, &w.echo).await;
    assert_eq!(w.runtime.pending_requests(), 3);
    // One observed object at a time (answered 404 here: no such object).
    let (first, second) = ("comm://alice.example/nothing-1", "comm://alice.example/nothing-2");
    send(&mut other.ws, json!({ "id": 7, "type": "subscribe", "to": first })).await;
    assert_eq!(next(&mut other.ws).await["body"]["code"], 404);
    send(&mut other.ws, json!({ "id": 8, "type": "subscribe", "to": second })).await;
    let error = next(&mut other.ws).await;
    assert_eq!((error["id"].as_u64(), error["error"].as_str()), (Some(8), Some("too-many-subscriptions")), "{error}");
    send(&mut other.ws, json!({ "id": 9, "type": "unsubscribe", "to": first })).await;
    assert_eq!(next(&mut other.ws).await["body"]["code"], 404);
    send(&mut other.ws, json!({ "id": 10, "type": "subscribe", "to": second })).await;
    assert_eq!(next(&mut other.ws).await["body"]["code"], 404);
    drop(c);
    wait_until("the closed connection's requests are forgotten", || w.runtime.pending_requests() == 0);
    other.still_works(11, &w.echo).await;
}
