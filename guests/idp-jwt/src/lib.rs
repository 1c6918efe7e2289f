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
//! and `exp` (and `aud` when an audience is configured).
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
//!    validation never outlives it.
//!
//! The JWS form is handled here (base64ct for the codec, ed25519-dalek for
//! the signature) rather than by a JWT crate: the strict order and checks
//! above need the raw members before any signature check, which the JWT
//! crates do not expose.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use base64ct::{Base64UrlUnpadded, Encoding};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::Deserialize;
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde_json::{Map, Value, json};

wit_bindgen::generate!({
    path: "../../wit",
    world: "idp-proxy",
});

use exports::rethink::hyperty::identity_provider::{Assertion, Claims as Asserted, Guest};

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Config {
    issuer: String,
    #[serde(default)]
    signing_key: Option<String>,
    #[serde(default)]
    verifying_keys: Vec<String>,
    #[serde(default = "default_lifetime")]
    lifetime_seconds: u64,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default)]
    leeway_seconds: u64,
}

fn default_lifetime() -> u64 {
    3600
}

struct Proxy {
    issuer: String,
    signing: Option<SigningKey>,
    verifying: Vec<VerifyingKey>,
    lifetime: u64,
    audience: Option<String>,
    leeway: u64,
}

thread_local! {
    static PROXY: RefCell<Option<Proxy>> = const { RefCell::new(None) };
}

fn hex32(text: &str, what: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("{what} is not hex: {e}"))?;
    bytes.try_into().map_err(|_| format!("{what} is not 32 bytes (64 hex digits)"))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A JSON object whose member names are unique: a duplicate is an error
/// (RFC 7519 §4 lets a parser refuse them; taking the last one, as JSON
/// parsers do, would let two readers see two different tokens).
struct UniqueObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueObject, A::Error> {
                let mut members = Map::new();
                while let Some(name) = map.next_key::<String>()? {
                    if members.contains_key(&name) {
                        return Err(A::Error::custom(format!("duplicate member {name:?}")));
                    }
                    let value = map.next_value::<Value>()?;
                    members.insert(name, value);
                }
                Ok(UniqueObject(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

fn base64url(part: &str, what: &str) -> Result<Vec<u8>, String> {
    Base64UrlUnpadded::decode_vec(part).map_err(|_| format!("malformed token: the {what} is not base64url"))
}

/// The JSON object a token part encodes.
fn object(part: &str, what: &str) -> Result<Map<String, Value>, String> {
    let bytes = base64url(part, what)?;
    let UniqueObject(members) =
        serde_json::from_slice(&bytes).map_err(|e| format!("malformed token: the {what} is not a JSON object of unique members: {e}"))?;
    Ok(members)
}

/// A string member, if present.
fn string<'a>(members: &'a Map<String, Value>, name: &str, part: &str) -> Result<Option<&'a str>, String> {
    match members.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("malformed token: {part} member {name} is {other}, not a string")),
    }
}

/// A NumericDate member (RFC 7519 §2: seconds since the epoch, a JSON
/// number, possibly not an integer), if present.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, String> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().filter(|s| s.is_finite()).map(Some).ok_or_else(|| format!("malformed token: {name} is not a finite number")),
        Some(other) => Err(format!("malformed token: {name} is {other}, not a NumericDate (a number of seconds since 1970)")),
    }
}

/// What the form check found in a token, before its signature is checked.
struct Parsed<'t> {
    signing_input: &'t str,
    signature: Vec<u8>,
    claims: Map<String, Value>,
}

/// Step 1 and 2: the form of the token and its header.
fn parse(token: &str) -> Result<Parsed<'_>, String> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("malformed token: not three base64url parts separated by dots (a JWS compact serialisation)".into());
    };
    let signing_input = &token[..header.len() + 1 + claims.len()];
    let header = object(header, "header")?;
    let claims = object(claims, "claims")?;
    let signature = base64url(signature, "signature")?;
    match string(&header, "alg", "header")? {
        Some("EdDSA") => {}
        Some(alg) => return Err(format!("algorithm (alg) {alg:?} refused: tokens of this IdP are EdDSA")),
        None => return Err("malformed token: the header has no alg".into()),
    }
    if let Some(crit) = header.get("crit") {
        let names: Option<Vec<&str>> = crit.as_array().filter(|a| !a.is_empty()).and_then(|a| a.iter().map(Value::as_str).collect());
        let names = names.ok_or_else(|| format!("malformed token: crit is {crit}, not a non-empty list of names"))?;
        return Err(format!("critical header parameters (crit) not understood: {}", names.join(", ")));
    }
    if let Some(typ) = string(&header, "typ", "header")?
        && !typ.eq_ignore_ascii_case("JWT")
        && !typ.eq_ignore_ascii_case("application/jwt")
    {
        return Err(format!("type (typ) {typ:?} refused: not a JWT"));
    }
    if let Some(cty) = header.get("cty") {
        return Err(format!("content type (cty) {cty} refused: nested or non-JWT content is not accepted"));
    }
    for name in ["iss", "sub", "jti"] {
        string(&claims, name, "claims")?;
    }
    for name in ["exp", "nbf", "iat"] {
        numeric_date(&claims, name)?;
    }
    match claims.get("aud") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
        Some(other) => return Err(format!("malformed token: aud is {other}, not a string or a list of strings")),
    }
    Ok(Parsed { signing_input, signature, claims })
}

impl Proxy {
    fn from_config(config: &str) -> Result<Proxy, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| format!("bad config: {e}"))?;
        let signing = config.signing_key.as_deref().map(|k| hex32(k, "signing-key").map(|b| SigningKey::from_bytes(&b))).transpose()?;
        let mut verifying = config
            .verifying_keys
            .iter()
            .map(|k| {
                let hex = k.strip_prefix("ed25519:").ok_or_else(|| format!("verifying key {k:?} is not ed25519:<hex>"))?;
                VerifyingKey::from_bytes(&hex32(hex, "verifying key")?).map_err(|e| format!("verifying key {k:?}: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if verifying.is_empty() {
            verifying.extend(signing.as_ref().map(SigningKey::verifying_key));
        }
        if verifying.is_empty() {
            return Err("no key: give signing-key or verifying-keys".into());
        }
        if config.lifetime_seconds == 0 {
            return Err("lifetime-seconds must be at least 1".into());
        }
        Ok(Proxy {
            issuer: config.issuer,
            signing,
            verifying,
            lifetime: config.lifetime_seconds,
            audience: config.audience,
            leeway: config.leeway_seconds,
        })
    }

    fn is_own_user(&self, user: &str) -> bool {
        user.rsplit_once('@').is_some_and(|(name, idp)| !name.is_empty() && idp == self.issuer)
    }

    fn generate(&self, user: &str) -> Result<Assertion, String> {
        let key = self.signing.as_ref().ok_or_else(|| format!("{} has no signing key: it only validates", self.issuer))?;
        if !self.is_own_user(user) {
            return Err(format!("{user} is not a user of {} (<name>@{})", self.issuer, self.issuer));
        }
        let issued = now();
        let expires = issued + self.lifetime;
        let mut claims = json!({ "iss": self.issuer, "sub": user, "iat": issued, "exp": expires });
        if let Some(audience) = &self.audience {
            claims["aud"] = audience.clone().into();
        }
        let header = Base64UrlUnpadded::encode_string(br#"{"alg":"EdDSA","typ":"JWT"}"#);
        let signing_input = format!("{header}.{}", Base64UrlUnpadded::encode_string(claims.to_string().as_bytes()));
        let signature = key.sign(signing_input.as_bytes());
        let token = format!("{signing_input}.{}", Base64UrlUnpadded::encode_string(&signature.to_bytes()));
        Ok(Assertion { token, expires })
    }

    fn validate(&self, token: &str) -> Result<Asserted, String> {
        let Parsed { signing_input, signature, claims } = parse(token)?;
        let signature = Signature::from_slice(&signature).map_err(|_| "malformed token: the signature is not 64 bytes (Ed25519)")?;
        if !self.verifying.iter().any(|key| key.verify_strict(signing_input.as_bytes(), &signature).is_ok()) {
            return Err(format!("signature not made by a key of {}", self.issuer));
        }
        // The types were checked by `parse`.
        let iss = string(&claims, "iss", "claims")?.ok_or("no issuer (iss)")?;
        if iss != self.issuer {
            return Err(format!("issued by {iss:?}, not {}", self.issuer));
        }
        let sub = string(&claims, "sub", "claims")?.ok_or("no subject (sub)")?;
        if !self.is_own_user(sub) {
            return Err(format!("{sub:?} is not a user of {}", self.issuer));
        }
        if let Some(aud) = claims.get("aud") {
            let names: Vec<&str> = match aud {
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                other => other.as_str().into_iter().collect(),
            };
            match &self.audience {
                Some(audience) if names.contains(&audience.as_str()) => {}
                Some(audience) => return Err(format!("for audience (aud) {aud}, not {audience}")),
                None => return Err(format!("for audience (aud) {aud}, and this IdP proxy has no audience configured")),
            }
        } else if let Some(audience) = &self.audience {
            return Err(format!("no audience (aud): tokens must be for {audience}"));
        }
        let now = now() as f64;
        let leeway = self.leeway as f64;
        let exp = numeric_date(&claims, "exp")?.ok_or("no expiry (exp)")?;
        if now >= exp + leeway {
            return Err(format!("expired {} s ago", (now - exp).ceil()));
        }
        if let Some(nbf) = numeric_date(&claims, "nbf")?
            && now + leeway < nbf
        {
            return Err(format!("not valid before (nbf) {nbf}, {} s from now", (nbf - now).ceil()));
        }
        if let Some(iat) = numeric_date(&claims, "iat")?
            && now + leeway < iat
        {
            return Err(format!("issued (iat) {} s in the future", (iat - now).ceil()));
        }
        // Whole seconds, rounded down: the host's cache never outlives exp.
        let expires = (exp + leeway).floor().max(0.0) as u64;
        Ok(Asserted { user: sub.to_owned(), expires })
    }
}

fn with_proxy<T>(f: impl FnOnce(&Proxy) -> Result<T, String>) -> Result<T, String> {
    PROXY.with(|p| f(p.borrow().as_ref().ok_or("not initialised")?))
}

struct IdpJwt;

impl Guest for IdpJwt {
    fn init(config: String) -> Result<(), String> {
        let proxy = Proxy::from_config(&config)?;
        PROXY.with(|p| *p.borrow_mut() = Some(proxy));
        Ok(())
    }

    fn generate_assertion(user: String) -> Result<Assertion, String> {
        with_proxy(|p| p.generate(&user))
    }

    fn validate_assertion(token: String) -> Result<Asserted, String> {
        with_proxy(|p| p.validate(&token))
    }
}

export!(IdpJwt);
