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
//! proxy's one instance). So those two functions are linked over
//! `wasmtime-wasi`'s (`Linker::allow_shadowing`) and make a [`Timer`]:
//! ready at its time or once the engine's epoch has reached the deadline of
//! the call in hand ([`CallDeadline`]), whichever comes first. Back in wasm,
//! a call woken by its deadline traps at its next epoch check (a function
//! entry or a loop), as if it had looped: "ran past its call deadline".
//!
//! A timer is the only thing a hyperty or an IdP proxy can wait on: their
//! WASI contexts open no directory, allow no socket address, and their
//! stdin is empty and their stdout and stderr discard, so the other
//! pollables and blocking stream calls have nothing to wait for. Whoever
//! opens one of those to them must cut it to the deadline too. (A
//! protostub, which must wait on its node's socket, is not cut: it runs on
//! its own thread, and its `poll` has its own deadline.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, anyhow};
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
}

impl CallDeadline {
    /// No call in hand yet.
    pub fn new(epoch: Epoch) -> CallDeadline {
        CallDeadline { epoch, at: Arc::new(AtomicU64::new(u64::MAX)) }
    }

    /// The store's epoch deadline was set `ticks` ticks from now
    /// (`Store::set_epoch_deadline`, `UpdateDeadline::Continue`). The host's
    /// count of the epoch may be one tick behind wasmtime's, so the deadline
    /// is kept one tick later: reaching it, the store is surely past its own.
    pub fn arm(&self, ticks: u64) {
        self.at.store(self.epoch.now().saturating_add(ticks).saturating_add(1), Ordering::Relaxed);
    }

    /// Whole epoch ticks until the deadline (0: it has passed).
    fn ticks_left(&self) -> u64 {
        self.at.load(Ordering::Relaxed).saturating_sub(self.epoch.now())
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
