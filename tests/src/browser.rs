//! A real browser for the tests: Debian's Chromium, headless, as a child
//! process killed on drop, and a tiny HTTP endpoint ([`Reports`]) to which
//! the pages it runs report what they see and from which they take
//! commands. No DevTools protocol: the pages are ours, so they can talk
//! back over plain HTTP (cross-origin `POST` of `text/plain` needs no CORS
//! preflight; the endpoint allows any origin to read its answers).
//!
//! A machine where Chromium is missing and cannot be installed, or where it
//! does not start, fails the test that needs it, saying why.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The browser binary (Debian's package `chromium`).
pub const CHROMIUM: &str = "chromium";

/// How long a test waits for what a page must report.
pub const PAGE_WAIT: Duration = Duration::from_secs(30);

/// Holds the machine for one browser test at a time: several Chromiums
/// rendering at once on a small (2-core CI) machine starve each other,
/// and a screenshot's virtual-time run then misses its wall-clock bound.
/// Poison-tolerant: a failed test does not fail the next.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static BROWSER: Mutex<()> = Mutex::new(());
    BROWSER.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Installs Debian's `chromium` with apt-get if it is not on the machine
/// (as the harness does for nats-server); panics, saying why, if that fails.
pub fn ensure_chromium() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let works = || Command::new(CHROMIUM).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if works() {
            return;
        }
        let installed = crate::apt_get_install("chromium");
        assert!(installed && works(), "Chromium is missing and `apt-get install chromium` failed: the browser tests need Debian's chromium");
    });
}

/// Chromium with the flags every run gets: headless, no sandbox (the tests
/// may run as root), nothing that reaches the network by itself, a fresh
/// profile — and `HOME`/XDG dirs inside that profile, so nothing (crash
/// reports, dconf) lands in the home of whoever runs the tests.
pub fn command(profile: &Path) -> Command {
    let mut c = Command::new(CHROMIUM);
    c.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--disable-extensions",
        "--mute-audio",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .env("HOME", profile)
    .env("XDG_CONFIG_HOME", profile.join(".config"))
    .env("XDG_CACHE_HOME", profile.join(".cache"))
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    c
}

/// A headless Chromium showing one page; killed (with its profile
/// removed) on drop.
pub struct Chromium {
    child: Child,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Chromium {
    /// Starts Chromium on `url`.
    pub fn open(url: &str) -> Chromium {
        ensure_chromium();
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromium.log");
        let child = command(&profile.path().join("profile"))
            .arg(url)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
        Chromium { child, log, _profile: profile }
    }

    /// Panics with its log if the browser has exited (it must keep running
    /// while the test waits on its pages).
    pub fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("Chromium exited ({status}) while the test waited on its page; its log:\n{}", self.log_tail());
        }
    }

    /// The end of what Chromium wrote to stderr, without its D-Bus noise.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last 40 lines of `log` that are not about D-Bus (which a headless
/// machine lacks, harmlessly).
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains("dbus")).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Takes a screenshot of `url` into `png`: a separate Chromium run that
/// loads the page, lets it run for `budget` of virtual time (time only
/// advances when the page waits on nothing but timers, so network
/// exchanges complete first) and writes the PNG. Bounded by 60 s of real
/// time; panics with Chromium's log if no PNG was written.
pub fn screenshot(url: &str, png: &Path, (width, height): (u32, u32), budget: Duration) {
    ensure_chromium();
    let profile = tempfile::tempdir().unwrap();
    let log = profile.path().join("chromium.log");
    if let Some(dir) = png.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let _ = std::fs::remove_file(png);
    let mut child = command(&profile.path().join("profile"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("--window-size={width},{height}"))
        .arg("--hide-scrollbars")
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg(url)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let written = std::fs::read(png).map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n")).unwrap_or(false);
    assert!(written, "Chromium ({status:?}) wrote no screenshot of {url} to {}; its log:\n{}", png.display(), tail(&log));
}

/// Where tests keep what a person may want to look at afterwards (not
/// committed): `<cargo target dir>/artifacts`, found from the test binary's
/// path (`<target>/<profile>/deps/<test>`).
pub fn artifacts_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).expect("the test binary lives in <target>/<profile>/deps");
    target.join("artifacts")
}

/// Percent-encodes everything but unreserved characters (RFC 3986 §2.3),
/// for values in a page URL's fragment.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// What the pages reported, and the commands waiting for them.
#[derive(Default)]
struct Board {
    reports: Vec<Value>,
    commands: VecDeque<Value>,
}

#[derive(Default)]
struct Shared {
    board: Mutex<Board>,
    changed: Condvar,
    stop: AtomicBool,
}

/// A tiny HTTP endpoint on loopback for the pages of a test:
/// - `POST /report` with a JSON body: a report, kept in order;
/// - `GET /command`: the next command queued by [`Reports::command`] (JSON,
///   200), or 204 after 10 s without one (the page asks again).
///
/// Every answer allows any origin to read it. Requests are bounded (head
/// 16 KiB, body 1 MiB, 10 s to send them); at most 10,000 reports are kept.
pub struct Reports {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1 << 20;
const MAX_REPORTS: usize = 10_000;
const COMMAND_POLL: Duration = Duration::from_secs(10);

impl Reports {
    pub fn start() -> Reports {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let serving = shared.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if serving.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let shared = serving.clone();
                std::thread::spawn(move || {
                    let _ = serve(&shared, stream);
                });
            }
        });
        Reports { addr, shared, thread: Some(thread) }
    }

    /// `http://127.0.0.1:<port>`, for the pages.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `command` for the next page that asks (`GET /command`).
    pub fn command(&self, command: Value) {
        self.shared.board.lock().unwrap().commands.push_back(command);
        self.shared.changed.notify_all();
    }

    /// Every report so far.
    pub fn all(&self) -> Vec<Value> {
        self.shared.board.lock().unwrap().reports.clone()
    }

    /// Waits up to [`PAGE_WAIT`] for a report matching `pred` (checking
    /// that `browser` keeps running) and returns the first one; panics
    /// naming `what` with every report received if none comes.
    pub fn wait(&self, browser: &mut Chromium, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let until = Instant::now() + PAGE_WAIT;
        let mut board = self.shared.board.lock().unwrap();
        loop {
            if let Some(found) = board.reports.iter().find(|r| pred(r)) {
                return found.clone();
            }
            browser.check_running();
            let now = Instant::now();
            if now >= until {
                let seen: Vec<String> = board.reports.iter().map(Value::to_string).collect();
                drop(board);
                panic!("{what}: not reported within {PAGE_WAIT:?}; the pages reported:\n{}\nChromium's log:\n{}", seen.join("\n"), browser.log_tail());
            }
            // Wake now and then to notice a browser that exited.
            board = self.shared.changed.wait_timeout(board, (until - now).min(Duration::from_millis(500))).unwrap().0;
        }
    }
}

impl Drop for Reports {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves one connection (one request: `Connection: close`).
fn serve(shared: &Shared, stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut head = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = Vec::new();
        (&mut reader).take((MAX_HEAD - head.len().min(MAX_HEAD)) as u64 + 1).read_until(b'\n', &mut line)?;
        if line.is_empty() || head.len() + line.len() > MAX_HEAD {
            return respond(stream, "431 Request Header Fields Too Large", "");
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        if let Some(value) = text.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(usize::MAX);
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    match (method, path) {
        ("POST", "/report") => {
            if length > MAX_BODY {
                return respond(stream, "413 Content Too Large", "");
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body)?;
            let Ok(report) = serde_json::from_slice::<Value>(&body) else {
                return respond(stream, "400 Bad Request", "not JSON");
            };
            let mut board = shared.board.lock().unwrap();
            if board.reports.len() < MAX_REPORTS {
                board.reports.push(report);
            }
            drop(board);
            shared.changed.notify_all();
            respond(stream, "204 No Content", "")
        }
        ("GET", "/command") => {
            let until = Instant::now() + COMMAND_POLL;
            let mut board = shared.board.lock().unwrap();
            loop {
                if let Some(command) = board.commands.pop_front() {
                    drop(board);
                    return respond(stream, "200 OK", &command.to_string());
                }
                let now = Instant::now();
                if now >= until || shared.stop.load(Ordering::SeqCst) {
                    drop(board);
                    return respond(stream, "204 No Content", "");
                }
                board = shared.changed.wait_timeout(board, until - now).unwrap().0;
            }
        }
        ("OPTIONS", _) => respond(stream, "204 No Content", ""),
        _ => respond(stream, "404 Not Found", ""),
    }
}

fn respond(mut stream: TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nAccess-Control-Allow-Origin: *\r\nAccess-Control-Allow-Headers: content-type\r\nCache-Control: no-store\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}
