//! The message bus: exact-address routing, the three policy enforcement
//! points, request/response correlation and the host's own answers
//! (403, 404, 408, 503).
//!
//! One path for every message, whatever its type:
//! route lookup (404) → identity (assertion attached on leaving the domain,
//! validated on arriving: 401) → sender PEP (outgoing) → bus-access PEP →
//! receiver PEP (incoming) → correlation → the receiver's bounded inbox.
//! The route is looked up first because the policies read what it knows of
//! the receiver (its name), and the identity before the policies because
//! they read the validated sender identity. Problems found at
//! the import (malformed, spoofed, too large, inbox full) are returned to the
//! caller as [`SendError`]; problems found on the path are answered with a
//! `response` message, at once. Nothing is dropped silently: a full inbox is
//! an error to the sender (back-pressure).
//!
//! Pending requests live in two maps that change together: by requester
//! then id for correlation (and for counting a requester's requests against
//! its domain's `max-pending`) and by deadline for the timer thread, so an
//! entry and its timer disappear with the first final response, the 408 or
//! the requester. A provisional (1xx) response is delivered and leaves its
//! request, and its timer, pending (at most [`MAX_PROVISIONAL`] a request). The 408 carries the request back in its
//! `body.value` (reTHINK's 408 did), its value kept up to
//! [`KEPT_VALUE_BYTES`]. A response refused on the path (policies 403,
//! identity 401) closes its request: the requester gets that code at once
//! and the responder is told. A stopping runtime forgets them all at once,
//! answering none.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::address::Address;
use crate::message::{Message, MessageType, code};
use crate::identity::{Crossing, Identities};
use crate::policy::{Decision, Descriptor, EnforcementPoint, Parties, PolicyDecisionPoint};
use crate::protostub::{InboundRequests, QueueError, Stub};
use crate::syncher::Syncher;
use crate::sandbox::{Inbox, Refused};

/// Why the bus refused a message at the import; mirrors the WIT `send-error`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("spoofed from: {0}")]
    SpoofedFrom(String),
    #[error("spoofed identity: {0}")]
    SpoofedIdentity(String),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message too large: {0}")]
    TooLarge(String),
    #[error("a request with id {0} from this address is still pending")]
    DuplicateId(u64),
    #[error("inbox full: {0}")]
    InboxFull(String),
    #[error("rate limited: {0}")]
    RateLimited(String),
    #[error("too many pending requests: {0}")]
    TooManyPending(String),
}

/// Where messages for an address go.
#[derive(Clone)]
pub(crate) enum Route {
    /// A hyperty instance in a domain sandbox.
    Hyperty { inbox: Inbox, instance: u32, descriptor: Arc<Descriptor> },
    /// An embedder's endpoint.
    Endpoint(flume::Sender<Message>),
    /// The protostub of a remote domain: for every address of that domain
    /// with no route here.
    Stub(Arc<Stub>),
    /// A protostub's own address (`domain://protostub.<domain>`), where
    /// local hyperties subscribe to its status.
    StubStatus(Arc<Stub>),
    /// A data object's URL, kept by the syncher.
    Object(Weak<Syncher>),
}

impl Route {
    fn descriptor(&self) -> Option<&Descriptor> {
        match self {
            Route::Hyperty { descriptor, .. } => Some(descriptor),
            Route::Endpoint(_) | Route::Stub(_) | Route::StubStatus(_) | Route::Object(_) => None,
        }
    }

    /// The refusal hands the message back (no copy was made to keep it).
    /// `bus` is for the routes that answer by themselves (a stub's status
    /// address, a data object); `wait`, for a request leaving through a
    /// stub, how long its sender waits for the response.
    #[allow(clippy::result_large_err)]
    fn deliver(&self, message: Message, bus: &Bus, wait: Option<Duration>) -> Result<(), Refused> {
        match self {
            Route::Hyperty { inbox, instance, .. } => inbox.deliver(*instance, message),
            Route::Endpoint(tx) => tx.try_send(message).map_err(|e| match e {
                flume::TrySendError::Full(m) => Refused::Full(m),
                flume::TrySendError::Disconnected(m) => Refused::Closed(m),
            }),
            Route::StubStatus(stub) => {
                stub.status_request(bus, message);
                Ok(())
            }
            Route::Object(syncher) => match syncher.upgrade() {
                Some(syncher) => {
                    syncher.handle(message);
                    Ok(())
                }
                None => Err(Refused::Closed(message)),
            },
            Route::Stub(stub) => match stub.push(&message, wait) {
                Ok(()) => Ok(()),
                Err(QueueError::Full(n)) => Err(Refused::Queue(message, format!("the protostub queue of {} is full ({n} messages)", stub.domain))),
            },
        }
    }
}

/// Settings of the bus.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// The runtime's own domain, whose policies guard bus access.
    pub runtime_domain: String,
    /// How long a request waits for its response before the host answers 408.
    pub request_timeout: Duration,
    /// The largest message accepted, counted by [`Message::size`].
    pub max_message_bytes: usize,
}

/// The bus; cheap to clone (a handle).
#[derive(Clone)]
pub(crate) struct Bus {
    inner: Arc<BusInner>,
}

struct BusInner {
    routes: RwLock<HashMap<Address, Route>>,
    /// Protostubs by the domain they carry messages to.
    stubs: RwLock<HashMap<String, Arc<Stub>>>,
    policy: Arc<dyn PolicyDecisionPoint>,
    identities: Arc<Identities>,
    config: BusConfig,
    timer: Arc<Timer>,
    /// Requests that came in through stubs, which responses leaving through
    /// a stub must answer.
    inbound: InboundRequests,
}

impl Bus {
    pub fn new(config: BusConfig, policy: Arc<dyn PolicyDecisionPoint>, identities: Arc<Identities>) -> Bus {
        let timer = Arc::new(Timer::default());
        let inner = Arc::new(BusInner {
            routes: RwLock::default(),
            stubs: RwLock::default(),
            policy,
            identities,
            config,
            timer: timer.clone(),
            inbound: InboundRequests::default(),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("hyperty-bus-timer".into())
            .spawn(move || timer.run(weak))
            .expect("cannot start the bus timer thread");
        Bus { inner }
    }

    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    /// Adds a route; false if the address is already routed. The stub of
    /// the address's domain, if any, listens for it.
    pub fn add_route(&self, address: Address, route: Route) -> bool {
        let mut routes = self.inner.routes.write().unwrap();
        if routes.contains_key(&address) {
            return false;
        }
        if let Some(stub) = self.inner.stubs.read().unwrap().get(address.domain())
            && !matches!(route, Route::StubStatus(_))
        {
            stub.listen(&address);
            stub.ensure_started();
        }
        routes.insert(address, route);
        true
    }

    /// Removes a route and forgets the requests it was waiting on.
    pub fn remove_route(&self, address: &Address) {
        self.inner.routes.write().unwrap().remove(address);
        let stubs = self.inner.stubs.read().unwrap();
        if let Some(stub) = stubs.get(address.domain()) {
            stub.forget(address);
        }
        for stub in stubs.values() {
            stub.unwatch(address);
        }
        drop(stubs);
        self.inner.timer.forget_requester(address);
    }

    /// Adds the protostub of `stub.domain`, which then listens for every
    /// address of its domain routed here; false if the domain has one.
    pub fn add_stub(&self, stub: Arc<Stub>) -> bool {
        let routes = self.inner.routes.read().unwrap();
        let mut stubs = self.inner.stubs.write().unwrap();
        if stubs.contains_key(&stub.domain) {
            return false;
        }
        let mut listening = false;
        for address in routes.iter().filter(|(a, r)| a.domain() == stub.domain && !matches!(r, Route::StubStatus(_))).map(|(a, _)| a) {
            stub.listen(address);
            listening = true;
        }
        if listening {
            stub.ensure_started();
        }
        stubs.insert(stub.domain.clone(), stub);
        true
    }

    pub fn remove_stub(&self, domain: &str) {
        if let Some(stub) = self.inner.stubs.write().unwrap().remove(domain) {
            self.inner.routes.write().unwrap().remove(&stub.address);
            stub.stop();
        }
    }

    /// Stops every protostub (the runtime shuts down).
    pub fn remove_stubs(&self) {
        let domains: Vec<String> = self.inner.stubs.read().unwrap().keys().cloned().collect();
        for domain in domains {
            self.remove_stub(&domain);
        }
    }

    /// Whether `address` is routed in this runtime (a hyperty, an endpoint,
    /// a data object, a stub's status address, a served registry).
    pub fn is_routed(&self, address: &Address) -> bool {
        self.inner.routes.read().unwrap().contains_key(address)
    }

    /// A handle that does not keep the bus alive (for threads the bus's
    /// routes lead to).
    pub fn downgrade(&self) -> WeakBus {
        WeakBus(Arc::downgrade(&self.inner))
    }

    /// What the runtime knows of the hyperty at `address`, if one is here.
    pub fn descriptor_of(&self, address: &Address) -> Option<Arc<Descriptor>> {
        match self.inner.routes.read().unwrap().get(address) {
            Some(Route::Hyperty { descriptor, .. }) => Some(descriptor.clone()),
            _ => None,
        }
    }

    /// The stub of `domain`, if there is one.
    pub fn stub(&self, domain: &str) -> Option<Arc<Stub>> {
        self.inner.stubs.read().unwrap().get(domain).cloned()
    }

    /// Where messages for `to` go: its own route; for a data object's
    /// child (`<url>/children/<name>`, no route of its own) the object's;
    /// else its domain's stub.
    fn resolve(&self, to: &Address) -> Option<Route> {
        let routes = self.inner.routes.read().unwrap();
        if let Some(route) = routes.get(to) {
            return Some(route.clone());
        }
        if let Some(route @ Route::Object(_)) = crate::syncher::child_of(to).and_then(|(url, _)| routes.get(&url)) {
            return Some(route.clone());
        }
        drop(routes);
        self.inner.stubs.read().unwrap().get(to.domain()).map(|stub| Route::Stub(stub.clone()))
    }

    /// Requests waiting for a response.
    pub fn pending_requests(&self) -> usize {
        self.inner.timer.count()
    }

    /// Requests from `requester` waiting for a response.
    pub fn pending_from(&self, requester: &Address) -> usize {
        self.inner.timer.count_of(requester)
    }

    /// Forgets every pending request without answering any: the runtime
    /// is stopping and nobody will read the 408s.
    pub fn forget_pending(&self) {
        self.inner.timer.forget_all();
    }

    /// Sends `message`, whose `from` the caller has already checked. With
    /// `timeout`, it is a request: a response is correlated to it, or the
    /// host answers 408 when the timeout passes.
    /// `sender` describes the sending hyperty, for policies (`None` for an
    /// embedder's endpoint).
    pub fn send(&self, message: Message, timeout: Option<Duration>, sender: Option<&Descriptor>) -> Result<(), SendError> {
        self.send_from(message, timeout, sender, None)
    }

    /// A message the protostub of `stub_domain` received from its node; a
    /// request when its sender waits `wait` for the response.
    ///
    /// The trust boundary: what arrives through a stub is remote, whatever
    /// it claims. Its `from` must not be an address routed here (a local
    /// hyperty, endpoint or data object, the runtime's own address): that
    /// is refused as [`SendError::SpoofedFrom`]. Its identity assertion is
    /// validated, and required where the receiving domain requires identity,
    /// even when it claims the receiver's own domain. It is delivered only
    /// to what is routed here: never out through a stub (no relaying), nor
    /// to a stub's status address (local subscribers only), nor as a write
    /// to a data object (403: its reporter is here). A request is
    /// recorded, so that a response may leave through a stub to answer it.
    pub fn send_inbound(&self, message: Message, stub_domain: &str, wait: Option<Duration>) -> Result<(), SendError> {
        if self.is_routed(&message.from) {
            return Err(SendError::SpoofedFrom(format!(
                "{} is an address of this runtime; nothing arriving through the protostub of {stub_domain} may claim it",
                message.from
            )));
        }
        self.send_from(message, None, None, Some(Inbound { stub: stub_domain, wait }))
    }

    fn send_from(
        &self,
        mut message: Message,
        timeout: Option<Duration>,
        sender: Option<&Descriptor>,
        came_through: Option<Inbound<'_>>,
    ) -> Result<(), SendError> {
        let inner = &*self.inner;
        tracing::debug!(
            id = message.id,
            kind = message.kind.as_str(),
            from = %message.from,
            to = %message.to,
            code = message.body.code,
            "message"
        );
        if message.size() > inner.config.max_message_bytes {
            let limit = inner.config.max_message_bytes;
            return Err(SendError::TooLarge(format!("{} bytes, the limit is {limit}", message.size())));
        }
        if message.kind == MessageType::Response && timeout.is_some() {
            return Err(SendError::Malformed("a response cannot be sent as a request".into()));
        }
        let Some(route) = self.resolve(&message.to) else {
            let why = format!("no hyperty or endpoint at {}", message.to);
            self.answer(&message, code::NOT_FOUND, why);
            return Ok(());
        };
        let remote = matches!(route, Route::Stub(_));
        if let Some(Inbound { stub: origin, .. }) = came_through {
            let refusal = match &route {
                Route::Stub(_) => Some((
                    code::NOT_FOUND,
                    format!("no hyperty or endpoint at {} here, and it came through the protostub of {origin}", message.to),
                )),
                Route::StubStatus(_) => Some((code::FORBIDDEN, format!("{} takes subscriptions from this runtime only", message.to))),
                // A data object's reporter is always a hyperty here, even
                // once its route is gone: no write of the object comes
                // through a stub (its children's may: a remote subscriber's,
                // which the syncher checks).
                Route::Object(_)
                    if matches!(message.kind, MessageType::Create | MessageType::Update | MessageType::Delete)
                        && crate::syncher::child_of(&message.to).is_none() =>
                {
                    Some((code::FORBIDDEN, format!("only its reporter, a hyperty of this runtime, changes {}", message.to)))
                }
                _ => None,
            };
            if let Some((code, why)) = refusal {
                self.answer(&message, code, why);
                return Ok(());
            }
        }
        let crossing = match (came_through, remote) {
            (Some(_), _) => Crossing::Arriving,
            (None, true) => Crossing::Leaving,
            (None, false) => Crossing::Here,
        };
        if let Err((code, why)) = inner.identities.establish(&mut message, sender, crossing) {
            tracing::info!(id = message.id, from = %message.from, to = %message.to, code, "{why}");
            if message.kind == MessageType::Response {
                self.refuse_response(&message, remote, code, &why);
            } else {
                self.deliver_answer(message.answer(code, why));
            }
            return Ok(());
        }
        let parties = Parties { sender, target: route.descriptor() };
        let points = [
            (EnforcementPoint::Outgoing, message.from.domain()),
            (EnforcementPoint::BusAccess, inner.config.runtime_domain.as_str()),
            (EnforcementPoint::Incoming, message.to.domain()),
        ];
        if let Err((i, Decision::Deny { policies, reason })) = inner.policy.decide_path(&points, &message, parties) {
            let (point, domain) = points[i];
            let why = format!("denied at the {point} enforcement point of {domain} by [{}]: {reason}", policies.join(", "));
            tracing::info!(id = message.id, from = %message.from, to = %message.to, "{why}");
            if message.kind == MessageType::Response {
                self.refuse_response(&message, remote, code::FORBIDDEN, &why);
            } else {
                self.deliver_answer(message.answer(code::FORBIDDEN, why));
            }
            return Ok(());
        }
        let correlation = if message.kind == MessageType::Response && remote {
            // The requester is in another runtime, which correlates it; it
            // leaves only if it answers a request that came in here.
            if !inner.inbound.take(&message) {
                tracing::debug!(id = message.id, from = %message.from, to = %message.to, "response to no request received through a protostub dropped");
                return Ok(());
            }
            None
        } else if message.kind == MessageType::Response {
            // A provisional (1xx) response leaves its request pending.
            match inner.timer.answers(&message) {
                Some(Answers::Provisional) => None,
                Some(Answers::Final(outstanding)) => Some(outstanding),
                None => {
                    tracing::debug!(id = message.id, to = %message.to, "response to no pending request dropped");
                    return Ok(());
                }
            }
        } else {
            if let Some(timeout) = timeout {
                inner.timer.insert(&message, timeout)?;
            }
            if let Some(Inbound { stub, wait: Some(wait) }) = came_through
                && let Err(limit) = inner.inbound.record(&message, stub, wait)
            {
                let why = format!("{limit} requests that came through the protostub of {stub} already wait for an answer here");
                self.answer_taken(&message, code::UNAVAILABLE, why);
                return Ok(());
            }
            None
        };
        let inbound_request = came_through.is_some_and(|i| i.wait.is_some()) && message.kind != MessageType::Response;
        let undo = |bus: &Bus, message: Message, correlation| {
            if inbound_request {
                bus.inner.inbound.forget(&message);
            }
            bus.undo_correlation(message, timeout, correlation);
        };
        match route.deliver(message, self, timeout) {
            Ok(()) => Ok(()),
            Err(Refused::Full(message)) => {
                let to = message.to.to_string();
                undo(self, message, correlation);
                Err(SendError::InboxFull(to))
            }
            Err(Refused::Closed(message)) => {
                self.answer(&message, code::UNAVAILABLE, format!("{} has stopped", message.to));
                undo(self, message, correlation);
                Ok(())
            }
            Err(Refused::Queue(message, why)) => {
                self.answer(&message, code::UNAVAILABLE, why);
                undo(self, message, correlation);
                Ok(())
            }
        }
    }

    /// After a failed delivery: a request is no longer pending; a response
    /// leaves its request pending again, so it still gets an answer.
    fn undo_correlation(&self, message: Message, timeout: Option<Duration>, correlation: Option<Outstanding>) {
        if let Some(outstanding) = correlation {
            self.inner.timer.restore(message.to, message.id, outstanding);
        } else if timeout.is_some() {
            self.inner.timer.take_request(&message.from, message.id);
        }
    }

    /// A response refused on the path (identity: 401, policies: 403):
    /// the request it answers is no longer pending and its requester gets
    /// `code` in its place at once (rather than a 408 later; through the
    /// stub when the requester is remote), and the responder is told with
    /// a `response` of the same code and id from the requester, naming
    /// why. Both are host answers: never answered, never checked again.
    fn refuse_response(&self, response: &Message, remote: bool, code: u16, why: &str) {
        let waiting = if remote { self.inner.inbound.close(response) } else { self.inner.timer.close(response).is_some() };
        if waiting {
            let mut refusal = Message::response(response.id, response.from.clone(), response.to.clone(), code);
            refusal.body.description = Some(format!("the response was refused: {why}"));
            self.deliver_answer(refusal);
        }
        self.deliver_answer(response.answer(code, format!("your response to {} was refused: {why}", response.to)));
    }

    /// The host's own answer to `message`: a response with `code` delivered
    /// straight to its sender. Responses are never answered (no loops).
    pub fn answer(&self, message: &Message, code: u16, description: String) {
        if message.kind == MessageType::Response {
            tracing::debug!(id = message.id, to = %message.to, code, "undeliverable response: {description}");
            return;
        }
        let answer = message.answer(code, description);
        self.deliver_answer(answer);
    }

    /// Like [`Bus::answer`], for a message the bus passed on that its
    /// destination then cannot take after all (a protostub refusing it): if
    /// it is a pending request, it is no longer pending, so its requester
    /// gets this answer and no 408 later.
    pub fn answer_taken(&self, message: &Message, code: u16, description: String) {
        if message.kind == MessageType::Response {
            tracing::debug!(id = message.id, to = %message.to, code, "undeliverable response: {description}");
            return;
        }
        self.deliver_final_answer(message.answer(code, description));
    }

    /// Delivers `answer`, the host's own final answer to a request the bus
    /// already passed on to its destination (which then failed it: a trap,
    /// a stopped or restarting instance): the request is no longer pending,
    /// so its requester gets this answer and no 408 later.
    pub fn deliver_final_answer(&self, answer: Message) {
        self.inner.timer.close(&answer);
        self.deliver_answer(answer);
    }

    /// Delivers a response the host made itself straight to its `to`.
    pub fn deliver_answer(&self, answer: Message) {
        let result = match self.resolve(&answer.to) {
            Some(route) => route.deliver(answer, self, None),
            None => Err(Refused::Closed(answer)),
        };
        if let Err(Refused::Full(m) | Refused::Closed(m) | Refused::Queue(m, _)) = result {
            tracing::warn!(id = m.id, to = %m.to, code = m.body.code, "cannot deliver the host's answer: {}",
                m.body.description.as_deref().unwrap_or(""));
        }
    }
}

/// Where a message that came in through a protostub came from.
#[derive(Clone, Copy)]
struct Inbound<'a> {
    /// The domain of the stub it came through.
    stub: &'a str,
    /// For a request: how long its sender waits for the response.
    wait: Option<Duration>,
}

/// A [`Bus`] handle that does not keep it alive.
#[derive(Clone)]
pub(crate) struct WeakBus(Weak<BusInner>);

impl WeakBus {
    /// The bus, while the runtime holds it.
    pub fn upgrade(&self) -> Option<Bus> {
        self.0.upgrade().map(|inner| Bus { inner })
    }
}

/// Whether `response` is provisional (1xx, RFC 9110 §15.2): delivered,
/// and the request it answers stays pending (its timer too).
pub(crate) fn provisional(response: &Message) -> bool {
    response.body.code.is_some_and(|c| (100..200).contains(&c))
}

/// Provisional (1xx) responses delivered per request; more are dropped
/// (a responder cannot flood its requester through `reply`, which is not
/// rate-limited because it answers only pending requests).
pub(crate) const MAX_PROVISIONAL: u32 = 16;

/// The most of a request's `body.value` kept while it is pending, to be
/// returned in its 408 (see [`Kept`]): with `max-pending` requests per
/// hyperty, the host holds at most that many times this much for it.
pub(crate) const KEPT_VALUE_BYTES: usize = 16 * 1024;

/// A request waiting for its response.
struct Outstanding {
    responder: Address,
    deadline: Instant,
    seq: u64,
    timeout: Duration,
    request: Kept,
    /// Provisional responses delivered so far.
    provisional: u32,
}

/// What a 408 tells of its request (reTHINK returned the request in the
/// 408's `body.value`): its type, resource and value, the value only when
/// at most [`KEPT_VALUE_BYTES`] (else only its length).
struct Kept {
    kind: MessageType,
    resource: Option<String>,
    value: Result<Option<String>, usize>,
}

impl Kept {
    fn of(request: &Message) -> Kept {
        let value = match &request.body.value {
            Some(v) if v.len() > KEPT_VALUE_BYTES => Err(v.len()),
            v => Ok(v.clone()),
        };
        Kept { kind: request.kind, resource: request.body.resource.clone(), value }
    }

    /// The request as JSON text, `{"id", "type", "from", "to", "body":
    /// {"resource", "value"}}` (`value` the request's JSON text as a
    /// string, as the WIT message carries it), for the 408's value. When
    /// the value was not kept, or would make the 408 larger than `max`
    /// bytes, `body` has `"value-bytes": n` (its length) instead.
    fn to_json(&self, id: u64, requester: &Address, responder: &Address, max: usize) -> String {
        let text = |value: Result<&Option<String>, usize>| {
            let mut body = serde_json::Map::new();
            body.insert("resource".into(), self.resource.clone().into());
            match value {
                Ok(v) => body.insert("value".into(), v.clone().into()),
                Err(n) => body.insert("value-bytes".into(), n.into()),
            };
            serde_json::json!({ "id": id, "type": self.kind.as_str(), "from": requester.as_str(), "to": responder.as_str(), "body": body })
                .to_string()
        };
        let full = text(self.value.as_ref().map_err(|n| *n));
        if full.len() <= max {
            return full;
        }
        text(Err(self.value.as_ref().map_or_else(|n| *n, |v| v.as_ref().map_or(0, String::len))))
    }
}

/// What a response is to its pending request.
enum Answers {
    /// A 1xx: the request stays pending.
    Provisional,
    /// The first final response: the request, no longer pending.
    Final(Outstanding),
}

/// The pending requests, by requester then id (so one requester's count
/// and removal cost what it holds, not what everyone holds) and by
/// deadline; the two change together.
#[derive(Default)]
struct Pending {
    by_requester: HashMap<Address, HashMap<u64, Outstanding>>,
    by_deadline: BTreeMap<(Instant, u64), (Address, u64)>,
    next_seq: u64,
}

impl Pending {
    fn add(&mut self, requester: Address, id: u64, o: Outstanding) {
        self.by_deadline.insert((o.deadline, o.seq), (requester.clone(), id));
        self.by_requester.entry(requester).or_default().insert(id, o);
    }

    fn remove(&mut self, requester: &Address, id: u64) -> Option<Outstanding> {
        let of_requester = self.by_requester.get_mut(requester)?;
        let o = of_requester.remove(&id)?;
        if of_requester.is_empty() {
            self.by_requester.remove(requester);
        }
        self.by_deadline.remove(&(o.deadline, o.seq));
        Some(o)
    }
}

/// The pending requests and the thread that answers 408 when one expires.
#[derive(Default)]
struct Timer {
    pending: Mutex<Pending>,
    wake: Condvar,
    stopped: AtomicBool,
}

impl Timer {
    fn insert(&self, request: &Message, timeout: Duration) -> Result<(), SendError> {
        let mut p = self.pending.lock().unwrap();
        if p.by_requester.get(&request.from).is_some_and(|r| r.contains_key(&request.id)) {
            return Err(SendError::DuplicateId(request.id));
        }
        // A deadline past what an `Instant` can hold is as good as never.
        let now = Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        p.next_seq += 1;
        let seq = p.next_seq;
        let earliest = p.by_deadline.first_key_value().is_none_or(|((first, _), _)| deadline < *first);
        let kept = Kept::of(request);
        p.add(request.from.clone(), request.id, Outstanding { responder: request.to.clone(), deadline, seq, timeout, request: kept, provisional: 0 });
        drop(p);
        if earliest {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// What `response` is to the request it answers, if that is pending
    /// and `response` comes from the address the request went to: a
    /// provisional (1xx) one leaves it pending (up to [`MAX_PROVISIONAL`]
    /// of them; later ones answer nothing), a final one takes it.
    fn answers(&self, response: &Message) -> Option<Answers> {
        if provisional(response) {
            let mut p = self.pending.lock().unwrap();
            let o = p.by_requester.get_mut(&response.to)?.get_mut(&response.id)?;
            if o.responder != response.from || o.provisional >= MAX_PROVISIONAL {
                return None;
            }
            o.provisional += 1;
            return Some(Answers::Provisional);
        }
        self.close(response).map(Answers::Final)
    }

    /// Takes the request `response` answers, whatever its code, if it is
    /// pending and `response` comes from the address the request went to.
    fn close(&self, response: &Message) -> Option<Outstanding> {
        let mut p = self.pending.lock().unwrap();
        let o = p.by_requester.get(&response.to)?.get(&response.id)?;
        if o.responder != response.from {
            return None;
        }
        p.remove(&response.to, response.id)
    }

    fn take_request(&self, requester: &Address, id: u64) {
        self.pending.lock().unwrap().remove(requester, id);
    }

    fn restore(&self, requester: Address, id: u64, o: Outstanding) {
        self.pending.lock().unwrap().add(requester, id, o);
    }

    fn forget_requester(&self, requester: &Address) {
        let mut p = self.pending.lock().unwrap();
        let Pending { by_requester, by_deadline, .. } = &mut *p;
        for o in by_requester.remove(requester).into_iter().flat_map(HashMap::into_values) {
            by_deadline.remove(&(o.deadline, o.seq));
        }
    }

    /// Forgets every pending request, answering none (the runtime stops).
    /// The maps are dropped after the lock is released.
    fn forget_all(&self) {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap());
        drop(taken);
    }

    fn count(&self) -> usize {
        self.pending.lock().unwrap().by_deadline.len()
    }

    fn count_of(&self, requester: &Address) -> usize {
        self.pending.lock().unwrap().by_requester.get(requester).map_or(0, HashMap::len)
    }

    /// Answers 408 for each request whose deadline passes, until the bus is
    /// gone.
    fn run(&self, bus: Weak<BusInner>) {
        let mut p = self.pending.lock().unwrap();
        while !self.stopped.load(Ordering::Acquire) {
            let now = Instant::now();
            let mut expired = Vec::new();
            while let Some(entry) = p.by_deadline.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let (requester, id) = entry.remove();
                if let Some(o) = p.by_requester.get_mut(&requester).and_then(|r| r.remove(&id)) {
                    if p.by_requester.get(&requester).is_some_and(HashMap::is_empty) {
                        p.by_requester.remove(&requester);
                    }
                    expired.push(((requester, id), o));
                }
            }
            if !expired.is_empty() {
                drop(p);
                let Some(inner) = bus.upgrade() else { return };
                let bus = Bus { inner };
                for ((requester, id), o) in expired {
                    let description = format!("no response from {} within {} ms", o.responder, o.timeout.as_millis());
                    let max = bus.inner.config.max_message_bytes.saturating_sub(requester.as_str().len() + o.responder.as_str().len() + description.len());
                    let value = o.request.to_json(id, &requester, &o.responder, max);
                    let mut answer = Message::response(id, o.responder, requester, code::TIMEOUT);
                    answer.body.description = Some(description);
                    answer.body.value = Some(value);
                    bus.deliver_answer(answer);
                }
                p = self.pending.lock().unwrap();
                continue;
            }
            let wait = p.by_deadline.first_key_value().map_or(Duration::from_secs(3600), |((d, _), _)| *d - now);
            p = self.wake.wait_timeout(p, wait).unwrap().0;
        }
    }
}

impl Drop for BusInner {
    fn drop(&mut self) {
        self.timer.stopped.store(true, Ordering::Release);
        self.timer.wake.notify_all();
    }
}
