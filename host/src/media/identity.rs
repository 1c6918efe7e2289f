//! WebRTC identity (W3C webrtc-identity; RFC 8827 §7): a peer connection's
//! DTLS fingerprint bound to the user its hyperty acts for, by an assertion
//! of the IdP of the hyperty's domain, and the remote's assertion checked
//! against the fingerprint of the remote SDP before `connected` is told.
//!
//! - The **contents** an IdP binds are webrtc-identity's: the JSON text
//!   `{"fingerprint":[{"algorithm":"sha-256","digest":"AB:CD:..."}]}`.
//! - The **assertion** a hyperty carries to its peer is the JSON of an SDP
//!   `a=identity` value (before base64): `{"idp": {"domain": <IdP>,
//!   "protocol": "default"}, "assertion": <token>}`, at most
//!   [`MAX_IDENTITY_BYTES`].
//! - A remote assertion is validated (by the proxy of the IdP it names,
//!   which must bind contents: see `wit/identity.wit`) before the remote
//!   SDP is accepted; every `a=fingerprint` of that SDP must then be one the
//!   assertion binds, else the connection is closed with the reason.
//!
//! The proxies are guests: they are called here without any media lock,
//! and at most once per connection each way (its assertion is kept until
//! half its lifetime has passed; a remote identity is set once), so a
//! hyperty cannot make the host call them more often than it opens
//! connections.

use std::sync::PoisonError;

use serde_json::{Value, json};

use super::{Conn, DomainMedia, MediaError, State};
use crate::identity::Identities;
use crate::message::{Assertion, Identity};
use crate::policy::Descriptor;

/// The longest identity assertion text accepted from a hyperty, in bytes.
pub const MAX_IDENTITY_BYTES: usize = 16 << 10;

/// A DTLS certificate fingerprint (RFC 8122 §5): the hash function's name,
/// lowercase, and the digest's hex pairs, uppercase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    algorithm: String,
    digest: String,
}

impl Fingerprint {
    fn new(algorithm: &str, digest: &str) -> Fingerprint {
        Fingerprint { algorithm: algorithm.trim().to_ascii_lowercase(), digest: digest.trim().to_ascii_uppercase() }
    }

    /// From an SDP `a=fingerprint` value (`sha-256 AB:CD:...`).
    fn parse(value: &str) -> Option<Fingerprint> {
        let (algorithm, digest) = value.trim().split_once(' ')?;
        Some(Fingerprint::new(algorithm, digest))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.algorithm, self.digest)
    }
}

/// A remote peer's identity, validated, with the fingerprints its
/// assertion binds.
#[derive(Clone, Debug)]
pub(crate) struct RemoteIdentity {
    pub identity: Identity,
    fingerprints: Vec<Fingerprint>,
}

impl RemoteIdentity {
    /// Checks the fingerprint of the certificate DTLS was completed with
    /// (str0m's `remote_dtls_fingerprint`, `sha-256 AB:CD:...`) against the
    /// bound ones; the error is the reason the connection closes.
    pub fn check_connected(&self, remote: Option<String>) -> Result<(), String> {
        let connected = remote.as_deref().and_then(Fingerprint::parse);
        match connected {
            Some(f) if self.fingerprints.contains(&f) => Ok(()),
            Some(f) => Err(format!("identity mismatch: DTLS completed with fingerprint {f}, not the one the identity assertion of {} binds", self.identity.user)),
            None => Err(format!("identity unchecked: DTLS completed with no remote fingerprint to check against the assertion of {}", self.identity.user)),
        }
    }

    /// Checks that every `a=fingerprint` of `sdp` (there must be one) is
    /// bound by the assertion; the error is the reason the connection
    /// closes.
    pub fn check(&self, sdp: &str) -> Result<(), String> {
        let offered: Vec<Fingerprint> = sdp
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a=fingerprint:"))
            .filter_map(Fingerprint::parse)
            .collect();
        if offered.is_empty() {
            return Err("the remote SDP has no a=fingerprint to check the identity assertion against".into());
        }
        match offered.iter().find(|f| !self.fingerprints.contains(f)) {
            None => Ok(()),
            Some(f) => Err(format!(
                "identity mismatch: the remote SDP's fingerprint {f} is not the one the identity assertion of {} binds ({})",
                self.identity.user,
                self.fingerprints.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// The identity as the `connected` event and the policies show it.
    pub fn to_json(&self) -> Value {
        json!({ "user": self.identity.user, "idp": self.identity.idp })
    }
}

/// The webrtc-identity contents binding `fingerprint` (`sha-256 AB:...`).
fn contents(fingerprint: &str) -> Result<String, MediaError> {
    let f = Fingerprint::parse(fingerprint).ok_or_else(|| MediaError::Invalid(format!("no fingerprint to bind: {fingerprint:?}")))?;
    Ok(json!({ "fingerprint": [{ "algorithm": f.algorithm, "digest": f.digest }] }).to_string())
}

/// The fingerprints bound by webrtc-identity `contents`.
fn bound_fingerprints(contents: &str) -> Result<Vec<Fingerprint>, String> {
    let value: Value = serde_json::from_str(contents).map_err(|e| format!("its contents are not JSON: {e}"))?;
    let list = value["fingerprint"].as_array().filter(|l| !l.is_empty()).ok_or("its contents bind no fingerprint")?;
    list.iter()
        .map(|f| match (f["algorithm"].as_str(), f["digest"].as_str()) {
            (Some(a), Some(d)) => Ok(Fingerprint::new(a, d)),
            _ => Err(format!("its contents hold a fingerprint that is not {{algorithm, digest}}: {f}")),
        })
        .collect()
}

/// The identity assertion binding `fingerprint` to the user the hyperty
/// (`descriptor`) acts for, by its domain's IdP, as the JSON text it
/// carries to its peer, and when it expires. Calls the IdP proxy: hold no
/// lock.
fn assertion(identities: &Identities, descriptor: &Descriptor, fingerprint: &str) -> Result<(String, u64), MediaError> {
    let user = descriptor
        .user
        .as_deref()
        .ok_or_else(|| MediaError::NotGranted(format!("{} acts for no user (`user` in its bundle entry): nothing to assert", descriptor.name)))?;
    let contents = contents(fingerprint)?;
    let (assertion, expires) = identities.bound_assertion(&descriptor.domain, user, &contents).map_err(MediaError::NotGranted)?;
    Ok((json!({ "idp": { "domain": assertion.idp, "protocol": "default" }, "assertion": assertion.token }).to_string(), expires))
}

/// Validates the remote's identity assertion `text` through the proxy of
/// the IdP it names. `Invalid` for text that is not an assertion; `Closed`
/// (the reason the connection closes) for one its IdP refuses. Calls the
/// IdP proxy: hold no lock.
pub(crate) fn validate(identities: &Identities, text: &str) -> Result<RemoteIdentity, MediaError> {
    let assertion = parse(text).map_err(|e| MediaError::Invalid(format!("not an identity assertion: {e}")))?;
    let refused = |why: String| MediaError::Closed(format!("the remote identity assertion of IdP {} was refused: {why}", assertion.idp));
    let (identity, contents) = identities.validate_bound(&assertion).map_err(refused)?;
    let fingerprints = bound_fingerprints(&contents).map_err(refused)?;
    Ok(RemoteIdentity { identity, fingerprints })
}

impl DomainMedia {
    /// The identity assertion of `conn` for the hyperty `descriptor` (see
    /// [`assertion`]): the one made before while less than half its
    /// lifetime has passed.
    pub(super) fn identity_assertion(&self, conn: &Conn, descriptor: &Descriptor) -> Result<String, MediaError> {
        let now = crate::identity::now();
        if let Some((text, made, expires)) = &conn.lock()?.local_assertion
            && now < made + (expires.saturating_sub(*made)) / 2
        {
            return Ok(text.clone());
        }
        let (text, expires) = assertion(&self.identities, descriptor, &conn.fingerprint)?;
        // The WIT promises at most 16 KiB: a proxy's longer token is its fault,
        // and a peer would refuse it anyway.
        if text.len() > MAX_IDENTITY_BYTES {
            return Err(MediaError::NotGranted(format!("the IdP proxy's assertion is {} bytes, the limit is {MAX_IDENTITY_BYTES}", text.len())));
        }
        conn.lock()?.local_assertion = Some((text.clone(), now, expires));
        Ok(text)
    }

    /// Validates the remote's assertion `text` for `conn` (see
    /// [`validate`]) and keeps it there; one its IdP refuses closes `conn`.
    /// The user it vouches for.
    pub(super) fn set_remote_identity(&self, conn: &Conn, text: &str) -> Result<String, MediaError> {
        may_set_remote_identity(&*conn.lock()?)?;
        let remote = match validate(&self.identities, text) {
            Err(MediaError::Closed(why)) => {
                conn.close(&why);
                return Err(MediaError::Closed(why));
            }
            other => other?,
        };
        let mut state = conn.lock()?;
        may_set_remote_identity(&state)?;
        let user = remote.identity.user.to_string();
        tracing::info!(connection = %conn.address, "remote identity assertion valid: {user} (IdP {}), to be checked against the remote SDP", remote.identity.idp);
        state.remote_identity = Some(remote);
        Ok(user)
    }
}

/// A remote identity is set once per connection, before its remote SDP.
fn may_set_remote_identity(state: &State) -> Result<(), MediaError> {
    if let Some(remote) = &state.remote_identity {
        return Err(MediaError::Invalid(format!("the remote identity is set already ({}): once per connection", remote.identity.user)));
    }
    if state.negotiated || state.remote_sdp_seen {
        return Err(MediaError::Invalid("a remote SDP was already given: set the remote identity before accept-offer / accept-answer".into()));
    }
    Ok(())
}

impl Conn {
    /// The remote's checked identity, if any.
    pub(super) fn remote_identity(&self) -> Option<Identity> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).remote_identity.as_ref().map(|r| r.identity.clone())
    }

    /// Before the remote SDP `sdp` is accepted: with a remote identity set,
    /// its fingerprints must be the bound ones, else the connection closes
    /// (the error is `Closed` with the reason).
    pub(super) fn check_remote_identity<'a>(&self, state: std::sync::MutexGuard<'a, State>, sdp: &str) -> Result<std::sync::MutexGuard<'a, State>, MediaError> {
        let Some(remote) = &state.remote_identity else { return Ok(state) };
        match remote.check(sdp) {
            Ok(()) => {
                tracing::info!(connection = %self.address, "identity of the peer verified: {} (IdP {}) holds the remote fingerprint", remote.identity.user, remote.identity.idp);
                Ok(state)
            }
            Err(why) => {
                drop(state);
                self.close(&why);
                Err(MediaError::Closed(why))
            }
        }
    }
}

/// An assertion's IdP and token from its JSON text.
fn parse(text: &str) -> Result<Assertion, String> {
    if text.len() > MAX_IDENTITY_BYTES {
        return Err(format!("{} bytes, the limit is {MAX_IDENTITY_BYTES}", text.len()));
    }
    crate::message::validate_value(text).map_err(|e| e.replacen("body.value ", "", 1))?;
    let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match (value["idp"]["domain"].as_str(), value["assertion"].as_str()) {
        (Some(idp), Some(token)) if !idp.is_empty() => Ok(Assertion { idp: idp.into(), token: token.into() }),
        _ => Err("expected {\"idp\": {\"domain\": <IdP>, ...}, \"assertion\": <token>}".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDP: &str = "v=0\r\na=fingerprint:sha-256 ab:cd\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n";

    fn remote(contents: &str) -> RemoteIdentity {
        let identity = Identity { user: "bob@idp.example".into(), idp: "idp.example".into() };
        RemoteIdentity { identity, fingerprints: bound_fingerprints(contents).unwrap() }
    }

    #[test]
    fn the_bound_fingerprint_matches_the_sdp_s_whatever_the_case() {
        let bound = contents("SHA-256 AB:CD").unwrap();
        assert_eq!(bound, r#"{"fingerprint":[{"algorithm":"sha-256","digest":"AB:CD"}]}"#);
        assert_eq!(remote(&bound).check(SDP), Ok(()));
    }

    #[test]
    fn another_fingerprint_or_none_is_a_mismatch_naming_both() {
        let other = remote(&contents("sha-256 AB:CE").unwrap());
        let e = other.check(SDP).unwrap_err();
        assert!(e.contains("fingerprint sha-256 AB:CD is not the one") && e.contains("binds (sha-256 AB:CE)"), "{e}");
        let e = other.check("v=0\r\n").unwrap_err();
        assert!(e.contains("no a=fingerprint"), "{e}");
        // Two fingerprints in the SDP: both must be bound.
        let two = format!("{SDP}a=fingerprint:sha-1 00:11\r\n");
        assert!(remote(&contents("sha-256 AB:CD").unwrap()).check(&two).is_err());
    }

    #[test]
    fn malformed_assertions_and_contents_are_refused_with_what_is_wrong() {
        assert!(parse("{}").unwrap_err().contains("expected"));
        assert!(parse("not json").unwrap_err().contains("not JSON"));
        let big = format!(r#"{{"idp":{{"domain":"i"}},"assertion":"{}"}}"#, "x".repeat(MAX_IDENTITY_BYTES));
        assert!(parse(&big).unwrap_err().contains("the limit is 16384"));
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse(&deep).is_err());
        assert_eq!(parse(r#"{"idp":{"domain":"i","protocol":"default"},"assertion":"t"}"#), Ok(Assertion { idp: "i".into(), token: "t".into() }));
        assert!(bound_fingerprints(r#"{"fingerprint":[]}"#).unwrap_err().contains("no fingerprint"));
        assert!(bound_fingerprints(r#"{"fingerprint":[{"algorithm":1}]}"#).unwrap_err().contains("not {algorithm, digest}"));
    }
}
