//! Helpers for the WebRTC tests (`tests/tests/media.rs`): domains granted
//! `media`, port ranges, and the `media-peer` guest's commands.

use std::net::UdpSocket;

use hyperty_host::{Address, Message, MessageType};
use serde_json::{Value, json};

use crate::{Driver, OBSERVER, reported};

/// A range of `n` UDP ports on 127.0.0.1 starting at one the system just
/// gave out, as the bundle writes it (`"a-b"`). The host binds the first
/// free port of a range, so a port taken meanwhile only moves it along.
pub fn udp_ports(n: u16) -> String {
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    let first = probe.local_addr().unwrap().port().min(u16::MAX - n);
    format!("{first}-{}", first + n - 1)
}

/// The settings of a domain granted `media` on 127.0.0.1 with `n` ports
/// and the `media` keys of `extra` (e.g. `{"peer-connections": 2}`).
pub fn media_domain(n: u16, extra: Value) -> Value {
    let mut media = json!({ "bind": "127.0.0.1", "ports": udp_ports(n) });
    if let Value::Object(extra) = extra {
        media.as_object_mut().unwrap().extend(extra);
    }
    json!({ "grants": ["clocks", "random", "media"], "media": media })
}

/// The config of a `media-peer` reporting to the test's observer.
pub fn media_peer_config(echo: bool) -> Value {
    json!({ "observer": OBSERVER, "echo": echo })
}

impl Driver {
    /// The first event (or signalling report) from media-peer `peer`
    /// matching `pred`, waiting up to `secs` seconds.
    pub fn media_report(&self, peer: &Address, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let found = self.find(
            |m: &Message| m.kind == MessageType::Forward && &m.from == peer && pred(&reported(m)),
            std::time::Duration::from_secs(secs),
        );
        reported(&found.unwrap_or_else(|| panic!("no such report from {peer} within {secs} s")))
    }

    /// Has `caller` call `callee` (both media-peers) on a channel named
    /// `label`, and waits until the channel is open on both sides.
    pub fn media_call(&mut self, caller: &Address, callee: &Address, label: &str) -> Call {
        self.media_call_with_tracks(caller, callee, label, json!([])).0
    }

    /// [`Driver::media_call`] whose offer also carries the caller's new
    /// sending `tracks` (`[["video", "vp8"], ...]`); their ids at the caller
    /// come back with the call, once both sides are connected.
    pub fn media_call_with_tracks(&mut self, caller: &Address, callee: &Address, label: &str, tracks: Value) -> (Call, Vec<u64>) {
        let call = self.command(caller, json!({ "op": "call", "peer": callee.to_string(), "label": label, "tracks": tracks }));
        let pc = call["pc"].as_u64().unwrap_or_else(|| panic!("the call failed: {call}"));
        let ids = call["tracks"].as_array().into_iter().flatten().map(|t| t.as_u64().unwrap()).collect();
        let answered = self.media_report(caller, 10, |v| v["signal"].is_string() && v["pc"] == pc);
        assert_eq!(answered["signal"], "answered", "{answered}");
        let at_caller = self.media_report(caller, 10, |v| v["event"] == "channel-open" && v["pc"] == pc && v["label"] == label);
        let at_callee = self.media_report(callee, 10, |v| v["event"] == "channel-open" && v["label"] == label);
        let (caller_pc, callee_pc) = (pc, at_callee["pc"].as_u64().unwrap());
        let connected = (
            self.media_report(caller, 10, |v| v["event"] == "connected" && v["pc"] == caller_pc),
            self.media_report(callee, 10, |v| v["event"] == "connected" && v["pc"] == callee_pc),
        );
        let call = Call {
            caller: (pc, at_caller["channel"].as_u64().unwrap()),
            callee: (callee_pc, at_callee["channel"].as_u64().unwrap()),
            connected,
        };
        (call, ids)
    }

    /// The `track` event of `peer`'s connection `pc` for a track of `kind`.
    pub fn media_track(&self, peer: &Address, pc: u64, kind: &str) -> Value {
        self.media_report(peer, 10, |v| v["event"] == "track" && v["pc"] == pc && v["kind"] == kind)
    }
}

/// A call between two media-peers: (connection index, channel id) at each,
/// and the `connected` event each reported (taken from the driver's
/// reports while waiting for it).
#[derive(Clone, Debug)]
pub struct Call {
    pub caller: (u64, u64),
    pub callee: (u64, u64),
    pub connected: (Value, Value),
}

/// The address the test's network namespace gives its veth end: Chromium
/// gathers candidates only on a non-loopback interface.
pub const NAMESPACE_ADDRESS: &str = "10.200.0.1";

/// Moves the calling thread into a network namespace of its own (threads
/// and processes it starts later inherit it) with `lo` up and a veth pair
/// whose `v0` end has [`NAMESPACE_ADDRESS`]/24 and the default route, so
/// that nothing the test does leaves the namespace. `Err` says why it
/// cannot be made here (not root, no `ip`, namespaces off): the caller
/// skips, saying so.
pub fn enter_private_network() -> Result<(), String> {
    // SAFETY: unshare changes only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
    }
    let address = format!("{NAMESPACE_ADDRESS}/24");
    for args in [
        &["link", "set", "lo", "up"][..],
        &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        &["addr", "add", &address, "dev", "v0"],
        &["link", "set", "v0", "up"],
        &["link", "set", "v1", "up"],
        &["route", "add", "default", "dev", "v0"],
    ] {
        let out = std::process::Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
        if !out.status.success() {
            return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    Ok(())
}

/// Headless Chromium (Debian's `chromium`) on `url`, with a fake camera
/// and microphone and raw host candidates; killed on drop, its profile in
/// a fresh directory.
pub struct Chromium {
    child: std::process::Child,
    _profile: tempfile::TempDir,
}

impl Chromium {
    pub fn start(url: &str) -> Result<Chromium, String> {
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let child = crate::browser::command(profile.path())
            .args([
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--disable-features=WebRtcHideLocalIpsWithMdns",
            ])
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start chromium: {e}"))?;
        Ok(Chromium { child, _profile: profile })
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test's page server got from the page: a POST to `path` with
/// `body`, and where to send the answer's body.
pub struct PagePost {
    pub path: String,
    pub body: String,
    answer: std::sync::mpsc::Sender<String>,
}

impl PagePost {
    pub fn answer(self, body: String) {
        let _ = self.answer.send(body);
    }
}

/// A tiny HTTP/1.1 server for one test page: `GET /` gives `page`; every
/// POST is handed to the test (its body at most 256 KiB), which answers it.
pub struct PageServer {
    pub url: String,
    pub posts: std::sync::mpsc::Receiver<PagePost>,
}

impl PageServer {
    pub fn start(ip: &str, page: String) -> PageServer {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let (tx, posts) = std::sync::mpsc::channel();
        let page = std::sync::Arc::<str>::from(page);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let tx = tx.clone();
                let page = page.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut request = String::new();
                    if reader.read_line(&mut request).is_err() {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0).min(256 << 10);
                        }
                    }
                    let mut body = vec![0; length];
                    let _ = reader.read_exact(&mut body);
                    let mut parts = request.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default().to_owned());
                    let (kind, reply) = if method == "POST" {
                        let (answer, answered) = std::sync::mpsc::channel();
                        let _ = tx.send(PagePost { path, body: String::from_utf8_lossy(&body).into_owned(), answer });
                        ("text/plain", answered.recv_timeout(std::time::Duration::from_secs(30)).unwrap_or_default())
                    } else {
                        ("text/html", page.to_string())
                    };
                    let mut stream = stream;
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                        reply.len()
                    );
                });
            }
        });
        PageServer { url, posts }
    }

    /// The next POST to `path` within `secs` seconds.
    pub fn post(&self, path: &str, secs: u64) -> PagePost {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let post = self.posts.recv_timeout(left).unwrap_or_else(|_| panic!("the page posted nothing to {path} within {secs} s"));
            if post.path == path {
                return post;
            }
            post.answer(String::new());
        }
    }
}

/// A test page for Chromium: makes an `RTCPeerConnection` `pc`, runs
/// `setup` (JavaScript adding channels or tracks), offers it to `/offer`
/// once its candidates are gathered, takes the answer it gets back, then
/// runs `after`; `post(path, body)` is at hand, and any failure is posted
/// to `/result` as `{"error"}`.
pub fn offering_page(setup: &str, after: &str) -> String {
    format!(
        r#"<!doctype html><meta charset="utf-8"><title>hyperty media</title><script>
const post = (path, body) => fetch(path, {{ method: "POST", body }});
(async () => {{
  try {{
    const pc = new RTCPeerConnection();
    {setup}
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((done) => {{
      if (pc.iceGatheringState === "complete") return done();
      pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
    }});
    const answer = await (await post("/offer", pc.localDescription.sdp)).text();
    await pc.setRemoteDescription({{ type: "answer", sdp: answer }});
    {after}
  }} catch (e) {{
    post("/result", JSON.stringify({{ error: String(e) }}));
  }}
}})();
</script>"#
    )
}

/// A call from a page in Chromium to the media-peer `bob.example/b`
/// (`config`), all inside a private network namespace: `b`'s connection
/// `pc` has answered the page's offer.
pub struct ChromiumCall {
    pub runtime: hyperty_host::Runtime,
    pub driver: Driver,
    pub b: Address,
    pub pc: u64,
    pub server: PageServer,
    _chromium: Chromium,
}

impl ChromiumCall {
    /// Moves the calling thread into its own namespace, deploys `b` (its
    /// domain's `media` table with the keys of `extra`), serves `page`
    /// from 127.0.0.1 (a secure context, for getUserMedia; candidates are
    /// still gathered on the namespace's veth only) and answers its offer.
    /// `Err`: no namespace here, say so and skip.
    pub fn start(page: String, config: Value, extra: Value) -> Result<ChromiumCall, String> {
        enter_private_network()?;
        let runtime = crate::runtime(std::time::Duration::from_secs(5));
        let mut driver = Driver::new(&runtime);
        let mut media = json!({ "bind": NAMESPACE_ADDRESS, "ports": udp_ports(8) });
        if let Value::Object(extra) = extra {
            media.as_object_mut().unwrap().extend(extra);
        }
        let bundle = crate::TestBundle::new()
            .hyperty("bob.example", "b", &crate::guest("media-peer"), config)
            .domain("bob.example", json!({ "grants": ["clocks", "random", "media"], "media": media }));
        runtime.deploy(&bundle.load()).unwrap();
        let b = runtime.lookup("bob.example", "b").unwrap();
        let server = PageServer::start("127.0.0.1", page);
        let chromium = Chromium::start(&server.url).expect("Debian's chromium is installed");
        let offer = server.post("/offer", 30);
        let pc = driver.command(&b, json!({ "op": "open", "remote": "chromium" }))["pc"].as_u64().unwrap();
        let answer = driver.command(&b, json!({ "op": "accept-offer", "pc": pc, "sdp": offer.body }));
        let sdp = answer["sdp"].as_str().unwrap_or_else(|| panic!("the hyperty refused Chromium's offer: {answer}"));
        offer.answer(sdp.to_owned());
        Ok(ChromiumCall { runtime, driver, b, pc, server, _chromium: chromium })
    }

    /// The page's next `/result` (within 20 s) as JSON; fails if it is an
    /// error.
    pub fn result(&self) -> Value {
        let post = self.server.post("/result", 20);
        let v: Value = serde_json::from_str(&post.body).unwrap_or(Value::Null);
        post.answer(String::new());
        assert!(v["error"].is_null(), "the page failed: {v}");
        v
    }
}

/// Debian's coturn (`turnserver`) as a STUN server on 127.0.0.1 (`-S`:
/// STUN only, no authentication, no TLS, no CLI), killed on drop;
/// installed first if missing ([`ensure_turnserver`]).
pub struct StunServer {
    pub addr: std::net::SocketAddr,
    child: std::process::Child,
}

/// Installs Debian's coturn if `turnserver` is not on the machine (as the
/// harness does for nats-server and chromium; `just turnserver` too).
pub fn ensure_turnserver() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let works = || std::process::Command::new("turnserver").arg("--version").output().is_ok();
        assert!(works() || (crate::apt_get_install("coturn") && works()), "turnserver is missing and `apt-get install coturn` failed: the STUN tests need Debian's coturn");
    });
}

impl StunServer {
    pub fn start() -> StunServer {
        let (addr, child) = coturn(&["-S"]);
        StunServer { addr, child }
    }
}

/// Starts Debian's coturn on 127.0.0.1 (no config file, no TLS, no CLI)
/// with `args`, waiting until it answers a STUN Binding request; its
/// address and process.
fn coturn(args: &[&str]) -> (std::net::SocketAddr, std::process::Child) {
    ensure_turnserver();
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new("turnserver")
        .args(["-n", "-L", "127.0.0.1", "-p", &port.to_string(), "--no-tls", "--no-dtls", "--no-cli", "--log-file", "stdout"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start Debian's turnserver (`just turnserver` installs coturn): {e}"));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // Ready once it answers a Binding request (RFC 8489 §5: a bare
    // header, class request, method Binding, the magic cookie).
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe.set_read_timeout(Some(std::time::Duration::from_millis(100))).unwrap();
    let mut request = vec![0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42];
    request.extend_from_slice(b"hyperty-test");
    crate::wait_until("turnserver answers a STUN Binding request", || {
        let _ = probe.send_to(&request, addr);
        probe.recv_from(&mut [0; 512]).is_ok()
    });
    (addr, child)
}

/// Debian's coturn as a TURN server (RFC 8656) on 127.0.0.1: long-term
/// credentials ([`TurnServer::USERNAME`], [`TurnServer::CREDENTIAL`]),
/// realm `hyperty.test`, relayed addresses on 127.0.0.1 in `relay_ports`,
/// loopback peers allowed; killed on drop.
pub struct TurnServer {
    pub addr: std::net::SocketAddr,
    pub relay_ports: std::ops::RangeInclusive<u16>,
    child: std::process::Child,
}

impl TurnServer {
    pub const USERNAME: &'static str = "turn-user-7f3a";
    pub const CREDENTIAL: &'static str = "turn-secret-9c1e";

    pub fn start() -> TurnServer {
        let ports = udp_ports(64);
        let (min, max) = ports.split_once('-').unwrap();
        let user = format!("{}:{}", Self::USERNAME, Self::CREDENTIAL);
        let (addr, child) = coturn(&[
            "--lt-cred-mech",
            "--user",
            &user,
            "--realm",
            "hyperty.test",
            "--allow-loopback-peers",
            "--relay-ip",
            "127.0.0.1",
            "--min-port",
            min,
            "--max-port",
            max,
            "--no-tcp-relay",
        ]);
        TurnServer { addr, relay_ports: min.parse().unwrap()..=max.parse().unwrap(), child }
    }

    /// The domain's `turn` entry for this server, with `credential`.
    pub fn entry(&self, credential: &str) -> Value {
        json!({ "server": self.addr.to_string(), "username": Self::USERNAME, "credential": credential })
    }
}

impl Drop for TurnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StunServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A NAT in front of a STUN server, for the datagrams sent to it:
/// what reaches `inside` (127.0.0.2) is sent on to the server from
/// `outside` (a socket on 127.0.0.3), and the server's answers go back to
/// the last sender. The server thus sees, and answers, `outside`: the
/// sender's server-reflexive address differs from its host address, as
/// behind a real NAT. Stops with the test's process.
pub struct StunNat {
    pub inside: std::net::SocketAddr,
    pub outside: std::net::SocketAddr,
}

impl StunNat {
    pub fn start(server: std::net::SocketAddr) -> StunNat {
        let inside = UdpSocket::bind("127.0.0.2:0").unwrap();
        let outside = UdpSocket::bind("127.0.0.3:0").unwrap();
        let nat = StunNat { inside: inside.local_addr().unwrap(), outside: outside.local_addr().unwrap() };
        let last = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (inside2, outside2, last2) = (inside.try_clone().unwrap(), outside.try_clone().unwrap(), last.clone());
        std::thread::spawn(move || {
            let mut buf = [0; 2048];
            while let Ok((n, from)) = inside2.recv_from(&mut buf) {
                *last2.lock().unwrap() = Some(from);
                let _ = outside2.send_to(&buf[..n], server);
            }
        });
        std::thread::spawn(move || {
            let mut buf = [0; 2048];
            while let Ok((n, from)) = outside.recv_from(&mut buf) {
                let to = *last.lock().unwrap();
                if let (true, Some(to)) = (from == server, to) {
                    let _ = inside.send_to(&buf[..n], to);
                }
            }
        });
        nat
    }
}
