//! `just bench` (gateway part): round trips app → gateway → pong hyperty →
//! gateway → app over loopback, from a Rust tokio-tungstenite client, one
//! request at a time; beside a bare tokio-tungstenite echo server measured
//! in the same run with the same client. The ratio is the gateway's cost
//! (login, JSON ↔ message, policies, the bus, the hyperty's sandbox).
//!
//! Then the same from a browser: Debian's headless Chromium runs
//! `tests/pages/bench.js` (served by the gateway), which measures round
//! trips to the bare echo server with a plain `WebSocket` and through the
//! gateway with the JavaScript client (`client.request`), and reports both.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyperty_host::gateway::GatewayConfig;
use hyperty_tests::browser::{Chromium, Reports, encode};
use hyperty_tests::*;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WARMUP: usize = 500;
const ROUNDS: usize = 5_000;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(addr: std::net::SocketAddr) -> Ws {
    let mut request = format!("ws://{addr}/").into_client_request().unwrap();
    request.headers_mut().insert("Origin", format!("http://{addr}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

async fn next_text(ws: &mut Ws) -> String {
    loop {
        match ws.next().await.expect("open").expect("a frame") {
            WsMessage::Text(t) => return t.as_str().to_owned(),
            WsMessage::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// Sends `frame(i)` and waits for the answer, `WARMUP + ROUNDS` times; the
/// round trips' durations in µs (after the warm-up) and the total time.
async fn measure(ws: &mut Ws, frame: impl Fn(u64) -> String, check: impl Fn(u64, &str)) -> (Vec<f64>, Duration) {
    let mut times = Vec::with_capacity(ROUNDS);
    let mut total = Duration::ZERO;
    for i in 0..(WARMUP + ROUNDS) as u64 {
        let start = Instant::now();
        ws.send(WsMessage::text(frame(i))).await.unwrap();
        let answer = next_text(ws).await;
        let took = start.elapsed();
        check(i, &answer);
        if i as usize >= WARMUP {
            times.push(took.as_secs_f64() * 1e6);
            total += took;
        }
    }
    (times, total)
}

fn pct(sorted: &[f64], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn report(name: &str, mut times: Vec<f64>, total: Duration) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    let rate = ROUNDS as f64 / total.as_secs_f64();
    println!("  {name:<34} {rate:>9.0} round trips/s  p50 {:>7.1} µs  p99 {:>7.1} µs", pct(&times, 50), pct(&times, 99));
    (rate, pct(&times, 50))
}

/// A bare tokio-tungstenite echo server on its own thread.
fn echo_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                    while let Some(Ok(frame)) = ws.next().await {
                        if frame.is_text() && ws.send(frame).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    });
    addr
}

fn main() {
    let runtime = runtime(Duration::from_secs(60));
    // Keeps the puppet's observer route: its reports fill this inbox and
    // are then refused (inbox-full), which the puppet ignores.
    let _driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "pong", &guest("puppet"), puppet_config(true))
        .domain("alice.example", json!({ "limits": { "rate": 100_000_000, "burst": 1_000_000, "inbox": 65_536 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let pong = runtime.lookup("alice.example", "pong").unwrap();
    let config = GatewayConfig {
        dev_users: [("alice.example".to_owned(), vec!["alice@alice.example".to_owned()])].into(),
        rate: 1_000_000,
        burst: 1_000_000,
        static_dir: Some(repo().join("tests/pages")),
        ..GatewayConfig::default()
    };
    let gateway = runtime.serve_gateway("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let at = gateway.local_addr();
    let echo = echo_server();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let to = pong.to_string();
    rt.block_on(async move {
        println!("app gateway round trips over loopback, one at a time ({ROUNDS} after {WARMUP} warm-up):");
        let mut ws = connect(echo).await;
        let (echo_times, echo_total) =
            measure(&mut ws, |i| json!({ "id": i, "type": "execute", "to": "x", "body": { "value": { "n": i } } }).to_string(), |_, _| {}).await;
        let (echo_rate, echo_p50) = report("bare tokio-tungstenite echo", echo_times, echo_total);
        let mut ws = connect(at).await;
        ws.send(WsMessage::text(json!({ "type": "login", "user": "alice@alice.example" }).to_string())).await.unwrap();
        let login: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(login["type"], "login", "{login}");
        let frame = |i: u64| json!({ "id": i, "type": "execute", "to": to, "body": { "value": { "n": i } } }).to_string();
        let check = |i: u64, answer: &str| {
            let answer: Value = serde_json::from_str(answer).unwrap();
            assert_eq!((answer["id"].as_u64(), answer["body"]["code"].as_u64()), (Some(i), Some(200)), "{answer}");
        };
        let (times, total) = measure(&mut ws, frame, check).await;
        let (rate, p50) = report("gateway → pong hyperty → gateway", times, total);
        println!("  ratio: the gateway round trip takes {:.1}× the bare echo's p50 ({:.1}× fewer round trips/s)", p50 / echo_p50, echo_rate / rate);
    });
    browser_leg(at, echo, &pong.to_string());
    drop(gateway);
}

/// The browser leg: Chromium runs `tests/pages/bench.js` from the gateway
/// and reports its figures (round trips/s from the total time; p50/p99 to
/// the grain of the browser's coarsened clock).
fn browser_leg(gateway: std::net::SocketAddr, echo: std::net::SocketAddr, pong: &str) {
    const BROWSER_ROUNDS: usize = 2_000;
    let reports = Reports::start();
    let fragment = [
        ("echo", format!("ws://{echo}/")),
        ("to", pong.to_owned()),
        ("domain", "alice.example".to_owned()),
        ("user", "alice@alice.example".to_owned()),
        ("rounds", BROWSER_ROUNDS.to_string()),
        ("warmup", "200".to_owned()),
        ("report", reports.url()),
    ];
    let fragment: Vec<String> = fragment.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
    let mut browser = Chromium::open(&format!("http://{gateway}/bench.html#{}", fragment.join("&")));
    let result = reports.wait(&mut browser, "the bench page's figures", |r| r["page"] == "bench");
    assert!(result.get("error").is_none(), "the bench page failed: {result}");
    println!("the same from headless Chromium ({BROWSER_ROUNDS} after 200 warm-up; percentiles to the browser clock's grain):");
    let row = |name: &str, f: &Value| {
        println!("  {name:<34} {:>9.0} round trips/s  p50 {:>7.1} µs  p99 {:>7.1} µs", f["rate"].as_f64().unwrap(), f["p50"].as_f64().unwrap(), f["p99"].as_f64().unwrap());
        f["rate"].as_f64().unwrap()
    };
    let echo_rate = row("browser WebSocket → bare echo", &result["echo"]);
    let rate = row("browser client.js → gateway → pong", &result["gateway"]);
    println!("  ratio: {:.1}× fewer round trips/s through the gateway", echo_rate / rate);
}
