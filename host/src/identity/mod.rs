//! Identity: who a message's sender acts for, established on the one
//! message path.
//!
//! A hyperty is bound to a user at deployment (`user` in its bundle entry);
//! its domain names the IdP that vouches for its users (`idp`), whose proxy
//! component (`[idps.<name>]`, world `idp-proxy`) issues and validates
//! assertions. For every message, after the route lookup and before the
//! policies (which read the result), the bus asks [`Identities::establish`]:
//!
//! - The sender's claim is erased first: only this module sets
//!   [`Message::identity`] (guests cannot even send one: `spoofed-identity`).
//! - Inside one domain and one runtime, no assertion travels; the identity
//!   is the user the sender is bound to.
//! - A message leaving its domain, or this runtime through a protostub,
//!   from a hyperty of this runtime carries that user's assertion, made by
//!   the IdP proxy of the hyperty's domain (whatever the message carried
//!   before is replaced). A hyperty without a user, or of a domain without
//!   an IdP, sends none.
//! - A message arriving from another domain, or through a protostub
//!   whatever domain it claims (nothing that comes through a stub is
//!   local), is validated by the proxy of the IdP its assertion names; the
//!   validated user becomes its identity. A tampered, expired, foreign-key
//!   or unknown-IdP assertion is answered 401 and not delivered, and so is a
//!   message without one into a domain that requires identity
//!   (`require-identity`, by default on for a domain with an IdP: a domain
//!   whose users are asserted wants to know who others are too). Only the
//!   domain's services (`domain://…`) reached from this runtime decide for
//!   themselves; through a stub they are held to the rule too.
//!
//! Proxies are WebAssembly components and slow to call next to the bus, so
//! assertions are cached: issued ones per (IdP, user) until half their
//! lifetime has passed, validated ones per token until they expire. The
//! caches are bounded; a full one forgets what has expired, then everything.
//!
//! Assertions bound to contents (a WebRTC peer's DTLS fingerprint, see
//! `media::identity`) are made and validated by the proxies that export
//! `identity-binding` ([`Identities::bound_assertion`],
//! [`Identities::validate_bound`]); they are one per peer connection and
//! not cached.

mod proxy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) use proxy::{Proxy, ProxyPre, prepare};

use crate::message::{Assertion, Identity, Message, code};
use crate::policy::Descriptor;

/// Most assertions cached, issued or validated.
const CACHE_LIMIT: usize = 4096;

/// Why a message cannot go on: the code and the reason its sender is told.
pub(crate) type Refusal = (u16, String);

/// An assertion this runtime had made, with when (Unix seconds) it was
/// made and when it expires.
struct Issued {
    assertion: Assertion,
    made: u64,
    expires: u64,
}

pub(crate) use crate::bus::Crossing;

/// The bus's identity step is [`Identities::establish`].
impl crate::bus::IdentityPoint for Identities {
    fn establish(&self, message: &mut Message, sender: Option<&Descriptor>, crossing: Crossing) -> Result<(), Refusal> {
        Identities::establish(self, message, sender, crossing)
    }
}

/// How a provider domain deals with identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainIdentity {
    /// The IdP vouching for the domain's users.
    pub idp: Option<String>,
    /// Refuse (401) messages from other domains that carry no assertion.
    pub require: bool,
}

/// The IdP proxies of this runtime and which domain trusts which.
#[derive(Default)]
pub(crate) struct Identities {
    proxies: RwLock<HashMap<String, Arc<Proxy>>>,
    domains: RwLock<HashMap<String, DomainIdentity>>,
    /// (IdP, user) → an assertion.
    issued: Mutex<HashMap<(String, String), Issued>>,
    /// An assertion → who it says, until when.
    validated: RwLock<HashMap<Assertion, (Identity, u64)>>,
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Identities {
    /// Adds the running proxy of IdP `name`; false if there is one already.
    pub fn add_proxy(&self, name: &str, proxy: Proxy) -> bool {
        let mut proxies = self.proxies.write().unwrap();
        if proxies.contains_key(name) {
            return false;
        }
        proxies.insert(name.to_owned(), Arc::new(proxy));
        true
    }

    /// Stops the proxy of IdP `name` and forgets what it said.
    pub fn remove_proxy(&self, name: &str) {
        self.proxies.write().unwrap().remove(name);
        self.issued.lock().unwrap().retain(|(idp, _), _| idp != name);
        self.validated.write().unwrap().retain(|a, _| a.idp != name);
    }

    /// Puts `proxy` in place of IdP `name`'s (a live update), in one step,
    /// and forgets what the old one said (assertions issued and validated).
    pub fn replace_proxy(&self, name: &str, proxy: Proxy) {
        self.proxies.write().unwrap().insert(name.to_owned(), Arc::new(proxy));
        self.issued.lock().unwrap().retain(|(idp, _), _| idp != name);
        self.validated.write().unwrap().retain(|a, _| a.idp != name);
    }

    pub fn has_proxy(&self, name: &str) -> bool {
        self.proxies.read().unwrap().contains_key(name)
    }

    /// Sets how `domain` deals with identity.
    pub fn set_domain(&self, domain: &str, identity: DomainIdentity) {
        self.domains.write().unwrap().insert(domain.to_owned(), identity);
    }

    /// How `domain` deals with identity (the default: no IdP, nothing
    /// required).
    pub fn domain(&self, domain: &str) -> DomainIdentity {
        self.domains.read().unwrap().get(domain).cloned().unwrap_or_default()
    }

    /// Whether `domain` is a provider domain of this runtime (deployed).
    pub(crate) fn hosts(&self, domain: &str) -> bool {
        self.domains.read().unwrap().contains_key(domain)
    }

    /// The provider domains of this runtime, sorted.
    pub(crate) fn hosted(&self) -> Vec<String> {
        let mut domains: Vec<String> = self.domains.read().unwrap().keys().cloned().collect();
        domains.sort();
        domains
    }

    /// Forgets `domain`.
    pub fn remove_domain(&self, domain: &str) {
        self.domains.write().unwrap().remove(domain);
    }

    fn domain_idp(&self, domain: &str) -> Option<String> {
        self.domains.read().unwrap().get(domain).and_then(|d| d.idp.clone())
    }

    fn proxy(&self, idp: &str) -> Option<Arc<Proxy>> {
        self.proxies.read().unwrap().get(idp).cloned()
    }

    /// Sets `message`'s identity (and its assertion, when it leaves its
    /// domain or the runtime), or says why it must not be delivered.
    /// `sender` describes who the sender acts for when it runs here (a
    /// hyperty; `None` for an embedder's endpoint, whose assertion is taken
    /// as it comes, like one from the network, and for what arrives through
    /// a stub): its user is asserted by its domain's IdP.
    pub fn establish(&self, message: &mut Message, sender: Option<&Descriptor>, crossing: Crossing) -> Result<(), Refusal> {
        message.identity = None;
        let from_domain = message.from.domain();
        if crossing == Crossing::Here && from_domain == message.to.domain() {
            message.assertion = None;
            if let Some(user) = sender.and_then(|s| s.user.as_ref()) {
                let idp = self.domain_idp(from_domain).unwrap_or_else(|| from_domain.to_owned());
                message.identity = Some(Identity { user: user.as_str().into(), idp: idp.into() });
            }
            return Ok(());
        }
        if let Some(sender) = sender {
            message.assertion = match (&sender.user, self.domain_idp(&sender.domain)) {
                (Some(user), Some(idp)) => Some(self.assertion_for(&idp, user)?),
                _ => None,
            };
        }
        if crossing == Crossing::Leaving {
            return Ok(());
        }
        match &message.assertion {
            Some(assertion) => message.identity = Some(self.validate(assertion)?),
            None => {
                let to_domain = message.to.domain();
                // A domain's services (domain://...) decide for themselves
                // what this runtime tells them, not what a stub brings.
                let exempt = message.to.scheme() == "domain" && crossing == Crossing::Here;
                if !exempt && self.domains.read().unwrap().get(to_domain).is_some_and(|d| d.require) {
                    let whence = if crossing == Crossing::Arriving { "other runtimes" } else { "other domains" };
                    let why = format!("{to_domain} requires an identity assertion on messages from {whence}; {} sent none", message.from);
                    return Err((code::UNAUTHORIZED, why));
                }
            }
        }
        Ok(())
    }

    /// A current assertion for `user` from IdP `idp`.
    fn assertion_for(&self, idp: &str, user: &str) -> Result<Assertion, Refusal> {
        let now = now();
        let key = (idp.to_owned(), user.to_owned());
        if let Some(issued) = self.issued.lock().unwrap().get(&key)
            && now < issued.made + (issued.expires - issued.made) / 2
        {
            return Ok(issued.assertion.clone());
        }
        let unavailable = |why: String| (code::INTERNAL_ERROR, format!("cannot assert {user} with IdP {idp}: {why}"));
        let proxy = self.proxy(idp).ok_or_else(|| unavailable("no proxy runs for it".into()))?;
        let issued = proxy.generate(user).map_err(unavailable)?;
        let mut assertion = Assertion { idp: idp.into(), token: issued.token.into() };
        assertion.share(); // each message it goes with then holds a count, not a copy of the token
        let mut cache = self.issued.lock().unwrap();
        if cache.len() >= CACHE_LIMIT {
            cache.retain(|_, issued| issued.expires > now);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
        }
        cache.insert(key, Issued { assertion: assertion.clone(), made: now, expires: issued.expires.max(now) });
        Ok(assertion)
    }

    /// An assertion by the IdP of `domain` that `user` holds `contents`
    /// (`identity-binding`), and when it expires (Unix seconds); the error
    /// says why there is none (no IdP, no proxy, a proxy that cannot bind,
    /// or its refusal).
    pub(crate) fn bound_assertion(&self, domain: &str, user: &str, contents: &str) -> Result<(Assertion, u64), String> {
        let idp = self.domain_idp(domain).ok_or_else(|| format!("{domain} has no IdP (`idp` in its bundle entry) to assert {user}"))?;
        let proxy = self.proxy(&idp).ok_or_else(|| format!("no proxy runs for IdP {idp}"))?;
        let issued = proxy.generate_bound(user, contents).map_err(|why| format!("IdP {idp} cannot assert {user}: {why}"))?;
        Ok((Assertion { idp: idp.into(), token: issued.token.into() }, issued.expires))
    }

    /// Who a bound `assertion` says its bearer is, and the contents it
    /// binds, as the proxy of the IdP it names validates it.
    pub(crate) fn validate_bound(&self, assertion: &Assertion) -> Result<(Identity, String), String> {
        let proxy = self.proxy(&assertion.idp).ok_or("no proxy for this IdP runs here")?;
        let claims = proxy.validate_bound(&assertion.token)?;
        // The host's own check, whatever the proxy checked: an expired
        // assertion binds nothing.
        if claims.expires <= now() {
            return Err(format!("the assertion of {} expired at {} (Unix seconds)", claims.user, claims.expires));
        }
        Ok((Identity { user: claims.user.into(), idp: assertion.idp.clone() }, claims.contents))
    }

    /// Who `assertion` says the sender is, as its IdP's proxy validates it.
    pub(crate) fn validate(&self, assertion: &Assertion) -> Result<Identity, Refusal> {
        let now = now();
        if let Some((identity, expires)) = self.validated.read().unwrap().get(assertion)
            && now < *expires
        {
            return Ok(identity.clone());
        }
        let refused = |why: String| (code::UNAUTHORIZED, format!("identity assertion of IdP {} refused: {why}", assertion.idp));
        let proxy = self.proxy(&assertion.idp).ok_or_else(|| refused("no proxy for this IdP runs here".into()))?;
        let claims = proxy.validate(&assertion.token).map_err(refused)?;
        // A bound assertion (WebRTC identity) is shown to every peer a
        // hyperty calls: it must never let its bearer speak on the bus as
        // the user. The host checks it itself rather than trust each
        // binding proxy's `validate-assertion` to refuse one.
        if proxy.binds() && proxy.validate_bound(&assertion.token).is_ok() {
            return Err(refused("a bound assertion (its contents claim) is not a message assertion".into()));
        }
        let mut identity = Identity { user: claims.user.into(), idp: assertion.idp.clone() };
        identity.share(); // each message it is stamped on then holds a count
        let mut cache = self.validated.write().unwrap();
        if cache.len() >= CACHE_LIMIT {
            cache.retain(|_, (_, expires)| *expires > now);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
        }
        cache.insert(assertion.clone(), (identity.clone(), claims.expires));
        Ok(identity)
    }
}
