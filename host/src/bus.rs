//! The message bus: exact-address routing, the three policy enforcement
//! points, request/response correlation and the host's own answers
//! (403, 404, 408, 503).
//!
//! One path for every message, whatever its type:
//! route lookup (404) → identity (assertion attached on leaving the domain,
//! validated on arriving: 401) → sender PEP (outgoing) → bus-access PEP →
//! receiver PEP (incoming) → correlation → the receiver, a [`Destination`]
//! (a hyperty's bounded inbox, an endpoint, a data object, a protostub...).
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
//!
//! Per message, the bus hashes one address (the route lookup) and, when
//! the route keeps the decision for the same inputs under the policies'
//! current version ([`decisions`]), asks no decision point and looks up no
//! counter. [`Bus::send_each`] sends one message to many recipients (a data
//! object's delta) with the identity step done once per receiving domain.
//!
//! Layering: the bus imports only `address`, `message` and `policy`; the
//! identity step is an [`IdentityPoint`] it is given. Every kind of receiver implements [`Destination`] (and a
//! protostub, which carries a whole remote domain, [`Carrier`]) in its own
//! module and registers itself; the bus calls it through one virtual call,
//! never knowing what it is.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::address::Address;
use crate::message::{Message, MessageType, Text, code};
use crate::metrics::Metrics;
use crate::policy::{Decision, Descriptor, EnforcementPoint, Parties, PolicyDecisionPoint};

mod decisions;
mod inbound;
use decisions::Decisions;
use inbound::InboundRequests;

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

/// Why a destination did not take a message; the message comes back (no
/// copy was made to keep it), for the bus to answer it.
pub(crate) enum Refused {
    /// Its bounded queue is full: back-pressure, [`SendError::InboxFull`]
    /// to the sender.
    Full(Message),
    /// It has stopped: answered 503 "`<to>` has stopped".
    Closed(Message),
    /// It cannot take it, for the reason given in words (a protostub's
    /// full queue): answered 503 with that reason.
    Queue(Message, String),
}

/// Where a message goes, as far as identity is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Crossing {
    /// From here (a hyperty or an endpoint) to a route here.
    Here,
    /// From here out through a carrier (a protostub), validated by the
    /// runtime that receives it.
    Leaving,
    /// In through a carrier, to a route here.
    Arriving,
}

/// The identity step of the path, between the route lookup and the
/// policies (which read its result): who the sender acts for, set in the
/// message's `identity` (and `assertion`, for a message leaving or
/// arriving) by whoever implements it (`identity::Identities`, with the IdP
/// proxies), as the policy decisions come from a [`PolicyDecisionPoint`].
pub(crate) trait IdentityPoint: Send + Sync {
    /// Sets `message`'s identity for `crossing`; `sender` describes the
    /// sending hyperty (`None` for an endpoint or what came through a
    /// carrier). Else the code (401: a missing or invalid assertion; 500:
    /// none can be made) and the reason the message is answered with.
    /// What it sets, or refuses, depends only on the message's `from` and
    /// assertion, the domain and scheme of its `to`, `sender` and
    /// `crossing` ([`Bus::send_each`] establishes it once for the
    /// recipients they share).
    fn establish(&self, message: &mut Message, sender: Option<&Descriptor>, crossing: Crossing) -> Result<(), (u16, String)>;
}

/// What the bus delivers to, registered at an address with
/// [`Bus::add_route`] (a hyperty in its sandbox, an embedder's endpoint, a
/// data object, a protostub's status address, a host service reading a
/// channel) or for a whole remote domain with [`Bus::add_carrier`] (a
/// protostub, see [`Carrier`]). The bus knows no kind of destination: a
/// new kind implements this trait, and the bus is not touched.
///
/// The bus calls it holding no lock, once the message passed the three
/// enforcement points and correlation, so a destination may call back into
/// the bus (answer, send) synchronously.
pub(crate) trait Destination: Send + Sync {
    /// Takes `message` without blocking, or hands it back [`Refused`].
    /// `bus` is for destinations that answer by themselves; `wait`, for a
    /// request, how long its sender waits for the response (a carrier tells
    /// the far runtime).
    #[allow(clippy::result_large_err)]
    fn deliver(&self, message: Message, bus: &Bus, wait: Option<Duration>) -> Result<(), Refused>;

    /// What the policies know of the receiver (a hyperty's descriptor;
    /// `None`, the default, for everything else).
    fn descriptor(&self) -> Option<&Arc<Descriptor>> {
        None
    }

    /// Whether `message`, which came in through a carrier (from another
    /// runtime), may reach it; else the code and the reason it is answered
    /// with. Default: it may.
    fn admit_remote(&self, _message: &Message) -> Result<(), (u16, String)> {
        Ok(())
    }

    /// Whether the carrier of its address's domain listens for it on the
    /// domain's node (the default); false for a destination that takes
    /// messages from this runtime only.
    fn listened_for(&self) -> bool {
        true
    }

    /// Whether messages to its children, `<address>/children/<name>` with
    /// no route of their own ([`Address::child`]), come to it (a data
    /// object's do). Default: no.
    fn has_children(&self) -> bool {
        false
    }
}

/// A destination that carries a whole remote domain: every address of
/// [`Carrier::domain`] with no route here goes to it (reTHINK's protostub).
/// What comes back from that domain enters through [`Bus::send_inbound`].
pub(crate) trait Carrier: Destination {
    /// The remote domain it carries messages to.
    fn domain(&self) -> &str;

    /// `address`, of its domain, is now routed here and [listened
    /// for](Destination::listened_for): messages for it may come back.
    fn listen(&self, address: &Address);

    /// `address`, of any domain, is no longer routed here.
    fn unrouted(&self, address: &Address);

    /// It is removed from the bus and never called again.
    fn stop(&self);
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

/// A destination as the bus holds it: what it delivers to, and the
/// decisions kept for messages to it (for a carrier, which takes a whole
/// domain's addresses, kept per receiver address like any input; see
/// [`decisions`]).
struct Route {
    destination: Arc<dyn Destination>,
    decisions: Decisions,
}

impl Route {
    fn new(destination: Arc<dyn Destination>) -> Arc<Route> {
        Arc::new(Route { destination, decisions: Decisions::default() })
    }
}

/// A carrier and its route (the same carrier, as a destination).
struct Carried {
    carrier: Arc<dyn Carrier>,
    route: Arc<Route>,
}

/// The identity established once for a run of [`Bus::send_each`]'s
/// recipients sharing a receiving domain, scheme and crossing: the message
/// as it came out of the identity step, or its refusal.
struct Group {
    domain: String,
    scheme: String,
    remote: bool,
    established: Result<Message, (u16, String)>,
}

struct BusInner {
    routes: RwLock<HashMap<Address, Arc<Route>>>,
    /// Carriers (protostubs) by the remote domain they carry messages to,
    /// and each one's route (the same carrier, as a destination).
    carriers: RwLock<HashMap<String, Carried>>,
    policy: Arc<dyn PolicyDecisionPoint>,
    identities: Arc<dyn IdentityPoint>,
    metrics: Arc<Metrics>,
    config: BusConfig,
    timer: Arc<Timer>,
    /// Requests that came in through stubs, which responses leaving through
    /// a stub must answer.
    inbound: InboundRequests,
}

impl Bus {
    /// `metrics` counts what passes (see [`crate::metrics`]).
    pub fn new(config: BusConfig, policy: Arc<dyn PolicyDecisionPoint>, identities: Arc<dyn IdentityPoint>, metrics: Arc<Metrics>) -> Bus {
        let timer = Arc::new(Timer::default());
        let inner = Arc::new(BusInner {
            routes: RwLock::default(),
            carriers: RwLock::default(),
            policy,
            identities,
            metrics,
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

    /// Routes `address` to `destination`; false if the address is already
    /// routed. The carrier of the address's domain, if any, listens for it
    /// (when the destination is [listened for](Destination::listened_for)).
    pub fn add_route(&self, address: Address, destination: Arc<dyn Destination>) -> bool {
        let mut routes = self.inner.routes.write().unwrap();
        if routes.contains_key(&address) {
            return false;
        }
        if destination.listened_for()
            && let Some(carried) = self.inner.carriers.read().unwrap().get(address.domain())
        {
            carried.carrier.listen(&address);
        }
        routes.insert(address, Route::new(destination));
        true
    }

    /// Routes `address`, already routed, to `destination` instead, in one
    /// step: no message meets a missing route, its pending requests stay
    /// pending and carriers keep listening (a live update); false if it was
    /// not routed.
    pub fn replace_route(&self, address: &Address, destination: Arc<dyn Destination>) -> bool {
        match self.inner.routes.write().unwrap().get_mut(address) {
            Some(route) => {
                // A new route: decisions kept for the old receiver's
                // descriptor go with it.
                *route = Route::new(destination);
                true
            }
            None => false,
        }
    }

    /// Removes a route and forgets the requests it was waiting on; every
    /// carrier is told.
    pub fn remove_route(&self, address: &Address) {
        self.inner.routes.write().unwrap().remove(address);
        for carried in self.inner.carriers.read().unwrap().values() {
            carried.carrier.unrouted(address);
        }
        self.inner.timer.forget_requester(address);
    }

    /// Adds the carrier of `carrier.domain()`, which then listens for every
    /// address of its domain routed here; false if the domain has one.
    pub fn add_carrier(&self, carrier: Arc<dyn Carrier>) -> bool {
        let routes = self.inner.routes.read().unwrap();
        let mut carriers = self.inner.carriers.write().unwrap();
        if carriers.contains_key(carrier.domain()) {
            return false;
        }
        for (address, _) in routes.iter().filter(|(a, r)| a.domain() == carrier.domain() && r.destination.listened_for()) {
            carrier.listen(address);
        }
        let route = Route::new(carrier.clone());
        carriers.insert(carrier.domain().to_owned(), Carried { carrier, route });
        true
    }

    /// Removes the carrier of `domain`, and stops it.
    pub fn remove_carrier(&self, domain: &str) {
        let removed = self.inner.carriers.write().unwrap().remove(domain);
        if let Some(carried) = removed {
            carried.carrier.stop();
        }
    }

    /// Whether `domain` has a carrier.
    pub fn carries(&self, domain: &str) -> bool {
        self.inner.carriers.read().unwrap().contains_key(domain)
    }

    /// The domains that have a carrier.
    pub fn carried_domains(&self) -> Vec<String> {
        self.inner.carriers.read().unwrap().keys().cloned().collect()
    }

    /// Whether `address` is routed in this runtime (a hyperty, an endpoint,
    /// a data object, a stub's status address, a served registry).
    pub fn is_routed(&self, address: &Address) -> bool {
        self.inner.routes.read().unwrap().contains_key(address)
    }

    /// Whether a message to `to` has somewhere to go: a route here (its
    /// own, or its object's for a child) or its domain's carrier. Else
    /// [`Bus::send`] would answer it 404.
    pub fn reaches(&self, to: &Address) -> bool {
        self.resolve(to).is_some()
    }

    /// A handle that does not keep the bus alive (for threads the bus's
    /// routes lead to).
    pub fn downgrade(&self) -> WeakBus {
        WeakBus(Arc::downgrade(&self.inner))
    }

    /// What the runtime knows of the hyperty at `address`, if one is here.
    pub fn descriptor_of(&self, address: &Address) -> Option<Arc<Descriptor>> {
        self.inner.routes.read().unwrap().get(address).and_then(|r| r.destination.descriptor().cloned())
    }

    /// Where messages for `to` go, and whether that is a carrier (`to` is
    /// remote): its own route; for a child (`<url>/children/<name>`, no
    /// route of its own) the route of `<url>` if that [has
    /// children](Destination::has_children); else its domain's carrier.
    /// The route is cloned out: no lock is held while it is called.
    fn resolve(&self, to: &Address) -> Option<(Arc<Route>, bool)> {
        let routes = self.inner.routes.read().unwrap();
        if let Some(route) = routes.get(to) {
            return Some((route.clone(), false));
        }
        if let Some(parent) = to.child().and_then(|(url, _)| routes.get(&url)).filter(|r| r.destination.has_children()) {
            return Some((parent.clone(), false));
        }
        drop(routes);
        let carrier = self.inner.carriers.read().unwrap().get(to.domain()).map(|carried| carried.route.clone());
        carrier.map(|route| (route, true))
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
    /// hyperty, endpoint or data object or a child of one, the runtime's
    /// own address): that
    /// is refused as [`SendError::SpoofedFrom`]. Its identity assertion is
    /// validated, and required where the receiving domain requires identity,
    /// even when it claims the receiver's own domain. It is delivered only
    /// to what is routed here of `stub_domain` (a stub carries its own
    /// domain's addresses; 404 for any other): never out through a stub (no relaying), nor
    /// to a stub's status address (local subscribers only), nor as a write
    /// to a data object (403: its reporter is here). A request is
    /// recorded, so that a response may leave through a stub to answer it.
    pub fn send_inbound(&self, message: Message, stub_domain: &str, wait: Option<Duration>) -> Result<(), SendError> {
        // Routed here: its own route, or a data object's for its child.
        if self.resolve(&message.from).is_some_and(|(_, remote)| !remote) {
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
        self.check_size(&message)?;
        if message.kind == MessageType::Response && timeout.is_some() {
            return Err(SendError::Malformed("a response cannot be sent as a request".into()));
        }
        let Some((route, remote)) = self.resolve(&message.to) else {
            let why = format!("no hyperty or endpoint at {}", message.to);
            self.answer(&message, code::NOT_FOUND, why);
            return Ok(());
        };
        if let Some(Inbound { stub: origin, .. }) = came_through {
            // A carrier takes its own domain's addresses (it listens for
            // those), and relays nothing: what came from it goes to what is
            // here of that domain. Answered as a missing address, so that a
            // node cannot probe what else is routed here.
            let admitted = if message.to.domain() != origin {
                Err((code::NOT_FOUND, format!("{} is not an address of {origin}, and it came through the protostub of {origin}", message.to)))
            } else if remote {
                Err((code::NOT_FOUND, format!("no hyperty or endpoint at {} here, and it came through the protostub of {origin}", message.to)))
            } else {
                route.destination.admit_remote(&message)
            };
            if let Err((code, why)) = admitted {
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
            self.refuse_identity(&message, remote, code, &why);
            return Ok(());
        }
        self.pass(message, &route, remote, timeout, sender, came_through)
    }

    /// Refuses `message` for its identity (`code`: 401, 500): answered,
    /// or, for a response, its request closed (see [`Bus::refuse_response`]).
    fn refuse_identity(&self, message: &Message, remote: bool, code: u16, why: &str) {
        tracing::info!(id = message.id, from = %message.from, to = %message.to, code, "{why}");
        if message.kind == MessageType::Response {
            self.refuse_response(message, remote, code, why);
        } else {
            self.deliver_answer(message.answer(code, why.to_owned()));
        }
    }

    /// [`SendError::TooLarge`] past the bus's message size limit.
    fn check_size(&self, message: &Message) -> Result<(), SendError> {
        let limit = self.inner.config.max_message_bytes;
        if message.size() > limit {
            return Err(SendError::TooLarge(format!("{} bytes, the limit is {limit}", message.size())));
        }
        Ok(())
    }

    /// The rest of the path of `message`, whose route is found and whose
    /// identity is established: the three enforcement points (kept
    /// decisions beside the route when their inputs and the policies'
    /// version are the same), correlation, delivery.
    fn pass(
        &self,
        message: Message,
        route: &Route,
        remote: bool,
        timeout: Option<Duration>,
        sender: Option<&Descriptor>,
        came_through: Option<Inbound<'_>>,
    ) -> Result<(), SendError> {
        let inner = &*self.inner;
        let parties = Parties { sender, target: route.destination.descriptor().map(|d| &**d) };
        let points = [
            (EnforcementPoint::Outgoing, message.from.domain()),
            (EnforcementPoint::BusAccess, inner.config.runtime_domain.as_str()),
            (EnforcementPoint::Incoming, message.to.domain()),
        ];
        let (decided, counter) = route.decisions.decide(&*inner.policy, &inner.metrics, &points, &message, parties);
        if let Err((i, Decision::Deny { policies, reason })) = decided {
            let (point, domain) = points[i];
            inner.metrics.policy_denial(i);
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
        match route.destination.deliver(message, self, timeout) {
            Ok(()) => {
                if let Some(outstanding) = &correlation {
                    inner.metrics.request_finished(outstanding.sent.elapsed());
                }
                counter.inc();
                Ok(())
            }
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

    /// Sends the notification `message` to each of `recipients` (a data
    /// object's delta to its subscribers), its `to` set to the recipient
    /// and its `id` to `first_id`, `first_id + 1`, ...: each copy passes
    /// the path [`Bus::send`] would take it on (route, identity, the three
    /// enforcement points, delivery into the recipient's own bounded
    /// inbox), in the order given. What does not depend on the recipient
    /// is done once per receiving domain (and scheme, and whether its
    /// route is a carrier): the identity step, which reads only the
    /// message's `from` and assertion, its receiver's domain and scheme,
    /// the sender and the crossing (see [`IdentityPoint`]); the message's
    /// text is shared once ([`Message::share`]) and each copy counts it.
    /// Decisions come from beside each recipient's route, as for any message. Returns the refusals at
    /// the import, each naming its recipient (a full inbox,
    /// [`SendError::InboxFull`], is back-pressure: that recipient misses
    /// the message); everything else is answered to `from` as
    /// [`Bus::send`] answers it.
    pub fn send_each(
        &self,
        mut message: Message,
        recipients: impl IntoIterator<Item = Address>,
        first_id: u64,
        sender: Option<&Descriptor>,
    ) -> Vec<SendError> {
        if message.kind == MessageType::Response {
            // A response answers one request: never sent to many.
            return vec![SendError::Malformed("a response goes to its requester alone".into())];
        }
        tracing::debug!(id = first_id, kind = message.kind.as_str(), from = %message.from, "message to each");
        // Shared once: each recipient's copy then costs a count, not a copy.
        message.share();
        let mut refused = Vec::new();
        // The identity established for the current group of recipients,
        // (domain, scheme, remote), and the message as it came out of it.
        let mut group: Option<Group> = None;
        for (n, to) in recipients.into_iter().enumerate() {
            let id = first_id.wrapping_add(n as u64);
            let Some((route, remote)) = self.resolve(&to) else {
                let m = copy(&message, id, to);
                self.answer(&m, code::NOT_FOUND, format!("no hyperty or endpoint at {}", m.to));
                continue;
            };
            let key = (to.domain(), to.scheme(), remote);
            let established = match &mut group {
                Some(g) if (g.domain.as_str(), g.scheme.as_str(), g.remote) == key => &g.established,
                slot => {
                    let mut m = copy(&message, id, to.clone());
                    let crossing = if remote { Crossing::Leaving } else { Crossing::Here };
                    let result = self.inner.identities.establish(&mut m, sender, crossing).map(|()| {
                        m.share(); // what the identity step set
                        m
                    });
                    let g = Group { domain: key.0.to_owned(), scheme: key.1.to_owned(), remote, established: result };
                    &slot.insert(g).established
                }
            };
            let m = match established {
                Ok(established) => copy(established, id, to),
                Err((code, why)) => {
                    self.refuse_identity(&copy(&message, id, to), remote, *code, why);
                    continue;
                }
            };
            if let Err(e) = self.check_size(&m) {
                refused.push(SendError::TooLarge(format!("to {}: {e}", m.to)));
                continue;
            }
            if let Err(e) = self.pass(m, &route, remote, None, sender, None) {
                refused.push(e);
            }
        }
        refused
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
        let waiting = if remote { self.inner.inbound.close(response) } else { self.closed(self.inner.timer.close(response)) };
        if waiting {
            let mut refusal = Message::response(response.id, response.from.clone(), response.to.clone(), code);
            refusal.body.description = Some(format!("the response was refused: {why}").into());
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
        self.closed(self.inner.timer.close(&answer));
        self.deliver_answer(answer);
    }

    /// A request the host answered in its responder's place: its duration
    /// is counted; whether there was one.
    fn closed(&self, outstanding: Option<Outstanding>) -> bool {
        outstanding.inspect(|o| self.inner.metrics.request_finished(o.sent.elapsed())).is_some()
    }

    /// Delivers a response the host made itself straight to its `to`.
    pub fn deliver_answer(&self, answer: Message) {
        self.inner.metrics.host_answer(answer.to.domain(), answer.body.code.unwrap_or_default());
        let result = match self.resolve(&answer.to) {
            Some((route, _)) => route.destination.deliver(answer, self, None),
            None => Err(Refused::Closed(answer)),
        };
        if let Err(Refused::Full(m) | Refused::Closed(m) | Refused::Queue(m, _)) = result {
            tracing::warn!(id = m.id, to = %m.to, code = m.body.code, "cannot deliver the host's answer: {}",
                m.body.description.as_deref().unwrap_or(""));
        }
    }
}

/// `message` with `id` and `to` in place of its own (one copy of each
/// other field).
fn copy(message: &Message, id: u64, to: Address) -> Message {
    Message {
        id,
        kind: message.kind,
        from: message.from.clone(),
        to,
        body: message.body.clone(),
        identity: message.identity.clone(),
        assertion: message.assertion.clone(),
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
    /// When the request was sent.
    sent: Instant,
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
    resource: Option<Text>,
    value: Result<Option<Text>, usize>,
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
        let text = |value: Result<&Option<Text>, usize>| {
            let mut body = serde_json::Map::new();
            body.insert("resource".into(), self.resource.as_deref().into());
            match value {
                Ok(v) => body.insert("value".into(), v.as_deref().into()),
                Err(n) => body.insert("value-bytes".into(), n.into()),
            };
            serde_json::json!({ "id": id, "type": self.kind.as_str(), "from": requester.as_str(), "to": responder.as_str(), "body": body })
                .to_string()
        };
        let full = text(self.value.as_ref().map_err(|n| *n));
        if full.len() <= max {
            return full;
        }
        text(Err(self.value.as_ref().map_or_else(|n| *n, |v| v.as_deref().map_or(0, str::len))))
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
    /// When the timer thread wakes next by itself (at the latest
    /// [`TIMER_TICK`] after it went to sleep): a request due later needs no
    /// wake-up, so one-at-a-time requests do not each wake the timer.
    planned: Option<Instant>,
}

/// How long the bus timer sleeps at most, with nothing due before: a
/// request whose deadline is further away than the timer's next wake-up
/// does not wake it (one wake-up a second idle, instead of one per request
/// sent while nothing else is pending).
const TIMER_TICK: Duration = Duration::from_secs(1);

impl Pending {
    /// Adds a pending request; true if it is due before the timer's
    /// planned wake-up (the caller wakes the timer, with the lock dropped).
    #[must_use]
    fn add(&mut self, requester: Address, id: u64, o: Outstanding) -> bool {
        let sooner = self.planned.is_none_or(|planned| o.deadline < planned);
        self.by_deadline.insert((o.deadline, o.seq), (requester.clone(), id));
        self.by_requester.entry(requester).or_default().insert(id, o);
        sooner
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
        let kept = Kept::of(request);
        let sooner = p.add(request.from.clone(), request.id, Outstanding { responder: request.to.clone(), sent: now, deadline, seq, timeout, request: kept, provisional: 0 });
        drop(p);
        if sooner {
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
        // The timer may have planned past its deadline meanwhile.
        let sooner = self.pending.lock().unwrap().add(requester, id, o);
        if sooner {
            self.wake.notify_one();
        }
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
                    bus.inner.metrics.request_finished(o.sent.elapsed());
                    let description = format!("no response from {} within {} ms", o.responder, o.timeout.as_millis());
                    let max = bus.inner.config.max_message_bytes.saturating_sub(requester.as_str().len() + o.responder.as_str().len() + description.len());
                    let value = o.request.to_json(id, &requester, &o.responder, max);
                    let mut answer = Message::response(id, o.responder, requester, code::TIMEOUT);
                    answer.body.description = Some(description.into());
                    answer.body.value = Some(value.into());
                    bus.deliver_answer(answer);
                }
                p = self.pending.lock().unwrap();
                continue;
            }
            let wait = p.by_deadline.first_key_value().map_or(TIMER_TICK, |((d, _), _)| (*d - now).min(TIMER_TICK));
            p.planned = Some(now + wait);
            p = self.wake.wait_timeout(p, wait).unwrap().0;
            p.planned = None;
        }
    }
}

impl Drop for BusInner {
    fn drop(&mut self) {
        self.timer.stopped.store(true, Ordering::Release);
        // Taken and released so that the timer thread is either before its
        // check of `stopped` or waiting: the notification is not lost.
        drop(self.timer.pending.lock());
        self.timer.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::message::Body;
    use crate::policy::AllowAll;

    /// A bus allowing everything, with an endpoint at
    /// `hyperty://alice.example/asker` (the senders' address) and what
    /// reaches it.
    fn bus_and_asker() -> (Bus, flume::Receiver<Message>) {
        let config = BusConfig { runtime_domain: "runtime.example".into(), request_timeout: Duration::from_secs(60), max_message_bytes: 64 * 1024 };
        let bus = Bus::new(config, Arc::new(AllowAll), Arc::new(Anonymous), Arc::default());
        let asker = endpoint(&bus, "hyperty://alice.example/asker");
        (bus, asker)
    }

    /// No identity: nobody is asserted, nothing is refused.
    struct Anonymous;

    impl IdentityPoint for Anonymous {
        fn establish(&self, message: &mut Message, _sender: Option<&Descriptor>, _crossing: Crossing) -> Result<(), (u16, String)> {
            message.identity = None;
            Ok(())
        }
    }

    fn address(text: &str) -> Address {
        Address::parse(text).unwrap()
    }

    /// How a [`Probe`] refuses what it is given.
    type Refusal = fn(Message) -> Refused;

    /// A kind of destination the bus has never heard of: it records what it
    /// is given, refuses as told, and may answer on the bus from inside
    /// `deliver` (as a data object or a stub's status address does).
    struct Probe {
        got: Mutex<Vec<(Message, Option<Duration>)>>,
        refuse: Mutex<Option<Refusal>>,
        answer_inside: bool,
        children: bool,
        remote: Result<(), (u16, String)>,
        listened: bool,
    }

    impl Probe {
        fn new() -> Probe {
            Probe { got: Mutex::default(), refuse: Mutex::default(), answer_inside: false, children: false, remote: Ok(()), listened: true }
        }

        fn got(&self) -> Vec<(Message, Option<Duration>)> {
            self.got.lock().unwrap().clone()
        }
    }

    impl Destination for Probe {
        fn deliver(&self, message: Message, bus: &Bus, wait: Option<Duration>) -> Result<(), Refused> {
            if let Some(refuse) = *self.refuse.lock().unwrap() {
                return Err(refuse(message));
            }
            self.got.lock().unwrap().push((message.clone(), wait));
            if self.answer_inside && message.kind != MessageType::Response {
                // Back into the bus, on the sender's thread: routes are
                // changed and a response is sent while the bus delivers.
                bus.add_route(address("hyperty://bob.example/added-inside"), Arc::new(Probe::new()));
                bus.remove_route(&address("hyperty://bob.example/added-inside"));
                bus.send(Message::response(message.id, message.to.clone(), message.from.clone(), code::OK), None, None).unwrap();
            }
            Ok(())
        }

        fn admit_remote(&self, _message: &Message) -> Result<(), (u16, String)> {
            self.remote.clone()
        }

        fn listened_for(&self) -> bool {
            self.listened
        }

        fn has_children(&self) -> bool {
            self.children
        }
    }

    /// A carrier of a remote domain the bus has never heard of.
    struct FarAway {
        domain: String,
        probe: Probe,
        listening: Mutex<Vec<Address>>,
        unrouted: Mutex<Vec<Address>>,
        stopped: AtomicBool,
    }

    impl FarAway {
        fn new(domain: &str) -> FarAway {
            FarAway { domain: domain.into(), probe: Probe::new(), listening: Mutex::default(), unrouted: Mutex::default(), stopped: AtomicBool::new(false) }
        }
    }

    impl Destination for FarAway {
        fn deliver(&self, message: Message, bus: &Bus, wait: Option<Duration>) -> Result<(), Refused> {
            self.probe.deliver(message, bus, wait)
        }
    }

    impl Carrier for FarAway {
        fn domain(&self) -> &str {
            &self.domain
        }
        fn listen(&self, address: &Address) {
            self.listening.lock().unwrap().push(address.clone());
        }
        fn unrouted(&self, address: &Address) {
            self.unrouted.lock().unwrap().push(address.clone());
        }
        fn stop(&self) {
            self.stopped.store(true, Ordering::Release);
        }
    }

    fn endpoint(bus: &Bus, at: &str) -> flume::Receiver<Message> {
        let (tx, rx) = flume::bounded(16);
        assert!(bus.add_route(address(at), Arc::new(tx)));
        rx
    }

    fn request(id: u64, from: &str, to: &str) -> Message {
        Message::new(id, MessageType::Read, address(from), address(to), None)
    }

    #[test]
    fn a_new_kind_of_destination_is_delivered_to_and_may_answer_from_inside_deliver() {
        let (bus, asker) = bus_and_asker();
        let probe = Arc::new(Probe { answer_inside: true, ..Probe::new() });
        assert!(bus.add_route(address("hyperty://bob.example/probe"), probe.clone()));
        assert!(!bus.add_route(address("hyperty://bob.example/probe"), Arc::new(Probe::new())), "an address is routed once");
        // On another thread, so that a lock held across `deliver` shows as a
        // missing answer rather than a hung test binary.
        let (done, finished) = mpsc::channel();
        let sender = bus.clone();
        std::thread::spawn(move || {
            let sent = sender.send(request(1, "hyperty://alice.example/asker", "hyperty://bob.example/probe"), Some(Duration::from_secs(60)), None);
            let _ = done.send(sent);
        });
        finished.recv_timeout(Duration::from_secs(60)).expect("the bus held a lock while calling the destination").unwrap();
        let got = probe.got();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.id, got[0].1), (1, Some(Duration::from_secs(60))), "the request and its sender's wait");
        let answer = asker.try_recv().expect("the answer sent from inside deliver");
        assert_eq!((answer.kind, answer.id, answer.body.code), (MessageType::Response, 1, Some(code::OK)));
        assert_eq!(bus.pending_requests(), 0, "the response closed the request");
        assert!(!bus.is_routed(&address("hyperty://bob.example/added-inside")));
    }

    #[test]
    fn refusals_come_back_as_back_pressure_or_503_and_leave_nothing_pending() {
        let (bus, asker) = bus_and_asker();
        let probe = Arc::new(Probe::new());
        bus.add_route(address("hyperty://bob.example/probe"), probe.clone());
        let to = "hyperty://bob.example/probe";
        let timeout = Some(Duration::from_secs(60));

        *probe.refuse.lock().unwrap() = Some(Refused::Full);
        let sent = bus.send(request(1, "hyperty://alice.example/asker", to), timeout, None);
        assert_eq!(sent, Err(SendError::InboxFull(to.into())), "full is back-pressure to the sender");
        assert_eq!(bus.pending_requests(), 0);
        assert!(asker.try_recv().is_err(), "back-pressure is not also answered");

        *probe.refuse.lock().unwrap() = Some(Refused::Closed);
        bus.send(request(2, "hyperty://alice.example/asker", to), timeout, None).unwrap();
        let answer = asker.try_recv().unwrap();
        assert_eq!((answer.id, answer.body.code), (2, Some(code::UNAVAILABLE)));
        assert_eq!(answer.body.description.as_deref(), Some(&*format!("{to} has stopped")));
        assert_eq!(bus.pending_requests(), 0);

        *probe.refuse.lock().unwrap() = Some(|m| Refused::Queue(m, "its queue is full (5 messages)".into()));
        bus.send(request(3, "hyperty://alice.example/asker", to), timeout, None).unwrap();
        let answer = asker.try_recv().unwrap();
        assert_eq!((answer.id, answer.body.code, answer.body.description.as_deref()), (3, Some(code::UNAVAILABLE), Some("its queue is full (5 messages)")));
        assert_eq!(bus.pending_requests(), 0);

        // The same request id may go again: nothing of it was kept.
        *probe.refuse.lock().unwrap() = None;
        bus.send(request(1, "hyperty://alice.example/asker", to), timeout, None).unwrap();
        assert_eq!(bus.pending_requests(), 1);
        assert_eq!(probe.got().len(), 1);
    }

    #[test]
    fn a_carrier_takes_its_domain_listens_for_what_is_routed_here_and_relays_nothing() {
        let (bus, asker) = bus_and_asker();
        let local = Arc::new(Probe::new());
        bus.add_route(address("hyperty://bob.example/here"), local.clone());
        let quiet = Arc::new(Probe { listened: false, remote: Err((code::FORBIDDEN, "this runtime only".into())), ..Probe::new() });
        bus.add_route(address("domain://status.bob.example"), quiet.clone());
        let far = Arc::new(FarAway::new("bob.example"));
        assert!(bus.add_carrier(far.clone()));
        assert!(bus.carries("bob.example") && !bus.carries("carol.example"));
        assert_eq!(*far.listening.lock().unwrap(), [address("hyperty://bob.example/here")], "listens for what is routed here, and listened for");
        endpoint(&bus, "hyperty://bob.example/later");
        bus.add_route(address("domain://status2.bob.example"), Arc::new(Probe { listened: false, ..Probe::new() }));
        let listening = far.listening.lock().unwrap().clone();
        assert_eq!(listening, [address("hyperty://bob.example/here"), address("hyperty://bob.example/later")], "and for what is routed later");

        // Out: an address of its domain with no route here, with the wait.
        bus.send(request(1, "hyperty://alice.example/asker", "hyperty://bob.example/there"), Some(Duration::from_secs(7)), None).unwrap();
        let got = far.probe.got();
        assert_eq!((got.len(), got[0].1), (1, Some(Duration::from_secs(7))));
        assert!(local.got().is_empty());

        // In: to what is here only; never out again, nor where the
        // destination refuses what comes from afar.
        let inbound = |id, to: &str| {
            bus.send_inbound(request(id, "hyperty://bob.example/remote", to), "bob.example", Some(Duration::from_secs(60))).unwrap();
        };
        inbound(2, "hyperty://bob.example/here");
        assert_eq!(local.got().len(), 1);
        inbound(3, "hyperty://bob.example/elsewhere");
        inbound(4, "domain://status.bob.example");
        // Nor to what is here of another domain: the carrier takes bob.example's.
        inbound(5, "hyperty://alice.example/asker");
        assert_eq!(far.probe.got().len(), 4, "three answers went back out through the carrier, not the relayed request");
        let answers: Vec<(u64, Option<u16>)> = far.probe.got()[1..].iter().map(|(m, _)| (m.id, m.body.code)).collect();
        assert_eq!(answers, [(3, Some(code::NOT_FOUND)), (4, Some(code::FORBIDDEN)), (5, Some(code::NOT_FOUND))]);
        let why = far.probe.got()[3].0.body.description.clone().unwrap();
        assert_eq!(why, "hyperty://alice.example/asker is not an address of bob.example, and it came through the protostub of bob.example");
        assert!(quiet.got().is_empty());
        assert!(asker.try_recv().is_err());

        bus.remove_route(&address("hyperty://bob.example/here"));
        assert!(far.unrouted.lock().unwrap().contains(&address("hyperty://bob.example/here")));
        bus.remove_carrier("bob.example");
        assert!(far.stopped.load(Ordering::Acquire) && !bus.carries("bob.example"));
    }

    #[test]
    fn a_carrier_keeps_decisions_per_receiver_under_the_same_policy_version_only() {
        let config = BusConfig { runtime_domain: "runtime.example".into(), request_timeout: Duration::from_secs(60), max_message_bytes: 64 * 1024 };
        let policy = Arc::new(decisions::tests::Counting::default());
        let bus = Bus::new(config, policy.clone(), Arc::new(Anonymous), Arc::default());
        let _asker = endpoint(&bus, "hyperty://alice.example/asker");
        let far = Arc::new(FarAway::new("bob.example"));
        assert!(bus.add_carrier(far.clone()));
        // The points asked so far, after a notification to `to` (a path is three).
        let asked = |id, to: &str| {
            let message = Message::new(id, MessageType::Update, address("hyperty://alice.example/asker"), address(to), None);
            bus.send(message, None, None).unwrap();
            policy.asked.load(Ordering::Relaxed)
        };
        assert_eq!(asked(1, "hyperty://bob.example/x"), 3);
        assert_eq!(asked(2, "hyperty://bob.example/x"), 3, "kept beside the carrier's route");
        assert_eq!(asked(3, "hyperty://bob.example/y"), 6, "another receiver of the domain is another input");
        assert_eq!(asked(4, "hyperty://bob.example/y"), 6);
        policy.generation.fetch_add(1, Ordering::Relaxed);
        assert_eq!(asked(5, "hyperty://bob.example/x"), 9, "a new version decides again");
        assert_eq!(far.probe.got().len(), 5, "all carried");
    }

    #[test]
    fn send_each_gives_each_recipient_its_copy_and_answers_or_returns_what_each_refused() {
        let (bus, asker) = bus_and_asker();
        let (taker, full) = (Arc::new(Probe::new()), Arc::new(Probe::new()));
        *full.refuse.lock().unwrap() = Some(Refused::Full);
        bus.add_route(address("hyperty://bob.example/taker"), taker.clone());
        bus.add_route(address("hyperty://bob.example/full"), full.clone());
        let from = address("hyperty://alice.example/asker");
        let delta = Message::new(0, MessageType::Update, from.clone(), from.clone(), Some("{}".into()));
        let recipients = ["hyperty://bob.example/taker", "hyperty://bob.example/full", "hyperty://carol.example/none"].map(address).to_vec();
        let refused = bus.send_each(delta, recipients, 10, None);
        assert_eq!(refused, [SendError::InboxFull("hyperty://bob.example/full".into())], "back-pressure, to the caller");
        let got = taker.got();
        assert_eq!((got.len(), got[0].0.id, got[0].0.to.as_str(), got[0].0.body.value.as_deref()), (1, 10, "hyperty://bob.example/taker", Some("{}")));
        let answer = asker.try_recv().expect("the 404 of the recipient with no route");
        assert_eq!((answer.id, answer.body.code), (12, Some(code::NOT_FOUND)));
        assert!(asker.try_recv().is_err());
        let response = Message::response(1, from.clone(), from, code::OK);
        assert!(matches!(&bus.send_each(response, vec![address("hyperty://bob.example/taker")], 1, None)[..], [SendError::Malformed(_)]));
        assert_eq!(taker.got().len(), 1, "a response is never sent to many");
    }

    #[test]
    fn send_each_shares_one_body_among_its_copies() {
        let (bus, _asker) = bus_and_asker();
        // Two recipients in one domain (one identity step), one in another.
        let takers = [Arc::new(Probe::new()), Arc::new(Probe::new()), Arc::new(Probe::new())];
        let to = ["hyperty://bob.example/one", "hyperty://bob.example/two", "hyperty://carol.example/three"].map(address);
        for (t, a) in takers.iter().zip(&to) {
            bus.add_route(a.clone(), t.clone());
        }
        let from = address("hyperty://alice.example/asker");
        let mut delta = Message::new(0, MessageType::Update, from.clone(), from, Some("{\"n\":1}".into()));
        delta.body.resource = Some("comm://alice.example/room".into());
        assert!(bus.send_each(delta, to.to_vec(), 1, None).is_empty());
        let bodies = takers.map(|t| t.got().remove(0).0.body);
        let at = |b: &Body| (b.value.as_ref().unwrap().as_ptr(), b.resource.as_ref().unwrap().as_ptr());
        for body in &bodies {
            assert_eq!(body.value.as_deref(), Some("{\"n\":1}"));
            assert_eq!(at(body), at(&bodies[0]), "every recipient's value and resource the same buffers, shared, not copied");
        }
    }

    #[test]
    fn a_child_address_reaches_its_parent_only_when_the_parent_has_children() {
        let (bus, asker) = bus_and_asker();
        let object = Arc::new(Probe { children: true, ..Probe::new() });
        bus.add_route(address("comm://alice.example/room"), object.clone());
        let plain = Arc::new(Probe::new());
        bus.add_route(address("hyperty://alice.example/plain"), plain.clone());
        bus.send(request(1, "hyperty://alice.example/asker", "comm://alice.example/room/children/chat"), None, None).unwrap();
        assert_eq!(object.got().len(), 1);
        bus.send(request(2, "hyperty://alice.example/asker", "hyperty://alice.example/plain/children/chat"), None, None).unwrap();
        assert!(plain.got().is_empty());
        assert_eq!(asker.try_recv().unwrap().body.code, Some(code::NOT_FOUND));
    }
}
