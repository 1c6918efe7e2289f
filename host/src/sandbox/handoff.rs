//! The hand-off path: a domain's thread that sends to an idle domain runs
//! the delivery itself instead of waking the receiver's thread (Go's
//! scheduler hands a woken goroutine to the running thread through
//! `runnext`; seL4's IPC fast path switches straight to the receiver).
//! A round trip between two hyperties then costs no thread wake-up at all:
//! the request runs on the requester's thread, the response waits in the
//! requester's own inbox for the call in hand to end.
//!
//! Who may lend its thread, and when (the guarantees of the path hold):
//! - Only a domain's own thread, while it runs its own guest ([`lender`]),
//!   or a non-durable protostub's thread while its stub posts what came in
//!   ([`stub_post`]): never an embedder's thread or the bus timer, never a
//!   stub's thread for anything else it sends (status updates, answers),
//!   and never a thread already running a lent call (one level deep, so the
//!   native stack holds at most two wasm stacks). What a stub posts goes
//!   only to its own domain's addresses (`Bus::send_inbound`), and its
//!   thread runs only hyperties of the domain it carries (not, say, the
//!   other domains' subscribers a data object of that domain fans a delta
//!   out to), and only those
//!   whose call deadline is at most [`STUB_LEND_DEADLINE_MAX`], within an
//!   allowance of a quarter of its time ([`STUB_LEND_SHARE`], saved up to
//!   [`STUB_LEND_BURST`]): a hyperty that is slow on purpose holds the
//!   stub's thread (and the traffic it carries to that domain) at most one
//!   such deadline at once, and then not again until the allowance is
//!   earned back.
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

/// A protostub's thread runs only deliveries to domains whose call
/// deadline (`call-timeout-ms`) is at most this: the default deadline.
pub(crate) const STUB_LEND_DEADLINE_MAX: Duration = Duration::from_secs(1);

/// The share of a protostub thread's time it may spend on lent calls, as
/// an allowance earned over time.
pub(crate) const STUB_LEND_SHARE: f64 = 0.25;

/// How much lending allowance a protostub's thread may save up.
pub(crate) const STUB_LEND_BURST: Duration = Duration::from_millis(250);

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
    /// The longest call deadline, in epoch ticks, of a domain this thread
    /// may run a delivery of.
    static LEND_TO_TICKS: Cell<u64> = const { Cell::new(u64::MAX) };
    /// This thread is a protostub's own ([`stub_thread`]): only there does
    /// [`stub_post`] lend.
    static STUB_THREAD: Cell<bool> = const { Cell::new(false) };
    /// This thread lends as a protostub's (in [`stub_post`]).
    static STUB_LENDER: Cell<bool> = const { Cell::new(false) };
    /// The domain of the stub whose thread this is ([`stub_thread`]): in
    /// [`stub_post`], the only one it may run a delivery of.
    static LEND_TO_DOMAIN: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    /// A protostub thread's lending allowance in seconds (below zero after
    /// a long lent call) and when it was last earned.
    static STUB_ALLOWANCE: Cell<Option<(f64, Instant)>> = const { Cell::new(None) };
}

/// Marks the current thread as a domain's thread, which may lend itself.
pub(crate) fn lender() {
    LENDER.set(true);
}

/// Whether the current thread may run another domain's delivery now.
pub(crate) fn may_lend() -> bool {
    LENDER.get() && LENT_TOTAL.get() < LEND_BUDGET.get()
}

/// Which kind of thread lends: 0 a domain's, 1 a protostub's (the index of
/// the `lender` label in `metrics::DomainMetrics::handoffs`).
pub(crate) fn lender_kind() -> usize {
    usize::from(STUB_LENDER.get())
}

/// Whether this thread may run a delivery of `domain`, whose call deadline
/// is `call_ticks` epoch ticks.
pub(crate) fn may_lend_to(domain: &str, call_ticks: u64) -> bool {
    call_ticks <= LEND_TO_TICKS.get() && (!STUB_LENDER.get() || LEND_TO_DOMAIN.with_borrow(|only| only.as_deref() == Some(domain)))
}

/// Marks the current thread as a protostub's own: what its stub posts may
/// run here ([`stub_post`]). Not the thread that checks a stub's
/// configuration at deployment (an embedder's).
pub(crate) fn stub_thread(domain: &str) {
    STUB_THREAD.set(true);
    LEND_TO_DOMAIN.set(Some(domain.to_owned()));
}

/// Runs `post` (a non-durable protostub posting what came in)
/// with this thread, if it is the stub's own ([`stub_thread`]), lending
/// itself to the idle hyperties of the stub's domain it posts to — and to no other
/// domain's, such as the subscribers a data object of `domain` fans a
/// delta out to — within the thread's allowance: a [`STUB_LEND_SHARE`] of
/// its time, saved up to [`STUB_LEND_BURST`], and only where the call
/// deadline is at most [`STUB_LEND_DEADLINE_MAX`]. What it lends is
/// credited to the stub's own call deadline ([`deadline`]), as a domain's.
pub(crate) fn stub_post<R>(post: impl FnOnce() -> R) -> R {
    if !STUB_THREAD.get() {
        return post();
    }
    let now = Instant::now();
    let burst = STUB_LEND_BURST.as_secs_f64();
    let (saved, last) = STUB_ALLOWANCE.get().unwrap_or((burst, now));
    let allowance = (saved + now.duration_since(last).as_secs_f64() * STUB_LEND_SHARE).min(burst);
    if allowance <= 0.0 {
        STUB_ALLOWANCE.set(Some((allowance, now)));
        return post();
    }
    let (total, budget) = (LENT_TOTAL.get(), LEND_BUDGET.get());
    LENT_TOTAL.set(Duration::ZERO);
    LEND_BUDGET.set(Duration::from_secs_f64(allowance));
    LEND_TO_TICKS.set(crate::engine::ticks(STUB_LEND_DEADLINE_MAX));
    STUB_LENDER.set(true);
    LENDER.set(true);
    let result = post();
    LENDER.set(false);
    STUB_LENDER.set(false);
    LEND_TO_TICKS.set(u64::MAX);
    let lent = LENT_TOTAL.get();
    LENT_TOTAL.set(total + lent);
    LEND_BUDGET.set(budget);
    // Earned again from now: the lent time earns nothing.
    STUB_ALLOWANCE.set(Some((allowance - lent.as_secs_f64(), Instant::now())));
    result
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

/// Whole epoch ticks this thread lent during the call in hand that
/// [`deadline`] has not yet credited to it: the call's deadline is that
/// much later than its store's (a timer of the call waits for them too,
/// `sandbox::timers`). The thread running the guest that waits is the
/// thread the timer is polled on (`wasmtime-wasi` blocks on it there).
pub(crate) fn credit_ticks() -> u64 {
    (LENT.get().as_nanos() / crate::engine::EPOCH_TICK.as_nanos()) as u64
}

/// What a store does when its epoch deadline passes (installed with
/// `Store::epoch_deadline_callback`): extend it by the whole epoch ticks
/// its thread spent on lent calls not credited yet (the remainder is
/// carried to the next time), else interrupt the call
/// ([`wasmtime::Trap::Interrupt`], as `epoch_deadline_trap` does).
pub(crate) fn deadline() -> wasmtime::UpdateDeadline {
    let ticks = u32::try_from(credit_ticks()).unwrap_or(u32::MAX);
    if ticks == 0 {
        return wasmtime::UpdateDeadline::Interrupt;
    }
    LENT.set(LENT.get() - crate::engine::EPOCH_TICK * ticks);
    wasmtime::UpdateDeadline::Continue(u64::from(ticks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EPOCH_TICK;

    /// A protostub's thread lends only inside [`stub_post`], only to its own
    /// domain and short deadlines; what it lent is credited to its own
    /// deadline and spent from its allowance, which it earns back over time.
    #[test]
    fn a_stubs_thread_lends_within_its_post_its_domain_and_its_allowance() {
        std::thread::spawn(|| {
            let short = crate::engine::ticks(STUB_LEND_DEADLINE_MAX);
            // Not a stub's own thread (the deployer's, checking a config).
            assert!(!stub_post(may_lend));
            stub_thread("bob.example");
            call_starts(crate::engine::ticks(Duration::from_secs(10)));
            assert!(!may_lend(), "outside a post");
            let lent = stub_post(|| {
                assert!(may_lend() && may_lend_to("bob.example", short));
                assert!(!may_lend_to("alice.example", short), "another domain");
                assert!(!may_lend_to("bob.example", short + 1), "a longer deadline");
                lend(|| std::thread::sleep(EPOCH_TICK * 3)).1
            });
            assert!(!may_lend() && may_lend_to("alice.example", u64::MAX), "after the post");
            // Credited to the stub's deadline in whole ticks.
            match deadline() {
                wasmtime::UpdateDeadline::Continue(ticks) => assert!(ticks >= 3, "{ticks} ticks for {lent:?}"),
                _ => panic!("the stub's deadline was not extended by {lent:?}"),
            }
            // Past its allowance (250 ms saved up), it lends no more ...
            let (_, more) = stub_post(|| lend(|| std::thread::sleep(STUB_LEND_BURST)));
            let spent = Instant::now();
            assert!(!stub_post(may_lend), "lends past its allowance");
            // ... until it has earned back what it overdrew, at a quarter
            // of the time passing.
            let overdrawn = (lent + more).saturating_sub(STUB_LEND_BURST);
            while !stub_post(may_lend) {
                assert!(spent.elapsed() < Duration::from_secs(10), "never earns it back");
                std::thread::sleep(Duration::from_millis(5));
            }
            let earned = spent.elapsed().as_secs_f64() * STUB_LEND_SHARE;
            assert!(earned >= overdrawn.as_secs_f64() * 0.9, "lends again after {:?}, {overdrawn:?} overdrawn", spent.elapsed());
        })
        .join()
        .unwrap();
    }
}
