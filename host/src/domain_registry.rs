//! The domain registry: what a provider domain's back-end registry does
//! with the announcements runtimes send to `domain://registry.<domain>`.
//!
//! A runtime serves the registry of the domains it is told to
//! ([`RuntimeConfig::serve_registries`](crate::RuntimeConfig), CLI
//! `--serve-registry`): it routes their registry addresses to one service
//! thread, which keeps every registration announced by a runtime (`create`
//! with the registration as JSON; `update` with a new status and/or a
//! keep-alive; `delete`) and expires those whose runtime stopped refreshing
//! them — reTHINK's keep-alive and expiry. Protostubs carry other
//! runtimes' announcements here (the registry address is listened for like
//! any local address of the domain), so discovery ([`crate::registry::Registry::discover`])
//! finds hyperties running anywhere in the domain.
//!
//! Who may announce what (the registry is a trust boundary: protostubs
//! bring announcements from anyone who can publish on the node):
//!
//! - only a `runtime://` address, and only registrations of the registry's
//!   own domain;
//! - this runtime (its sender is routed here: nothing arriving through a
//!   stub may claim a routed address) announces what it hosts;
//! - another runtime (its announcement came through a stub) never an
//!   address routed here, and, when the announcement carries a validated
//!   identity (where the domain requires identity the bus refuses it
//!   without one, 401), only registrations of that very user: a runtime
//!   speaks for the users of the hyperties it hosts, whose assertions it
//!   attaches;
//! - a runtime updates and deletes only its own registrations, as the user
//!   that announced them.
//!
//! A refused or malformed announcement is logged and dropped
//! (announcements are notifications: nobody waits for an answer).

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::address::Address;
use crate::bus::Bus;
use crate::message::{Message, MessageType};
use crate::registry::{Kind, Query, Registration, Status};

/// A registration another runtime announced.
struct Remote {
    registration: Registration,
    runtime: Address,
    /// The validated user that announced it, if the announcement carried one.
    announcer: Option<String>,
    last_seen: Instant,
}

/// The registrations announced to the registries this runtime serves.
#[derive(Default)]
pub(crate) struct DomainRegistry {
    entries: RwLock<HashMap<Address, Remote>>,
}

/// A registration as announced ([`Registration::to_json`]).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Announced {
    address: String,
    kind: String,
    name: String,
    domain: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    hyperty_types: Vec<String>,
    #[serde(default)]
    schemes: Vec<String>,
    status: String,
}

fn status(text: &str) -> Result<Status, String> {
    Ok(match text {
        "created" => Status::Created,
        "live" => Status::Live,
        "disconnected" => Status::Disconnected,
        "failed" => Status::Failed,
        other => return Err(format!("unknown status {other:?}")),
    })
}

impl DomainRegistry {
    /// Serves the registries of `domains` on `bus`: registrations not
    /// refreshed within `expiry` are dropped. Runs until the bus drops the
    /// routes' receivers' last sender (the runtime goes away).
    pub fn serve(self: &Arc<Self>, bus: &Bus, domains: &[String], expiry: Duration) -> anyhow::Result<()> {
        let (tx, rx) = flume::bounded::<Message>(4096);
        for domain in domains {
            let address = Address::parse(format!("domain://registry.{domain}")).map_err(anyhow::Error::msg)?;
            if !bus.add_route(address.clone(), Arc::new(tx.clone())) {
                anyhow::bail!("{address} is already routed");
            }
        }
        drop(tx);
        let registry: Weak<DomainRegistry> = Arc::downgrade(self);
        let bus = bus.downgrade();
        let sweep = (expiry / 4).max(Duration::from_millis(10));
        std::thread::Builder::new().name("hyperty-domain-registry".into()).spawn(move || {
            // Expiry runs once per sweep, not after every announcement.
            let mut next_sweep = Instant::now() + sweep;
            loop {
                let received = rx.recv_deadline(next_sweep);
                let Some(registry) = registry.upgrade() else { return };
                match received {
                    Ok(m) => {
                        let Some(bus) = bus.upgrade() else { return };
                        if let Err(e) = registry.apply(&m, &bus) {
                            tracing::warn!(from = %m.from, to = %m.to, "registry announcement dropped: {e}");
                        }
                    }
                    Err(flume::RecvTimeoutError::Timeout) => {}
                    Err(flume::RecvTimeoutError::Disconnected) => return,
                }
                if Instant::now() >= next_sweep {
                    registry.expire(expiry);
                    next_sweep = Instant::now() + sweep;
                }
            }
        })?;
        Ok(())
    }

    /// Applies one announcement (see the module's doc for who may
    /// announce what).
    fn apply(&self, m: &Message, bus: &Bus) -> Result<(), String> {
        if m.from.scheme() != "runtime" {
            return Err(format!("{} is not a runtime", m.from));
        }
        let remote = !bus.is_routed(&m.from);
        let announcer = m.identity.as_ref().map(|i| i.user.to_string());
        let served = m.to.domain();
        let value: serde_json::Value = serde_json::from_str(m.body.value.as_deref().unwrap_or("{}")).map_err(|e| e.to_string())?;
        let resource = m.body.resource.as_deref().ok_or("no body.resource (the registration's address)")?;
        let address = Address::parse(resource).map_err(|e| format!("body.resource: {e}"))?;
        let mut entries = self.entries.write().unwrap();
        match m.kind {
            MessageType::Create => {
                let a: Announced = serde_json::from_value(value).map_err(|e| format!("registration: {e}"))?;
                if a.address != address.as_str() || a.domain != served || address.domain() != served {
                    return Err(format!("{} of {} does not belong in the registry of {served}", a.address, a.domain));
                }
                if remote && bus.is_routed(&address) {
                    return Err(format!("{address} is routed in this runtime: {} cannot announce it", m.from));
                }
                if announcer.is_some() && a.user != announcer {
                    return Err(format!(
                        "{} announces {address} of user {} with the identity of {}",
                        m.from,
                        a.user.as_deref().unwrap_or("(none)"),
                        announcer.as_deref().unwrap_or("(none)")
                    ));
                }
                let kind = match a.kind.as_str() {
                    "hyperty" => Kind::Hyperty,
                    "protostub" => Kind::Protostub,
                    "idpproxy" | "idp-proxy" => Kind::IdpProxy,
                    "dataobject" | "data-object" => Kind::DataObject,
                    other => return Err(format!("unknown kind {other:?}")),
                };
                let registration = Registration {
                    address: address.clone(),
                    kind,
                    name: a.name,
                    domain: a.domain,
                    user: a.user,
                    hyperty_types: a.hyperty_types,
                    schemes: a.schemes,
                    status: status(&a.status)?,
                };
                tracing::debug!(%address, runtime = %m.from, "registered in the registry of {served}");
                entries.insert(address, Remote { registration, runtime: m.from.clone(), announcer, last_seen: Instant::now() });
            }
            MessageType::Update => {
                let entry = entries
                    .get_mut(&address)
                    .filter(|e| e.runtime == m.from && e.announcer == announcer)
                    .ok_or_else(|| format!("{address} is not registered by {} as this user", m.from))?;
                if let Some(s) = value.get("status").and_then(|s| s.as_str()) {
                    entry.registration.status = status(s)?;
                }
                entry.last_seen = Instant::now();
            }
            MessageType::Delete => {
                if entries.get(&address).is_some_and(|e| e.runtime == m.from && e.announcer == announcer) {
                    entries.remove(&address);
                }
            }
            other => return Err(format!("a registry takes create, update and delete, not {}", other.as_str())),
        }
        Ok(())
    }

    fn expire(&self, expiry: Duration) {
        let now = Instant::now();
        let stale = |e: &Remote| now.duration_since(e.last_seen) > expiry;
        if !self.entries.read().unwrap().values().any(stale) {
            return;
        }
        self.entries.write().unwrap().retain(|address, e| {
            let keep = !stale(e);
            if !keep {
                tracing::info!(%address, runtime = %e.runtime, "registration expired: no keep-alive for {expiry:?}");
            }
            keep
        });
    }

    /// The registrations matching `query` that runtimes other than
    /// `except` announced.
    pub fn discover(&self, query: &Query, except: &Address) -> Vec<Registration> {
        self.entries
            .read()
            .unwrap()
            .values()
            .filter(|e| &e.runtime != except && query.matches(&e.registration))
            .map(|e| e.registration.clone())
            .collect()
    }
}
