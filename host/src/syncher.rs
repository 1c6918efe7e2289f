//! The syncher: reTHINK's synchronised data objects, kept by the host.
//!
//! A reporter hyperty creates an object (`syncher.create`); its URL
//! (`<scheme>://<domain>/<uuid>`) becomes a route on the bus, so observers
//! use plain messages: `subscribe` (accepted at once when invited, else the
//! reporter is asked and its 200/403 decides), `read` (subscribers and the
//! reporter: 200 with the state; others 401), `unsubscribe`. Only the
//! reporter changes or deletes the object, through the import or by
//! message; anyone else is refused 403 here, after and whatever the
//! policies (which still apply to every message on the way).
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
//! Objects are registered (kind `data-object`, their scheme, the reporter's
//! user) while they exist, so they are discovered by scheme like anything
//! else. `invite` also sends each new invitee reTHINK's invitation: a
//! `create` from the object's URL with `{"url", "scheme", "reporter"}`.
//!
//! With a data directory, objects (durably, on every change) and their
//! members (subscribed / invited; synced with the next object write) are
//! kept in the runtime's store and restored at start: routes come back,
//! subscribers keep getting changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use serde_json::{Value, json};

use crate::address::Address;
use crate::bus::{Bus, Route};
use crate::message::{Message, MessageType, code};
use crate::registry::{Kind, Registration, Registry, Status};
use crate::store::{Membership, Store};

/// Why the syncher refused a reporter's call; mirrors the WIT `sync-error`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid: {0}")]
    Invalid(String),
}

/// How long a reporter has to accept or refuse a subscription.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// A subscription waiting for the reporter's answer.
struct Asking {
    url: Address,
    observer: Address,
    request_id: u64,
}

/// The data objects of a runtime.
pub(crate) struct Syncher {
    bus: Bus,
    registry: Arc<Registry>,
    store: Option<Arc<Store>>,
    objects: RwLock<HashMap<Address, Arc<Mutex<Object>>>>,
    /// Subscriptions forwarded to reporters, by the forwarded request's id.
    asking: Mutex<HashMap<u64, Asking>>,
    next_id: AtomicU64,
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
            this: this.clone(),
        });
        if let Some(store) = &syncher.store {
            for (url, record, members) in store.objects()? {
                match restore(&url, &record, members) {
                    Ok(object) => syncher.add(object),
                    Err(e) => tracing::warn!("data object {url} in the store is unreadable, skipped: {e}"),
                }
            }
        }
        Ok(syncher)
    }

    fn add(&self, object: Object) {
        let url = object.url.clone();
        self.registry.register(object.registration());
        self.objects.write().unwrap().insert(url.clone(), Arc::new(Mutex::new(object)));
        self.bus.add_route(url, Route::Object(self.this.clone()));
    }

    fn object(&self, url: &str) -> Result<Arc<Mutex<Object>>, SyncError> {
        let address = Address::parse(url).map_err(|e| SyncError::Invalid(format!("url: {e}")))?;
        self.objects.read().unwrap().get(&address).cloned().ok_or_else(|| SyncError::NotFound(format!("no data object {url}")))
    }

    /// The object at `url` if `caller` reports it.
    fn reported(&self, url: &str, caller: &Address) -> Result<Arc<Mutex<Object>>, SyncError> {
        let object = self.object(url)?;
        let reporter = object.lock().unwrap().reporter.clone();
        if &reporter != caller {
            return Err(SyncError::Forbidden(format!("only its reporter {reporter} changes {url}")));
        }
        Ok(object)
    }

    fn persist(&self, o: &Object) {
        if let Some(store) = &self.store
            && let Err(e) = store.save_object(o.url.as_str(), &o.record())
        {
            tracing::error!("cannot keep data object {}: {e:#}", o.url);
        }
    }

    fn persist_member(&self, url: &Address, observer: &Address, membership: Option<Membership>) {
        if let Some(store) = &self.store
            && let Err(e) = store.set_member(url.as_str(), observer.as_str(), membership)
        {
            tracing::error!("cannot keep the members of data object {url}: {e:#}");
        }
    }

    pub fn create(&self, reporter: &Address, scheme: &str, data: &str) -> Result<String, SyncError> {
        let valid_scheme = !scheme.is_empty()
            && scheme.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !["hyperty", "runtime", "domain"].contains(&scheme);
        if !valid_scheme {
            return Err(SyncError::Invalid(format!("{scheme:?} is not a data object scheme (a-z, 0-9, -; not hyperty/runtime/domain)")));
        }
        let data: Value = serde_json::from_str(data).map_err(|e| SyncError::Invalid(format!("data is not JSON: {e}")))?;
        let url = Address::parse(format!("{scheme}://{}/{}", reporter.domain(), uuid::Uuid::new_v4())).map_err(SyncError::Invalid)?;
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
        };
        self.persist(&object);
        self.add(object);
        tracing::debug!(%url, %reporter, "data object created");
        Ok(url.to_string())
    }

    pub fn invite(&self, caller: &Address, url: &str, observers: &[String]) -> Result<(), SyncError> {
        let object = self.reported(url, caller)?;
        let observers = observers
            .iter()
            .map(|o| Address::parse(o.as_str()).map_err(|e| SyncError::Invalid(format!("observer {o:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut o = object.lock().unwrap();
        let reporter = self.bus.descriptor_of(&o.reporter);
        let invitation = json!({ "url": o.url.as_str(), "scheme": o.scheme, "reporter": o.reporter.as_str() }).to_string();
        for observer in observers {
            if o.invited.insert(observer.clone()) {
                self.persist_member(&o.url, &observer, Some(Membership::Invited));
                // reTHINK's invitation: a `create` from the object, so the
                // observer knows to subscribe.
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let mut m = Message::new(id, MessageType::Create, o.url.clone(), observer, Some(invitation.clone()));
                m.body.resource = Some(o.url.to_string());
                if let Err(e) = self.bus.send(m, None, reporter.as_deref()) {
                    tracing::debug!(object = %o.url, "invitation not delivered: {e}");
                }
            }
        }
        Ok(())
    }

    /// Applies a JSON Patch to the data of `url`; the new version.
    pub fn update(&self, caller: &Address, url: &str, patch: &str) -> Result<u64, SyncError> {
        let object = self.reported(url, caller)?;
        let ops: Value = serde_json::from_str(patch).map_err(|e| SyncError::Invalid(format!("the patch is not JSON: {e}")))?;
        let parsed: json_patch::Patch =
            serde_json::from_value(ops.clone()).map_err(|e| SyncError::Invalid(format!("not a JSON Patch (RFC 6902): {e}")))?;
        let mut o = object.lock().unwrap();
        let mut data = o.data.clone();
        json_patch::patch(&mut data, &parsed).map_err(|e| SyncError::Invalid(format!("the patch does not apply: {e}")))?;
        o.data = data;
        o.version += 1;
        self.persist(&o);
        let delta = json!({ "version": o.version, "patch": ops }).to_string();
        self.fan_out(&o, MessageType::Update, o.url.to_string(), delta);
        Ok(o.version)
    }

    pub fn set_child(&self, caller: &Address, url: &str, name: &str, data: &str) -> Result<u64, SyncError> {
        check_child_name(name)?;
        let object = self.reported(url, caller)?;
        let data: Value = serde_json::from_str(data).map_err(|e| SyncError::Invalid(format!("data is not JSON: {e}")))?;
        let mut o = object.lock().unwrap();
        let kind = if o.children.contains_key(name) { MessageType::Update } else { MessageType::Create };
        o.children.insert(name.to_owned(), data.clone());
        o.version += 1;
        self.persist(&o);
        let delta = json!({ "version": o.version, "data": data }).to_string();
        self.fan_out(&o, kind, format!("{}/children/{name}", o.url), delta);
        Ok(o.version)
    }

    pub fn remove_child(&self, caller: &Address, url: &str, name: &str) -> Result<u64, SyncError> {
        let object = self.reported(url, caller)?;
        let mut o = object.lock().unwrap();
        if o.children.remove(name).is_none() {
            return Err(SyncError::NotFound(format!("{url} has no child {name:?}")));
        }
        o.version += 1;
        self.persist(&o);
        let delta = json!({ "version": o.version }).to_string();
        self.fan_out(&o, MessageType::Delete, format!("{}/children/{name}", o.url), delta);
        Ok(o.version)
    }

    pub fn delete(&self, caller: &Address, url: &str) -> Result<(), SyncError> {
        let object = self.reported(url, caller)?;
        let mut o = object.lock().unwrap();
        o.version += 1;
        let delta = json!({ "version": o.version }).to_string();
        self.fan_out(&o, MessageType::Delete, o.url.to_string(), delta);
        self.objects.write().unwrap().remove(&o.url);
        self.bus.remove_route(&o.url);
        self.registry.unregister(o.url.domain(), &registry_name(&o.url));
        if let Some(store) = &self.store
            && let Err(e) = store.delete_object(o.url.as_str())
        {
            tracing::error!("cannot forget data object {}: {e:#}", o.url);
        }
        Ok(())
    }

    /// One message per subscriber, from the object's URL, about `resource`.
    fn fan_out(&self, o: &Object, kind: MessageType, resource: String, value: String) {
        let reporter = self.bus.descriptor_of(&o.reporter);
        for subscriber in &o.subscribers {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut m = Message::new(id, kind, o.url.clone(), subscriber.clone(), Some(value.clone()));
            m.body.resource = Some(resource.clone());
            if let Err(e) = self.bus.send(m, None, reporter.as_deref()) {
                tracing::debug!(object = %o.url, %subscriber, "version {} not delivered ({e}); it will read again", o.version);
            }
        }
    }

    /// A message to an object's URL (its route): the observers' protocol.
    pub fn handle(&self, m: Message) {
        if m.kind == MessageType::Response {
            self.answered(m);
            return;
        }
        let object = match self.objects.read().unwrap().get(&m.to).cloned() {
            Some(o) => o,
            None => return self.reply(&m, code::NOT_FOUND, None, format!("no data object {}", m.to)),
        };
        match m.kind {
            MessageType::Subscribe => self.subscribe(&object, m),
            MessageType::Unsubscribe => {
                let mut o = object.lock().unwrap();
                if o.subscribers.remove(&m.from) {
                    self.persist_member(&o.url, &m.from, o.invited.contains(&m.from).then_some(Membership::Invited));
                }
                drop(o);
                self.reply(&m, code::OK, None, String::new());
            }
            MessageType::Read => {
                let o = object.lock().unwrap();
                if o.may_read(&m.from) {
                    let state = o.state().to_string();
                    drop(o);
                    self.reply(&m, code::OK, Some(state), String::new());
                } else {
                    drop(o);
                    self.reply(&m, code::UNAUTHORIZED, None, format!("{} is not a subscriber of {}: subscribe first", m.from, m.to));
                }
            }
            MessageType::Update | MessageType::Create | MessageType::Delete => {
                // The reporter may also change its object by message.
                let result = match m.kind {
                    MessageType::Update => self.update(&m.from, m.to.as_str(), m.body.value.as_deref().unwrap_or("[]")).map(drop),
                    MessageType::Delete => self.delete(&m.from, m.to.as_str()),
                    _ => Err(SyncError::Invalid("objects are created with the syncher import".into())),
                };
                match result {
                    Ok(()) => self.reply(&m, code::OK, None, String::new()),
                    Err(SyncError::Forbidden(why)) => self.reply(&m, code::FORBIDDEN, None, why),
                    Err(e) => self.reply(&m, 400, None, e.to_string()),
                }
            }
            _ => self.reply(&m, code::METHOD_NOT_ALLOWED, None, format!("a data object takes subscribe, unsubscribe, read, update and delete, not {}", m.kind.as_str())),
        }
    }

    fn subscribe(&self, object: &Arc<Mutex<Object>>, m: Message) {
        let mut o = object.lock().unwrap();
        if o.may_read(&m.from) || o.invited.contains(&m.from) {
            if o.subscribers.insert(m.from.clone()) {
                self.persist_member(&o.url, &m.from, Some(Membership::Subscribed));
            }
            let state = o.state().to_string();
            drop(o);
            return self.reply(&m, code::OK, Some(state), String::new());
        }
        // The reporter decides.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut ask = Message::new(id, MessageType::Subscribe, o.url.clone(), o.reporter.clone(), Some(json!({ "observer": m.from.as_str() }).to_string()));
        ask.body.resource = Some(o.url.to_string());
        let reporter = self.bus.descriptor_of(&o.reporter);
        drop(o);
        self.asking.lock().unwrap().insert(id, Asking { url: m.to.clone(), observer: m.from.clone(), request_id: m.id });
        if let Err(e) = self.bus.send(ask, Some(ACCEPT_TIMEOUT), reporter.as_deref()) {
            self.asking.lock().unwrap().remove(&id);
            self.reply(&m, code::UNAVAILABLE, None, format!("the reporter cannot be asked: {e}"));
        }
    }

    /// The reporter's answer to a forwarded subscription (or the host's 408).
    fn answered(&self, response: Message) {
        let Some(asking) = self.asking.lock().unwrap().remove(&response.id) else { return };
        let request = Message::new(asking.request_id, MessageType::Subscribe, asking.observer.clone(), asking.url.clone(), None);
        let Ok(object) = self.object(asking.url.as_str()) else {
            return self.reply(&request, code::NOT_FOUND, None, format!("no data object {}", asking.url));
        };
        if response.body.code == Some(code::OK) {
            let mut o = object.lock().unwrap();
            if o.subscribers.insert(asking.observer.clone()) {
                self.persist_member(&o.url, &asking.observer, Some(Membership::Subscribed));
            }
            let state = o.state().to_string();
            drop(o);
            self.reply(&request, code::OK, Some(state), String::new());
        } else {
            let why = format!(
                "the reporter did not accept the subscription (it answered {}{})",
                response.body.code.unwrap_or(0),
                response.body.description.map(|d| format!(": {d}")).unwrap_or_default()
            );
            self.reply(&request, code::FORBIDDEN, None, why);
        }
    }

    fn reply(&self, request: &Message, status: u16, value: Option<String>, description: String) {
        if request.kind == MessageType::Response {
            return;
        }
        let mut r = Message::response(request.id, request.to.clone(), request.from.clone(), status);
        r.body.value = value;
        if !description.is_empty() {
            r.body.description = Some(description);
        }
        r.body.resource = Some(request.to.to_string());
        let reporter = self.objects.read().unwrap().get(&request.to).map(|o| o.lock().unwrap().reporter.clone());
        let sender = reporter.and_then(|r| self.bus.descriptor_of(&r));
        if let Err(e) = self.bus.send(r, None, sender.as_deref()) {
            tracing::debug!(to = %request.from, "syncher answer not delivered: {e}");
        }
    }
}

/// A data object's registry name: its URL's path (unique in its domain).
fn registry_name(url: &Address) -> String {
    url.as_str().split_once("://").and_then(|(_, rest)| rest.split_once('/')).map_or_else(|| url.to_string(), |(_, path)| path.to_owned())
}

fn check_child_name(name: &str) -> Result<(), SyncError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(SyncError::Invalid(format!("{name:?} is not a child name (letters, digits, -, _, .)")));
    }
    Ok(())
}

fn restore(url: &str, record: &str, members: Vec<(String, Membership)>) -> Result<Object, String> {
    let v: Value = serde_json::from_str(record).map_err(|e| e.to_string())?;
    let address = |s: Option<&str>| Address::parse(s.unwrap_or_default());
    let mut object = Object {
        url: Address::parse(url)?,
        reporter: address(v["reporter"].as_str())?,
        user: v["user"].as_str().map(str::to_owned),
        scheme: v["scheme"].as_str().unwrap_or_default().to_owned(),
        version: v["version"].as_u64().ok_or("no version")?,
        data: v["data"].clone(),
        children: serde_json::from_value(v["children"].clone()).map_err(|e| e.to_string())?,
        subscribers: BTreeSet::new(),
        invited: BTreeSet::new(),
    };
    for (observer, membership) in members {
        let observer = Address::parse(observer)?;
        match membership {
            Membership::Subscribed => object.subscribers.insert(observer),
            Membership::Invited => object.invited.insert(observer),
        };
    }
    Ok(object)
}

pub use hyperty_replica::{Applied, Delta, Replica};

impl<'a> From<&'a Message> for Delta<'a> {
    fn from(m: &'a Message) -> Delta<'a> {
        Delta { from: m.from.as_str(), kind: m.kind.as_str(), resource: m.body.resource.as_deref(), value: m.body.value.as_deref() }
    }
}
