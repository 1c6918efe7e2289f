//! Status events for operators and embedders: what happened to which
//! hyperty (trapped, restarted, stopped, rate-limited), besides the log.
//!
//! A broadcast channel: the sandboxes never wait on it; a subscriber that
//! falls behind by more than [`CAPACITY`] events misses the oldest ones
//! (and is told how many). Subscribers get an [`EventReceiver`]: blocking
//! `recv`, `try_recv` and `recv_timeout` for synchronous embedders (no
//! async runtime needed), `recv_async` for async ones.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::address::Address;

/// Events kept for a slow subscriber.
pub const CAPACITY: usize = 4096;

/// A status event about one hyperty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `<domain>/<name>`.
    pub hyperty: String,
    pub address: Address,
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A call into the hyperty trapped; `reason` says why (deadline, fuel,
    /// memory limit, stack overflow, panic...).
    Trapped { reason: String },
    /// The hyperty was restarted after `failures` consecutive failures.
    Restarted { failures: u32 },
    /// The hyperty is stopped and will not be restarted.
    Stopped { reason: String },
    /// The hyperty exceeded its message rate (reported at most once a
    /// second per hyperty).
    RateLimited,
    /// The bus refused a message of the hyperty as spoofed, malformed or too
    /// large (reported at most once a second per hyperty).
    Refused { reason: String },
    /// A data object write of the hyperty was refused at a limit of its
    /// domain (`objects`, `objects-per-hyperty`, `object-bytes`,
    /// `object-children`, `object-subscribers`, `total-memory-mb`), named
    /// in `reason` (reported at most once a second per hyperty).
    ObjectRefused { reason: String },
    /// A protostub reported a status: created, in-progress, live,
    /// disconnected or failed, and why.
    StubStatus { status: String, detail: String },
}

/// Why [`EventReceiver::recv`] or [`EventReceiver::recv_async`] returned no event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// The receiver fell behind: this many events were missed (the next
    /// call returns the oldest one kept).
    #[error("{0} events missed")]
    Lagged(u64),
    /// The runtime is gone: no event will come.
    #[error("the runtime is gone")]
    Closed,
}

/// Why [`EventReceiver::try_recv`] returned no event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    #[error("no event waiting")]
    Empty,
    #[error("{0} events missed")]
    Lagged(u64),
    #[error("the runtime is gone")]
    Closed,
}

/// Why [`EventReceiver::recv_timeout`] returned no event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecvTimeoutError {
    #[error("no event within the timeout")]
    Timeout,
    #[error("{0} events missed")]
    Lagged(u64),
    #[error("the runtime is gone")]
    Closed,
}

/// Wakes blocked [`EventReceiver`]s: a count of events sent (and whether
/// the sending side is gone), changed under its lock after each send.
#[derive(Default)]
struct Signal {
    state: Mutex<(u64, bool)>,
    changed: Condvar,
}

impl Signal {
    fn bump(&self, closed: bool) {
        let mut state = self.state.lock().unwrap();
        state.0 += 1;
        state.1 |= closed;
        drop(state);
        self.changed.notify_all();
    }
}

/// The sending side, shared by the runtime's parts.
struct Sender {
    tx: broadcast::Sender<Event>,
    signal: Arc<Signal>,
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.signal.bump(true);
    }
}

/// The sending side, cheap to clone.
#[derive(Clone)]
pub(crate) struct Events {
    sender: Arc<Sender>,
}

impl Default for Events {
    fn default() -> Events {
        Events { sender: Arc::new(Sender { tx: broadcast::channel(CAPACITY).0, signal: Arc::default() }) }
    }
}

impl Events {
    pub fn emit(&self, hyperty: &str, address: &Address, kind: EventKind) {
        // No subscriber is not an error.
        if self.sender.tx.send(Event { hyperty: hyperty.to_owned(), address: address.clone(), kind }).is_ok() {
            self.sender.signal.bump(false);
        }
    }

    pub fn subscribe(&self) -> EventReceiver {
        EventReceiver { rx: self.sender.tx.subscribe(), signal: self.sender.signal.clone() }
    }
}

/// A subscription to a runtime's status events
/// ([`Runtime::events`](crate::Runtime::events)), from when it was made.
pub struct EventReceiver {
    rx: broadcast::Receiver<Event>,
    signal: Arc<Signal>,
}

impl EventReceiver {
    /// The next event, if one is waiting.
    pub fn try_recv(&mut self) -> Result<Event, TryRecvError> {
        self.rx.try_recv().map_err(|e| match e {
            broadcast::error::TryRecvError::Empty => TryRecvError::Empty,
            broadcast::error::TryRecvError::Lagged(n) => TryRecvError::Lagged(n),
            broadcast::error::TryRecvError::Closed => TryRecvError::Closed,
        })
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // Read the count before looking: an event sent after the look
            // changes it, so the wait below cannot miss it.
            let seen = self.signal.state.lock().unwrap().0;
            match self.try_recv() {
                Ok(event) => return Ok(event),
                Err(TryRecvError::Lagged(n)) => return Err(RecvTimeoutError::Lagged(n)),
                Err(TryRecvError::Closed) => return Err(RecvTimeoutError::Closed),
                Err(TryRecvError::Empty) => {}
            }
            let mut state = self.signal.state.lock().unwrap();
            while state.0 == seen && !state.1 {
                state = match deadline {
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(RecvTimeoutError::Timeout);
                        }
                        self.signal.changed.wait_timeout(state, left).unwrap().0
                    }
                    None => self.signal.changed.wait(state).unwrap(),
                };
            }
            if state.1 && state.0 == seen {
                return Err(RecvTimeoutError::Closed);
            }
        }
    }

    /// The next event, blocking until one comes.
    pub fn recv(&mut self) -> Result<Event, RecvError> {
        self.recv_timeout(Duration::MAX).map_err(|e| match e {
            RecvTimeoutError::Lagged(n) => RecvError::Lagged(n),
            RecvTimeoutError::Timeout | RecvTimeoutError::Closed => RecvError::Closed,
        })
    }

    /// The next event, asynchronously (any async runtime).
    pub async fn recv_async(&mut self) -> Result<Event, RecvError> {
        self.rx.recv().await.map_err(|e| match e {
            broadcast::error::RecvError::Lagged(n) => RecvError::Lagged(n),
            broadcast::error::RecvError::Closed => RecvError::Closed,
        })
    }
}
