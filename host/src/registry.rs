//! The registry: what is registered in this runtime, where, and for whom.
//!
//! Hyperties are registered at deployment with what their bundle says of
//! them (name, domain, user, hyperty types, data-object schemes), move
//! through reTHINK's statuses (created → live; failed while restarting) and
//! are unregistered when undeployed or stopped for good. Guests discover
//! through the `registry` import, embedders through
//! [`Runtime::discover`](crate::Runtime::discover).

use std::collections::BTreeMap;
use std::sync::RwLock;

use crate::address::Address;

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
    fn matches(&self, r: &Registration) -> bool {
        self.user.as_ref().is_none_or(|u| r.user.as_ref() == Some(u))
            && self.name.as_ref().is_none_or(|n| &r.name == n)
            && self.hyperty_type.as_ref().is_none_or(|t| r.hyperty_types.contains(t))
            && self.domain.as_ref().is_none_or(|d| &r.domain == d)
            && self.scheme.as_ref().is_none_or(|s| r.schemes.contains(s))
    }
}

/// Registrations by (domain, name); few enough (hundreds) that discovery
/// scans them.
#[derive(Default)]
pub struct Registry {
    entries: RwLock<BTreeMap<(String, String), Registration>>,
}

impl Registry {
    /// Registers `registration`; false if its domain/name is taken.
    pub fn register(&self, registration: Registration) -> bool {
        let mut entries = self.entries.write().unwrap();
        let key = (registration.domain.clone(), registration.name.clone());
        if entries.contains_key(&key) {
            return false;
        }
        entries.insert(key, registration);
        true
    }

    pub fn unregister(&self, domain: &str, name: &str) {
        self.entries.write().unwrap().remove(&(domain.to_owned(), name.to_owned()));
    }

    /// Sets the status of the registration at `address`.
    pub fn set_status(&self, address: &Address, status: Status) {
        let mut entries = self.entries.write().unwrap();
        if let Some(r) = entries.values_mut().find(|r| &r.address == address) {
            r.status = status;
        }
    }

    pub fn lookup(&self, domain: &str, name: &str) -> Option<Address> {
        self.entries.read().unwrap().get(&(domain.to_owned(), name.to_owned())).map(|r| r.address.clone())
    }

    /// The registrations matching `query`, ordered by domain and name.
    pub fn discover(&self, query: &Query) -> Vec<Registration> {
        self.entries.read().unwrap().values().filter(|r| query.matches(r)).cloned().collect()
    }
}
