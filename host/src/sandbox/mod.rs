//! Domain sandboxes: one thread and one bounded inbox per provider domain,
//! and one wasmtime `Store` per hyperty instance of that domain.
//!
//! The domain's thread takes envelopes from the inbox in order: control
//! (remove, stop) from the runtime and messages from the
//! bus, each handed to the target instance's exported `handle`. Guest code
//! runs synchronously under an epoch deadline (and, if configured, a fuel
//! budget), so a runaway call traps instead of holding the thread; a thread
//! per domain means a slow domain never delays another for long. A domain's
//! thread that sends to an idle domain runs that delivery itself, without
//! waking the other's thread: see [`handoff`] for when, and why the
//! guarantees hold.
//!
//! Decision: a store per *instance*, not per domain. A trapped instance can
//! never be entered again, and a store frees its instances' memory only when
//! it is dropped; with one store per domain every crash/restart would leak
//! the dead instance until the whole domain stopped. Stores per instance
//! also separate the linear memories of hyperties of the same domain. The
//! domain's limits still hold for the domain as a whole: its total memory
//! is accounted across its stores ([`limits::DomainMemory`]).
//!
//! A trapped instance is restarted per the domain's [`RestartPolicy`] into a
//! fresh store, with its address, after a backoff; messages that reach it
//! meanwhile are answered 503. Each trap, restart and stop is logged and
//! emitted as an [`Event`](crate::events::Event).

pub(crate) mod glue;
pub(crate) mod handoff;
pub mod limits;
pub(crate) mod timers;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Result, anyhow};
use wasmtime::Store;

use crate::address::Address;
use crate::bus::{Bus, Destination, Refused};
use crate::events::{EventKind, Events};
use crate::message::{Message, MessageType, code};
use crate::policy::Descriptor;
use crate::receipt::{OnReturn, Receipt};
use crate::registry::{Registry, Status as RegistryStatus};

pub(crate) use glue::{GuestLog, HypertyPre, InstanceState, check_grants, hyperty_linker, log_line, prepare, printable};
use glue::Hyperty;
use crate::metrics::{HypertyStats, Read};
use limits::{DomainMemory, Grant, InstanceLimiter, Limits, QueuedBytes, RestartPolicy};

/// What a sandbox's inbox carries. Deliveries, the common case, carry
/// their message inline: boxing it would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Envelope {
    /// `receipt`: fired once the message is handled ([`crate::receipt`]).
    Deliver { instance: u32, message: Message, receipt: Option<Receipt> },
    Control(Control),
}

pub(crate) enum Control {
    Remove { instance: u32 },
    /// Nothing to do but look at the restarts again (a lent call trapped
    /// and scheduled one while the thread slept).
    Wake,
    /// Live update, first half: a fresh instance of `hyperty` (same
    /// address), built under `limits` and initialised, is kept beside the
    /// running one, which still takes the messages (see [`Slot::staged`]).
    Stage { instance: u32, hyperty: NewHyperty, limits: Box<Limits>, reply: flume::Sender<Result<()>> },
    /// Second half: the staged instance takes the slot, and with it every
    /// message from the next one in the inbox on; the old one is dropped.
    Commit { instance: u32 },
    /// The domain's new settings, for instances started from now on (a
    /// live update; the inbox's size and the media settings stay).
    Configure { settings: Box<SandboxSettings> },
    /// The staged instance is dropped; the running one never noticed.
    Abort { instance: u32 },
    Stop,
}

/// A hyperty to instantiate in a sandbox.
pub(crate) struct NewHyperty {
    pub pre: HypertyPre<InstanceState>,
    pub address: Address,
    /// `<domain>/<name>`, for logs and events.
    pub label: Arc<str>,
    /// What policies know of it.
    pub descriptor: Arc<Descriptor>,
    /// JSON configuration for `init` (again at each restart).
    pub config: String,
}

/// The sending side of a sandbox's inbox; cheap to clone.
#[derive(Clone)]
pub(crate) struct Inbox {
    tx: flume::Sender<Envelope>,
    /// Messages accepted but not yet handled: inbox length plus the one in
    /// hand, so "zero" means the domain is idle.
    in_flight: Arc<AtomicUsize>,
    /// Bytes of the messages waiting in the inbox (`Message::size`), at
    /// most `max_bytes` (`inbox-bytes`) unless it is one message alone.
    queued_bytes: Arc<QueuedBytes>,
    max_bytes: usize,
    domain: Arc<Domain>,
}

/// A domain's run token: whoever holds `state` runs the domain's guests,
/// its own thread or a sender's thread lending itself ([`handoff`]).
struct Domain {
    /// `None` once the sandbox has stopped.
    state: Mutex<Option<Sandbox>>,
    /// Its last call was short: it may be run on a sender's thread.
    fast: AtomicBool,
}

impl Inbox {
    /// Delivers `message` to `instance`: at once on this thread when it is
    /// a domain's thread and this domain is idle ([`handoff`]), else into
    /// the inbox. A refusal hands the message back, for the bus to answer it.
    #[allow(clippy::result_large_err)]
    pub fn deliver(&self, instance: u32, message: Message, receipt: Option<Receipt>) -> Result<(), Refused> {
        let counted = if handoff::may_lend() && self.domain.fast.load(Ordering::Relaxed) {
            // From idle (0) to one in hand: nothing queued is overtaken.
            if self.in_flight.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                match self.lend(instance, message, receipt) {
                    Ok(()) => return Ok(()),
                    Err((message, receipt)) => Some((message, receipt)),
                }
            } else {
                self.in_flight.fetch_add(1, Ordering::Relaxed);
                Some((message, receipt))
            }
        } else {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            Some((message, receipt))
        };
        let (message, receipt) = counted.expect("a message to queue");
        if self.tx.is_disconnected() {
            // Stopped: whatever bytes are still counted, it is 503.
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(OnReturn(receipt));
            return Err(Refused::Closed(message));
        }
        // Bytes as well as messages: past `inbox-bytes`, the sender gets
        // back-pressure as for a full inbox (one message alone always fits).
        let size = message.size();
        if !self.queued_bytes.take(size, self.max_bytes) {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            // Not taken, as from a full inbox: its receipt is not fired.
            drop(receipt);
            return Err(Refused::Full(message));
        }
        self.tx.try_send(Envelope::Deliver { instance, message, receipt }).map_err(|e| {
            self.queued_bytes.give_back(size);
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            match e {
                flume::TrySendError::Full(Envelope::Deliver { message, .. }) => Refused::Full(message),
                // The bus answers it 503 in the sandbox's place: handled.
                flume::TrySendError::Disconnected(Envelope::Deliver { message, receipt, .. }) => {
                    drop(OnReturn(receipt));
                    Refused::Closed(message)
                }
                _ => unreachable!("only deliveries are tried"),
            }
        })
    }

    /// Runs the delivery on this thread if the domain's run token is free
    /// (never waiting for it); else the message comes back, still counted
    /// in flight, to be queued.
    #[allow(clippy::result_large_err)]
    fn lend(&self, instance: u32, message: Message, receipt: Option<Receipt>) -> Result<(), (Message, Option<Receipt>)> {
        let mut state = match self.domain.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::WouldBlock) => return Err((message, receipt)),
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
        };
        let Some(sandbox) = state.as_mut().filter(|s| !s.stopping.load(Ordering::Acquire) && handoff::may_lend_to(&s.domain, s.call_ticks)) else {
            return Err((message, receipt));
        };
        sandbox.media.taken(&message);
        sandbox.counted.handoffs[handoff::lender_kind()].inc();
        let ((), took) = handoff::lend(|| sandbox.deliver(instance, message, receipt));
        self.domain.fast.store(took < handoff::LEND_MAX, Ordering::Relaxed);
        let restart = !sandbox.restarts.is_empty();
        drop(state);
        self.in_flight.fetch_sub(1, Ordering::Release);
        if restart {
            // Its thread may sleep with no deadline: it must see the restart.
            let _ = self.tx.try_send(Envelope::Control(Control::Wake));
        }
        Ok(())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The bus destination of `instance` in this sandbox, described to the
    /// policies by `descriptor`.
    pub fn route(&self, instance: u32, descriptor: Arc<Descriptor>) -> Arc<dyn Destination> {
        Arc::new(HypertyRoute { inbox: self.clone(), instance, descriptor })
    }

    /// Sends a control envelope, waiting for room in the inbox. It counts
    /// in flight until taken, like a message: no later message is lent
    /// past it (a message sent after a live update's `Commit` reaches the
    /// new version, never the old one on a sender's thread).
    fn control(&self, control: Control) -> Result<()> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Envelope::Control(control)).map_err(|_| {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            anyhow!("the sandbox has stopped")
        })
    }
}

/// A hyperty instance's destination on the bus: its domain's inbox.
struct HypertyRoute {
    inbox: Inbox,
    instance: u32,
    descriptor: Arc<Descriptor>,
}

impl Destination for HypertyRoute {
    fn deliver(&self, message: Message, _bus: &Bus, _wait: Option<std::time::Duration>) -> Result<(), Refused> {
        let receipt = crate::receipt::take(&message);
        self.inbox.deliver(self.instance, message, receipt)
    }

    fn descriptor(&self) -> Option<&Arc<Descriptor>> {
        Some(&self.descriptor)
    }
}

/// How a domain sandbox is set up, from the bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSettings {
    pub limits: Limits,
    pub restart: RestartPolicy,
    pub grants: Vec<Grant>,
    /// The domain's `media` table, when it is granted `media`.
    pub media: Option<crate::media::MediaSettings>,
}

/// What every sandbox shares with the runtime.
#[derive(Clone)]
pub(crate) struct Shared {
    pub engine: wasmtime::Engine,
    pub bus: Bus,
    pub registry: Arc<Registry>,
    pub events: Events,
    pub syncher: Arc<crate::syncher::Syncher>,
    /// For the media actions (`media-open`, `media-accept`).
    pub policies: Arc<crate::policy::cedar::CedarPolicies>,
    /// For WebRTC identity (media fingerprints bound by the IdP proxies).
    pub identities: Arc<crate::identity::Identities>,
    /// Instances and restarts are counted by domain.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The engine's epoch, which hyperties' timers read ([`timers`]).
    pub epoch: crate::engine::Epoch,
}

/// The runtime's handle on a running sandbox. Dropping it stops the
/// sandbox: messages still queued are dropped unhandled (the runtime is
/// stopping; nobody reads their answers), so stopping waits at most for
/// the call in hand (`call-timeout-ms`), not for the inbox.
pub(crate) struct SandboxHandle {
    pub settings: SandboxSettings,
    /// For instantiating stores off the domain's run token
    /// ([`SandboxHandle::instantiate_all`]).
    shared: Shared,
    memory: Arc<DomainMemory>,
    inbox: Inbox,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    media: Arc<crate::media::DomainMedia>,
}

impl SandboxHandle {
    /// Starts the sandbox of `domain` on its own thread.
    pub fn spawn(domain: &str, settings: SandboxSettings, shared: Shared) -> Result<SandboxHandle> {
        let (tx, rx) = flume::bounded(settings.limits.inbox);
        let domain_state = Arc::new(Domain { state: Mutex::new(None), fast: AtomicBool::new(true) });
        let inbox = Inbox { tx, in_flight: Arc::default(), queued_bytes: Arc::default(), max_bytes: settings.limits.inbox_bytes, domain: domain_state.clone() };
        let memory = Arc::new(DomainMemory::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let total_memory = (settings.limits.total_memory_mb as usize) << 20;
        let media = crate::media::DomainMedia::new(domain, settings.media.clone(), memory.clone(), total_memory, shared.policies.clone(), shared.identities.clone());
        let media = Arc::new(media);
        let counted = shared.metrics.add_domain(domain);
        let read = Arc::downgrade(&memory);
        shared.metrics.read_at_scrape(&counted, Read::Memory, move || read.upgrade().map(|m| m.used()));
        let read = Arc::downgrade(&inbox.in_flight);
        shared.metrics.read_at_scrape(&counted, Read::Inbox, move || read.upgrade().map(|n| n.load(Ordering::Relaxed)));
        // The domain's data objects, counted while its sandbox runs.
        for (what, pick) in [(Read::DataObjects, (|c: (usize, usize)| c.0) as fn(_) -> _), (Read::Subscribers, |c| c.1)] {
            let (alive, syncher, name) = (Arc::downgrade(&memory), Arc::downgrade(&shared.syncher), domain.to_owned());
            shared.metrics.read_at_scrape(&counted, what, move || {
                alive.upgrade()?;
                syncher.upgrade().map(|s| pick(s.census(&name)))
            });
        }
        let sandbox = Sandbox {
            domain: domain.into(),
            counted,
            media: media.clone(),
            stopping: stopping.clone(),
            settings: settings.clone(),
            shared: shared.clone(),
            memory: memory.clone(),
            slots: Vec::new(),
            restarts: Vec::new(),
            call_ticks: crate::engine::ticks(std::time::Duration::from_millis(settings.limits.call_timeout_ms)),
            in_flight: inbox.in_flight.clone(),
            queued_bytes: inbox.queued_bytes.clone(),
        };
        *domain_state.state.lock().unwrap() = Some(sandbox);
        let thread = std::thread::Builder::new()
            .name(format!("sandbox {domain}"))
            .spawn(move || run(&domain_state, rx))
            .map_err(|e| anyhow!("cannot start the sandbox thread: {e}"))?;
        Ok(SandboxHandle { settings, shared, memory, inbox, stopping, thread: Some(thread), media })
    }

    pub fn inbox(&self) -> Inbox {
        self.inbox.clone()
    }

    /// The domain's open WebRTC peer connections.
    pub fn peer_connections(&self) -> u32 {
        self.media.open_connections()
    }

    /// Linear memory held by the domain's instances, in bytes.
    pub fn memory_used(&self) -> usize {
        self.memory.used()
    }

    /// Instantiates `hyperties` (a deployment's, in bundle order) and
    /// returns their instance ids, in the same order; or the index of the
    /// first that failed and why (then none of them was kept).
    ///
    /// Their stores are built off the domain's run token, on up to
    /// [`DEPLOY_THREADS`] threads at once (most of an instantiation is the
    /// kernel filling a fresh pool slot's pages at first touch, which the
    /// cores do side by side); then each is added to the domain in order,
    /// holding the token, under the domain's `instances` limit.
    pub fn instantiate_all(&self, hyperties: Vec<NewHyperty>) -> Result<Vec<u32>, (usize, anyhow::Error)> {
        let (limits, live) = self
            .run_here(|sandbox| Ok((sandbox.settings.limits.clone(), sandbox.slots.iter().flatten().count())))
            .map_err(|e| (0, e))?;
        let room = (limits.instances as usize).saturating_sub(live);
        let wanted = hyperties.len();
        let mut hyperties = hyperties;
        hyperties.truncate(room);
        let starts = self.start_all(&hyperties, &limits);
        // Adopted in one hold of the run token (no guest runs meanwhile);
        // on a failure, what was adopted goes again at once: never routed,
        // nothing can be waiting for it.
        self.run_here(|sandbox| {
            let mut adopted = Vec::with_capacity(starts.len());
            let mut failed = None;
            for (i, (hyperty, start)) in hyperties.into_iter().zip(starts).enumerate() {
                match start.and_then(|running| sandbox.adopt(hyperty, running)) {
                    Ok(id) => adopted.push(id),
                    Err(e) => {
                        failed = Some((i, e));
                        break;
                    }
                }
            }
            if failed.is_none() && wanted > room {
                let max = limits.instances;
                failed = Some((room, anyhow!("the domain already holds {} instances (instances = {max})", live + room)));
            }
            Ok(match failed {
                None => Ok(adopted),
                Some(failure) => {
                    for id in adopted {
                        sandbox.remove(id);
                    }
                    Err(failure)
                }
            })
        })
        .map_err(|e| (0, e))?
    }

    /// A fresh store for each of `hyperties`, in order, built on up to
    /// [`DEPLOY_THREADS`] threads, up to the first that fails (the results
    /// a sequential build would give). From the first failure on, the
    /// threads' later stores are dropped and the rest is built again one
    /// by one on this thread, stopping at a failure: when a shared bound
    /// (the pool's `max_instances`, the domain's `total-memory-mb`) runs out, a later chunk may have taken
    /// the room an earlier entry needed, and the entry named must not
    /// depend on the race. A thread that cannot be started leaves its part
    /// to this thread.
    fn start_all(&self, hyperties: &[NewHyperty], limits: &Limits) -> Vec<Result<Running>> {
        let start = |hyperty: &NewHyperty| start(&self.shared, &self.memory, &self.media, hyperty, limits);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(DEPLOY_THREADS);
        // Small deployments are not worth a thread's start.
        let chunk = hyperties.len().div_ceil(threads).max(DEPLOY_CHUNK_MIN);
        if hyperties.len() <= chunk {
            return hyperties.iter().map(start).collect();
        }
        let mut all: Vec<Result<Running>> = std::thread::scope(|scope| {
            let mut chunks = hyperties.chunks(chunk);
            let first = chunks.next().expect("more than one chunk");
            let others: Vec<_> = chunks
                .map(|part| (part, std::thread::Builder::new().name("deploy".into()).spawn_scoped(scope, move || part.iter().map(start).collect::<Vec<_>>())))
                .collect();
            let mut all: Vec<Result<Running>> = first.iter().map(start).collect();
            for (part, other) in others {
                match other {
                    Ok(thread) => all.extend(thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))),
                    Err(_) => all.extend(part.iter().map(start)),
                }
            }
            all
        });
        if let Some(failed) = all.iter().position(Result::is_err) {
            all.truncate(failed);
            for hyperty in &hyperties[failed..] {
                let started = start(hyperty);
                let stop = started.is_err();
                all.push(started);
                if stop {
                    break;
                }
            }
        }
        all
    }

    pub fn init(&self, instance: u32) -> Result<()> {
        self.run_here(|sandbox| sandbox.init(instance))
    }

    /// Runs `work` on the sandbox from this thread (the runtime's, never a
    /// domain's), holding the domain's run token: it waits for the call in
    /// hand, if any, and the domain's thread waits for it. Instead of a
    /// control envelope and its reply, two thread wake-ups per step of a
    /// deployment.
    fn run_here<R>(&self, work: impl FnOnce(&mut Sandbox) -> Result<R>) -> Result<R> {
        let mut state = self.inbox.domain.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let sandbox = state.as_mut().ok_or_else(|| anyhow!("the sandbox stopped"))?;
        let result = work(sandbox);
        let restart = !sandbox.restarts.is_empty();
        drop(state);
        if restart {
            // Its thread may sleep with no deadline: it must see the restart.
            let _ = self.inbox.tx.try_send(Envelope::Control(Control::Wake));
        }
        result
    }

    pub fn remove(&self, instance: u32) {
        let _ = self.inbox.control(Control::Remove { instance });
    }

    /// Instantiates `hyperty` (the new version of `instance`, at its
    /// address) under `limits` and calls its `init`, beside the running
    /// instance ([`Control::Stage`]); the error says why it failed (nothing
    /// changed then). Waits for the messages queued before it.
    pub fn stage(&self, instance: u32, hyperty: NewHyperty, limits: &Limits) -> Result<()> {
        let (reply, result) = flume::bounded(1);
        self.inbox.control(Control::Stage { instance, hyperty, limits: Box::new(limits.clone()), reply })?;
        result.recv().map_err(|_| anyhow!("the sandbox stopped"))?
    }

    /// Switches `instance` to its staged version ([`Control::Commit`]):
    /// the messages queued before this call are handled by the old one,
    /// the rest by the new one, in order.
    pub fn commit(&self, instance: u32) {
        let _ = self.inbox.control(Control::Commit { instance });
    }

    /// The domain's settings become `settings` ([`Control::Configure`]);
    /// `limits.inbox` and `media` cannot change (the caller checks).
    pub fn configure(&mut self, settings: SandboxSettings) {
        self.settings = settings.clone();
        let _ = self.inbox.control(Control::Configure { settings: Box::new(settings) });
    }

    /// Stops the sandbox after what its inbox holds now: unlike a drop,
    /// queued messages are still handled (to a removed instance: answered
    /// 404), so their senders are answered. Waits for the thread.
    pub fn retire(mut self) {
        let _ = self.inbox.control(Control::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Drops the staged version of `instance` ([`Control::Abort`]).
    pub fn abort(&self, instance: u32) {
        let _ = self.inbox.control(Control::Abort { instance });
    }
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.inbox.control(Control::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Lifecycle of an instance inside its sandbox.
enum Status {
    /// Instantiated; messages wait in the backlog until `init` succeeds
    /// (`bytes`: theirs, by `Message::size`).
    Instantiated { backlog: Vec<(Message, Option<Receipt>)>, bytes: usize },
    Live,
    /// Trapped; a fresh instance is due at `at`.
    Restarting { at: Instant },
    /// Trapped, and the restart policy says stop.
    Stopped,
}

/// How many threads a deployment instantiates a domain's stores on, at
/// most (fewer on a machine with fewer cores).
pub(crate) const DEPLOY_THREADS: usize = 4;

/// A deployment of fewer hyperties than this per thread instantiates them
/// on fewer threads (a thread's start costs about one instantiation).
const DEPLOY_CHUNK_MIN: usize = 16;

/// A fresh store of the domain (its memory account, its media) with
/// `hyperty` instantiated in it under `limits`; any thread may build one.
fn start(shared: &Shared, memory: &Arc<DomainMemory>, media: &Arc<crate::media::DomainMedia>, hyperty: &NewHyperty, limits: &Limits) -> Result<Running> {
    let limiter = InstanceLimiter::new(limits, memory.clone());
    let state = InstanceState::new(
        hyperty.address.clone(),
        hyperty.label.clone(),
        hyperty.descriptor.clone(),
        limits,
        limiter,
        shared,
        media.clone(),
    );
    let mut store = Store::new(&shared.engine, state);
    store.limiter(|s| &mut s.limiter);
    // Interrupted at the deadline, less the time its thread lent.
    store.epoch_deadline_callback(crate::sandbox::timers::lending_deadline);
    arm(&mut store, ticks(limits), limits);
    match hyperty.pre.instantiate(&mut store) {
        Ok(bindings) => Ok(Running { store, bindings }),
        Err(e) => Err(anyhow!("instantiation failed: {}", explain(&e, &store, limits))),
    }
}

/// A running instance: its own store and the bindings of its exports.
struct Running {
    store: Store<InstanceState>,
    bindings: Hyperty,
}

struct Slot {
    hyperty: NewHyperty,
    /// `None` after a trap, until the restart.
    running: Option<Running>,
    status: Status,
    /// Consecutive failures; reset by a successfully handled message.
    failures: u32,
    /// A new version, initialised, waiting for its commit (live update).
    staged: Option<(NewHyperty, Running)>,
    /// What `hyperty status` shows of it (shared with the metrics).
    stats: Arc<HypertyStats>,
}

impl Slot {
    fn set_status(&mut self, status: Status) {
        let shown = match status {
            Status::Instantiated { .. } => HypertyStats::STARTING,
            Status::Live => HypertyStats::LIVE,
            Status::Restarting { .. } => HypertyStats::RESTARTING,
            Status::Stopped => HypertyStats::STOPPED,
        };
        self.stats.status.store(shown, Ordering::Relaxed);
        self.status = status;
    }
}

/// Copies what the last call into `running` changed into `stats`.
fn observe(stats: &HypertyStats, running: &Running) {
    let state = running.store.data();
    stats.sent.store(state.sent, Ordering::Relaxed);
    stats.memory.store(state.limiter.held(), Ordering::Relaxed);
}

/// The sandbox thread's state.
struct Sandbox {
    /// The domain's name.
    domain: Arc<str>,
    settings: SandboxSettings,
    shared: Shared,
    memory: Arc<DomainMemory>,
    /// Indexed by instance id; `None` once removed.
    slots: Vec<Option<Slot>>,
    /// Instances waiting for their restart (usually none).
    restarts: Vec<u32>,
    call_ticks: u64,
    in_flight: Arc<AtomicUsize>,
    /// The inbox's bytes waiting ([`Inbox`]): taken down as each message
    /// is taken out.
    queued_bytes: Arc<QueuedBytes>,
    /// The domain's peer connections (`media`).
    media: Arc<crate::media::DomainMedia>,
    /// Set when the sandbox is being stopped: queued messages are dropped.
    stopping: Arc<AtomicBool>,
    /// The domain's instances and restarts.
    counted: Arc<crate::metrics::DomainMetrics>,
}

/// The domain's thread: takes envelopes in order and handles each holding
/// the domain's run token, until stopped; then the sandbox (its stores
/// and their memory) is dropped.
fn run(domain: &Domain, inbox: flume::Receiver<Envelope>) {
    handoff::lender();
    let mut next_restart = None;
    loop {
        let envelope = match next_restart {
            None => inbox.recv().map_err(|_| flume::RecvTimeoutError::Disconnected),
            Some(at) => inbox.recv_deadline(at),
        };
        let mut state = domain.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(sandbox) = state.as_mut() else { break };
        if let Ok(Envelope::Deliver { .. }) = &envelope {
            let started = Instant::now();
            sandbox.take(envelope);
            domain.fast.store(started.elapsed() < handoff::LEND_MAX, Ordering::Relaxed);
        } else if !sandbox.take(envelope) {
            let sandbox = state.take();
            drop(state);
            if let Some(sandbox) = sandbox {
                // What waits behind the Stop goes first, then the inbox
                // closes (senders meet 503), then the stores are dropped.
                drop_queued(&inbox, &sandbox.queued_bytes, &sandbox.in_flight);
                drop(inbox);
                // The domain's instances stop with it.
                sandbox.counted.instances.dec_by(sandbox.slots.iter().flatten().count() as i64);
                for slot in sandbox.slots.iter().flatten() {
                    sandbox.shared.metrics.forget_hyperty(slot.hyperty.address.as_str());
                }
            }
            break;
        }
        next_restart = sandbox.next_restart();
    }
}

/// Empties a stopped sandbox's inbox: what was queued after its `Stop`
/// is dropped unhandled, as a stopping sandbox drops what it takes (its
/// receipts with it; a control's reply channel closes), and its bytes and
/// count are given back. Otherwise those messages would stay held until
/// the last sender let go of the inbox (flume frees a queue only then),
/// and a sender still holding it would meet a full inbox (`inbox-full`)
/// rather than a closed one (503, "has stopped"). The receiver is dropped
/// right after (`run`): a delivery that slips in between those two steps
/// stays unhandled and held until the last sender lets go (its request is
/// answered 408), but cannot make a later sender meet a full inbox, since
/// [`Inbox::deliver`] looks for a closed inbox before counting bytes.
fn drop_queued(inbox: &flume::Receiver<Envelope>, queued_bytes: &QueuedBytes, in_flight: &AtomicUsize) {
    for envelope in inbox.drain() {
        match envelope {
            Envelope::Deliver { message, .. } => {
                queued_bytes.give_back(message.size());
                in_flight.fetch_sub(1, Ordering::Release);
            }
            // Sent bare: never counted.
            Envelope::Control(Control::Wake) => {}
            Envelope::Control(_) => {
                in_flight.fetch_sub(1, Ordering::Release);
            }
        }
    }
}

impl Sandbox {
    /// Handles one envelope (or the restart deadline passing); false when
    /// the sandbox is to stop.
    fn take(&mut self, envelope: Result<Envelope, flume::RecvTimeoutError>) -> bool {
        // Controls sent through `Inbox::control` count in flight until
        // here (`Wake` is sent bare: it is only a nudge).
        if let Ok(Envelope::Control(control)) = &envelope
            && !matches!(control, Control::Wake)
        {
            self.in_flight.fetch_sub(1, Ordering::Release);
        }
        match envelope {
            Ok(Envelope::Deliver { instance, message, receipt }) => {
                self.queued_bytes.give_back(message.size());
                self.media.taken(&message);
                // Stopping: dropped unhandled, and so is its receipt.
                if !self.stopping.load(Ordering::Acquire) {
                    self.deliver(instance, message, receipt);
                }
                self.in_flight.fetch_sub(1, Ordering::Release);
            }
            Ok(Envelope::Control(Control::Remove { instance })) => self.remove(instance),
            Ok(Envelope::Control(Control::Stage { instance, hyperty, limits, reply })) => {
                let _ = reply.send(self.stage(instance, hyperty, &limits));
            }
            Ok(Envelope::Control(Control::Commit { instance })) => self.commit(instance),
            Ok(Envelope::Control(Control::Configure { settings })) => {
                self.call_ticks = ticks(&settings.limits);
                self.settings = *settings;
            }
            Ok(Envelope::Control(Control::Abort { instance })) => {
                if let Some(Some(slot)) = self.slots.get_mut(instance as usize) {
                    slot.staged = None;
                }
            }
            Ok(Envelope::Control(Control::Wake)) | Err(flume::RecvTimeoutError::Timeout) => {}
            Ok(Envelope::Control(Control::Stop)) | Err(flume::RecvTimeoutError::Disconnected) => return false,
        }
        if !self.restarts.is_empty() && !self.stopping.load(Ordering::Acquire) {
            self.restart_due();
        }
        true
    }

    /// A fresh store of this domain with `hyperty` instantiated in it,
    /// under `limits` (the domain's, or a live update's new ones).
    fn start(&self, hyperty: &NewHyperty, limits: &Limits) -> Result<Running> {
        start(&self.shared, &self.memory, &self.media, hyperty, limits)
    }

    /// Builds and initialises the new version of `instance` beside it.
    fn stage(&mut self, instance: u32, hyperty: NewHyperty, limits: &Limits) -> Result<()> {
        if self.slots.get(instance as usize).and_then(Option::as_ref).is_none() {
            return Err(anyhow!("no such instance"));
        }
        let mut running = self.start(&hyperty, limits)?;
        arm(&mut running.store, ticks(limits), limits);
        let address = hyperty.address.to_string();
        match running.bindings.rethink_hyperty_handler().call_init(&mut running.store, &address, &hyperty.config) {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(anyhow!("init refused: {}", log_line(&reason))),
            Err(trap) => return Err(anyhow!("init trapped: {}", explain(&trap, &running.store, limits))),
        }
        let slot = self.slots[instance as usize].as_mut().expect("checked above");
        slot.staged = Some((hyperty, running));
        Ok(())
    }

    /// The staged version of `instance` takes its slot, live.
    fn commit(&mut self, instance: u32) {
        let Some(Some(slot)) = self.slots.get_mut(instance as usize) else { return };
        let Some((hyperty, mut running)) = slot.staged.take() else { return };
        // The count goes on across versions (a Prometheus counter).
        running.store.data_mut().sent += slot.stats.sent.load(Ordering::Relaxed);
        observe(&slot.stats, &running);
        let backlog = match std::mem::replace(&mut slot.status, Status::Live) {
            Status::Instantiated { backlog, .. } => backlog,
            _ => Vec::new(),
        };
        slot.set_status(Status::Live);
        slot.hyperty = hyperty;
        slot.running = Some(running);
        slot.failures = 0;
        self.restarts.retain(|&i| i != instance);
        for (message, receipt) in backlog {
            self.deliver(instance, message, receipt);
        }
    }

    /// Drops `instance` (its store, its memory) and forgets it.
    fn remove(&mut self, instance: u32) {
        if let Some(slot) = self.slots.get_mut(instance as usize)
            && let Some(removed) = slot.take()
        {
            self.counted.instances.dec();
            self.shared.metrics.forget_hyperty(removed.hyperty.address.as_str());
        }
        self.restarts.retain(|&i| i != instance);
    }

    /// Adds `running` (a fresh instance of `hyperty`) to the domain, under
    /// its `instances` limit; its `init` is yet to be called.
    fn adopt(&mut self, hyperty: NewHyperty, running: Running) -> Result<u32> {
        let live = self.slots.iter().flatten().count();
        let max = self.settings.limits.instances as usize;
        if live >= max {
            return Err(anyhow!("the domain already holds {live} instances (instances = {max})"));
        }
        let id = self.slots.len() as u32;
        let stats = self.shared.metrics.hyperty(hyperty.address.as_str(), &hyperty.label);
        stats.status.store(HypertyStats::STARTING, Ordering::Relaxed);
        observe(&stats, &running);
        self.slots.push(Some(Slot {
            hyperty,
            running: Some(running),
            status: Status::Instantiated { backlog: Vec::new(), bytes: 0 },
            failures: 0,
            staged: None,
            stats,
        }));
        self.counted.instances.inc();
        Ok(id)
    }

    /// Calls `init` on a fresh instance; for a deployment, the error is the
    /// deployment's.
    fn init(&mut self, instance: u32) -> Result<()> {
        let limits = &self.settings.limits;
        let slot = self.slots.get_mut(instance as usize).and_then(Option::as_mut).ok_or_else(|| anyhow!("no such instance"))?;
        let running = slot.running.as_mut().ok_or_else(|| anyhow!("not running"))?;
        arm(&mut running.store, self.call_ticks, limits);
        let address = slot.hyperty.address.to_string();
        let result = running.bindings.rethink_hyperty_handler().call_init(&mut running.store, &address, &slot.hyperty.config);
        let error = match result {
            Ok(Ok(())) => {
                observe(&slot.stats, running);
                slot.stats.status.store(HypertyStats::LIVE, Ordering::Relaxed);
                if let Status::Instantiated { backlog, .. } = std::mem::replace(&mut slot.status, Status::Live) {
                    for (message, receipt) in backlog {
                        self.deliver(instance, message, receipt);
                    }
                }
                return Ok(());
            }
            Ok(Err(reason)) => anyhow!("init refused: {}", log_line(&reason)),
            Err(trap) => anyhow!("init trapped: {}", explain(&trap, &running.store, limits)),
        };
        slot.running = None;
        // What waited for the init is answered, not dropped.
        if let Status::Instantiated { backlog, .. } = std::mem::replace(&mut slot.status, Status::Stopped) {
            // The guest's part of `error` is cut to a log line's length.
            let reason = format!("{error:#}");
            for (message, receipt) in backlog {
                let _answered = OnReturn(receipt);
                let why = format!("{} failed to start: {reason}", message.to);
                self.shared.bus.answer_taken(&message, code::UNAVAILABLE, why);
            }
        }
        slot.set_status(Status::Stopped);
        Err(error)
    }

    /// Hands `message` to `instance` (or answers it in its place); its
    /// `receipt` fires on the way out, unless it waits in the backlog.
    fn deliver(&mut self, instance: u32, message: Message, receipt: Option<Receipt>) {
        let mut receipt = OnReturn(receipt);
        let Some(slot) = self.slots.get_mut(instance as usize).and_then(Option::as_mut) else {
            let why = format!("{} has been removed", message.to);
            self.shared.bus.answer_taken(&message, code::NOT_FOUND, why);
            return;
        };
        let limits = &self.settings.limits;
        let running = match (&mut slot.status, slot.running.as_mut()) {
            (Status::Instantiated { backlog, bytes }, _)
                if backlog.len() < limits.inbox && (backlog.is_empty() || *bytes + message.size() <= limits.inbox_bytes) =>
            {
                *bytes += message.size();
                return backlog.push((message, receipt.kept()));
            }
            // A durable envelope (one with a receipt) is not answered but
            // dropped unhandled: its node offers it again, for when the
            // hyperty is back (a restart, or its init done).
            (Status::Instantiated { .. } | Status::Restarting { .. }, _) if receipt.0.is_some() => {
                drop(receipt.kept());
                return;
            }
            (Status::Instantiated { backlog, .. }, _) => {
                // Bounded like the inbox it came from: a deployment's
                // instances wait for `init` with at most `inbox` messages
                // and `inbox-bytes` of them each.
                let (max, held) = (limits.inbox, backlog.len());
                let why = if held >= max {
                    format!("{} is starting and already holds {max} messages for after its init (inbox = {max}); try again later", message.to)
                } else {
                    let bytes = limits.inbox_bytes;
                    format!("{} is starting and already holds {held} messages for after its init, up to its inbox-bytes ({bytes}); try again later", message.to)
                };
                self.shared.bus.answer_taken(&message, code::UNAVAILABLE, why);
                return;
            }
            (Status::Live, Some(running)) => running,
            (Status::Restarting { .. }, _) | (Status::Live, None) => {
                let why = format!("{} is restarting after a failure; try again later", message.to);
                self.shared.bus.answer_taken(&message, code::UNAVAILABLE, why);
                return;
            }
            (Status::Stopped, _) => {
                let why = format!("{} has stopped after a failure", message.to);
                self.shared.bus.answer_taken(&message, code::UNAVAILABLE, why);
                return;
            }
        };
        arm(&mut running.store, self.call_ticks, &self.settings.limits);
        let kind = message.kind;
        let handled = running.bindings.rethink_hyperty_handler().call_handle(&mut running.store, glue::message_param(&message));
        slot.stats.received.fetch_add(1, Ordering::Relaxed);
        observe(&slot.stats, running);
        match handled {
            Ok(()) => slot.failures = 0,
            Err(trap) => {
                let reason = explain(&trap, &running.store, &self.settings.limits);
                // Status, event and restart first, so whoever gets the
                // answer below sees them.
                self.failed(instance, reason.clone());
                if kind != MessageType::Response {
                    // The message that made it trap gets an answer, not silence.
                    let mut answer = Message::response(message.id, message.to, message.from, code::INTERNAL_ERROR);
                    answer.body.description = Some(format!("{} failed while handling this message: {reason}", answer.from).into());
                    self.shared.bus.deliver_final_answer(answer);
                }
            }
        }
    }

    /// After a trap: drop the instance (its store and memory go with it),
    /// report, and schedule the restart or stop for good.
    fn failed(&mut self, instance: u32, reason: String) {
        let policy = self.settings.restart.clone();
        let slot = self.slots[instance as usize].as_mut().expect("a failing instance exists");
        slot.running = None;
        slot.failures += 1;
        let h = &slot.hyperty;
        tracing::error!(hyperty = %h.label, "trapped: {reason}");
        self.shared.events.emit(&h.label, &h.address, EventKind::Trapped { reason: reason.clone() });
        self.shared.registry.set_status(&h.address, RegistryStatus::Failed);
        match policy.backoff(slot.failures) {
            Some(delay) => {
                tracing::info!(hyperty = %h.label, "restarting in {} ms (failure {})", delay.as_millis(), slot.failures);
                slot.set_status(Status::Restarting { at: Instant::now() + delay });
                self.restarts.push(instance);
            }
            None => {
                tracing::warn!(hyperty = %h.label, "stopped (restart policy: stop); unregistered");
                self.shared.registry.unregister(&h.descriptor.domain, &h.descriptor.name);
                self.shared.events.emit(&h.label, &h.address, EventKind::Stopped { reason });
                slot.set_status(Status::Stopped);
            }
        }
    }

    fn next_restart(&self) -> Option<Instant> {
        self.restarts
            .iter()
            .filter_map(|&i| match self.slots[i as usize].as_ref()?.status {
                Status::Restarting { at } => Some(at),
                _ => None,
            })
            .min()
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .restarts
            .iter()
            .copied()
            .filter(|&i| matches!(self.slots[i as usize].as_ref().map(|s| &s.status), Some(Status::Restarting { at }) if *at <= now))
            .collect();
        self.restarts.retain(|i| !due.contains(i));
        for instance in due {
            let slot = self.slots[instance as usize].as_ref().expect("restarting instance exists");
            match self.start(&slot.hyperty, &self.settings.limits) {
                Ok(mut running) => {
                    let slot = self.slots[instance as usize].as_mut().expect("exists");
                    // The count goes on across restarts (a Prometheus counter).
                    running.store.data_mut().sent = slot.stats.sent.load(Ordering::Relaxed);
                    slot.running = Some(running);
                    slot.set_status(Status::Instantiated { backlog: Vec::new(), bytes: 0 });
                    match self.init(instance) {
                        Ok(()) => {
                            let slot = self.slots[instance as usize].as_ref().expect("exists");
                            let h = &slot.hyperty;
                            tracing::info!(hyperty = %h.label, "restarted at {}", h.address);
                            self.counted.restarts.inc();
                            self.shared.registry.set_status(&h.address, RegistryStatus::Live);
                            self.shared.events.emit(&h.label, &h.address, EventKind::Restarted { failures: slot.failures });
                        }
                        Err(e) => self.failed(instance, format!("{e:#}")),
                    }
                }
                Err(e) => self.failed(instance, format!("{e:#}")),
            }
        }
    }
}

/// Mean time to instantiate `pre` into a fresh store, as a (re)start does,
/// over `n` runs (for benchmarks).
pub(crate) fn time_instantiation(shared: &Shared, pre: &HypertyPre<InstanceState>, n: u32) -> Result<std::time::Duration> {
    let sandbox = Sandbox {
        domain: "bench.example".into(),
        settings: SandboxSettings { limits: Limits::default(), restart: RestartPolicy::default(), grants: Vec::new(), media: None },
        media: Arc::new(crate::media::DomainMedia::new("bench.example", None, Arc::default(), 0, shared.policies.clone(), shared.identities.clone())),
        shared: shared.clone(),
        memory: Arc::default(),
        slots: Vec::new(),
        restarts: Vec::new(),
        call_ticks: 100,
        in_flight: Arc::default(),
        queued_bytes: Arc::default(),
        stopping: Arc::default(),
        counted: shared.metrics.domain("bench.example"),
    };
    let hyperty = NewHyperty {
        pre: pre.clone(),
        address: Address::new_hyperty("bench.example").expect("a valid domain"),
        label: "bench.example/bench".into(),
        descriptor: Arc::default(),
        config: "{}".into(),
    };
    let mut total = std::time::Duration::ZERO;
    for _ in 0..n {
        let started = Instant::now();
        let running = sandbox.start(&hyperty, &sandbox.settings.limits)?;
        total += started.elapsed();
        drop(running);
    }
    Ok(total / n.max(1))
}

/// Why a call trapped, in words (the deadline, fuel, a stack overflow, a
/// panic, ...), without the wasm backtrace.
pub(crate) fn trap_reason(error: &wasmtime::Error, limits: &Limits) -> String {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => format!("ran past its call deadline (call-timeout-ms = {})", limits.call_timeout_ms),
        Some(wasmtime::Trap::OutOfFuel) => format!("ran out of fuel (fuel-per-call = {})", limits.fuel_per_call.unwrap_or(0)),
        Some(wasmtime::Trap::StackOverflow) => "stack overflow".to_owned(),
        Some(wasmtime::Trap::UnreachableCodeReached) => "panicked or reached unreachable code".to_owned(),
        Some(other) => format!("trapped: {other}"),
        None => crate::engine::pool_exhausted(error).unwrap_or_else(|| format!("{error:#}")),
    }
}

/// A call's deadline under `limits`, in epoch ticks.
fn ticks(limits: &Limits) -> u64 {
    crate::engine::ticks(std::time::Duration::from_millis(limits.call_timeout_ms))
}

/// Sets the deadline and the fuel budget for the next call into `store`.
fn arm(store: &mut Store<InstanceState>, call_ticks: u64, limits: &Limits) {
    handoff::call_starts(call_ticks);
    timers::arm(store, call_ticks, limits.fuel_per_call);
}

/// Why a call trapped, in words: the deadline, fuel, a refused memory or
/// table growth, a stack overflow, or the guest's own trap.
fn explain(error: &wasmtime::Error, store: &Store<InstanceState>, limits: &Limits) -> String {
    let what = trap_reason(error, limits);
    match &store.data().limiter.refused_growth {
        Some(limit) => format!("{what}; {limit}"),
        None => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inbox of `capacity` envelopes and `max_bytes`, with no sandbox
    /// behind it (`fast`: it may be lent to), and its receiving end.
    fn inbox(capacity: usize, max_bytes: usize, fast: bool) -> (Inbox, flume::Receiver<Envelope>) {
        let (tx, rx) = flume::bounded(capacity);
        let domain = Arc::new(Domain { state: Mutex::new(None), fast: AtomicBool::new(fast) });
        (Inbox { tx, in_flight: Arc::default(), queued_bytes: Arc::default(), max_bytes, domain }, rx)
    }

    /// A message of ~10 KB numbered `id`.
    fn big(id: u64) -> Message {
        let value = format!("\"{}\"", "x".repeat(10_000));
        Message::builder(id, MessageType::Update, "hyperty://a.example/x", "hyperty://b.example/y").value(value).build().unwrap()
    }

    /// A live update's `Commit` waits in the inbox like a message: a
    /// sender finding the domain "idle" (in flight 0) would run its
    /// message on the old version, past the `Commit` ([`Inbox::deliver`]
    /// lends only from 0).
    #[test]
    fn a_queued_control_counts_in_flight_so_no_later_message_is_lent_past_it() {
        let (inbox, rx) = inbox(4, usize::MAX, true);
        inbox.control(Control::Commit { instance: 0 }).unwrap();
        assert_eq!(inbox.in_flight(), 1, "the queued Commit counts: the domain is not idle");
        let message = Message::builder(1, MessageType::Update, "hyperty://a.example/x", "hyperty://b.example/y").build().unwrap();
        inbox.deliver(0, message, None).map_err(|_| "refused").unwrap();
        assert_eq!(inbox.in_flight(), 2);
        assert!(matches!(rx.try_recv(), Ok(Envelope::Control(Control::Commit { instance: 0 }))));
        assert!(matches!(rx.try_recv(), Ok(Envelope::Deliver { instance: 0, .. })));
        // A bare `Wake` is only a nudge: it never counts.
        inbox.tx.try_send(Envelope::Control(Control::Wake)).unwrap();
        assert_eq!(inbox.in_flight(), 2);
    }

    /// What waits behind a `Stop` is dropped with its bytes and count
    /// given back: a sender still holding the inbox then meets a closed
    /// inbox (503), not a full one, and nothing stays held.
    #[test]
    fn what_is_queued_after_a_stop_is_dropped_and_given_back() {
        let (inbox, rx) = inbox(8, 2 * big(0).size(), false);
        inbox.control(Control::Stop).unwrap();
        inbox.deliver(0, big(1), None).map_err(|_| "refused").unwrap();
        inbox.deliver(0, big(2), None).map_err(|_| "refused").unwrap();
        inbox.control(Control::Remove { instance: 0 }).unwrap();
        assert!(matches!(inbox.deliver(0, big(3), None), Err(Refused::Full(_))), "the inbox's bytes are taken");
        // The sandbox's thread takes the Stop, then empties what is left.
        assert!(matches!(rx.recv(), Ok(Envelope::Control(Control::Stop))));
        inbox.in_flight.fetch_sub(1, Ordering::Release); // as `Sandbox::take` does
        drop_queued(&rx, &inbox.queued_bytes, &inbox.in_flight);
        assert_eq!(inbox.in_flight(), 0);
        assert!(rx.is_empty());
        drop(rx);
        assert!(matches!(inbox.deliver(0, big(4), None), Err(Refused::Closed(_))), "closed, not full");
        assert_eq!(inbox.in_flight(), 0);
    }

    /// A delivery that slipped in between the drain and the receiver's
    /// drop stays counted, but later senders still meet a closed inbox.
    #[test]
    fn a_closed_inbox_is_closed_whatever_bytes_it_still_counts() {
        let (inbox, rx) = inbox(8, big(0).size() + 10, false);
        inbox.deliver(0, big(1), None).map_err(|_| "refused").unwrap();
        drop(rx);
        assert!(matches!(inbox.deliver(0, big(2), None), Err(Refused::Closed(_))), "closed, not full");
        assert_eq!(inbox.in_flight(), 1, "only the one that slipped in");
    }
}
