//! A hyperty that imports `wasi:filesystem`: refused at deploy unless its
//! domain is granted `filesystem`. Granted, it still has no directory (the
//! host preopens none): each request is answered 200 with what every
//! attempt gave, `{"tried": [{"what": ..., "ok": bool, "result": ...}]}`.

use hyperty_guest::{Guest, Message, MessageType, bus};
use serde_json::{Value, json};

struct WantsFiles;

fn attempt(what: &str, result: std::io::Result<String>) -> Value {
    match result {
        Ok(got) => json!({ "what": what, "ok": true, "result": got }),
        Err(e) => json!({ "what": what, "ok": false, "result": e.to_string() }),
    }
}

impl Guest for WantsFiles {
    fn init(_: String, _: String) -> Result<(), String> {
        Ok(())
    }
    fn handle(msg: Message) {
        if msg.type_ == MessageType::Response {
            return;
        }
        let tried = [
            attempt("read /etc/passwd", std::fs::read("/etc/passwd").map(|b| format!("{} bytes", b.len()))),
            attempt("list /", std::fs::read_dir("/").map(|d| format!("{} entries", d.count()))),
            attempt("list .", std::fs::read_dir(".").map(|d| format!("{} entries", d.count()))),
            attempt("write /tmp/hyperty-wants-files", std::fs::write("/tmp/hyperty-wants-files", b"x").map(|()| "written".into())),
        ];
        let _ = bus::reply(&msg, 200, Some(&json!({ "tried": tried }).to_string()));
    }
}

hyperty_guest::export!(WantsFiles);
