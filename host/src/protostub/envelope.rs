//! The envelope: a message as it travels from one runtime to another
//! through a protostub's node. JSON (RFC 8259), version 1:
//! `{"v":1,"origin","seq","id","type","from","to","body":{"code",
//! "resource","value","description"},"assertion":{"idp","token"},
//! "timeout-ms"}`; `origin` and `seq` name it for the receiver's
//! duplicate check, `timeout-ms` is how long a request's sender waits.
//! A field with no value (`body.code`, `resource`, `value`, `description`,
//! `assertion`, `timeout-ms`) is left out when written; read, absent and
//! `null` are the same, so envelopes written with the `null`s (before
//! 2026-12-03) are read as before.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::address::Address;
use crate::message::{Assertion, Body, Message, MessageType, Text};

/// The wire format: the message as JSON, with the queue's origin, the
/// message's sequence number and, for a request, how long its sender waits
/// for the response (`timeout-ms`) in it. Written from the message's own
/// fields (no `Value` tree: it is made under the queue's lock, on every
/// message to another runtime).
pub(super) fn write(m: &Message, origin: &str, seq: u64, wait: Option<Duration>) -> String {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        v: u8,
        origin: &'a str,
        seq: u64,
        id: u64,
        #[serde(rename = "type")]
        kind: &'a str,
        from: &'a str,
        to: &'a str,
        body: Body<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        assertion: Option<Assertion<'a>>,
        #[serde(rename = "timeout-ms", skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    }
    // A field that is `None` is left out: read back, absent is `null`.
    #[derive(serde::Serialize)]
    struct Body<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
        #[serde(skip_serializing_if = "Option::is_none")]
        resource: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        description: Option<&'a str>,
    }
    #[derive(serde::Serialize)]
    struct Assertion<'a> {
        idp: &'a str,
        token: &'a str,
    }
    let envelope = Envelope {
        v: 1,
        origin,
        seq,
        id: m.id,
        kind: m.kind.as_str(),
        from: m.from.as_str(),
        to: m.to.as_str(),
        body: Body {
            code: m.body.code,
            resource: m.body.resource.as_deref(),
            value: m.body.value.as_deref(),
            description: m.body.description.as_deref(),
        },
        assertion: m.assertion.as_ref().map(|a| Assertion { idp: &a.idp, token: &a.token }),
        timeout_ms: wait.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
    };
    // The fields' own lengths, and room for the names and escapes.
    let texts = [&m.body.resource, &m.body.value, &m.body.description].iter().map(|t| t.as_deref().map_or(0, str::len)).sum::<usize>()
        + m.assertion.as_ref().map_or(0, |a| a.idp.len() + a.token.len());
    let mut out = Vec::with_capacity(192 + origin.len() + m.from.as_str().len() + m.to.as_str().len() + texts);
    serde_json::to_writer(&mut out, &envelope).expect("a message serialises");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// A received envelope: the message and where it came from.
#[derive(Debug)]
pub(crate) struct Received {
    pub origin: String,
    pub seq: u64,
    pub message: Message,
    /// For a request: how long its sender waits for the response.
    pub wait: Option<Duration>,
}

/// The longest envelope `origin` taken (a runtime's is 32 or 36 bytes).
pub(crate) const MAX_ORIGIN_BYTES: usize = 64;

/// Reads an envelope from the network; every field is checked (it is
/// untrusted input), the error names the field (`type is missing or not a
/// string`, `body.code is not a status code`, ...); a field given twice is
/// refused (`duplicate field`), unknown fields are ignored.
///
/// Read in one pass into borrowed fields, no `Value` tree: it runs on the
/// receiving stub's thread for every message from another runtime.
pub(crate) fn open(text: &str) -> Result<Received, String> {
    // Read as `Nested`, not as `Wire` itself: serde reads a struct from an
    // array too, a form `write` never makes.
    let wire: Nested<Wire<'_>> = serde_json::from_str(text).map_err(|e| if e.is_data() { e.to_string() } else { format!("not JSON: {e}") })?;
    let Nested::Object(wire) = wire else {
        return Err("an envelope is a JSON object".into());
    };
    if !matches!(wire.v, Some(Loose::Number(1))) {
        return Err("unknown envelope version (v)".into());
    }
    let kind = string(wire.kind, "type")?;
    let kind = MessageType::parse(&kind).ok_or_else(|| format!("type {kind:?} is not a message type"))?;
    let from = Address::parse(string(wire.from, "from")?).map_err(|e| format!("from: {e}"))?;
    let to = Address::parse(string(wire.to, "to")?).map_err(|e| format!("to: {e}"))?;
    let Some(Nested::Object(body)) = wire.body else {
        return Err("body is missing or not an object".into());
    };
    let code = match body.code {
        None => None,
        Some(Loose::Number(c)) => Some(u16::try_from(c).map_err(|_| "body.code is not a status code")?),
        Some(_) => return Err("body.code is not a status code".into()),
    };
    let value = optional(body.value, "body.value")?;
    if let Some(value) = &value {
        crate::message::validate_value(value)?;
    }
    let assertion = match wire.assertion {
        None => None,
        Some(Nested::Other) => return Err("assertion is not an object".into()),
        Some(Nested::Object(a)) => Some(Assertion {
            idp: string(a.idp, "assertion.idp")?.into_owned().into(),
            token: string(a.token, "assertion.token")?.into_owned().into(),
        }),
    };
    let message = Message {
        id: number(wire.id, "id")?,
        kind,
        from,
        to,
        body: Body {
            code,
            resource: optional(body.resource, "body.resource")?.map(Text::from),
            value: value.map(Text::from),
            description: optional(body.description, "body.description")?.map(Text::from),
        },
        identity: None,
        assertion,
    };
    let wait = match wire.timeout_ms {
        None => None,
        Some(Loose::Number(ms)) => Some(Duration::from_millis(ms)),
        Some(_) => return Err("timeout-ms is not a number of milliseconds".into()),
    };
    let origin = string(wire.origin, "origin")?;
    // A runtime's origin is a UUID or 32 hex digits: kept in memory and on
    // disk per envelope taken, so it is bounded and plain.
    if origin.is_empty() || origin.len() > MAX_ORIGIN_BYTES || !origin.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(format!("origin: not 1..={MAX_ORIGIN_BYTES} letters, digits or '-'"));
    }
    Ok(Received { origin: origin.into_owned(), seq: number(wire.seq, "seq")?, message, wait })
}

/// The envelope's fields as read, each whatever JSON it was (absent or
/// `null`: `None`); what it must be is checked by [`open`].
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    v: Option<Loose<'a>>,
    #[serde(borrow)]
    origin: Option<Loose<'a>>,
    #[serde(borrow)]
    seq: Option<Loose<'a>>,
    #[serde(borrow)]
    id: Option<Loose<'a>>,
    #[serde(borrow, rename = "type")]
    kind: Option<Loose<'a>>,
    #[serde(borrow)]
    from: Option<Loose<'a>>,
    #[serde(borrow)]
    to: Option<Loose<'a>>,
    #[serde(borrow)]
    body: Option<Nested<WireBody<'a>>>,
    #[serde(borrow)]
    assertion: Option<Nested<WireAssertion<'a>>>,
    #[serde(borrow, rename = "timeout-ms")]
    timeout_ms: Option<Loose<'a>>,
}

#[derive(Deserialize)]
struct WireBody<'a> {
    #[serde(borrow)]
    code: Option<Loose<'a>>,
    #[serde(borrow)]
    resource: Option<Loose<'a>>,
    #[serde(borrow)]
    value: Option<Loose<'a>>,
    #[serde(borrow)]
    description: Option<Loose<'a>>,
}

#[derive(Deserialize)]
struct WireAssertion<'a> {
    #[serde(borrow)]
    idp: Option<Loose<'a>>,
    #[serde(borrow)]
    token: Option<Loose<'a>>,
}

/// A JSON value other than `null`, kept only as far as an envelope field
/// can use it: a string (borrowed from the text unless it had escapes), a
/// non-negative integer, or anything else (skipped).
enum Loose<'a> {
    String(Cow<'a, str>),
    Number(u64),
    Other,
}

/// An object read as `T`, or any other JSON value (skipped).
enum Nested<T> {
    Object(T),
    Other,
}

fn string<'a>(field: Option<Loose<'a>>, name: &str) -> Result<Cow<'a, str>, String> {
    match field {
        Some(Loose::String(s)) => Ok(s),
        _ => Err(format!("{name} is missing or not a string")),
    }
}

fn number(field: Option<Loose<'_>>, name: &str) -> Result<u64, String> {
    match field {
        Some(Loose::Number(n)) => Ok(n),
        _ => Err(format!("{name} is missing or not a number")),
    }
}

fn optional(field: Option<Loose<'_>>, name: &str) -> Result<Option<String>, String> {
    match field {
        None => Ok(None),
        Some(Loose::String(s)) => Ok(Some(s.into_owned())),
        Some(_) => Err(format!("{name} is not a string")),
    }
}

/// Skips what is left of an array.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

impl<'de: 'a, 'a> Deserialize<'de> for Loose<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LooseVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for LooseVisitor<'a> {
            type Value = Loose<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Loose<'a>, E> {
                Ok(Loose::String(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Loose<'a>, E> {
                Ok(Loose::String(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Loose<'a>, E> {
                Ok(Loose::String(Cow::Owned(s)))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Loose<'a>, E> {
                Ok(Loose::Number(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Loose<'a>, E> {
                Ok(u64::try_from(n).map_or(Loose::Other, Loose::Number))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Loose<'a>, E> {
                Ok(Loose::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Loose<'a>, E> {
                Ok(Loose::Other)
            }
            fn visit_unit<E>(self) -> Result<Loose<'a>, E> {
                Ok(Loose::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Loose<'a>, A::Error> {
                skip_seq(seq).map(|()| Loose::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose<'a>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose::Other)
            }
        }
        deserializer.deserialize_any(LooseVisitor(std::marker::PhantomData))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Nested<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NestedVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for NestedVisitor<T> {
            type Value = Nested<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Nested<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Nested::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Nested<T>, A::Error> {
                skip_seq(seq).map(|()| Nested::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
            fn visit_unit<E>(self) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
        }
        deserializer.deserialize_any(NestedVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The envelope written from the message's fields is the JSON the
    /// `Value` tree it replaced gave, byte for byte, and reads back.
    #[test]
    fn an_envelope_is_the_messages_json_and_reads_back() {
        let (from, to) = (Address::parse("hyperty://alice.example/a").unwrap(), Address::parse("hyperty://bob.example/b").unwrap());
        let plain = Message::new(7, MessageType::Update, from.clone(), to.clone(), None);
        let mut full = Message::new(u64::MAX, MessageType::Response, from, to, Some(r#"{"quote":"\"\u0000é\n"}"#.into()));
        full.body.code = Some(200);
        full.body.resource = Some("comm://alice.example/r".into());
        full.body.description = Some("tab\there".into());
        full.assertion = Some(crate::message::Assertion { idp: "idp.example".into(), token: "a.b.c".into() });
        for (m, wait) in [(&plain, None), (&full, Some(Duration::from_millis(1500)))] {
            let tree = json!({
                "v": 1, "origin": "origin-1", "seq": 3, "id": m.id, "type": m.kind.as_str(),
                "from": m.from.as_str(), "to": m.to.as_str(),
                "body": { "code": m.body.code, "resource": m.body.resource, "value": m.body.value, "description": m.body.description },
                "assertion": m.assertion.as_ref().map(|a| json!({ "idp": a.idp, "token": a.token })),
                "timeout-ms": wait.map(|w: Duration| w.as_millis() as u64),
            });
            // Written without the fields that have no value.
            fn without_nulls(v: &mut serde_json::Value) {
                if let Some(fields) = v.as_object_mut() {
                    fields.retain(|_, f| !f.is_null());
                    fields.values_mut().for_each(without_nulls);
                }
            }
            let mut bare = tree.clone();
            without_nulls(&mut bare);
            let text = write(m, "origin-1", 3, wait);
            assert_eq!(text, bare.to_string());
            let back = open(&text).unwrap();
            assert_eq!((back.origin.as_str(), back.seq, &back.message, back.wait), ("origin-1", 3, m, wait));
            // As written before 2026-12-03, with the nulls: read the same.
            let back = open(&tree.to_string()).unwrap();
            assert_eq!((back.origin.as_str(), back.seq, &back.message, back.wait), ("origin-1", 3, m, wait));
        }
        assert_eq!(
            write(&plain, "origin-1", 3, None),
            r#"{"v":1,"origin":"origin-1","seq":3,"id":7,"type":"update","from":"hyperty://alice.example/a","to":"hyperty://bob.example/b","body":{}}"#
        );
    }

    /// `nats-stub` reads the head of every envelope it sends by position
    /// (`head_as_written`): `v`, `origin`, `seq`, `id`, `type` and `from`
    /// first, in that order, unescaped. It reads any other form with serde,
    /// so a change here costs it speed, not correctness.
    #[test]
    fn the_head_comes_first_as_the_stub_reads_it() {
        let (from, to) = (Address::parse("hyperty://alice.example/a").unwrap(), Address::parse("hyperty://bob.example/b").unwrap());
        let m = Message::new(7, MessageType::Update, from, to, Some(r#"{"k":"\"v\""}"#.into()));
        let text = write(&m, "o-1", 42, None);
        let head = r#"{"v":1,"origin":"o-1","seq":42,"id":7,"type":"update","from":"hyperty://alice.example/a","#;
        assert!(text.starts_with(head), "{text}");
    }

    /// Each malformed field is refused with an error naming it.
    #[test]
    fn a_malformed_field_is_named() {
        let good = json!({
            "v": 1, "origin": "o-1", "seq": 3, "id": 7, "type": "update",
            "from": "hyperty://a.example/x", "to": "hyperty://b.example/y",
            "body": { "code": 200, "value": "{}" }, "assertion": { "idp": "i", "token": "t" }, "timeout-ms": 100,
        });
        assert!(open(&good.to_string()).is_ok());
        let cases = [
            ("v", json!(2), "unknown envelope version (v)"),
            ("v", json!("1"), "unknown envelope version (v)"),
            ("type", json!(1), "type is missing or not a string"),
            ("type", json!("nope"), "type \"nope\" is not a message type"),
            ("from", json!(null), "from is missing or not a string"),
            ("to", json!("bob"), "to: "),
            ("id", json!(-1), "id is missing or not a number"),
            ("id", json!(1.5), "id is missing or not a number"),
            ("seq", json!([1]), "seq is missing or not a number"),
            ("origin", json!("a b"), "origin: not 1..=64 letters, digits or '-'"),
            ("body", json!("text"), "body is missing or not an object"),
            ("body", json!({ "code": 70000 }), "body.code is not a status code"),
            ("body", json!({ "code": "200" }), "body.code is not a status code"),
            ("body", json!({ "value": 3 }), "body.value is not a string"),
            ("body", json!({ "value": "{" }), "body.value"),
            ("assertion", json!({ "idp": "i" }), "assertion.token is missing or not a string"),
            ("assertion", json!([]), "assertion is not an object"),
            ("timeout-ms", json!(-5), "timeout-ms is not a number of milliseconds"),
        ];
        for (field, value, error) in cases {
            let mut bad = good.clone();
            bad[field] = value;
            let refused = open(&bad.to_string()).err().unwrap_or_else(|| panic!("{field} = {} taken", bad[field]));
            assert!(refused.starts_with(error), "{field}: {refused}");
        }
        let text = good.to_string();
        assert!(open(&text[..text.len() - 1]).unwrap_err().starts_with("not JSON: "));
        let twice = text.replacen("\"id\":7", "\"id\":7,\"id\":8", 1);
        assert!(open(&twice).unwrap_err().starts_with("duplicate field `id`"), "{twice}");
        // The fields in order as an array (serde's other form of a struct),
        // or any other value, is not an envelope.
        let array = r#"[1,"o",3,7,"update","hyperty://a.example/x","hyperty://b.example/y",{},null,null]"#;
        for other in [array, "\"text\"", "7", "null"] {
            assert_eq!(open(other).unwrap_err(), "an envelope is a JSON object", "{other}");
        }
    }

    /// Strings with escapes (not borrowable) and unknown fields of any
    /// shape are read; `null` counts as absent.
    #[test]
    fn escapes_unknown_fields_and_nulls_are_read() {
        let text = r#"{"v":1,"extra":{"deep":[1,{"x":null}]},"origin":"o","seq":1,"id":2,"type":"upd\u0061te",
            "from":"hyperty:\/\/a.example/\u0078","to":"hyperty://b.example/y","body":{"code":null,"description":"tab\there","other":[]},
            "assertion":null,"timeout-ms":null}"#;
        let back = open(text).unwrap();
        assert_eq!(back.message.kind, MessageType::Update);
        assert_eq!(back.message.from.as_str(), "hyperty://a.example/x");
        assert_eq!((back.message.body.code, back.message.body.description.as_deref()), (None, Some("tab\there")));
        assert_eq!((back.message.assertion.is_none(), back.wait), (true, None));
    }
}
