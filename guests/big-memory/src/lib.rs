//! A hyperty whose linear memory's minimum is above 48 MiB: a zeroed
//! 48 MiB static (in `.bss`, so the file stays small), touched on every
//! message so the linker keeps it.

use std::sync::atomic::{AtomicU8, Ordering};

wit_bindgen::generate!({
    path: "../../wit",
    world: "hyperty",
});

use rethink::hyperty::bus;
use rethink::hyperty::types::{Message, MessageType};

const SIZE: usize = 48 << 20;
static BIG: [AtomicU8; SIZE] = [const { AtomicU8::new(0) }; SIZE];

struct BigMemory;

impl exports::rethink::hyperty::handler::Guest for BigMemory {
    fn init(_address: String, _config: String) -> Result<(), String> {
        Ok(())
    }

    fn handle(msg: Message) {
        BIG[msg.id as usize % SIZE].fetch_add(1, Ordering::Relaxed);
        if msg.type_ != MessageType::Response {
            let _ = bus::reply(&msg, 200, Some(&BIG[msg.id as usize % SIZE].load(Ordering::Relaxed).to_string()));
        }
    }
}

export!(BigMemory);
