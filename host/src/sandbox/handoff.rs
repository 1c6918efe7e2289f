//! The hand-off path: a domain's thread that sends to an idle domain runs
//! the delivery itself instead of waking the receiver's thread (Go's
//! scheduler hands a woken goroutine to the running thread through
//! `runnext`; seL4's IPC fast path switches straight to the receiver).
//! A round trip between two hyperties then costs no thread wake-up at all:
//! the request runs on the requester's thread, the response waits in the
//! requester's own inbox for the call in hand to end.
//!
//! Who may lend its thread, and when (the guarantees of the path hold):
//! - Only a domain's own thread, while it runs its own guest ([`lender`]):
//!   never an embedder's thread, the bus timer or a protostub's thread,
//!   and never a thread already running a lent call (one level deep, so the
//!   native stack holds at most two wasm stacks).
//! - Only to a domain that is idle: nothing queued and nothing in hand
//!   (its in-flight count goes from 0 to 1, so no earlier message of any
//!   sender is overtaken) and its run token free (`try_lock`, never a
//!   blocking lock: a guest calling back into the bus on the same thread
//!   finds its own domain busy and queues, it never waits for itself).
//! - Only to a domain whose last call was short ([`LEND_MAX`]): a domain
//!   that loops or computes long runs on its own thread, so it delays a
//!   sender at most once, by at most its call deadline.
//! - The receiver runs under its own deadline and fuel, in its own store;
//!   the time the sender's thread spent on lent calls is given back to the
//!   sender's deadline ([`deadline`]), so the sender is never interrupted
//!   for the receiver's time.
//! - Only while the call in hand has lent less than its own deadline in
//!   all: past that, its sends are queued. The credit is the lent time in
//!   whole epoch ticks, rounded down with the remainder carried, so a call
//!   lasts at most its deadline of its own, plus its deadline of lending,
//!   plus one receiver's deadline — a guest that loops and lends a little
//!   work every tick cannot buy itself time.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// A call longer than this makes its domain run on its own thread until
/// one of its calls is short again.
pub(crate) const LEND_MAX: Duration = Duration::from_millis(1);

thread_local! {
    /// This thread is a domain's thread, running its own domain (not a
    /// lent call).
    static LENDER: Cell<bool> = const { Cell::new(false) };
    /// Time this thread spent in lent calls during the call in hand, not
    /// yet credited to its deadline.
    static LENT: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// Time this thread spent in lent calls during the call in hand, in all.
    static LENT_TOTAL: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// How long the call in hand may lend in all: its own deadline.
    static LEND_BUDGET: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// Marks the current thread as a domain's thread, which may lend itself.
pub(crate) fn lender() {
    LENDER.set(true);
}

/// Whether the current thread may run another domain's delivery now.
pub(crate) fn may_lend() -> bool {
    LENDER.get() && LENT_TOTAL.get() < LEND_BUDGET.get()
}

/// Runs `call` (a delivery to another domain) on this thread, as a lent
/// call: no further lending inside it, and its duration credited to the
/// call in hand. Returns what `call` returns and how long it took.
pub(crate) fn lend<R>(call: impl FnOnce() -> R) -> (R, Duration) {
    LENDER.set(false);
    // The lent call arms its own store: the caller's account is kept aside.
    let (credit, total, budget) = (LENT.get(), LENT_TOTAL.get(), LEND_BUDGET.get());
    let started = Instant::now();
    let result = call();
    let took = started.elapsed();
    LENT.set(credit + took);
    LENT_TOTAL.set(total + took);
    LEND_BUDGET.set(budget);
    LENDER.set(true);
    (result, took)
}

/// A call starts on this thread, with a deadline of `call_ticks` epoch
/// ticks: it has lent nothing yet, and may lend as long as that deadline.
pub(crate) fn call_starts(call_ticks: u64) {
    LENT.set(Duration::ZERO);
    LENT_TOTAL.set(Duration::ZERO);
    LEND_BUDGET.set(crate::engine::EPOCH_TICK * u32::try_from(call_ticks).unwrap_or(u32::MAX));
}

/// What a store does when its epoch deadline passes (installed with
/// `Store::epoch_deadline_callback`): extend it by the whole epoch ticks
/// its thread spent on lent calls not credited yet (the remainder is
/// carried to the next time), else interrupt the call
/// ([`wasmtime::Trap::Interrupt`], as `epoch_deadline_trap` does).
pub(crate) fn deadline() -> wasmtime::UpdateDeadline {
    let lent = LENT.get();
    let tick = crate::engine::EPOCH_TICK;
    let ticks = u32::try_from(lent.as_nanos() / tick.as_nanos()).unwrap_or(u32::MAX);
    if ticks == 0 {
        return wasmtime::UpdateDeadline::Interrupt;
    }
    LENT.set(lent - tick * ticks);
    wasmtime::UpdateDeadline::Continue(u64::from(ticks))
}
