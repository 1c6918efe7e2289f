//! What the runtime counts, for operators: Prometheus metrics (issue 20,
//! "Seeing inside"), kept with `prometheus-client` (the Prometheus
//! project's Rust client) and encoded in the OpenMetrics text format
//! (<https://prometheus.io/docs/specs/om/open_metrics_spec/>).
//!
//! One [`Metrics`] per runtime, shared (`Arc`) by the parts that count: the
//! bus (messages, host answers, policy denials, request durations) and the
//! sandboxes (instances, restarts). It sits below the bus: it imports only
//! `message`. [`serve`] (above the bus) serves it over HTTP.
//!
//! Cardinality is a limit: a label value is a domain the bundle names
//! ([`Metrics::add_domain`]) or [`OTHER_DOMAIN`], never a string a guest or
//! a remote node chose; codes are the host's own answers' codes and types
//! the nine reTHINK message types.
//!
//! | family | kind | labels |
//! |---|---|---|
//! | `hyperty_messages_total` | counter | `domain` (the sender's), `type` |
//! | `hyperty_answers_total` | counter | `domain` (the requester's), `code` |
//! | `hyperty_policy_denials_total` | counter | `point` (`outgoing`, `bus-access`, `incoming`) |
//! | `hyperty_instances` | gauge | `domain` |
//! | `hyperty_restarts_total` | counter | `domain` |
//! | `hyperty_handoffs_total` | counter | `domain` (the receiver's), `lender` (`domain`, `protostub`): deliveries run on the sender's thread (the hand-off) |
//! | `hyperty_memory_bytes` | gauge | `domain`: linear memory its instances hold (read at each scrape) |
//! | `hyperty_inbox_messages` | gauge | `domain`: messages queued or in hand in its sandbox (read at each scrape) |
//! | `hyperty_stub_queue_messages` | gauge | `domain` (remote): messages in its protostub's queue (read at each scrape) |
//! | `hyperty_stub_up` | gauge | `domain` (remote): 1 while its protostub is live (connected), else 0 (read at each scrape) |
//! | `hyperty_data_objects` | gauge | `domain`: data objects its hyperties report (read at each scrape) |
//! | `hyperty_data_object_subscribers` | gauge | `domain`: subscribers of those objects, summed (read at each scrape) |
//! | `hyperty_gateway_connections` | gauge | none: the app gateways' open connections (read at each scrape) |
//! | `hyperty_pending_requests` | gauge | none (read at each scrape) |
//! | `hyperty_request_duration_seconds` | histogram | none: request to final response (or 408) |

pub mod serve;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::message::MessageType;

/// The `domain` label of every domain the bundle does not name (remote
/// senders, embedders' endpoints of other domains).
pub const OTHER_DOMAIN: &str = "other";

/// The enforcement points' label values, in the bus's order.
const POINTS: [&str; 3] = ["outgoing", "bus-access", "incoming"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MessageLabels {
    domain: String,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    domain: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PointLabels {
    point: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandoffLabels {
    domain: String,
    lender: &'static str,
}

/// The `lender` label values of `hyperty_handoffs_total`, by index in
/// [`DomainMetrics::handoffs`].
const LENDERS: [&str; 2] = ["domain", "protostub"];

/// A domain's counter handles, resolved once when the domain is added, so
/// counting a message is a map lookup and an atomic add.
pub(crate) struct DomainMetrics {
    name: String,
    /// By [`MessageType`] (its index in [`MessageType::ALL`]).
    messages: [Counter; MessageType::ALL.len()],
    /// Live instances in the domain's sandbox.
    pub instances: Gauge,
    /// Instances restarted after a trap.
    pub restarts: Counter,
    /// Deliveries to it run on a sender's thread: a domain's (0), a
    /// protostub's (1).
    pub handoffs: [Counter; 2],
    memory: Gauge,
    inbox: Gauge,
    stub_queue: Gauge,
    stub_up: Gauge,
    data_objects: Gauge,
    subscribers: Gauge,
}

/// What `hyperty status` shows of one hyperty instance, kept by its
/// sandbox's thread (see [`Metrics::hyperty`]).
#[derive(Default)]
pub(crate) struct HypertyStats {
    /// `<domain>/<name>`.
    pub label: Mutex<String>,
    /// [`HypertyStats::STARTING`] ... [`HypertyStats::STOPPED`].
    pub status: AtomicU8,
    /// Messages handed to it.
    pub received: AtomicU64,
    /// Messages it sent that the bus took.
    pub sent: AtomicU64,
    /// Its linear memory, in bytes, after its last call.
    pub memory: AtomicUsize,
}

impl HypertyStats {
    pub const STARTING: u8 = 0;
    pub const LIVE: u8 = 1;
    pub const RESTARTING: u8 = 2;
    pub const STOPPED: u8 = 3;

    fn status_name(&self) -> &'static str {
        ["starting", "live", "restarting", "stopped"].get(usize::from(self.status.load(Ordering::Relaxed))).copied().unwrap_or("unknown")
    }
}

/// Reads a gauge's value at a scrape; `None` once what it reads is gone.
type Reader = Box<dyn Fn() -> Option<usize> + Send + Sync>;

/// What a domain's sandbox lets the scrape read.
pub(crate) enum Read {
    /// Linear memory held, in bytes.
    Memory,
    /// Messages queued or in hand.
    Inbox,
    /// Messages in a protostub's queue.
    StubQueue,
    /// 1 while a protostub is live, else 0.
    StubUp,
    /// Data objects reported by the domain's hyperties.
    DataObjects,
    /// Subscribers of those objects.
    Subscribers,
}

/// The runtime's metrics (see the module doc for the families).
pub struct Metrics {
    registry: Registry,
    answers: Family<AnswerLabels, Counter>,
    denials: [Counter; 3],
    pending: Gauge,
    gateway_connections: Gauge,
    durations: Histogram,
    families: Families,
    /// Gauges read at each scrape.
    readers: Mutex<Vec<(Gauge, Reader)>>,
    /// Domains that have labels of their own, by name.
    domains: RwLock<HashMap<String, Arc<DomainMetrics>>>,
    /// Bumped whenever a domain gets labels of its own (see [`Metrics::version`]).
    domains_version: AtomicU64,
    other: Arc<DomainMetrics>,
    /// Each hyperty instance's, by address (as many as instances run).
    hyperties: Mutex<BTreeMap<String, Arc<HypertyStats>>>,
    /// Each protostub's status (`live`, `disconnected`...), by remote
    /// domain, read when asked; `None` once the stub is gone.
    stubs: Mutex<BTreeMap<String, StubReader>>,
}

/// Reads a protostub's status name.
type StubReader = Box<dyn Fn() -> Option<String> + Send + Sync>;

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hyperty");
        let messages = Family::<MessageLabels, Counter>::default();
        let answers = Family::<AnswerLabels, Counter>::default();
        let denials_family = Family::<PointLabels, Counter>::default();
        let instances = Family::<DomainLabels, Gauge>::default();
        let restarts = Family::<DomainLabels, Counter>::default();
        let handoffs = Family::<HandoffLabels, Counter>::default();
        let memory = Family::<DomainLabels, Gauge>::default();
        let inbox = Family::<DomainLabels, Gauge>::default();
        let stub_queue = Family::<DomainLabels, Gauge>::default();
        let stub_up = Family::<DomainLabels, Gauge>::default();
        let data_objects = Family::<DomainLabels, Gauge>::default();
        let subscribers = Family::<DomainLabels, Gauge>::default();
        let pending = Gauge::default();
        let gateway_connections = Gauge::default();
        // 0.5 ms to about 16 s, doubling.
        let durations = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register("messages", "Messages accepted on the bus, by the sender's domain and type", messages.clone());
        registry.register("answers", "Answers the host made itself (403, 404, 408, 503...), by the requester's domain", answers.clone());
        registry.register("policy_denials", "Messages denied by the policies, by enforcement point", denials_family.clone());
        registry.register("instances", "Live hyperty instances, by domain", instances.clone());
        registry.register("restarts", "Hyperty instances restarted after a failure, by domain", restarts.clone());
        registry.register(
            "handoffs",
            "Deliveries run on the sender's thread (the hand-off), by the receiver's domain and the lending thread's kind",
            handoffs.clone(),
        );
        registry.register_with_unit("memory", "Linear memory held by a domain's instances", Unit::Bytes, memory.clone());
        registry.register("inbox_messages", "Messages queued or in hand in a domain's sandbox", inbox.clone());
        registry.register("stub_queue_messages", "Messages in the queue of a remote domain's protostub", stub_queue.clone());
        registry.register("stub_up", "1 while the protostub of a remote domain is live (connected to its node), else 0", stub_up.clone());
        registry.register("data_objects", "Data objects reported by a domain's hyperties", data_objects.clone());
        registry.register("data_object_subscribers", "Subscribers of the data objects a domain's hyperties report", subscribers.clone());
        registry.register("pending_requests", "Requests waiting for their final response", pending.clone());
        registry.register("gateway_connections", "Connections open to the app gateway", gateway_connections.clone());
        registry.register_with_unit(
            "request_duration",
            "Time from a request to its final response (or the host's 408)",
            Unit::Seconds,
            durations.clone(),
        );
        let denials = POINTS.map(|point| denials_family.get_or_create_owned(&PointLabels { point }));
        let families = Families { messages, instances, restarts, handoffs, memory, inbox, stub_queue, stub_up, data_objects, subscribers };
        let other = families.resolve(OTHER_DOMAIN);
        Metrics {
            registry,
            answers,
            denials,
            pending,
            gateway_connections,
            durations,
            families,
            readers: Mutex::default(),
            domains: RwLock::default(),
            domains_version: AtomicU64::new(0),
            other,
            hyperties: Mutex::default(),
            stubs: Mutex::default(),
        }
    }

    /// Gives `domain` (a domain the bundle names) labels of its own; its
    /// handles. Idempotent.
    pub(crate) fn add_domain(&self, domain: &str) -> Arc<DomainMetrics> {
        if let Some(d) = self.domains.read().unwrap().get(domain) {
            return d.clone();
        }
        let resolved = self.families.resolve(domain);
        let mut domains = self.domains.write().unwrap();
        let d = domains.entry(domain.to_owned()).or_insert_with(|| {
            self.domains_version.fetch_add(1, Ordering::Release);
            resolved
        });
        d.clone()
    }

    /// Changes whenever a domain gets labels of its own: a counter handle
    /// resolved (by [`Metrics::message_counter`]) under one version is the
    /// one to use while the version stays (the bus keeps them beside its
    /// routes).
    pub(crate) fn version(&self) -> u64 {
        self.domains_version.load(Ordering::Acquire)
    }

    /// The handles of `domain`, or of [`OTHER_DOMAIN`] if it was not added.
    pub(crate) fn domain(&self, domain: &str) -> Arc<DomainMetrics> {
        self.domains.read().unwrap().get(domain).cloned().unwrap_or_else(|| self.other.clone())
    }

    /// The counter of messages of `kind` sent by `domain` (see
    /// [`Metrics::domain`] for unknown domains).
    pub(crate) fn message_counter(&self, domain: &str, kind: MessageType) -> Counter {
        let index = kind as usize;
        match self.domains.read().unwrap().get(domain) {
            Some(d) => d.messages[index].clone(),
            None => self.other.messages[index].clone(),
        }
    }

    /// Counts an answer the host made with `code` to a requester of `domain`.
    pub(crate) fn host_answer(&self, domain: &str, code: u16) {
        let domain = self.domain(domain).name.clone();
        self.answers.get_or_create(&AnswerLabels { domain, code }).inc();
    }

    /// Counts a denial at enforcement point `index` (0 outgoing, 1 bus
    /// access, 2 incoming).
    pub(crate) fn policy_denial(&self, index: usize) {
        self.denials[index.min(2)].inc();
    }

    /// Records the time from a request to its final response.
    pub(crate) fn request_finished(&self, took: Duration) {
        self.durations.observe(took.as_secs_f64());
    }

    /// Sets the pending requests gauge (read at each scrape).
    pub(crate) fn set_pending(&self, pending: usize) {
        self.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Has `what` of `domain` read at each scrape by `read`, until it
    /// returns `None` (what it reads is gone, and counts no more).
    pub(crate) fn read_at_scrape(&self, domain: &DomainMetrics, what: Read, read: impl Fn() -> Option<usize> + Send + Sync + 'static) {
        let gauge = match what {
            Read::Memory => domain.memory.clone(),
            Read::Inbox => domain.inbox.clone(),
            Read::StubQueue => domain.stub_queue.clone(),
            Read::StubUp => domain.stub_up.clone(),
            Read::DataObjects => domain.data_objects.clone(),
            Read::Subscribers => domain.subscribers.clone(),
        };
        self.readers.lock().unwrap().push((gauge, Box::new(read)));
    }

    /// Has the gateway's open connections read at each scrape by `read`
    /// (added to those of other gateways) until it returns `None`.
    pub(crate) fn read_gateway_connections(&self, read: impl Fn() -> Option<usize> + Send + Sync + 'static) {
        self.readers.lock().unwrap().push((self.gateway_connections.clone(), Box::new(read)));
    }

    /// The stats of the hyperty instance at `address` (`label`:
    /// `<domain>/<name>`), kept until [`Metrics::forget_hyperty`]: a new
    /// version at the same address (a live update, a restart) counts on.
    pub(crate) fn hyperty(&self, address: &str, label: &str) -> Arc<HypertyStats> {
        let stats = self.hyperties.lock().unwrap().entry(address.to_owned()).or_default().clone();
        *stats.label.lock().unwrap() = label.to_owned();
        stats
    }

    /// Forgets the instance at `address` (removed).
    pub(crate) fn forget_hyperty(&self, address: &str) {
        self.hyperties.lock().unwrap().remove(address);
    }

    /// Has the status of the protostub of `domain` read by `read` when
    /// asked, until it returns `None`.
    pub(crate) fn read_stub_status(&self, domain: &str, read: impl Fn() -> Option<String> + Send + Sync + 'static) {
        self.stubs.lock().unwrap().insert(domain.to_owned(), Box::new(read));
    }

    /// Runs the readers of the gauges read at scrapes.
    fn refresh(&self) {
        // A gauge may have several readers (two gateways, a domain's
        // stopped and new sandbox): their values add up.
        let mut readers = self.readers.lock().unwrap();
        for (gauge, _) in readers.iter() {
            gauge.set(0);
        }
        readers.retain(|(gauge, read)| {
            let value = read();
            gauge.inc_by(value.map_or(0, |v| i64::try_from(v).unwrap_or(i64::MAX)));
            value.is_some()
        });
    }

    /// Every family in the OpenMetrics text format, ending `# EOF`; the
    /// gauges read at scrapes are read first.
    pub fn encode(&self) -> String {
        self.refresh();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// The families labelled by domain.
struct Families {
    messages: Family<MessageLabels, Counter>,
    instances: Family<DomainLabels, Gauge>,
    restarts: Family<DomainLabels, Counter>,
    handoffs: Family<HandoffLabels, Counter>,
    memory: Family<DomainLabels, Gauge>,
    inbox: Family<DomainLabels, Gauge>,
    stub_queue: Family<DomainLabels, Gauge>,
    stub_up: Family<DomainLabels, Gauge>,
    data_objects: Family<DomainLabels, Gauge>,
    subscribers: Family<DomainLabels, Gauge>,
}

impl Families {
    /// The handles of `domain` in each family.
    fn resolve(&self, domain: &str) -> Arc<DomainMetrics> {
        let label = DomainLabels { domain: domain.to_owned() };
        Arc::new(DomainMetrics {
            name: domain.to_owned(),
            messages: MessageType::ALL
                .map(|kind| self.messages.get_or_create_owned(&MessageLabels { domain: domain.to_owned(), r#type: kind.as_str() })),
            instances: self.instances.get_or_create_owned(&label),
            restarts: self.restarts.get_or_create_owned(&label),
            handoffs: LENDERS.map(|lender| self.handoffs.get_or_create_owned(&HandoffLabels { domain: domain.to_owned(), lender })),
            memory: self.memory.get_or_create_owned(&label),
            inbox: self.inbox.get_or_create_owned(&label),
            stub_queue: self.stub_queue.get_or_create_owned(&label),
            stub_up: self.stub_up.get_or_create_owned(&label),
            data_objects: self.data_objects.get_or_create_owned(&label),
            subscribers: self.subscribers.get_or_create_owned(&label),
        })
    }
}
