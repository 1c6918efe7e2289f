//! The runtime user agent: loads bundles, verifies and deploys their
//! components into domain sandboxes, and gives embedders endpoints on the
//! bus.
//!
//! Deployment is all or nothing. Every hyperty of a bundle is checked first
//! (file, sha256 pin, component, fit to the world); only then are sandboxes
//! started and instances created, and if any instance fails to start, the
//! ones this deployment created are removed again. What was running before
//! is never touched.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use wasmtime::component::Linker;

use crate::address::Address;
use crate::bundle::{Bundle, BundleError, DomainSpec, HypertySpec, Location, Problem, ProtostubSpec};
use crate::bus::{Bus, BusConfig};
use crate::contract;
use crate::domain_registry::DomainRegistry;
use crate::engine::{Digest, Engine, EngineKind, PoolLimits};
use crate::policy::cedar::CedarPolicies;
use crate::policy::{Decision, Descriptor, PolicyDecisionPoint};
use crate::registry::{Kind, Query, Registration, Registry, Status};
use crate::identity::{self, DomainIdentity, Identities, Proxy, ProxyPre};
use crate::protostub::{self, Stub, StubContext, StubPre, StubSettings};
use crate::sandbox::limits::{Grant, Limits, default_grants};
use crate::signing;
use crate::store::Store;
use crate::syncher::Syncher;
use crate::events::{EventReceiver, Events};
use crate::metrics::{Metrics, Read};
use crate::metrics::serve::MetricsServer;
pub use crate::endpoint::{Acting, ENDPOINT_NAME, Endpoint, EndpointError};
use crate::sandbox::{self, HypertyPre, InstanceState, NewHyperty, SandboxHandle, Shared};

/// Settings of a [`Runtime`].
#[derive(Clone)]
pub struct RuntimeConfig {
    /// Where compiled components are cached.
    pub cache_dir: PathBuf,
    /// Where the runtime keeps what must survive a restart (its address,
    /// kept hyperty addresses); `None`: nothing is kept.
    pub data_dir: Option<PathBuf>,
    /// The runtime's own domain, whose policies guard bus access.
    pub domain: String,
    /// How long a request waits for its response before the host answers 408.
    pub request_timeout: Duration,
    /// The largest message the bus accepts, in bytes of addresses and body.
    pub max_message_bytes: usize,
    /// How often registrations are refreshed toward the remote registries.
    pub registry_keep_alive: Duration,
    /// Provider domains whose registry (`domain://registry.<domain>`) this
    /// runtime serves (see [`crate::domain_registry`]).
    pub serve_registries: Vec<String>,
    /// How long a served registry keeps a registration without a
    /// keep-alive (reTHINK's expiry); by default three keep-alive intervals.
    pub registry_expiry: Option<Duration>,
    /// The Cedar policies asked at the three enforcement points: the
    /// runtime's bus-access set, each domain's set (attached by its bundle)
    /// and the user groups.
    pub policies: Arc<CedarPolicies>,
    /// A decision point used instead of the Cedar policies, for embedders
    /// with an engine of their own.
    pub custom_policy: Option<Arc<dyn PolicyDecisionPoint>>,
    /// Component instances (hyperties, protostubs, IdP proxies) the runtime
    /// holds at once: the size of wasmtime's instance pool, reserved at
    /// start (see [`crate::engine::PoolLimits`]). Each reserves 4 GiB of
    /// address space; an idle hyperty is about 40 KiB resident. An
    /// instantiation past it is refused, naming this limit.
    pub max_instances: u32,
    /// How components are executed: Cranelift's machine code (the default)
    /// or Pulley's interpreter, for hosts without JIT (see
    /// [`crate::EngineKind`]).
    pub engine: EngineKind,
}

impl Default for RuntimeConfig {
    fn default() -> RuntimeConfig {
        RuntimeConfig {
            cache_dir: default_cache_dir(),
            data_dir: None,
            domain: "localhost".into(),
            request_timeout: Duration::from_secs(5),
            max_message_bytes: 1 << 20,
            registry_keep_alive: Duration::from_secs(60),
            serve_registries: Vec::new(),
            registry_expiry: None,
            policies: Arc::new(CedarPolicies::new()),
            custom_policy: None,
            max_instances: crate::engine::DEFAULT_MAX_INSTANCES,
            engine: EngineKind::default(),
        }
    }
}

/// `$HYPERTY_CACHE_DIR`, else `$XDG_CACHE_HOME/hyperty`, else
/// `$HOME/.cache/hyperty`, else a directory under the system temp dir.
pub fn default_cache_dir() -> PathBuf {
    user_dir("HYPERTY_CACHE_DIR", "XDG_CACHE_HOME", ".cache", "hyperty-cache")
}

/// `$HYPERTY_DATA_DIR`, else `$XDG_DATA_HOME/hyperty`, else
/// `$HOME/.local/share/hyperty`, else a directory under the system temp dir.
pub fn default_data_dir() -> PathBuf {
    user_dir("HYPERTY_DATA_DIR", "XDG_DATA_HOME", ".local/share", "hyperty-data")
}

/// `$own`, else `$xdg/hyperty`, else `$HOME/<home>/hyperty`, else
/// `<temp>/<temp_name>` (XDG base directory conventions).
fn user_dir(own: &str, xdg: &str, home: &str, temp_name: &str) -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env(own)
        .or_else(|| env(xdg).map(|d| d.join("hyperty")))
        .or_else(|| env("HOME").map(|d| d.join(home).join("hyperty")))
        .unwrap_or_else(|| std::env::temp_dir().join(temp_name))
}

#[path = "update.rs"]
mod update;
pub use update::{Action, Applied, BundleWatch, Change};

/// A hyperty deployed by this runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeployedHyperty {
    pub domain: String,
    pub name: String,
    pub address: Address,
}

struct Running {
    hyperty: DeployedHyperty,
    instance: u32,
}

#[derive(Default)]
struct Deployed {
    sandboxes: BTreeMap<String, SandboxHandle>,
    hyperties: Vec<Running>,
    /// The entries of what runs, as deployed or last applied.
    specs: update::Specs,
}

/// The hyperty runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<InstanceState>,
    bus: Bus,
    registry: Arc<Registry>,
    identities: Arc<Identities>,
    events: Events,
    policies: Arc<CedarPolicies>,
    store: Option<Arc<Store>>,
    syncher: Arc<Syncher>,
    /// What the bus and the sandboxes count (see [`crate::metrics`]).
    metrics: Arc<Metrics>,
    /// `runtime://<domain>/<id>`, kept across restarts with a data directory.
    address: Address,
    /// Held for the whole of a deployment, so deployments do not interleave.
    deployed: Mutex<Deployed>,
}

/// Everything of a bundle that passed every check.
struct Plan {
    hyperties: Vec<Prepared>,
    /// IdP proxies, by index in the bundle's `idps`.
    idps: Vec<(usize, ProxyPre)>,
    /// Protostubs, by index in the bundle's `protostubs`.
    stubs: Vec<(usize, StubPre)>,
}

fn domain_identity(domain: &DomainSpec) -> DomainIdentity {
    DomainIdentity { idp: domain.idp.clone(), require: domain.require_identity }
}

/// The registry name of a domain's protostub (its registry key is
/// (domain, this)).
const PROTOSTUB_NAME: &str = "protostub";

/// The registry address of the proxy of IdP `name`.
fn idp_address(name: &str) -> Address {
    Address::parse(format!("domain://idp.{name}")).expect("an IdP name is a domain name")
}

/// A hyperty that passed every check, ready to instantiate.
struct Prepared {
    domain: usize,
    hyperty: usize,
    pre: HypertyPre<InstanceState>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Runtime> {
        let engine = Engine::new(&config.cache_dir, config.engine, PoolLimits { instances: config.max_instances })?;
        let linker = sandbox::hyperty_linker(engine.wasmtime())?;
        let store = config.data_dir.as_deref().map(Store::open).transpose()?.map(Arc::new);
        let new_runtime_address = || format!("runtime://{}/{}", config.domain, uuid::Uuid::new_v4());
        let address = match &store {
            Some(store) => store.address(&format!("runtime/{}", config.domain), new_runtime_address)?,
            None => new_runtime_address(),
        };
        let address = Address::parse(address).map_err(anyhow::Error::msg)?;
        let policies = config.policies.clone();
        let identities = Arc::new(Identities::default());
        let metrics = Arc::new(Metrics::new());
        metrics.add_domain(&config.domain);
        let bus = Bus::new(
            BusConfig {
                runtime_domain: config.domain,
                request_timeout: config.request_timeout,
                max_message_bytes: config.max_message_bytes,
            },
            config.custom_policy.unwrap_or_else(|| config.policies.clone()),
            identities.clone(),
            metrics.clone(),
        );
        let registry = Arc::new(Registry::default());
        if !config.serve_registries.is_empty() {
            let served = Arc::new(DomainRegistry::default());
            let expiry = config.registry_expiry.unwrap_or(config.registry_keep_alive * 3);
            served.serve(&bus, &config.serve_registries, expiry)?;
            registry.include(served);
        }
        registry.announce(bus.clone(), address.clone(), config.registry_keep_alive);
        let syncher = Syncher::new(bus.clone(), registry.clone(), store.clone())?;
        Ok(Runtime {
            engine,
            linker,
            bus,
            registry,
            identities,
            events: Events::default(),
            policies,
            store,
            syncher,
            metrics,
            address,
            deployed: Mutex::default(),
        })
    }

    /// Checks everything about `bundle` that deployment would, without
    /// running anything: component files, sha256 pins, that each file is a
    /// component fitting the `hyperty` world, and clashes with what runs.
    pub fn check(&self, bundle: &Bundle) -> Result<(), BundleError> {
        let deployed = self.deployed.lock().unwrap();
        self.prepare(bundle, &deployed).map(drop)
    }

    fn prepare(&self, bundle: &Bundle, deployed: &Deployed) -> Result<Plan, BundleError> {
        let mut problems = Vec::new();
        let mut prepared = Vec::new();
        let mut files = HashMap::new();
        let mut idps = Vec::new();
        for (i, idp) in bundle.idps.iter().enumerate() {
            if self.identities.has_proxy(&idp.name) {
                problems.push(bundle.problem(&idp.at, "component", format!("the IdP proxy of {} already runs", idp.name)));
                continue;
            }
            let pre = self.load(&mut files, bundle, &idp.at, &idp.component, idp.sha256, &default_grants(), identity::prepare);
            match pre {
                Ok(pre) => idps.push((i, pre)),
                Err(problem) => problems.push(problem),
            }
        }
        let mut stubs = Vec::new();
        for (i, spec) in bundle.protostubs.iter().enumerate() {
            if self.bus.carries(&spec.domain) {
                problems.push(bundle.problem(&spec.at, "component", format!("a protostub for {} already runs", spec.domain)));
                continue;
            }
            match self.prepare_stub(&mut files, bundle, spec) {
                Ok(pre) => stubs.push((i, pre)),
                Err(problem) => problems.push(problem),
            }
        }
        for (d, domain) in bundle.domains.iter().enumerate() {
            problems.extend(self.check_domain(bundle, domain, &|idp| self.identities.has_proxy(idp)));
            let running = self.identities.domain(&domain.name);
            if deployed.sandboxes.contains_key(&domain.name) && running != domain_identity(domain) {
                problems.push(Problem {
                    file: bundle.path.clone(),
                    line: None,
                    field: format!("domains.{:?}.idp", domain.name),
                    message: format!(
                        "{} already runs with IdP {:?} and require-identity = {}",
                        domain.name, running.idp, running.require
                    ),
                });
            }
            if let Some(running) = deployed.sandboxes.get(&domain.name)
                && running.settings != domain.settings
            {
                problems.push(Problem {
                    file: bundle.path.clone(),
                    line: None,
                    field: format!("domains.{:?}", domain.name),
                    message: format!(
                        "{} already runs with other limits, restart policy or grants ({:?})",
                        domain.name, running.settings
                    ),
                });
            }
            if !domain.policies.is_empty() {
                let current = self.policies.domain_policies(&domain.name);
                if deployed.sandboxes.contains_key(&domain.name) && current != domain.policies {
                    problems.push(Problem {
                        file: bundle.path.clone(),
                        line: None,
                        field: format!("domains.{:?}.policies", domain.name),
                        message: format!("{} already runs with other policies ({current:?})", domain.name),
                    });
                }
            }
            // A component fitted once per domain (its grants and limits),
            // however many of its entries use it.
            let mut fitted: HashMap<Digest, HypertyPre<InstanceState>> = HashMap::new();
            for (h, hyperty) in domain.hyperties.iter().enumerate() {
                if self.registry.lookup(&domain.name, &hyperty.name).is_some() {
                    let message = format!("{}/{} is already deployed", domain.name, hyperty.name);
                    problems.push(bundle.problem(&hyperty.at, "name", message));
                    continue;
                }
                match self.prepare_hyperty(&mut files, &mut fitted, bundle, domain, hyperty) {
                    Ok(pre) => prepared.push(Prepared { domain: d, hyperty: h, pre }),
                    Err(problem) => problems.push(problem),
                }
            }
        }
        if problems.is_empty() { Ok(Plan { hyperties: prepared, idps, stubs }) } else { Err(BundleError { problems }) }
    }

    /// What `check` asks of a domain entry itself, whether it runs or not:
    /// its IdP has a proxy (in the bundle, or one for which `has_proxy`),
    /// its policy files parse.
    fn check_domain(&self, bundle: &Bundle, domain: &DomainSpec, has_proxy: &dyn Fn(&str) -> bool) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Some(idp) = &domain.idp
            && !bundle.idps.iter().any(|i| &i.name == idp)
            && !has_proxy(idp)
        {
            problems.push(Problem {
                file: bundle.path.clone(),
                line: None,
                field: format!("domains.{:?}.idp", domain.name),
                message: format!("no IdP proxy for {idp}: add [idps.{idp:?}] to the bundle"),
            });
        }
        if !domain.policies.is_empty()
            && let Err(e) = self.policies.check_files(&domain.policies)
        {
            problems.extend(e.problems);
        }
        problems
    }

    /// Checks hyperty entry `hyperty` of `domain` (file, pin, signature if
    /// the domain trusts keys, contract, grants, fit to the world and to
    /// the domain's limits); `fitted` keeps what a domain's entries share.
    fn prepare_hyperty(
        &self,
        files: &mut HashMap<PathBuf, (Vec<u8>, Digest)>,
        fitted: &mut HashMap<Digest, HypertyPre<InstanceState>>,
        bundle: &Bundle,
        domain: &DomainSpec,
        hyperty: &HypertySpec,
    ) -> Result<HypertyPre<InstanceState>, Problem> {
        let (bytes, digest) = pinned(files, bundle, &hyperty.at, &hyperty.component, hyperty.sha256)?;
        if !domain.trusted_keys.is_empty() {
            std::fs::read_to_string(&hyperty.signature)
                .map_err(|e| format!("signature missing: cannot read {}: {e}", hyperty.signature.display()))
                .and_then(|sig| signing::verify(&sig, digest, &domain.trusted_keys))
                .map_err(|e| bundle.problem(&hyperty.at, "signature", format!("{} is refused: {e}", hyperty.component.display())))?;
        }
        if let Some(pre) = fitted.get(&digest) {
            return Ok(pre.clone());
        }
        let pre = self.compile(bundle, &hyperty.at, &hyperty.component, (bytes, digest), &domain.settings.grants, |_, c| {
            fits_limits(c, &domain.settings.limits)?;
            sandbox::prepare(&self.linker, c)
        })?;
        fitted.insert(digest, pre.clone());
        Ok(pre)
    }

    /// Checks protostub entry `spec`: file, pin, fit to its world, and its
    /// configuration (init, no network), so a bad one is found here rather
    /// than in a restart loop later.
    fn prepare_stub(&self, files: &mut HashMap<PathBuf, (Vec<u8>, Digest)>, bundle: &Bundle, spec: &ProtostubSpec) -> Result<StubPre, Problem> {
        // The network comes with the world, limited to the entry's
        // endpoints; nothing else beyond clocks and randomness.
        let grants = [Grant::Clocks, Grant::Random, Grant::Sockets];
        if spec.durable && self.store.is_none() {
            let why = format!("protostub {}: durable delivery keeps its queue in the data directory, and this runtime has none (RuntimeConfig::data_dir, hyperty run --data-dir)", spec.domain);
            return Err(bundle.problem(&spec.at, "durable", why));
        }
        let pre = self.load(files, bundle, &spec.at, &spec.component, spec.sha256, &grants, protostub::prepare)?;
        protostub::check_config(&spec.domain, &self.stub_context(spec, pre.clone()))
            .map_err(|e| bundle.problem(&spec.at, "config", format!("protostub {}: {e}", spec.domain)))?;
        Ok(pre)
    }

    /// Reads the component of the entry at `at` and checks its pin, then
    /// [`Self::compile`]s it.
    #[allow(clippy::too_many_arguments)]
    fn load<T>(
        &self,
        files: &mut HashMap<PathBuf, (Vec<u8>, Digest)>,
        bundle: &Bundle,
        at: &Location,
        path: &std::path::Path,
        sha256: Digest,
        grants: &[Grant],
        fit: fn(&wasmtime::Engine, &wasmtime::component::Component) -> Result<T>,
    ) -> Result<T, Problem> {
        let file = pinned(files, bundle, at, path, sha256)?;
        self.compile(bundle, at, path, file, grants, fit)
    }

    /// Compiles a pinned component (or takes it from the cache), checks the
    /// contract version it was built against ([`contract`]), its WASI
    /// imports against `grants`, and fits it to its world with `fit`; a
    /// problem names the entry at `at`.
    fn compile<T>(
        &self,
        bundle: &Bundle,
        at: &Location,
        path: &std::path::Path,
        (bytes, digest): (&[u8], Digest),
        grants: &[Grant],
        fit: impl FnOnce(&wasmtime::Engine, &wasmtime::component::Component) -> Result<T>,
    ) -> Result<T, Problem> {
        self.engine
            .component(bytes, digest)
            .and_then(|component| {
                let engine = self.engine.wasmtime();
                contract::check(engine, &component)?;
                sandbox::check_grants(engine, &component, grants)?;
                fit(engine, &component).map_err(|e| contract::explain(engine, &component, e))
            })
            .map_err(|e| bundle.problem(at, "component", format!("{} is refused: {e:#}", path.display())))
    }

    /// Starts (and initialises) the bundle's IdP proxies and binds its
    /// domains to their IdPs; `started` collects what to undo.
    fn start_idps(&self, bundle: &Bundle, idps: Vec<(usize, ProxyPre)>, started: &mut Vec<String>) -> Result<(), Problem> {
        for (i, pre) in idps {
            let spec = &bundle.idps[i];
            let proxy = Proxy::start(&spec.name, pre, spec.config.clone(), self.engine.epoch().clone())
                .map_err(|e| bundle.problem(&spec.at, "component", format!("IdP proxy {}: {e:#}", spec.name)))?;
            if !self.identities.add_proxy(&spec.name, proxy) {
                return Err(bundle.problem(&spec.at, "component", format!("the IdP proxy of {} already runs", spec.name)));
            }
            started.push(spec.name.clone());
            self.registry.register(Registration {
                address: idp_address(&spec.name),
                kind: Kind::IdpProxy,
                name: spec.name.clone(),
                domain: spec.name.clone(),
                user: None,
                hyperty_types: Vec::new(),
                schemes: Vec::new(),
                status: Status::Live,
            });
            tracing::info!("IdP proxy of {} started ({})", spec.name, spec.component.file_name().unwrap_or_default().to_string_lossy());
        }
        for domain in &bundle.domains {
            self.identities.set_domain(&domain.name, domain_identity(domain));
        }
        Ok(())
    }

    /// Adds the bundle's protostubs to the bus (each starts when first
    /// needed, or now if preloaded or listening for hyperties here).
    fn start_stubs(&self, bundle: &Bundle, stubs: Vec<(usize, StubPre)>, started: &mut Vec<Arc<Stub>>) -> Result<(), Problem> {
        for (i, pre) in stubs {
            let spec = &bundle.protostubs[i];
            let context = self.stub_context(spec, pre);
            let durable = match (&self.store, spec.durable) {
                (Some(store), true) => Some(protostub::Durable { store: store.clone(), id: protostub::durable_id(&self.address, &spec.domain) }),
                _ => None,
            };
            let stub = Stub::new(&spec.domain, spec.queue, durable, Box::new(move |stub| protostub::spawn(stub, context)))
                .map_err(|e| bundle.problem(&spec.at, "durable", format!("protostub {}: {e}", spec.domain)))?;
            let (counted, weak) = (self.metrics.add_domain(&spec.domain), Arc::downgrade(&stub));
            self.metrics.read_at_scrape(&counted, Read::StubQueue, move || weak.upgrade().map(|s| s.queued()));
            let weak = Arc::downgrade(&stub);
            self.metrics.read_at_scrape(&counted, Read::StubUp, move || weak.upgrade().map(|s| usize::from(s.is_live())));
            let weak = Arc::downgrade(&stub);
            self.metrics.read_stub_status(&spec.domain, move || weak.upgrade().map(|s| s.status_name()));
            self.registry.register(Registration {
                address: stub.address.clone(),
                kind: Kind::Protostub,
                name: PROTOSTUB_NAME.into(),
                domain: spec.domain.clone(),
                user: None,
                hyperty_types: Vec::new(),
                schemes: Vec::new(),
                status: Status::Created,
            });
            self.bus.add_carrier(stub.carrier());
            self.bus.add_route(stub.address.clone(), stub.status_route());
            started.push(stub.clone());
            if spec.preload || spec.durable || bundle.domains.iter().any(|d| d.name == spec.domain) {
                stub.ensure_started();
            }
        }
        Ok(())
    }

    fn stub_context(&self, spec: &ProtostubSpec, pre: StubPre) -> StubContext {
        StubContext {
            engine: self.engine.wasmtime().clone(),
            epoch: self.engine.epoch().clone(),
            pre,
            settings: StubSettings {
                config: if spec.durable { protostub::durable_config(&spec.config, &protostub::durable_id(&self.address, &spec.domain)) } else { spec.config.clone() },
                endpoints: spec.endpoints.clone(),
            },
            bus: self.bus.clone(),
            registry: self.registry.clone(),
            events: self.events.clone(),
        }
    }

    fn stop_stub(&self, domain: &str) {
        self.remove_stub(domain);
        self.registry.unregister(domain, PROTOSTUB_NAME);
    }

    /// Takes the protostub of `domain` off the bus (its domain and its
    /// status address), and stops it.
    fn remove_stub(&self, domain: &str) {
        self.bus.remove_carrier(domain);
        self.bus.remove_route(&protostub::stub_address(domain));
    }

    fn stop_idp(&self, name: &str) {
        self.identities.remove_proxy(name);
        self.registry.unregister(name, name);
    }

    /// Deploys every hyperty of `bundle`, or none of them.
    pub fn deploy(&self, bundle: &Bundle) -> Result<Vec<DeployedHyperty>, BundleError> {
        let mut deployed = self.deployed.lock().unwrap();
        let plan = self.prepare(bundle, &deployed)?;
        self.start_plan(bundle, plan, &mut deployed)
    }

    /// Starts what passed every check (IdP proxies, protostubs, hyperties
    /// in their sandboxes), or nothing: on the first failure what it
    /// started is stopped again.
    fn start_plan(&self, bundle: &Bundle, plan: Plan, deployed: &mut Deployed) -> Result<Vec<DeployedHyperty>, BundleError> {
        let mut new_domains = Vec::new();
        let mut started: Vec<Running> = Vec::new();
        let mut started_idps = Vec::new();
        let mut started_stubs = Vec::new();
        let result = self
            .start_idps(bundle, plan.idps, &mut started_idps)
            .and_then(|()| {
                self.start_stubs(bundle, plan.stubs, &mut started_stubs)?;
                self.start_all(bundle, plan.hyperties, deployed, &mut new_domains, &mut started)
            });
        match result {
            Ok(()) => {
                let hyperties = started.iter().map(|r| r.hyperty.clone()).collect();
                deployed.hyperties.extend(started);
                deployed.specs.record(bundle, started_stubs);
                Ok(hyperties)
            }
            Err(problem) => {
                for running in &started {
                    self.stop(deployed, running);
                }
                for idp in &started_idps {
                    self.stop_idp(idp);
                }
                for stub in &started_stubs {
                    self.stop_stub(&stub.domain);
                }
                for domain in bundle.domains.iter().filter(|d| !deployed.sandboxes.contains_key(&d.name) || new_domains.contains(&d.name)) {
                    self.identities.remove_domain(&domain.name);
                }
                for domain in new_domains {
                    deployed.sandboxes.remove(&domain);
                    let _ = self.policies.set_domain_policies(&domain, &[]);
                }
                tracing::error!("deployment of bundle {} refused: {problem}", bundle.name);
                Err(BundleError { problems: vec![problem] })
            }
        }
    }

    /// Instantiates every prepared hyperty, routes them all, then calls each
    /// one's `init` (so a hyperty may message any other of the bundle from
    /// its `init`).
    fn start_all(
        &self,
        bundle: &Bundle,
        prepared: Vec<Prepared>,
        deployed: &mut Deployed,
        new_domains: &mut Vec<String>,
        started: &mut Vec<Running>,
    ) -> Result<(), Problem> {
        // The bundle's domain policies apply before anything of it runs, and
        // are asked whether each hyperty may be deployed.
        for domain in bundle.domains.iter().filter(|d| !d.policies.is_empty()) {
            self.policies.set_domain_policies(&domain.name, &domain.policies).map_err(|e| Problem {
                file: bundle.path.clone(),
                line: None,
                field: format!("domains.{:?}.policies", domain.name),
                message: e.to_string(),
            })?;
        }
        // Checked, addressed and described in bundle order, then grouped by
        // domain: each domain's stores are instantiated together
        // (`SandboxHandle::instantiate_all`, on several threads).
        let mut groups: Vec<(usize, Vec<(usize, NewHyperty)>)> = Vec::new();
        for p in prepared {
            let domain = &bundle.domains[p.domain];
            let spec = &domain.hyperties[p.hyperty];
            if !deployed.sandboxes.contains_key(&domain.name) {
                let handle = SandboxHandle::spawn(&domain.name, domain.settings.clone(), self.shared())
                .map_err(|e| bundle.problem(&spec.at, "component", format!("{e:#}")))?;
                deployed.sandboxes.insert(domain.name.clone(), handle);
                new_domains.push(domain.name.clone());
            }
            let address = self.hyperty_address(&domain.name, spec).map_err(|e| bundle.problem(&spec.at, spec.address_field(), format!("{e:#}")))?;
            let label: Arc<str> = format!("{}/{}", domain.name, spec.name).into();
            let descriptor = Arc::new(Descriptor {
                domain: domain.name.clone(),
                name: spec.name.clone(),
                user: spec.user.clone(),
            });
            if let Decision::Deny { policies, reason } = self.policies.authorize_deploy(&domain.name, &address, &descriptor) {
                let message = format!("{label}: {reason} by the policies of {} [{}]", domain.name, policies.join(", "));
                return Err(bundle.problem(&spec.at, "name", message));
            }
            let new = NewHyperty {
                pre: p.pre,
                address,
                label,
                descriptor,
                config: spec.config.clone(),
            };
            match groups.last_mut() {
                Some((d, group)) if *d == p.domain => group.push((p.hyperty, new)),
                _ => groups.push((p.domain, vec![(p.hyperty, new)])),
            }
        }
        // Where each of `started` is in the bundle (domain, hyperty).
        let mut entries = Vec::with_capacity(groups.iter().map(|(_, g)| g.len()).sum());
        for (d, group) in groups {
            let domain = &bundle.domains[d];
            let sandbox = &deployed.sandboxes[&domain.name];
            let (indices, news): (Vec<usize>, Vec<NewHyperty>) = group.into_iter().unzip();
            let addressed: Vec<(Address, Arc<Descriptor>)> = news.iter().map(|n| (n.address.clone(), n.descriptor.clone())).collect();
            let instances = sandbox.instantiate_all(news).map_err(|(at, e)| {
                bundle.problem(&domain.hyperties[indices[at]].at, "component", format!("{e:#}"))
            })?;
            let mut adopted = indices.iter().zip(addressed).zip(instances.iter().copied());
            while let Some(((&i, (address, descriptor)), instance)) = adopted.next() {
                let spec = &domain.hyperties[i];
                let hyperty = DeployedHyperty { domain: domain.name.clone(), name: spec.name.clone(), address };
                if !self.bus.add_route(hyperty.address.clone(), sandbox.inbox().route(instance, descriptor)) {
                    sandbox.remove(instance);
                    for (_, rest) in adopted {
                        sandbox.remove(rest);
                    }
                    return Err(bundle.problem(&spec.at, spec.address_field(), format!("{} is taken: something in this runtime is at that address", hyperty.address)));
                }
                self.registry.register(Registration {
                    address: hyperty.address.clone(),
                    kind: Kind::Hyperty,
                    name: hyperty.name.clone(),
                    domain: hyperty.domain.clone(),
                    user: spec.user.clone(),
                    hyperty_types: spec.types.clone(),
                    schemes: spec.schemes.clone(),
                    status: Status::Created,
                });
                tracing::info!(
                    "deployed {}/{} at {} ({})",
                    hyperty.domain,
                    hyperty.name,
                    hyperty.address,
                    spec.component.file_name().unwrap_or_default().to_string_lossy()
                );
                started.push(Running { hyperty, instance });
                entries.push((d, i));
            }
        }
        for (running, &(d, i)) in started.iter().zip(&entries) {
            let h = &running.hyperty;
            let spec = &bundle.domains[d].hyperties[i];
            deployed.sandboxes[&h.domain]
                .init(running.instance)
                .map_err(|e| bundle.problem(&spec.at, "component", format!("{}/{}: {e:#}", h.domain, h.name)))?;
            self.registry.set_status(&h.address, Status::Live);
        }
        Ok(())
    }

    fn stop(&self, deployed: &Deployed, running: &Running) {
        let h = &running.hyperty;
        self.bus.remove_route(&h.address);
        self.registry.unregister(&h.domain, &h.name);
        if let Some(sandbox) = deployed.sandboxes.get(&h.domain) {
            sandbox.remove(running.instance);
        }
    }

    /// The hyperties deployed now.
    pub fn hyperties(&self) -> Vec<DeployedHyperty> {
        self.deployed.lock().unwrap().hyperties.iter().map(|r| r.hyperty.clone()).collect()
    }

    /// The runtime's own address, `runtime://<domain>/<id>` (the same after
    /// a restart when the runtime has a data directory).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// How this runtime executes components ([`RuntimeConfig::engine`]).
    pub fn engine(&self) -> EngineKind {
        self.engine.kind()
    }

    /// A fresh address for `spec`, or the one it had before if it asks to
    /// keep it (and there is a data directory to keep it in).
    fn hyperty_address(&self, domain: &str, spec: &HypertySpec) -> Result<Address> {
        if let Some(address) = &spec.address {
            anyhow::ensure!(!self.bus.is_routed(address), "{address} is taken: something in this runtime is at that address");
            return Ok(address.clone());
        }
        let fresh = Address::new_hyperty(domain).map_err(anyhow::Error::msg)?;
        match (&self.store, spec.keep_address) {
            (Some(store), true) => {
                let text = store.address(&format!("hyperty/{domain}/{}", spec.name), || fresh.into())?;
                Address::parse(text).map_err(anyhow::Error::msg)
            }
            _ => Ok(fresh),
        }
    }

    /// The registrations matching `query` (discovery).
    pub fn discover(&self, query: &Query) -> Vec<Registration> {
        self.registry.discover(query)
    }

    /// Stops hyperty `name` of `domain` and forgets it (route, registration,
    /// instance); false if it is not deployed.
    pub fn undeploy(&self, domain: &str, name: &str) -> bool {
        let mut deployed = self.deployed.lock().unwrap();
        let Some(i) = deployed.hyperties.iter().position(|r| r.hyperty.domain == domain && r.hyperty.name == name) else {
            return false;
        };
        let running = deployed.hyperties.remove(i);
        self.stop(&deployed, &running);
        deployed.specs.forget(domain, name);
        tracing::info!("undeployed {domain}/{name} from {}", running.hyperty.address);
        true
    }

    /// The address of hyperty `name` of `domain`.
    pub fn lookup(&self, domain: &str, name: &str) -> Option<Address> {
        self.registry.lookup(domain, name)
    }

    /// Opens an endpoint on the bus at `address`, for the embedding
    /// application to exchange messages with hyperties. It holds up to
    /// `capacity` undelivered messages. Which addresses it may take: see
    /// [`crate::endpoint`] (`hyperty://` or `app://` with a path); others
    /// are refused
    /// ([`EndpointError::Address`]), and so is an address in use
    /// ([`EndpointError::InUse`]).
    pub fn endpoint(&self, address: &str, capacity: usize) -> Result<Endpoint, EndpointError> {
        Endpoint::open(&self.bus, crate::endpoint::check_address(address)?, capacity, None)
    }

    /// [`Runtime::endpoint`], bound to who it acts for: its messages carry
    /// that user's identity (in its domain) or an assertion of the user
    /// made by the domain's IdP proxy (to other domains), and policies see
    /// it as a hyperty of its domain named [`ENDPOINT_NAME`] acting for
    /// the user. An [`Acting::Assertion`] is validated first by the proxy
    /// of the IdP the endpoint's domain trusts; refused, it is
    /// [`EndpointError::Identity`] with the proxy's reason.
    pub fn endpoint_as(&self, address: &str, capacity: usize, acting: Acting) -> Result<Endpoint, EndpointError> {
        let address = crate::endpoint::check_address(address)?;
        let domain = address.domain().to_owned();
        let user = match acting {
            Acting::User(user) if user.is_empty() || user.chars().any(char::is_control) => {
                return Err(EndpointError::Identity(format!("{user:?} is not a user name")));
            }
            Acting::User(user) => user,
            Acting::Assertion(assertion) => crate::endpoint::user_of(&self.identities, &domain, &assertion).map_err(EndpointError::Identity)?,
        };
        let descriptor = Descriptor { domain, name: ENDPOINT_NAME.into(), user: Some(user) };
        Endpoint::open(&self.bus, address, capacity, Some(descriptor))
    }

    /// Opens an endpoint at any well-formed address, however it is used
    /// by the runtime (a domain's registry, a runtime's address): for tests
    /// that play another party.
    #[doc(hidden)]
    pub fn endpoint_unchecked(&self, address: &str, capacity: usize) -> Result<Endpoint, EndpointError> {
        let address = Address::parse(address).map_err(EndpointError::Address)?;
        Endpoint::open(&self.bus, address, capacity, None)
    }

    /// Serves the WebSocket app gateway on `addr` (see [`crate::gateway`]):
    /// browser apps log in and exchange messages with hyperties through it
    /// until the returned [`Gateway`](crate::gateway::Gateway) is dropped.
    /// Errors: the address cannot be bound, or `config` is invalid.
    pub fn serve_gateway(&self, addr: std::net::SocketAddr, config: crate::gateway::GatewayConfig) -> Result<crate::gateway::Gateway> {
        let gateway = crate::gateway::Gateway::serve(addr, config, self.bus.clone(), self.identities.clone(), self.policies.clone(), self.registry.clone())?;
        self.metrics.read_gateway_connections(gateway.connections_reader());
        Ok(gateway)
    }

    /// Serves the runtime's metrics on `addr` (`GET /metrics`, OpenMetrics
    /// text; see [`crate::metrics`]) and its status (`GET /status`, JSON;
    /// see [`crate::metrics::status`]) until the returned server is dropped.
    /// Loopback is meant (a warning is logged otherwise). Errors: `addr`
    /// cannot be bound.
    pub fn serve_metrics(&self, addr: std::net::SocketAddr) -> Result<MetricsServer> {
        let bus = self.bus.downgrade();
        let refresh = Box::new(move |metrics: &Metrics| {
            if let Some(bus) = bus.upgrade() {
                metrics.set_pending(bus.pending_requests());
            }
        });
        MetricsServer::serve(addr, self.metrics.clone(), refresh, self.address.to_string())
    }

    /// The runtime's metrics, in the OpenMetrics text format (what
    /// [`Runtime::serve_metrics`] serves).
    pub fn metrics_text(&self) -> String {
        self.metrics.set_pending(self.bus.pending_requests());
        self.metrics.encode()
    }

    /// Requests still waiting for their response (or 408).
    pub fn pending_requests(&self) -> usize {
        self.bus.pending_requests()
    }

    /// True when no message is queued or being handled in any sandbox, no
    /// request is pending and no hyperty holds a WebRTC peer connection
    /// (its events may come at any time).
    pub fn is_idle(&self) -> bool {
        let deployed = self.deployed.lock().unwrap();
        self.bus.pending_requests() == 0 && deployed.sandboxes.values().all(|s| s.inbox().in_flight() == 0 && s.peer_connections() == 0)
    }

    /// Waits until [`is_idle`](Self::is_idle) or `timeout`; true if idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let until = Instant::now().checked_add(timeout);
        loop {
            if self.is_idle() {
                return true;
            }
            if until.is_some_and(|until| Instant::now() >= until) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Mean time to instantiate the component at `path` into a fresh store
    /// from its `InstancePre` (for `just bench`).
    #[doc(hidden)]
    pub fn bench_instantiation(&self, path: &std::path::Path, n: u32) -> Result<Duration> {
        let bytes = std::fs::read(path)?;
        let component = self.engine.component(&bytes, Digest::of(&bytes))?;
        let pre = sandbox::prepare(&self.linker, &component)?;
        sandbox::time_instantiation(&self.shared(), &pre, n)
    }

    fn shared(&self) -> Shared {
        Shared {
            engine: self.engine.wasmtime().clone(),
            bus: self.bus.clone(),
            registry: self.registry.clone(),
            events: self.events.clone(),
            syncher: self.syncher.clone(),
            policies: self.policies.clone(),
            identities: self.identities.clone(),
            metrics: self.metrics.clone(),
            epoch: self.engine.epoch().clone(),
        }
    }

    /// The Cedar policies in force: group memberships and reloads go
    /// through them.
    pub fn policies(&self) -> &Arc<CedarPolicies> {
        &self.policies
    }

    /// Subscribes to status events (traps, restarts, stops, rate limits,
    /// refusals, protostub statuses) from now on.
    pub fn events(&self) -> EventReceiver {
        self.events.subscribe()
    }

    /// Memory charged to `domain`, in bytes: its instances' linear memories
    /// and its data objects (what `total-memory-mb` bounds).
    pub fn memory_used(&self, domain: &str) -> Option<usize> {
        self.deployed.lock().unwrap().sandboxes.get(domain).map(SandboxHandle::memory_used)
    }

    /// Stops every hyperty and sandbox. Pending requests are forgotten
    /// first, answered by nobody: however many there are, stopping does
    /// not wait on them (nor send a 408 each).
    pub fn shutdown(&self) {
        self.bus.forget_pending();
        let sandboxes = {
            let mut deployed = self.deployed.lock().unwrap();
            for running in std::mem::take(&mut deployed.hyperties) {
                self.stop(&deployed, &running);
            }
            deployed.specs = update::Specs::default();
            std::mem::take(&mut deployed.sandboxes)
        };
        // Stopped outside the lock: a sandbox waits for its call in hand,
        // and its media thread for TURN releases (seconds at worst).
        drop(sandboxes);
        for domain in self.bus.carried_domains() {
            self.remove_stub(&domain);
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Refuses a component whose memories or tables start larger than its
/// domain's `limits` let any instance be (its instantiation would fail): a
/// memory's minimum above `memory-mb` or `total-memory-mb`, a table's above
/// `table-elements`. Read from the component's types, without running it;
/// a component that imports core modules says nothing and passes.
fn fits_limits(component: &wasmtime::component::Component, limits: &Limits) -> Result<()> {
    let Some(needs) = component.resources_required() else { return Ok(()) };
    const WASM_PAGE: u64 = 64 << 10;
    if let Some(pages) = needs.max_initial_memory_size {
        let mib = pages.saturating_mul(WASM_PAGE).div_ceil(1 << 20);
        for (limit, name) in [(limits.memory_mb, "memory-mb"), (limits.total_memory_mb, "total-memory-mb")] {
            if mib > u64::from(limit) {
                anyhow::bail!("its linear memory starts at {mib} MiB, more than the domain's {name} = {limit}");
            }
        }
    }
    if let Some(elements) = needs.max_initial_table_size
        && elements > u64::from(limits.table_elements)
    {
        anyhow::bail!("a table starts with {elements} elements, more than the domain's table-elements = {}", limits.table_elements);
    }
    Ok(())
}

/// The bytes and digest of the component file at `path` of the entry at
/// `at`, if it matches its pin; read and hashed once per deployment however
/// many entries of the bundle use it.
fn pinned<'a>(
    files: &'a mut HashMap<PathBuf, (Vec<u8>, Digest)>,
    bundle: &Bundle,
    at: &Location,
    path: &std::path::Path,
    pin: Digest,
) -> Result<(&'a [u8], Digest), Problem> {
    if !files.contains_key(path) {
        let bytes = bundle
            .read_component(path)
            .map_err(|e| bundle.problem(at, "component", format!("cannot read {}: {e}", path.display())))?;
        let digest = Digest::of(&bytes);
        files.insert(path.to_owned(), (bytes, digest));
    }
    let (bytes, digest) = &files[path];
    if *digest != pin {
        let message =
            format!("{} does not match its pin: the bundle pins {pin} but the file's sha256 is {digest}", path.display());
        return Err(bundle.problem(at, "sha256", message));
    }
    Ok((bytes, *digest))
}

/// Reads the bundle at `path` and checks it with a throwaway runtime, of
/// the bundle's engine if it names one.
pub fn check_file(path: &std::path::Path, config: RuntimeConfig) -> Result<Bundle, BundleError> {
    let bundle = Bundle::load(path)?;
    let config = RuntimeConfig { engine: bundle.engine.unwrap_or(config.engine), ..config };
    let runtime = Runtime::new(config).map_err(|e| BundleError {
        problems: vec![Problem { file: path.to_owned(), line: None, field: String::new(), message: format!("{e:#}") }],
    })?;
    runtime.check(&bundle)?;
    Ok(bundle)
}
