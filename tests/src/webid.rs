//! Helpers for the WebRTC identity tests (`tests/tests/media.rs`): media
//! peers bound to users of one IdP, whose proxy binds DTLS fingerprints or
//! (an old proxy) cannot.

use hyperty_host::bundle::{Domain, Idp};
use serde_json::{Value, json};

use crate::media::{media_domain, media_peer_config};
use crate::{TestBundle, guest, hex, pinned_file};

/// The IdP of the identity tests, and its ed25519 signing key.
pub const IDP: &str = "idp.example";
pub const IDP_KEY: [u8; 32] = [7; 32];

impl TestBundle {
    /// Adds the proxy of `idp` built from guest `component` (e.g.
    /// `idp-jwt-unbound`, an `idp-proxy` without `identity-binding`),
    /// signing with `seed`, and makes it the IdP of `domains`.
    pub fn idp_component(mut self, component: &str, idp: &str, seed: [u8; 32], domains: &[&str]) -> TestBundle {
        let config = json!({ "issuer": idp, "signing-key": hex(&seed), "lifetime-seconds": 600 });
        self.builder = self.builder.idp(idp, Idp::new(pinned_file(&guest(component))).config(config));
        for domain in domains {
            self.builder = self.builder.domain(domain, Domain::new().idp(idp));
        }
        self
    }
}

/// media-peers alice.example/a (alice@idp.example) and bob.example/b
/// (bob@idp.example, echoing), both domains granted media with the IdP
/// proxy `component` (`idp-jwt`: binds fingerprints), and `bob` the keys
/// of bob.example's table (e.g. `{"require-identity": false}`).
pub fn identified_pair(component: &str, bob: Value) -> TestBundle {
    TestBundle::new()
        .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
        .hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(true))
        .user("alice.example", "a", "alice@idp.example")
        .user("bob.example", "b", "bob@idp.example")
        .idp_component(component, IDP, IDP_KEY, &["alice.example", "bob.example"])
        .domain("alice.example", media_domain(4, json!({})))
        .domain("alice.example", json!({ "require-identity": false }))
        .domain("bob.example", media_domain(4, json!({})))
        .domain("bob.example", bob)
}

impl crate::Driver {
    /// Has media-peer `caller` call `callee` on a channel `label`, each
    /// side carrying its identity assertion with its SDP, and waits until
    /// both are connected; the `connected` events (caller's, callee's).
    pub fn identified_call(&mut self, caller: &hyperty_host::Address, callee: &hyperty_host::Address, label: &str) -> (Value, Value) {
        let call = self.command(caller, json!({ "op": "call", "peer": callee.to_string(), "label": label, "identity": true }));
        let pc = call["pc"].as_u64().unwrap_or_else(|| panic!("the call failed: {call}"));
        let answered = self.media_report(caller, 10, |v| v["signal"].is_string() && v["pc"] == pc);
        assert_eq!(answered["signal"], "answered", "{answered}");
        let at_caller = self.media_report(caller, 10, |v| v["event"] == "connected" && v["pc"] == pc);
        let at_callee = self.media_report(callee, 10, |v| v["event"] == "connected");
        (at_caller, at_callee)
    }
}
