//! A tiny hyperty built against the contract version in its crate name
//! (see `build.rs`): it answers every request 200 with its crate name
//! (and, built against 0.1.2, calls the `log.flush` that version adds).

wit_bindgen::generate!({
    path: concat!(env!("OUT_DIR"), "/wit"),
    world: "hyperty",
});

use rethink::hyperty::bus;
use rethink::hyperty::types::{Message, MessageType};

struct Contract;

impl exports::rethink::hyperty::handler::Guest for Contract {
    fn init(_address: String, _config: String) -> Result<(), String> {
        #[cfg(extended)]
        rethink::hyperty::log::flush();
        Ok(())
    }

    fn handle(msg: Message) {
        if msg.type_ != MessageType::Response {
            let _ = bus::reply(&msg, 200, Some(&format!("{:?}", env!("CARGO_PKG_NAME"))));
        }
    }
}

export!(Contract);
