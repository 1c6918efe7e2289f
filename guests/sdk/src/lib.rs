//! What a Rust hyperty needs: the bindings of the `hyperty` world of
//! `rethink:hyperty@0.1.0` and a few constructors for messages.
//!
//! A hyperty implements [`Guest`] and exports it with
//! `hyperty_guest::export!(MyHyperty);`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "hyperty",
    pub_export_macro: true,
    default_bindings_module: "hyperty_guest",
});

pub use exports::rethink::hyperty::handler::Guest;
pub use rethink::hyperty::types::{Body, Identity, Message, MessageType, SendError};
pub use rethink::hyperty::{bus, registry, syncher};
/// Observing data objects: a [`Replica`] kept current with the deltas a
/// hyperty receives (`replica.apply(&msg)`).
pub use hyperty_replica::{Applied, Delta, Replica};

/// Every message type with its name in the WIT (`create`, `read`, ...).
pub const MESSAGE_TYPES: [(MessageType, &str); 9] = [
    (MessageType::Create, "create"),
    (MessageType::Read, "read"),
    (MessageType::Update, "update"),
    (MessageType::Delete, "delete"),
    (MessageType::Subscribe, "subscribe"),
    (MessageType::Unsubscribe, "unsubscribe"),
    (MessageType::Response, "response"),
    (MessageType::Forward, "forward"),
    (MessageType::Execute, "execute"),
];

impl MessageType {
    /// Its name in the WIT.
    pub fn name(self) -> &'static str {
        MESSAGE_TYPES.iter().find(|(t, _)| *t == self).map_or("?", |(_, n)| n)
    }

    /// The type named `name`.
    pub fn parse(name: &str) -> Option<MessageType> {
        MESSAGE_TYPES.iter().find(|(_, n)| *n == name).map(|(t, _)| *t)
    }
}

impl<'a> From<&'a Message> for Delta<'a> {
    fn from(m: &'a Message) -> Delta<'a> {
        Delta { from: &m.from, kind: m.type_.name(), resource: m.body.resource.as_deref(), value: m.body.value.as_deref() }
    }
}

/// Logs at info level into the host's log, tagged with this hyperty.
pub fn info(text: &str) {
    rethink::hyperty::log::log(rethink::hyperty::log::Level::Info, text);
}

/// Logs at warn level into the host's log, tagged with this hyperty.
pub fn warn(text: &str) {
    rethink::hyperty::log::log(rethink::hyperty::log::Level::Warn, text);
}

impl Body {
    /// A body carrying only a JSON value.
    pub fn value(json: impl Into<String>) -> Body {
        Body { code: None, resource: None, value: Some(json.into()), description: None }
    }
}

impl Message {
    /// The string field `key` of the body's JSON value, if there is one.
    pub fn value_str(&self, key: &str) -> Option<String> {
        let value: serde_json::Value = serde_json::from_str(self.body.value.as_deref()?).ok()?;
        value.get(key)?.as_str().map(str::to_owned)
    }

    /// A message of `kind` from `from` to `to` with a JSON `value`.
    pub fn new(id: u64, kind: MessageType, from: &str, to: &str, value: impl Into<String>) -> Message {
        Message { id, type_: kind, from: from.to_string(), to: to.to_string(), body: Body::value(value), identity: None }
    }
}

impl SendError {
    /// `kind: detail`, e.g. `spoofed-from: hyperty://... is not ...`.
    pub fn describe(&self) -> String {
        match self {
            SendError::SpoofedFrom(s) => format!("spoofed-from: {s}"),
            SendError::SpoofedIdentity(s) => format!("spoofed-identity: {s}"),
            SendError::Malformed(s) => format!("malformed: {s}"),
            SendError::TooLarge(s) => format!("too-large: {s}"),
            SendError::DuplicateId(id) => format!("duplicate-id: {id}"),
            SendError::InboxFull(s) => format!("inbox-full: {s}"),
            SendError::RateLimited(s) => format!("rate-limited: {s}"),
            SendError::TooManyPending(s) => format!("too-many-pending: {s}"),
        }
    }
}
