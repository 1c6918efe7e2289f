//! Demo hyperty of `bob.example`: answers every request with a pong.

use hyperty_guest::{Guest, Message, MessageType, bus, info, warn};
use serde_json::json;

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
        let text = msg.value_str("text").unwrap_or_default();
        let answer = text.replacen("ping", "pong", 1);
        // The host set `identity`: validated by the sender's IdP proxy.
        let who = msg.identity.as_ref().map_or("an anonymous sender".to_owned(), |i| format!("{} (asserted by {})", i.user, i.idp));
        info(&format!("got \"{text}\" from {who} at {}, answering \"{answer}\"", msg.from));
        if let Err(e) = bus::reply(&msg, 200, Some(&json!({ "text": answer }).to_string())) {
            warn(&format!("could not answer: {}", e.describe()));
        }
    }
}

hyperty_guest::export!(Pong);
