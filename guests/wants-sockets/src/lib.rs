//! A hyperty that imports `wasi:sockets` (it tries to connect somewhere):
//! refused at deploy unless its domain is granted `sockets`.

use hyperty_guest::{Guest, Message};

struct WantsSockets;

impl Guest for WantsSockets {
    fn init(_: String, _: String) -> Result<(), String> {
        Ok(())
    }
    fn handle(_: Message) {
        let _ = std::net::TcpStream::connect("127.0.0.1:1");
    }
}

hyperty_guest::export!(WantsSockets);
