//! A protostub that reaches for more than the protostub world: UDP, name
//! lookup and the wall clock, through Rust's std (which imports
//! `wasi:sockets/udp`, `wasi:sockets/ip-name-lookup` and
//! `wasi:clocks/wall-clock` for them). The host must refuse it at deploy.

use std::net::{ToSocketAddrs, UdpSocket};
use std::time::SystemTime;

wit_bindgen::generate!({
    path: "../../wit",
    world: "protostub",
    generate_all,
});

use rethink::hyperty::log::{Level, log};

struct Nosy;

impl exports::rethink::hyperty::stub::Guest for Nosy {
    fn init(_domain: String, _config: String) -> Result<(), String> {
        Ok(())
    }

    fn poll(_wait_ms: u32) {
        let udp = UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"hello", "192.0.2.1:53"));
        let lookup = "nats.example:4222".to_socket_addrs().map(|a| a.count());
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs());
        log(Level::Info, &format!("udp {udp:?}, lookup {lookup:?}, now {now:?}"));
    }
}

export!(Nosy);
