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
    let runtime = runtime(Duration::from_secs(60));
    let driver = Driver::new(&runtime);
    let mut bundle = TestBundle::new()
        .hyperty(DOMAIN, "echo", &guest("puppet"), puppet_config(true))
        .hyperty(DOMAIN, "silent", &guest("puppet"), puppet_config(false));
    if idp {
        bundle = bundle.idp(IDP, IDP_KEY, &[DOMAIN]).domain(DOMAIN, json!({ "require-identity": false }));
    }
    runtime.deploy(&bundle.load()).expect("the gateway world deploys");
    let echo = runtime.lookup(DOMAIN, "echo").unwrap();
    let silent = runtime.lookup(DOMAIN, "silent").unwrap();
    let config = GatewayConfig { domain: Some(DOMAIN.into()), ..config };
    let gateway = runtime.serve_gateway("127.0.0.1:0".parse().unwrap(), config).expect("the gateway starts");
    World { runtime, driver, echo, silent, gateway, _bundle: bundle }
}

fn dev() -> GatewayConfig {
    GatewayConfig { dev_user: Some(DEV_USER.into()), ..GatewayConfig::default() }
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
    login_with(gateway, json!({ "type": "login" })).await
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

#[tokio::test]
async fn a_client_that_does_not_read_is_disconnected() {
    let w = world(GatewayConfig { send_queue: 8, ..dev() }, false);
    let slow = login(&w.gateway).await;
    let mut fine = login(&w.gateway).await;
    let app = Address::parse(slow.address.clone()).unwrap();
    let pad = json!({ "pad": "x".repeat(60_000) }).to_string();
    // Messages for the slow client until the gateway gives up on it: its
    // route goes (the host answers 404), nothing piles up meanwhile.
    let mut id = 1_000;
    let mut gone = false;
    for _ in 0..100_000 {
        id += 1;
        let m = Message::new(id, MessageType::Update, w.driver.address().clone(), app.clone(), Some(pad.clone()));
        match w.driver.endpoint.send(m) {
            Ok(()) | Err(hyperty_host::SendError::InboxFull(_)) => {}
            Err(e) => panic!("{e}"),
        }
        // Once its route is gone the host answers 404 (stop there: each
        // further send would be answered too).
        if let Some(m) = w.driver.endpoint.try_recv()
            && (m.kind, m.body.code) == (MessageType::Response, Some(404))
        {
            gone = true;
            break;
        }
        std::thread::yield_now();
    }
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
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(WAIT, slow.ws.next()).await {
        if let WsMessage::Close(Some(close)) = frame {
            assert_eq!(u16::from(close.code), CLOSE_SEND_QUEUE_FULL, "{close:?}");
            assert!(close.reason.as_str().contains("does not read"), "{close:?}");
            break;
        }
    }
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
    assert_eq!(run("127.0.0.1:0", &["--gateway-dev-user", DEV_USER, "--gateway-origin", "https://app.example"]), std::process::ExitCode::SUCCESS);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(run(&taken.local_addr().unwrap().to_string(), &[]), std::process::ExitCode::FAILURE);
    // Gateway options need the gateway.
    assert_eq!(dirs.cli(&["run", manifest, "--gateway-dev-user", DEV_USER]), std::process::ExitCode::from(2));
}
