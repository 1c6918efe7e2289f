//! A hostile IdP proxy for the identity tests. Config `{"mode": ...}` picks
//! what it does in `generate-assertion` and `validate-assertion`:
//!
//! - `sleep`: sleeps an hour in `wasi:io/poll` (`std::thread::sleep`), a
//!   host call its epoch deadline does not interrupt;
//! - `loop`: never returns (interrupted at the call deadline);
//! - anything else: issues the token `hostile` and refuses every token.

use std::cell::RefCell;
use std::hint::black_box;

wit_bindgen::generate!({
    path: "../../wit",
    world: "idp-proxy",
});

use exports::rethink::hyperty::identity_provider::{Assertion, Claims, Guest};

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct IdpHostile;

impl Guest for IdpHostile {
    fn init(config: String) -> Result<(), String> {
        let config: serde_json::Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        MODE.set(config["mode"].as_str().unwrap_or_default().to_owned());
        Ok(())
    }

    fn generate_assertion(_user: String) -> Result<Assertion, String> {
        misbehave();
        Ok(Assertion { token: "hostile".into(), expires: u64::MAX })
    }

    fn validate_assertion(_token: String) -> Result<Claims, String> {
        misbehave();
        Err("the hostile IdP refuses every token".into())
    }
}

fn misbehave() {
    match MODE.with_borrow(|m| m.clone()).as_str() {
        "sleep" => std::thread::sleep(std::time::Duration::from_secs(3600)),
        "loop" => loop {
            black_box(0);
        },
        _ => {}
    }
}

export!(IdpHostile);
