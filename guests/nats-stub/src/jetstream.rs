//! Durable delivery through NATS JetStream (the bundle entry's `durable =
//! true`; the host then adds `"durable": "<id>"` to the stub's config, a
//! stable id of this runtime for the domain). Spoken over the plain text
//! protocol, as the JetStream API is plain NATS request/reply
//! (<https://docs.nats.io/reference/reference-protocols/nats_api_reference>):
//!
//! - **A stream per domain**, `rethink_<domain with _ for .>`, capturing
//!   `rethink.<domain>.>` (every subject a message to the domain is
//!   published on), created at every connection (`$JS.API.STREAM.CREATE`;
//!   creating it again is harmless).
//! - **Publishing**: `HPUB` with a `Nats-Msg-Id` header, `<origin>.<seq>`
//!   of the host's envelope: stable for a message across the sender's
//!   restarts (the host keeps both), so a resend within the stream's
//!   duplicate window is answered `"duplicate": true` and not stored again.
//!   The reply subject is the stub's unguessable `<inbox>.<seq>-<tag>`; the
//!   message leaves the host's queue (`delivered`) only on a PubAck from
//!   the domain's stream. Anything else on that subject (another stream, a
//!   malformed or error answer) is no acknowledgement: the message is
//!   published again after a pause or the ack timeout.
//! - **Consuming**: a durable pull consumer per listened address,
//!   `<id>_<32 hex of the address's hash>` (so per receiving runtime and
//!   kept across its restarts), filtered on the address's subjects, with
//!   explicit acks and redelivery after `ack_wait` (the stub's
//!   `ack-timeout-ms`); messages are pulled in batches
//!   (`$JS.API.CONSUMER.MSG.NEXT`), each posted into the host and then
//!   answered on its `$JS.ACK.…` reply subject: `+ACK` once the host took
//!   it, `-NAK` with a delay under back-pressure, `+TERM` when the host
//!   refuses it for good. A consumer is deleted when its address is
//!   forgotten (undeployed).

use serde::Deserialize;

/// Messages asked for by one pull.
pub const PULL_BATCH: u32 = 128;
/// How long the server holds a pull open (ns).
pub const PULL_EXPIRES: u64 = 5_000_000_000;
/// How long a redelivery waits after a `-NAK` under back-pressure (ns).
pub const NAK_DELAY: u64 = 100_000_000;
/// The stream's duplicate window (ns): a message published again within
/// it (same `Nats-Msg-Id`) is not stored twice. JetStream's default.
pub const DUPLICATE_WINDOW: u64 = 120_000_000_000;
/// Messages a consumer may have delivered and not acknowledged.
pub const MAX_ACK_PENDING: u32 = 1024;

/// The stream of `domain`.
pub fn stream(domain: &str) -> String {
    format!("rethink_{}", domain.replace('.', "_"))
}

/// `$JS.API.STREAM.CREATE` request body for the stream of `domain`,
/// keeping messages `max_age_ns` (the stub's `retention-hours`).
pub fn stream_config(domain: &str, max_age_ns: u64) -> String {
    serde_json::json!({
        "name": stream(domain),
        "subjects": [format!("rethink.{}.>", domain.replace('.', "_"))],
        "retention": "limits",
        "storage": "file",
        "discard": "old",
        "max_age": max_age_ns,
        "duplicate_window": DUPLICATE_WINDOW,
    })
    .to_string()
}

/// The durable consumer's name for the address whose subject prefix is
/// `prefix` (`rethink.<domain>.<hash>`), in the runtime with `id`.
pub fn consumer(id: &str, prefix: &str) -> String {
    format!("{id}_{}", prefix.rsplit('.').next().unwrap_or_default())
}

/// `$JS.API.CONSUMER.DURABLE.CREATE` request body; the server removes a
/// consumer nobody pulled from for `inactive_ns` (one of a runtime that
/// went away, or of an address that is no more).
pub fn consumer_config(stream: &str, name: &str, prefix: &str, ack_wait_ns: u64, inactive_ns: u64) -> String {
    serde_json::json!({
        "stream_name": stream,
        "config": {
            "durable_name": name,
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": ack_wait_ns,
            "max_deliver": -1,
            "filter_subject": format!("{prefix}.*"),
            "max_ack_pending": MAX_ACK_PENDING,
            "replay_policy": "instant",
            "inactive_threshold": inactive_ns,
        }
    })
    .to_string()
}

/// `$JS.API.CONSUMER.MSG.NEXT` request body.
pub fn pull() -> String {
    format!("{{\"batch\":{PULL_BATCH},\"expires\":{PULL_EXPIRES}}}")
}

/// The header block of a publish with message id `id`.
pub fn msg_id_headers(id: &str) -> String {
    format!("NATS/1.0\r\nNats-Msg-Id: {id}\r\n\r\n")
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u64,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct ApiAnswer {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
}

/// What an answer of the JetStream API says.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Done (for a PubAck: stored, or a duplicate of what was stored).
    Ok,
    /// The API refused: its code, error code and description (cut).
    Error(u64, u64, String),
    /// Not an answer of the API (not JSON, no fields it would have).
    Malformed,
}

/// Reads an API answer; `stream`: for a PubAck, the stream it must name
/// with a sequence number above 0 (else it is no acknowledgement).
pub fn answer(payload: &[u8], stream: Option<&str>) -> Answer {
    let Ok(a) = serde_json::from_slice::<ApiAnswer>(payload) else { return Answer::Malformed };
    if let Some(e) = a.error {
        let mut why = e.description;
        if why.len() > 256 {
            let end = (0..=256).rev().find(|i| why.is_char_boundary(*i)).unwrap_or(0);
            why.truncate(end);
        }
        return Answer::Error(e.code, e.err_code, why);
    }
    match stream {
        Some(s) if a.stream.as_deref() == Some(s) && a.seq.is_some_and(|n| n > 0) => Answer::Ok,
        Some(_) => Answer::Malformed,
        None => Answer::Ok,
    }
}

/// The consumer named in an ack subject
/// (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>`),
/// if the subject is one.
pub fn acked_consumer(reply: &str) -> Option<&str> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    if rest.is_empty() || rest.len() > 512 || rest.contains(|c: char| c.is_ascii_whitespace() || c == '*' || c == '>') {
        return None;
    }
    rest.split('.').nth(1)
}

/// A status a NATS server sends on a pull's reply subject (`NATS/1.0 408
/// Request Timeout`, `404 No Messages`, `409 …`): the pull is over.
pub fn is_status(headers: Option<&str>) -> bool {
    headers.is_some_and(|h| h.starts_with("NATS/1.0 4"))
}
