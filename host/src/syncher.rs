//! The syncher: reTHINK's synchronised data objects, kept by the host.
//!
//! A reporter hyperty creates an object (`syncher.create`); its URL
//! (`<scheme>://<domain>/<uuid>`) becomes a route on the bus, so observers
//! use plain messages: `subscribe` (accepted at once when invited, else the
//! reporter is asked and its 200/403 decides), `read` (subscribers and the
//! reporter: 200 with the state; for others the reporter is asked the same
//! way: 200 with the state, else 401), `unsubscribe` (the reporter is told
//! who left). Only the reporter changes or deletes the object, through the
//! import or by message; anyone else is refused 403 here, after and
//! whatever the policies (which still apply to every message on the way).
//! Children are reTHINK's way for participants to contribute: the
//! reporter or a subscriber creates one (import `set-child`, or a `create`
//! to `<url>/children/<name>`, which the bus routes to the object), its
//! creator alone replaces it, and it or the reporter removes it; every
//! child delta names its creator, and goes to the reporter too when a
//! subscriber made it. Observers are
//! hyperties (and embedders' endpoints standing for them): `hyperty://`
//! addresses; anything else (a data object's URL, a runtime or domain
//! address) is refused as an observer.
//!
//! Decision: **deltas are JSON Patch (RFC 6902, `json-patch` crate)**,
//! versioned per object: every change of the data or a child bumps the
//! version by one, and each subscriber gets one small message per change
//! from the object's URL (never the whole object). [`Replica`] is the
//! observer side: apply in order, ignore what is stale, read again after a
//! gap. Fan-out serialises each delta once and sends it to every subscriber
//! with [`Bus::send_each`]: each subscriber's copy passes the path of any
//! message (its domain's policies, identity, its own inbox's back-pressure),
//! with what all share done once per receiving domain; a subscriber that
//! is away misses versions and resyncs with `read`.
//!
//! Bounds (the reporter's domain [`Limits`], charged to its [`Account`]):
//! objects per domain and per hyperty, an object's size (the JSON text of
//! its data and children, checked on a copy after every patch operation or
//! child change, before it replaces the object), children, subscribers
//! (and invitations; asks waiting for the reporter count as subscribers);
//! children count for their object whoever created them; an object's bytes
//! count in the domain's memory budget
//! (`total-memory-mb`, with the guests' linear memories) until it is
//! deleted. Depth: JSON text entering is checked by
//! [`crate::message::validate_value`], and an object's data and children
//! are at most [`MAX_OBJECT_DEPTH`] deep, measured without recursion after
//! every operation, so nothing recursive (clone, serialisation, drop,
//! persistence, restore, [`Replica`]) ever meets a deeper value.
//!
//! Locks: the objects map, each object's lock and `asking` are **never
//! nested** (each is taken alone, what is needed copied out, and released
//! before the next) and **none is held across a call out**: the bus (whose
//! `send` may re-enter [`Syncher::handle`] synchronously for an object's
//! route), the registry (which may send), a guest. Messages a change causes
//! are collected under the object's lock and sent after it is released.
//! Under an object's lock only the store (writes of one object reach it in
//! version order), lock-free counters and the status events channel (which
//! calls nothing back) are touched.
//!
//! Objects are registered (kind `data-object`, their scheme, the reporter's
//! user) while they exist, so they are discovered by scheme like anything
//! else. `invite` also sends each new invitee reTHINK's invitation: a
//! `create` from the object's URL with its state and `url` (only `{"url",
//! "scheme", "reporter"}` when the state would pass the bus's message size
//! limit).
//!
//! With a data directory, objects (durably, on every change) and their
//! members (subscribed / invited; synced with the next object write) are
//! kept in the runtime's store and restored at start: routes come back,
//! subscribers keep getting changes. A restored object is counted for its
//! domain and reporter at once, and charged to the domain's memory when its
//! reporter next calls the syncher about it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::address::Address;
use crate::bus::{Bus, Destination, Refused};
use crate::events::{EventKind, Events};
use crate::message::{MAX_JSON_DEPTH, Message, MessageType, Text, code, validate_value};
use crate::registry::{Kind, Registration, Registry, Status};
use crate::sandbox::limits::{DomainMemory, Limits};
use crate::store::{Membership, Store};

pub use hyperty_replica::MAX_OBJECT_DEPTH;
use hyperty_replica::{PatchError, patched, shape};

// Every message carrying an object (state, delta) stays within the host's JSON limit.
const _: () = assert!(MAX_OBJECT_DEPTH + 3 <= MAX_JSON_DEPTH);

/// Why the syncher refused a reporter's call; mirrors the WIT `sync-error`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid: {0}")]
    Invalid(String),
    /// A limit of the reporter's domain (named in the text) would be passed.
    #[error("limit: {0}")]
    Limit(String),
}

/// How long a reporter has to accept or refuse a subscription.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a reporter's objects are charged to: its domain's limits and
/// memory; refusals are reported as status events of the hyperty (at most
/// one a second).
pub(crate) struct Account {
    reporter: Address,
    /// `<domain>/<name>` of the hyperty, for events.
    hyperty: Arc<str>,
    limits: Limits,
    memory: Arc<DomainMemory>,
    events: Events,
    since: Instant,
    /// Milliseconds after `since` of the last refusal event, plus one (0: none).
    reported: AtomicU64,
}

impl Account {
    pub fn new(reporter: Address, hyperty: Arc<str>, limits: &Limits, memory: Arc<DomainMemory>, events: Events) -> Arc<Account> {
        Arc::new(Account { reporter, hyperty, limits: limits.clone(), memory, events, since: Instant::now(), reported: AtomicU64::new(0) })
    }

    /// The refusal of a write at a limit (`why` names it), reported.
    fn refuse(&self, why: String) -> SyncError {
        let now = self.since.elapsed().as_millis() as u64 + 1;
        let last = self.reported.load(Ordering::Relaxed);
        if (last == 0 || now >= last + 1000) && self.reported.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.events.emit(&self.hyperty, &self.reporter, EventKind::ObjectRefused { reason: why.clone() });
        }
        tracing::debug!(reporter = %self.reporter, "data object write refused: {why}");
        SyncError::Limit(why)
    }

    /// Changes the bytes charged for an object from `old` to `new`.
    fn resize(&self, old: usize, new: usize) -> Result<(), SyncError> {
        if new <= old {
            self.memory.release(old - new);
        } else if !self.memory.charge(new - old, (self.limits.total_memory_mb as usize) << 20) {
            return Err(self.refuse(format!(
                "the domain's memory is used up (total-memory-mb = {}, shared by its instances and data objects)",
                self.limits.total_memory_mb
            )));
        }
        Ok(())
    }

    fn check_size(&self, url: &str, bytes: usize) -> Result<(), SyncError> {
        if bytes > self.limits.object_bytes as usize {
            return Err(self.refuse(format!("{url} would be {bytes} bytes of JSON (object-bytes = {})", self.limits.object_bytes)));
        }
        Ok(())
    }
}

struct Object {
    url: Address,
    reporter: Address,
    /// The user the reporter acts for, if any (for discovery).
    user: Option<String>,
    scheme: String,
    version: u64,
    data: Value,
    children: BTreeMap<String, Value>,
    /// Who created each child that the reporter did not (a subscriber):
    /// only it updates the child; it or the reporter removes it.
    creators: BTreeMap<String, Address>,
    /// Shared with the fan-outs in progress (changed copy-on-write), so a
    /// change's delta goes out without copying the list.
    subscribers: Arc<BTreeSet<Address>>,
    invited: BTreeSet<Address>,
    /// Subscriptions and reads waiting for the reporter's answer.
    asking: usize,
    /// Bytes of the data's JSON text.
    data_bytes: usize,
    /// Bytes of the data's and every child's JSON text, the children's
    /// names and their creators' addresses (those not the reporter): the
    /// size limited by `object-bytes` and charged to `account`.
    bytes: usize,
    account: Arc<Account>,
    /// Deleted: whoever still holds it finds nothing.
    deleted: bool,
}

impl Object {
    fn state(&self) -> Value {
        json!({
            "version": self.version,
            "data": self.data,
            "children": self.children,
            "creators": self.creators.iter().map(|(name, c)| (name.clone(), Value::from(c.as_str()))).collect::<Map<_, _>>(),
            "reporter": self.reporter.as_str(),
            "user": self.user,
            "scheme": self.scheme,
        })
    }

    fn registration(&self) -> Registration {
        Registration {
            address: self.url.clone(),
            kind: Kind::DataObject,
            name: registry_name(&self.url),
            domain: self.url.domain().to_owned(),
            user: self.user.clone(),
            hyperty_types: Vec::new(),
            schemes: vec![self.scheme.clone()],
            status: Status::Live,
        }
    }

    fn record(&self) -> String {
        self.state().to_string()
    }

    fn may_read(&self, who: &Address) -> bool {
        who == &self.reporter || self.subscribers.contains(who)
    }

    /// Who created child `name` (if it exists).
    fn creator(&self, name: &str) -> Option<&Address> {
        self.children.contains_key(name).then(|| self.creators.get(name).unwrap_or(&self.reporter))
    }

    /// The bytes child `name` costs: its name, data and creator (if not
    /// the reporter); 0 if there is no such child.
    fn child_bytes(&self, name: &str) -> usize {
        let Some(data) = self.children.get(name) else { return 0 };
        name.len() + shape(data, usize::MAX).map_or(0, |s| s.bytes) + self.creators.get(name).map_or(0, |c| c.as_str().len())
    }

    /// Charges the object to `account` from now on (a restored object, or
    /// a reporter restarted in a redeployed domain).
    fn bind(&mut self, account: &Arc<Account>) {
        if !Arc::ptr_eq(&self.account, account) {
            if !Arc::ptr_eq(&self.account.memory, &account.memory) {
                self.account.memory.release(self.bytes);
                account.memory.take(self.bytes);
            }
            self.account = account.clone();
        }
    }

    /// The delta of a change for each subscriber (and `also`, the
    /// reporter when a subscriber made the change): one message from the
    /// object's URL, about `resource`, carrying `delta` with the (new)
    /// version, serialised once.
    fn deltas(&self, next_id: &AtomicU64, kind: MessageType, resource: String, mut delta: Map<String, Value>, also: Option<&Address>) -> Deltas {
        delta.insert("version".into(), self.version.into());
        let also = also.filter(|a| !self.subscribers.contains(*a)).cloned();
        let first_id = next_id.fetch_add((self.subscribers.len() + usize::from(also.is_some())) as u64, Ordering::Relaxed);
        let mut message = Message::new(first_id, kind, self.url.clone(), self.url.clone(), Some(Value::Object(delta).to_string()));
        message.body.resource = Some(resource.into());
        Deltas { message, to: self.subscribers.clone(), also, first_id }
    }
}

/// A change's delta and who gets it ([`Bus::send_each`]: `message` to each
/// of `to`, then `also`, numbered from `first_id`).
struct Deltas {
    message: Message,
    to: Arc<BTreeSet<Address>>,
    also: Option<Address>,
    first_id: u64,
}

/// What a change sends its subscribers: the message type, what changed
/// (the object or one child) and the delta's fields besides the version.
struct Change {
    kind: MessageType,
    resource: String,
    delta: Map<String, Value>,
}

/// A subscription or a read waiting for the reporter's answer.
struct Asking {
    /// `subscribe` or `read`.
    kind: MessageType,
    url: Address,
    observer: Address,
    request_id: u64,
}

/// The objects of the runtime and how many each domain and reporter has.
#[derive(Default)]
struct Objects {
    by_url: HashMap<Address, Arc<Mutex<Object>>>,
    per_domain: HashMap<String, usize>,
    per_reporter: HashMap<Address, usize>,
}

impl Objects {
    fn insert(&mut self, object: Object) -> Arc<Mutex<Object>> {
        *self.per_domain.entry(object.reporter.domain().to_owned()).or_default() += 1;
        *self.per_reporter.entry(object.reporter.clone()).or_default() += 1;
        let url = object.url.clone();
        let object = Arc::new(Mutex::new(object));
        self.by_url.insert(url, object.clone());
        object
    }

    fn remove(&mut self, url: &Address, reporter: &Address) {
        if self.by_url.remove(url).is_some() {
            for count in [self.per_domain.get_mut(reporter.domain()), self.per_reporter.get_mut(reporter)].into_iter().flatten() {
                *count -= 1;
            }
            self.per_domain.retain(|_, n| *n > 0);
            self.per_reporter.retain(|_, n| *n > 0);
        }
    }
}

/// A data object's destination on the bus, at its URL: messages to it and
/// to its children go to [`Syncher::handle`], synchronously on the
/// sender's thread (no lock of the syncher is held by the bus meanwhile).
struct ObjectRoute(Weak<Syncher>);

impl Destination for ObjectRoute {
    fn deliver(&self, message: Message, _bus: &Bus, _wait: Option<Duration>) -> Result<(), Refused> {
        match self.0.upgrade() {
            Some(syncher) => {
                syncher.handle(message);
                Ok(())
            }
            None => Err(Refused::Closed(message)),
        }
    }

    /// A data object's reporter is always a hyperty here, even once its
    /// route is gone: no write of the object comes from another runtime
    /// (its children's may: a remote subscriber's, which
    /// [`Syncher::handle`] checks).
    fn admit_remote(&self, message: &Message) -> Result<(), (u16, String)> {
        if matches!(message.kind, MessageType::Create | MessageType::Update | MessageType::Delete) && message.to.child().is_none() {
            return Err((code::FORBIDDEN, format!("only its reporter, a hyperty of this runtime, changes {}", message.to)));
        }
        Ok(())
    }

    fn has_children(&self) -> bool {
        true
    }
}

/// The data objects of a runtime.
pub(crate) struct Syncher {
    bus: Bus,
    registry: Arc<Registry>,
    store: Option<Arc<Store>>,
    objects: RwLock<Objects>,
    /// Subscriptions forwarded to reporters, by the forwarded request's id.
    asking: Mutex<HashMap<u64, Asking>>,
    next_id: AtomicU64,
    /// Where restored objects are charged until their reporter calls.
    unclaimed: (Arc<DomainMemory>, Events),
    /// Every object's destination on the bus (they share it).
    route: Arc<dyn Destination>,
}

impl Syncher {
    /// The data objects whose reporter is of `domain`, and their
    /// subscribers summed (for the metrics, read at each scrape).
    pub(crate) fn census(&self, domain: &str) -> (usize, usize) {
        let objects = self.objects.read().unwrap();
        let count = objects.per_domain.get(domain).copied().unwrap_or(0);
        let reported: Vec<Arc<Mutex<Object>>> =
            if count == 0 { Vec::new() } else { objects.by_url.values().cloned().collect() };
        drop(objects);
        let subscribers = reported
            .iter()
            .map(|o| o.lock().unwrap())
            .filter(|o| o.reporter.domain() == domain)
            .map(|o| o.subscribers.len())
            .sum();
        (count, subscribers)
    }

    /// The syncher of `bus`; with a store, the objects kept there come back
    /// (routes included).
    pub fn new(bus: Bus, registry: Arc<Registry>, store: Option<Arc<Store>>) -> anyhow::Result<Arc<Syncher>> {
        let syncher = Arc::new_cyclic(|this| Syncher {
            bus,
            registry,
            store,
            objects: RwLock::default(),
            asking: Mutex::default(),
            next_id: AtomicU64::new(1),
            unclaimed: (Arc::default(), Events::default()),
            route: Arc::new(ObjectRoute(this.clone())),
        });
        if let Some(store) = &syncher.store {
            for (url, record, members) in store.objects()? {
                match syncher.restore(&url, &record, members) {
                    Ok(object) => {
                        let url = object.url.clone();
                        let registration = object.registration();
                        syncher.objects.write().unwrap().insert(object);
                        syncher.publish(url, registration);
                    }
                    Err(e) => tracing::warn!("data object {url} in the store is unreadable, skipped: {e}"),
                }
            }
        }
        Ok(syncher)
    }

    /// Makes an object known: registered, routed.
    fn publish(&self, url: Address, registration: Registration) {
        self.registry.register(registration);
        self.bus.add_route(url, self.route.clone());
    }

    fn object(&self, url: &Address) -> Result<Arc<Mutex<Object>>, SyncError> {
        self.objects.read().unwrap().by_url.get(url).cloned().ok_or_else(|| SyncError::NotFound(format!("no data object {url}")))
    }

    fn persist(&self, o: &Object) {
        self.keep(&o.url, &o.record());
    }

    fn keep(&self, url: &Address, record: &str) {
        if let Some(store) = &self.store
            && let Err(e) = store.save_object(url.as_str(), record)
        {
            tracing::error!("cannot keep data object {url}: {e:#}");
        }
    }

    fn persist_member(&self, url: &Address, observer: &Address, membership: Option<Membership>) {
        if let Some(store) = &self.store
            && let Err(e) = store.set_member(url.as_str(), observer.as_str(), membership)
        {
            tracing::error!("cannot keep the members of data object {url}: {e:#}");
        }
    }

    /// Sends what a change caused, as `reporter` (no syncher lock held).
    fn send_all(&self, reporter: &Address, messages: Vec<Message>) {
        let sender = self.bus.descriptor_of(reporter);
        for m in messages {
            let (to, kind) = (m.to.clone(), m.kind);
            if let Err(e) = self.bus.send(m, None, sender.as_deref()) {
                tracing::debug!(%to, "{} from a data object not delivered ({e}); a subscriber reads again", kind.as_str());
            }
        }
    }

    /// Sends a change's delta to each of its subscribers, as `reporter`
    /// (no syncher lock held): one message through the bus's fan-out, each
    /// subscriber's copy checked and delivered into its own inbox.
    fn send_deltas(&self, reporter: &Address, deltas: Deltas) {
        let sender = self.bus.descriptor_of(reporter);
        let kind = deltas.message.kind;
        let to = deltas.to.iter().cloned().chain(deltas.also);
        for e in self.bus.send_each(deltas.message, to, deltas.first_id, sender.as_deref()) {
            tracing::debug!("{} from a data object not delivered ({e}); a subscriber reads again", kind.as_str());
        }
    }

    pub fn create(&self, account: &Arc<Account>, scheme: &str, data: &str) -> Result<String, SyncError> {
        let valid_scheme = !scheme.is_empty()
            && scheme.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !["hyperty", "runtime", "domain"].contains(&scheme);
        if !valid_scheme {
            return Err(SyncError::Invalid(format!("{scheme:?} is not a data object scheme (a-z, 0-9, -; not hyperty/runtime/domain)")));
        }
        let reporter = &account.reporter;
        let url = Address::parse(format!("{scheme}://{}/{}", reporter.domain(), uuid::Uuid::new_v4())).map_err(SyncError::Invalid)?;
        let data = json_value(data, "data")?;
        let bytes = object_shape(&data, "data")?.bytes;
        account.check_size(url.as_str(), bytes)?;
        let object = Object {
            url: url.clone(),
            reporter: reporter.clone(),
            user: self.bus.descriptor_of(reporter).and_then(|d| d.user.clone()),
            scheme: scheme.to_owned(),
            version: 1,
            data,
            children: BTreeMap::new(),
            creators: BTreeMap::new(),
            subscribers: Arc::default(),
            invited: BTreeSet::new(),
            asking: 0,
            data_bytes: bytes,
            bytes,
            account: account.clone(),
            deleted: false,
        };
        let (registration, record) = (object.registration(), object.record());
        {
            let mut objects = self.objects.write().unwrap();
            let limits = &account.limits;
            let in_domain = objects.per_domain.get(reporter.domain()).copied().unwrap_or(0);
            if in_domain >= limits.objects as usize {
                return Err(account.refuse(format!("{} has {in_domain} data objects (objects = {})", reporter.domain(), limits.objects)));
            }
            let mine = objects.per_reporter.get(reporter).copied().unwrap_or(0);
            if mine >= limits.objects_per_hyperty as usize {
                return Err(account.refuse(format!("{reporter} has {mine} data objects (objects-per-hyperty = {})", limits.objects_per_hyperty)));
            }
            account.resize(0, bytes)?;
            objects.insert(object);
        }
        // Kept before the route exists: until then only this reporter's
        // calls, which come after this one, can change it.
        self.keep(&url, &record);
        self.publish(url.clone(), registration);
        tracing::debug!(%url, %reporter, "data object created");
        Ok(url.to_string())
    }

    pub fn invite(&self, account: &Arc<Account>, url: &str, observers: &[String]) -> Result<(), SyncError> {
        let observers = observers.iter().map(|o| observer(o)).collect::<Result<Vec<_>, _>>()?;
        let object = self.reported(url, &account.reporter)?;
        let mut o = object.lock().unwrap();
        live(&o)?;
        o.bind(account);
        let new: BTreeSet<&Address> = observers.iter().filter(|a| !o.invited.contains(*a)).collect();
        let max = o.account.limits.object_subscribers as usize;
        if o.invited.len() + new.len() > max {
            return Err(o.account.refuse(format!("{url} would have {} invited observers (object-subscribers = {max})", o.invited.len() + new.len())));
        }
        let invitation = self.invitation(&o);
        let mut invitees = Vec::new();
        for observer in new {
            o.invited.insert(observer.clone());
            self.persist_member(&o.url, observer, Some(Membership::Invited));
            invitees.push(observer.clone());
        }
        let (reporter, url) = (o.reporter.clone(), o.url.clone());
        drop(o);
        // reTHINK's invitation: a `create` from the object, so the observer
        // knows to subscribe; one text shared by every invitee's message.
        let sender = self.bus.descriptor_of(&reporter);
        let (invitation, resource) = (Text::shared(&invitation), Text::shared(url.as_str()));
        for observer in invitees {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut m = Message::new(id, MessageType::Create, url.clone(), observer, None);
            m.body.value = Some(invitation.clone());
            m.body.resource = Some(resource.clone());
            if let Err(e) = self.bus.send(m, None, sender.as_deref()) {
                tracing::debug!(%url, "invitation not delivered ({e}); the observer may still subscribe");
            }
        }
        Ok(())
    }

    /// The invitation's value: the object's state (`version`, `data`,
    /// `children`, `creators`, `reporter`, `user`, `scheme`) and its `url`;
    /// when that would make the message larger than the bus takes, only
    /// `url`, `scheme` and `reporter` (the invitee's `subscribe` brings the
    /// state).
    fn invitation(&self, o: &Object) -> String {
        let mut state = o.state();
        state["url"] = o.url.as_str().into();
        let full = state.to_string();
        if full.len() + 2 * o.url.as_str().len() + crate::address::MAX_ADDRESS_LEN <= self.bus.config().max_message_bytes {
            return full;
        }
        json!({ "url": o.url.as_str(), "scheme": o.scheme, "reporter": o.reporter.as_str() }).to_string()
    }

    /// Applies a JSON Patch to the data of `url`; the new version.
    pub fn update(&self, account: &Arc<Account>, url: &str, patch: &str) -> Result<u64, SyncError> {
        self.update_as(&account.reporter, Some(account), url, patch)
    }

    fn update_as(&self, caller: &Address, account: Option<&Arc<Account>>, url: &str, patch: &str) -> Result<u64, SyncError> {
        let ops = json_value(patch, "the patch")?;
        shape(&ops, MAX_JSON_DEPTH - 1).map_err(|e| SyncError::Invalid(format!("the patch is {e} (its delta adds one)")))?;
        let parsed: json_patch::Patch =
            serde_json::from_value(ops.clone()).map_err(|e| SyncError::Invalid(format!("not a JSON Patch (RFC 6902): {e}")))?;
        self.modify(caller, account, url, |o| {
            if &o.reporter != caller {
                return Err(SyncError::Forbidden(format!("only its reporter {} changes {url}", o.reporter)));
            }
            let room = (o.account.limits.object_bytes as usize).saturating_sub(o.bytes - o.data_bytes);
            let (data, measured) = patched(&o.data, &parsed, MAX_OBJECT_DEPTH, room).map_err(|e| match e {
                PatchError::TooLarge { op, .. } => o.account.refuse(format!(
                    "{} would pass object-bytes = {} after operation {op} of the patch",
                    o.url, o.account.limits.object_bytes
                )),
                e => SyncError::Invalid(e.to_string()),
            })?;
            let bytes = o.bytes - o.data_bytes + measured.bytes;
            o.account.resize(o.bytes, bytes)?;
            (o.data, o.data_bytes, o.bytes) = (data, measured.bytes, bytes);
            Ok(Change { kind: MessageType::Update, resource: o.url.to_string(), delta: Map::from_iter([("patch".into(), ops)]) })
        })
    }

    /// Creates or replaces child `name`, for the reporter or a subscriber
    /// (see [`Syncher::set_child_as`]); the new version.
    pub fn set_child(&self, account: &Arc<Account>, url: &str, name: &str, data: &str) -> Result<u64, SyncError> {
        self.set_child_as(&account.reporter, Some(account), url, name, data, None)
    }

    /// Sets child `name` of `url` for `caller`: the reporter or a
    /// subscriber may create one (its creator); only its creator replaces
    /// it. `exists`: `Some(false)` only creates, `Some(true)` only
    /// replaces. Charged to the object (its reporter's domain), whoever
    /// creates it. The new version; reporter (if the caller is not) and
    /// subscribers get the delta, naming the creator.
    fn set_child_as(&self, caller: &Address, account: Option<&Arc<Account>>, url: &str, name: &str, data: &str, exists: Option<bool>) -> Result<u64, SyncError> {
        check_child_name(name)?;
        let data = json_value(data, "the child's data")?;
        let data_bytes = object_shape(&data, "the child's data")?.bytes;
        self.modify(caller, account, url, |o| {
            let creator = match o.creator(name) {
                Some(creator) if creator != caller => {
                    return Err(SyncError::Forbidden(format!("child {name:?} of {} was created by {creator}: only it changes it", o.url)));
                }
                Some(_) if exists == Some(false) => return Err(SyncError::Invalid(format!("{} has a child {name:?} already", o.url))),
                Some(creator) => creator.clone(),
                None if caller != &o.reporter && !o.subscribers.contains(caller) => {
                    return Err(SyncError::Forbidden(format!("only its reporter {} and its subscribers add children to {}", o.reporter, o.url)));
                }
                None if exists == Some(true) => return Err(SyncError::NotFound(format!("{} has no child {name:?}", o.url))),
                None => caller.clone(),
            };
            let limits = &o.account.limits;
            let existed = o.children.contains_key(name);
            if !existed && o.children.len() >= limits.object_children as usize {
                return Err(o.account.refuse(format!("{} has {} children (object-children = {})", o.url, o.children.len(), limits.object_children)));
            }
            let by_observer = creator != o.reporter;
            let new_cost = name.len() + data_bytes + if by_observer { creator.as_str().len() } else { 0 };
            let bytes = o.bytes - o.child_bytes(name) + new_cost;
            o.account.check_size(o.url.as_str(), bytes)?;
            o.account.resize(o.bytes, bytes)?;
            o.bytes = bytes;
            o.children.insert(name.to_owned(), data.clone());
            if by_observer {
                o.creators.insert(name.to_owned(), creator.clone());
            }
            let kind = if existed { MessageType::Update } else { MessageType::Create };
            let delta = Map::from_iter([("data".into(), data), ("creator".into(), creator.as_str().into())]);
            Ok(Change { kind, resource: format!("{}/children/{name}", o.url), delta })
        })
    }

    /// Removes child `name`, for its creator or the reporter; the new version.
    pub fn remove_child(&self, account: &Arc<Account>, url: &str, name: &str) -> Result<u64, SyncError> {
        self.remove_child_as(&account.reporter, Some(account), url, name)
    }

    fn remove_child_as(&self, caller: &Address, account: Option<&Arc<Account>>, url: &str, name: &str) -> Result<u64, SyncError> {
        self.modify(caller, account, url, |o| {
            let Some(creator) = o.creator(name).cloned() else {
                return Err(SyncError::NotFound(format!("{url} has no child {name:?}")));
            };
            if caller != &creator && caller != &o.reporter {
                return Err(SyncError::Forbidden(format!("child {name:?} of {} is removed by its creator {creator} or the reporter", o.url)));
            }
            let bytes = o.bytes - o.child_bytes(name);
            o.account.resize(o.bytes, bytes)?;
            o.bytes = bytes;
            o.children.remove(name);
            o.creators.remove(name);
            let delta = Map::from_iter([("creator".into(), creator.as_str().into())]);
            Ok(Change { kind: MessageType::Delete, resource: format!("{}/children/{name}", o.url), delta })
        })
    }

    /// The object at `url` if `caller` reports it (not yet locked).
    fn reported(&self, url: &str, caller: &Address) -> Result<Arc<Mutex<Object>>, SyncError> {
        let address = Address::parse(url).map_err(|e| SyncError::Invalid(format!("url: {e}")))?;
        let object = self.object(&address)?;
        let reporter = object.lock().unwrap().reporter.clone();
        if &reporter != caller {
            return Err(SyncError::Forbidden(format!("only its reporter {reporter} changes {url}")));
        }
        Ok(object)
    }

    /// Runs `change` for `caller` on the object at `url`, under its lock
    /// (`change` checks what `caller` may do; the object is bound to
    /// `account` when `caller` is its reporter); on success the version
    /// goes up by one, the record is kept and, once the lock is released,
    /// each subscriber (and the reporter, if `caller` is not) gets the
    /// delta. The new version.
    fn modify(
        &self,
        caller: &Address,
        account: Option<&Arc<Account>>,
        url: &str,
        change: impl FnOnce(&mut Object) -> Result<Change, SyncError>,
    ) -> Result<u64, SyncError> {
        let address = Address::parse(url).map_err(|e| SyncError::Invalid(format!("url: {e}")))?;
        let object = self.object(&address)?;
        let mut o = object.lock().unwrap();
        live(&o)?;
        if let Some(account) = account.filter(|_| &o.reporter == caller) {
            o.bind(account);
        }
        let Change { kind, resource, delta } = change(&mut o)?;
        o.version += 1;
        self.persist(&o);
        let also = (&o.reporter != caller).then(|| o.reporter.clone());
        let deltas = o.deltas(&self.next_id, kind, resource, delta, also.as_ref());
        let (version, reporter) = (o.version, o.reporter.clone());
        drop(o);
        self.send_deltas(&reporter, deltas);
        Ok(version)
    }

    pub fn delete(&self, account: &Arc<Account>, url: &str) -> Result<(), SyncError> {
        self.delete_as(&account.reporter, url)
    }

    fn delete_as(&self, caller: &Address, url: &str) -> Result<(), SyncError> {
        let object = self.reported(url, caller)?;
        let mut o = object.lock().unwrap();
        live(&o)?;
        o.deleted = true;
        o.version += 1;
        o.account.memory.release(o.bytes);
        let deltas = o.deltas(&self.next_id, MessageType::Delete, o.url.to_string(), Map::new(), None);
        let (url, reporter) = (o.url.clone(), o.reporter.clone());
        drop(o);
        self.objects.write().unwrap().remove(&url, &reporter);
        self.bus.remove_route(&url);
        self.registry.unregister(url.domain(), &registry_name(&url));
        if let Some(store) = &self.store
            && let Err(e) = store.delete_object(url.as_str())
        {
            tracing::error!("cannot forget data object {url}: {e:#}");
        }
        self.send_deltas(&reporter, deltas);
        // Subscriptions and reads its reporter was still asked about: the
        // reporter's answer (or the bus's 408) would come to a route that
        // no longer exists, so they are answered here, now.
        let orphaned: Vec<Asking> = self.asking.lock().unwrap().extract_if(|_, a| a.url == url).map(|(_, a)| a).collect();
        for asking in orphaned {
            let request = Message::new(asking.request_id, asking.kind, asking.observer, asking.url, None);
            self.reply(&request, code::NOT_FOUND, None, format!("{url} was deleted while its reporter was asked"), Some(&reporter));
        }
        Ok(())
    }

    /// A message to an object's URL (its route), or to one of its
    /// children's (`<url>/children/<name>`): the observers' protocol.
    pub fn handle(&self, m: Message) {
        if m.kind == MessageType::Response {
            self.answered(m);
            return;
        }
        let found = match m.to.child() {
            Some((url, name)) if !self.objects.read().unwrap().by_url.contains_key(&m.to) => self.object(&url).map(|o| (o, Some(name))),
            _ => self.object(&m.to).map(|o| (o, None)),
        };
        let (object, child) = match found {
            Ok(found) => found,
            Err(e) => return self.reply(&m, code::NOT_FOUND, None, e.to_string(), None),
        };
        let (reporter, deleted, url) = {
            let o = object.lock().unwrap();
            (o.reporter.clone(), o.deleted, o.url.clone())
        };
        let reply = |status, value, description: String| self.reply(&m, status, value, description, Some(&reporter));
        if deleted {
            return reply(code::NOT_FOUND, None, format!("no data object {url}"));
        }
        if let Some(name) = child {
            return self.child_message(&m, url.as_str(), name, &reporter);
        }
        match m.kind {
            MessageType::Subscribe | MessageType::Read => self.ask(&object, &m, &reporter),
            MessageType::Unsubscribe => {
                let mut o = object.lock().unwrap();
                let left = o.subscribers.contains(&m.from) && Arc::make_mut(&mut o.subscribers).remove(&m.from);
                if left {
                    self.persist_member(&o.url, &m.from, o.invited.contains(&m.from).then_some(Membership::Invited));
                }
                drop(o);
                reply(code::OK, None, String::new());
                if left {
                    // The reporter is told, as it is asked when one comes.
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let value = json!({ "observer": m.from.as_str() }).to_string();
                    let mut told = Message::new(id, MessageType::Unsubscribe, url.clone(), reporter.clone(), Some(value));
                    told.body.resource = Some(url.as_str().into());
                    self.send_all(&reporter, vec![told]);
                }
            }
            MessageType::Update | MessageType::Create | MessageType::Delete => {
                // The reporter may also change its object by message.
                let result = match m.kind {
                    MessageType::Update => self.update_as(&m.from, None, m.to.as_str(), m.body.value.as_deref().unwrap_or("[]")).map(drop),
                    MessageType::Delete => self.delete_as(&m.from, m.to.as_str()),
                    _ => Err(SyncError::Invalid("objects are created with the syncher import; children at <url>/children/<name>".into())),
                };
                self.reply_result(&m, result.map(|()| None), &reporter);
            }
            _ => reply(
                code::METHOD_NOT_ALLOWED,
                None,
                format!("a data object takes subscribe, unsubscribe, read, update and delete, not {}", m.kind.as_str()),
            ),
        }
    }

    /// A message to child `name` of `url`: `create` (a new child, value
    /// its JSON data; the reporter or a subscriber), `update` (replaces
    /// its data; its creator), `delete` (its creator or the reporter),
    /// answered 200 with `{"version"}`.
    fn child_message(&self, m: &Message, url: &str, name: &str, reporter: &Address) {
        let data = m.body.value.as_deref();
        let result = match (m.kind, data) {
            (MessageType::Create | MessageType::Update, None) => Err(SyncError::Invalid(format!("a {} of a child needs its data as the value", m.kind.as_str()))),
            (MessageType::Create, Some(data)) => self.set_child_as(&m.from, None, url, name, data, Some(false)),
            (MessageType::Update, Some(data)) => self.set_child_as(&m.from, None, url, name, data, Some(true)),
            (MessageType::Delete, _) => self.remove_child_as(&m.from, None, url, name),
            _ => {
                let why = format!("a child of a data object takes create, update and delete, not {}", m.kind.as_str());
                return self.reply(m, code::METHOD_NOT_ALLOWED, None, why, Some(reporter));
            }
        };
        self.reply_result(m, result.map(|version| Some(json!({ "version": version }).to_string())), reporter);
    }

    /// Answers a write by message: 200 (with `value`), or the refusal:
    /// 403 forbidden, 404 not found, 413 a limit, 400 invalid.
    fn reply_result(&self, m: &Message, result: Result<Option<String>, SyncError>, reporter: &Address) {
        let (status, value, why) = match result {
            Ok(value) => (code::OK, value, String::new()),
            Err(SyncError::Forbidden(why)) => (code::FORBIDDEN, None, why),
            Err(e @ SyncError::NotFound(_)) => (code::NOT_FOUND, None, e.to_string()),
            Err(e @ SyncError::Limit(_)) => (code::PAYLOAD_TOO_LARGE, None, e.to_string()),
            Err(e) => (400, None, e.to_string()),
        };
        self.reply(m, status, value, why, Some(reporter));
    }

    /// A `subscribe` or `read` from an observer: accepted at once from the
    /// reporter, a subscriber (and, to subscribe, an invitee); otherwise
    /// the reporter is asked with a request of the same type from the
    /// object's URL, `{"observer": <address>}`, and its answer decides
    /// (see [`Syncher::answered`]). Asks waiting count with the
    /// subscribers against `object-subscribers`.
    fn ask(&self, object: &Arc<Mutex<Object>>, m: &Message, reporter: &Address) {
        let reply = |status, value, description: String| self.reply(m, status, value, description, Some(reporter));
        let read = m.kind == MessageType::Read;
        if let Err(e) = observer(m.from.as_str()) {
            let (status, why) = if read {
                (code::UNAUTHORIZED, format!("{} is not a subscriber of {}, and not a hyperty the reporter could allow", m.from, m.to))
            } else {
                (code::FORBIDDEN, e.to_string())
            };
            return reply(status, None, why);
        }
        let mut o = object.lock().unwrap();
        if o.deleted {
            drop(o);
            return reply(code::NOT_FOUND, None, format!("no data object {}", m.to));
        }
        let known = o.may_read(&m.from) || (!read && o.invited.contains(&m.from));
        let max = o.account.limits.object_subscribers as usize;
        if !known && o.subscribers.len() + o.asking >= max {
            let e = o.account.refuse(format!("{} has {} subscribers (object-subscribers = {max})", o.url, o.subscribers.len() + o.asking));
            drop(o);
            return reply(code::FORBIDDEN, None, e.to_string());
        }
        if known {
            if !read && !o.subscribers.contains(&m.from) && Arc::make_mut(&mut o.subscribers).insert(m.from.clone()) {
                self.persist_member(&o.url, &m.from, Some(Membership::Subscribed));
            }
            let state = o.state().to_string();
            drop(o);
            return reply(code::OK, Some(state), String::new());
        }
        // The reporter decides.
        o.asking += 1;
        drop(o);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut ask = Message::new(id, m.kind, m.to.clone(), reporter.clone(), Some(json!({ "observer": m.from.as_str() }).to_string()));
        ask.body.resource = Some(m.to.as_str().into());
        self.asking.lock().unwrap().insert(id, Asking { kind: m.kind, url: m.to.clone(), observer: m.from.clone(), request_id: m.id });
        let sender = self.bus.descriptor_of(reporter);
        if let Err(e) = self.bus.send(ask, Some(ACCEPT_TIMEOUT), sender.as_deref()) {
            // No answer will come: undo, unless the bus answered at once.
            if self.asking.lock().unwrap().remove(&id).is_some() {
                object.lock().unwrap().asking -= 1;
                reply(code::UNAVAILABLE, None, format!("the reporter cannot be asked: {e}"));
            }
        }
    }

    /// The reporter's answer to a forwarded subscription or read (or the
    /// host's 408). A provisional (1xx) answer is not one: the ask goes on
    /// waiting. To a subscription, 200 subscribes the observer, anything
    /// else is answered 403; to a read, 200 gives the state (no
    /// subscription), anything else 401.
    fn answered(&self, response: Message) {
        if crate::bus::provisional(&response) {
            return;
        }
        let Some(asking) = self.asking.lock().unwrap().remove(&response.id) else { return };
        let request = Message::new(asking.request_id, asking.kind, asking.observer.clone(), asking.url.clone(), None);
        let Ok(object) = self.object(&asking.url) else {
            return self.reply(&request, code::NOT_FOUND, None, format!("no data object {}", asking.url), None);
        };
        let read = asking.kind == MessageType::Read;
        let mut o = object.lock().unwrap();
        o.asking = o.asking.saturating_sub(1);
        let reporter = o.reporter.clone();
        let (status, state, why) = if o.deleted {
            (code::NOT_FOUND, None, format!("no data object {}", asking.url))
        } else if response.body.code == Some(code::OK) {
            if !read && !o.subscribers.contains(&asking.observer) && Arc::make_mut(&mut o.subscribers).insert(asking.observer.clone()) {
                self.persist_member(&o.url, &asking.observer, Some(Membership::Subscribed));
            }
            (code::OK, Some(o.state().to_string()), String::new())
        } else {
            let why = format!(
                "the reporter did not accept the {} (it answered {}{})",
                if read { "read" } else { "subscription" },
                response.body.code.unwrap_or(0),
                response.body.description.map(|d| format!(": {d}")).unwrap_or_default()
            );
            (if read { code::UNAUTHORIZED } else { code::FORBIDDEN }, None, why)
        };
        drop(o);
        self.reply(&request, status, state, why, Some(&reporter));
    }

    /// Answers `request` from the object's URL, as its `reporter` (for the
    /// policies; `None` when there is no such object).
    fn reply(&self, request: &Message, status: u16, value: Option<String>, description: String, reporter: Option<&Address>) {
        if request.kind == MessageType::Response {
            return;
        }
        let mut r = Message::response(request.id, request.to.clone(), request.from.clone(), status);
        r.body.value = value.map(Text::from);
        if !description.is_empty() {
            r.body.description = Some(description.into());
        }
        r.body.resource = Some(request.to.as_str().into());
        let sender = reporter.and_then(|r| self.bus.descriptor_of(r));
        if let Err(e) = self.bus.send(r, None, sender.as_deref()) {
            tracing::debug!(to = %request.from, "syncher answer not delivered: {e}");
        }
    }

    /// An object as kept in the store, charged to no domain until its
    /// reporter calls (see [`Object::bind`]).
    fn restore(&self, url: &str, record: &str, members: Vec<(String, Membership)>) -> Result<Object, String> {
        let v: Value = serde_json::from_str(record).map_err(|e| e.to_string())?;
        let address = |s: Option<&str>| Address::parse(s.unwrap_or_default());
        let reporter = address(v["reporter"].as_str())?;
        let data = v["data"].clone();
        let children: BTreeMap<String, Value> = serde_json::from_value(v["children"].clone()).map_err(|e| e.to_string())?;
        // Kept before observers could create children: none.
        let creators: BTreeMap<String, String> = serde_json::from_value(v["creators"].clone()).unwrap_or_default();
        let creators = creators.into_iter().map(|(name, c)| Ok((name, Address::parse(c)?))).collect::<Result<BTreeMap<_, _>, String>>()?;
        let data_bytes = shape(&data, MAX_OBJECT_DEPTH)?.bytes;
        let mut bytes = data_bytes;
        for (name, child) in &children {
            bytes += name.len() + shape(child, MAX_OBJECT_DEPTH)?.bytes + creators.get(name).map_or(0, |c| c.as_str().len());
        }
        let (memory, events) = &self.unclaimed;
        let account = Account::new(reporter.clone(), reporter.as_str().into(), &Limits::default(), memory.clone(), events.clone());
        memory.take(bytes);
        let mut object = Object {
            url: Address::parse(url)?,
            reporter,
            user: v["user"].as_str().map(str::to_owned),
            scheme: v["scheme"].as_str().unwrap_or_default().to_owned(),
            version: v["version"].as_u64().ok_or("no version")?,
            data,
            children,
            creators,
            subscribers: Arc::default(),
            invited: BTreeSet::new(),
            asking: 0,
            data_bytes,
            bytes,
            account,
            deleted: false,
        };
        for (observer, membership) in members {
            let observer = Address::parse(observer)?;
            if observer.scheme() != "hyperty" {
                continue; // kept before observers had to be hyperties; app connections do not outlive a runtime
            }
            match membership {
                Membership::Subscribed => Arc::make_mut(&mut object.subscribers).insert(observer),
                Membership::Invited => object.invited.insert(observer),
            };
        }
        Ok(object)
    }
}

fn live(o: &Object) -> Result<(), SyncError> {
    if o.deleted {
        return Err(SyncError::NotFound(format!("no data object {}", o.url)));
    }
    Ok(())
}

/// JSON text from a reporter (`what`: "data", "the patch"), checked by the
/// host's one JSON validation before it is parsed.
fn json_value(text: &str, what: &str) -> Result<Value, SyncError> {
    validate_value(text).map_err(|e| SyncError::Invalid(format!("{what}: {e}")))?;
    serde_json::from_str(text).map_err(|e| SyncError::Invalid(format!("{what} is not JSON: {e}")))
}

/// The shape of an object's data or a child, at most [`MAX_OBJECT_DEPTH`] deep.
fn object_shape(value: &Value, what: &str) -> Result<hyperty_replica::Shape, SyncError> {
    shape(value, MAX_OBJECT_DEPTH).map_err(|e| SyncError::Invalid(format!("{what} is too deep: {e} (a data object's limit)")))
}

/// An address that may observe a data object: a hyperty's (or an
/// embedder's endpoint standing for one) or an app's through the gateway
/// (`app://`), never a data object's URL or a runtime's, domain's or
/// protostub's address.
fn observer(address: &str) -> Result<Address, SyncError> {
    let a = Address::parse(address).map_err(|e| SyncError::Invalid(format!("observer {address:?}: {e}")))?;
    if a.scheme() != "hyperty" && a.scheme() != "app" {
        return Err(SyncError::Invalid(format!("{a} cannot observe a data object: observers are hyperties or apps (hyperty://, app:// addresses)")));
    }
    Ok(a)
}

/// A data object's registry name: its URL's path (unique in its domain).
fn registry_name(url: &Address) -> String {
    url.as_str().split_once("://").and_then(|(_, rest)| rest.split_once('/')).map_or_else(|| url.to_string(), |(_, path)| path.to_owned())
}

fn check_child_name(name: &str) -> Result<(), SyncError> {
    if !crate::address::valid_child_name(name) {
        return Err(SyncError::Invalid(format!("{name:?} is not a child name (1 to 256 letters, digits, -, _, .)")));
    }
    Ok(())
}

pub use hyperty_replica::{Applied, Delta, Replica};

impl<'a> From<&'a Message> for Delta<'a> {
    fn from(m: &'a Message) -> Delta<'a> {
        Delta { from: m.from.as_str(), kind: m.kind.as_str(), resource: m.body.resource.as_deref(), value: m.body.value.as_deref() }
    }
}
