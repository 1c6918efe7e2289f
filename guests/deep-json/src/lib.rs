//! Hands the host JSON text nested `depth` deep, built here (no message
//! could carry it in): on a request `{"op": "send" | "create" | "update",
//! "depth": n}` it sends `[[[...]]]` as a message value to the requester,
//! creates a data object with it as data, or creates `{}` and updates it
//! with a JSON Patch adding it; the reply (200) is `{"refused": reason}`
//! or `{"accepted": true}`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "hyperty",
});

use rethink::hyperty::types::{Body, Message, MessageType};
use rethink::hyperty::{bus, syncher};
use serde_json::{Value, json};

struct DeepJson;

fn deep(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

impl exports::rethink::hyperty::handler::Guest for DeepJson {
    fn init(_address: String, _config: String) -> Result<(), String> {
        Ok(())
    }

    fn handle(msg: Message) {
        if msg.type_ == MessageType::Response {
            return;
        }
        let ask: Value = msg.body.value.as_deref().and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default();
        let depth = ask["depth"].as_u64().unwrap_or(0) as usize;
        let result: Result<(), String> = match ask["op"].as_str().unwrap_or("") {
            "send" => {
                let body = Body { code: None, resource: None, value: Some(deep(depth)), description: None };
                let out = Message { id: msg.id + 1, type_: MessageType::Update, from: msg.to.clone(), to: msg.from.clone(), body, identity: None };
                bus::send(&out).map_err(|e| format!("{e:?}"))
            }
            "create" => syncher::create("deep", &deep(depth)).map(drop).map_err(|e| format!("{e:?}")),
            "update" => syncher::create("deep", "{}").map_err(|e| format!("{e:?}")).and_then(|url| {
                let patch = format!(r#"[{{"op":"add","path":"/x","value":{}}}]"#, deep(depth));
                syncher::update(&url, &patch).map(drop).map_err(|e| format!("{e:?}"))
            }),
            other => Err(format!("unknown op {other:?}")),
        };
        let answer = match result {
            Ok(()) => json!({ "accepted": true }),
            Err(reason) => json!({ "refused": reason }),
        };
        let _ = bus::reply(&msg, 200, Some(&answer.to_string()));
    }
}

export!(DeepJson);
