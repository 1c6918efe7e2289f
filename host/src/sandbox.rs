//! Domain sandboxes: one wasmtime `Store` per provider domain, owned by its
//! own thread and fed by one bounded inbox.
//!
//! A sandbox holds its domain's hyperty instances. Its thread takes
//! envelopes from the inbox in order: control (instantiate, init, remove,
//! stop) from the runtime and messages from the bus, each handed to the
//! target instance's exported `handle`. Guest code runs synchronously under
//! an epoch deadline, so a runaway call traps instead of holding the thread;
//! a dedicated thread per domain means a slow domain never delays another.
//!
//! The wasmtime glue for the `bus`, `registry` and `log` imports lives here
//! too: it knows which instance is calling, and so stamps `from`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::address::Address;
use crate::bus::{Bus, SendError};
use crate::engine::EPOCH_TICK;
use crate::message::{Body, Message, MessageType, code};
use crate::registry::Registry;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "hyperty",
    });
}

use bindings::rethink::hyperty::{bus as wit_bus, log as wit_log, registry as wit_registry, types as wit};
pub(crate) use bindings::{Hyperty, HypertyPre};

/// Limits of a domain sandbox, set per domain in the bundle manifest.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// Messages the domain's inbox holds before senders get `inbox-full`.
    pub inbox: usize,
    /// Linear memory per instance, in MiB.
    pub memory_mb: u32,
    /// Wall-clock time one call into a guest may take, in milliseconds.
    pub call_timeout_ms: u64,
    /// Hyperty instances the domain may hold.
    pub instances: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { inbox: 1024, memory_mb: 64, call_timeout_ms: 1000, instances: 100 }
    }
}

impl Limits {
    /// Checks the values are in range; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, field: &str, range: &str| if ok { Ok(()) } else { Err(format!("{field} must be in {range}")) };
        check((1..=1_000_000).contains(&self.inbox), "inbox", "1..=1000000")?;
        check((1..=(crate::engine::MAX_MEMORY_BYTES >> 20) as u32).contains(&self.memory_mb), "memory-mb", "1..=1024")?;
        check((10..=600_000).contains(&self.call_timeout_ms), "call-timeout-ms", "10..=600000")?;
        check((1..=1000).contains(&self.instances), "instances", "1..=1000")
    }
}

/// Builds the linker every hyperty is checked against and instantiated
/// with: WASI p2 (the Rust std of a wasip2 guest imports it; the context
/// grants no files, sockets or environment) and our `hyperty` world.
pub(crate) fn hyperty_linker(engine: &wasmtime::Engine) -> Result<Linker<SandboxState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    Hyperty::add_to_linker::<_, HasSelf<SandboxState>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// Checks that `component` fits the `hyperty` world and prepares it for
/// fast instantiation.
pub(crate) fn prepare(linker: &Linker<SandboxState>, component: &Component) -> Result<HypertyPre<SandboxState>> {
    let pre = linker.instantiate_pre(component).map_err(|e| anyhow!("does not fit the hyperty world: {e:#}"))?;
    HypertyPre::new(pre).map_err(|e| anyhow!("does not fit the hyperty world: {e:#}"))
}

/// What a sandbox's inbox carries.
pub(crate) enum Envelope {
    Deliver { instance: u32, message: Message },
    Control(Control),
}

pub(crate) enum Control {
    Instantiate { pre: HypertyPre<SandboxState>, address: Address, label: Arc<str>, reply: flume::Sender<Result<u32>> },
    Init { instance: u32, config: String, reply: flume::Sender<Result<()>> },
    Remove { instance: u32 },
    Stop,
}

/// Why a delivery did not happen; the message comes back.
pub(crate) enum Refused {
    Full(Message),
    Closed(Message),
}

/// The sending side of a sandbox's inbox; cheap to clone.
#[derive(Clone)]
pub(crate) struct Inbox {
    tx: flume::Sender<Envelope>,
    /// Messages accepted but not yet handled: inbox length plus the one in
    /// hand, so "zero" means the domain is idle.
    in_flight: Arc<AtomicUsize>,
}

impl Inbox {
    pub fn deliver(&self, instance: u32, message: Message) -> Result<(), Refused> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.tx.try_send(Envelope::Deliver { instance, message }).map_err(|e| {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            match e {
                flume::TrySendError::Full(Envelope::Deliver { message, .. }) => Refused::Full(message),
                flume::TrySendError::Disconnected(Envelope::Deliver { message, .. }) => Refused::Closed(message),
                _ => unreachable!("only deliveries are tried"),
            }
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Sends a control envelope, waiting for room in the inbox.
    fn control(&self, control: Control) -> Result<()> {
        self.tx.send(Envelope::Control(control)).map_err(|_| anyhow!("the sandbox has stopped"))
    }
}

/// The runtime's handle on a running sandbox.
pub(crate) struct SandboxHandle {
    pub limits: Limits,
    inbox: Inbox,
    thread: Option<JoinHandle<()>>,
}

impl SandboxHandle {
    /// Starts the sandbox of `domain` on its own thread.
    pub fn spawn(engine: &wasmtime::Engine, domain: &str, limits: Limits, bus: Bus, registry: Arc<Registry>) -> Result<SandboxHandle> {
        let (tx, rx) = flume::bounded(limits.inbox);
        let inbox = Inbox { tx, in_flight: Arc::default() };
        let state = SandboxState::new(&limits, bus.clone(), registry);
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        let sandbox = Sandbox {
            store,
            slots: Vec::new(),
            bus,
            call_ticks: limits.call_timeout_ms.div_ceil(EPOCH_TICK.as_millis() as u64),
            in_flight: inbox.in_flight.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("sandbox {domain}"))
            .spawn(move || sandbox.run(rx))
            .context("cannot start the sandbox thread")?;
        Ok(SandboxHandle { limits, inbox, thread: Some(thread) })
    }

    pub fn inbox(&self) -> Inbox {
        self.inbox.clone()
    }

    pub fn instantiate(&self, pre: HypertyPre<SandboxState>, address: Address, label: Arc<str>) -> Result<u32> {
        let (reply, result) = flume::bounded(1);
        self.inbox.control(Control::Instantiate { pre, address, label, reply })?;
        result.recv().map_err(|_| anyhow!("the sandbox stopped"))?
    }

    pub fn init(&self, instance: u32, config: String) -> Result<()> {
        let (reply, result) = flume::bounded(1);
        self.inbox.control(Control::Init { instance, config, reply })?;
        result.recv().map_err(|_| anyhow!("the sandbox stopped"))?
    }

    pub fn remove(&self, instance: u32) {
        let _ = self.inbox.control(Control::Remove { instance });
    }
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        let _ = self.inbox.control(Control::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One hyperty as the import glue sees it.
struct HypertyInfo {
    address: Address,
    label: Arc<str>,
}

/// The store data of a domain sandbox.
pub(crate) struct SandboxState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    /// Indexed by instance id; `None` once removed.
    hyperties: Vec<Option<HypertyInfo>>,
    /// The instance being called, set before every call into a guest.
    current: u32,
    bus: Bus,
    registry: Arc<Registry>,
}

impl SandboxState {
    fn new(limits: &Limits, bus: Bus, registry: Arc<Registry>) -> SandboxState {
        let per_domain = limits.instances as usize * 20;
        SandboxState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size((limits.memory_mb as usize) << 20)
                .instances(per_domain)
                .tables(per_domain)
                .memories(per_domain)
                .build(),
            hyperties: Vec::new(),
            current: 0,
            bus,
            registry,
        }
    }
}

/// Mean time to instantiate `pre` into a fresh store, as a new domain
/// sandbox does, over `n` runs (for benchmarks).
pub(crate) fn time_instantiation(
    engine: &wasmtime::Engine,
    pre: &HypertyPre<SandboxState>,
    bus: &Bus,
    registry: &Arc<Registry>,
    n: u32,
) -> Result<Duration> {
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let mut store = Store::new(engine, SandboxState::new(&Limits::default(), bus.clone(), registry.clone()));
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(100);
        let started = std::time::Instant::now();
        pre.instantiate(&mut store)?;
        total += started.elapsed();
    }
    Ok(total / n.max(1))
}

impl WasiView for SandboxState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl SandboxState {
    fn caller(&self) -> &HypertyInfo {
        self.hyperties[self.current as usize].as_ref().expect("a removed instance is never called")
    }

    /// Converts a guest's message, checking every field and that `from` is
    /// the calling hyperty's own address (the stamp).
    fn accept(&self, m: wit::Message) -> Result<Message, SendError> {
        let from = Address::parse(m.from).map_err(|e| SendError::Malformed(format!("from: {e}")))?;
        let own = &self.caller().address;
        if &from != own {
            return Err(SendError::SpoofedFrom(format!("{from} is not this hyperty's address ({own})")));
        }
        let to = Address::parse(m.to).map_err(|e| SendError::Malformed(format!("to: {e}")))?;
        let value = m.body.value.map(check_json).transpose()?;
        Ok(Message {
            id: m.id,
            kind: m.type_.into(),
            from,
            to,
            body: Body { code: m.body.code, resource: m.body.resource, value, description: m.body.description },
        })
    }
}

fn check_json(value: String) -> Result<String, SendError> {
    crate::message::validate_value(&value).map_err(SendError::Malformed)?;
    Ok(value)
}

impl wit::Host for SandboxState {}

impl wit_bus::Host for SandboxState {
    fn send(&mut self, msg: wit::Message) -> Result<(), wit::SendError> {
        let msg = self.accept(msg)?;
        Ok(self.bus.send(msg, None)?)
    }

    fn request(&mut self, msg: wit::Message, timeout_ms: Option<u32>) -> Result<(), wit::SendError> {
        let msg = self.accept(msg)?;
        let timeout = timeout_ms.map_or(self.bus.config().request_timeout, |ms| Duration::from_millis(ms.into()));
        Ok(self.bus.send(msg, Some(timeout))?)
    }

    fn reply(&mut self, request: wit::Message, code: u16, value: Option<String>) -> Result<(), wit::SendError> {
        let request = self.accept_request(request)?;
        let mut response = Message::response(request.id, request.to, request.from, code);
        response.body.value = value.map(check_json).transpose()?;
        Ok(self.bus.send(response, None)?)
    }
}

impl SandboxState {
    /// A request being replied to must be addressed to the caller.
    fn accept_request(&self, m: wit::Message) -> Result<Message, SendError> {
        let to = Address::parse(m.to).map_err(|e| SendError::Malformed(format!("to: {e}")))?;
        let own = &self.caller().address;
        if &to != own {
            return Err(SendError::SpoofedFrom(format!("cannot reply to a request addressed to {to}, not {own}")));
        }
        let from = Address::parse(m.from).map_err(|e| SendError::Malformed(format!("from: {e}")))?;
        Ok(Message::new(m.id, m.type_.into(), from, to, None))
    }
}

impl wit_registry::Host for SandboxState {
    fn lookup(&mut self, domain: String, name: String) -> Option<String> {
        self.registry.lookup(&domain, &name).map(String::from)
    }
}

/// Longest guest log line kept, in bytes.
const MAX_LOG_LINE: usize = 4096;

impl wit_log::Host for SandboxState {
    fn log(&mut self, level: wit_log::Level, mut message: String) {
        if message.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        let who = &self.caller().label;
        match level {
            wit_log::Level::Trace => tracing::trace!(target: "hyperty::guest", "{who}: {message}"),
            wit_log::Level::Debug => tracing::debug!(target: "hyperty::guest", "{who}: {message}"),
            wit_log::Level::Info => tracing::info!(target: "hyperty::guest", "{who}: {message}"),
            wit_log::Level::Warn => tracing::warn!(target: "hyperty::guest", "{who}: {message}"),
            wit_log::Level::Error => tracing::error!(target: "hyperty::guest", "{who}: {message}"),
        }
    }
}

impl From<SendError> for wit::SendError {
    fn from(e: SendError) -> wit::SendError {
        match e {
            SendError::SpoofedFrom(s) => wit::SendError::SpoofedFrom(s),
            SendError::Malformed(s) => wit::SendError::Malformed(s),
            SendError::TooLarge(s) => wit::SendError::TooLarge(s),
            SendError::DuplicateId(id) => wit::SendError::DuplicateId(id),
            SendError::InboxFull(s) => wit::SendError::InboxFull(s),
        }
    }
}

impl From<wit::MessageType> for MessageType {
    fn from(t: wit::MessageType) -> MessageType {
        match t {
            wit::MessageType::Create => MessageType::Create,
            wit::MessageType::Read => MessageType::Read,
            wit::MessageType::Update => MessageType::Update,
            wit::MessageType::Delete => MessageType::Delete,
            wit::MessageType::Subscribe => MessageType::Subscribe,
            wit::MessageType::Unsubscribe => MessageType::Unsubscribe,
            wit::MessageType::Response => MessageType::Response,
            wit::MessageType::Forward => MessageType::Forward,
            wit::MessageType::Execute => MessageType::Execute,
        }
    }
}

impl From<MessageType> for wit::MessageType {
    fn from(t: MessageType) -> wit::MessageType {
        match t {
            MessageType::Create => wit::MessageType::Create,
            MessageType::Read => wit::MessageType::Read,
            MessageType::Update => wit::MessageType::Update,
            MessageType::Delete => wit::MessageType::Delete,
            MessageType::Subscribe => wit::MessageType::Subscribe,
            MessageType::Unsubscribe => wit::MessageType::Unsubscribe,
            MessageType::Response => wit::MessageType::Response,
            MessageType::Forward => wit::MessageType::Forward,
            MessageType::Execute => wit::MessageType::Execute,
        }
    }
}

impl From<Message> for wit::Message {
    fn from(m: Message) -> wit::Message {
        wit::Message {
            id: m.id,
            type_: m.kind.into(),
            from: m.from.into(),
            to: m.to.into(),
            body: wit::Body {
                code: m.body.code,
                resource: m.body.resource,
                value: m.body.value,
                description: m.body.description,
            },
        }
    }
}

/// Lifecycle of an instance inside its sandbox.
enum Status {
    /// Instantiated; messages wait in the backlog until `init` succeeds.
    Instantiated { backlog: Vec<Message> },
    Live,
    /// Trapped: it cannot be entered again.
    Failed,
}

struct Slot {
    bindings: Hyperty,
    status: Status,
}

/// The sandbox thread's state.
struct Sandbox {
    store: Store<SandboxState>,
    slots: Vec<Option<Slot>>,
    bus: Bus,
    call_ticks: u64,
    in_flight: Arc<AtomicUsize>,
}

impl Sandbox {
    fn run(mut self, inbox: flume::Receiver<Envelope>) {
        while let Ok(envelope) = inbox.recv() {
            match envelope {
                Envelope::Deliver { instance, message } => {
                    self.deliver(instance, message);
                    self.in_flight.fetch_sub(1, Ordering::Release);
                }
                Envelope::Control(Control::Instantiate { pre, address, label, reply }) => {
                    let _ = reply.send(self.instantiate(&pre, address, label));
                }
                Envelope::Control(Control::Init { instance, config, reply }) => {
                    let _ = reply.send(self.init(instance, config));
                }
                Envelope::Control(Control::Remove { instance }) => {
                    self.slots[instance as usize] = None;
                    self.store.data_mut().hyperties[instance as usize] = None;
                }
                Envelope::Control(Control::Stop) => break,
            }
        }
    }

    fn instantiate(&mut self, pre: &HypertyPre<SandboxState>, address: Address, label: Arc<str>) -> Result<u32> {
        let id = self.slots.len() as u32;
        self.store.data_mut().hyperties.push(Some(HypertyInfo { address, label }));
        enter(&mut self.store, id, self.call_ticks);
        match pre.instantiate(&mut self.store) {
            Ok(bindings) => {
                self.slots.push(Some(Slot { bindings, status: Status::Instantiated { backlog: Vec::new() } }));
                Ok(id)
            }
            Err(e) => {
                self.store.data_mut().hyperties.pop();
                Err(anyhow!("instantiation failed: {e:#}"))
            }
        }
    }

    fn init(&mut self, instance: u32, config: String) -> Result<()> {
        let slot = self.slots.get_mut(instance as usize).and_then(Option::as_mut).context("no such instance")?;
        let address = self.store.data().hyperties[instance as usize].as_ref().context("no such instance")?.address.to_string();
        enter(&mut self.store, instance, self.call_ticks);
        let result = slot.bindings.rethink_hyperty_handler().call_init(&mut self.store, &address, &config);
        match result {
            Ok(Ok(())) => {
                let Status::Instantiated { backlog } = std::mem::replace(&mut slot.status, Status::Live) else {
                    return Ok(());
                };
                for message in backlog {
                    self.deliver(instance, message);
                }
                Ok(())
            }
            Ok(Err(reason)) => {
                slot.status = Status::Failed;
                Err(anyhow!("init refused: {reason}"))
            }
            Err(trap) => {
                slot.status = Status::Failed;
                Err(anyhow!("init trapped: {trap:#}"))
            }
        }
    }

    fn deliver(&mut self, instance: u32, message: Message) {
        let Some(slot) = self.slots.get_mut(instance as usize).and_then(Option::as_mut) else {
            let why = format!("{} has been removed", message.to);
            self.bus.answer(&message, code::NOT_FOUND, why);
            return;
        };
        match &mut slot.status {
            Status::Instantiated { backlog } => return backlog.push(message),
            Status::Failed => {
                let why = format!("{} has failed", message.to);
                self.bus.answer(&message, code::UNAVAILABLE, why);
                return;
            }
            Status::Live => {}
        }
        enter(&mut self.store, instance, self.call_ticks);
        if let Err(trap) = slot.bindings.rethink_hyperty_handler().call_handle(&mut self.store, &message.into()) {
            let label = &self.store.data().caller().label;
            tracing::error!(hyperty = %label, "trapped while handling a message and is stopped: {trap:#}");
            slot.status = Status::Failed;
        }
    }
}

/// Prepares `store` for a call into `instance`: whose imports are served,
/// and the deadline.
fn enter(store: &mut Store<SandboxState>, instance: u32, call_ticks: u64) {
    store.data_mut().current = instance;
    store.set_epoch_deadline(call_ticks);
}
