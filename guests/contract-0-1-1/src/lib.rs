//! A tiny hyperty built against the contract version in its crate name
//! (see `build.rs`): it answers every request 200 with its crate name.

wit_bindgen::generate!({
    path: concat!(env!("OUT_DIR"), "/wit"),
    world: "hyperty",
});

use rethink::hyperty::bus;
use rethink::hyperty::types::{Message, MessageType};

struct Contract;

impl exports::rethink::hyperty::handler::Guest for Contract {
    fn init(_address: String, _config: String) -> Result<(), String> {
        Ok(())
    }

    fn handle(msg: Message) {
        if msg.type_ != MessageType::Response {
            let _ = bus::reply(&msg, 200, Some(&format!("{:?}", env!("CARGO_PKG_NAME"))));
        }
    }
}

export!(Contract);
