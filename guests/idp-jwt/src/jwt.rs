//! The JWT issuer and validator shared by the `idp-jwt` proxies (see the
//! crate's documentation for the configuration and the checks).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use base64ct::{Base64UrlUnpadded, Encoding};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::Deserialize;
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde_json::{Map, Value, json};

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

/// The private claim (RFC 7519 §4.3) of a bound assertion: the contents it
/// binds (for WebRTC identity, the DTLS fingerprints), as JSON text.
const CONTENTS: &str = "contents";

/// What a valid token says.
pub struct Verified {
    pub user: String,
    /// `exp` plus the leeway, in whole seconds since the epoch.
    pub expires: u64,
    /// What a bound token binds.
    pub contents: Option<String>,
}

fn default_lifetime() -> u64 {
    3600
}

pub struct Proxy {
    issuer: String,
    signing: Option<SigningKey>,
    verifying: Vec<VerifyingKey>,
    lifetime: u64,
    audience: Option<String>,
    leeway: u64,
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
    pub fn from_config(config: &str) -> Result<Proxy, String> {
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

    /// A token for `user`, bound to `contents` if given; its `exp`.
    pub fn generate(&self, user: &str, contents: Option<&str>) -> Result<(String, u64), String> {
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
        if let Some(contents) = contents {
            claims[CONTENTS] = contents.into();
        }
        let header = Base64UrlUnpadded::encode_string(br#"{"alg":"EdDSA","typ":"JWT"}"#);
        let signing_input = format!("{header}.{}", Base64UrlUnpadded::encode_string(claims.to_string().as_bytes()));
        let signature = key.sign(signing_input.as_bytes());
        let token = format!("{signing_input}.{}", Base64UrlUnpadded::encode_string(&signature.to_bytes()));
        Ok((token, expires))
    }

    /// What `token` says: a message assertion (`bound` false: it must bind
    /// no contents) or a bound one (`bound`: it must).
    pub fn validate(&self, token: &str, bound: bool) -> Result<Verified, String> {
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
        let contents = match (claims.get(CONTENTS), bound) {
            (None, false) => None,
            (Some(Value::String(c)), true) => Some(c.clone()),
            (Some(_), false) => return Err(format!("a bound assertion (its {CONTENTS} claim) is not a message assertion")),
            (None, true) => return Err(format!("not a bound assertion: no {CONTENTS} claim")),
            (Some(other), true) => return Err(format!("malformed token: {CONTENTS} is {other}, not a string")),
        };
        // Whole seconds, rounded down: the host's cache never outlives exp.
        let expires = (exp + leeway).floor().max(0.0) as u64;
        Ok(Verified { user: sub.to_owned(), expires, contents })
    }
}

thread_local! {
    static PROXY: RefCell<Option<Proxy>> = const { RefCell::new(None) };
}

/// Configures this instance's proxy (the `init` of `identity-provider`).
pub fn init(config: &str) -> Result<(), String> {
    let proxy = Proxy::from_config(config)?;
    PROXY.with(|p| *p.borrow_mut() = Some(proxy));
    Ok(())
}

/// Runs `f` on the configured proxy.
pub fn with_proxy<T>(f: impl FnOnce(&Proxy) -> Result<T, String>) -> Result<T, String> {
    PROXY.with(|p| f(p.borrow().as_ref().ok_or("not initialised")?))
}

/// Implements the `identity-provider` export for `$component` with this
/// module, where the bindings' `Guest`, `Assertion` and `Claims` are in
/// scope (each proxy component has its own bindings).
macro_rules! identity_provider {
    ($component:ident) => {
        impl Guest for $component {
            fn init(config: String) -> Result<(), String> {
                jwt::init(&config)
            }

            fn generate_assertion(user: String) -> Result<Assertion, String> {
                jwt::with_proxy(|p| p.generate(&user, None)).map(|(token, expires)| Assertion { token, expires })
            }

            fn validate_assertion(token: String) -> Result<Claims, String> {
                jwt::with_proxy(|p| p.validate(&token, false)).map(|v| Claims { user: v.user, expires: v.expires })
            }
        }
    };
}
