//! An IdP proxy issuing and verifying EdDSA-signed JWTs (RFC 7519, in the
//! JWS compact serialisation of RFC 7515, EdDSA per RFC 8037).
//!
//! Configuration (the bundle's `config` table of the IdP, as JSON):
//!
//! ```toml
//! [idps."idp.example"]
//! config = { issuer = "idp.example",
//!            signing-key = "<64 hex digits: an ed25519 secret key>",   # to issue; omit to only validate
//!            verifying-keys = ["ed25519:<64 hex digits>"],              # default: signing-key's public key
//!            lifetime-seconds = 3600,
//!            audience = "…",           # optional: tokens must name it in `aud` (and issued ones do)
//!            leeway-seconds = 0 }      # clock skew allowed on exp, nbf and iat (default none)
//! ```
//!
//! Tokens carry `iss` (the issuer), `sub` (the user, which must be of the
//! form `<name>@<issuer>`: an IdP vouches only for its own users), `iat`
//! and `exp` (and `aud` when an audience is configured). A bound assertion
//! (`identity-binding`, world `idp-proxy-binding`: WebRTC identity) also
//! carries `contents`, the text it binds (the DTLS fingerprints); it is
//! refused as a message assertion, and a token without it is refused as a
//! bound one, so a peer cannot replay what it was shown as the other kind.
//!
//! Validation, in this order (each refusal names what it refused):
//! 1. **Form.** Three base64url parts; the header and the claims are JSON
//!    objects with unique member names (RFC 7515 §4, RFC 7519 §4); the
//!    registered members have their registered types (`iss`, `sub`, `jti`
//!    strings, `aud` a string or a list of strings, `exp`, `nbf`, `iat`
//!    NumericDates: JSON numbers of seconds).
//! 2. **Header.** `alg` is `EdDSA` (the token's `alg` chooses nothing: the
//!    key and algorithm come from the configuration); `crit` (RFC 7515
//!    §4.1.11) is refused, since this proxy understands no extension; `typ`,
//!    if present, is `JWT` (RFC 7519 §5.1); `cty` (nested tokens, §5.2) is
//!    refused. Keys named by the token (`jku`, `jwk`, `x5u`, `x5c`, `kid`)
//!    are never used.
//! 3. **Signature** by one of the verifying keys (Ed25519, strict
//!    verification).
//! 4. **Claims.** `iss` is this issuer; `sub` one of its users; `aud`, if
//!    present, names the configured audience (none configured: refused,
//!    RFC 7519 §4.1.3); now is before `exp` (required), not before `nbf`,
//!    and not before `iat`, each give or take `leeway-seconds`. The
//!    `expires` returned is `exp` plus the leeway, so the host's cache of a
//!    validation never outlives it. `contents` is present (a string) for a
//!    bound assertion and absent for a message assertion.
//!
//! The JWS form is handled here (base64ct for the codec, ed25519-dalek for
//! the signature) rather than by a JWT crate: the strict order and checks
//! above need the raw members before any signature check, which the JWT
//! crates do not expose.

#[macro_use]
mod jwt;

use jwt::with_proxy;

wit_bindgen::generate!({
    path: "../../wit",
    world: "idp-proxy-binding",
});

use exports::rethink::hyperty::identity_binding::{BoundClaims, Guest as Binding};
use exports::rethink::hyperty::identity_provider::{Assertion, Claims, Guest};

struct IdpJwt;

identity_provider!(IdpJwt);

impl Binding for IdpJwt {
    fn generate_bound_assertion(user: String, contents: String) -> Result<Assertion, String> {
        with_proxy(|p| p.generate(&user, Some(&contents))).map(|(token, expires)| Assertion { token, expires })
    }

    fn validate_bound_assertion(token: String) -> Result<BoundClaims, String> {
        with_proxy(|p| p.validate(&token, true)).map(|v| BoundClaims { user: v.user, expires: v.expires, contents: v.contents.unwrap_or_default() })
    }
}

export!(IdpJwt);
