//! The wasmtime glue of the `protostub` world: bindings, the store data of
//! one stub instance, the `stub-host` imports and the network grant.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use wasmtime::Store;
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::{DynPollable, Pollable};
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::{Stub, StubContext, StubQueue, Work};
use crate::message::code;
use crate::sandbox::handoff;
use crate::sandbox::limits::{DomainMemory, InstanceLimiter, Limits};
use crate::sandbox::timers::{CallDeadline, Timed};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "protostub",
        with: {
            "wasi": wasmtime_wasi::p2::bindings::sync,
            "rethink:hyperty/log": crate::sandbox::glue::bindings::rethink::hyperty::log,
        },
        require_store_data_send: true,
    });
}

use bindings::rethink::hyperty::stub_host as wit;
use crate::sandbox::glue::bindings::rethink::hyperty::log as wit_log;
use bindings::{Protostub as Bindings, ProtostubPre};
pub(crate) use wit::StubStatus;

/// A component checked against the `protostub` world.
#[derive(Clone)]
pub(crate) struct StubPre(ProtostubPre<StubState>);

/// What a protostub may import (names without their `@version`): the
/// interfaces of the `protostub` world (TCP through the network it is
/// granted, streams, polling, the monotonic clock, `stub-host`, `log`) and
/// what every `wasm32-wasip2` program imports through Rust's std with no
/// authority behind it (an empty environment, exit, standard streams that
/// go nowhere, the random seed of its hash maps). Not UDP, name lookup, the
/// wall clock, the filesystem or anything else the linker could offer.
const STUB_IMPORTS: &[&str] = &[
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:io/error",
    "wasi:clocks/monotonic-clock",
    "rethink:hyperty/stub-host",
    "rethink:hyperty/log",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// Refuses a component that imports anything a protostub is not given
/// ([`STUB_IMPORTS`]), naming every such import: the linker offers all of
/// WASI p2, so this is what keeps a stub to its world.
fn check_imports(engine: &wasmtime::Engine, component: &Component) -> Result<()> {
    let beyond: Vec<String> = component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name)
        .filter(|name| !STUB_IMPORTS.contains(&name.split_once('@').map_or(*name, |(n, _)| n)))
        .map(str::to_owned)
        .collect();
    if beyond.is_empty() {
        return Ok(());
    }
    Err(anyhow!(
        "does not fit the protostub world: it imports {}, which a protostub is not given (only TCP to its endpoints, the monotonic clock and what std needs)",
        beyond.join(", ")
    ))
}

/// Checks that `component` imports nothing beyond the `protostub` world
/// and fits it, and prepares it.
pub(crate) fn prepare(engine: &wasmtime::Engine, component: &Component) -> Result<StubPre> {
    check_imports(engine, component)?;
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow!("{e:#}"))?;
    crate::sandbox::timers::link(&mut linker)?;
    link_output_stream_drop(&mut linker)?;
    super::io::link(&mut linker)?;
    wit::add_to_linker::<_, HasSelf<StubState>>(&mut linker, |s| s).map_err(|e| anyhow!("{e:#}"))?;
    wit_log::add_to_linker::<_, HasSelf<StubState>>(&mut linker, |s| s).map_err(|e| anyhow!("{e:#}"))?;
    let pre = linker.instantiate_pre(component).map_err(|e| anyhow!("does not fit the protostub world: {e:#}"))?;
    ProtostubPre::new(pre).map(StubPre).map_err(|e| anyhow!("does not fit the protostub world: {e:#}"))
}

/// The WASI streams interface whose `output-stream` a stub drops at once.
const STREAMS: &str = "wasi:io/streams@0.2.12";

/// Links the drop of a stub's `output-stream` over wasmtime-wasi's, which
/// waits for the stream's background writes to finish ("to prevent
/// silently dropping data": `TcpWriter::cancel`), in a host call no epoch
/// deadline interrupts. A node that stops reading then held the stub's
/// thread for ever when the stub gave its connection up (its write
/// timeout). Here the stream leaves the table and is dropped; its pending
/// write is aborted once the socket, which shares it, is dropped too
/// (wasmtime-wasi's `AbortOnDropJoinHandle`; `nats-stub` drops both at
/// once). A stub that
/// drops a stream has given up on what it had not seen taken anyway:
/// what was not acknowledged is offered again on its next connection.
fn link_output_stream_drop(linker: &mut Linker<StubState>) -> Result<()> {
    use wasmtime::component::ResourceType;
    use wasmtime_wasi::p2::DynOutputStream;
    let mut streams = linker.instance(STREAMS).map_err(|e| anyhow!("{STREAMS}: {e:#}"))?;
    // Were `wasmtime-wasi` to link another version, this would make a new
    // instance beside it and replace nothing: refuse to start instead.
    // (Only while shadowing is off, as `timers::link` leaves it: else this
    // probe would replace `check-write`.)
    if streams.func_wrap("[method]output-stream.check-write", |_, (): ()| Ok((0u64,))).is_ok() {
        anyhow::bail!("wasmtime-wasi does not link {STREAMS}: update protostub::glue::STREAMS");
    }
    linker.allow_shadowing(true);
    let mut streams = linker.instance(STREAMS).map_err(|e| anyhow!("{STREAMS}: {e:#}"))?;
    streams.resource("output-stream", ResourceType::host::<DynOutputStream>(), |mut store, rep| {
        let stream: Resource<DynOutputStream> = Resource::new_own(rep);
        store.data_mut().table.delete(stream)?;
        Ok(())
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The store data of a stub instance.
pub(crate) struct StubState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: InstanceLimiter,
    stub: Arc<Stub>,
    bus: crate::bus::Bus,
    registry: Arc<crate::registry::Registry>,
    events: crate::events::Events,
    log: crate::sandbox::GuestLog,
    /// The deadline of the call in hand, where its timers end.
    deadline: CallDeadline,
}

impl Timed for StubState {
    fn deadline(&self) -> &CallDeadline {
        &self.deadline
    }
}

impl WasiView for StubState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The WASI context of a stub: TCP to its granted endpoints only (and the
/// implicit wildcard bind a connect makes); no UDP, no name lookup, no
/// listening. Refusals are logged.
fn wasi_ctx(domain: &str, endpoints: &[SocketAddr]) -> WasiCtx {
    let allowed: Arc<[SocketAddr]> = endpoints.into();
    let domain: Arc<str> = domain.into();
    WasiCtx::builder()
        .allow_tcp(true)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(move |addr, use_| {
            let ok = match use_ {
                SocketAddrUse::TcpConnect => allowed.contains(&addr),
                SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
                _ => false,
            };
            if !ok {
                tracing::warn!(stub = %domain, "refused: {use_:?} {addr} is not an endpoint granted to this protostub");
            }
            Box::pin(async move { ok })
        })
        .build()
}

/// A running stub instance.
pub(crate) struct Instance {
    store: Store<StubState>,
    bindings: Bindings,
}

impl Instance {
    /// Instantiates the stub and calls `init`, under `deadline`.
    pub fn start(stub: &Arc<Stub>, context: &StubContext, deadline: Duration) -> Result<Instance, String> {
        let state = StubState {
            wasi: wasi_ctx(&stub.domain, &context.settings.endpoints),
            table: ResourceTable::new(),
            limiter: InstanceLimiter::new(&Limits::default(), Arc::new(DomainMemory::default())),
            stub: stub.clone(),
            bus: context.bus.clone(),
            registry: context.registry.clone(),
            events: context.events.clone(),
            log: crate::sandbox::GuestLog::new(format!("protostub {}", stub.domain), &Limits::default()),
            deadline: CallDeadline::new(context.epoch.clone(), true),
        };
        let mut store = Store::new(&context.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Interrupted at its deadline, extended by the time its thread
        // spent running hyperties' deliveries it lent itself to (what it
        // posts: `handoff::stub_post`).
        store.epoch_deadline_callback(crate::sandbox::timers::lending_deadline);
        arm(&mut store, deadline);
        let bindings = context.pre.0.instantiate(&mut store).map_err(|e| format!("instantiation failed: {e:#}"))?;
        bindings
            .rethink_hyperty_stub()
            .call_init(&mut store, &stub.domain, &context.settings.config)
            .map_err(|e| format!("init trapped: {e:#}"))?
            .map_err(|e| format!("init refused its configuration: {e}"))?;
        Ok(Instance { store, bindings })
    }

    /// One `poll` call; an error (a trap) ends the instance.
    pub fn poll(&mut self, wait_ms: u32, deadline: Duration) -> Result<(), String> {
        arm(&mut self.store, deadline);
        self.bindings.rethink_hyperty_stub().call_poll(&mut self.store, wait_ms).map_err(|e| {
            let limits = Limits { call_timeout_ms: deadline.as_millis() as u64, ..Limits::default() };
            crate::sandbox::trap_reason(&e, &limits)
        })
    }
}

/// Sets the deadline of the next call into `store`; what that call lends
/// to hyperties starts from nothing.
fn arm(store: &mut Store<StubState>, deadline: Duration) {
    let ticks = crate::engine::ticks(deadline);
    handoff::call_starts(ticks);
    crate::sandbox::timers::arm(store, ticks, None);
}

/// Longest text a stub's report or refusal puts into statuses and answers,
/// in bytes (the rest is cut).
const MAX_STUB_TEXT: usize = 1024;

/// `text` cut to [`MAX_STUB_TEXT`] bytes (at a character boundary).
fn cut(mut text: String) -> String {
    if text.len() > MAX_STUB_TEXT {
        let end = (0..=MAX_STUB_TEXT).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Ready while the stub's queue has work it has not taken.
struct WorkReady(Arc<StubQueue>);

#[wasmtime_wasi::async_trait]
impl Pollable for WorkReady {
    async fn ready(&mut self) {
        self.0.work().await;
    }
}

impl wit::Host for StubState {
    fn work_ready(&mut self) -> Resource<DynPollable> {
        let resource = self.table.push(WorkReady(self.stub.queue.clone())).expect("the table has room");
        wasmtime_wasi::p2::subscribe(&mut self.table, resource).expect("the table has room")
    }

    fn next_work(&mut self) -> Option<wit::Work> {
        Some(match self.stub.queue.next_work()? {
            Work::Send { seq, to, envelope } => wit::Work::Send(wit::Outbound { seq, to, envelope }),
            Work::Listen(a) => wit::Work::Listen(a),
            Work::Forget(a) => wit::Work::Forget(a),
        })
    }

    fn delivered(&mut self, seq: u64) {
        self.stub.queue.delivered(seq);
    }

    fn retry(&mut self, seq: u64) {
        self.stub.queue.retry(seq);
    }

    fn refuse(&mut self, seq: u64, why: wit::Refusal) {
        let (code, why) = match why {
            wit::Refusal::TooLarge(why) => (code::PAYLOAD_TOO_LARGE, why),
            wit::Refusal::Forbidden(why) => (code::FORBIDDEN, why),
        };
        // Everything a stub sends to the bus runs outside its I/O driver:
        // a guest it reaches (a hyperty lent this thread, an IdP proxy
        // validating an assertion) waits through wasmtime-wasi's runtime.
        super::io::outside(|| self.stub.refuse(&self.bus, seq, code, &cut(why)));
    }

    fn resume(&mut self) {
        self.stub.queue.resume();
    }

    fn post(&mut self, envelope: String) -> Result<(), String> {
        super::io::outside(|| self.stub.post(&self.bus, &envelope, None))
    }

    fn post_from(&mut self, domain: String, envelope: String) -> Result<(), String> {
        super::io::outside(|| self.stub.post(&self.bus, &envelope, Some(&domain)))
    }

    fn report_status(&mut self, status: StubStatus, detail: String) {
        let context = super::StatusSink { registry: &self.registry, events: &self.events, bus: &self.bus };
        let detail = cut(detail);
        let name = super::io::outside(|| super::report(&self.stub, context, status, &detail));
        // Through the stub's log rate, as its own lines: a stub reporting in
        // a loop cannot flood the host's log.
        self.log.write(wit_log::Level::Info, &format!("status {name} ({detail})"));
    }
}

impl wit_log::Host for StubState {
    fn log(&mut self, level: wit_log::Level, message: String) {
        self.log.write(level, &message);
    }
}
