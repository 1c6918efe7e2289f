//! A protostub's thread drives its own sockets.
//!
//! `wasmtime-wasi`'s synchronous WASI waits (`in_tokio`) block on a
//! multi-thread tokio runtime of its own, whose worker threads run the I/O
//! driver. A message arriving on a stub's socket then woke a tokio worker
//! (epoll), which woke the stub's thread (a futex): two thread wake-ups for
//! every read, on the path of every message between runtimes.
//!
//! Here a stub's thread has a current-thread runtime of its own
//! ([`drive_here`]): its context is entered for the thread's life, so the
//! sockets the stub opens are registered with it, and the stub's waits —
//! `wasi:io/poll`'s `poll`, `pollable.block` and `pollable.ready`, and the
//! blocking calls of `wasi:io/streams` — are linked over `wasmtime-wasi`'s
//! ([`link`]) to run that runtime (`Runtime::block_on`). The stub's thread
//! itself sits in epoll and is the one woken; what `wasmtime-wasi` spawns for
//! its sockets (a write that did not fit at once, a connect) runs there too,
//! while the stub waits. Each wait first yields once to the runtime, so its
//! I/O and spawned work move on even when what is waited on is ready at once
//! (`wasmtime-wasi` does the same in `in_tokio`).
//!
//! A stub's thread also runs other guests: hyperties of its domain, what it
//! posts, lent (`sandbox::handoff::stub_post`), and IdP proxies, validating
//! the assertion of what it posts or making one for what a data object
//! reports. Their own WASI waits (a timer) go through `wasmtime-wasi`'s
//! `in_tokio`, which would block on the stub's runtime without driving it,
//! never waking, holding the proxy's one instance for every other thread;
//! so whatever a stub's import hands to the bus (`post`, `post-from`,
//! `refuse`, `report-status`) runs with `wasmtime-wasi`'s runtime entered
//! again ([`outside`]), as on any other thread.
//!
//! What a stub must do: wait through `wasi:io` (`poll`, `block`, `ready`
//! or a blocking stream call), as wasi-libc and Rust's std do. Its sockets
//! move on only while it waits: one that spins on `finish-connect`,
//! `check-write` or `read` without ever waiting no longer sees them become
//! ready (wasmtime-wasi's worker threads drove them in the background
//! before), and is stopped at its poll's deadline. Likewise a write
//! aborted with its stream (`glue::link_output_stream_drop`) is dropped,
//! and its socket closed, at the thread's next wait, not at once.
//!
//! On any other thread (a stub's `init` checked at deployment runs on the
//! deployer's) these waits are `wasmtime-wasi`'s own.
//!
//! Measured (`tests/benches/nats.rs`, `HYPERTY_NATS_BENCH=rr:<n>`, `perf
//! stat -e context-switches`, the difference of two counts): 21.4 context
//! switches a round trip between runtimes instead of 23.3–24.9.

use std::cell::RefCell;
use std::future::Future;

use anyhow::{Result, anyhow, bail};
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, StreamResult};
use wasmtime_wasi_io::bindings::wasi::io::poll::{Host as _, HostPollable as _};
use wasmtime_wasi_io::bindings::wasi::io::streams::{self as wit_streams, HostInputStream as _, HostOutputStream as _};

thread_local! {
    /// This stub thread's runtime ([`drive_here`]).
    static IO: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
    /// `wasmtime-wasi`'s runtime, for what this stub thread lends itself to.
    static AMBIENT: RefCell<Option<tokio::runtime::Handle>> = const { RefCell::new(None) };
}

/// Runs `thread` (a stub's thread, all of it) with a current-thread runtime
/// of its own entered: the stub's sockets are driven by this thread.
pub(crate) fn drive_here<R>(thread: impl FnOnce() -> R) -> R {
    // Taken before entering ours: `wasmtime-wasi`'s own.
    let ambient = wasmtime_wasi::runtime::with_ambient_tokio_runtime(tokio::runtime::Handle::current);
    let io = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
        Ok(io) => io,
        Err(e) => {
            // As before this module: `wasmtime-wasi`'s runtime drives it.
            tracing::warn!("a protostub's thread runs without its own I/O driver: {e}");
            return thread();
        }
    };
    let handle = io.handle().clone();
    IO.set(Some(io));
    AMBIENT.set(Some(ambient));
    let result = {
        let _entered = handle.enter();
        thread()
    };
    AMBIENT.set(None);
    // Its sockets were dropped with the stub's store, in `thread`.
    drop(IO.take());
    result
}

/// Runs `to_bus` (what a stub's import hands to the bus, which may run
/// other guests on this thread) with `wasmtime-wasi`'s runtime entered, not
/// the stub's: see the module's doc.
pub(crate) fn outside<R>(to_bus: impl FnOnce() -> R) -> R {
    match AMBIENT.with_borrow(Clone::clone) {
        Some(ambient) => {
            let _entered = ambient.enter();
            to_bus()
        }
        None => to_bus(),
    }
}

/// Waits for `wait` on this stub thread's runtime, or `wasmtime-wasi`'s way
/// on a thread that has none.
fn block_on<F: Future>(wait: F) -> F::Output {
    IO.with_borrow(|io| match io {
        Some(io) => io.block_on(async {
            tokio::task::yield_now().await;
            wait.await
        }),
        None => wasmtime_wasi::runtime::in_tokio(wait),
    })
}

/// `wasi:io/poll` and `wasi:io/streams` as `wasmtime-wasi` links them.
const POLL: &str = "wasi:io/poll@0.2.12";
const STREAMS: &str = "wasi:io/streams@0.2.12";

/// What a blocking stream call gives the guest: its value, or the stream
/// error pushed to the table as `wasmtime-wasi` does.
type Lowered<T> = wasmtime::Result<(Result<T, wit_streams::StreamError>,)>;

fn lowered<T>(table: &mut ResourceTable, result: StreamResult<T>) -> Lowered<T> {
    match result {
        Ok(value) => Ok((Ok(value),)),
        Err(e) => Ok((Err(wit_streams::Host::convert_stream_error(table, e)?),)),
    }
}

/// Links the waits of [`POLL`] and the blocking calls of [`STREAMS`] over
/// `wasmtime-wasi`'s, to run on the stub thread's runtime ([`block_on`]);
/// the linker must already hold `wasmtime-wasi`'s.
pub(crate) fn link<T: WasiView + 'static>(linker: &mut Linker<T>) -> Result<()> {
    // Were `wasmtime-wasi` to link other versions, this would make new
    // instances beside them and replace nothing: refuse to start instead.
    // (Only while shadowing is off.)
    if linker.instance(POLL)?.func_wrap("poll", |_, (): ()| Ok(())).is_ok() {
        bail!("wasmtime-wasi does not link {POLL}: update protostub::io::POLL");
    }
    if linker.instance(STREAMS)?.func_wrap("[method]input-stream.blocking-read", |_, (): ()| Ok(())).is_ok() {
        bail!("wasmtime-wasi does not link {STREAMS}: update protostub::io::STREAMS");
    }
    linker.allow_shadowing(true);
    let mut poll = linker.instance(POLL).map_err(|e| anyhow!("{POLL}: {e:#}"))?;
    poll.func_wrap("poll", |mut store: StoreContextMut<'_, T>, (list,): (Vec<Resource<DynPollable>>,)| {
        Ok((block_on(store.data_mut().ctx().table.poll(list))?,))
    })?;
    poll.func_wrap("[method]pollable.block", |mut store: StoreContextMut<'_, T>, (p,): (Resource<DynPollable>,)| {
        block_on(store.data_mut().ctx().table.block(p))
    })?;
    poll.func_wrap("[method]pollable.ready", |mut store: StoreContextMut<'_, T>, (p,): (Resource<DynPollable>,)| {
        Ok((block_on(store.data_mut().ctx().table.ready(p))?,))
    })?;
    let mut streams = linker.instance(STREAMS).map_err(|e| anyhow!("{STREAMS}: {e:#}"))?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-and-flush",
        |mut store: StoreContextMut<'_, T>, (s, bytes): (Resource<DynOutputStream>, Vec<u8>)| -> Lowered<()> {
            let table = store.data_mut().ctx().table;
            let result = block_on(table.blocking_write_and_flush(s, bytes));
            lowered(table, result)
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-zeroes-and-flush",
        |mut store: StoreContextMut<'_, T>, (s, len): (Resource<DynOutputStream>, u64)| -> Lowered<()> {
            let table = store.data_mut().ctx().table;
            let result = block_on(table.blocking_write_zeroes_and_flush(s, len));
            lowered(table, result)
        },
    )?;
    streams.func_wrap("[method]output-stream.blocking-flush", |mut store: StoreContextMut<'_, T>, (s,): (Resource<DynOutputStream>,)| -> Lowered<()> {
        let table = store.data_mut().ctx().table;
        let result = block_on(table.blocking_flush(s));
        lowered(table, result)
    })?;
    streams.func_wrap(
        "[method]output-stream.blocking-splice",
        |mut store: StoreContextMut<'_, T>, (s, from, len): (Resource<DynOutputStream>, Resource<DynInputStream>, u64)| -> Lowered<u64> {
            let table = store.data_mut().ctx().table;
            let result = block_on(table.blocking_splice(s, from, len));
            lowered(table, result)
        },
    )?;
    streams.func_wrap(
        "[method]input-stream.blocking-read",
        |mut store: StoreContextMut<'_, T>, (s, len): (Resource<DynInputStream>, u64)| -> Lowered<Vec<u8>> {
            let table = store.data_mut().ctx().table;
            let result = block_on(table.blocking_read(s, len));
            lowered(table, result)
        },
    )?;
    streams.func_wrap(
        "[method]input-stream.blocking-skip",
        |mut store: StoreContextMut<'_, T>, (s, len): (Resource<DynInputStream>, u64)| -> Lowered<u64> {
            let table = store.data_mut().ctx().table;
            let result = block_on(table.blocking_skip(s, len));
            lowered(table, result)
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
