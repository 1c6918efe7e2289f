//! Helpers for the end-to-end tests and benchmarks: the guest components
//! built by this crate's build script, bundles written on the fly with the
//! right pins, and a runtime wired for tests.

pub mod browser;
pub mod js;
pub mod media;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod rethink;
pub mod webid;
pub mod metrics;
pub mod scale;
pub mod update;
pub mod engines;

use hyperty_host::bundle::{BundleBuilder, Component, Domain, Hyperty, Idp, Protostub};
use hyperty_host::events::RecvTimeoutError;
use hyperty_host::{Address, Bundle, Digest, Endpoint, Event, EventReceiver, Message, MessageType, Runtime, RuntimeConfig};
use serde_json::{Value, json};

/// The built component `name` (`ping`, `pong`, `puppet`, `bench`, ...).
pub fn guest(name: &str) -> PathBuf {
    // Library components are named with underscores, commands as is.
    let dir = Path::new(env!("HYPERTY_GUESTS_DIR"));
    [name.replace('-', "_"), name.to_owned()]
        .into_iter()
        .map(|n| dir.join(format!("{n}.wasm")))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("guest {name} was not built in {}", dir.display()))
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("HYPERTY_REPO_DIR"))
}

/// Logs go to the test's captured output (shown on failure), per
/// `RUST_LOG`; once per test process.
pub fn test_log() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// A runtime for tests: a shared component cache and a short request
/// timeout.
pub fn runtime(request_timeout: Duration) -> Runtime {
    test_log();
    Runtime::new(RuntimeConfig { cache_dir: cache_dir(), request_timeout, ..engines::config() }).unwrap()
}

/// The component cache shared by the tests of one build.
pub fn cache_dir() -> PathBuf {
    Path::new(env!("HYPERTY_GUESTS_DIR")).join("test-cache")
}

/// A bundle written with the crate's [`BundleBuilder`] into its own
/// temporary directory (as `bundle.toml`), components pinned to their
/// files' digests.
pub struct TestBundle {
    dir: tempfile::TempDir,
    builder: BundleBuilder,
}

impl Default for TestBundle {
    fn default() -> Self {
        TestBundle::new()
    }
}

/// `path` pinned to its file's digest now (a missing file: the digest of
/// nothing, so deployment says it cannot read it).
fn pinned_file(path: &Path) -> Component {
    Component::file(path).pinned(Digest::of(&std::fs::read(path).unwrap_or_default()))
}

impl TestBundle {
    pub fn new() -> TestBundle {
        TestBundle { dir: tempfile::tempdir().unwrap(), builder: Bundle::builder("bundle") }
    }

    /// Adds hyperty `name` to `domain`, running `component` (a path), pinned
    /// to the file's digest, with `config`.
    pub fn hyperty(mut self, domain: &str, name: &str, component: &Path, config: Value) -> TestBundle {
        self.builder = self.builder.hyperty(domain, Hyperty::new(name, pinned_file(component)).config(config));
        self
    }

    /// Sets `key` of hyperty `name` of `domain` (e.g. `types`, `schemes`).
    pub fn set(mut self, domain: &str, name: &str, key: &str, value: Value) -> TestBundle {
        let h = self.builder.hyperty_mut(domain, name).expect("the hyperty is in the bundle");
        *h = h.clone().set(key, value);
        self
    }

    /// Binds hyperty `name` of `domain` to `user`.
    pub fn user(self, domain: &str, name: &str, user: &str) -> TestBundle {
        self.set(domain, name, "user", user.into())
    }

    /// Sets keys of `domain`'s table (limits, restart, grants...), given as
    /// JSON: `json!({"limits": {"memory-mb": 16}})`.
    pub fn domain(mut self, domain: &str, settings: Value) -> TestBundle {
        let Value::Object(settings) = settings else { panic!("settings must be an object") };
        let settings = settings.into_iter().fold(Domain::new(), |d, (k, v)| d.set(&k, v));
        self.builder = self.builder.domain(domain, settings);
        self
    }

    /// Adds the IdP proxy of `idp` (the `idp-jwt` guest) signing with the
    /// ed25519 secret key `seed`, and makes it the IdP of `domains`.
    pub fn idp(self, idp: &str, seed: [u8; 32], domains: &[&str]) -> TestBundle {
        let config = json!({ "issuer": idp, "signing-key": hex(&seed), "lifetime-seconds": 600 });
        self.idp_with(idp, config, domains)
    }

    /// Adds a validate-only proxy of `idp` (the `idp-jwt` guest with only
    /// the public key of `seed`), as a runtime that does not issue for it
    /// would have, and makes it the IdP of `domains`.
    pub fn idp_verifier(self, idp: &str, seed: [u8; 32], domains: &[&str]) -> TestBundle {
        let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
        let config = json!({ "issuer": idp, "verifying-keys": [format!("ed25519:{}", hex(public.as_bytes()))] });
        self.idp_with(idp, config, domains)
    }

    /// Adds the `idp-jwt` proxy of `idp` with `config`, the IdP of `domains`.
    fn idp_with(self, idp: &str, config: Value, domains: &[&str]) -> TestBundle {
        self.idp_guest(idp, "idp-jwt", config, domains)
    }

    /// Adds the proxy of `idp`, the guest component `name` with `config`,
    /// and makes it the IdP of `domains`.
    pub fn idp_guest(mut self, idp: &str, name: &str, config: Value, domains: &[&str]) -> TestBundle {
        self.builder = self.builder.idp(idp, Idp::new(pinned_file(&guest(name))).config(config));
        for domain in domains {
            self.builder = self.builder.domain(domain, Domain::new().idp(idp));
        }
        self
    }

    /// The directory the manifest is written to (for extra files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `bundle.toml` and returns its path; the directory lives as
    /// long as `self`.
    pub fn write(&self) -> PathBuf {
        let path = self.dir.path().join("bundle.toml");
        std::fs::write(&path, self.builder.to_toml().unwrap()).unwrap();
        path
    }

    /// The bundle as read from its manifest file (so problems name its
    /// lines).
    pub fn load(&self) -> Bundle {
        Bundle::load(self.write()).unwrap()
    }
}

/// Address of the test's observer endpoint.
pub const OBSERVER: &str = "hyperty://app.example/observer";

/// An endpoint that drives puppet hyperties and collects what they report.
pub struct Driver {
    pub endpoint: Endpoint,
}

impl Driver {
    pub fn new(runtime: &Runtime) -> Driver {
        Driver::at(runtime, OBSERVER)
    }

    /// A driver whose endpoint is `address` (an observer in another domain:
    /// what comes in through a protostub reaches only the stub's domain).
    pub fn at(runtime: &Runtime, address: &str) -> Driver {
        Driver { endpoint: runtime.endpoint(address, 10_000).unwrap() }
    }

    pub fn address(&self) -> &Address {
        self.endpoint.address()
    }

    /// Asks `puppet` to run `command` and returns its answer's value.
    pub fn command(&mut self, puppet: &Address, command: Value) -> Value {
        let answer = self.ask(puppet, command);
        serde_json::from_str(answer.body.value.as_deref().unwrap_or("null")).unwrap()
    }

    /// Sends a `read` request to `to` and waits for its answer (the
    /// response, or the host's 403/404/408).
    pub fn read(&mut self, to: &Address) -> Message {
        let msg = self.endpoint.message(MessageType::Read, to.as_str()).build().unwrap();
        self.endpoint.request_reply(msg, None).unwrap()
    }

    pub fn fresh_id(&mut self) -> u64 {
        self.endpoint.next_id()
    }

    /// The first message (within 10 s) matching `pred`; others are kept for
    /// later calls.
    pub fn expect(&self, pred: impl Fn(&Message) -> bool) -> Message {
        self.find(pred, Duration::from_secs(10)).expect("the expected message did not arrive within 10 s")
    }

    /// The first message within `within` matching `pred`.
    pub fn find(&self, pred: impl Fn(&Message) -> bool, within: Duration) -> Option<Message> {
        self.endpoint.recv_where(pred, within)
    }

    /// The messages from `puppet` that reached the observer before a marker
    /// sent to `puppet` now came back in its report, oldest first. A puppet
    /// handles and reports what it gets in the order its inbox got it, so
    /// anything delivered to `puppet` before this call is among them: a
    /// negative check that always looks, and waits for no fixed time.
    pub fn before_marker(&mut self, puppet: &Address) -> Vec<Message> {
        let marker = self.endpoint.message(MessageType::Update, puppet.as_str()).resource("marker").build().unwrap();
        let id = marker.id;
        self.endpoint.send(marker).unwrap();
        self.expect(|m| {
            let r = reported(m);
            m.kind == MessageType::Forward && &m.from == puppet && r["id"] == id && r["resource"] == "marker"
        });
        self.endpoint.take_set_aside(|m| &m.from == puppet)
    }

    /// The first report (a puppet's `forward`) whose reported message
    /// matches `pred`, as JSON.
    pub fn report(&self, from_puppet: &Address, pred: impl Fn(&Value) -> bool) -> Value {
        let m = self.expect(|m| {
            m.kind == MessageType::Forward && &m.from == from_puppet && pred(&reported(m))
        });
        reported(&m)
    }
}

/// The message a puppet reported, as JSON.
pub fn reported(m: &Message) -> Value {
    serde_json::from_str(m.body.value.as_deref().unwrap_or("null")).unwrap_or(Value::Null)
}

/// A puppet config reporting to the test observer.
pub fn puppet_config(echo: bool) -> Value {
    json!({ "observer": OBSERVER, "echo": echo })
}

/// Deploys a healthy pair: alice.example/a and bob.example/b (echoing),
/// puppets reporting to the test observer.
pub fn healthy_pair(runtime: &Runtime) -> (TestBundle, Address, Address) {
    pair(runtime, true)
}

/// Deploys puppets alice.example/a and bob.example/b; b answers requests
/// only if `echo_b`.
pub fn pair(runtime: &Runtime, echo_b: bool) -> (TestBundle, Address, Address) {
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(echo_b));
    runtime.deploy(&bundle.load()).expect("the healthy pair deploys");
    let a = runtime.lookup("alice.example", "a").unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    (bundle, a, b)
}

impl Driver {
    /// Asserts that a (alice.example) can still make a request to b
    /// (bob.example) and get b's answer: the runtime and those domains work.
    pub fn still_works(&mut self, a: &Address, b: &Address) {
        let id = self.fresh_id();
        let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": b.to_string() } });
        assert_eq!(self.command(a, cmd), json!({ "ok": true }));
        let answer = self.report(a, |m| m["type"] == "response" && m["id"] == id);
        assert_eq!(answer["code"], 200, "{answer}");
    }

    /// Sends a request with a JSON value to `to` and waits for its answer.
    pub fn ask(&mut self, to: &Address, value: Value) -> Message {
        let msg = self.endpoint.message(MessageType::Execute, to.as_str()).value(value.to_string()).build().unwrap();
        self.endpoint.request_reply(msg, None).unwrap()
    }
}

/// The first event matching `pred` within 10 s.
pub fn wait_event(events: &mut EventReceiver, pred: impl Fn(&Event) -> bool) -> Event {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match events.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(e) if pred(&e) => return e,
            Ok(_) | Err(RecvTimeoutError::Lagged(_)) => {}
            Err(RecvTimeoutError::Timeout) => panic!("the expected event did not come within 10 s"),
            Err(RecvTimeoutError::Closed) => panic!("the runtime is gone: the expected event will not come"),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A compact EdDSA JWT made here, independently of the IdP proxy guest:
/// `{"alg":"EdDSA","typ":"JWT"}` header, claims `iss`, `sub`, `exp` (Unix
/// seconds), signed with the ed25519 secret key `seed`.
pub fn jwt(seed: [u8; 32], iss: &str, sub: &str, exp: i64) -> String {
    jws(seed, r#"{"alg":"EdDSA","typ":"JWT"}"#, &json!({ "iss": iss, "sub": sub, "exp": exp }).to_string())
}

/// A JWS in compact serialisation (RFC 7515 §7.1) of the JSON texts
/// `header` and `payload` as given (so a test can write what a JSON value
/// cannot hold, such as a duplicate member), signed with Ed25519 by the
/// secret key `seed`.
pub fn jws(seed: [u8; 32], header: &str, payload: &str) -> String {
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let signed = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let signature = ed25519_dalek::SigningKey::from_bytes(&seed).sign(signed.as_bytes());
    format!("{signed}.{}", b64(&signature.to_bytes()))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Resident memory of this process, in bytes: `VmRSS` of
/// `/proc/self/status` (Linux, proc(5)). Panics if it cannot be read: a
/// memory bound checked against nothing would pass whatever happened.
pub fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_else(|e| panic!("cannot measure resident memory: /proc/self/status: {e}"));
    let kib: usize = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot measure resident memory: no `VmRSS: <n> kB` line in /proc/self/status"));
    kib << 10
}

/// Waits until `condition` holds, checking it every few milliseconds for
/// up to 10 s; panics naming `what` if it never does.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < until, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Private data and cache directories for running the `hyperty` command
/// line in a test, so that no test opens the user's own
/// (`~/.local/share/hyperty`, `~/.cache/hyperty`) or trips over another
/// run's lock. Removed on drop.
pub struct CliDirs {
    data: tempfile::TempDir,
    cache: tempfile::TempDir,
}

impl Default for CliDirs {
    fn default() -> Self {
        CliDirs::new()
    }
}

impl CliDirs {
    pub fn new() -> CliDirs {
        CliDirs { data: tempfile::tempdir().unwrap(), cache: tempfile::tempdir().unwrap() }
    }

    /// The `--data-dir` given to the command line.
    pub fn data(&self) -> &Path {
        self.data.path()
    }

    /// The `--cache-dir` given to the command line.
    pub fn cache(&self) -> &Path {
        self.cache.path()
    }

    /// Runs `hyperty --data-dir <data> --cache-dir <cache> <args...>` in this
    /// process and returns its exit code.
    pub fn cli<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> std::process::ExitCode {
        let dirs = [
            "hyperty".as_ref(),
            "--data-dir".as_ref(),
            self.data.path().as_os_str(),
            "--cache-dir".as_ref(),
            self.cache.path().as_os_str(),
        ];
        let args = dirs.into_iter().chain(args.iter().map(AsRef::as_ref)).map(std::ffi::OsStr::to_owned);
        hyperty_host::cli::main_with_args(args)
    }
}

/// A NATS server (Debian's `nats-server`, installed if missing) on
/// loopback, stopped on drop; optionally one node of a cluster, or
/// configured by a file the test writes.
///
/// Ports: the server binds ports it picks itself (`-p -1`) and says which
/// in its log, so no port is ever freed for it to take (and lost to
/// another process in between); a restart binds the same ports again,
/// retrying while another process holds one.
pub struct Nats {
    child: Option<std::process::Child>,
    /// The running child's log (its stderr), as read so far.
    log: std::sync::Arc<NatsLog>,
    pub port: u16,
    /// The route listener's port: `Some(0)` until a cluster node first
    /// started.
    cluster_port: Option<u16>,
    routes: Vec<u16>,
    /// The configuration file (`-c`), in its own directory.
    config: Option<(tempfile::TempDir, PathBuf)>,
}

/// A child's stderr, read by a thread as it comes.
#[derive(Default)]
struct NatsLog {
    /// The text, and whether the stream ended.
    text: std::sync::Mutex<(String, bool)>,
    grew: std::sync::Condvar,
}

impl NatsLog {
    /// Longest log kept, in bytes.
    const MAX: usize = 256 * 1024;

    /// Reads `stderr` into a new log until it ends.
    fn read(stderr: std::process::ChildStderr) -> std::sync::Arc<NatsLog> {
        use std::io::BufRead;
        let log = std::sync::Arc::new(NatsLog::default());
        let writer = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut text = writer.text.lock().unwrap();
                if text.0.len() < NatsLog::MAX {
                    text.0.push_str(&line);
                    text.0.push('\n');
                }
                writer.grew.notify_all();
            }
            writer.text.lock().unwrap().1 = true;
            writer.grew.notify_all();
        });
        log
    }

    /// The port of the first line `Listening for <what> connections on <ip>:<port>`.
    fn listening(text: &str, what: &str) -> Option<u16> {
        let marker = format!("Listening for {what} connections on ");
        let line = text.lines().find_map(|l| l.split_once(marker.as_str()).map(|(_, rest)| rest))?;
        line.trim().rsplit(':').next()?.parse().ok()
    }
}

/// A loopback port nothing listens on, nor can while this lives: the local
/// port of a connection it holds (a listener cannot bind a port that a
/// connection without `SO_REUSEADDR` uses). For an endpoint that refuses.
pub struct ClosedPort {
    pub port: u16,
    _connection: (std::net::TcpStream, std::net::TcpStream),
}

pub fn closed_port() -> ClosedPort {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    ClosedPort { port: client.local_addr().unwrap().port(), _connection: (client, server) }
}

/// Installs `nats-server` from Debian if it is not on the machine.
pub fn ensure_nats_server() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let works = || std::process::Command::new("nats-server").arg("--version").output().is_ok();
        assert!(works() || (apt_get_install("nats-server") && works()), "nats-server is missing and could not be installed with apt-get");
    });
}

/// Installs Debian's `package` with apt-get (through `sudo -n` when not
/// root), updating the package lists once if the first try fails; whether
/// it worked.
pub fn apt_get_install(package: &str) -> bool {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n");
    let apt = |args: &[&str]| {
        let mut c = std::process::Command::new(if root { "apt-get" } else { "sudo" });
        c.args(if root { &[][..] } else { &["-n", "apt-get"][..] });
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive").status().is_ok_and(|s| s.success())
    };
    apt(&["install", "-y", "-q", package]) || (apt(&["update", "-q"]) && apt(&["install", "-y", "-q", package]))
}

impl Nats {
    /// A single server.
    pub fn start() -> Nats {
        Nats::launch(None, &[], None)
    }

    /// A single server configured by the file `config` (nats-server's
    /// format, e.g. `max_payload: 65536`); its listen address and port are
    /// set on the command line.
    pub fn with_config(config: &str) -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, config).unwrap();
        Nats::launch(None, &[], Some((dir, path)))
    }

    /// A cluster node, routed to the nodes whose route ports are `routes`
    /// (routes work both ways: the first node needs none).
    pub fn cluster_node(routes: &[u16]) -> Nats {
        Nats::launch(Some(0), routes, None)
    }

    fn launch(cluster_port: Option<u16>, routes: &[u16], config: Option<(tempfile::TempDir, PathBuf)>) -> Nats {
        ensure_nats_server();
        let mut nats = Nats { child: None, log: Default::default(), port: 0, cluster_port, routes: routes.to_vec(), config };
        nats.restart();
        nats
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// `ip:port` of the client listener.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The route listener's port (a cluster node's).
    pub fn cluster_port(&self) -> u16 {
        self.cluster_port.expect("a cluster node")
    }

    /// Rewrites the configuration file (it takes effect at the next
    /// `restart`).
    pub fn set_config(&self, config: &str) {
        let (_, path) = self.config.as_ref().expect("a server started with_config");
        std::fs::write(path, config).unwrap();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.log.text.lock().unwrap().0.clone()
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again: on the same ports) and waits until this
    /// child says it listens on them. Panics with the child's log if it
    /// exits (after retrying for 20 s when a port is in use elsewhere) or
    /// does not listen within 20 s.
    pub fn restart(&mut self) {
        if let Err(why) = self.try_restart(Duration::from_secs(20)) {
            panic!("nats-server (port {}, cluster {:?}) did not start: {why}", self.port, self.cluster_port);
        }
    }

    /// [`Nats::restart`], trying again for `within` while a port is in use
    /// elsewhere; why not, with the log of the child that tried last.
    pub fn try_restart(&mut self, within: Duration) -> Result<(), String> {
        self.kill();
        let port = |p: u16| if p == 0 { "-1".to_owned() } else { p.to_string() };
        let until = Instant::now() + within;
        loop {
            let mut cmd = std::process::Command::new("nats-server");
            if let Some((_, path)) = &self.config {
                cmd.arg("-c").arg(path);
            }
            cmd.args(["-a", "127.0.0.1", "-p", &port(self.port)]);
            if let Some(cluster) = self.cluster_port {
                cmd.args(["--cluster_name", "hyperty-test", "--cluster", &format!("nats://127.0.0.1:{}", port(cluster))]);
                if !self.routes.is_empty() {
                    let routes: Vec<String> = self.routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
                    cmd.args(["--routes", &routes.join(",")]);
                }
            }
            cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
            let mut child = cmd.spawn().expect("nats-server starts");
            let log = NatsLog::read(child.stderr.take().unwrap());
            // Each child gets 20 s to listen or exit, whatever `within` is.
            match self.wait_listening(&mut child, &log, Instant::now() + Duration::from_secs(20)) {
                Ok((client, cluster)) => {
                    self.port = client;
                    self.cluster_port = cluster;
                    self.child = Some(child);
                    self.log = log;
                    return Ok(());
                }
                Err(why) if why.contains("address already in use") && Instant::now() < until => {
                    // Another process holds one of our ports for now: a
                    // pause, and again.
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(why) => return Err(why),
            }
        }
    }

    /// Waits until `child` logs that it listens for clients (and routes,
    /// for a cluster node): those ports; or why not, with its log.
    fn wait_listening(&self, child: &mut std::process::Child, log: &NatsLog, until: Instant) -> Result<(u16, Option<u16>), String> {
        let mut text = log.text.lock().unwrap();
        loop {
            let client = NatsLog::listening(&text.0, "client");
            let cluster = NatsLog::listening(&text.0, "route");
            if let Some(client) = client
                && (self.cluster_port.is_none() || cluster.is_some())
            {
                return Ok((client, cluster));
            }
            if let Some(status) = child.try_wait().unwrap() {
                // Its whole log: the stream ends soon after the process.
                while !text.1 && Instant::now() < until {
                    text = log.grew.wait_timeout(text, Duration::from_millis(100)).unwrap().0;
                }
                return Err(format!("it exited ({status}):\n{}", text.0));
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("it did not listen in time:\n{}", text.0));
            }
            text = log.grew.wait_timeout(text, Duration::from_millis(100)).unwrap().0;
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

impl TestBundle {
    /// Adds the NATS protostub for `domain`, connecting to `servers`
    /// (`ip:port`), which are also its only granted endpoints; `extra` sets
    /// other keys of its entry, and adds to its `config`.
    pub fn protostub(mut self, domain: &str, servers: &[String], extra: Value) -> TestBundle {
        let mut config = json!({ "servers": servers });
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.get("config").and_then(Value::as_object)) {
            c.extend(e.clone());
        }
        // Another component (a test stub) may come in `extra`, with its pin.
        let mut component = match extra.get("component").and_then(Value::as_str) {
            Some(path) => pinned_file(Path::new(path)),
            None => pinned_file(&guest("nats-stub")),
        };
        if let Some(pin) = extra.get("sha256").and_then(Value::as_str) {
            component = component.pinned(Digest::parse(pin).unwrap());
        }
        let mut stub = Protostub::new(component, []).set("endpoints", json!(servers)).config(config);
        let entry_keys = ["config", "component", "sha256"];
        for (k, v) in extra.as_object().into_iter().flatten().filter(|(k, _)| !entry_keys.contains(&k.as_str())) {
            stub = stub.set(k, v.clone());
        }
        self.builder = self.builder.protostub(domain, stub);
        self
    }
}

/// Publishes `payload` on `subject` of the NATS server at `port`, as a
/// plain client (to put raw envelopes on the wire), until a subscriber
/// takes it: each try asks for a reply and for the node's "no responders"
/// notice, so none is lost while the subscription is on its way. The
/// subscriber's answer: a `nats-stub` answers `ok <n>` (its acknowledgement)
/// or why its host refused the envelope.
pub fn nats_publish(port: u16, subject: &str, payload: &str) -> String {
    nats_publish_all(port, subject, &[payload]).remove(0)
}

/// [`nats_publish`] for the first payload, then the others in one write,
/// each asking for a reply; every answer message, until each payload was
/// answered (a `nats-stub` answers oks in bulk: `ok <n> <n> …`).
pub fn nats_publish_all(port: u16, subject: &str, payloads: &[&str]) -> Vec<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    // The next message: (reply token, headers, payload).
    let mut next = |w: &mut std::net::TcpStream| -> (String, String, String) {
        let mut line = String::new();
        loop {
            line.clear();
            if let Err(e) = reader.read_line(&mut line) {
                panic!("no answer on {subject} within 10 s: {e}");
            }
            assert!(!line.starts_with("-ERR"), "{line}");
            if line.starts_with("PING") {
                w.write_all(b"PONG\r\n").unwrap();
            }
            // MSG/HMSG <subject> <sid> [<header size>] <size>.
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            if !matches!(words.first(), Some(&"MSG") | Some(&"HMSG")) {
                continue;
            }
            let sizes: Vec<usize> = words[3..].iter().map(|w| w.parse().unwrap()).collect();
            let total = *sizes.last().unwrap();
            let mut bytes = vec![0; total + 2];
            reader.read_exact(&mut bytes).unwrap();
            let split = if sizes.len() == 2 { sizes[0] } else { 0 };
            let text = String::from_utf8_lossy(&bytes[..total]).into_owned();
            let token = words[1].rsplit('.').next().unwrap().to_owned();
            return (token, text[..split].to_owned(), text[split..].to_owned());
        }
    };
    write!(w, "CONNECT {{\"verbose\":false,\"headers\":true,\"no_responders\":true}}\r\nSUB _TEST_INBOX.* 1\r\n").unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let mut answers = Vec::new();
    for attempt in 1.. {
        // Numbered apart from the batch's 1..len.
        write!(w, "PUB {subject} _TEST_INBOX.{} {}\r\n{}\r\n", 1_000_000 + attempt, payloads[0].len(), payloads[0]).unwrap();
        let (_, headers, body) = next(&mut w);
        if !headers.starts_with("NATS/1.0 503") {
            answers.push(body);
            break;
        }
        assert!(Instant::now() < until, "nobody subscribed to {subject} within 10 s");
    }
    let mut batch = Vec::new();
    for (i, payload) in payloads.iter().enumerate().skip(1) {
        write!(batch, "PUB {subject} _TEST_INBOX.{i} {}\r\n{payload}\r\n", payload.len()).unwrap();
    }
    w.write_all(&batch).unwrap();
    let mut unanswered: std::collections::BTreeSet<String> = (1..payloads.len()).map(|i| i.to_string()).collect();
    while !unanswered.is_empty() {
        let (token, _, body) = next(&mut w);
        if token == "ok" {
            for n in body.split_ascii_whitespace().skip(1) {
                unanswered.remove(n);
            }
        } else {
            unanswered.remove(&token);
        }
        answers.push(body);
    }
    answers
}

/// The NATS subject the `nats-stub` guest publishes a message from a sender
/// of `sender_domain` to `address` of `domain` on (`*` for `sender_domain`:
/// what the listening runtime subscribes to).
pub fn nats_subject(domain: &str, address: &str, sender_domain: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(address.as_bytes());
    format!("rethink.{}.{}.{}", domain.replace('.', "_"), hex(&digest[..16]), sender_domain.replace('.', "_"))
}

/// A plain NATS client for tests: publishes raw envelopes, subscribes to
/// see what runtimes publish, and reports what the server refuses.
pub struct NatsClient {
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
    next_sid: u64,
}

/// A message a [`NatsClient`] received.
#[derive(Debug)]
pub struct NatsMsg {
    pub subject: String,
    pub reply: Option<String>,
    pub payload: String,
}

impl NatsClient {
    /// Connects to the server at `port`, as `user`/`pass` if given.
    pub fn connect(port: u16, credentials: Option<(&str, &str)>) -> NatsClient {
        use std::io::{BufRead, Write};
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("INFO"), "{line}");
        let mut connect = json!({ "verbose": false, "pedantic": false, "headers": true });
        if let Some((user, pass)) = credentials {
            connect["user"] = user.into();
            connect["pass"] = pass.into();
        }
        let mut writer = stream;
        write!(writer, "CONNECT {connect}\r\n").unwrap();
        let mut client = NatsClient { reader, writer, next_sid: 1 };
        client.flush().expect("the server accepts the connection");
        client
    }

    /// Sends PING and reads until PONG: everything sent before was
    /// processed. The first `-ERR` line the server sent meanwhile, if any.
    pub fn flush(&mut self) -> Result<(), String> {
        use std::io::{BufRead, Write};
        write!(self.writer, "PING\r\n").unwrap();
        let mut error = None;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            if line.starts_with("PONG") {
                return error.map_or(Ok(()), Err);
            }
            if line.starts_with("-ERR") && error.is_none() {
                error = Some(line.trim_end().to_owned());
            }
        }
    }

    /// Publishes `payload` on `subject` (with a `reply` subject); the
    /// server's `-ERR`, if it refuses.
    pub fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &str) -> Result<(), String> {
        use std::io::Write;
        let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
        write!(self.writer, "PUB {subject}{reply} {}\r\n{payload}\r\n", payload.len()).unwrap();
        self.flush()
    }

    /// Subscribes to `subject` (the server has it when this returns).
    pub fn subscribe(&mut self, subject: &str) -> Result<(), String> {
        use std::io::Write;
        write!(self.writer, "SUB {subject} {}\r\n", self.next_sid).unwrap();
        self.next_sid += 1;
        self.flush()
    }

    /// The next message (within the 10 s read timeout), answering the
    /// server's PINGs; `None` when none came.
    pub fn next_msg(&mut self) -> Option<NatsMsg> {
        use std::io::{BufRead, Read, Write};
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).is_err() || line.is_empty() {
                return None;
            }
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            let (reply, header, total) = match words.as_slice() {
                ["PING"] => {
                    write!(self.writer, "PONG\r\n").unwrap();
                    continue;
                }
                ["MSG", _, _, n] => (None, 0, n.parse::<usize>().unwrap()),
                // MSG <subject> <sid> [<reply>] <size>; HMSG adds <header size>.
                ["MSG", _, _, r, n] => (Some(r.to_string()), 0, n.parse().unwrap()),
                ["HMSG", _, _, h, n] => (None, h.parse::<usize>().unwrap(), n.parse().unwrap()),
                ["HMSG", _, _, r, h, n] => (Some(r.to_string()), h.parse().unwrap(), n.parse().unwrap()),
                _ => continue,
            };
            let mut body = vec![0; total + 2];
            self.reader.read_exact(&mut body).unwrap();
            let payload = String::from_utf8_lossy(&body[header..total]).into_owned();
            return Some(NatsMsg { subject: words[1].to_owned(), reply, payload });
        }
    }
}

/// The host's log (every test of the calling binary), captured by a global
/// tracing subscriber installed on first use, before any runtime exists (so
/// the test helper's own subscriber is not installed). Lines are also
/// written to stderr, shown when a test fails.
pub fn host_log() -> String {
    use std::io::Write;
    use std::sync::{Arc, Mutex, OnceLock};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            std::io::stderr().write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    static LOG: OnceLock<Captured> = OnceLock::new();
    let captured = LOG.get_or_init(|| {
        let log = Captured::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(move || writer.clone())
            .init();
        log
    });
    String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned()
}
pub mod soak;
pub mod jetstream;
pub mod fuzz;
pub mod forger;
