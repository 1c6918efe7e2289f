//! An IdP proxy issuing and verifying EdDSA-signed JWTs.
//!
//! Configuration (the bundle's `config` table of the IdP, as JSON):
//!
//! ```toml
//! [idps."idp.example"]
//! config = { issuer = "idp.example",
//!            signing-key = "<64 hex digits: an ed25519 secret key>",   # to issue; omit to only validate
//!            verifying-keys = ["ed25519:<64 hex digits>"],              # default: signing-key's public key
//!            lifetime-seconds = 3600 }
//! ```
//!
//! Tokens carry `iss` (the issuer), `sub` (the user, which must be of the
//! form `<name>@<issuer>`: an IdP vouches only for its own users), `iat`
//! and `exp`. A token is valid when one of the verifying keys verifies its
//! signature, its issuer is this IdP, its subject one of its users and it
//! has not expired (no leeway: the host caches a validation until `exp`).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use ed25519_dalek::{SigningKey, VerifyingKey};
use jwt_compact::alg::Ed25519;
use jwt_compact::{AlgorithmExt, Claims, Header, Token, UntrustedToken};
use serde::{Deserialize, Serialize};

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
}

fn default_lifetime() -> u64 {
    3600
}

struct Proxy {
    issuer: String,
    signing: Option<SigningKey>,
    verifying: Vec<VerifyingKey>,
    lifetime: u64,
}

#[derive(Serialize, Deserialize)]
struct UserClaims {
    iss: String,
    sub: String,
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
        Ok(Proxy { issuer: config.issuer, signing, verifying, lifetime: config.lifetime_seconds })
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
        let mut claims = Claims::new(UserClaims { iss: self.issuer.clone(), sub: user.to_owned() });
        claims.issued_at = DateTime::<Utc>::from_timestamp(issued as i64, 0);
        claims.expiration = DateTime::<Utc>::from_timestamp(expires as i64, 0);
        let token = Ed25519.token(&Header::empty(), &claims, key).map_err(|e| format!("cannot sign: {e}"))?;
        Ok(Assertion { token, expires })
    }

    fn validate(&self, token: &str) -> Result<Asserted, String> {
        let untrusted = UntrustedToken::new(token).map_err(|e| format!("malformed token: {e}"))?;
        let token: Token<UserClaims> = self
            .verifying
            .iter()
            .find_map(|key| Ed25519.validator(key).validate(&untrusted).ok())
            .ok_or_else(|| format!("signature not made by a key of {}", self.issuer))?;
        let claims = token.claims();
        if claims.custom.iss != self.issuer {
            return Err(format!("issued by {:?}, not {}", claims.custom.iss, self.issuer));
        }
        if !self.is_own_user(&claims.custom.sub) {
            return Err(format!("{:?} is not a user of {}", claims.custom.sub, self.issuer));
        }
        let expires = claims.expiration.ok_or("no expiry (exp)")?.timestamp();
        let expires = u64::try_from(expires).map_err(|_| "expiry before 1970")?;
        if expires <= now() {
            return Err(format!("expired {} s ago", now() - expires));
        }
        Ok(Asserted { user: claims.custom.sub.clone(), expires })
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
