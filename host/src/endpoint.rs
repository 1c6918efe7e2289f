//! Embedder endpoints: the application's own addresses on the bus.
//!
//! An [`Endpoint`] is opened by [`Runtime::endpoint`](crate::Runtime::endpoint)
//! (or [`Runtime::endpoint_as`](crate::Runtime::endpoint_as), bound to a
//! user) and is subject to the same checks as a hyperty: its `from` is
//! stamped, its JSON and size checked, its messages pass identity and the
//! three policy enforcement points.
//!
//! Which addresses an endpoint may take ([`check_address`]):
//! `hyperty://<domain>/<path>` and `app://<domain>/<path>` (reTHINK's
//! hyperty and application addresses) with a non-empty path, not routed
//! already. Refused, with an [`EndpointError::Address`] naming why:
//! `domain://…` (a domain's own services: its registry, IdP, protostub),
//! `runtime://…` (runtimes; the runtime speaks there itself), every other
//! scheme (data objects, kept by the syncher at their URLs), and addresses
//! without a path. Any domain: which domains a runtime serves cannot be
//! told from what it runs (a runtime may serve its domain's addresses
//! through that domain's protostub with no hyperty of it here), and the
//! domain gives an endpoint nothing by itself — without a user bound, its
//! messages carry no identity, so a domain requiring one refuses them
//! (401), and policies see an unbound sender.
//!
//! Receiving: one queue per endpoint, in arrival order. [`Endpoint::request_reply`]
//! and [`Endpoint::recv_where`] set aside what they are not looking for,
//! and [`Endpoint::recv_timeout`] and [`Endpoint::try_recv`] return it
//! later, in order. What is set aside is bounded by the endpoint's
//! capacity too: when that many messages wait unread, the endpoint stops
//! taking more (senders get `inbox-full`) until some are read.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::address::Address;
use crate::bus::{Bus, Destination, Refused, SendError};
use crate::identity::Identities;
use crate::message::{Assertion, Message, MessageBuilder, MessageType};
use crate::policy::Descriptor;

/// The name an embedder's endpoint bound to a user has for policies (as a
/// hyperty has its bundle name).
pub const ENDPOINT_NAME: &str = "endpoint";

/// How long [`Endpoint::request_reply`] waits past the request's timeout
/// for the bus's 408 before it gives up on its own.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Who an endpoint acts for, as [`Runtime::endpoint_as`](crate::Runtime::endpoint_as)
/// binds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acting {
    /// A user the embedder authenticated itself (`alice@idp.example`):
    /// trusted as given.
    User(String),
    /// An identity assertion, validated once, when the endpoint opens, by
    /// the proxy of the IdP of the endpoint's domain; the endpoint then acts
    /// for the user it names.
    Assertion(Assertion),
}

/// Why an endpoint cannot be opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The address is malformed or not one an endpoint may take (see the
    /// [module documentation](self)).
    #[error("endpoint address {0}")]
    Address(String),
    /// Something is already routed at the address.
    #[error("{0} is already in use")]
    InUse(Address),
    /// The user or assertion cannot bind the endpoint.
    #[error("endpoint identity: {0}")]
    Identity(String),
}

/// Why [`Endpoint::request_reply`] returned no response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The bus refused the request at once (malformed, duplicate id...).
    #[error(transparent)]
    Send(#[from] SendError),
    /// No response, not even the host's 408, came in time: the endpoint
    /// held `unread` messages nobody read, so it took no more.
    #[error("no response to request {id} from {to} within {waited_ms} ms ({unread} messages wait unread at the endpoint)")]
    NoResponse { id: u64, to: Address, waited_ms: u128, unread: usize },
}

/// An embedder's endpoint on the bus: the application side of the runtime,
/// subject to the same stamping and policies as a hyperty. Closed on drop.
pub struct Endpoint {
    address: Address,
    bus: Bus,
    rx: flume::Receiver<Message>,
    /// Who the endpoint acts for (a gateway connection's logged-in user),
    /// as a hyperty's descriptor: identity and policies read it.
    acting_for: Option<Descriptor>,
    capacity: usize,
    next_id: AtomicU64,
    received: Mutex<Received>,
    /// Signalled when `received` changes (a message set aside or taken, a
    /// reader done).
    changed: Condvar,
}

/// What an endpoint has received and not yet handed out.
#[derive(Default)]
struct Received {
    /// Set aside, oldest first.
    queue: VecDeque<Message>,
    /// Ids of requests a `request_reply` waits on: their final responses are
    /// not for `recv`.
    awaited: HashSet<u64>,
    /// A thread is reading the channel (one at a time; the others wait on
    /// `changed`).
    reading: bool,
}

impl Received {
    /// Whether `m` is the final response a `request_reply` waits for.
    fn is_awaited(&self, m: &Message) -> bool {
        m.kind == MessageType::Response && self.awaited.contains(&m.id) && !is_provisional(m)
    }
}

/// A 1xx response: it does not end its request.
fn is_provisional(m: &Message) -> bool {
    m.body.code.is_some_and(|c| c < 200)
}

/// Checks that an embedder may open an endpoint at `address` (see the
/// [module documentation](self)).
pub(crate) fn check_address(address: &str) -> Result<Address, EndpointError> {
    let address = Address::parse(address).map_err(EndpointError::Address)?;
    let refuse = |why: &str| Err(EndpointError::Address(format!("{address} is refused: {why}")));
    match address.scheme() {
        "hyperty" | "app" => {}
        "domain" => return refuse("domain:// addresses are the domain's own services (registry, IdP, protostub)"),
        "runtime" => return refuse("runtime:// addresses are runtimes' own"),
        other => return refuse(&format!("{other}:// is a data object's scheme; only hyperty:// and app:// addresses take endpoints")),
    }
    if address.as_str().split_once("://").and_then(|(_, rest)| rest.split_once('/')).is_none_or(|(_, path)| path.is_empty()) {
        return refuse("an endpoint address needs a path (hyperty://<domain>/<id>)");
    }
    Ok(address)
}

/// The user `assertion` names, validated by the proxy of the IdP that
/// `domain` trusts; why not otherwise (another IdP, no IdP, or the proxy's
/// refusal). Calls the proxy (a guest): never under a lock.
pub(crate) fn user_of(identities: &Identities, domain: &str, assertion: &Assertion) -> Result<String, String> {
    let expected = identities.domain(domain).idp;
    if expected.as_deref() != Some(assertion.idp.as_str()) {
        let trusted = expected.map_or("no IdP".to_owned(), |idp| format!("IdP {idp}"));
        return Err(format!("{domain} trusts {trusted}, not {}", assertion.idp));
    }
    identities.validate(assertion).map(|identity| identity.user.into()).map_err(|(_, why)| why)
}

/// An embedder's endpoint on the bus — and any host service reading the
/// messages to its address from a bounded channel (registry announcements'
/// answers, a served domain registry): full is back-pressure, a dropped
/// receiver has stopped.
impl Destination for flume::Sender<Message> {
    fn deliver(&self, message: Message, _bus: &Bus, _wait: Option<Duration>) -> Result<(), Refused> {
        self.try_send(message).map_err(|e| match e {
            flume::TrySendError::Full(m) => Refused::Full(m),
            flume::TrySendError::Disconnected(m) => Refused::Closed(m),
        })
    }
}

impl Endpoint {
    /// Routes `address` to a new endpoint holding up to `capacity`
    /// undelivered messages; `acting_for` binds it to a user.
    pub(crate) fn open(bus: &Bus, address: Address, capacity: usize, acting_for: Option<Descriptor>) -> Result<Endpoint, EndpointError> {
        let capacity = capacity.max(1);
        let (tx, rx) = flume::bounded(capacity);
        if !bus.add_route(address.clone(), Arc::new(tx)) {
            return Err(EndpointError::InUse(address));
        }
        Ok(Endpoint {
            address,
            bus: bus.clone(),
            rx,
            acting_for,
            capacity,
            next_id: AtomicU64::new(1),
            received: Mutex::default(),
            changed: Condvar::new(),
        })
    }

    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Who it acts for, if it is bound to a user.
    pub(crate) fn acting_for(&self) -> Option<&Descriptor> {
        self.acting_for.as_ref()
    }

    /// The user the endpoint acts for, if it is bound to one.
    pub fn user(&self) -> Option<&str> {
        self.acting_for.as_ref().and_then(|d| d.user.as_deref())
    }

    /// A fresh message id: 1, 2, 3… for this endpoint. A message numbered
    /// by hand must not reuse the id of a request still pending
    /// ([`SendError::DuplicateId`]).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A message of `kind` from this endpoint to `to` (an address as text,
    /// checked by [`MessageBuilder::build`]), with a fresh id.
    pub fn message(&self, kind: MessageType, to: &str) -> MessageBuilder {
        Message::builder(self.next_id(), kind, self.address.as_str(), to)
    }

    /// The response of this endpoint to `request` (which it received),
    /// with `code`.
    pub fn reply(&self, request: &Message, code: u16) -> MessageBuilder {
        Message::builder(request.id, MessageType::Response, self.address.as_str(), request.from.as_str()).code(code)
    }

    /// Sends a notification; `from` must be this endpoint's address.
    pub fn send(&self, message: Message) -> Result<(), SendError> {
        self.check(&message)?;
        self.bus.send(message, None, self.acting_for.as_ref())
    }

    /// Sends a request and returns at once; its response (or the host's
    /// 401/403/404/408) arrives through [`recv_timeout`](Self::recv_timeout).
    /// `None` takes the runtime's default timeout. To wait for the
    /// response, see [`request_reply`](Self::request_reply).
    pub fn request(&self, message: Message, timeout: Option<Duration>) -> Result<(), SendError> {
        self.check(&message)?;
        let timeout = timeout.unwrap_or(self.bus.config().request_timeout);
        self.bus.send(message, Some(timeout), self.acting_for.as_ref())
    }

    /// Sends a request and waits for its response (wasi:messaging's
    /// request-reply): the first final (≥ 200) response from the request's
    /// `to` with its id, whatever its code — the responder's, or the
    /// host's own 401/403/404/408/503 with a `description`. Provisional
    /// (1xx) responses and every other message are kept, in order, for
    /// [`recv_timeout`](Self::recv_timeout). `None` takes the runtime's
    /// default timeout.
    ///
    /// Errors: the bus refused the request ([`RequestError::Send`]), or not
    /// even the 408 came within the timeout and a few seconds of grace
    /// ([`RequestError::NoResponse`]: the endpoint held `capacity` unread
    /// messages and took no more).
    pub fn request_reply(&self, message: Message, timeout: Option<Duration>) -> Result<Message, RequestError> {
        let timeout = timeout.unwrap_or(self.bus.config().request_timeout);
        let (id, to) = (message.id, message.to.clone());
        if !self.received.lock().unwrap().awaited.insert(id) {
            return Err(SendError::DuplicateId(id).into());
        }
        let start = Instant::now();
        let answer = self.request(message, Some(timeout)).map_err(RequestError::from).and_then(|()| {
            let deadline = start.checked_add(timeout).and_then(|t| t.checked_add(ANSWER_GRACE));
            let answer = |m: &Message| m.kind == MessageType::Response && m.id == id && m.from == to && !is_provisional(m);
            self.next_where(|m, _| answer(m), deadline).ok_or_else(|| RequestError::NoResponse {
                id,
                to: to.clone(),
                waited_ms: start.elapsed().as_millis(),
                unread: self.received.lock().unwrap().queue.len(),
            })
        });
        self.received.lock().unwrap().awaited.remove(&id);
        answer
    }

    fn check(&self, message: &Message) -> Result<(), SendError> {
        if message.from != self.address {
            return Err(SendError::SpoofedFrom(format!("{} is not this endpoint's address ({})", message.from, self.address)));
        }
        let max = self.bus.config().max_message_bytes;
        if message.size() > max {
            // Refused before the value is scanned, as the bus would.
            return Err(SendError::TooLarge(format!("{} bytes, the limit is {max}", message.size())));
        }
        if let Some(value) = &message.body.value {
            crate::message::validate_value(value).map_err(SendError::Malformed)?;
        }
        Ok(())
    }

    /// The next message, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Message> {
        self.recv_where(|_| true, timeout)
    }

    /// The next message, if one is waiting.
    pub fn try_recv(&self) -> Option<Message> {
        self.recv_where(|_| true, Duration::ZERO)
    }

    /// The first message matching `pred`, waiting at most `timeout`; the
    /// messages before it are kept, in order, for later calls. (Final
    /// responses a [`request_reply`](Self::request_reply) waits for are
    /// never returned here.)
    pub fn recv_where(&self, pred: impl Fn(&Message) -> bool, timeout: Duration) -> Option<Message> {
        let deadline = Instant::now().checked_add(timeout);
        self.next_where(|m, received| !received.is_awaited(m) && pred(m), deadline)
    }

    /// Takes, without waiting, every message already received and set
    /// aside (by [`recv_where`](Self::recv_where) or
    /// [`request_reply`](Self::request_reply)) that matches `pred`, oldest
    /// first.
    pub fn take_set_aside(&self, pred: impl Fn(&Message) -> bool) -> Vec<Message> {
        let mut received = self.received.lock().unwrap();
        let mut taken = Vec::new();
        for m in std::mem::take(&mut received.queue) {
            if !received.is_awaited(&m) && pred(&m) {
                taken.push(m);
            } else {
                received.queue.push_back(m);
            }
        }
        drop(received);
        self.changed.notify_all();
        taken
    }

    /// The next message, asynchronously (for tokio users; do not mix with
    /// the blocking calls on other threads at the same time).
    pub async fn recv(&self) -> Option<Message> {
        if let Some(m) = self.try_take(|m, r| !r.is_awaited(m)) {
            return Some(m);
        }
        self.rx.recv_async().await.ok()
    }

    fn try_take(&self, pred: impl Fn(&Message, &Received) -> bool) -> Option<Message> {
        let mut received = self.received.lock().unwrap();
        let i = received.queue.iter().position(|m| pred(m, &received))?;
        let m = received.queue.remove(i);
        drop(received);
        self.changed.notify_all();
        m
    }

    /// The first message for which `pred` holds, received by `deadline`
    /// (`None`: no deadline). One thread at a time reads the channel and
    /// sets aside what it is not looking for; the others wait for it.
    fn next_where(&self, pred: impl Fn(&Message, &Received) -> bool, deadline: Option<Instant>) -> Option<Message> {
        let mut received = self.received.lock().unwrap();
        loop {
            if let Some(i) = received.queue.iter().position(|m| pred(m, &received)) {
                let m = received.queue.remove(i);
                drop(received);
                self.changed.notify_all();
                return m;
            }
            let reader = !received.reading && received.queue.len() < self.capacity;
            if reader {
                match self.rx.try_recv() {
                    Ok(m) => {
                        received.queue.push_back(m);
                        continue;
                    }
                    Err(flume::TryRecvError::Disconnected) => return None,
                    Err(flume::TryRecvError::Empty) => {}
                }
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return None;
            }
            if reader {
                received.reading = true;
                drop(received);
                let got = match deadline {
                    Some(deadline) => self.rx.recv_deadline(deadline).map_err(|e| e == flume::RecvTimeoutError::Disconnected),
                    None => self.rx.recv().map_err(|_| true),
                };
                received = self.received.lock().unwrap();
                received.reading = false;
                self.changed.notify_all();
                match got {
                    Ok(m) => received.queue.push_back(m),
                    // Nothing will ever come: what is set aside is all.
                    Err(true) => return received.queue.iter().position(|m| pred(m, &received)).and_then(|i| received.queue.remove(i)),
                    // The deadline passed: one last look, above.
                    Err(false) => {}
                }
            } else {
                received = match deadline {
                    Some(deadline) => self.changed.wait_timeout(received, deadline - now).unwrap().0,
                    None => self.changed.wait(received).unwrap(),
                };
            }
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.bus.remove_route(&self.address);
    }
}
