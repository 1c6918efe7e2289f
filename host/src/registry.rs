//! The registry: which hyperty lives at which address.
//!
//! Today it resolves the names a bundle gives its hyperties
//! (`<domain>/<name>`) to the addresses the runtime allocated; guests reach
//! it through the `registry` import, embedders through
//! [`Runtime::lookup`](crate::Runtime::lookup).

use std::collections::HashMap;
use std::sync::RwLock;

use crate::address::Address;

#[derive(Default)]
pub struct Registry {
    names: RwLock<HashMap<(String, String), Address>>,
}

impl Registry {
    /// Registers `domain/name` at `address`; false if the name is taken.
    pub fn register(&self, domain: &str, name: &str, address: Address) -> bool {
        let mut names = self.names.write().unwrap();
        let key = (domain.to_owned(), name.to_owned());
        if names.contains_key(&key) {
            return false;
        }
        names.insert(key, address);
        true
    }

    pub fn unregister(&self, domain: &str, name: &str) {
        self.names.write().unwrap().remove(&(domain.to_owned(), name.to_owned()));
    }

    pub fn lookup(&self, domain: &str, name: &str) -> Option<Address> {
        self.names.read().unwrap().get(&(domain.to_owned(), name.to_owned())).cloned()
    }
}
