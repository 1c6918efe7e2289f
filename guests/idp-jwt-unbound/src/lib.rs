//! The `idp-jwt` proxy (same JWT code, same configuration) exporting only
//! the `identity-provider` interface of world `idp-proxy`, as every IdP
//! proxy built before `identity-binding` (`wit/identity.wit`) did: the
//! host must still deploy it and have it assert messages, and refuse
//! bindings asked of it with a clear error.

// `contents` is read only by bound assertions, which this proxy lacks.
#[allow(dead_code)]
#[path = "../../idp-jwt/src/jwt.rs"]
#[macro_use]
mod jwt;

wit_bindgen::generate!({
    path: "../../wit",
    world: "idp-proxy",
});

use exports::rethink::hyperty::identity_provider::{Assertion, Claims, Guest};

struct IdpJwtUnbound;

identity_provider!(IdpJwtUnbound);

export!(IdpJwtUnbound);
