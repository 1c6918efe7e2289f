//! A protostub written in the blocking style, as a simple stub written by
//! someone else may be: it waits for its connection with `pollable.block`,
//! writes with `blocking-write-and-flush` and reads with `blocking-read`,
//! never `poll`. The host must run it as it runs one that polls
//! (`protostub::io` links these calls too).
//!
//! Configuration: `{"servers": ["ip:port"]}` (the first is used). Every
//! queued message's envelope is written as one line; the stub then reads
//! until a newline, marks the message delivered and reports status `live`
//! with the detail `echoed <n> bytes` (`n` counts the newline).

use std::cell::RefCell;

use serde_json::Value;

wit_bindgen::generate!({
    path: "../../wit",
    world: "protostub",
    generate_all,
});

use exports::rethink::hyperty::stub::Guest;
use rethink::hyperty::stub_host::{self as host, StubStatus, Work};
use wasi::clocks::monotonic_clock;
use wasi::io::streams::{InputStream, OutputStream};
use wasi::sockets::network::{IpAddressFamily, IpSocketAddress, Ipv4SocketAddress};
use wasi::sockets::{instance_network, tcp, tcp_create_socket};

struct Conn {
    input: InputStream,
    output: OutputStream,
    _socket: tcp::TcpSocket,
}

thread_local! {
    /// The server from the configuration, and the connection once made.
    static STATE: RefCell<(String, Option<Conn>)> = const { RefCell::new((String::new(), None)) };
}

fn connect(server: &str) -> Result<Conn, String> {
    let addr: std::net::SocketAddrV4 = server.parse().map_err(|e| format!("{server}: {e}"))?;
    let [a, b, c, d] = addr.ip().octets();
    let remote = IpSocketAddress::Ipv4(Ipv4SocketAddress { port: addr.port(), address: (a, b, c, d) });
    let socket = tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4).map_err(|e| format!("socket: {e:?}"))?;
    socket.start_connect(&instance_network::instance_network(), remote).map_err(|e| format!("connect: {e:?}"))?;
    loop {
        socket.subscribe().block();
        match socket.finish_connect() {
            Ok((input, output)) => return Ok(Conn { input, output, _socket: socket }),
            Err(tcp::ErrorCode::WouldBlock) => continue,
            Err(e) => return Err(format!("connect to {server}: {e:?}")),
        }
    }
}

/// Writes `line` and a newline, and reads back to a newline: how many
/// bytes came back.
fn echo(conn: &Conn, line: &str) -> Result<usize, String> {
    let mut out = line.as_bytes().to_vec();
    out.push(b'\n');
    // At most 4096 bytes a call (the WASI contract).
    for chunk in out.chunks(4096) {
        conn.output.blocking_write_and_flush(chunk).map_err(|e| format!("write: {e:?}"))?;
    }
    let mut got = 0;
    loop {
        let bytes = conn.input.blocking_read(4096).map_err(|e| format!("read: {e:?}"))?;
        got += bytes.len();
        if bytes.contains(&b'\n') {
            return Ok(got);
        }
    }
}

struct BlockingStub;

impl Guest for BlockingStub {
    fn init(_domain: String, config: String) -> Result<(), String> {
        let config: Value = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
        let server = config["servers"][0].as_str().ok_or("servers is missing")?.to_owned();
        STATE.with(|s| s.borrow_mut().0 = server);
        Ok(())
    }

    fn poll(wait_ms: u32) {
        STATE.with(|s| {
            let (server, conn) = &mut *s.borrow_mut();
            // Connected at the first poll: `init` is also run at deployment,
            // where no endpoint is granted.
            if conn.is_none() {
                *conn = Some(connect(server).unwrap_or_else(|e| panic!("{e}")));
                host::report_status(StubStatus::Live, "connected");
            }
            let conn = conn.as_ref().expect("connected above");
            while let Some(work) = host::next_work() {
                let Work::Send(outbound) = work else { continue };
                match echo(conn, &outbound.envelope) {
                    Ok(n) => {
                        host::delivered(outbound.seq);
                        host::report_status(StubStatus::Live, &format!("echoed {n} bytes"));
                    }
                    Err(e) => panic!("the connection failed: {e}"),
                }
            }
            // Waits for work (or `wait_ms`) with `ready` and a blocking
            // sleep, never `poll`.
            let (work, timer) = (host::work_ready(), monotonic_clock::subscribe_duration(u64::from(wait_ms) * 1_000_000));
            while !work.ready() && !timer.ready() {
                monotonic_clock::subscribe_duration(1_000_000).block();
            }
        });
    }
}

export!(BlockingStub);
