//! Live update under load (issue 20): a sender that keeps numbered
//! messages flowing to one address while the runtime swaps what is behind
//! it, and the reports of the puppets that received them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyperty_host::{Address, Endpoint, MessageType, Runtime, SendError};
use serde_json::{Value, json};

/// Sends `update` messages `{"n": 0}`, `{"n": 1}`, ... from its own
/// endpoint to one address, as fast as the receiver's inbox takes them
/// (an `inbox-full` is retried: back-pressure, not loss), until stopped.
pub struct Sender {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Sender {
    /// Starts sending from `from` (an endpoint address) to `to`.
    pub fn start(runtime: &Runtime, from: &str, to: &Address) -> Sender {
        let endpoint = runtime.endpoint(from, 16).unwrap();
        let to = to.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !stopping.load(Ordering::Acquire) {
                let message = endpoint.message(MessageType::Update, &to).value(json!({ "n": n }).to_string()).build().unwrap();
                match endpoint.send(message) {
                    Ok(()) => n += 1,
                    Err(SendError::InboxFull(_)) => std::thread::yield_now(),
                    Err(e) => panic!("message {n} refused: {e}"),
                }
            }
            n
        });
        Sender { stop, thread: Some(thread) }
    }

    /// Stops sending; how many messages were sent (numbered 0..n).
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// The numbers a puppet reported (as `forward`s of the `update`s it got)
/// to one observer, in the order they came.
pub struct Reports {
    pub numbers: Vec<u64>,
}

impl Reports {
    pub fn new() -> Reports {
        Reports { numbers: Vec::new() }
    }

    /// Takes what `observer` received from `from` within `wait`.
    pub fn take(&mut self, observer: &Endpoint, from: &Address, wait: Duration) {
        let until = Instant::now() + wait;
        while let Some(m) = observer.recv_where(|m| m.kind == MessageType::Forward && &m.from == from, until.saturating_duration_since(Instant::now())) {
            let reported: Value = serde_json::from_str(m.body.value.as_deref().unwrap_or("null")).unwrap();
            if reported["type"] == "update" {
                let n: Value = serde_json::from_str(reported["value"].as_str().unwrap()).unwrap();
                self.numbers.push(n["n"].as_u64().unwrap());
            }
            if Instant::now() >= until {
                break;
            }
        }
    }
}

impl Reports {
    /// Takes reports until at least `n` numbers came; panics after 30 s.
    pub fn wait_for(&mut self, observer: &Endpoint, from: &Address, n: usize) {
        let until = Instant::now() + Duration::from_secs(30);
        while self.numbers.len() < n {
            assert!(Instant::now() < until, "{n} reports from {from} to {}: only {} within 30 s", observer.address(), self.numbers.len());
            self.take(observer, from, Duration::from_millis(50));
        }
    }
}

impl Default for Reports {
    fn default() -> Self {
        Reports::new()
    }
}

/// Reads what both observers get from `from` until `total` numbers came
/// (or 60 s passed), then once more briefly for late duplicates.
pub fn collect(old: &Endpoint, new: &Endpoint, from: &Address, total: u64, mut first: Reports, mut second: Reports) -> (Vec<u64>, Vec<u64>) {
    let until = Instant::now() + Duration::from_secs(60);
    while ((first.numbers.len() + second.numbers.len()) as u64) < total && Instant::now() < until {
        first.take(old, from, Duration::from_millis(20));
        second.take(new, from, Duration::from_millis(20));
    }
    first.take(old, from, Duration::from_millis(300));
    second.take(new, from, Duration::from_millis(300));
    (first.numbers, second.numbers)
}

/// `hyperty <args>` running in a child process (this test binary
/// re-executed to run its ignored `cli_child` test, which calls the CLI
/// with the arguments in `HYPERTY_CLI_ARGS`), its stdout and stderr in
/// files; killed on drop.
pub struct CliProcess {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl CliProcess {
    pub fn start(args: &[&str]) -> CliProcess {
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "cli_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("HYPERTY_CLI_ARGS", serde_json::to_string(args).unwrap())
            .env("NO_COLOR", "1")
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .unwrap();
        CliProcess { child, dir }
    }

    /// What it wrote to stderr (its log) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// Waits (up to 60 s) until `text` appears `times` times in the log;
    /// panics with the log if the process exits or the time passes.
    pub fn wait_log(&mut self, text: &str, times: usize) -> String {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if log.matches(text).count() >= times {
                return log;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the CLI exited ({status}) before logging {text:?} {times} times:\n{log}");
            }
            assert!(Instant::now() < until, "{text:?} not logged {times} times within 60 s:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The metrics address it printed (`metrics: http://ADDR/metrics`),
    /// waiting up to 60 s for it.
    pub fn metrics_addr(&mut self) -> std::net::SocketAddr {
        self.wait_log("metrics on http://", 1);
        let log = self.log();
        let at = log.find("metrics on http://").unwrap() + "metrics on http://".len();
        log[at..].split('/').next().unwrap().parse().unwrap()
    }
}

impl CliProcess {
    /// Waits (up to 60 s) for it to exit; its exit status and stdout.
    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.stdout());
            }
            assert!(Instant::now() < until, "the CLI did not exit within 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of the `cli_child` test of a binary using [`CliProcess`]:
/// runs the CLI with the arguments in `HYPERTY_CLI_ARGS` (a JSON list) in
/// private directories and exits with its code.
pub fn cli_child() {
    let Ok(args) = std::env::var("HYPERTY_CLI_ARGS") else { return };
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    let code = crate::CliDirs::new().cli(&args);
    let code = [0u8, 2].into_iter().find(|c| code == std::process::ExitCode::from(*c)).unwrap_or(1);
    std::process::exit(code.into());
}
