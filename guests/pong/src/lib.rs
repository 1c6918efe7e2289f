//! Demo hyperty of `bob.example`: answers every request with a pong.

use hyperty_guest::{Guest, Message, MessageType, bus, info, warn};
use serde_json::{Value, json};

struct Pong;

impl Guest for Pong {
    fn init(_address: String, _config: String) -> Result<(), String> {
        info("ready to answer pings");
        Ok(())
    }

    fn handle(msg: Message) {
        if msg.type_ == MessageType::Response {
            return;
        }
        let text = msg
            .body
            .value
            .as_deref()
            .and_then(|v| serde_json::from_str::<Value>(v).ok())
            .and_then(|v| v.get("text").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default();
        let answer = text.replacen("ping", "pong", 1);
        info(&format!("got \"{text}\" from {}, answering \"{answer}\"", msg.from));
        if let Err(e) = bus::reply(&msg, 200, Some(&json!({ "text": answer }).to_string())) {
            warn(&format!("could not answer: {}", e.describe()));
        }
    }
}

hyperty_guest::export!(Pong);
