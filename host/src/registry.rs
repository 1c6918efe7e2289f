//! The registry: what is registered in this runtime, where, and for whom.
//!
//! Every registration change is also announced, as a message on the bus
//! from the runtime's address, to the provider domain's remote registry at
//! `domain://registry.<domain>` (hyperties and data objects; protostubs and
//! IdP proxies are this runtime's own): `create` (the registration as JSON),
//! `update` (status changes, and a keep-alive for each registration every
//! `keep-alive` interval, which the remote registry uses to expire runtimes
//! that went away), `delete`. They reach the domain's registry here when
//! this runtime serves it ([`crate::domain_registry`]), else through the
//! domain's protostub; with neither, none is sent (the bus would answer
//! it 404), logged at debug.
//!
//! Hyperties are registered at deployment with what their bundle says of
//! them (name, domain, user, hyperty types, data-object schemes), move
//! through reTHINK's statuses (created → live; failed while restarting) and
//! are unregistered when undeployed or stopped for good. Guests discover
//! through the `registry` import, embedders through
//! [`Runtime::discover`](crate::Runtime::discover).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

use serde_json::json;

use crate::address::Address;
use crate::bus::Bus;
use crate::domain_registry::DomainRegistry;
use crate::message::{Message, MessageType};
use crate::policy::Descriptor;

/// What kind of component a registration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hyperty,
    Protostub,
    IdpProxy,
    DataObject,
}

/// reTHINK's registration status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Created,
    Live,
    Disconnected,
    Failed,
}

/// One registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub address: Address,
    pub kind: Kind,
    pub name: String,
    pub domain: String,
    pub user: Option<String>,
    pub hyperty_types: Vec<String>,
    pub schemes: Vec<String>,
    pub status: Status,
}

/// What to discover: every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub user: Option<String>,
    pub name: Option<String>,
    pub hyperty_type: Option<String>,
    pub domain: Option<String>,
    pub scheme: Option<String>,
}

impl Query {
    pub(crate) fn matches(&self, r: &Registration) -> bool {
        self.user.as_ref().is_none_or(|u| r.user.as_ref() == Some(u))
            && self.name.as_ref().is_none_or(|n| &r.name == n)
            && self.hyperty_type.as_ref().is_none_or(|t| r.hyperty_types.contains(t))
            && self.domain.as_ref().is_none_or(|d| &r.domain == d)
            && self.scheme.as_ref().is_none_or(|s| r.schemes.contains(s))
    }
}

/// Registrations by (domain, name), and which one is at an address (a
/// runtime holds 10,000 hyperties: a status change must not scan them);
/// discovery scans them.
#[derive(Default)]
pub struct Registry {
    entries: RwLock<Entries>,
    announcer: OnceLock<Announcer>,
    /// The domain registries this runtime serves, if any.
    served: OnceLock<Arc<DomainRegistry>>,
}

#[derive(Default)]
struct Entries {
    by_name: BTreeMap<(String, String), Registration>,
    by_address: HashMap<Address, (String, String)>,
}

/// Sends registration changes to the domains' remote registries.
struct Announcer {
    bus: Bus,
    runtime: Address,
    next_id: AtomicU64,
}

impl Announcer {
    /// `value` is made only when the announcement goes out.
    fn announce(&self, kind: MessageType, r: &Registration, value: impl FnOnce() -> serde_json::Value) {
        // Protostubs and IdP proxies are this runtime's own machinery, not
        // something its domain's registry lists.
        if matches!(r.kind, Kind::Protostub | Kind::IdpProxy) {
            return;
        }
        let Ok(to) = Address::parse(format!("domain://registry.{}", r.domain)) else { return };
        if !self.bus.reaches(&to) {
            // Neither served here nor carried: it would be answered 404
            // (a deployment of many hyperties would pay that twice each).
            tracing::debug!("registry announcement for {} not sent: no registry of {} is reachable", r.address, r.domain);
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = Message::new(id, kind, self.runtime.clone(), to, Some(value().to_string()));
        message.body.resource = Some(r.address.as_str().into());
        // On behalf of the registration's user: its assertion goes along,
        // for registries that want to know who announces.
        let on_behalf = Descriptor { domain: r.domain.clone(), name: r.name.clone(), user: r.user.clone() };
        if let Err(e) = self.bus.send(message, None, Some(&on_behalf)) {
            tracing::debug!("registry announcement for {} not sent: {e}", r.address);
        }
    }
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Live => "live",
            Status::Disconnected => "disconnected",
            Status::Failed => "failed",
        }
    }
}

impl Registration {
    /// The registration as announced to remote registries.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "address": self.address.as_str(),
            "kind": format!("{:?}", self.kind).to_lowercase(),
            "name": self.name,
            "domain": self.domain,
            "user": self.user,
            "hyperty-types": self.hyperty_types,
            "schemes": self.schemes,
            "status": self.status.as_str(),
        })
    }
}

impl Registry {
    /// Starts announcing registration changes from `runtime` over `bus`,
    /// with a keep-alive every `keep_alive`, for as long as the registry
    /// lives. Answers to the runtime's address (404 while no protostub
    /// serves a domain) are logged at debug.
    pub(crate) fn announce(self: &Arc<Self>, bus: Bus, runtime: Address, keep_alive: Duration) {
        let (tx, answers) = flume::bounded::<Message>(1024);
        if !bus.add_route(runtime.clone(), Arc::new(tx)) {
            tracing::warn!("{runtime} is already routed; registry announcements are off");
            return;
        }
        let _ = self.announcer.set(Announcer { bus, runtime, next_id: AtomicU64::new(1) });
        let registry: Weak<Registry> = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("hyperty-registry".into()).spawn(move || {
            loop {
                match answers.recv_timeout(keep_alive) {
                    Ok(answer) => tracing::debug!(
                        from = %answer.from,
                        code = answer.body.code,
                        "registry announcement answered: {}",
                        answer.body.description.as_deref().unwrap_or("")
                    ),
                    Err(flume::RecvTimeoutError::Timeout) => {
                        let Some(registry) = registry.upgrade() else { return };
                        registry.keep_alive();
                    }
                    Err(flume::RecvTimeoutError::Disconnected) => return,
                }
            }
        });
    }

    fn keep_alive(&self) {
        let Some(announcer) = self.announcer.get() else { return };
        // Sent after the lock is released: a send may call an IdP proxy.
        let all: Vec<Registration> = self.entries.read().unwrap().by_name.values().cloned().collect();
        for r in &all {
            announcer.announce(MessageType::Update, r, || json!({ "keep-alive": true, "status": r.status.as_str() }));
        }
    }

    /// Registers `registration`; false if its domain/name is taken.
    pub fn register(&self, registration: Registration) -> bool {
        let mut entries = self.entries.write().unwrap();
        let key = (registration.domain.clone(), registration.name.clone());
        if entries.by_name.contains_key(&key) {
            return false;
        }
        entries.by_address.insert(registration.address.clone(), key.clone());
        entries.by_name.insert(key, registration.clone());
        drop(entries);
        if let Some(announcer) = self.announcer.get() {
            announcer.announce(MessageType::Create, &registration, || registration.to_json());
        }
        true
    }

    pub fn unregister(&self, domain: &str, name: &str) {
        let removed = {
            let mut entries = self.entries.write().unwrap();
            let key = (domain.to_owned(), name.to_owned());
            let removed = entries.by_name.remove(&key);
            if let Some(r) = &removed
                && entries.by_address.get(&r.address) == Some(&key)
            {
                entries.by_address.remove(&r.address);
            }
            removed
        };
        if let (Some(r), Some(announcer)) = (removed, self.announcer.get()) {
            announcer.announce(MessageType::Delete, &r, || json!({}));
        }
    }

    /// Sets the status of the registration at `address`.
    pub fn set_status(&self, address: &Address, status: Status) {
        let changed = {
            let mut entries = self.entries.write().unwrap();
            let Entries { by_name, by_address } = &mut *entries;
            match by_address.get(address).and_then(|key| by_name.get_mut(key)) {
                Some(r) if r.status != status => {
                    r.status = status;
                    Some(r.clone())
                }
                _ => None,
            }
        };
        if let (Some(r), Some(announcer)) = (changed, self.announcer.get()) {
            announcer.announce(MessageType::Update, &r, || json!({ "status": status.as_str() }));
        }
    }

    pub fn lookup(&self, domain: &str, name: &str) -> Option<Address> {
        self.entries.read().unwrap().by_name.get(&(domain.to_owned(), name.to_owned())).map(|r| r.address.clone())
    }

    /// Adds what the domain registries served here know to discovery.
    pub(crate) fn include(&self, served: Arc<DomainRegistry>) {
        let _ = self.served.set(served);
    }

    /// The registrations matching `query`, ordered by domain and name: this
    /// runtime's, then what other runtimes announced to the domain
    /// registries it serves.
    pub fn discover(&self, query: &Query) -> Vec<Registration> {
        let mut found: Vec<Registration> = self.entries.read().unwrap().by_name.values().filter(|r| query.matches(r)).cloned().collect();
        if let (Some(served), Some(announcer)) = (self.served.get(), self.announcer.get()) {
            found.extend(served.discover(query, &announcer.runtime));
            found.sort_by(|a, b| (&a.domain, &a.name, &a.address).cmp(&(&b.domain, &b.name, &b.address)));
        }
        found
    }
}
