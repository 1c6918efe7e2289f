//! Bus addresses: URLs of the form `scheme://authority[/path]`.
//!
//! `hyperty://<domain>/<uuid>` for hyperties, `runtime://<domain>/<id>` for
//! runtimes, `domain://<service>.<domain>` for a domain's back-end services
//! and `<scheme>://<domain>/<id>` for data objects. Routing is by exact
//! address, so parsing only validates and finds the owning domain; it never
//! normalises.

use std::fmt;
use std::sync::Arc;

/// The longest address the bus accepts, in bytes.
pub const MAX_ADDRESS_LEN: usize = 1024;

/// A validated bus address. Shared text: a clone (one per message that
/// names it) copies no bytes, and two clones compare equal by pointer
/// before their bytes are. Its scheme and domain are found once, when it
/// is parsed: they are read several times on every message's path
/// (routing, identity, policies).
#[derive(Clone)]
pub struct Address {
    text: Arc<str>,
    /// Where the scheme ends (the first `:`).
    scheme_end: u16,
    /// The byte range of [`Address::domain`].
    domain: (u16, u16),
}

impl Address {
    /// Validates `text` as an address.
    pub fn parse(text: impl Into<String>) -> Result<Address, String> {
        let text = text.into();
        validate(&text)?;
        Ok(Address::validated(text.into()))
    }

    /// A fresh hyperty address in `domain`: `hyperty://<domain>/<uuid>`.
    /// Errors: `domain` makes no valid address (see [`Address::parse`]).
    pub fn new_hyperty(domain: &str) -> Result<Address, String> {
        Address::parse(format!("hyperty://{domain}/{}", uuid::Uuid::new_v4()))
    }

    /// `text`, validated (at most [`MAX_ADDRESS_LEN`] bytes: the offsets
    /// fit in `u16`), with its scheme and domain found.
    fn validated(text: Arc<str>) -> Address {
        let scheme_end = text.bytes().position(|b| b == b':').expect("validated");
        let start = scheme_end + 3;
        let end = text[start..].bytes().position(|b| b == b'/').map_or(text.len(), |i| start + i);
        let authority = &text[start..end];
        // `domain://<service>.<domain>`: the service label is not the domain.
        let start = match (&text[..scheme_end], authority.bytes().position(|b| b == b'.')) {
            ("domain", Some(dot)) => start + dot + 1,
            _ => start,
        };
        let offset = |i: usize| u16::try_from(i).expect("an address is at most MAX_ADDRESS_LEN bytes");
        Address { scheme_end: offset(scheme_end), domain: (offset(start), offset(end)), text }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The URL scheme (`hyperty`, `runtime`, `domain`, a data-object scheme).
    pub fn scheme(&self) -> &str {
        &self.text[..usize::from(self.scheme_end)]
    }

    /// The provider domain that owns this address: the authority, except for
    /// `domain://<service>.<domain>` where the service label is dropped.
    pub fn domain(&self) -> &str {
        &self.text[usize::from(self.domain.0)..usize::from(self.domain.1)]
    }

    /// For a data object's child, `<url>/children/<name>` (reTHINK's
    /// children): the object's URL and the child's name (1 to 256 ASCII
    /// letters, digits, `-`, `_`, `.`: [`valid_child_name`]); `None` for any
    /// other address.
    pub fn child(&self) -> Option<(Address, &str)> {
        let (url, name) = self.text.rsplit_once("/children/")?;
        if !valid_child_name(name) {
            return None;
        }
        Some((Address::parse(url).ok()?, name))
    }
}

/// Whether `name` may name a data object's child: 1 to 256 ASCII letters,
/// digits, `-`, `_`, `.`.
pub fn valid_child_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Checks that `name` is a DNS-style domain name (`alice.example`).
pub fn validate_domain(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok { Ok(()) } else { Err(format!("{name:?} is not a domain name (like alice.example)")) }
}

fn validate(text: &str) -> Result<(), String> {
    if text.len() > MAX_ADDRESS_LEN {
        return Err(format!("address is {} bytes long, the limit is {MAX_ADDRESS_LEN}", text.len()));
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(format!("{text:?} is not an address (scheme://domain/path)"));
    };
    let scheme_ok = scheme.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && scheme.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    if !scheme_ok {
        return Err(format!("{text:?} has an invalid scheme {scheme:?}"));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    validate_domain(authority).map_err(|e| format!("{text:?}: {e}"))?;
    let bytes = path.as_bytes();
    for (i, c) in path.char_indices() {
        let ok = match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '-' | '.' | '_' | '~' | '/' | ':' | '@' => true,
            '!' | '$' | '&' | '\'' | '(' | ')' | '*' | '+' | ',' | ';' | '=' => true,
            '%' => bytes.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)),
            _ => false,
        };
        if !ok {
            // `{:?}` escapes controls, bidi and invisible characters: the
            // error never carries them raw.
            return Err(format!(
                "{text:?}: {c:?} at byte {} is not allowed in an address path (only ASCII letters, digits, \
                 -._~!$&'()*+,;=:@/ and %XX)",
                scheme.len() + 3 + authority.len() + 1 + i
            ));
        }
    }
    Ok(())
}

// Equality, hashing and order are the text's (the offsets follow from it).
impl PartialEq for Address {
    fn eq(&self, other: &Address) -> bool {
        self.text == other.text
    }
}

impl Eq for Address {}

impl std::hash::Hash for Address {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl PartialOrd for Address {
    fn partial_cmp(&self, other: &Address) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Address {
    fn cmp(&self, other: &Address) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl From<Address> for String {
    fn from(a: Address) -> String {
        a.text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_finds_the_domain() {
        let a = Address::parse("hyperty://alice.example/123").unwrap();
        assert_eq!(a.scheme(), "hyperty");
        assert_eq!(a.domain(), "alice.example");
        let r = Address::parse("domain://registry.alice.example").unwrap();
        assert_eq!(r.domain(), "alice.example");
        let o = Address::parse("comm://bob.example/room/children/chat").unwrap();
        assert_eq!(o.domain(), "bob.example");
        assert_eq!(Address::new_hyperty("x.example").unwrap().domain(), "x.example");
        assert!(Address::new_hyperty(&"a".repeat(70_000)).is_err(), "too long for an address");
        assert!(Address::new_hyperty("a b").is_err());
        for (text, scheme, domain) in [
            ("domain://registry", "domain", "registry"),
            ("runtime://a.b", "runtime", "a.b"),
            ("comm+x://a.b/", "comm+x", "a.b"),
            ("domain://idp.a.b/x/y", "domain", "a.b"),
        ] {
            let a = Address::parse(text).unwrap();
            assert_eq!((a.scheme(), a.domain()), (scheme, domain), "{text}");
        }
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "alice", "://x", "hyperty://", "hyperty://bad domain/x", "Hyp://a.b/c", "hyperty://a.b/c d"] {
            assert!(Address::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Address::parse(format!("hyperty://a.b/{}", "x".repeat(2000))).is_err());
    }

    #[test]
    fn paths_are_ascii_pchars_and_errors_never_carry_them_raw() {
        for ok in ["hyperty://a.b/x-y_z.~1", "comm://a.b/room/children/chat", "x://a.b/%41:@!$&'()*+,;=", "domain://registry.a.b"] {
            assert!(Address::parse(ok).is_ok(), "{ok:?} refused");
        }
        for (bad, shown) in [
            ("hyperty://a.b/x\u{202E}gpj.exe", "'\\u{202e}' at byte 15"),
            ("hyperty://a.b/x\u{200B}", "'\\u{200b}' at byte 15"),
            ("hyperty://a.b/caf\u{e9}", "'\u{e9}' at byte 17"),
            ("hyperty://a.b/a?b", "'?' at byte 15"),
            ("hyperty://a.b/a#b", "'#' at byte 15"),
            ("hyperty://a.b/%4", "'%' at byte 14"),
            ("hyperty://a.b/a\nb", "'\\n' at byte 15"),
        ] {
            let e = Address::parse(bad).unwrap_err();
            assert!(e.contains(shown), "{bad:?}: {e}");
            assert!(!e.chars().any(|c| c.is_control() || ('\u{2000}'..='\u{206F}').contains(&c)), "{e:?}");
        }
    }
}
