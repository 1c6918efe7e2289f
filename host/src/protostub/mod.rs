//! Protostubs: the way out of (and back into) the runtime for messages to
//! other runtimes, one stub per remote domain, as reTHINK's "protocol on the
//! fly".
//!
//! A stub is a component (world `protostub`) configured by its bundle
//! entry (`[protostubs."<domain>"]`); the protocol to the domain's messaging
//! node lives in it, not here. The host gives it:
//!
//! - a **queue** ([`StubQueue`]) the bus puts the domain's outbound
//!   messages in, bounded (a full queue is answered 503 to the sender), in
//!   the host so it survives the stub's restarts. A message leaves it only
//!   when the stub says the far end took it; on a reconnection or a
//!   restart, what was in flight is offered again. A message the stub
//!   refuses for good (larger than its node takes: 413; a destination its
//!   node does not let it publish to: 403) leaves it, and its sender
//!   is answered at once ([`Stub::refuse`]);
//! - the **wire format**: an envelope (JSON) carrying the message, its
//!   identity assertion, the queue's origin id and a sequence number, which
//!   the receiving host uses to drop duplicates ([`Dedup`]);
//! - **the network** through WASI sockets, limited to exactly the
//!   endpoints its bundle entry names: any other address is refused and
//!   logged;
//! - its own store and thread, driven by calls to its `poll` export, the
//!   thread also driving its sockets ([`io`]); a trap drops the instance,
//!   which is started afresh with backoff.
//!
//! With `durable = true` on its entry the queue is also kept in the
//! runtime's database ([`outbox`]) until each message is acknowledged, the
//! envelopes' origin is stable across the runtime's restarts, the ids of
//! envelopes taken are kept too (dedup across restarts), and the stub's
//! config gets `"durable": "<id>"`, telling it to use its node's durable
//! delivery (the NATS stub: JetStream).
//!
//! A stub is started when the first message for its domain is queued, or
//! at deployment when its domain has hyperties here (it must listen for
//! them) or its entry says `preload` or `durable`. Every address routed here in the
//! stub's domain is listened for. Status changes (created, in-progress,
//! live, disconnected, failed) go into the registry (announced on the bus
//! like any registration change) and out as [`EventKind::StubStatus`]
//! events.

mod envelope;
mod glue;
mod io;
mod outbox;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

pub(crate) use glue::{StubPre, prepare};

use crate::address::Address;
use crate::bus::{Bus, Carrier, Destination, Refused};
use crate::events::{EventKind, Events};
use crate::message::{Message, MessageType, Text, code};
use crate::registry::{Registry, Status};
use crate::store::Store;

/// The protostub of a remote domain: on the bus, its domain's carrier
/// ([`Stub::carrier`]) and its status address ([`Stub::status_route`]).
pub(crate) struct Stub {
    pub domain: String,
    /// `domain://protostub.<domain>`: its registry entry and event address.
    pub address: Address,
    queue: Arc<StubQueue>,
    dedup: Mutex<Dedup>,
    /// A durable stub's envelopes given to a hyperty but not yet handled
    /// when `post` stopped waiting, by (origin, seq): a redelivery of one
    /// is `busy` until it is handled, then acknowledged.
    handling: Mutex<HashMap<(String, u64), crate::receipt::Handled>>,
    /// Until when the stub's `post` may wait for hyperties in the current
    /// `poll` ([`POLL_WAIT_BUDGET`] from its start).
    wait_until: Mutex<Instant>,
    start: Mutex<Option<Starter>>,
    /// A new component or settings for the running thread (live update).
    next: Mutex<Option<StubContext>>,
    stopped: AtomicBool,
    /// The last status reported, as JSON `{"status", "detail"}`.
    status: Mutex<Value>,
    /// Local addresses subscribed to status changes.
    watchers: Mutex<BTreeSet<Address>>,
    /// The rate of status notifications (events and updates to watchers),
    /// and whether the last status is still untold.
    told: Mutex<(crate::sandbox::limits::RateLimiter, bool)>,
    /// When a refused envelope was last logged, and how many were not since.
    refusals: Mutex<(Option<Instant>, u64)>,
}

/// Starts a stub's thread (once, when the stub is first needed).
pub(crate) type Starter = Box<dyn FnOnce(Arc<Stub>) + Send>;

/// Why the queue refused a message.
pub(crate) enum QueueError {
    /// It holds its capacity of messages.
    Full(usize),
    /// It holds [`MAX_QUEUE_BYTES`] of envelopes.
    Bytes(usize),
    /// A durable queue could not write the message to disk.
    Persist(String),
}

/// How long a durable stub's `post` waits for its hyperty to handle an
/// envelope before it answers `busy` (the node offers it again later).
const HANDLED_WAIT: Duration = Duration::from_secs(1);

/// Of a stub's `poll` (its deadline is [`POLL_DEADLINE`]), how long its
/// posts may wait for hyperties to handle what they posted, in all.
const POLL_WAIT_BUDGET: Duration = Duration::from_secs(4);

/// Envelopes of a durable stub given to hyperties and not yet handled when
/// `post` stopped waiting; past this many, new ones are `busy`.
const MAX_HANDLING: usize = 1024;

/// Envelope bytes a stub's queue holds at most (in memory, and a durable
/// one's on disk too); past that, senders are answered 503. Its count of
/// messages (`queue`) alone would let 1,000 messages of 1 MiB wait for a
/// node that is down.
pub(crate) const MAX_QUEUE_BYTES: usize = 64 << 20;

/// Takes out of `handling` the envelopes whose receipt fired (returned,
/// to be recorded) and those dropped unhandled (forgotten, to be taken
/// when offered again); keeps the rest. One atomic look at each receipt
/// (`try_recv`: a receipt that fired is taken even if its sender is gone;
/// `Disconnected` only if it never fired), as a hyperty's thread may fire
/// it at any moment. (Looking for fired receipts, then keeping the empty
/// ones in a second pass, lost a receipt that fired in between,
/// unrecorded: its redelivery was handled again.)
fn sweep(handling: &mut HashMap<(String, u64), crate::receipt::Handled>) -> Vec<(String, u64)> {
    let mut fired = Vec::new();
    handling.retain(|key, handled| match handled.try_recv() {
        Ok(()) => {
            fired.push(key.clone());
            false
        }
        Err(flume::TryRecvError::Disconnected) => false,
        Err(flume::TryRecvError::Empty) => true,
    });
    fired
}

/// Where a durable stub keeps its state: the runtime's database, and the
/// runtime's stable id for the domain ([`durable_id`]).
pub(crate) struct Durable {
    pub store: Arc<Store>,
    pub id: String,
}

/// The stable id of `runtime` (its address, kept in its data directory)
/// for the stub of `domain`: 32 hex digits of SHA-256 over both. The origin
/// of its envelopes, and what the stub names its durable consumers by.
pub(crate) fn durable_id(runtime: &Address, domain: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{runtime} {domain}").as_bytes());
    hex::encode(&digest[..16])
}

/// The stub's `config` (a JSON object, or nothing) with `"durable": id`.
pub(crate) fn durable_config(config: &str, id: &str) -> String {
    let mut value: Value = serde_json::from_str(config).unwrap_or(Value::Null);
    if !value.is_object() {
        value = json!({});
    }
    value["durable"] = id.into();
    value.to_string()
}

impl Stub {
    /// A stub for `domain` with a queue of `capacity`, kept on disk when
    /// `durable`; `start` spawns its thread, once, when it is first needed.
    /// An error when the kept queue cannot be read.
    pub fn new(domain: &str, capacity: usize, durable: Option<Durable>, start: Starter) -> Result<Arc<Stub>, String> {
        let mut dedup = Dedup::default();
        let queue = match durable {
            None => StubQueue::new(capacity, uuid::Uuid::new_v4().to_string(), None),
            Some(Durable { store, id }) => {
                let (outbox, kept) = outbox::Outbox::open(store, domain).map_err(|e| format!("cannot read its kept queue: {e:#}"))?;
                for (origin, seq) in &kept.seen {
                    dedup.record(origin, *seq);
                }
                dedup.persisted = kept.seen_count;
                let queue = StubQueue::new(capacity, id, Some(outbox));
                if !kept.envelopes.is_empty() {
                    tracing::info!(stub = domain, messages = kept.envelopes.len(), "durable queue kept: sending again what was not acknowledged");
                }
                queue.restore(kept.envelopes, kept.last_seq);
                queue
            }
        };
        Ok(Arc::new(Stub {
            domain: domain.to_owned(),
            address: stub_address(domain),
            queue: Arc::new(queue),
            dedup: Mutex::new(dedup),
            handling: Mutex::default(),
            wait_until: Mutex::new(Instant::now()),
            start: Mutex::new(Some(start)),
            next: Mutex::default(),
            stopped: AtomicBool::new(false),
            status: Mutex::new(json!({ "status": "created", "detail": "not loaded yet" })),
            watchers: Mutex::default(),
            told: Mutex::new((crate::sandbox::limits::RateLimiter::new(STATUS_NOTICES, STATUS_NOTICES), false)),
            refusals: Mutex::default(),
        }))
    }

    /// Messages in its queue (waiting, or sent and not yet acknowledged).
    pub fn queued(&self) -> usize {
        let s = self.queue.state.lock().unwrap();
        s.items.len() + self.queue.forgetting.load(Ordering::Acquire)
    }

    /// Whether its last status is `live` (connected to its node).
    pub fn is_live(&self) -> bool {
        self.status_name() == "live"
    }

    /// Its last status: `created`, `in-progress`, `live`, `disconnected`
    /// or `failed`.
    pub fn status_name(&self) -> String {
        self.status.lock().unwrap()["status"].as_str().unwrap_or_default().to_owned()
    }

    /// Starts the stub's thread if it is not running yet.
    pub fn ensure_started(self: &Arc<Self>) {
        let start = self.start.lock().unwrap().take();
        if let Some(start) = start {
            start(self.clone());
        }
    }

    /// Queues `message` for the domain's node (starting the stub if needed);
    /// `wait`: how long its sender waits for a response, when it is a
    /// request (the receiving runtime accepts a response only that long).
    pub fn push(self: &Arc<Self>, message: &Message, wait: Option<Duration>) -> Result<(), QueueError> {
        self.queue.push(message, wait)?;
        self.ensure_started();
        Ok(())
    }

    /// The stub on the bus, carrying every address of its domain with no
    /// route here.
    pub fn carrier(self: &Arc<Self>) -> Arc<dyn Carrier> {
        Arc::new(Outbound(self.clone()))
    }

    /// The destination at the stub's status address ([`Stub::address`]).
    pub fn status_route(self: &Arc<Self>) -> Arc<dyn Destination> {
        Arc::new(StatusAddress(self.clone()))
    }

    /// Adds `address` to the status watchers; the current status.
    pub fn watch(&self, address: &Address) -> Value {
        self.watchers.lock().unwrap().insert(address.clone());
        self.status.lock().unwrap().clone()
    }

    /// Removes `address` from the status watchers; the current status.
    pub fn unwatch(&self, address: &Address) -> Value {
        self.watchers.lock().unwrap().remove(address);
        self.status.lock().unwrap().clone()
    }

    /// A message to the stub's status address: `subscribe` adds its sender
    /// to the watchers (answered 200 with the current status),
    /// `unsubscribe` removes it; any other request is answered 405.
    pub(crate) fn status_request(&self, bus: &Bus, message: Message) {
        match message.kind {
            MessageType::Subscribe | MessageType::Unsubscribe => {
                let status = if message.kind == MessageType::Subscribe { self.watch(&message.from) } else { self.unwatch(&message.from) };
                let mut answer = Message::response(message.id, message.to, message.from, code::OK);
                answer.body.value = Some(status.to_string().into());
                let _ = bus.send(answer, None, None);
            }
            MessageType::Response => {}
            _ => {
                let why = format!("{} takes subscribe and unsubscribe", message.to);
                bus.answer(&message, code::METHOD_NOT_ALLOWED, why);
            }
        }
    }

    /// The stub will never carry its queue's message `seq`: it leaves the
    /// queue and its sender is answered `code` with `why` (a request is no
    /// longer pending). A `seq` not in flight is ignored.
    pub(crate) fn refuse(&self, bus: &Bus, seq: u64, code: u16, why: &str) {
        let Some(message) = self.queue.refuse(seq) else { return };
        let why = format!("the protostub of {} cannot carry it: {why}", self.domain);
        tracing::warn!(id = message.id, from = %message.from, to = %message.to, "{why}");
        bus.answer_taken(&message, code, why);
    }

    /// Runs `context` (a new component or settings) instead, with a queue
    /// of `capacity` (a live update): the queue, what it has in flight
    /// (offered again), the listened addresses and the status watchers
    /// stay. A running stub switches within one `poll` ([`POLL_WAIT_MS`]);
    /// one not started yet will start with `context`.
    pub fn update(&self, context: StubContext, capacity: usize) {
        self.queue.capacity.store(capacity, Ordering::Relaxed);
        let mut start = self.start.lock().unwrap();
        if start.is_some() {
            *start = Some(Box::new(move |stub| spawn(stub, context)));
            return;
        }
        drop(start);
        *self.next.lock().unwrap() = Some(context);
        self.queue.notify.notify_one();
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.queue.notify.notify_one();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

/// A stub as the carrier of its domain: what the bus sends to an address of
/// that domain with no route here is queued for the domain's node.
struct Outbound(Arc<Stub>);

impl Destination for Outbound {
    fn deliver(&self, message: Message, _bus: &Bus, wait: Option<Duration>) -> Result<(), Refused> {
        match self.0.push(&message, wait) {
            Ok(()) => Ok(()),
            Err(QueueError::Full(n)) => Err(Refused::Queue(message, format!("the protostub queue of {} is full ({n} messages)", self.0.domain))),
            Err(QueueError::Bytes(n)) => {
                let durable = if self.0.queue.outbox.is_some() { "durable " } else { "" };
                Err(Refused::Queue(message, format!("the {durable}protostub queue of {} is full ({n} bytes of envelopes)", self.0.domain)))
            }
            Err(QueueError::Persist(why)) => {
                Err(Refused::Queue(message, format!("the durable protostub queue of {} cannot keep it: {why}", self.0.domain)))
            }
        }
    }
}

impl Carrier for Outbound {
    fn domain(&self) -> &str {
        &self.0.domain
    }

    /// Listens for `address` (a local address of the stub's domain); the
    /// stub starts if it has not yet.
    fn listen(&self, address: &Address) {
        self.0.queue.control(address, true);
        self.0.ensure_started();
    }

    /// Forgets `address` if of its domain; it no longer watches the status.
    fn unrouted(&self, address: &Address) {
        if address.domain() == self.0.domain {
            self.0.queue.control(address, false);
        }
        self.0.unwatch(address);
    }

    fn stop(&self) {
        self.0.stop();
    }
}

/// A stub's status address, `domain://protostub.<domain>`: local hyperties
/// subscribe to its status ([`Stub::status_request`]); nothing from another
/// runtime reaches it, and its stub does not listen for it.
struct StatusAddress(Arc<Stub>);

impl Destination for StatusAddress {
    fn deliver(&self, message: Message, bus: &Bus, _wait: Option<Duration>) -> Result<(), Refused> {
        self.0.status_request(bus, message);
        Ok(())
    }

    fn admit_remote(&self, message: &Message) -> Result<(), (u16, String)> {
        Err((code::FORBIDDEN, format!("{} takes subscriptions from this runtime only", message.to)))
    }

    fn listened_for(&self) -> bool {
        false
    }
}

/// The registry and event address of the stub for `domain`.
pub(crate) fn stub_address(domain: &str) -> Address {
    Address::parse(format!("domain://protostub.{domain}")).expect("a domain name makes an address")
}

/// One outbound message in the queue.
struct Item {
    /// The message's id, type and sender: enough to answer it.
    id: u64,
    kind: MessageType,
    from: Address,
    to: Address,
    envelope: String,
    in_flight: bool,
}

/// Work the stub takes from the queue.
pub(crate) enum Work {
    Send { seq: u64, to: String, envelope: String },
    Listen(String),
    Forget(String),
}

#[derive(Default)]
struct QueueState {
    items: BTreeMap<u64, Item>,
    /// Items not in flight, in order.
    ready: BTreeSet<u64>,
    control: VecDeque<Work>,
    listening: BTreeSet<Address>,
    next_seq: u64,
    /// Envelope bytes of the items, and of those being written to disk.
    bytes: usize,
    /// Items being written to disk (counted against the capacity).
    writing: usize,
}

/// The host-side queue of one stub.
pub(crate) struct StubQueue {
    state: Mutex<QueueState>,
    /// Woken on new work (the stub's `work-ready` pollable waits on it).
    notify: tokio::sync::Notify,
    /// Messages it holds at most (changed by a live update).
    capacity: std::sync::atomic::AtomicUsize,
    /// This queue's id in envelopes: fresh for every queue, so a restarted
    /// runtime's sequence numbers are not taken for duplicates; for a
    /// durable one, the same across restarts (its numbers are kept too).
    origin: String,
    /// Where a durable queue keeps its items.
    outbox: Option<outbox::Outbox>,
    /// Items of a durable queue taken out whose removal from the disk is
    /// not done yet: still held, as far as a crash is concerned, so they
    /// count in [`Stub::queued`] (counted under `state`'s lock as they are
    /// taken, so the count never dips between the two).
    forgetting: AtomicUsize,
}

impl StubQueue {
    fn new(capacity: usize, origin: String, outbox: Option<outbox::Outbox>) -> StubQueue {
        StubQueue { state: Mutex::default(), notify: tokio::sync::Notify::new(), capacity: capacity.into(), origin, outbox, forgetting: AtomicUsize::new(0) }
    }

    /// Queues again the envelopes a durable queue kept (the runtime
    /// restarted); the next number given follows `last_seq`. A kept
    /// envelope that no longer reads is dropped, logged.
    fn restore(&self, envelopes: Vec<(u64, String)>, last_seq: u64) {
        let mut s = self.state.lock().unwrap();
        s.next_seq = last_seq;
        for (seq, envelope) in envelopes {
            match envelope::open(&envelope) {
                Ok(envelope::Received { message: m, .. }) => {
                    s.bytes += envelope.len();
                    s.items.insert(seq, Item { id: m.id, kind: m.kind, from: m.from, to: m.to, envelope, in_flight: false });
                    s.ready.insert(seq);
                }
                Err(e) => {
                    tracing::error!(seq, "a kept envelope does not read and is dropped: {e}");
                    self.forgetting(true);
                    self.forget(seq, false);
                }
            }
        }
    }

    fn push(&self, message: &Message, wait: Option<Duration>) -> Result<(), QueueError> {
        let mut s = self.state.lock().unwrap();
        let capacity = self.capacity.load(Ordering::Relaxed);
        if s.items.len() + s.writing >= capacity {
            return Err(QueueError::Full(capacity));
        }
        let seq = s.next_seq + 1;
        let envelope = envelope::write(message, &self.origin, seq, wait);
        if s.bytes + envelope.len() > MAX_QUEUE_BYTES {
            return Err(QueueError::Bytes(MAX_QUEUE_BYTES));
        }
        s.next_seq = seq;
        let item = Item { id: message.id, kind: message.kind, from: message.from.clone(), to: message.to.clone(), envelope, in_flight: false };
        let len = item.envelope.len();
        s.bytes += len;
        if let Some(outbox) = &self.outbox {
            // On disk before the sender's call returns; not under the lock.
            s.writing += 1;
            drop(s);
            let written = outbox.put(seq, &item.envelope);
            s = self.state.lock().unwrap();
            s.writing -= 1;
            if let Err(e) = written {
                s.bytes -= len;
                tracing::error!(seq, "durable protostub queue: cannot write a message: {e:#}");
                return Err(QueueError::Persist(format!("{e:#}")));
            }
        }
        s.items.insert(seq, item);
        s.ready.insert(seq);
        drop(s);
        self.notify.notify_one();
        Ok(())
    }

    /// An item of a durable queue was `taken` out (under `state`'s lock):
    /// it counts as queued until [`StubQueue::forget`] removed it from the
    /// disk.
    fn forgetting(&self, taken: bool) {
        if taken && self.outbox.is_some() {
            self.forgetting.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Removes `seq` from the disk of a durable queue (synced when the
    /// queue is now `empty`), taken out of the queue with
    /// [`StubQueue::forgetting`].
    fn forget(&self, seq: u64, empty: bool) {
        if let Some(outbox) = &self.outbox {
            if let Err(e) = outbox.remove(seq, empty) {
                tracing::error!(seq, "durable protostub queue: cannot remove a message (it will be sent again): {e:#}");
            }
            self.forgetting.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Takes item `seq` out of the state.
    fn take(s: &mut QueueState, seq: u64) -> Option<Item> {
        let item = s.items.remove(&seq)?;
        s.ready.remove(&seq);
        s.bytes = s.bytes.saturating_sub(item.envelope.len());
        Some(item)
    }

    fn control(&self, address: &Address, listen: bool) {
        let mut s = self.state.lock().unwrap();
        let changed = if listen { s.listening.insert(address.clone()) } else { s.listening.remove(address) };
        if changed {
            let a = address.to_string();
            s.control.push_back(if listen { Work::Listen(a) } else { Work::Forget(a) });
            drop(s);
            self.notify.notify_one();
        }
    }

    pub fn has_work(&self) -> bool {
        let s = self.state.lock().unwrap();
        !s.control.is_empty() || !s.ready.is_empty()
    }

    pub fn next_work(&self) -> Option<Work> {
        let mut s = self.state.lock().unwrap();
        if let Some(work) = s.control.pop_front() {
            return Some(work);
        }
        let seq = s.ready.pop_first()?;
        let item = s.items.get_mut(&seq).expect("a ready item is queued");
        item.in_flight = true;
        Some(Work::Send { seq, to: item.to.to_string(), envelope: item.envelope.clone() })
    }

    pub fn delivered(&self, seq: u64) {
        let (taken, empty) = {
            let mut s = self.state.lock().unwrap();
            let taken = Self::take(&mut s, seq).is_some();
            self.forgetting(taken);
            (taken, s.items.is_empty())
        };
        if taken {
            self.forget(seq, empty);
        }
    }

    pub fn retry(&self, seq: u64) {
        let mut s = self.state.lock().unwrap();
        if let Some(item) = s.items.get_mut(&seq)
            && item.in_flight
        {
            item.in_flight = false;
            s.ready.insert(seq);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Takes `seq`, which the stub took and has in flight, out of the queue
    /// for good: the message it carried (without its body), to answer its
    /// sender; `None` if it is not in flight.
    pub fn refuse(&self, seq: u64) -> Option<Message> {
        let mut s = self.state.lock().unwrap();
        if !s.items.get(&seq).is_some_and(|i| i.in_flight) {
            return None;
        }
        let item = Self::take(&mut s, seq)?;
        self.forgetting(true);
        let empty = s.items.is_empty();
        drop(s);
        self.forget(seq, empty);
        Some(Message::new(item.id, item.kind, item.from, item.to, None))
    }

    /// Everything in flight is offered again; every address is listened for
    /// again (after a reconnection, or in a fresh instance).
    pub fn resume(&self) {
        let mut s = self.state.lock().unwrap();
        let QueueState { items, ready, control, listening, .. } = &mut *s;
        for (seq, item) in items.iter_mut().filter(|(_, i)| i.in_flight) {
            item.in_flight = false;
            ready.insert(*seq);
        }
        control.clear();
        control.extend(listening.iter().map(|a| Work::Listen(a.to_string())));
        drop(s);
        self.notify.notify_one();
    }

    /// Waits until there is work (for the stub's pollable).
    pub async fn work(&self) {
        loop {
            let notified = self.notify.notified();
            if self.has_work() {
                return;
            }
            notified.await;
        }
    }
}


/// Sequence numbers seen per origin, to drop what arrives twice (a resend
/// after a lost acknowledgement). Bounded: per origin, which of the
/// [`Dedup::WINDOW`] numbers up to the highest it sent were seen (a
/// bitmap of 8 KiB), for at most [`Dedup::ORIGINS`] origins (the table
/// cleared when full): 32 MiB at most per stub domain, whatever its node
/// sends. (A set of the last 65,536 numbers taken per origin, before,
/// could grow to gigabytes under envelopes of thousands of made-up
/// origins.) The window is a range of numbers, not a count of them: a
/// runtime that gets only some of a queue's numbers (the queue also
/// carries its domain's messages to other runtimes) keeps fewer, and one
/// envelope with an origin's id and a made-up high number moves that
/// origin's window past its real numbers (before, flushing the table took
/// 4,097 made-up origins): see SECURITY.md, known limits.
#[derive(Default)]
pub(crate) struct Dedup {
    seen: HashMap<String, Window>,
    /// Envelopes recorded on disk so far (a durable stub's).
    persisted: u64,
}

impl Dedup {
    const WINDOW: u64 = 65_536;
    const ORIGINS: usize = 4_096;

    /// Whether `seq` of `origin` was not seen (one more than
    /// [`Dedup::WINDOW`] below the highest seen counts as new: a rare
    /// duplicate rather than a loss).
    fn is_new(&self, origin: &str, seq: u64) -> bool {
        self.seen.get(origin).is_none_or(|w| !w.seen(seq))
    }

    fn record(&mut self, origin: &str, seq: u64) {
        if let Some(window) = self.seen.get_mut(origin) {
            window.record(seq);
            return;
        }
        if self.seen.len() >= Self::ORIGINS {
            self.seen.clear();
        }
        let mut window = Window { highest: 0, bits: vec![0; (Self::WINDOW / 64) as usize].into_boxed_slice() };
        window.record(seq);
        self.seen.insert(origin.to_owned(), window);
    }
}

/// The numbers of one origin seen, within [`Dedup::WINDOW`] of the highest.
struct Window {
    highest: u64,
    /// Bit `n % WINDOW` stands for `n` in `highest - WINDOW + 1 ..= highest`.
    bits: Box<[u64]>,
}

impl Window {
    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % Dedup::WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn seen(&self, seq: u64) -> bool {
        let (word, bit) = Self::bit(seq);
        seq <= self.highest && self.highest - seq < Dedup::WINDOW && self.bits[word] & bit != 0
    }

    fn record(&mut self, seq: u64) {
        if seq > self.highest {
            // The numbers between come into the window unseen: their bits
            // are cleared a word at a time (a node jumping ahead by almost
            // the window at every envelope costs ~1,000 words, not 65,536
            // bits).
            let gap = seq - self.highest;
            if gap >= Dedup::WINDOW {
                self.bits.fill(0);
            } else {
                let (mut at, mut left) = ((self.highest + 1) % Dedup::WINDOW, gap);
                while left > 0 {
                    let offset = at % 64;
                    let n = left.min(64 - offset);
                    let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << offset };
                    self.bits[(at / 64) as usize] &= !mask;
                    at = (at + n) % Dedup::WINDOW;
                    left -= n;
                }
            }
            self.highest = seq;
        } else if self.highest - seq >= Dedup::WINDOW {
            return;
        }
        let (word, bit) = Self::bit(seq);
        self.bits[word] |= bit;
    }
}

impl Stub {
    /// An envelope the stub received, into the bus; `busy: ...` under
    /// back-pressure (the sender will offer it again). `vouched`: the
    /// sending domain as the node vouches for it (`post-from`), which the
    /// envelope's `from` must be an address of. What the bus refuses at the
    /// boundary (a sender routed in this runtime, see
    /// [`Bus::send_inbound`]) is an error naming why, logged at most once a
    /// second per stub.
    pub(crate) fn post(&self, bus: &Bus, text: &str, vouched: Option<&str>) -> Result<(), String> {
        let received = envelope::open(text).map_err(|e| format!("malformed envelope: {e}"))?;
        if let Some(domain) = vouched
            && received.message.from.domain() != domain
        {
            let why = format!(
                "spoofed from: the node vouches for a sender of {domain}, the envelope claims {}",
                received.message.from
            );
            return Err(self.refused(why));
        }
        if !self.dedup.lock().unwrap().is_new(&received.origin, received.seq) {
            tracing::debug!(stub = %self.domain, seq = received.seq, "duplicate dropped");
            return Ok(());
        }
        let key = (received.origin.clone(), received.seq);
        if self.queue.outbox.is_none() {
            // Run on this thread when its hyperty is idle (the hand-off,
            // within the stub's allowance). Not a durable stub's: its posts
            // wait for the hyperty's receipt within a budget of the poll,
            // and with lent calls in that budget a durable test saw a
            // message handled twice (once in five runs; not understood).
            let sent = crate::sandbox::handoff::stub_post(|| bus.send_inbound(received.message, &self.domain, received.wait));
            return match sent {
                Ok(()) => {
                    self.taken(&key);
                    Ok(())
                }
                Err(e) => Err(self.not_taken(e)),
            };
        }
        // Durable: acknowledged (this returns Ok) only once its hyperty
        // handled it, so a message still in an inbox when this process
        // dies is delivered again ([`crate::receipt`]).
        // What was handled since the last post is recorded now (the crash
        // window for a duplicate stays one commit long); what was dropped
        // unhandled is forgotten, to be taken again when offered again.
        let fired = sweep(&mut self.handling.lock().unwrap());
        for handled in &fired {
            self.taken(handled);
        }
        if fired.contains(&key) {
            return Ok(());
        }
        {
            let handling = self.handling.lock().unwrap();
            if handling.contains_key(&key) {
                return Err(format!("busy: envelope {} of {} is still being handled", key.1, key.0));
            }
            if handling.len() >= MAX_HANDLING {
                return Err(format!("busy: {MAX_HANDLING} envelopes are still being handled"));
            }
        }
        let (receipt, handled) = crate::receipt::Receipt::new(&received.message);
        let (sent, taken) = crate::receipt::offer(receipt, || bus.send_inbound(received.message, &self.domain, received.wait));
        if let Err(e) = sent {
            return Err(self.not_taken(e));
        }
        if !taken {
            self.taken(&key);
            return Ok(());
        }
        // Within the poll's budget: a stub's poll must end before its
        // deadline however slow the hyperties it posts to.
        let until = (Instant::now() + HANDLED_WAIT).min(*self.wait_until.lock().unwrap());
        match handled.recv_deadline(until) {
            Ok(()) => {
                self.taken(&key);
                Ok(())
            }
            Err(flume::RecvTimeoutError::Timeout) => {
                self.handling.lock().unwrap().insert(key.clone(), handled);
                Err(format!("busy: envelope {} of {} is still being handled", key.1, key.0))
            }
            Err(flume::RecvTimeoutError::Disconnected) => Err(format!("busy: envelope {} of {} was dropped unhandled", key.1, key.0)),
        }
    }

    /// Records envelope `key` (origin, seq) as taken, on disk too for a
    /// durable stub before it acknowledges it to the node, so that a
    /// redelivery, even after this runtime restarts, is dropped.
    fn taken(&self, key: &(String, u64)) {
        let n = {
            let mut dedup = self.dedup.lock().unwrap();
            dedup.record(&key.0, key.1);
            dedup.persisted += 1;
            dedup.persisted - 1
        };
        if let Some(outbox) = &self.queue.outbox
            && let Err(e) = outbox.seen(n, &key.0, key.1)
        {
            tracing::error!(stub = %self.domain, "cannot keep the id of an envelope taken (a redelivery after a restart would be taken again): {e:#}");
        }
        tracing::debug!(stub = %self.domain, origin = key.0, seq = key.1, "envelope taken");
    }

    /// What the stub is told when the bus did not take an envelope.
    fn not_taken(&self, e: crate::bus::SendError) -> String {
        match e {
            crate::bus::SendError::InboxFull(to) => format!("busy: inbox of {to} is full"),
            e => self.refused(e.to_string()),
        }
    }

    /// Logs a refused envelope (at most once a second per stub, with the
    /// count of those not logged) and gives the reason back.
    fn refused(&self, why: String) -> String {
        let mut log = self.refusals.lock().unwrap();
        let now = std::time::Instant::now();
        if log.0.is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1)) {
            let unlogged = std::mem::take(&mut log.1);
            log.0 = Some(now);
            tracing::warn!(stub = %self.domain, unlogged, "envelope refused: {why}");
        } else {
            log.1 += 1;
        }
        why
    }
}

/// Settings of a stub from its bundle entry.
#[derive(Clone, Debug)]
pub(crate) struct StubSettings {
    pub config: String,
    /// `ip:port` endpoints the stub may connect to, and nothing else.
    pub endpoints: Vec<std::net::SocketAddr>,
}

/// What a stub's thread works with.
#[derive(Clone)]
pub(crate) struct StubContext {
    pub engine: wasmtime::Engine,
    /// The engine's epoch, which the stub's timers read.
    pub epoch: crate::engine::Epoch,
    pub pre: StubPre,
    pub settings: StubSettings,
    pub bus: Bus,
    pub registry: Arc<Registry>,
    pub events: Events,
}

/// Instantiates the stub's component for `domain` and calls its `init`
/// with the bundle's configuration, without connecting anywhere: a bad
/// configuration is found at deployment, not in a restart loop later.
///
/// It runs on the deployer's thread, while the runtime's deployments wait:
/// the probe is granted no endpoint, so all it can wait on is a timer,
/// which ends at its deadline ([`CONFIG_CHECK_DEADLINE`];
/// `sandbox::timers`).
pub(crate) fn check_config(domain: &str, context: &StubContext) -> Result<(), String> {
    let probe = Stub::new(domain, 1, None, Box::new(|_| {}))?;
    let mut context = context.clone();
    context.settings.endpoints.clear();
    glue::Instance::start(&probe, &context, CONFIG_CHECK_DEADLINE).map(drop)
}

/// The deadline of a stub's `init` run to check its configuration at
/// deployment (it reads its configuration and connects nowhere; the
/// handshake is in `poll`).
const CONFIG_CHECK_DEADLINE: Duration = Duration::from_secs(1);

/// How long one `poll` call may wait for work before it returns.
const POLL_WAIT_MS: u32 = 250;
/// A `poll` call's deadline: generous, since connecting and the handshake
/// happen inside one (a stub's own limit is 2 s each).
const POLL_DEADLINE: Duration = Duration::from_secs(10);

/// Spawns the thread that runs `stub`'s component until it is stopped.
pub(crate) fn spawn(stub: Arc<Stub>, context: StubContext) {
    let name = format!("hyperty-stub-{}", stub.domain);
    let spawned = std::thread::Builder::new().name(name).spawn(move || io::drive_here(|| run(stub, context)));
    if let Err(e) = spawned {
        tracing::error!("cannot start a protostub thread: {e}");
    }
}

fn run(stub: Arc<Stub>, mut context: StubContext) {
    // What the stub posts may run on this thread (the hand-off).
    crate::sandbox::handoff::stub_thread(&stub.domain);
    let label = format!("protostub {}", stub.domain);
    let mut failures: u32 = 0;
    set_status(&stub, &context, glue::StubStatus::Created, "loaded");
    while !stub.is_stopped() {
        if let Some(next) = stub.next.lock().unwrap().take() {
            context = next;
        }
        let failure = match glue::Instance::start(&stub, &context, POLL_DEADLINE) {
            Ok(mut instance) => {
                // What the last instance had in flight is offered again.
                stub.queue.resume();
                loop {
                    if stub.is_stopped() {
                        return;
                    }
                    if let Some(next) = stub.next.lock().unwrap().take() {
                        context = next;
                        break None;
                    }
                    *stub.wait_until.lock().unwrap() = Instant::now() + POLL_WAIT_BUDGET;
                    let polled = instance.poll(POLL_WAIT_MS, POLL_DEADLINE);
                    // A status reported past the notification rate.
                    tell_status(&stub, StatusSink { registry: &context.registry, events: &context.events, bus: &context.bus }, false);
                    match polled {
                        Ok(()) => failures = 0,
                        Err(e) => break Some(e),
                    }
                }
            }
            Err(e) => Some(e),
        };
        let Some(failure) = failure else {
            tracing::info!("{label}: updated, starting the new version");
            continue;
        };
        failures += 1;
        tracing::warn!("{label} failed ({failures} in a row), restarting: {failure}");
        context.events.emit(&label, &stub.address, EventKind::Trapped { reason: failure.clone() });
        set_status(&stub, &context, glue::StubStatus::Failed, &failure);
        let backoff = Duration::from_millis(100 * 2u64.saturating_pow(failures.min(6) - 1)).min(Duration::from_secs(5));
        std::thread::sleep(backoff);
        context.events.emit(&label, &stub.address, EventKind::Restarted { failures });
    }
}

/// Where status reports go.
pub(crate) struct StatusSink<'a> {
    pub registry: &'a Registry,
    pub events: &'a Events,
    pub bus: &'a Bus,
}

/// A status the host gives the stub (loaded, failed: a few a run), logged.
fn set_status(stub: &Stub, context: &StubContext, status: glue::StubStatus, detail: &str) {
    let sink = StatusSink { registry: &context.registry, events: &context.events, bus: &context.bus };
    let name = record_status(stub, &sink, status, detail);
    // Told past the rate: the host's own (bounded by the restart backoff),
    // so that a stub reporting in a loop until it fails cannot hide it.
    tell_status(stub, sink, true);
    tracing::info!("protostub {}: {name} ({})", stub.domain, crate::sandbox::log_line(detail));
}

/// Records a status the stub reported: in the registry, and, at most
/// [`STATUS_NOTICES`] a second, as an event for operators and on the bus as
/// an `update` from the stub's address to each local address that
/// subscribed to it; one past that rate is told when the rate allows
/// ([`tell_status`], after each `poll`), and the host's own statuses
/// (loaded, failed) are told at once, so the last status is told while the
/// stub runs. Returns the status's name; the caller logs it (a stub's own
/// reports through its log's rate limit).
pub(crate) fn report(stub: &Stub, sink: StatusSink<'_>, status: glue::StubStatus, detail: &str) -> &'static str {
    let name = record_status(stub, &sink, status, detail);
    tell_status(stub, sink, false);
    name
}

/// Records a status (registry, the stub's status), untold; its name.
fn record_status(stub: &Stub, sink: &StatusSink<'_>, status: glue::StubStatus, detail: &str) -> &'static str {
    let (name, registry_status) = match status {
        glue::StubStatus::Created => ("created", Status::Created),
        glue::StubStatus::InProgress => ("in-progress", Status::Created),
        glue::StubStatus::Live => ("live", Status::Live),
        glue::StubStatus::Disconnected => ("disconnected", Status::Disconnected),
        glue::StubStatus::Failed => ("failed", Status::Failed),
    };
    sink.registry.set_status(&stub.address, registry_status);
    *stub.status.lock().unwrap() = json!({ "status": name, "detail": detail });
    stub.told.lock().unwrap().1 = true;
    name
}

/// Tells the stub's last status (an event, and an `update` to each
/// watcher) if it is untold and the rate allows (or `anyway`).
pub(crate) fn tell_status(stub: &Stub, sink: StatusSink<'_>, anyway: bool) {
    {
        let mut told = stub.told.lock().unwrap();
        if !told.1 || !(told.0.take() || anyway) {
            return;
        }
        told.1 = false;
    }
    let value = stub.status.lock().unwrap().clone();
    let (name, detail) = (value["status"].as_str().unwrap_or_default(), value["detail"].as_str().unwrap_or_default());
    sink.events.emit(
        &format!("protostub {}", stub.domain),
        &stub.address,
        EventKind::StubStatus { status: name.to_owned(), detail: detail.to_owned() },
    );
    let watchers: Vec<Address> = stub.watchers.lock().unwrap().iter().cloned().collect();
    let (value, resource) = (Text::shared(&value.to_string()), Text::shared(stub.address.as_str()));
    for watcher in watchers {
        let id = STATUS_IDS.fetch_add(1, Ordering::Relaxed);
        let mut update = Message::new(id, MessageType::Update, stub.address.clone(), watcher, None);
        update.body.value = Some(value.clone());
        update.body.resource = Some(resource.clone());
        if let Err(e) = sink.bus.send(update, None, None) {
            tracing::debug!("status of protostub {} not told: {e}", stub.domain);
        }
    }
}

/// Status notifications of a stub a second (and at once).
const STATUS_NOTICES: u32 = 20;

/// Ids of status updates (notifications: nobody answers them).
static STATUS_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[cfg(test)]
mod tests {
    use super::*;

    /// What was taken is a duplicate within the window of its origin's
    /// highest number, out of order too; one older than the window, or of
    /// another origin, is new.
    #[test]
    fn the_dedup_window_drops_what_was_taken_and_no_more() {
        let mut d = Dedup::default();
        for seq in [1, 2, 3, 5, 4, 70_000, 69_999] {
            assert!(d.is_new("a", seq), "{seq} is new");
            d.record("a", seq);
            assert!(!d.is_new("a", seq), "{seq} is a duplicate once taken");
        }
        assert!(d.is_new("b", 4), "another origin's number is its own");
        // 4 is now more than the window below 70,000: taken as new.
        assert!(d.is_new("a", 4));
        assert!(!d.is_new("a", 69_999) && !d.is_new("a", 70_000));
        // Within the window and never taken.
        assert!(d.is_new("a", 69_000) && d.is_new("a", 70_000 - Dedup::WINDOW + 1));
        // A jump ahead by less than the window clears what comes into it,
        // across a word and the bitmap's wrap.
        d.record("a", 70_000 + Dedup::WINDOW - 10);
        for seq in 70_001..70_000 + Dedup::WINDOW - 10 {
            assert!(d.is_new("a", seq), "{seq} came into the window unseen");
        }
        assert!(!d.is_new("a", 69_999) && !d.is_new("a", 70_000), "still within the window");
        d.record("a", 70_000 + Dedup::WINDOW);
        assert!(d.is_new("a", 70_000), "now below it");
        // Numbers that come into the window by a jump are new even where
        // the bitmap held older ones (every bit of the window set first).
        let mut d = Dedup::default();
        for seq in 1..=Dedup::WINDOW {
            d.record("c", seq);
        }
        d.record("c", Dedup::WINDOW + 10);
        for seq in Dedup::WINDOW + 1..Dedup::WINDOW + 10 {
            assert!(d.is_new("c", seq), "{seq} came into the window unseen");
        }
        assert!(!d.is_new("c", 11) && d.is_new("c", 10), "the window moved by 10");
        // The ends of the numbers.
        let mut d = Dedup::default();
        d.record("d", 0);
        assert!(!d.is_new("d", 0) && d.is_new("d", 1));
        d.record("d", u64::MAX);
        assert!(!d.is_new("d", u64::MAX) && d.is_new("d", u64::MAX - 1) && d.is_new("d", 0));
    }

    /// The table holds [`Dedup::ORIGINS`] origins of 8 KiB each: the next
    /// one clears it (the bound on what a node's envelopes make the host
    /// hold).
    #[test]
    fn the_dedup_table_is_bounded_in_origins() {
        let mut d = Dedup::default();
        for i in 0..Dedup::ORIGINS {
            d.record(&format!("o{i}"), 1);
        }
        assert_eq!(d.seen.len(), Dedup::ORIGINS);
        assert!(d.seen.values().all(|w| w.bits.len() * 8 == 8 * 1024));
        assert!(!d.is_new("o0", 1));
        d.record("one-more", 1);
        assert_eq!(d.seen.len(), 1);
        assert!(d.is_new("o0", 1), "forgotten with the table");
    }

    /// Receipts fired by another thread while the stub sweeps: each one
    /// that fired is returned exactly once, none is lost unrecorded.
    #[test]
    fn a_receipt_firing_during_a_sweep_is_returned_once() {
        for _ in 0..50 {
            let mut handling = HashMap::new();
            let mut receipts = Vec::new();
            for seq in 0..2_000u64 {
                let (tx, rx) = flume::bounded(1);
                handling.insert(("origin".to_owned(), seq), rx);
                receipts.push(tx);
            }
            let firing = std::thread::spawn(move || {
                for tx in receipts {
                    tx.send(()).unwrap();
                }
            });
            let mut returned = BTreeSet::new();
            while !handling.is_empty() {
                for (_, seq) in sweep(&mut handling) {
                    assert!(returned.insert(seq), "{seq} returned twice");
                }
            }
            firing.join().unwrap();
            assert_eq!(returned.len(), 2_000, "fired receipts were lost in a sweep");
        }
    }
}
