//! A hyperty whose instantiation traps: it exports `_initialize`, which the
//! component calls while it is being instantiated (before any export can be
//! called), and that function hits `unreachable`.

use hyperty_guest::{Guest, Message};

#[unsafe(no_mangle)]
pub extern "C" fn _initialize() {
    core::arch::wasm32::unreachable()
}

struct StartTrap;

impl Guest for StartTrap {
    fn init(_: String, _: String) -> Result<(), String> {
        Ok(())
    }
    fn handle(_: Message) {}
}

hyperty_guest::export!(StartTrap);
