//! A hyperty that imports `wasi:sockets`: refused at deploy unless its
//! domain is granted `sockets`. Granted, it still may use no address (the
//! host allows none): each request `{"port": p}` is answered 200 with what
//! every attempt gave, `{"tried": [{"what": ..., "ok": bool, "result": ...}]}`
//! — a TCP connection to `127.0.0.1:p`, a TCP listener, a UDP socket and a
//! name lookup.

use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};

use hyperty_guest::{Guest, Message, MessageType, bus};
use serde_json::{Value, json};

struct WantsSockets;

fn attempt(what: &str, result: std::io::Result<String>) -> Value {
    match result {
        Ok(got) => json!({ "what": what, "ok": true, "result": got }),
        Err(e) => json!({ "what": what, "ok": false, "result": e.to_string() }),
    }
}

impl Guest for WantsSockets {
    fn init(_: String, _: String) -> Result<(), String> {
        Ok(())
    }
    fn handle(msg: Message) {
        if msg.type_ == MessageType::Response {
            return;
        }
        let value: Value = msg.body.value.as_deref().and_then(|v| serde_json::from_str(v).ok()).unwrap_or(Value::Null);
        let port = value["port"].as_u64().unwrap_or(1) as u16;
        let tried = [
            attempt(&format!("connect 127.0.0.1:{port}"), TcpStream::connect(("127.0.0.1", port)).map(|s| format!("connected from {:?}", s.local_addr()))),
            attempt("listen 127.0.0.1:0", TcpListener::bind("127.0.0.1:0").map(|l| format!("listening on {:?}", l.local_addr()))),
            attempt("udp 127.0.0.1:0", UdpSocket::bind("127.0.0.1:0").map(|s| format!("bound to {:?}", s.local_addr()))),
            attempt("lookup localhost", ("localhost", port).to_socket_addrs().map(|a| format!("{:?}", a.collect::<Vec<_>>()))),
        ];
        let _ = bus::reply(&msg, 200, Some(&json!({ "tried": tried }).to_string()));
    }
}

hyperty_guest::export!(WantsSockets);
