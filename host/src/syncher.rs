//! The syncher: reTHINK's synchronised data objects, kept by the host.
//!
//! A reporter hyperty creates an object (`syncher.create`); its URL
//! (`<scheme>://<domain>/<uuid>`) becomes a route on the bus, so observers
//! use plain messages: `subscribe` (accepted at once when invited, else the
//! reporter is asked and its 200/403 decides), `read` (subscribers and the
//! reporter: 200 with the state; others 401), `unsubscribe`. Only the
//! reporter changes or deletes the object, through the import or by
//! message; anyone else is refused 403 here, after and whatever the
//! policies (which still apply to every message on the way). Observers are
//! hyperties (and embedders' endpoints standing for them): `hyperty://`
//! addresses; anything else (a data object's URL, a runtime or domain
//! address) is refused as an observer.
//!
//! Decision: **deltas are JSON Patch (RFC 6902, `json-patch` crate)**,
//! versioned per object: every change of the data or a child bumps the
//! version by one, and each subscriber gets one small message per change
//! from the object's URL (never the whole object). [`Replica`] is the
//! observer side: apply in order, ignore what is stale, read again after a
//! gap. Fan-out sends each delta through the bus like any message (so the
//! receiver's policies, identity and back-pressure apply); a subscriber that
//! is away misses versions and resyncs with `read`.
//!
//! Bounds (the reporter's domain [`Limits`], charged to its [`Account`]):
//! objects per domain and per hyperty, an object's size (the JSON text of
//! its data and children, checked on a copy after every patch operation or
//! child change, before it replaces the object), children, subscribers
//! (and invitations); an object's bytes count in the domain's memory budget
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
//! `create` from the object's URL with `{"url", "scheme", "reporter"}`.
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
use crate::bus::{Bus, Route};
use crate::events::{EventKind, Events};
use crate::message::{MAX_JSON_DEPTH, Message, MessageType, code, validate_value};
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
    subscribers: BTreeSet<Address>,
    invited: BTreeSet<Address>,
    /// Subscriptions waiting for the reporter's answer.
    asking: usize,
    /// Bytes of the data's JSON text.
    data_bytes: usize,
    /// Bytes of the data's and every child's JSON text and the children's
    /// names: the size limited by `object-bytes` and charged to `account`.
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

    /// Charges the object to `account` from now on (a restored object, or
    /// a reporter restarted in a redeployed domain).
    fn bind(&mut self, account: &Arc<Account>) {
        if !Arc::ptr_eq(&self.account, account) {
            if !Arc::ptr_eq(&self.account.memory, &account.memory) {
                self.account.memory.release(self.bytes);
                account.memory.charge(self.bytes, usize::MAX);
            }
            self.account = account.clone();
        }
    }

    /// One message per subscriber, from the object's URL, about `resource`,
    /// carrying `delta` with the (new) version.
    fn deltas(&self, next_id: &AtomicU64, kind: MessageType, resource: String, mut delta: Map<String, Value>) -> Vec<Message> {
        delta.insert("version".into(), self.version.into());
        let value = Value::Object(delta).to_string();
        self.subscribers
            .iter()
            .map(|subscriber| {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let mut m = Message::new(id, kind, self.url.clone(), subscriber.clone(), Some(value.clone()));
                m.body.resource = Some(resource.clone());
                m
            })
            .collect()
    }
}

/// What a change sends its subscribers: the message type, what changed
/// (the object or one child) and the delta's fields besides the version.
struct Change {
    kind: MessageType,
    resource: String,
    delta: Map<String, Value>,
}

/// A subscription waiting for the reporter's answer.
struct Asking {
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
    this: Weak<Syncher>,
}

impl Syncher {
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
            this: this.clone(),
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
        self.bus.add_route(url, Route::Object(self.this.clone()));
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
            subscribers: BTreeSet::new(),
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
        let invitation = json!({ "url": o.url.as_str(), "scheme": o.scheme, "reporter": o.reporter.as_str() }).to_string();
        let mut invitations = Vec::new();
        for observer in new {
            o.invited.insert(observer.clone());
            self.persist_member(&o.url, observer, Some(Membership::Invited));
            // reTHINK's invitation: a `create` from the object, so the
            // observer knows to subscribe.
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut m = Message::new(id, MessageType::Create, o.url.clone(), observer.clone(), Some(invitation.clone()));
            m.body.resource = Some(o.url.to_string());
            invitations.push(m);
        }
        let reporter = o.reporter.clone();
        drop(o);
        self.send_all(&reporter, invitations);
        Ok(())
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
        self.change(caller, account, url, |o| {
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

    pub fn set_child(&self, account: &Arc<Account>, url: &str, name: &str, data: &str) -> Result<u64, SyncError> {
        check_child_name(name)?;
        let data = json_value(data, "the child's data")?;
        let child_bytes = name.len() + object_shape(&data, "the child's data")?.bytes;
        self.change(&account.reporter, Some(account), url, |o| {
            let limits = &o.account.limits;
            let old = o.children.get(name).map(|v| name.len() + shape(v, usize::MAX).map_or(0, |s| s.bytes));
            if old.is_none() && o.children.len() >= limits.object_children as usize {
                return Err(o.account.refuse(format!("{} has {} children (object-children = {})", o.url, o.children.len(), limits.object_children)));
            }
            let bytes = o.bytes - old.unwrap_or(0) + child_bytes;
            o.account.check_size(o.url.as_str(), bytes)?;
            o.account.resize(o.bytes, bytes)?;
            o.bytes = bytes;
            o.children.insert(name.to_owned(), data.clone());
            let kind = if old.is_some() { MessageType::Update } else { MessageType::Create };
            Ok(Change { kind, resource: format!("{}/children/{name}", o.url), delta: Map::from_iter([("data".into(), data)]) })
        })
    }

    pub fn remove_child(&self, account: &Arc<Account>, url: &str, name: &str) -> Result<u64, SyncError> {
        self.change(&account.reporter, Some(account), url, |o| {
            let Some(old) = o.children.remove(name) else {
                return Err(SyncError::NotFound(format!("{url} has no child {name:?}")));
            };
            let bytes = o.bytes - name.len() - shape(&old, usize::MAX).map_or(0, |s| s.bytes);
            o.account.resize(o.bytes, bytes)?;
            o.bytes = bytes;
            Ok(Change { kind: MessageType::Delete, resource: format!("{}/children/{name}", o.url), delta: Map::new() })
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

    /// Runs `change` on the object at `url` that `caller` reports, under
    /// its lock (bound to `account` if given); on success the version goes
    /// up by one, the record is kept and, once the lock is released, each
    /// subscriber gets the delta. The new version.
    fn change(
        &self,
        caller: &Address,
        account: Option<&Arc<Account>>,
        url: &str,
        change: impl FnOnce(&mut Object) -> Result<Change, SyncError>,
    ) -> Result<u64, SyncError> {
        let object = self.reported(url, caller)?;
        let mut o = object.lock().unwrap();
        live(&o)?;
        if let Some(account) = account {
            o.bind(account);
        }
        let Change { kind, resource, delta } = change(&mut o)?;
        o.version += 1;
        self.persist(&o);
        let deltas = o.deltas(&self.next_id, kind, resource, delta);
        let (version, reporter) = (o.version, o.reporter.clone());
        drop(o);
        self.send_all(&reporter, deltas);
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
        let deltas = o.deltas(&self.next_id, MessageType::Delete, o.url.to_string(), Map::new());
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
        self.send_all(&reporter, deltas);
        Ok(())
    }

    /// A message to an object's URL (its route): the observers' protocol.
    pub fn handle(&self, m: Message) {
        if m.kind == MessageType::Response {
            self.answered(m);
            return;
        }
        let object = match self.object(&m.to) {
            Ok(o) => o,
            Err(e) => return self.reply(&m, code::NOT_FOUND, None, e.to_string(), None),
        };
        let (reporter, deleted) = {
            let o = object.lock().unwrap();
            (o.reporter.clone(), o.deleted)
        };
        let reply = |status, value, description: String| self.reply(&m, status, value, description, Some(&reporter));
        if deleted {
            return reply(code::NOT_FOUND, None, format!("no data object {}", m.to));
        }
        match m.kind {
            MessageType::Subscribe => self.subscribe(&object, &m, &reporter),
            MessageType::Unsubscribe => {
                let mut o = object.lock().unwrap();
                if o.subscribers.remove(&m.from) {
                    self.persist_member(&o.url, &m.from, o.invited.contains(&m.from).then_some(Membership::Invited));
                }
                drop(o);
                reply(code::OK, None, String::new());
            }
            MessageType::Read => {
                let o = object.lock().unwrap();
                let state = (o.may_read(&m.from) && !o.deleted).then(|| o.state().to_string());
                drop(o);
                match state {
                    Some(state) => reply(code::OK, Some(state), String::new()),
                    None => reply(code::UNAUTHORIZED, None, format!("{} is not a subscriber of {}: subscribe first", m.from, m.to)),
                }
            }
            MessageType::Update | MessageType::Create | MessageType::Delete => {
                // The reporter may also change its object by message.
                let result = match m.kind {
                    MessageType::Update => self.update_as(&m.from, None, m.to.as_str(), m.body.value.as_deref().unwrap_or("[]")).map(drop),
                    MessageType::Delete => self.delete_as(&m.from, m.to.as_str()),
                    _ => Err(SyncError::Invalid("objects are created with the syncher import".into())),
                };
                match result {
                    Ok(()) => reply(code::OK, None, String::new()),
                    Err(SyncError::Forbidden(why)) => reply(code::FORBIDDEN, None, why),
                    Err(e @ SyncError::NotFound(_)) => reply(code::NOT_FOUND, None, e.to_string()),
                    Err(e @ SyncError::Limit(_)) => reply(413, None, e.to_string()),
                    Err(e) => reply(400, None, e.to_string()),
                }
            }
            _ => reply(
                code::METHOD_NOT_ALLOWED,
                None,
                format!("a data object takes subscribe, unsubscribe, read, update and delete, not {}", m.kind.as_str()),
            ),
        }
    }

    fn subscribe(&self, object: &Arc<Mutex<Object>>, m: &Message, reporter: &Address) {
        let reply = |status, value, description: String| self.reply(m, status, value, description, Some(reporter));
        if let Err(e) = observer(m.from.as_str()) {
            return reply(code::FORBIDDEN, None, e.to_string());
        }
        let mut o = object.lock().unwrap();
        if o.deleted {
            drop(o);
            return reply(code::NOT_FOUND, None, format!("no data object {}", m.to));
        }
        let known = o.subscribers.contains(&m.from);
        let max = o.account.limits.object_subscribers as usize;
        if !known && o.subscribers.len() + o.asking >= max {
            let e = o.account.refuse(format!("{} has {} subscribers (object-subscribers = {max})", o.url, o.subscribers.len() + o.asking));
            drop(o);
            return reply(code::FORBIDDEN, None, e.to_string());
        }
        if known || o.may_read(&m.from) || o.invited.contains(&m.from) {
            if o.subscribers.insert(m.from.clone()) {
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
        let mut ask = Message::new(id, MessageType::Subscribe, m.to.clone(), reporter.clone(), Some(json!({ "observer": m.from.as_str() }).to_string()));
        ask.body.resource = Some(m.to.to_string());
        self.asking.lock().unwrap().insert(id, Asking { url: m.to.clone(), observer: m.from.clone(), request_id: m.id });
        let sender = self.bus.descriptor_of(reporter);
        if let Err(e) = self.bus.send(ask, Some(ACCEPT_TIMEOUT), sender.as_deref()) {
            // No answer will come: undo, unless the bus answered at once.
            if self.asking.lock().unwrap().remove(&id).is_some() {
                object.lock().unwrap().asking -= 1;
                reply(code::UNAVAILABLE, None, format!("the reporter cannot be asked: {e}"));
            }
        }
    }

    /// The reporter's answer to a forwarded subscription (or the host's 408).
    fn answered(&self, response: Message) {
        let Some(asking) = self.asking.lock().unwrap().remove(&response.id) else { return };
        let request = Message::new(asking.request_id, MessageType::Subscribe, asking.observer.clone(), asking.url.clone(), None);
        let Ok(object) = self.object(&asking.url) else {
            return self.reply(&request, code::NOT_FOUND, None, format!("no data object {}", asking.url), None);
        };
        let mut o = object.lock().unwrap();
        o.asking = o.asking.saturating_sub(1);
        let reporter = o.reporter.clone();
        let (status, state, why) = if o.deleted {
            (code::NOT_FOUND, None, format!("no data object {}", asking.url))
        } else if response.body.code == Some(code::OK) {
            if o.subscribers.insert(asking.observer.clone()) {
                self.persist_member(&o.url, &asking.observer, Some(Membership::Subscribed));
            }
            (code::OK, Some(o.state().to_string()), String::new())
        } else {
            let why = format!(
                "the reporter did not accept the subscription (it answered {}{})",
                response.body.code.unwrap_or(0),
                response.body.description.map(|d| format!(": {d}")).unwrap_or_default()
            );
            (code::FORBIDDEN, None, why)
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
        r.body.value = value;
        if !description.is_empty() {
            r.body.description = Some(description);
        }
        r.body.resource = Some(request.to.to_string());
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
        let data_bytes = shape(&data, MAX_OBJECT_DEPTH)?.bytes;
        let mut bytes = data_bytes;
        for (name, child) in &children {
            bytes += name.len() + shape(child, MAX_OBJECT_DEPTH)?.bytes;
        }
        let (memory, events) = &self.unclaimed;
        let account = Account::new(reporter.clone(), reporter.as_str().into(), &Limits::default(), memory.clone(), events.clone());
        memory.charge(bytes, usize::MAX);
        let mut object = Object {
            url: Address::parse(url)?,
            reporter,
            user: v["user"].as_str().map(str::to_owned),
            scheme: v["scheme"].as_str().unwrap_or_default().to_owned(),
            version: v["version"].as_u64().ok_or("no version")?,
            data,
            children,
            subscribers: BTreeSet::new(),
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
                continue; // kept before observers had to be hyperties
            }
            match membership {
                Membership::Subscribed => object.subscribers.insert(observer),
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
    if name.is_empty() || name.len() > 256 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
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
