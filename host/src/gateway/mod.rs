//! The app gateway: browser apps reach hyperties over WebSocket (RFC 6455)
//! on HTTP/1.1, one connection per app instance. One gateway serves every
//! provider domain of the runtime.
//!
//! - **HTTP** (module `http`): a request without `Upgrade: websocket` is a
//!   `GET`/`HEAD` of a file of [`GatewayConfig::static_dir`] (`index.html`
//!   for a directory) or of the JavaScript client at [`CLIENT_PATH`]; other
//!   methods 405, nothing there 404. The request head is at most
//!   [`GatewayConfig::max_head_bytes`] (else 431) and must arrive within
//!   [`GatewayConfig::login_timeout`]; a plain exchange ends within
//!   [`GatewayConfig::http_timeout`].
//! - **Handshake**: the `Origin` header must be one of
//!   [`GatewayConfig::allowed_origins`] (by default only the gateway's own
//!   origin, `http://<bound address>`), else HTTP 403. A query string is
//!   refused (400): credentials never travel in the URL, only in the login
//!   frame. Over [`GatewayConfig::max_connections`] (or the per-IP limit)
//!   the connection is answered HTTP 503 and closed before any handshake.
//! - **Login first**: the first frame must be `{"type":"login","domain"?:..,
//!   "assertion":{"idp":..,"token":..}}`, validated by the proxy of that
//!   IdP (which must be the IdP of the domain), or `{"type":"login",
//!   "domain"?:..,"user":..}` naming a development user of the domain
//!   ([`GatewayConfig::dev_users`]). `domain` must be a provider domain of
//!   the runtime; it may be left out when the runtime has only one.
//!   Anything else, or nothing within [`GatewayConfig::login_timeout`],
//!   closes the connection with 1008 (policy violation) and the reason. The
//!   answer is `{"type":"login","address":"app://<domain>/<uuid>","user":..}`.
//! - **Messages**: the connection is then an [`Endpoint`] at its address,
//!   bound to the user (identity and policies see it as a hyperty of the
//!   login's domain acting for that user). One reTHINK message per text
//!   frame, `{"id","type","from"?,"to","body"?:{"code","resource","value",
//!   "description"},"request"?}`: `from`, when given, must be the
//!   connection's address; `value` is any JSON value; a non-response is a
//!   request (answered by its receiver or the host's 403/404/408) unless
//!   `"request": false`. Messages to the connection's address arrive as
//!   frames of the same shape (plus `identity` when the host set one).
//! - **Discovery** (module `discover`): `{"type":"discover","id",
//!   "query"}` is answered by the gateway with the registry's matches, as
//!   a hyperty's `registry.discover` sees them.
//! - **Refusals** of single frames are error frames, `{"type":"error",
//!   "id":<id or null>,"error":<kind>,"description":..}`, and the
//!   connection goes on. Kinds: `not-json`, `not-a-message`, `binary-frame`,
//!   `bad-address`, `rate-limited`, `too-many-pending`
//!   ([`GatewayConfig::max_pending`]), `too-many-subscriptions`, and the
//!   bus's own ([`SendError`]):
//!   `spoofed-from`, `malformed`, `too-large`, `duplicate-id`, `inbox-full`.
//! - **Closing**: a frame over [`GatewayConfig::max_frame_bytes`] closes
//!   with 1009; a client that does not read, so that its send queue
//!   ([`GatewayConfig::send_queue`] frames or
//!   [`GatewayConfig::send_queue_bytes`]) fills, with 4008. Closing
//!   removes the route, forgets the requests it was waiting on, unsubscribes
//!   from every data object it subscribed to and drops its `App` entity.
//! - **Data objects**: `subscribe`, `read` and `unsubscribe` frames to an
//!   object's URL work as for a hyperty (observers may be `app://`); the
//!   deltas arrive as frames from the URL.
//! - **Policies**: the connection is the Cedar entity `Rethink::App`
//!   (`origin`, `domain`, `user`), registered while it is open.
//!
//! The gateway runs on its own thread with a single-threaded tokio
//! runtime; calls into the bus (which may run policies, an IdP proxy or the
//! syncher) go to tokio's blocking pool, so one slow call never stalls the
//! other connections. Every limit is listed in `host/SECURITY.md`.

mod discover;
mod http;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

pub use discover::MAX_DISCOVERED;
pub use http::CLIENT_PATH;

use crate::address::Address;
use crate::bus::{Bus, SendError};
use crate::identity::Identities;
use crate::message::{Assertion, Body, Message, MessageType, Text, validate_value};
use crate::policy::Descriptor;
use crate::policy::cedar::{AppPrincipal, CedarPolicies};
use crate::registry::Registry;
use crate::runtime::Endpoint;
use crate::sandbox::limits::{QueuedBytes, RateLimiter};

/// The close code for a client whose send queue filled because it does not
/// read (application range of RFC 6455 §7.4.2).
pub const CLOSE_SEND_QUEUE_FULL: u16 = 4008;

/// How long closing may wait to hand the close frame to the client.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The bus-side queue of a connection's endpoint, in messages; the
/// forwarder drains it into the send queue at once.
const ENDPOINT_CAPACITY: usize = 64;

/// Settings of the app gateway (see the module doc for the protocol).
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Origins (`scheme://host[:port]`, RFC 6454) whose pages may connect;
    /// empty: only the gateway's own, `http://<bound address>`.
    pub allowed_origins: Vec<String>,
    /// Development mode: by provider domain, the users a login may name
    /// without an assertion.
    pub dev_users: BTreeMap<String, Vec<String>>,
    /// The directory whose files are served over plain HTTP (`None`: only
    /// the JavaScript client).
    pub static_dir: Option<PathBuf>,
    /// The largest HTTP request head, in bytes (default 8 KiB).
    pub max_head_bytes: usize,
    /// From accepting a plain HTTP request (not an upgrade) to the last byte
    /// of its response (default 30 s).
    pub http_timeout: Duration,
    /// The largest frame (and message) a client may send, in bytes; at
    /// most the bus's largest message. Default 1 MiB.
    pub max_frame_bytes: usize,
    /// Messages a connection may send per second (token bucket).
    pub rate: u32,
    /// Messages a connection may send in a burst above `rate`.
    pub burst: u32,
    /// Connections open at once, in total.
    pub max_connections: usize,
    /// Connections open at once from one remote IP address.
    pub max_connections_per_ip: usize,
    /// Frames waiting to be written to a client; a client that lets it
    /// fill is disconnected (close code [`CLOSE_SEND_QUEUE_FULL`]).
    pub send_queue: usize,
    /// Bytes of the frames waiting to be written to a client (default
    /// 4 MiB; one frame alone always fits): a client that does not read is
    /// disconnected when either bound is reached ([`CLOSE_SEND_QUEUE_FULL`]). Without it a page that
    /// asks an echoing hyperty for 1 MiB answers and reads none would make
    /// the host hold `send_queue` of them.
    pub send_queue_bytes: usize,
    /// From accepting the TCP connection to a successful login.
    pub login_timeout: Duration,
    /// Requests of one connection waiting for their response at once
    /// (default 100); past it a request frame gets `too-many-pending`.
    pub max_pending: usize,
    /// Data objects one connection observes at once (default 256); past it
    /// a `subscribe` frame gets `too-many-subscriptions`.
    pub max_subscriptions: usize,
}

impl Default for GatewayConfig {
    fn default() -> GatewayConfig {
        GatewayConfig {
            allowed_origins: Vec::new(),
            dev_users: BTreeMap::new(),
            static_dir: None,
            max_head_bytes: 8 * 1024,
            http_timeout: Duration::from_secs(30),
            max_frame_bytes: 1 << 20,
            rate: 100,
            burst: 200,
            max_connections: 1024,
            max_connections_per_ip: 64,
            send_queue: 256,
            send_queue_bytes: 4 << 20,
            login_timeout: Duration::from_secs(10),
            max_pending: 100,
            max_subscriptions: 256,
        }
    }
}

impl GatewayConfig {
    /// The settings a bundle's `[gateway]` section gives (origins,
    /// development users, static files), the rest by default.
    pub fn from_spec(spec: &crate::bundle::GatewaySpec) -> GatewayConfig {
        GatewayConfig {
            allowed_origins: spec.origins.clone(),
            dev_users: spec.dev_users.clone(),
            static_dir: spec.static_dir.clone(),
            ..GatewayConfig::default()
        }
    }
}

/// A running gateway; dropping it stops it and closes every connection.
pub struct Gateway {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What every connection task reads.
struct Shared {
    bus: Bus,
    identities: Arc<Identities>,
    /// Where connections are registered as `App` entities.
    policies: Arc<CedarPolicies>,
    /// What `discover` frames search.
    registry: Arc<Registry>,
    config: GatewayConfig,
    origins: Vec<String>,
    /// The static files' directory, opened once.
    static_dir: Option<Arc<cap_std::fs::Dir>>,
    /// Open connections by remote IP.
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl Gateway {
    /// Binds `addr` and serves on a thread of its own (see
    /// [`crate::Runtime::serve_gateway`]).
    pub(crate) fn serve(addr: SocketAddr, config: GatewayConfig, bus: Bus, identities: Arc<Identities>, policies: Arc<CedarPolicies>, registry: Arc<Registry>) -> Result<Gateway> {
        let bus_max = bus.config().max_message_bytes;
        if config.max_frame_bytes > bus_max {
            bail!("gateway max-frame-bytes {} is over the bus's largest message ({bus_max} bytes)", config.max_frame_bytes);
        }
        let sizes = [config.max_connections, config.max_connections_per_ip, config.send_queue, config.send_queue_bytes, config.max_pending, config.max_subscriptions];
        if config.rate == 0 || config.burst == 0 || sizes.contains(&0) {
            bail!(
                "gateway rate, burst, max-connections, max-connections-per-ip, send-queue, send-queue-bytes, max-pending and max-subscriptions must be at least 1"
            );
        }
        if config.max_head_bytes < 256 {
            bail!("gateway max-head-bytes {} is too small for any request head (at least 256)", config.max_head_bytes);
        }
        for origin in &config.allowed_origins {
            crate::bundle::validate_origin(origin).map_err(|e| anyhow::anyhow!("gateway origins: {e}"))?;
        }
        let static_dir = match &config.static_dir {
            Some(path) => Some(Arc::new(
                cap_std::fs::Dir::open_ambient_dir(path, cap_std::ambient_authority())
                    .with_context(|| format!("cannot open the gateway's static directory {}", path.display()))?,
            )),
            None => None,
        };
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot bind the gateway to {addr}"))?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let origins =
            if config.allowed_origins.is_empty() { vec![format!("http://{local_addr}")] } else { config.allowed_origins.clone() };
        let shared = Arc::new(Shared { bus, identities, policies, registry, config, origins, static_dir, open: Mutex::default() });
        let (stop, stopped) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let serving = shared.clone();
        let thread = std::thread::Builder::new().name("hyperty-gateway".into()).spawn(move || {
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(serving, listener, stopped).await,
                    Err(e) => tracing::error!("gateway: {e}"),
                }
            });
            // Dropping the runtime drops every connection task: their
            // endpoints leave the bus.
            rt.shutdown_timeout(CLOSE_GRACE);
        })?;
        tracing::info!("app gateway on http://{local_addr} for {}", shared.identities.hosted().join(", "));
        Ok(Gateway { local_addr, shared, stop: Some(stop), thread: Some(thread) })
    }

    /// The address it listens on (with the port chosen, if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections open now (handshake, login or logged in).
    pub fn connections(&self) -> usize {
        self.shared.open.lock().unwrap().values().sum()
    }

    /// Reads [`Gateway::connections`] while the gateway serves; `None` once
    /// it is gone (for the metrics).
    pub(crate) fn connections_reader(&self) -> impl Fn() -> Option<usize> + Send + Sync + 'static {
        let shared = Arc::downgrade(&self.shared);
        move || shared.upgrade().map(|s| s.open.lock().unwrap().values().sum())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A connection's place in the limits; freed on drop.
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().unwrap();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl Shared {
    /// Counts a new connection from `ip`, or says which limit it is over.
    fn admit(self: &Arc<Shared>, ip: IpAddr) -> Result<Slot, String> {
        let mut open = self.open.lock().unwrap();
        let total: usize = open.values().sum();
        if total >= self.config.max_connections {
            return Err(format!("the gateway has {total} connections, its limit"));
        }
        let from_ip = open.entry(ip).or_default();
        if *from_ip >= self.config.max_connections_per_ip {
            return Err(format!("{ip} has {from_ip} connections, the limit per address"));
        }
        *from_ip += 1;
        Ok(Slot { shared: self.clone(), ip })
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut stopped: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => match shared.admit(peer.ip()) {
                Ok(slot) => {
                    tokio::spawn(connection(shared.clone(), stream, slot));
                }
                Err(why) => {
                    tracing::warn!("gateway: refused a connection from {peer}: {why}");
                    let body = format!("too many connections: {why}\n");
                    let response = format!(
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    // Best effort, never waiting: the socket buffer of a
                    // fresh connection holds it.
                    let _ = stream.try_write(response.as_bytes());
                }
            },
            Err(e) => {
                // Out of descriptors and the like: pause rather than spin.
                tracing::warn!("gateway: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A connection after its request head was read: the head is replayed
/// before the rest of the stream.
type Conn = tokio::io::Join<tokio::io::Chain<std::io::Cursor<Vec<u8>>, OwnedReadHalf>, OwnedWriteHalf>;
type Sink = SplitSink<WebSocketStream<Conn>, WsMessage>;
type Frames = SplitStream<WebSocketStream<Conn>>;

fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    // A close frame's reason is at most 123 bytes (RFC 6455 §5.5).
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame { code, reason: reason[..end].into() }
}

/// Checks the handshake request: its `Origin` (returned) and that the URL
/// carries no query string.
fn check_handshake(origins: &[String], request: &Request) -> Result<String, (StatusCode, String)> {
    if request.uri().query().is_some() {
        return Err((StatusCode::BAD_REQUEST, "the gateway takes no query string: credentials go in the login frame".into()));
    }
    let origin = request.headers().get("origin").and_then(|o| o.to_str().ok());
    match origin {
        Some(origin) if origins.iter().any(|o| o == origin) => Ok(origin.to_owned()),
        Some(origin) => Err((StatusCode::FORBIDDEN, format!("origin {origin} is not allowed"))),
        None => Err((StatusCode::FORBIDDEN, "no Origin header".into())),
    }
}

async fn connection(shared: Arc<Shared>, mut stream: TcpStream, _slot: Slot) {
    let accepted = Instant::now();
    let deadline = accepted + shared.config.login_timeout;
    let head = match tokio::time::timeout_at(deadline, crate::http::read_head(&mut stream, shared.config.max_head_bytes)).await {
        Err(_) => {
            let why = format!("no request head within {} ms", shared.config.login_timeout.as_millis());
            return crate::http::refuse(&mut stream, (StatusCode::REQUEST_TIMEOUT, why), "").await;
        }
        Ok(Err(refusal)) => return crate::http::refuse(&mut stream, refusal, "").await,
        Ok(Ok(None)) => return,
        Ok(Ok(Some(head))) => head,
    };
    if !head.upgrade {
        let _ = tokio::time::timeout_at(accepted + shared.config.http_timeout, http::respond(&shared, &mut stream, &head)).await;
        return;
    }
    let (read, write) = stream.into_split();
    let stream = tokio::io::join(std::io::Cursor::new(head.bytes).chain(read), write);
    let max = shared.config.max_frame_bytes;
    let ws_config = WebSocketConfig::default().max_message_size(Some(max)).max_frame_size(Some(max));
    let origins = shared.origins.clone();
    let mut origin = String::new();
    let seen = &mut origin;
    // tungstenite's `Callback` fixes the error type (an HTTP response).
    #[allow(clippy::result_large_err)]
    let callback = move |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        check_handshake(&origins, request).map(|origin| {
            *seen = origin;
            response
        })
        .map_err(|(status, why)| {
            tracing::info!("gateway: handshake refused: {why}");
            let mut refusal = ErrorResponse::new(Some(why));
            *refusal.status_mut() = status;
            refusal
        })
    };
    let accepted = tokio::time::timeout_at(deadline, tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config)));
    let Ok(Ok(ws)) = accepted.await else { return };
    let (sink, mut frames) = ws.split();
    let (frames_tx, queued) = mpsc::channel(shared.config.send_queue);
    let queue = SendQueue { frames: frames_tx, bytes: Arc::default(), max_bytes: shared.config.send_queue_bytes };
    let (close, closing) = watch::channel(None);
    let writer = tokio::spawn(write_loop(sink, queued, queue.bytes.clone(), closing));
    let reason = serve(&shared, &mut frames, &queue, deadline, origin).await;
    tracing::debug!("gateway: closing a connection: {reason:?}");
    let _ = close.send(Some(reason));
    let _ = writer.await;
}

/// The frames waiting to be written to a client, bounded in count (the
/// channel's, [`GatewayConfig::send_queue`]) and in bytes
/// ([`GatewayConfig::send_queue_bytes`]).
struct SendQueue {
    frames: mpsc::Sender<WsMessage>,
    /// Bytes of the frames queued and not yet written ([`write_loop`]
    /// takes each off once the sink took it).
    bytes: Arc<QueuedBytes>,
    max_bytes: usize,
}

/// Writes queued frames until closing; then the close frame, if the client
/// still takes it. `queued_bytes`: the [`SendQueue`]'s count, taken down
/// as each frame is written.
async fn write_loop(
    mut sink: Sink,
    mut queued: mpsc::Receiver<WsMessage>,
    queued_bytes: Arc<QueuedBytes>,
    mut closing: watch::Receiver<Option<CloseFrame>>,
) {
    loop {
        let frame = tokio::select! {
            biased;
            _ = closing.changed() => break,
            frame = queued.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
        };
        let len = frame.len();
        tokio::select! {
            sent = sink.send(frame) => if sent.is_err() { return },
            _ = closing.changed() => break,
        }
        queued_bytes.give_back(len);
    }
    let frame = closing.borrow().clone();
    if let Some(frame) = frame {
        let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(WsMessage::Close(Some(frame)))).await;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, sink.close()).await;
}

/// Queues `frame` for the client; a full queue (in frames or in bytes)
/// means the client does not read: the connection closes with
/// [`CLOSE_SEND_QUEUE_FULL`].
fn enqueue(queue: &SendQueue, frame: Value) -> Result<(), CloseFrame> {
    let text = frame.to_string();
    let len = text.len();
    let full = |why: String| close_frame(CloseCode::from(CLOSE_SEND_QUEUE_FULL), &format!("send queue full ({why}): the client does not read"));
    // One frame alone always fits (a frame may be larger than the bound:
    // `to_frame` writes the message again, escapes and all).
    if !queue.bytes.take(len, queue.max_bytes) {
        return Err(full(format!("{} bytes", queue.max_bytes)));
    }
    queue.frames.try_send(WsMessage::text(text)).map_err(|_| {
        queue.bytes.give_back(len);
        full(format!("{} frames", queue.frames.max_capacity()))
    })
}

/// Runs one connection after its handshake: login, then messages both
/// ways; returns how to close it.
async fn serve(shared: &Arc<Shared>, frames: &mut Frames, queue: &SendQueue, deadline: Instant, origin: String) -> CloseFrame {
    // `_app` is dropped after `endpoint`: the entity outlives the route.
    let (_app, endpoint) = match login(shared, frames, deadline, origin).await {
        Ok((app, endpoint)) => (app, Arc::new(endpoint)),
        Err(close) => return close,
    };
    let user = endpoint_user(&endpoint);
    if let Err(close) = enqueue(queue, json!({ "type": "login", "address": endpoint.address().as_str(), "user": user })) {
        return close;
    }
    let mut bucket = RateLimiter::new(shared.config.rate, shared.config.burst);
    // Dropped first (declared last), whatever ends the connection.
    let mut subscriptions = Subscriptions { endpoint: endpoint.clone(), urls: BTreeSet::new() };
    loop {
        tokio::select! {
            frame = frames.next() => {
                let refusal = match frame {
                    None => return close_frame(CloseCode::Normal, ""),
                    Some(Err(tungstenite::Error::Capacity(e))) => {
                        return close_frame(CloseCode::Size, &format!("{e}; the limit is {} bytes", shared.config.max_frame_bytes));
                    }
                    Some(Err(e)) => return close_frame(CloseCode::Protocol, &e.to_string()),
                    Some(Ok(WsMessage::Text(text))) => handle(shared, &endpoint, text.as_str(), &mut bucket, &mut subscriptions.urls).await.err(),
                    Some(Ok(WsMessage::Binary(_))) => Some(error_frame(None, "binary-frame", "binary frames are not accepted: one JSON message per text frame")),
                    Some(Ok(WsMessage::Close(_))) => return close_frame(CloseCode::Normal, ""),
                    Some(Ok(_)) => None,
                };
                if let Some(refusal) = refusal
                    && let Err(close) = enqueue(queue, refusal)
                {
                    return close;
                }
            }
            message = endpoint.recv() => {
                let Some(message) = message else { return close_frame(CloseCode::Away, "the runtime stops") };
                if let Err(close) = enqueue(queue, to_frame(&message)) {
                    return close;
                }
            }
        }
    }
}

/// The data objects a connection subscribed to (every `subscribe` it sent
/// and did not take back); dropping it unsubscribes from each, so the
/// syncher forgets the connection.
struct Subscriptions {
    endpoint: Arc<Endpoint>,
    urls: BTreeSet<Address>,
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        // Notifications (nothing waits for the answers); no lock held.
        for (i, url) in std::mem::take(&mut self.urls).into_iter().enumerate() {
            let m = Message::new(u64::MAX - i as u64, MessageType::Unsubscribe, self.endpoint.address().clone(), url, None);
            if let Err(e) = self.endpoint.send(m) {
                tracing::debug!("gateway: unsubscribing {} on close: {e}", self.endpoint.address());
            }
        }
    }
}

fn endpoint_user(endpoint: &Endpoint) -> Option<String> {
    endpoint.acting_for().and_then(|d| d.user.clone())
}

/// The login frame.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    #[serde(rename = "type")]
    kind: String,
    domain: Option<String>,
    user: Option<String>,
    assertion: Option<LoginAssertion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginAssertion {
    idp: String,
    token: String,
}

/// Waits for the login frame and opens the connection's endpoint, bound to
/// the user it names; the close frame says why not.
async fn login(shared: &Arc<Shared>, frames: &mut Frames, deadline: Instant, origin: String) -> Result<(AppEntity, Endpoint), CloseFrame> {
    let refuse = |why: String| close_frame(CloseCode::Policy, &why);
    let first = match tokio::time::timeout_at(deadline, frames.next()).await {
        Err(_) => return Err(refuse(format!("no login within {} ms", shared.config.login_timeout.as_millis()))),
        Ok(None) => return Err(close_frame(CloseCode::Normal, "")),
        Ok(Some(Err(tungstenite::Error::Capacity(e)))) => return Err(close_frame(CloseCode::Size, &e.to_string())),
        Ok(Some(Err(e))) => return Err(close_frame(CloseCode::Protocol, &e.to_string())),
        Ok(Some(Ok(frame))) => frame,
    };
    let WsMessage::Text(text) = first else {
        return Err(refuse("the first frame must be a login (a text frame)".into()));
    };
    let login = validate_value(text.as_str())
        .map_err(|e| e.replacen("body.value", "frame", 1))
        .and_then(|()| serde_json::from_str::<Login>(text.as_str()).map_err(|e| e.to_string()))
        .and_then(|login| if login.kind == "login" { Ok(login) } else { Err(format!("type is {:?}", login.kind)) })
        .map_err(|why| refuse(format!("the first frame must be a login: {why}")))?;
    let hosted = shared.identities.hosted();
    let domain = match login.domain {
        Some(domain) if shared.identities.hosts(&domain) => domain,
        Some(domain) => return Err(refuse(format!("{domain:?} is not a domain of this runtime (it has {})", hosted.join(", ")))),
        None if hosted.len() == 1 => hosted[0].clone(),
        None => return Err(refuse(format!("the login must name its domain, one of: {}", hosted.join(", ")))),
    };
    let user = match (login.assertion, login.user) {
        (Some(_), Some(_)) => return Err(refuse("the login has an assertion and a user: the assertion names the user".into())),
        (Some(assertion), None) => {
            let identities = shared.identities.clone();
            let assertion = Assertion { idp: assertion.idp.into(), token: assertion.token.into() };
            let of = domain.clone();
            // The IdP proxy is a guest: off the gateway's thread.
            match tokio::task::spawn_blocking(move || crate::endpoint::user_of(&identities, &of, &assertion)).await {
                Ok(Ok(user)) => user,
                Ok(Err(why)) => return Err(refuse(why)),
                Err(e) => return Err(close_frame(CloseCode::Error, &e.to_string())),
            }
        }
        (None, Some(user)) => match shared.config.dev_users.get(&domain) {
            Some(users) if users.contains(&user) => user,
            Some(_) => return Err(refuse(format!("{user:?} is not a development user of {domain}"))),
            None => return Err(refuse(format!("{domain} has no development users: the login needs an assertion ({{\"idp\", \"token\"}})"))),
        },
        (None, None) => return Err(refuse("the login needs an assertion ({\"idp\", \"token\"}) or a development user (\"user\")".into())),
    };
    let address = Address::parse(format!("app://{domain}/{}", uuid::Uuid::new_v4())).expect("a hosted domain is valid");
    let app = AppEntity::add(&shared.policies, &address, AppPrincipal { origin, domain: domain.clone(), user: user.clone() });
    let descriptor = Descriptor { domain, name: "app".into(), user: Some(user) };
    let endpoint = Endpoint::open(&shared.bus, address, ENDPOINT_CAPACITY, Some(descriptor)).map_err(|e| close_frame(CloseCode::Error, &e.to_string()))?;
    Ok((app, endpoint))
}

/// A connection's `App` entity in the policies, while it is open.
struct AppEntity {
    policies: Arc<CedarPolicies>,
    address: Address,
}

impl AppEntity {
    fn add(policies: &Arc<CedarPolicies>, address: &Address, app: AppPrincipal) -> AppEntity {
        policies.add_app(address, app);
        AppEntity { policies: policies.clone(), address: address.clone() }
    }
}

impl Drop for AppEntity {
    fn drop(&mut self) {
        self.policies.remove_app(&self.address);
    }
}

/// A message frame from the client.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Frame {
    id: u64,
    #[serde(rename = "type")]
    kind: String,
    from: Option<String>,
    to: String,
    #[serde(default)]
    body: FrameBody,
    request: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FrameBody {
    code: Option<u16>,
    resource: Option<String>,
    value: Option<Value>,
    description: Option<String>,
}

fn error_frame(id: Option<u64>, error: &str, description: &str) -> Value {
    json!({ "type": "error", "id": id, "error": error, "description": description })
}

/// The error kind of a bus refusal (the WIT `send-error` names).
fn send_error_kind(e: &SendError) -> &'static str {
    match e {
        SendError::SpoofedFrom(_) => "spoofed-from",
        SendError::SpoofedIdentity(_) => "spoofed-identity",
        SendError::Malformed(_) => "malformed",
        SendError::TooLarge(_) => "too-large",
        SendError::DuplicateId(_) => "duplicate-id",
        SendError::InboxFull(_) => "inbox-full",
        SendError::RateLimited(_) => "rate-limited",
        SendError::TooManyPending(_) => "too-many-pending",
    }
}

/// One text frame from a logged-in client: checked, stamped and sent; the
/// error frame says why not (or, for a `discover` frame, the answer).
async fn handle(shared: &Shared, endpoint: &Arc<Endpoint>, text: &str, bucket: &mut RateLimiter, subscriptions: &mut BTreeSet<Address>) -> Result<(), Value> {
    validate_value(text).map_err(|e| error_frame(None, "not-json", &e.replacen("body.value", "frame", 1)))?;
    let frame: Frame = match serde_json::from_str(text) {
        Ok(frame) => frame,
        // Not a message: a discovery, answered here (the answer goes back
        // as this "refusal"), or refused.
        Err(e) => {
            let answer = discover::answer(&shared.registry, text).ok_or_else(|| error_frame(None, "not-a-message", &e.to_string()))?;
            if !bucket.take() {
                return Err(error_frame(answer["id"].as_u64(), "rate-limited", "more messages than this connection's rate"));
            }
            return Err(answer);
        }
    };
    let id = Some(frame.id);
    let refuse = |kind: &str, why: String| error_frame(id, kind, &why);
    if !bucket.take() {
        return Err(refuse("rate-limited", "more messages than this connection's rate".into()));
    }
    let kind = MessageType::parse(&frame.kind).ok_or_else(|| refuse("not-a-message", format!("unknown type {:?}", frame.kind)))?;
    if let Some(from) = &frame.from
        && from != endpoint.address().as_str()
    {
        return Err(refuse("spoofed-from", format!("from {from:?} is not this connection's address ({})", endpoint.address())));
    }
    let to = Address::parse(frame.to).map_err(|e| refuse("bad-address", format!("to: {e}")))?;
    let body = Body {
        code: frame.body.code,
        resource: frame.body.resource.map(Text::from),
        value: frame.body.value.map(|v| v.to_string().into()),
        description: frame.body.description.map(Text::from),
    };
    let request = kind != MessageType::Response && frame.request.unwrap_or(true);
    // Only this task sends from the connection's address: the counts cannot
    // grow between these checks and the send.
    let max = shared.config.max_subscriptions;
    if kind == MessageType::Subscribe && !subscriptions.contains(&to) && subscriptions.len() >= max {
        return Err(refuse("too-many-subscriptions", format!("this connection observes {max} data objects (max-subscriptions): unsubscribe first")));
    }
    let pending = shared.bus.pending_from(endpoint.address());
    if request && pending >= shared.config.max_pending {
        let why = format!("this connection has {pending} requests waiting for their response (max-pending = {})", shared.config.max_pending);
        return Err(refuse("too-many-pending", why));
    }
    let message = Message { id: frame.id, kind, from: endpoint.address().clone(), to: to.clone(), body, identity: None, assertion: None };
    let sending = endpoint.clone();
    let sent = tokio::task::spawn_blocking(move || if request { sending.request(message, None) } else { sending.send(message) }).await;
    match sent {
        Ok(Ok(())) => {
            match kind {
                MessageType::Subscribe => subscriptions.insert(to),
                MessageType::Unsubscribe => subscriptions.remove(&to),
                _ => false,
            };
            Ok(())
        }
        Ok(Err(e)) => Err(refuse(send_error_kind(&e), e.to_string())),
        Err(e) => Err(refuse("malformed", format!("the bus call failed: {e}"))),
    }
}

/// A bus message as the frame the client gets.
fn to_frame(m: &Message) -> Value {
    let value = m.body.value.as_deref().map(|v| serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_owned())));
    let mut frame = json!({
        "id": m.id,
        "type": m.kind.as_str(),
        "from": m.from.as_str(),
        "to": m.to.as_str(),
        "body": {
            "code": m.body.code,
            "resource": m.body.resource,
            "value": value,
            "description": m.body.description,
        },
    });
    if let Some(identity) = &m.identity {
        frame["identity"] = json!({ "user": identity.user, "idp": identity.idp });
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(origin: Option<&str>, uri: &str) -> Request {
        let mut r = Request::builder().uri(uri);
        if let Some(origin) = origin {
            r = r.header("Origin", origin);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn handshake_checks_origin_and_refuses_query_strings() {
        let origins = vec!["http://127.0.0.1:8080".to_owned()];
        assert_eq!(check_handshake(&origins, &request(Some("http://127.0.0.1:8080"), "/")), Ok(origins[0].clone()));
        let (status, why) = check_handshake(&origins, &request(Some("http://evil.example"), "/")).unwrap_err();
        assert_eq!((status, why.as_str()), (StatusCode::FORBIDDEN, "origin http://evil.example is not allowed"));
        assert_eq!(check_handshake(&origins, &request(None, "/")).unwrap_err().0, StatusCode::FORBIDDEN);
        let (status, why) = check_handshake(&origins, &request(Some("http://127.0.0.1:8080"), "/?token=x")).unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(why.contains("no query string"), "{why}");
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        let long = "é".repeat(100);
        let frame = close_frame(CloseCode::Policy, &long);
        assert!(frame.reason.len() <= 123 && frame.reason.len() >= 122, "{}", frame.reason.len());
    }
}
