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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Body {
    pub code: Option<u16>,
    pub resource: Option<String>,
    pub value: Option<String>,
    pub description: Option<String>,
}

/// Who a message's sender acts for: a user and the identity provider that
/// vouches for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub user: String,
    pub idp: String,
}

/// An IdP's signed statement of who the sender is, as it travels with a
/// message between domains (reTHINK's `body.identity`): the token is opaque
/// to the host and only the proxy of IdP `idp` can validate it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Assertion {
    pub idp: String,
    pub token: String,
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
    pub const INTERNAL_ERROR: u16 = 500;
    pub const UNAVAILABLE: u16 = 503;
}

impl Message {
    /// A message with a JSON value (or none).
    pub fn new(id: u64, kind: MessageType, from: Address, to: Address, value: Option<String>) -> Message {
        Message { id, kind, from, to, body: Body { value, ..Body::default() }, identity: None, assertion: None }
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
    pub fn answer(&self, code: u16, description: impl Into<String>) -> Message {
        let mut r = Message::response(self.id, self.to.clone(), self.from.clone(), code);
        r.body.description = Some(description.into());
        r
    }

    /// Bytes of variable-size content, the measure for the size limit.
    pub fn size(&self) -> usize {
        let b = &self.body;
        self.from.as_str().len()
            + self.to.as_str().len()
            + [&b.resource, &b.value, &b.description].iter().map(|s| s.as_ref().map_or(0, String::len)).sum::<usize>()
            + self.assertion.as_ref().map_or(0, |a| a.idp.len() + a.token.len())
    }
}

/// Checks that a body value is JSON text.
pub fn validate_value(value: &str) -> Result<(), String> {
    serde_json::from_str::<serde::de::IgnoredAny>(value).map(|_| ()).map_err(|e| format!("body.value is not JSON: {e}"))
}
