//! The host's view of a bus message (reTHINK's message model).
//!
//! Guests exchange the WIT `message` record; the sandbox glue converts it
//! into [`Message`] (validating addresses and the JSON value) before the bus
//! sees it, so everything past the import works on checked data.

use crate::address::Address;

/// reTHINK's message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    Create,
    Read,
    Update,
    Delete,
    Subscribe,
    Unsubscribe,
    Response,
    Forward,
    Execute,
}

impl MessageType {
    pub const ALL: [MessageType; 9] = [
        MessageType::Create,
        MessageType::Read,
        MessageType::Update,
        MessageType::Delete,
        MessageType::Subscribe,
        MessageType::Unsubscribe,
        MessageType::Response,
        MessageType::Forward,
        MessageType::Execute,
    ];

    /// The type named `name` (as [`MessageType::as_str`] writes it).
    pub fn parse(name: &str) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Create => "create",
            MessageType::Read => "read",
            MessageType::Update => "update",
            MessageType::Delete => "delete",
            MessageType::Subscribe => "subscribe",
            MessageType::Unsubscribe => "unsubscribe",
            MessageType::Response => "response",
            MessageType::Forward => "forward",
            MessageType::Execute => "execute",
        }
    }
}

/// The body: response code, the resource the message is about, a JSON value
/// and a human-readable description (set by the host on its own answers).
/// Its text is [`Text`]: once the message is [`Message::share`]d, its
/// copies (one per observer of a data object, one per recipient of
/// [`crate::bus::Bus::send_each`]) share it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Body {
    pub code: Option<u16>,
    pub resource: Option<Text>,
    pub value: Option<Text>,
    pub description: Option<Text>,
}

/// An immutable UTF-8 string, owned like a `String` (made from one without
/// a copy, cloned by copying, dropped by a plain free: what a message that
/// goes to one recipient costs) until [`Text::share`]d, after which its
/// clones share it (`Arc<str>`). A message sent to many
/// ([`Message::share`], as [`crate::bus::Bus::send_each`] does) is shared
/// once, then each recipient's copy costs a count. It reads as a `&str`
/// (`Deref`, `as_str`, `as_deref()` on an `Option<Text>`), compares and
/// hashes as one; build one with `.into()` from a `String` or a `&str`.
/// The size of a `String` (24 bytes, an `Option<Text>` too).
#[derive(Clone)]
pub struct Text(Repr);

#[derive(Clone)]
enum Repr {
    Owned(String),
    Shared(std::sync::Arc<str>),
}

impl Text {
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Owned(s) => s,
            Repr::Shared(s) => s,
        }
    }

    /// A text shared from the start (one copy of `text`), for one text sent
    /// to many recipients in messages of their own.
    pub fn shared(text: &str) -> Text {
        Text(Repr::Shared(text.into()))
    }

    /// From now on its clones share it: moves an owned text into a shared
    /// buffer (one copy), once.
    pub fn share(&mut self) {
        if let Repr::Owned(s) = &mut self.0 {
            self.0 = Repr::Shared(std::mem::take(s).into());
        }
    }
}

impl Default for Text {
    fn default() -> Text {
        Text(Repr::Owned(String::new()))
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Text) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Text) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Text) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

/// As the `str` it holds, as `Borrow<str>` promises.
impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<String> for Text {
    fn from(s: String) -> Text {
        Text(Repr::Owned(s))
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text(Repr::Owned(s.to_owned()))
    }
}

impl From<&String> for Text {
    fn from(s: &String) -> Text {
        Text::from(s.as_str())
    }
}

impl From<Text> for String {
    fn from(t: Text) -> String {
        match t.0 {
            Repr::Owned(s) => s,
            Repr::Shared(s) => s.as_ref().to_owned(),
        }
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Text, D::Error> {
        String::deserialize(deserializer).map(Text::from)
    }
}

/// Who a message's sender acts for: a user and the identity provider that
/// vouches for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub user: Text,
    pub idp: Text,
}

impl Identity {
    /// Its clones share its text from now on ([`Text::share`]).
    pub fn share(&mut self) {
        self.user.share();
        self.idp.share();
    }
}

/// An IdP's signed statement of who the sender is, as it travels with a
/// message between domains (reTHINK's `body.identity`): the token is opaque
/// to the host and only the proxy of IdP `idp` can validate it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Assertion {
    pub idp: Text,
    pub token: Text,
}

impl Assertion {
    /// Its clones share its text from now on ([`Text::share`]).
    pub fn share(&mut self) {
        self.idp.share();
        self.token.share();
    }
}

/// A message on the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u64,
    pub kind: MessageType,
    pub from: Address,
    pub to: Address,
    pub body: Body,
    /// Set by the bus alone (see [`crate::identity`]): whatever a sender puts
    /// here is replaced before the message goes anywhere.
    pub identity: Option<Identity>,
    /// The sender's assertion, on messages that cross domains. An embedder's
    /// endpoint acting as a gateway may set it; guests cannot.
    pub assertion: Option<Assertion>,
}

/// Response codes the host itself answers with.
pub mod code {
    pub const OK: u16 = 200;
    pub const UNAUTHORIZED: u16 = 401;
    pub const FORBIDDEN: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const METHOD_NOT_ALLOWED: u16 = 405;
    pub const TIMEOUT: u16 = 408;
    pub const PAYLOAD_TOO_LARGE: u16 = 413;
    pub const INTERNAL_ERROR: u16 = 500;
    pub const UNAVAILABLE: u16 = 503;
}

impl Message {
    /// A message with a JSON value (or none).
    pub fn new(id: u64, kind: MessageType, from: Address, to: Address, value: Option<String>) -> Message {
        Message { id, kind, from, to, body: Body { value: value.map(Text::from), ..Body::default() }, identity: None, assertion: None }
    }

    /// The response answering request `id` from `requester`, sent by
    /// `responder`.
    pub fn response(id: u64, responder: Address, requester: Address, code: u16) -> Message {
        Message {
            id,
            kind: MessageType::Response,
            from: responder,
            to: requester,
            body: Body { code: Some(code), ..Body::default() },
            identity: None,
            assertion: None,
        }
    }

    /// The host's own answer to this message: a response with `code` and a
    /// description of why.
    pub fn answer(&self, code: u16, description: impl Into<Text>) -> Message {
        let mut r = Message::response(self.id, self.to.clone(), self.from.clone(), code);
        r.body.description = Some(description.into());
        r
    }

    /// Makes its text (body, identity, assertion) shared by the clones made
    /// from now on ([`Text::share`]): for a message about to be copied for
    /// many recipients.
    pub fn share(&mut self) {
        let b = &mut self.body;
        for t in [&mut b.resource, &mut b.value, &mut b.description].into_iter().flatten() {
            t.share();
        }
        if let Some(identity) = &mut self.identity {
            identity.share();
        }
        if let Some(assertion) = &mut self.assertion {
            assertion.share();
        }
    }

    /// Bytes of variable-size content, the measure for the size limit.
    pub fn size(&self) -> usize {
        let b = &self.body;
        self.from.as_str().len()
            + self.to.as_str().len()
            + [&b.resource, &b.value, &b.description].iter().map(|s| s.as_deref().map_or(0, str::len)).sum::<usize>()
            + self.assertion.as_ref().map_or(0, |a| a.idp.len() + a.token.len())
    }
}

/// Builds a [`Message`] from addresses and JSON given as text, checking
/// each: [`build`](MessageBuilder::build) names the field that is wrong.
/// Made by [`Message::builder`] or, with `from` and a fresh id filled in,
/// by [`Endpoint::message`](crate::Endpoint::message).
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until built"]
pub struct MessageBuilder {
    id: u64,
    kind: MessageType,
    from: String,
    to: String,
    body: Body,
}

/// A field of a message that cannot be built: which (`from`, `to`,
/// `body.value`, `body.code`) and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct MessageError {
    pub field: &'static str,
    pub reason: String,
}

impl Message {
    /// A builder of message `id` of `kind` from `from` to `to` (addresses as
    /// text).
    pub fn builder(id: u64, kind: MessageType, from: &str, to: &str) -> MessageBuilder {
        MessageBuilder { id, kind, from: from.to_owned(), to: to.to_owned(), body: Body::default() }
    }
}

impl MessageBuilder {
    /// The id (the sender chooses it; a request is identified by (`from`, `id`)).
    pub fn id(mut self, id: u64) -> MessageBuilder {
        self.id = id;
        self
    }

    /// `body.value`: JSON text (RFC 8259), checked by [`validate_value`].
    pub fn value(mut self, json: impl Into<Text>) -> MessageBuilder {
        self.body.value = Some(json.into());
        self
    }

    /// `body.resource`: what the message is about.
    pub fn resource(mut self, resource: impl Into<Text>) -> MessageBuilder {
        self.body.resource = Some(resource.into());
        self
    }

    /// `body.code` of a response, 100..=599.
    pub fn code(mut self, code: u16) -> MessageBuilder {
        self.body.code = Some(code);
        self
    }

    /// The message, or the first field that is wrong: an address that does
    /// not parse, a value that is not JSON the host carries, a code out of
    /// range or on a message that is not a response.
    pub fn build(self) -> Result<Message, MessageError> {
        let field = |field: &'static str| move |reason: String| MessageError { field, reason };
        let from = Address::parse(self.from).map_err(field("from"))?;
        let to = Address::parse(self.to).map_err(field("to"))?;
        if let Some(value) = &self.body.value {
            validate_value(value).map_err(|e| e.trim_start_matches("body.value ").to_owned()).map_err(field("body.value"))?;
        }
        match (self.body.code, self.kind) {
            (Some(code), MessageType::Response) if !(100..=599).contains(&code) => {
                return Err(field("body.code")(format!("{code} is not a response code (100..=599)")));
            }
            (Some(_), kind) if kind != MessageType::Response => {
                return Err(field("body.code")(format!("only a response has a code, not a {}", kind.as_str())));
            }
            _ => {}
        }
        Ok(Message { id: self.id, kind: self.kind, from, to, body: self.body, identity: None, assertion: None })
    }
}

/// The deepest nesting of arrays and objects a JSON value may have anywhere
/// in the host (bus, syncher, gateway): deeper input is refused before any
/// recursive code sees it. 128 is serde_json's own recursion limit.
pub const MAX_JSON_DEPTH: usize = 128;

/// The longest JSON number accepted, in characters. Longer numbers (half a
/// million digits) cost every parser that reads them and mean nothing to
/// an IEEE double.
pub const MAX_JSON_NUMBER_CHARS: usize = 100;

/// Checks that a body value is JSON text (RFC 8259) the host will carry:
/// nested at most [`MAX_JSON_DEPTH`] deep, every number at most
/// [`MAX_JSON_NUMBER_CHARS`] long and finite as a double (`1e999999` is
/// refused). The error says what is wrong and at which byte.
///
/// Nothing here recurses: syntax is checked by serde_json's iterative
/// skipping (`IgnoredAny`), depth and numbers by one scan of the bytes.
pub fn validate_value(value: &str) -> Result<(), String> {
    serde_json::from_str::<serde::de::IgnoredAny>(value).map_err(|e| format!("body.value is not JSON: {e}"))?;
    check_json_shape(value).map_err(|e| format!("body.value {e}"))
}

/// Depth and numbers of text already known to be JSON (see [`validate_value`]).
fn check_json_shape(text: &str) -> Result<(), String> {
    let bytes = text.as_bytes();
    let (mut depth, mut i) = (0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(format!("is nested deeper than {MAX_JSON_DEPTH} levels (at byte {i})"));
                }
            }
            b']' | b'}' => depth -= 1,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i + 1 < bytes.len() && matches!(bytes[i + 1], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    i += 1;
                }
                let number = &text[start..=i];
                if number.len() > MAX_JSON_NUMBER_CHARS {
                    return Err(format!("has a number of {} characters at byte {start}; the limit is {MAX_JSON_NUMBER_CHARS}", number.len()));
                }
                if !number.parse::<f64>().is_ok_and(f64::is_finite) {
                    return Err(format!("has a number out of a double's range at byte {start}: {number}"));
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_is_a_strings_buffer_until_shared_then_its_clones_share_one() {
        let mut spare = String::with_capacity(64);
        spare.push_str("{\"n\":1}");
        let at = spare.as_ptr();
        let mut text = Text::from(spare);
        assert_eq!(text.as_ptr(), at, "made without a copy, whatever its capacity");
        assert_ne!(text.clone().as_ptr(), at, "an owned text's clone is a copy, as a String's");
        text.share();
        let shared = text.as_ptr();
        let (a, b) = (text.clone(), text.clone());
        assert_eq!((a.as_ptr(), b.as_ptr()), (shared, shared), "a shared text's clones share it");
        text.share();
        assert_eq!(text.as_ptr(), shared, "shared once");
        let from_the_start = Text::shared("{\"n\":1}");
        assert_eq!((from_the_start.clone().as_ptr(), &*from_the_start), (from_the_start.as_ptr(), "{\"n\":1}"), "shared from the start");
        drop(text);
        assert_eq!(&*b, "{\"n\":1}");
        assert_eq!(a, Text::from("{\"n\":1}"), "equal whether shared or owned");
        assert_eq!(String::from(a.clone()), "{\"n\":1}");
        assert_eq!(format!("{b:?} {b}"), "\"{\\\"n\\\":1}\" {\"n\":1}", "reads as the str it holds");
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string("{\"n\":1}").unwrap());
        assert_eq!(serde_json::from_str::<Text>("\"é\"").unwrap(), "é");
        assert!(Text::from("b") > Text::from("a") && Text::default().is_empty());
        let kept: std::collections::HashSet<Text> = [a, Text::from("comm://a.example/x")].into();
        assert!(kept.contains("comm://a.example/x") && kept.contains("{\"n\":1}"), "found by its str, as Borrow<str> promises");
        assert_eq!((std::mem::size_of::<Text>(), std::mem::size_of::<Option<Text>>()), (24, 24), "a String's size");
    }

    #[test]
    fn json_values_are_bounded() {
        for ok in ["null", "[1, -2.5e10, {\"a\": \"[[[{\\\"\"}]", "\"\\\\\"", &"[".repeat(128).chars().chain("]".repeat(128).chars()).collect::<String>()] {
            assert_eq!(validate_value(ok), Ok(()), "{ok}");
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(validate_value(&deep).unwrap_err().contains("deeper than 128 levels (at byte 128)"));
        let just_over = format!("{}1{}", "{\"a\":".repeat(129), "}".repeat(129));
        assert!(validate_value(&just_over).unwrap_err().contains("deeper than 128"));
        assert!(validate_value("[1e999999]").unwrap_err().contains("out of a double's range at byte 1: 1e999999"));
        assert!(validate_value(&"9".repeat(500_000)).unwrap_err().contains("number of 500000 characters at byte 0"));
        assert!(validate_value("[1,").unwrap_err().contains("not JSON"));
    }
}
