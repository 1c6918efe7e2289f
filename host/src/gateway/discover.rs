//! Discovery for apps: the runtime's registry, as a hyperty's
//! `registry.discover` sees it (reTHINK's discovery, which the original
//! runtime offered apps next to the message bus). A frame
//! `{"type":"discover","id":n,"query":{"user"?,"name"?,"type"?,"domain"?,
//! "scheme"?}}` is answered by the gateway itself with `{"type":"discover",
//! "id":n,"registrations":[...],"truncated":bool}`: at most
//! [`MAX_DISCOVERED`] registrations (`Registration::to_json`), in the
//! registry's order. It counts against the connection's message rate like
//! any frame.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::registry::{Query, Registry};

/// The most registrations one answer carries.
pub const MAX_DISCOVERED: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscoverFrame {
    id: u64,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    query: QueryFrame,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct QueryFrame {
    user: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    hyperty_type: Option<String>,
    domain: Option<String>,
    scheme: Option<String>,
}

/// The answer to `text` if it is a discover frame (JSON already checked).
pub(super) fn answer(registry: &Registry, text: &str) -> Option<Value> {
    let frame: DiscoverFrame = serde_json::from_str(text).ok()?;
    if frame.kind != "discover" {
        return None;
    }
    let q = frame.query;
    let query = Query { user: q.user, name: q.name, hyperty_type: q.hyperty_type, domain: q.domain, scheme: q.scheme };
    let found = registry.discover(&query);
    let truncated = found.len() > MAX_DISCOVERED;
    let registrations: Vec<Value> = found.iter().take(MAX_DISCOVERED).map(|r| r.to_json()).collect();
    Some(json!({ "type": "discover", "id": frame.id, "registrations": registrations, "truncated": truncated }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Address;
    use crate::registry::{Kind, Registration, Status};

    fn registration(domain: &str, name: &str) -> Registration {
        Registration {
            address: Address::parse(format!("hyperty://{domain}/{name}-id")).unwrap(),
            kind: Kind::Hyperty,
            name: name.into(),
            domain: domain.into(),
            user: Some(format!("{name}@{domain}")),
            hyperty_types: vec![],
            schemes: vec![],
            status: Status::Live,
        }
    }

    #[test]
    fn answers_discover_frames_bounded_and_nothing_else() {
        let registry = Registry::default();
        registry.register(registration("alice.example", "chat"));
        registry.register(registration("bob.example", "chat"));
        for i in 0..MAX_DISCOVERED + 5 {
            registry.register(registration("many.example", &format!("h{i}")));
        }
        let found = answer(&registry, r#"{"type":"discover","id":7,"query":{"domain":"bob.example","name":"chat"}}"#).unwrap();
        assert_eq!(found["id"], 7);
        assert_eq!(found["truncated"], false);
        assert_eq!(found["registrations"].as_array().unwrap().len(), 1, "{found}");
        assert_eq!(found["registrations"][0]["address"], "hyperty://bob.example/chat-id");
        let all = answer(&registry, r#"{"type":"discover","id":8}"#).unwrap();
        assert_eq!((all["registrations"].as_array().unwrap().len(), &all["truncated"]), (MAX_DISCOVERED, &Value::Bool(true)));
        // Not a discovery: left to the caller's refusal.
        for not in [r#"{"type":"read","id":1}"#, r#"{"type":"discover","id":1,"query":{"colour":"red"}}"#, r#"{"type":"discover"}"#, "[]"] {
            assert!(answer(&registry, not).is_none(), "{not}");
        }
    }
}
