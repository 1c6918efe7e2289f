//! A guest's timers end at its call deadline.
//!
//! The call deadline (`call-timeout-ms`) is an epoch deadline: it
//! interrupts wasm code, not a host call. A guest sleeping in
//! `wasi:io/poll` (`std::thread::sleep`: a `subscribe-duration` or
//! `subscribe-instant` pollable of `wasi:clocks/monotonic-clock`, which the
//! default `clocks` grant allows) would hold the thread running it for as
//! long as it asked: a hyperty, its domain's thread or, on the hand-off
//! path, a lending domain's or protostub's; an IdP proxy, the thread of
//! whoever has an assertion validated (and the others waiting for the
//! proxy's one instance); a protostub checked at deployment, the
//! deployer's. So those two functions are linked over
//! `wasmtime-wasi`'s (`Linker::allow_shadowing`) and make a [`Timer`]:
//! ready at its time or once the engine's epoch has reached the deadline of
//! the call in hand ([`CallDeadline`]), whichever comes first. Back in wasm,
//! a call woken by its deadline traps at its next epoch check (a function
//! entry or a loop header), as if it had looped: "ran past its call
//! deadline"; one whose code returns from the export without meeting a
//! check returns normally, late, its sleep cut short. Either way its thread
//! is held no longer than by a loop (at most two ticks more).
//!
//! A timer is the only thing a hyperty or an IdP proxy can wait on: their
//! WASI contexts open no directory, allow no socket address, and their
//! stdin is empty and their stdout and stderr discard, so the other
//! pollables and blocking stream calls have nothing to wait for. Whoever
//! opens one of those to them must cut it to the deadline too. A
//! protostub's timers are cut as well (its `init` checked at deployment has
//! no endpoint, so a timer is all it waits on there); its waits on its
//! node's socket are not, and hold only its own thread (`host/SECURITY.md`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, anyhow, bail};
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::clocks::WasiClocksView;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};

use crate::engine::{EPOCH_TICK, Epoch};

/// `wasi:clocks/monotonic-clock` as `wasmtime-wasi` links it (a guest
/// built against an older 0.2 release is matched to it by semver).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Store data whose guest's timers end at the deadline of its call in hand.
pub(crate) trait Timed: WasiView + 'static {
    fn deadline(&self) -> &CallDeadline;
}

/// Links `subscribe-duration` and `subscribe-instant` of
/// [`MONOTONIC_CLOCK`] again, over `wasmtime-wasi`'s, to make [`Timer`]s;
/// the linker must already hold `wasmtime-wasi`'s.
pub(crate) fn link<T: Timed>(linker: &mut Linker<T>) -> Result<()> {
    let mut clock = linker.instance(MONOTONIC_CLOCK).map_err(|e| anyhow!("{MONOTONIC_CLOCK}: {e:#}"))?;
    // Were `wasmtime-wasi` to link another version, this would make a new
    // instance beside it and cut nothing: refuse to start instead.
    if clock.func_wrap("now", |_, (): ()| Ok((0u64,))).is_ok() {
        bail!("wasmtime-wasi does not link {MONOTONIC_CLOCK}: update sandbox::timers::MONOTONIC_CLOCK, or guests' timers would not be cut");
    }
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK).map_err(|e| anyhow!("{MONOTONIC_CLOCK}: {e:#}"))?;
    clock.func_wrap("subscribe-duration", |mut store: StoreContextMut<'_, T>, (ns,): (u64,)| Ok((timer(store.data_mut(), ns)?,)))?;
    clock.func_wrap("subscribe-instant", |mut store: StoreContextMut<'_, T>, (when,): (u64,)| {
        let state = store.data_mut();
        let now = monotonic_clock::Host::now(&mut state.clocks())?;
        Ok((timer(state, when.saturating_sub(now))?,))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Arms `store` for its next call: wasmtime's epoch deadline `ticks` ticks
/// from now and the fuel budget (`crate::engine::arm`), then the store's
/// [`CallDeadline`], in that order (see [`CallDeadline::arm`]). Every kind
/// of guest store is armed here before each call.
pub(crate) fn arm<T: Timed>(store: &mut wasmtime::Store<T>, ticks: u64, fuel: Option<u64>) {
    crate::engine::arm(store, ticks, fuel);
    store.data().deadline().arm(ticks);
}

/// The epoch deadline callback of a store whose thread may lend itself
/// (a hyperty's, a protostub's): [`super::handoff::deadline`], with the
/// store's [`CallDeadline`] moved by the ticks it extends the call by.
pub(crate) fn lending_deadline<T: Timed>(store: StoreContextMut<'_, T>) -> wasmtime::Result<wasmtime::UpdateDeadline> {
    let update = super::handoff::deadline();
    if let wasmtime::UpdateDeadline::Continue(ticks) = update {
        store.data().deadline().arm(ticks);
    }
    Ok(update)
}

/// A timer of `ns` nanoseconds from now, pushed to the guest's resource
/// table: ready then, or at the deadline of the call waiting on it,
/// whichever comes first. One of zero is `wasmtime-wasi`'s (ready at once,
/// after yielding to its I/O).
fn timer<T: Timed>(state: &mut T, ns: u64) -> wasmtime::Result<Resource<DynPollable>> {
    if ns == 0 {
        return monotonic_clock::Host::subscribe_duration(&mut state.clocks(), 0);
    }
    let end = tokio::time::Instant::now().checked_add(std::time::Duration::from_nanos(ns));
    let deadline = state.deadline().clone();
    let table = state.ctx().table;
    let timer = table.push(Timer { end, deadline })?;
    subscribe(table, timer)
}

/// The epoch at which the call in hand in one store is interrupted, shared
/// with the [`Timer`]s that store makes (a timer made in one call and
/// waited on in a later one ends at the later call's deadline).
#[derive(Clone, Debug)]
pub(crate) struct CallDeadline {
    epoch: Epoch,
    at: Arc<AtomicU64>,
    /// Its store's deadline is extended by the time its thread lent
    /// (a hyperty's: `handoff::deadline` is its deadline callback).
    lends: bool,
}

impl CallDeadline {
    /// No call in hand yet; `lends`: its store's deadline is extended by
    /// the time its thread lends (`sandbox::handoff`).
    pub fn new(epoch: Epoch, lends: bool) -> CallDeadline {
        CallDeadline { epoch, at: Arc::new(AtomicU64::new(u64::MAX)), lends }
    }

    /// The store's epoch deadline is set `ticks` ticks from now
    /// (`Store::set_epoch_deadline`; `UpdateDeadline::Continue`, which
    /// wasmtime applies just after the callback returns). The host's count
    /// of the epoch may be one tick behind wasmtime's, and wasmtime may read
    /// its own one tick later than this reads the host's, so the deadline
    /// is kept two ticks later: reaching it, the store is surely past its
    /// own.
    pub fn arm(&self, ticks: u64) {
        self.at.store(self.epoch.now().saturating_add(ticks).saturating_add(2), Ordering::Relaxed);
    }

    /// Whole epoch ticks until the deadline (0: it has passed), counting,
    /// where its store lends, the time this thread lent during the call in
    /// hand and will be given back at the deadline (`handoff::deadline`): a
    /// sender's own sleep is not cut for the time a receiver ran on its
    /// thread.
    fn ticks_left(&self) -> u64 {
        let credit = if self.lends { super::handoff::credit_ticks() } else { 0 };
        let at = self.at.load(Ordering::Relaxed).saturating_add(credit);
        at.saturating_sub(self.epoch.now())
    }
}

/// A guest's timer: see [`timer`].
struct Timer {
    /// `None`: too far to represent, never.
    end: Option<tokio::time::Instant>,
    deadline: CallDeadline,
}

#[wasmtime_wasi::async_trait]
impl Pollable for Timer {
    async fn ready(&mut self) {
        loop {
            let left = self.deadline.ticks_left();
            if left == 0 {
                return;
            }
            // The ticker runs no faster than the clock: the deadline is at
            // least this far, and then checked again.
            let tick = EPOCH_TICK.saturating_mul(u32::try_from(left).unwrap_or(u32::MAX));
            let deadline = tokio::time::Instant::now().checked_add(tick);
            match (self.end, deadline) {
                (Some(end), Some(deadline)) if end <= deadline => return tokio::time::sleep_until(end).await,
                (Some(end), None) => return tokio::time::sleep_until(end).await,
                (_, Some(deadline)) => tokio::time::sleep_until(deadline).await,
                (None, None) => std::future::pending().await,
            }
        }
    }
}
