//! A protostub for a domain whose messaging node is NATS: it speaks the NATS
//! client protocol itself, over a WASI TCP socket to the endpoints the host
//! grants it.
//!
//! Configuration (the bundle's `config` table of the stub, as JSON):
//!
//! ```toml
//! config = { servers = ["127.0.0.1:4222", "127.0.0.1:4223"],  # tried in turn
//!            user = "…", pass = "…",        # or token = "…" (optional)
//!            ack-timeout-ms = 2000,          # resend when the far end is silent
//!            window = 1024,                  # messages in flight at most
//!            ping-interval-ms = 120000,      # client PINGs on a live connection
//!            max-pings-outstanding = 2,      # unanswered PINGs before it is stale
//!            retention-hours = 168,          # durable: how long JetStream keeps a message
//!            fault-injection = { trap-after-messages = 50 } }  # chaos testing only
//! ```
//!
//! With `durable = true` on the bundle entry the host adds `durable = "<id>"`
//! (this runtime's stable id for the domain) and the stub carries messages
//! through NATS JetStream instead: see [`jetstream`].
//!
//! `fault-injection` is for operators testing their deployment (and for
//! our tests): with `trap-after-messages` the instance traps once that many
//! of its messages were acknowledged, with whatever else it carries in
//! flight, as a crashing stub would; the host restarts it and nothing
//! queued is lost. With `drop-acks-after` (durable delivery) every PubAck
//! after that many is ignored, as if lost on the way: what was published
//! stays in the host's queue, published again at each ack timeout (and
//! found a duplicate by JetStream).
//!
//! Addressing: a message to an address is published on the subject
//! `rethink.<domain>.<first 32 hex digits of sha256(address)>.<sender's domain>`
//! (domains with `.` as `_`: subjects cannot hold every character an
//! address may). The runtime listening for an address subscribes to
//! `rethink.<domain>.<hash>.*` and hands the host the sender's domain from
//! the subject with each envelope (`post-from`), which refuses an envelope
//! whose `from` is of another domain. So the node's own security decides
//! who may speak for a domain: with nats-server users whose publish
//! permissions allow `rethink.*.*.<their domains>` (and `_INBOX.>` for
//! acknowledgements), and subscribe permissions `rethink.<their
//! domains>.>` and `_INBOX.>`, only a domain's runtimes publish as it or
//! read its traffic. The credentials come from the bundle entry's config
//! (`user`/`pass` or `token`, sent in CONNECT).
//!
//! Delivery: every envelope is published with a reply subject in this
//! stub's inbox, `<inbox>.<seq>-<tag>`, where the inbox and the tag are 128
//! random bits each (`wasi:random`), the tag new at every publish; the
//! receiving stub acknowledges once its host took the envelope — the oks
//! of one round in bulk, on `<inbox>.ok` with `ok <token> <token> …` (each
//! the last token of a reply subject it saw); `busy: …` (back-pressure) and
//! `refused: …` on the message's own reply subject. An answer counts only
//! with the tag of the message's latest publish: a node user who may
//! publish on `_INBOX.>` and knows (or reads) the inbox cannot acknowledge
//! a message it never received, since only the node and the subscribers of
//! its destination subject saw that tag. Only then does the message leave
//! the host's queue (`delivered`). A node
//! without a subscriber answers 503 (no responders: the connection asks
//! for them), and the message is offered again after a pause; so is one
//! whose answer does not come within the ack timeout. Duplicates this may
//! cause are dropped by the receiving host (envelopes carry sequence
//! numbers). On a lost connection the stub reports `disconnected`,
//! reconnects with backoff (50 ms doubling to 2 s, servers in turn; reset
//! only by a connection that stayed up [`STABLE_AFTER`]) and asks the host
//! to `resume`: listen again, offer again what was in flight.
//!
//! Limits the node sets and the stub keeps (as the NATS clients do):
//! - `max_payload` from the server's `INFO` (at every connection, and again
//!   when the server sends a new `INFO`; taken up to [`MAX_PAYLOAD_CAP`]):
//!   an envelope larger than it (in
//!   bytes on the wire, as published) is never sent, since the server
//!   would close the connection for it; the stub `refuse`s it
//!   (`too-large`, naming the limit) and the host answers its sender. Oks
//!   in bulk are split, and answers cut, to fit it too. A
//!   `MSG` from the node larger than that limit, one whose payload is not
//!   ended by CRLF where its line says, or a protocol line longer than
//!   [`MAX_LINE`], is a protocol error: the connection is dropped. At most
//!   [`READ_ROUND_MAX`] is read a round, and at most [`WRITE_ROUND_MAX`]
//!   of messages (one at least) taken to write.
//! - Permissions: a node with per-subject permissions answers a publish it
//!   refuses with `-ERR 'Permissions Violation for Publish to "<subject>"'`
//!   and keeps the connection. Every message in flight on that subject is
//!   `refuse`d at once (`forbidden`, naming the node's refusal), and the
//!   host answers its sender 403; the queue moves on.
//! - Liveness: a PING every `ping-interval-ms` (default 2 minutes, as the
//!   Go and Rust clients); when `max-pings-outstanding` (default 2) went
//!   unanswered and another is due, the connection is stale: reported
//!   `disconnected`, and the stub reconnects to the next server. A node that
//!   stops reading is found the same way: a write that cannot complete
//!   within [`WRITE_TIMEOUT`], or a poll's writes not taken within
//!   [`WRITES_WITHIN`] of its start, drops the connection.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;

use serde::Deserialize;
use sha2::{Digest, Sha256};

mod jetstream;

wit_bindgen::generate!({
    path: "../../wit",
    world: "protostub",
    generate_all,
});

use exports::rethink::hyperty::stub::Guest;
use rethink::hyperty::log::{Level, log};
use rethink::hyperty::stub_host::{self as host, Refusal, StubStatus, Work};
use wasi::clocks::monotonic_clock;
use wasi::io::poll;
use wasi::io::streams::{InputStream, OutputStream, StreamError};
use wasi::random::random;
use wasi::sockets::network::{IpAddressFamily, IpSocketAddress, Ipv4SocketAddress, Ipv6SocketAddress};
use wasi::sockets::{instance_network, tcp, tcp_create_socket};

const MS: u64 = 1_000_000;
/// Pause before offering again a message nobody listened for.
const RETRY_PAUSE: u64 = 100 * MS;
const BACKOFF_MIN: u64 = 50 * MS;
const BACKOFF_MAX: u64 = 2_000 * MS;
/// A connection lost after being up this long is reconnected to after
/// [`BACKOFF_MIN`]; one lost sooner counts as a failure (the backoff
/// doubles), so a node that hangs up after every handshake is not
/// reconnected to at the minimum pause for ever.
const STABLE_AFTER: u64 = 10_000 * MS;
/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: u64 = 2_000 * MS;
/// The subscription id of this stub's inbox (acks, no-responder notices).
const INBOX_SID: u64 = 1;
/// The longest protocol line taken from a node (an `INFO` with a cluster's
/// `connect_urls` is the longest there is; the server's own limit for
/// client lines, `max_control_line`, is 4 KiB).
const MAX_LINE: usize = 64 * 1024;
/// The smallest and largest read the stub asks of its socket (bytes).
/// `READ_MAX` is wasmtime-wasi's own largest read (`MAX_READ_SIZE_ALLOC`):
/// above it no read would fill, and the sizes would stop doubling.
const READ_MIN: usize = 4 * 1024;
const READ_MAX: usize = 64 * 1024;
/// The most a stub reads of its socket in one round (bytes).
const READ_ROUND_MAX: usize = 1024 * 1024;
/// The most a round takes from the host to write (bytes; at least one
/// message is taken, whatever its size): a backlog of large messages
/// (after a node's outage, say) is written a round at a time, instead of
/// all of it buffered at once past the stub's memory.
const WRITE_ROUND_MAX: usize = 1024 * 1024;
/// `max_payload` when the server's `INFO` does not say (NATS's default).
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// The largest `max_payload` taken from a node: a node announcing more
/// could otherwise make the stub hold a message as large as it likes. A
/// message is held two or three times over while it is read (the read
/// buffer, its payload, the text given to the host), so this sits well
/// under a stub's 64 MiB of memory; it is 8 times NATS's default, and
/// above what the host's default `max_message_bytes` (1 MiB) makes.
const MAX_PAYLOAD_CAP: usize = 8 * 1024 * 1024;
/// How long a write may wait for the node to take bytes.
const WRITE_TIMEOUT: u64 = 5_000 * MS;
/// A poll's writes end this long after the poll began, however the node
/// takes them (a node taking a trickle at a time restarts
/// [`WRITE_TIMEOUT`] at every bit): within the host's 10 s deadline of a
/// poll, with its 4 s budget for posts and a 2 s handshake beside it.
const WRITES_WITHIN: u64 = 8_000 * MS;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Config {
    servers: Vec<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    pass: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default = "default_ack_timeout")]
    ack_timeout_ms: u64,
    #[serde(default = "default_window")]
    window: usize,
    #[serde(default = "default_ping_interval")]
    ping_interval_ms: u64,
    #[serde(default = "default_max_pings_outstanding")]
    max_pings_outstanding: u32,
    #[serde(default)]
    fault_injection: Option<FaultInjection>,
    /// Set by the host for a `durable` entry: this runtime's stable id for
    /// the domain (names its JetStream consumers).
    #[serde(default)]
    durable: Option<String>,
    /// Durable delivery: how long the domain's stream keeps a message, and
    /// a consumer nobody pulls from lives on the server.
    #[serde(default = "default_retention_hours")]
    retention_hours: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FaultInjection {
    #[serde(default)]
    trap_after_messages: Option<u64>,
    /// Durable delivery: PubAcks after this many are ignored, as if lost
    /// on the way (what was published stays in the host's queue).
    #[serde(default)]
    drop_acks_after: Option<u64>,
}

fn default_ack_timeout() -> u64 {
    2000
}

fn default_retention_hours() -> u64 {
    7 * 24
}

fn default_window() -> usize {
    1024
}

fn default_ping_interval() -> u64 {
    120_000
}

fn default_max_pings_outstanding() -> u32 {
    2
}

/// One connection to a node. Field order matters: the streams are
/// children of the socket and must be dropped first.
struct Conn {
    /// Ready when the node sent something (made once per connection).
    readable: poll::Pollable,
    input: InputStream,
    output: OutputStream,
    _socket: tcp::TcpSocket,
    rbuf: Vec<u8>,
    /// Bytes the next round's first read asks for (see `read_available`).
    read_size: usize,
    wbuf: Vec<u8>,
    /// The node's `ip:port`.
    addr: SocketAddr,
    /// The largest payload the node takes (its `INFO`'s `max_payload`).
    max_payload: usize,
    /// When the next client PING is due (monotonic ns).
    next_ping: u64,
    /// PINGs sent and not answered yet.
    pings_outstanding: u32,
}

/// A durable consumer of a listened address (JetStream).
struct Consumer {
    name: String,
    /// The address's subject prefix, `rethink.<domain>.<hash>`.
    prefix: String,
    /// The server confirmed it (this connection).
    created: bool,
    /// Its creation is asked and not answered yet (monotonic ns: until when).
    creating: u64,
    /// Messages the open pull may still bring.
    remaining: u32,
    /// When the open pull ends for sure (monotonic ns).
    until: u64,
}

/// JetStream state (durable delivery).
struct Js {
    /// This runtime's id for the domain (from the host).
    id: String,
    stream: String,
    /// The stream exists (confirmed on this connection).
    ready: bool,
    /// When to ask for the stream (again).
    next_stream_try: u64,
    /// Consumers by the listen id (`subs`).
    consumers: HashMap<u64, Consumer>,
}

/// The reply subject of a message sent: `<inbox>.<seq>-<tag>`.
struct ReplyTo<'a> {
    inbox: &'a str,
    seq: u64,
    tag: &'a Tag,
}

impl std::fmt::Display for ReplyTo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}-{}", self.inbox, self.seq, tag_text(self.tag))
    }
}

/// A message published and not answered yet.
struct InFlight {
    /// When it was published (monotonic ns).
    sent: u64,
    /// The subject it was published on.
    subject: String,
    /// The random tag of its reply subject (`<inbox>.<seq>-<tag>`): only an
    /// answer with it counts.
    tag: Tag,
}

struct Stub {
    domain: String,
    config: Config,
    servers: Vec<SocketAddr>,
    next_server: usize,
    conn: Option<Conn>,
    /// This connection's inbox prefix (unique per instance and connection).
    inbox: String,
    incarnation: u64,
    next_sid: u64,
    /// Listened address → subscription id.
    subs: HashMap<String, u64>,
    /// Sequence numbers in flight → when and where they were sent.
    in_flight: HashMap<u64, InFlight>,
    /// The same, oldest first (entries no longer in flight are skipped).
    sent_order: VecDeque<(u64, u64)>,
    /// Messages to offer again, by when.
    deferred: BTreeMap<(u64, u64), ()>,
    next_connect: u64,
    backoff: u64,
    /// When the connection in hand was made (monotonic ns).
    connected_at: u64,
    /// When the poll in hand began (monotonic ns).
    poll_started: u64,
    status: Option<StubStatus>,
    /// Messages this instance carried (acknowledged by the far end).
    carried: u64,
    /// Oks not yet sent, by the sender's inbox: the last tokens of their
    /// reply subjects, separated by spaces.
    acks: BTreeMap<String, String>,
    /// The last sender's subject token and its domain (dots for `_`).
    last_sender: (String, std::rc::Rc<str>),
    /// Durable delivery through JetStream, when the host asks for it.
    js: Option<Js>,
    /// Subject prefixes of the addresses sent to lately.
    subjects: HashMap<String, String>,
}

thread_local! {
    static STUB: std::cell::RefCell<Option<Stub>> = const { std::cell::RefCell::new(None) };
}

fn now() -> u64 {
    monotonic_clock::now()
}

/// 128 random bits (`wasi:random`, cryptographically secure), in hex.
fn random_hex() -> String {
    tag_text(&random_tag()).to_owned()
}

/// A reply tag: 128 random bits (`wasi:random`, cryptographically
/// secure) as 32 hex digits, held inline (one a message sent).
type Tag = [u8; 32];

fn tag_text(tag: &Tag) -> &str {
    std::str::from_utf8(tag).expect("hex digits are ASCII")
}

fn random_tag() -> Tag {
    thread_local! {
        /// Random bytes from the host, fetched 1 KiB at a time: a reply tag
        /// each publish would otherwise cost a host call each.
        static POOL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    POOL.with_borrow_mut(|pool| {
        if pool.len() < 16 {
            *pool = random::get_random_bytes(1024);
        }
        let at = pool.len() - 16;
        let mut tag = [0; 32];
        hex::encode_to_slice(&pool[at..], &mut tag).expect("16 bytes are 32 hex digits");
        pool.truncate(at);
        tag
    })
}

/// The NATS server's refusal of a publish: the subject of
/// `'Permissions Violation for Publish to "<subject>"'` (the `-ERR` text).
fn publish_violation(err: &str) -> Option<&str> {
    let rest = err.split_once("Permissions Violation for Publish to ")?.1;
    rest.trim_start_matches(['"', '\'']).split(['"', '\'']).next().filter(|s| !s.is_empty())
}

/// The subject prefix of `address` of `domain`: `rethink.<domain>.<hash>`;
/// messages to it go to `<prefix>.<sender's domain>`.
fn subject(domain: &str, address: &str) -> String {
    let digest = Sha256::digest(address.as_bytes());
    format!("rethink.{}.{}", domain.replace('.', "_"), hex::encode(&digest[..16]))
}

/// Subject prefixes a stub keeps ([`cached_subject`]): the addresses it
/// sends to lately.
const SUBJECT_CACHE: usize = 4096;

/// The subject a message from the domain `sender` ([`Head::sender`]) to
/// `address` of `domain` is published on: `<prefix>.<sender>` (its dots
/// as `_`), the prefix ([`subject`]) kept in `cache` (cleared when it
/// holds [`SUBJECT_CACHE`]): the SHA-256 was the largest cost of a send
/// (`perf` on the nats bench).
fn subject_to(cache: &mut HashMap<String, String>, domain: &str, address: &str, sender: &str) -> String {
    let mut out = String::with_capacity(96);
    match cache.get(address) {
        Some(prefix) => out.push_str(prefix),
        None => {
            let prefix = subject(domain, address);
            out.push_str(&prefix);
            if cache.len() >= SUBJECT_CACHE {
                cache.clear();
            }
            cache.insert(address.to_owned(), prefix);
        }
    }
    for (i, label) in sender.split('.').enumerate() {
        out.push(if i == 0 { '.' } else { '_' });
        out.push_str(label);
    }
    out
}

/// `bytes` as text: borrowed when they are UTF-8, as they almost always
/// are (`str::from_utf8` checks a word at a time; `from_utf8_lossy`'s
/// chunking goes byte by byte), else with U+FFFD for what is not.
fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// The provider domain of an address as the host reads it: the authority,
/// without the service label for `domain://<service>.<domain>`.
fn domain_of(address: &str) -> Option<&str> {
    let (scheme, rest) = address.split_once("://")?;
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    Some(if scheme == "domain" { authority.split_once('.').map_or(authority, |(_, d)| d) } else { authority })
}

/// What the stub reads of an envelope it sends: who sent it (`from`) and
/// its queue's `origin` and `seq` (JetStream's `Nats-Msg-Id` is
/// `<origin>.<seq>`).
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    from: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    origin: std::borrow::Cow<'a, str>,
    seq: u64,
}

impl Head<'_> {
    /// The sender's domain, if it can be a subject token (written with
    /// dots as `_`, [`subject_to`]).
    fn sender(&self) -> Option<&str> {
        domain_of(&self.from).filter(|d| !d.is_empty() && !d.contains(['*', '>', ' ']))
    }

    /// JetStream's `Nats-Msg-Id`, if it is one NATS takes in a header.
    fn msg_id(&self) -> Option<String> {
        let id = format!("{}.{}", self.origin, self.seq);
        (!id.contains(|c: char| c.is_ascii_whitespace() || c.is_ascii_control())).then_some(id)
    }
}

/// The head of an envelope: read by position as the host writes it
/// ([`head_as_written`]), else with serde.
fn envelope_head(envelope: &str) -> Option<Head<'_>> {
    head_as_written(envelope).or_else(|| serde_json::from_str(envelope).ok())
}

/// The head of an envelope as the host writes it (`protostub::envelope::write`
/// in the host, whose test `the_head_comes_first_as_the_stub_reads_it`
/// keeps this form): `{"v":1,"origin":"…","seq":n,"id":n,"type":"…","from":"…"`
/// first, without escapes in those strings. Anything else is `None`, and
/// read with serde: this only spares a JSON parse of the whole envelope
/// on every message sent.
fn head_as_written(envelope: &str) -> Option<Head<'_>> {
    fn number(text: &str) -> Option<(u64, &str)> {
        let end = text.find(|c: char| !c.is_ascii_digit())?;
        Some((text[..end].parse().ok()?, &text[end..]))
    }
    let rest = envelope.strip_prefix(r#"{"v":1,"origin":""#)?;
    let (origin, rest) = rest.split_once('"')?;
    let (seq, rest) = number(rest.strip_prefix(r#","seq":"#)?)?;
    let (_, rest) = number(rest.strip_prefix(r#","id":"#)?)?;
    let (_, rest) = rest.strip_prefix(r#","type":""#)?.split_once('"')?;
    let (from, _) = rest.strip_prefix(r#","from":""#)?.split_once('"')?;
    if origin.contains('\\') || from.contains('\\') {
        return None;
    }
    Some(Head { from: from.into(), origin: origin.into(), seq })
}

fn ip_socket_address(addr: SocketAddr) -> (IpAddressFamily, IpSocketAddress) {
    match addr {
        SocketAddr::V4(a) => {
            let [a0, a1, a2, a3] = a.ip().octets();
            (IpAddressFamily::Ipv4, IpSocketAddress::Ipv4(Ipv4SocketAddress { port: a.port(), address: (a0, a1, a2, a3) }))
        }
        SocketAddr::V6(a) => {
            let s = a.ip().segments();
            let address = (s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
            (IpAddressFamily::Ipv6, IpSocketAddress::Ipv6(Ipv6SocketAddress { port: a.port(), flow_info: 0, address, scope_id: 0 }))
        }
    }
}

/// Waits until `pollable` is ready or `deadline` (monotonic ns) passes;
/// true if it is ready.
fn wait_until(pollable: &poll::Pollable, deadline: u64) -> bool {
    let timer = monotonic_clock::subscribe_instant(deadline);
    let ready = poll::poll(&[pollable, &timer]);
    ready.contains(&0)
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Conn, String> {
        let (family, remote) = ip_socket_address(addr);
        let network = instance_network::instance_network();
        let socket = tcp_create_socket::create_tcp_socket(family).map_err(|e| format!("socket: {e:?}"))?;
        socket.start_connect(&network, remote).map_err(|e| format!("connect to {addr}: {e:?}"))?;
        let deadline = now() + CONNECT_TIMEOUT;
        let (input, output) = loop {
            let pollable = socket.subscribe();
            let ready = wait_until(&pollable, deadline);
            drop(pollable);
            match socket.finish_connect() {
                Ok(streams) => break streams,
                Err(tcp::ErrorCode::WouldBlock) if ready || now() < deadline => continue,
                Err(tcp::ErrorCode::WouldBlock) => return Err(format!("connect to {addr}: timed out")),
                Err(e) => return Err(format!("connect to {addr}: {e:?}")),
            }
        };
        Ok(Conn {
            readable: input.subscribe(),
            input,
            output,
            _socket: socket,
            rbuf: Vec::new(),
            read_size: READ_MIN,
            wbuf: Vec::new(),
            addr,
            max_payload: DEFAULT_MAX_PAYLOAD,
            next_ping: u64::MAX,
            pings_outstanding: 0,
        })
    }

    /// Reads what is available, at most [`READ_ROUND_MAX`] bytes a round
    /// (a node sending without pause would otherwise keep the stub reading,
    /// its buffer growing, until its call deadline; the rest is read next
    /// round); an error when the connection is gone.
    ///
    /// The host zero-fills a buffer of the size asked for at every read,
    /// the last, empty one too (wasmtime-wasi's `TcpReader::read`): asking
    /// 64 KiB each time cost two 64 KiB fills a round however little came.
    /// So a read asks twice what the last one got when that filled it, and
    /// [`READ_MIN`] after one that did not (the socket was drained, the next
    /// read is likely the empty one); a round starts at the size the last
    /// round's largest read needed.
    fn read_available(&mut self) -> Result<(), String> {
        let mut size = self.read_size;
        let (mut largest, mut taken) = (0usize, 0usize);
        while taken < READ_ROUND_MAX {
            match self.input.read(size as u64) {
                Ok(bytes) if bytes.is_empty() => {
                    self.read_size = largest.next_power_of_two().clamp(READ_MIN, READ_MAX);
                    return Ok(());
                }
                Ok(bytes) => {
                    largest = largest.max(bytes.len());
                    taken += bytes.len();
                    size = if bytes.len() == size { (size * 2).min(READ_MAX) } else { READ_MIN };
                    self.rbuf.extend_from_slice(&bytes);
                }
                Err(StreamError::Closed) => return Err("the node closed the connection".into()),
                Err(StreamError::LastOperationFailed(e)) => return Err(format!("read: {}", e.to_debug_string())),
            }
        }
        self.read_size = READ_MAX;
        Ok(())
    }

    /// Writes everything buffered in as few writes as the stream permits
    /// (one, usually): WASI gives no TCP_NODELAY, so many small writes in a
    /// row would wait on Nagle's algorithm and the peer's delayed ACKs. A
    /// node that takes nothing for [`WRITE_TIMEOUT`] is an error.
    fn flush(&mut self, until: u64) -> Result<(), String> {
        let failed = |e: StreamError| match e {
            StreamError::Closed => "the node closed the connection".to_owned(),
            StreamError::LastOperationFailed(e) => format!("write: {}", e.to_debug_string()),
        };
        let mut written = 0;
        let mut deadline = (now() + WRITE_TIMEOUT).min(until);
        while written < self.wbuf.len() {
            let permitted = self.output.check_write().map_err(failed)? as usize;
            if permitted == 0 {
                if !wait_until(&self.output.subscribe(), deadline) {
                    if now() >= until {
                        return Err(format!(
                            "{} took {written} of {} bytes within a poll ({} s): too slowly",
                            self.addr,
                            self.wbuf.len(),
                            WRITES_WITHIN / 1_000_000_000
                        ));
                    }
                    return Err(format!("{} took nothing of what was sent for {} s", self.addr, WRITE_TIMEOUT / 1_000_000_000));
                }
                continue;
            }
            deadline = (now() + WRITE_TIMEOUT).min(until);
            let end = self.wbuf.len().min(written + permitted);
            self.output.write(&self.wbuf[written..end]).map_err(failed)?;
            written = end;
        }
        if written > 0 {
            // Not waited for: a failure shows at the next write or read.
            self.output.flush().map_err(failed)?;
        }
        self.wbuf.clear();
        Ok(())
    }

    /// Buffers a `PUB` of `payload` on `subject` (with a reply subject).
    fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &[u8]) {
        let line = match reply {
            Some(reply) => format!("PUB {subject} {reply} {}\r\n", payload.len()),
            None => format!("PUB {subject} {}\r\n", payload.len()),
        };
        self.wbuf.extend_from_slice(line.as_bytes());
        self.wbuf.extend_from_slice(payload);
        self.wbuf.extend_from_slice(b"\r\n");
    }

    /// Buffers a `PUB` of `payload` on `subject` with the reply subject
    /// `reply`, written in place (one a message sent: no `format!`).
    fn publish_to(&mut self, subject: &str, reply: &ReplyTo<'_>, payload: &[u8]) {
        let mut number = itoa::Buffer::new();
        let w = &mut self.wbuf;
        w.extend_from_slice(b"PUB ");
        w.extend_from_slice(subject.as_bytes());
        w.push(b' ');
        w.extend_from_slice(reply.inbox.as_bytes());
        w.push(b'.');
        w.extend_from_slice(number.format(reply.seq).as_bytes());
        w.push(b'-');
        w.extend_from_slice(reply.tag);
        w.push(b' ');
        w.extend_from_slice(number.format(payload.len()).as_bytes());
        w.extend_from_slice(b"\r\n");
        w.extend_from_slice(payload);
        w.extend_from_slice(b"\r\n");
    }

    /// Buffers an `HPUB` of `payload` on `subject` with the header block
    /// `headers` (a reply subject is required: JetStream answers there).
    fn publish_with_headers(&mut self, subject: &str, reply: &str, headers: &str, payload: &[u8]) {
        let total = headers.len() + payload.len();
        self.wbuf.extend_from_slice(format!("HPUB {subject} {reply} {} {total}\r\n", headers.len()).as_bytes());
        self.wbuf.extend_from_slice(headers.as_bytes());
        self.wbuf.extend_from_slice(payload);
        self.wbuf.extend_from_slice(b"\r\n");
    }

    /// Waits (until `deadline`) for a whole line and takes it.
    fn read_line(&mut self, deadline: u64) -> Result<String, String> {
        loop {
            if let Some(end) = line_end(&self.rbuf)? {
                let line = text(&self.rbuf[..end]).into_owned();
                self.rbuf.drain(..end + 2);
                return Ok(line);
            }
            if !wait_until(&self.readable, deadline) {
                return Err("the node did not answer in time".into());
            }
            self.read_available()?;
        }
    }
}

/// Where the first protocol line in `buf` ends (its CRLF), if it is whole;
/// an error when it is longer than [`MAX_LINE`].
fn line_end(buf: &[u8]) -> Result<Option<usize>, String> {
    // A CR is found a word at a time (`memchr`); one not followed by LF
    // (not in NATS's protocol lines, but not excluded) is stepped over.
    let mut from = 0;
    let found = loop {
        match memchr::memchr(b'\r', &buf[from..buf.len().min(MAX_LINE + 2)]) {
            Some(at) if buf.get(from + at + 1) == Some(&b'\n') => break Some(from + at),
            Some(at) => from += at + 1,
            None => break None,
        }
    };
    match found {
        Some(end) if end <= MAX_LINE => Ok(Some(end)),
        None if buf.len() <= MAX_LINE + 1 => Ok(None),
        _ => Err(format!("the node sent a protocol line longer than {MAX_LINE} bytes")),
    }
}

/// The `max_payload` an `INFO` line (or its JSON) announces.
fn max_payload(info: &str) -> Result<usize, String> {
    let json = info.strip_prefix("INFO").unwrap_or(info).trim();
    let info: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("malformed INFO: {e}"))?;
    match info.get("max_payload") {
        None => Ok(DEFAULT_MAX_PAYLOAD),
        Some(n) => n
            .as_u64()
            .filter(|n| *n > 0)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX).min(MAX_PAYLOAD_CAP))
            .ok_or_else(|| format!("malformed INFO: max_payload is {n}, not a positive number")),
    }
}

/// One protocol operation from the node; a message's parts are borrowed
/// from the read buffer (owned only for a line that is not UTF-8).
enum Op<'a> {
    Msg { subject: Cow<'a, str>, reply: Option<Cow<'a, str>>, headers: Option<Cow<'a, str>>, payload: Cow<'a, [u8]> },
    Ping,
    Pong,
    /// A new `INFO` (its JSON), as a server sends when its cluster changes.
    Info(String),
    Err(String),
    Other,
}

/// Reads one whole operation from the front of `buf`, if there is one,
/// and how many bytes it took; a message larger than `max_payload` is a
/// protocol error. The caller drains what was read once a round, not per
/// operation (each drain moves the rest of the buffer).
fn parse(buf: &[u8], max_payload: usize) -> Result<Option<(Op<'_>, usize)>, String> {
    let Some(end) = line_end(buf)? else { return Ok(None) };
    match std::str::from_utf8(&buf[..end]) {
        Ok(line) => parse_line(line, buf, end, max_payload),
        // Not a line a NATS server writes, but a subject may hold such
        // bytes: read as text (U+FFFD for what is not UTF-8), as the rest,
        // and owned.
        Err(_) => {
            let line = String::from_utf8_lossy(&buf[..end]).into_owned();
            let detached = |op: Op<'_>| match op {
                Op::Msg { subject, reply, headers, payload } => Op::Msg {
                    subject: Cow::Owned(subject.into_owned()),
                    reply: reply.map(|r| Cow::Owned(r.into_owned())),
                    headers: headers.map(|h| Cow::Owned(h.into_owned())),
                    payload: Cow::Owned(payload.into_owned()),
                },
                Op::Ping => Op::Ping,
                Op::Pong => Op::Pong,
                Op::Info(info) => Op::Info(info),
                Op::Err(e) => Op::Err(e),
                Op::Other => Op::Other,
            };
            Ok(parse_line(&line, buf, end, max_payload)?.map(|(op, n)| (detached(op), n)))
        }
    }
}

/// [`parse`] of the operation whose line is `line` (`buf[..end]`).
fn parse_line<'a>(line: &'a str, buf: &'a [u8], end: usize, max_payload: usize) -> Result<Option<(Op<'a>, usize)>, String> {
    let mut words = line.split_ascii_whitespace();
    let verb = words.next().unwrap_or_default();
    let verb_is = |name: &str| verb.eq_ignore_ascii_case(name);
    if !(verb_is("MSG") || verb_is("HMSG")) {
        let op = if verb_is("PING") {
            Op::Ping
        } else if verb_is("PONG") {
            Op::Pong
        } else if verb_is("INFO") {
            Op::Info(line.to_owned())
        } else if verb_is("-ERR") {
            Op::Err(line.to_owned())
        } else {
            Op::Other
        };
        return Ok(Some((op, end + 2)));
    }
    let mut args = [""; 5];
    let mut count = 0;
    for word in words {
        if count == args.len() {
            return Err(format!("malformed {line:?}"));
        }
        args[count] = word;
        count += 1;
    }
    let (subject, header_len, total_len, reply) = match (verb_is("HMSG"), count) {
        (false, 3) => (args[0], None, args[2], None),
        (false, 4) => (args[0], None, args[3], Some(args[2])),
        (true, 4) => (args[0], Some(args[2]), args[3], None),
        (true, 5) => (args[0], Some(args[3]), args[4], Some(args[2])),
        _ => return Err(format!("malformed {line:?}")),
    };
    let total: usize = total_len.parse().map_err(|_| format!("bad size in {line:?}"))?;
    let header: usize = header_len.map(str::parse).transpose().map_err(|_| format!("bad header size in {line:?}"))?.unwrap_or(0);
    if header > total {
        return Err(format!("header size above the total size in {line:?}"));
    }
    if total > max_payload {
        return Err(format!("the node sent a message of {total} bytes, above its own max_payload ({max_payload})"));
    }
    let start = end + 2;
    if buf.len() < start + total + 2 {
        return Ok(None);
    }
    if &buf[start + total..start + total + 2] != b"\r\n" {
        return Err(format!("the node sent a message not ended by CRLF after the {total} bytes its line declares ({line:?})"));
    }
    let headers = (header > 0).then(|| text(&buf[start..start + header]));
    let payload = &buf[start + header..start + total];
    let op = Op::Msg { subject: Cow::Borrowed(subject), reply: reply.map(Cow::Borrowed), headers, payload: Cow::Borrowed(payload) };
    Ok(Some((op, start + total + 2)))
}

impl Stub {
    fn new(domain: String, config: &str) -> Result<Stub, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| format!("bad config: {e}"))?;
        let servers = config
            .servers
            .iter()
            .map(|s| s.parse::<SocketAddr>().map_err(|e| format!("server {s:?} is not <ip>:<port>: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err("no servers".into());
        }
        if config.window == 0 {
            return Err("window must be at least 1".into());
        }
        if config.ping_interval_ms == 0 {
            return Err("ping-interval-ms must be at least 1".into());
        }
        if config.retention_hours == 0 {
            return Err("retention-hours must be at least 1".into());
        }
        let js = match &config.durable {
            Some(id) if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) => {
                return Err(format!("durable {id:?} is not an id of letters and digits"));
            }
            Some(id) => Some(Js { id: id.clone(), stream: jetstream::stream(&domain), ready: false, next_stream_try: 0, consumers: HashMap::new() }),
            None => None,
        };
        Ok(Stub {
            domain,
            config,
            servers,
            next_server: 0,
            conn: None,
            inbox: String::new(),
            incarnation: now(),
            next_sid: INBOX_SID + 1,
            subs: HashMap::new(),
            in_flight: HashMap::new(),
            sent_order: VecDeque::new(),
            deferred: BTreeMap::new(),
            next_connect: 0,
            backoff: BACKOFF_MIN,
            connected_at: 0,
            poll_started: 0,
            status: None,
            carried: 0,
            acks: BTreeMap::new(),
            last_sender: (String::new(), "".into()),
            js,
            subjects: HashMap::new(),
        })
    }

    fn report(&mut self, status: StubStatus, detail: &str) {
        if self.status != Some(status) {
            self.status = Some(status);
            host::report_status(status, detail);
        }
    }

    fn connect(&mut self) {
        let addr = self.servers[self.next_server % self.servers.len()];
        self.next_server += 1;
        self.report(StubStatus::InProgress, &format!("connecting to {addr}"));
        match self.handshake(addr) {
            Ok(conn) => {
                self.conn = Some(conn);
                self.connected_at = now();
                match &self.js {
                    // Live once the stream is confirmed.
                    Some(js) => self.report(StubStatus::InProgress, &format!("connected to {addr}, asking for the JetStream stream {}", js.stream)),
                    None => self.report(StubStatus::Live, &format!("connected to {addr}")),
                }
                // Listen again for every local address; offer again what was
                // in flight on the last connection.
                host::resume();
            }
            Err(e) => {
                log(Level::Warn, &format!("{}: {e}", self.domain));
                self.next_connect = now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.report(StubStatus::Disconnected, &e);
            }
        }
    }

    fn handshake(&mut self, addr: SocketAddr) -> Result<Conn, String> {
        let mut conn = Conn::open(addr)?;
        let deadline = now() + CONNECT_TIMEOUT;
        let info = conn.read_line(deadline)?;
        if !info.starts_with("INFO ") {
            return Err(format!("{addr} is not a NATS server (it said {info:?})"));
        }
        conn.max_payload = max_payload(&info).map_err(|e| format!("{addr}: {e}"))?;
        let mut connect = serde_json::json!({
            "verbose": false, "pedantic": false, "headers": true, "no_responders": true,
            "name": format!("hyperty-protostub {}", self.domain), "lang": "rust-wasm", "version": "0.1.0", "protocol": 1,
        });
        if let Some(user) = &self.config.user {
            connect["user"] = user.clone().into();
            connect["pass"] = self.config.pass.clone().unwrap_or_default().into();
        }
        if let Some(token) = &self.config.token {
            connect["auth_token"] = token.clone().into();
        }
        conn.wbuf.extend_from_slice(format!("CONNECT {connect}\r\nPING\r\n").as_bytes());
        conn.flush(deadline)?;
        loop {
            let line = conn.read_line(deadline)?;
            match line.as_str() {
                "PONG" => break,
                l if l.starts_with("-ERR") => return Err(format!("{addr} refused the connection: {l}")),
                l if l.starts_with("INFO ") => conn.max_payload = max_payload(l).map_err(|e| format!("{addr}: {e}"))?,
                _ => {}
            }
        }
        conn.next_ping = now() + self.config.ping_interval_ms * MS;
        self.incarnation += 1;
        self.inbox = format!("_INBOX.{}", random_hex());
        conn.wbuf.extend_from_slice(format!("SUB {}.* {INBOX_SID}\r\n", self.inbox).as_bytes());
        conn.flush(deadline)?;
        self.subs.clear();
        self.in_flight.clear();
        self.sent_order.clear();
        self.deferred.clear();
        self.reset_js();
        Ok(conn)
    }

    /// A new connection confirms the stream and the consumers again.
    fn reset_js(&mut self) {
        if let Some(js) = &mut self.js {
            js.ready = false;
            js.next_stream_try = 0;
            js.consumers.clear();
        }
    }

    fn disconnect(&mut self, why: &str) {
        self.conn = None;
        self.subs.clear();
        self.in_flight.clear();
        self.sent_order.clear();
        self.deferred.clear();
        self.acks.clear();
        self.reset_js();
        let now = now();
        if now.saturating_sub(self.connected_at) >= STABLE_AFTER {
            self.backoff = BACKOFF_MIN;
        }
        self.next_connect = now + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        log(Level::Warn, &format!("{}: connection lost: {why}", self.domain));
        self.report(StubStatus::Disconnected, why);
    }

    /// One round of I/O on a live connection.
    fn pump(&mut self) -> Result<(), String> {
        let conn = self.conn.as_mut().expect("connected");
        conn.read_available()?;
        // Out of the connection while its operations (borrowed from it)
        // are handled; on an error the connection, and what it read, is
        // dropped.
        let mut rbuf = std::mem::take(&mut self.conn.as_mut().expect("connected").rbuf);
        let mut used = 0;
        loop {
            // (An `INFO` may change it from one operation to the next.)
            let max_payload = self.conn.as_ref().expect("connected").max_payload;
            let Some((op, n)) = parse(&rbuf[used..], max_payload)? else { break };
            used += n;
            self.handle(op)?;
        }
        rbuf.drain(..used);
        self.conn.as_mut().expect("connected").rbuf = rbuf;
        let now = now();
        let conn = self.conn.as_mut().expect("connected");
        if now >= conn.next_ping {
            if conn.pings_outstanding >= self.config.max_pings_outstanding {
                return Err(format!(
                    "{} answered none of the last {} PINGs ({} ms apart): the connection is stale",
                    conn.addr, conn.pings_outstanding, self.config.ping_interval_ms
                ));
            }
            conn.wbuf.extend_from_slice(b"PING\r\n");
            conn.pings_outstanding += 1;
            conn.next_ping = now + self.config.ping_interval_ms * MS;
        }
        // Oks in bulk, in as few messages as the node's max_payload allows.
        for (inbox, tokens) in std::mem::take(&mut self.acks) {
            let subject = format!("{inbox}.ok");
            let mut payload = String::from("ok");
            for seq in tokens.split(' ') {
                if payload.len() > 2 && payload.len() + 1 + seq.len() > conn.max_payload {
                    conn.publish(&subject, None, payload.as_bytes());
                    payload.truncate(2);
                }
                payload.push(' ');
                payload.push_str(seq);
            }
            conn.publish(&subject, None, payload.as_bytes());
        }
        let due: Vec<(u64, u64)> = self.deferred.range(..(now, u64::MAX)).map(|(k, _)| *k).collect();
        for key in due {
            self.deferred.remove(&key);
            host::retry(key.1);
        }
        self.jetstream_round(now);
        let timeout = self.config.ack_timeout_ms * MS;
        while let Some(&(sent, seq)) = self.sent_order.front() {
            if self.in_flight.get(&seq).map(|f| f.sent) != Some(sent) {
                self.sent_order.pop_front();
            } else if now.saturating_sub(sent) > timeout {
                self.sent_order.pop_front();
                self.in_flight.remove(&seq);
                host::retry(seq);
            } else {
                break;
            }
        }
        let mut taken = 0;
        while self.in_flight.len() < self.config.window
            && self.takes_work()
            && (taken == 0 || self.conn.as_ref().is_some_and(|c| c.wbuf.len() < WRITE_ROUND_MAX))
        {
            taken += 1;
            let Some(work) = host::next_work() else { break };
            let conn = self.conn.as_mut().expect("connected");
            match work {
                Work::Send(o) => {
                    let head = envelope_head(&o.envelope);
                    // Only a durable stub sends the id (in a header).
                    let msg_id = match (&head, &self.js) {
                        (Some(head), Some(_)) => head.msg_id(),
                        _ => Some(String::new()),
                    };
                    let (Some(sender), Some(msg_id)) = (head.as_ref().and_then(Head::sender), msg_id) else {
                        // The host makes envelopes; one without a sender is a bug.
                        log(Level::Error, &format!("{}: message {} has no sender's domain or a bad origin; dropped", self.domain, o.seq));
                        host::delivered(o.seq);
                        continue;
                    };
                    let headers = self.js.as_ref().map(|_| jetstream::msg_id_headers(&msg_id)).unwrap_or_default();
                    if headers.len() + o.envelope.len() > conn.max_payload {
                        // The server would close the connection for it.
                        host::refuse(
                            o.seq,
                            &Refusal::TooLarge(format!(
                                "the envelope is {} bytes, more than the {} bytes the NATS node {} takes (its max_payload)",
                                headers.len() + o.envelope.len(),
                                conn.max_payload,
                                conn.addr
                            )),
                        );
                        continue;
                    }
                    let subject = subject_to(&mut self.subjects, &self.domain, &o.to, sender);
                    let tag = random_tag();
                    let reply = ReplyTo { inbox: &self.inbox, seq: o.seq, tag: &tag };
                    if self.js.is_some() {
                        conn.publish_with_headers(&subject, &reply.to_string(), &headers, o.envelope.as_bytes());
                    } else {
                        conn.publish_to(&subject, &reply, o.envelope.as_bytes());
                    }
                    self.in_flight.insert(o.seq, InFlight { sent: now, subject, tag });
                    self.sent_order.push_back((now, o.seq));
                }
                Work::Listen(address) => {
                    if !self.subs.contains_key(&address) {
                        let sid = self.next_sid;
                        self.next_sid += 1;
                        let prefix = subject(&self.domain, &address);
                        match &mut self.js {
                            Some(js) => {
                                let name = jetstream::consumer(&js.id, &prefix);
                                let consumer = Consumer { name, prefix, created: false, creating: 0, remaining: 0, until: 0 };
                                js.consumers.insert(sid, consumer);
                            }
                            None => conn.wbuf.extend_from_slice(format!("SUB {prefix}.* {sid}\r\n").as_bytes()),
                        }
                        self.subs.insert(address, sid);
                    }
                }
                Work::Forget(address) => {
                    if let Some(sid) = self.subs.remove(&address) {
                        match self.js.as_mut() {
                            // Pulled from no more, but kept: a runtime that
                            // stops (or undeploys and deploys again) takes
                            // up where it acknowledged, instead of the
                            // stream's whole retention again; the server
                            // removes a consumer nobody pulled from for
                            // `retention-hours` (`inactive_threshold`).
                            Some(js) => drop(js.consumers.remove(&sid)),
                            None => conn.wbuf.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes()),
                        }
                    }
                }
            }
        }
        self.conn.as_mut().expect("connected").flush(self.poll_started + WRITES_WITHIN)
    }

    fn handle(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::Ping => self.conn.as_mut().expect("connected").wbuf.extend_from_slice(b"PONG\r\n"),
            Op::Pong => self.conn.as_mut().expect("connected").pings_outstanding = 0,
            Op::Info(info) => {
                let conn = self.conn.as_mut().expect("connected");
                conn.max_payload = max_payload(&info).map_err(|e| format!("{}: {e}", conn.addr))?;
            }
            Op::Err(e) => match publish_violation(&e) {
                Some(subject) => self.forbidden(subject, &e),
                None => log(Level::Warn, &format!("{}: the node says {e}", self.domain)),
            },
            Op::Other => {}
            Op::Msg { subject, reply, headers, payload } => {
                let (reply, payload) = (reply.as_deref(), &*payload);
                if let Some(token) = subject.strip_prefix(&self.inbox).and_then(|s| s.strip_prefix('.')) {
                    if self.js.is_some() && token.starts_with(['s', 'c', 'p', 'd']) {
                        self.jetstream_answer(token, headers.as_deref(), payload);
                        return Ok(());
                    }
                    if token == "ok" {
                        // Acknowledgements in bulk: "ok <seq>-<tag> ...".
                        for token in text(payload).split_ascii_whitespace().skip(1) {
                            self.answered(token, None, b"ok");
                        }
                    } else {
                        self.answered(token, headers.as_deref(), payload);
                    }
                    return Ok(());
                }
                // The sender's domain, as the node's permissions vouch for it
                // (the last sender's kept: most messages come from the same).
                let token = subject.rsplit_once('.').map_or("", |(_, token)| token);
                if self.last_sender.0 != token {
                    self.last_sender = (token.to_owned(), token.replace('_', ".").into());
                }
                let sender = self.last_sender.1.clone();
                if self.js.is_some() {
                    self.consume(&sender, reply, payload);
                    return Ok(());
                }
                let refused = match host::post_from(&sender, &text(payload)) {
                    Ok(()) => None,
                    Err(e) if e.starts_with("busy") => Some(e),
                    Err(e) => Some(format!("refused: {e}")),
                };
                let Some(reply) = reply else { return Ok(()) };
                // Oks to one sender are gathered and sent once per round
                // (`<its inbox>.ok`, with the last token of each reply
                // subject); anything else is answered at once.
                match (refused, reply.rsplit_once('.')) {
                    (None, Some((inbox, token))) if !token.is_empty() && token != "ok" => match self.acks.get_mut(inbox) {
                        Some(tokens) => {
                            tokens.push(' ');
                            tokens.push_str(token);
                        }
                        None => drop(self.acks.insert(inbox.to_owned(), token.to_owned())),
                    },
                    (refused, _) => {
                        let answer = refused.unwrap_or_else(|| "ok".to_owned());
                        let conn = self.conn.as_mut().expect("connected");
                        // Within the node's max_payload, as everything sent.
                        let end = (0..=answer.len().min(conn.max_payload)).rev().find(|i| answer.is_char_boundary(*i)).unwrap_or(0);
                        conn.publish(reply, None, &answer.as_bytes()[..end]);
                    }
                }
            }
        }
        Ok(())
    }

    /// The node refused to take a publish on `subject` (`err`, its
    /// `-ERR`): every message in flight there is refused for good.
    fn forbidden(&mut self, subject: &str, err: &str) {
        let seqs: Vec<u64> = self.in_flight.iter().filter(|(_, f)| f.subject == subject).map(|(seq, _)| *seq).collect();
        if seqs.is_empty() {
            log(Level::Warn, &format!("{}: the node says {err}", self.domain));
        }
        let addr = self.conn.as_ref().map(|c| c.addr.to_string()).unwrap_or_default();
        for seq in seqs {
            self.in_flight.remove(&seq);
            host::refuse(seq, &Refusal::Forbidden(format!("the NATS node {addr} said {err}")));
        }
    }

    /// The answer to the message of reply token `<seq>-<tag>` (the far
    /// end's, or the node's for nobody). One without the tag of the
    /// message's latest publish is ignored: whoever sent it never saw the
    /// message.
    fn answered(&mut self, token: &str, headers: Option<&str>, payload: &[u8]) {
        let Some((seq, tag)) = token.split_once('-').and_then(|(seq, tag)| Some((seq.parse::<u64>().ok()?, tag))) else {
            return;
        };
        if self.in_flight.get(&seq).is_none_or(|f| f.tag != tag.as_bytes()) {
            return;
        }
        let no_responders = headers.is_some_and(|h| h.starts_with("NATS/1.0 503"));
        if let (Some(js), false) = (&mut self.js, no_responders) {
            match jetstream::answer(payload, Some(&js.stream)) {
                jetstream::Answer::Ok if self.config.fault_injection.as_ref().and_then(|f| f.drop_acks_after).is_some_and(|n| self.carried >= n) => {
                    return;
                }
                jetstream::Answer::Ok => {}
                jetstream::Answer::Error(code, err_code, why) => {
                    log(Level::Warn, &format!("{}: JetStream did not store message {seq}: {code} ({err_code}) {why}", self.domain));
                    self.in_flight.remove(&seq);
                    self.deferred.insert((now() + RETRY_PAUSE, seq), ());
                    return;
                }
                // No acknowledgement: published again at the ack timeout.
                jetstream::Answer::Malformed => {
                    log(Level::Warn, &format!("{}: message {seq}: an answer that is not a PubAck of {}", self.domain, js.stream));
                    return;
                }
            }
        } else if let (Some(js), true) = (&mut self.js, no_responders) {
            // No stream (yet, or any more): asked for again.
            js.ready = false;
        }
        self.in_flight.remove(&seq);
        let text = text(payload);
        if self.js.is_some() && !no_responders {
            // A PubAck, checked above.
            host::delivered(seq);
            self.after_carried();
            return;
        }
        if no_responders || text.starts_with("busy") {
            self.deferred.insert((now() + RETRY_PAUSE, seq), ());
        } else {
            if text != "ok" {
                log(Level::Warn, &format!("{}: message {seq} {text}", self.domain));
            }
            host::delivered(seq);
            self.after_carried();
        }
    }

    /// Counts a message the far end took (and traps there, if asked to).
    fn after_carried(&mut self) {
        self.carried += 1;
        if let Some(f) = &self.config.fault_injection
            && f.trap_after_messages.is_some_and(|n| self.carried >= n)
        {
            panic!("fault injection: trapping after {} messages", self.carried);
        }
    }

    /// `retention-hours` in ns.
    fn retention(&self) -> u64 {
        self.config.retention_hours.saturating_mul(3_600_000_000_000)
    }

    /// Whether work may be taken from the host now (with JetStream: once
    /// the stream is confirmed on this connection).
    fn takes_work(&self) -> bool {
        self.js.as_ref().is_none_or(|js| js.ready)
    }

    /// JetStream's housekeeping in a round: the stream, then each
    /// consumer's creation and its next pull.
    fn jetstream_round(&mut self, now: u64) {
        let retention = self.retention();
        let (Some(js), Some(conn)) = (&mut self.js, &mut self.conn) else { return };
        if !js.ready {
            if now >= js.next_stream_try {
                let api = format!("$JS.API.STREAM.CREATE.{}", js.stream);
                let body = jetstream::stream_config(&self.domain, retention);
                conn.publish(&api, Some(&format!("{}.s", self.inbox)), body.as_bytes());
                js.next_stream_try = now + CONNECT_TIMEOUT;
            }
            return;
        }
        let ack_wait = self.config.ack_timeout_ms * MS;
        for (sid, c) in &mut js.consumers {
            if !c.created {
                if now >= c.creating {
                    let api = format!("$JS.API.CONSUMER.DURABLE.CREATE.{}.{}", js.stream, c.name);
                    let body = jetstream::consumer_config(&js.stream, &c.name, &c.prefix, ack_wait, retention);
                    conn.publish(&api, Some(&format!("{}.c{sid}", self.inbox)), body.as_bytes());
                    c.creating = now + CONNECT_TIMEOUT;
                }
            } else if c.remaining == 0 || now >= c.until {
                let api = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", js.stream, c.name);
                conn.publish(&api, Some(&format!("{}.p{sid}", self.inbox)), jetstream::pull().as_bytes());
                c.remaining = jetstream::PULL_BATCH;
                c.until = now + jetstream::PULL_EXPIRES + 1_000 * MS;
            }
        }
    }

    /// The earliest JetStream timer (a stream or consumer to ask for again,
    /// a pull that ends).
    fn jetstream_wake(&self) -> u64 {
        let Some(js) = &self.js else { return u64::MAX };
        if !js.ready {
            return js.next_stream_try;
        }
        js.consumers.values().map(|c| if c.created { c.until } else { c.creating }).min().unwrap_or(u64::MAX)
    }

    /// An answer of the JetStream API on this stub's inbox: `s` (the
    /// stream), `c<id>` (a consumer created), `p<id>` (a pull's status),
    /// `d` (a consumer deleted).
    fn jetstream_answer(&mut self, token: &str, headers: Option<&str>, payload: &[u8]) {
        let was_ready = self.js.as_ref().is_some_and(|js| js.ready);
        let stream_refused = self.jetstream_answer_to(token, headers, payload);
        let addr = self.conn.as_ref().map(|c| c.addr.to_string()).unwrap_or_default();
        let Some(js) = &self.js else { return };
        if js.ready && !was_ready {
            let detail = format!("connected to {addr}, JetStream stream {}", js.stream);
            self.report(StubStatus::Live, &detail);
        } else if let Some(why) = stream_refused {
            // Connected, but nothing can be carried: not live.
            self.report(StubStatus::Disconnected, &format!("{addr}: {why}"));
        }
    }

    /// [`Stub::jetstream_answer`]'s reading of the answer: why the stream
    /// was refused, if it was.
    fn jetstream_answer_to(&mut self, token: &str, headers: Option<&str>, payload: &[u8]) -> Option<String> {
        let domain = self.domain.clone();
        let Some(js) = &mut self.js else { return None };
        let no_responders = headers.is_some_and(|h| h.starts_with("NATS/1.0 503"));
        let sid = token[1..].parse::<u64>().ok();
        let refused = match (&token[..1], sid) {
            ("s", _) if no_responders => Some("the NATS node has no JetStream (nothing answers its stream API): durable delivery waits for it".to_owned()),
            ("s", _) => match jetstream::answer(payload, None) {
                jetstream::Answer::Ok => {
                    js.ready = true;
                    None
                }
                // 10058: the stream exists with another configuration
                // (its operator's): it is used as it is.
                jetstream::Answer::Error(_, 10058, _) => {
                    js.ready = true;
                    None
                }
                jetstream::Answer::Error(code, err_code, why) => Some(format!("JetStream refused the stream {}: {code} ({err_code}) {why}", js.stream)),
                jetstream::Answer::Malformed => Some("an answer of JetStream's stream API that is not JSON".to_owned()),
            },
            ("c", Some(sid)) => {
                let c = js.consumers.get_mut(&sid)?;
                match jetstream::answer(payload, None) {
                    jetstream::Answer::Ok => c.created = true,
                    // An existing consumer of another configuration is used as it is.
                    jetstream::Answer::Error(_, _, why) if why.contains("already") => c.created = true,
                    jetstream::Answer::Error(code, err_code, why) => {
                        log(Level::Warn, &format!("{domain}: JetStream refused the consumer {}: {code} ({err_code}) {why}", c.name));
                    }
                    jetstream::Answer::Malformed => log(Level::Warn, &format!("{domain}: a consumer API answer that is not JSON")),
                }
                None
            }
            ("p", Some(sid)) if jetstream::is_status(headers) => {
                if let Some(c) = js.consumers.get_mut(&sid) {
                    c.remaining = 0;
                }
                None
            }
            _ => None,
        };
        if let Some(why) = &refused {
            log(Level::Warn, &format!("{domain}: {why}"));
        }
        refused
    }

    /// A message a consumer pulled: into the host, then acknowledged on its
    /// `$JS.ACK` subject (`+ACK`), or left for a redelivery after a pause
    /// under back-pressure (`-NAK`), or dropped for good when the host
    /// refuses it (`+TERM`).
    fn consume(&mut self, sender: &str, reply: Option<&str>, payload: &[u8]) {
        let Some(js) = &mut self.js else { return };
        let Some((reply, consumer)) = reply.and_then(|r| Some((r, jetstream::acked_consumer(r)?))) else {
            log(Level::Warn, &format!("{}: a message without a JetStream ack subject; ignored", self.domain));
            return;
        };
        if let Some(c) = js.consumers.values_mut().find(|c| c.name == consumer) {
            c.remaining = c.remaining.saturating_sub(1);
        }
        let answer = match host::post_from(sender, &text(payload)) {
            Ok(()) => "+ACK".to_owned(),
            Err(e) if e.starts_with("busy") => format!("-NAK {{\"delay\":{}}}", jetstream::NAK_DELAY),
            Err(e) => {
                log(Level::Warn, &format!("{}: refused by the host, not redelivered: {e}", self.domain));
                "+TERM".to_owned()
            }
        };
        if let Some(conn) = &mut self.conn {
            conn.publish(reply, None, answer.as_bytes());
        }
    }

    fn poll(&mut self, wait_ms: u32) {
        self.poll_started = now();
        let deadline = self.poll_started + u64::from(wait_ms) * MS;
        // Made once per call and reused: pollables cost a host round trip.
        let deadline_timer = monotonic_clock::subscribe_instant(deadline);
        let work = host::work_ready();
        loop {
            if self.conn.is_none() && now() >= self.next_connect {
                self.connect();
            }
            if self.conn.is_some()
                && let Err(e) = self.pump()
            {
                self.disconnect(&e);
                continue;
            }
            let now = now();
            if now >= deadline {
                return;
            }
            let mut wake = deadline;
            match &self.conn {
                None => wake = wake.min(self.next_connect),
                Some(conn) => wake = wake.min(conn.next_ping),
            }
            if let Some(((due, _), _)) = self.deferred.first_key_value() {
                wake = wake.min(*due);
            }
            if let Some((sent, _)) = self.sent_order.front() {
                wake = wake.min(sent + self.config.ack_timeout_ms * MS);
            }
            wake = wake.min(self.jetstream_wake());
            let early = (wake < deadline).then(|| monotonic_clock::subscribe_instant(wake.max(now)));
            let timer = early.as_ref().unwrap_or(&deadline_timer);
            match &self.conn {
                Some(conn) if self.in_flight.len() < self.config.window && self.takes_work() => {
                    poll::poll(&[timer, &conn.readable, &work]);
                }
                Some(conn) => {
                    poll::poll(&[timer, &conn.readable]);
                }
                None => {
                    poll::poll(&[timer]);
                }
            }
        }
    }
}

struct NatsStub;

impl Guest for NatsStub {
    fn init(domain: String, config: String) -> Result<(), String> {
        // A panic aborts the instance: say why in the host's log first.
        std::panic::set_hook(Box::new(|info| log(Level::Error, &info.to_string())));
        let stub = Stub::new(domain, &config)?;
        STUB.with(|s| *s.borrow_mut() = Some(stub));
        Ok(())
    }

    fn poll(wait_ms: u32) {
        STUB.with(|s| {
            if let Some(stub) = s.borrow_mut().as_mut() {
                stub.poll(wait_ms);
            }
        });
    }
}

export!(NatsStub);
