//! Helpers for the tests of data objects (`syncher.rs`, `rethink.rs`):
//! puppets creating objects and sending them requests.

use hyperty_host::Address;
use serde_json::{Value, json};

use crate::Driver;

/// Has the puppet `reporter` create a `comm` object with `data`; its URL.
pub fn create(driver: &mut Driver, reporter: &Address, data: Value) -> String {
    let answer = driver.command(reporter, json!({ "op": "create", "scheme": "comm", "data": data }));
    answer["url"].as_str().unwrap_or_else(|| panic!("create failed: {answer}")).to_owned()
}

/// `puppet` sends a `kind` request to `to` (an object's or a child's
/// address) with `value`; the response it got, as JSON.
pub fn ask(driver: &mut Driver, puppet: &Address, kind: &str, to: &str, value: Option<Value>) -> Value {
    let id = driver.fresh_id();
    let cmd = json!({ "op": "request", "message": { "id": id, "type": kind, "to": to, "value": value.map(|v| v.to_string()) } });
    assert_eq!(driver.command(puppet, cmd), json!({ "ok": true }));
    driver.report(puppet, |m| m["type"] == "response" && m["id"] == id)
}
