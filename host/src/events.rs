//! Status events for operators and embedders: what happened to which
//! hyperty (trapped, restarted, stopped, rate-limited), besides the log.
//!
//! A broadcast channel: the sandboxes never wait on it; a subscriber that
//! falls behind by more than [`CAPACITY`] events misses the oldest ones
//! (and is told how many).

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

/// The sending side, cheap to clone.
#[derive(Clone)]
pub(crate) struct Events {
    tx: tokio::sync::broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Events {
        Events { tx: tokio::sync::broadcast::channel(CAPACITY).0 }
    }
}

impl Events {
    pub fn emit(&self, hyperty: &str, address: &Address, kind: EventKind) {
        // No subscriber is not an error.
        let _ = self.tx.send(Event { hyperty: hyperty.to_owned(), address: address.clone(), kind });
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
