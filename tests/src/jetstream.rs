//! The durable-delivery tests' harness (issue #19): a JetStream-enabled
//! nats-server whose store is kept in a temporary directory across its
//! restarts, runtime processes (`hyperty run`: this test binary
//! re-executed) that are stopped (SIGSTOP), killed (SIGKILL) and started
//! again on the same data directory, and JetStream's API asked through a
//! plain connection.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyperty_host::{Address, Endpoint, Message, MessageType};
use serde_json::{Value, json};

use crate::Nats;

/// A nats-server with JetStream on (`jetstream { store_dir }` in its
/// configuration file), its store kept as long as this lives.
pub struct JetStream {
    pub nats: Nats,
    _store: tempfile::TempDir,
}

impl Default for JetStream {
    fn default() -> Self {
        JetStream::start()
    }
}

impl JetStream {
    pub fn start() -> JetStream {
        let store = tempfile::tempdir().unwrap();
        let nats = Nats::with_config(&format!("jetstream {{ store_dir: {:?} }}\n", store.path().to_str().unwrap()));
        JetStream { nats, _store: store }
    }

    /// `ip:port` of its client listener.
    pub fn endpoint(&self) -> String {
        self.nats.endpoint()
    }

    /// The answer to `body` published on `subject` with a reply subject,
    /// as JSON: JetStream's API (`$JS.API.…`), or a PubAck for a subject
    /// of a stream. (Not through [`crate::NatsClient`], whose flush after a
    /// publish reads past an answer that comes before its PONG.)
    pub fn api(&self, subject: &str, body: &str) -> Value {
        use std::io::{BufRead, Read, Write};
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.nats.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = std::io::BufReader::new(stream);
        write!(writer, "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.durable-test 1\r\nPUB {subject} _INBOX.durable-test {}\r\n{body}\r\n", body.len())
            .unwrap();
        loop {
            let mut line = String::new();
            let read = reader.read_line(&mut line).unwrap_or(0);
            assert!(read > 0, "no answer to {subject}");
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            match words.as_slice() {
                ["PING"] => write!(writer, "PONG\r\n").unwrap(),
                ["MSG", _, _, n] => {
                    let mut payload = vec![0; n.parse::<usize>().unwrap() + 2];
                    reader.read_exact(&mut payload).unwrap();
                    let text = String::from_utf8_lossy(&payload[..payload.len() - 2]).into_owned();
                    return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{subject}: {e}: {text}"));
                }
                _ => {}
            }
        }
    }

    /// The consumers of `stream`, each as JetStream's `ConsumerInfo`.
    pub fn consumers(&self, stream: &str) -> Vec<Value> {
        let answer = self.api(&format!("$JS.API.CONSUMER.LIST.{stream}"), "{}");
        answer["consumers"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (up to 60 s) until the consumer of `stream` filtered on
    /// `subject_prefix` has acknowledged everything: nothing pending,
    /// nothing delivered and not acknowledged.
    pub fn wait_all_acknowledged(&self, stream: &str, subject_prefix: &str) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let consumers = self.consumers(stream);
            let mine = consumers.iter().find(|c| c["config"]["filter_subject"].as_str().is_some_and(|f| f.starts_with(subject_prefix)));
            if let Some(c) = mine
                && c["num_pending"] == 0
                && c["num_ack_pending"] == 0
            {
                return;
            }
            assert!(Instant::now() < until, "not everything acknowledged within 60 s: {consumers:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) on a child this test started; no memory is involved.
    let done = unsafe { libc::kill(pid, signal) };
    assert_eq!(done, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
}

/// `hyperty run <bundle>` in a child process (this test binary re-executed
/// to run its ignored `durable_child` test) on a data directory that stays
/// across its restarts, serving its metrics on loopback; each incarnation
/// logs into its own file. Killed on drop.
pub struct RuntimeProcess {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    incarnation: u32,
    /// Its `--metrics` address (a port free when it was started).
    metrics: std::net::SocketAddr,
}

impl RuntimeProcess {
    /// Starts `hyperty run bundle` on a fresh data directory.
    pub fn start(bundle: &Path) -> RuntimeProcess {
        let dir = tempfile::tempdir().unwrap();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut p = RuntimeProcess { child: None, dir, incarnation: 0, metrics };
        p.restart(bundle);
        p
    }

    /// Waits (up to 60 s) until every protostub of it holds nothing, their
    /// last removals on the disk included (`hyperty_stub_queue_messages`
    /// all 0); panics with its log if not.
    pub fn wait_stub_queues_empty(&self) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let queued = std::net::TcpStream::connect(self.metrics).ok().map(|_| crate::metrics::scrape(self.metrics).values("hyperty_stub_queue_messages"));
            if queued.as_ref().is_some_and(|q| !q.is_empty() && q.iter().all(|n| *n == 0.0)) {
                return;
            }
            assert!(Instant::now() < until, "its protostub queues hold {queued:?} after 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("log.{}", self.incarnation))
    }

    /// Starts it (again, killing the running one first) with `bundle`, on
    /// the same data directory.
    pub fn restart(&mut self, bundle: &Path) {
        self.kill();
        self.incarnation += 1;
        let args = json!([self.dir.path().join("data"), crate::cache_dir(), bundle, self.metrics.to_string()]);
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "durable_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("HYPERTY_DURABLE_CHILD", args.to_string())
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.log_path()).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Kills it as a crash would (SIGKILL), and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it (SIGSTOP): it holds what it has and does nothing.
    pub fn pause(&self) {
        let child = self.child.as_ref().expect("running");
        signal(child.id() as i32, libc::SIGSTOP);
    }

    /// What the running incarnation logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits (up to 60 s) until the running incarnation logged `text`;
    /// panics with its log if it exits first or the time passes.
    pub fn wait_log(&mut self, text: &str) -> String {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("the runtime exited ({status}) before logging {text:?}:\n{log}");
            }
            assert!(Instant::now() < until, "{text:?} not logged within 60 s:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RuntimeProcess {
    fn drop(&mut self) {
        // A stopped child dies of SIGKILL too.
        self.kill();
    }
}

/// The body of the `durable_child` test: `hyperty --data-dir D --cache-dir
/// C run B` with the three paths in `HYPERTY_DURABLE_CHILD` (a JSON list).
pub fn durable_child() {
    let Ok(args) = std::env::var("HYPERTY_DURABLE_CHILD") else { return };
    let paths: Vec<String> = serde_json::from_str(&args).unwrap();
    let args = ["hyperty", "--data-dir", &paths[0], "--cache-dir", &paths[1], "run", "--metrics", &paths[3], &paths[2]];
    let code = hyperty_host::cli::main_with_args(args.iter().map(std::ffi::OsString::from));
    std::process::exit(if code == std::process::ExitCode::SUCCESS { 0 } else { 1 });
}

/// What a `bench` sink with `"ids": true` counted since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub received: u64,
    /// Ids it had seen before.
    pub duplicates: u64,
    pub lowest: Option<u64>,
    pub highest: Option<u64>,
}

impl Ids {
    /// Exactly the ids `first..=last`, each once.
    pub fn exactly(first: u64, last: u64) -> Ids {
        Ids { received: last - first + 1, duplicates: 0, lowest: Some(first), highest: Some(last) }
    }
}

/// Asks a `bench` hyperty through `harness` with an `execute` request
/// carrying `value`; its answer within `within`, if any (an earlier ask's
/// late answer is skipped).
pub fn ask(harness: &Endpoint, to: &Address, value: Value, within: Duration) -> Option<Message> {
    static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let msg = Message::new(id, MessageType::Execute, harness.address().clone(), to.clone(), Some(value.to_string()));
    harness.request(msg, Some(within)).ok()?;
    harness.recv_where(|m| m.id == id && m.kind == MessageType::Response, within + Duration::from_secs(1))
}

/// The ledger of the `bench` sink at `sink`, asked until it answers 200
/// (through NATS, while stubs connect, the first asks may get 503 or 408).
pub fn ids(harness: &Endpoint, sink: &Address) -> Ids {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(answer) = ask(harness, sink, json!({}), Duration::from_secs(3))
            && answer.body.code == Some(200)
        {
            let v: Value = serde_json::from_str(answer.body.value.as_deref().unwrap_or("null")).unwrap();
            let field = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in the sink's ledger {v}"));
            return Ids { received: field("received"), duplicates: field("duplicates"), lowest: v["lowest"].as_u64(), highest: v["highest"].as_u64() };
        }
        assert!(Instant::now() < until, "the sink {sink} did not answer within 60 s");
    }
}

/// Waits (up to 60 s) until the ledger of the sink at `sink` is `done`;
/// the ledger then.
pub fn wait_ids(harness: &Endpoint, sink: &Address, what: &str, done: impl Fn(&Ids) -> bool) -> Ids {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let ids = ids(harness, sink);
        if done(&ids) {
            return ids;
        }
        assert!(Instant::now() < until, "{what}: not within 60 s; the sink's ledger: {ids:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
