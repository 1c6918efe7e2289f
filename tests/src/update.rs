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
