//! The wasmtime engine and the on-disk cache of compiled components.
//!
//! Engine settings are chosen for the sync call path: no
//! `component-model-async` (it costs 2-3x per call), the pooling allocator
//! (instantiation ~6 us instead of ~12-15 us), epoch interruption for
//! per-call deadlines and fuel for optional deterministic budgets (stores
//! without a budget get `u64::MAX`). Components are compiled once and
//! cached on disk ([`crate::cache`]) and in memory.
//!
//! Two kinds of engine ([`EngineKind`]), chosen per runtime: Cranelift
//! compiles components to the host's machine code (the default), Pulley
//! compiles them to the bytecode of wasmtime's portable interpreter, for
//! platforms that forbid run-time code generation (iOS) or have no Cranelift
//! backend (32-bit ARM). Deadlines, fuel, memory limits and traps hold the
//! same on both; see ARCHITECTURE.md, "Engine", for what Pulley costs.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use sha2::{Digest as _, Sha256};

use crate::cache::DiskCache;
use wasmtime::component::Component;

/// How components are executed: the one setting of the engine a runtime
/// chooses ([`crate::RuntimeConfig::engine`], `hyperty run --engine`, a
/// bundle's `engine`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// Compiled by Cranelift to the host's machine code (a JIT: needs
    /// executable memory at run time).
    #[default]
    Cranelift,
    /// Compiled by Cranelift to Pulley bytecode and run by wasmtime's
    /// interpreter: no executable memory, any host wasmtime builds for;
    /// several times slower per instruction.
    Pulley,
}

impl EngineKind {
    /// Both kinds, Cranelift first.
    pub const ALL: [EngineKind; 2] = [EngineKind::Cranelift, EngineKind::Pulley];

    /// Its name as the command line and bundles spell it.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Cranelift => "cranelift",
            EngineKind::Pulley => "pulley",
        }
    }

    /// The compilation target wasmtime is given: the host's for Cranelift,
    /// the Pulley flavour of the host's pointer width and byte order for
    /// Pulley (wasmtime refuses any other).
    fn target(self) -> Option<&'static str> {
        match self {
            EngineKind::Cranelift => None,
            EngineKind::Pulley if cfg!(all(target_pointer_width = "64", target_endian = "little")) => Some("pulley64"),
            EngineKind::Pulley if cfg!(target_pointer_width = "64") => Some("pulley64be"),
            EngineKind::Pulley if cfg!(target_endian = "little") => Some("pulley32"),
            EngineKind::Pulley => Some("pulley32be"),
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;

    /// `cranelift` or `pulley`; anything else is refused, naming both.
    fn from_str(text: &str) -> Result<EngineKind, String> {
        EngineKind::ALL
            .into_iter()
            .find(|k| k.name() == text)
            .ok_or_else(|| format!("{text:?} is not an engine: expected \"cranelift\" or \"pulley\""))
    }
}

/// How often the epoch advances: the granularity of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Epoch ticks in `deadline` (at least one).
pub(crate) fn ticks(deadline: Duration) -> u64 {
    (deadline.as_millis().div_ceil(EPOCH_TICK.as_millis()) as u64).max(1)
}

/// Sets the deadline (in epoch ticks) and the fuel budget (`None`: no
/// budget) of the next call into `store`; every kind of guest store is
/// armed this way before each call, through `sandbox::timers::arm`, which
/// also moves the deadline its timers end at.
pub(crate) fn arm<T>(store: &mut wasmtime::Store<T>, deadline_ticks: u64, fuel: Option<u64>) {
    store.set_epoch_deadline(deadline_ticks);
    store.set_fuel(fuel.unwrap_or(u64::MAX)).expect("the engine consumes fuel");
}

/// Largest linear memory any instance may have; domains set lower limits.
pub const MAX_MEMORY_BYTES: usize = 1 << 30;

/// Component instances a runtime holds at once unless configured otherwise
/// ([`crate::RuntimeConfig::max_instances`]).
pub const DEFAULT_MAX_INSTANCES: u32 = 1000;

/// Core instances one component may create (a Rust guest has 3, a
/// componentize-js one 11). Pool slots for them are a counter, not memory.
pub const CORE_INSTANCES_PER_COMPONENT: u32 = 16;

/// Linear memories one component may define (a Rust guest has 1, a
/// componentize-js one 3). The pool holds one memory per component
/// instance: each reserves 4 GiB + 32 MiB of address space (no RSS until
/// touched), so a runtime of `n` instances reserves about `4 n` GiB of the
/// 128 TiB a Linux x86-64 process has.
pub const MEMORIES_PER_COMPONENT: u32 = 4;

/// Tables one component may define (a Rust guest has 2, a componentize-js
/// one 3); the pool holds two per component instance.
pub const TABLES_PER_COMPONENT: u32 = 4;

/// The sizes of wasmtime's instance pool, all derived from one limit: how
/// many component instances (hyperties, protostubs, IdP proxies, and those a
/// restart or a protostub's config check creates for a moment) the runtime
/// holds at once. Pool slots are reserved when the runtime starts, so this
/// is a limit: an instantiation past it is refused with
/// [`pool_exhausted`]'s explanation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// Component instances at once (`total_component_instances`).
    pub instances: u32,
}

impl PoolLimits {
    fn config(self) -> wasmtime::PoolingAllocationConfig {
        let n = self.instances.max(1);
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
            .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
            .total_memories(n)
            .max_memories_per_component(MEMORIES_PER_COMPONENT)
            .total_tables(n.saturating_mul(2))
            .max_tables_per_component(TABLES_PER_COMPONENT)
            .max_memory_size(MAX_MEMORY_BYTES);
        pool
    }
}

/// If `error` is wasmtime's "pool exhausted", says which limit was reached
/// and how to raise it (`RuntimeConfig::max_instances`, `hyperty run
/// --max-instances`); `None` for any other error.
pub(crate) fn pool_exhausted(error: &wasmtime::Error) -> Option<String> {
    let pool = error.chain().find_map(|e| e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>())?;
    Some(format!(
        "the runtime's instance pool is full ({pool}): it holds max-instances component instances at once; \
         raise RuntimeConfig::max_instances (hyperty run --max-instances)"
    ))
}

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn parse(hex_text: &str) -> Result<Digest, String> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut out)
            .map_err(|_| format!("{hex_text:?} is not a sha256 digest (64 hex digits)"))?;
        Ok(Digest(out))
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{self}")
    }
}

/// The engine, its epoch ticker and the component cache.
pub struct Engine {
    engine: wasmtime::Engine,
    kind: EngineKind,
    cache: Option<DiskCache>,
    /// Key of the engine settings, part of every cache file name: the
    /// kind's name and wasmtime's compatibility hash (`pulley-0123…`), so
    /// one kind never loads another's artifacts.
    engine_key: String,
    loaded: Mutex<HashMap<Digest, Component>>,
    ticker_stop: Arc<AtomicBool>,
    epoch: Epoch,
}

/// An engine's epoch as the host reads it: the ticks its ticker has made
/// (wasmtime's own count cannot be read). It is advanced just after
/// wasmtime's, so it is never ahead of it: once it reaches a store's
/// deadline, a call into that store is past its deadline too.
#[derive(Clone, Debug, Default)]
pub(crate) struct Epoch(Arc<AtomicU64>);

impl Epoch {
    /// Ticks made so far.
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn tick(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

impl Engine {
    /// Creates an engine of `kind` with an instance pool of `pool`'s size;
    /// compiled components are cached under `cache_dir`.
    pub fn new(cache_dir: &Path, kind: EngineKind, pool: PoolLimits) -> Result<Engine> {
        let mut config = wasmtime::Config::new();
        if let Some(target) = kind.target() {
            config.target(target).map_err(|e| anyhow::anyhow!("cannot target {target}: {e:#}"))?;
        }
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(true)
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool.config()));
        let engine = wasmtime::Engine::new(&config).map_err(|e| anyhow::anyhow!("cannot create the {kind} engine: {e:#}"))?;

        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_key = format!("{kind}-{:016x}", h.finish());

        let cache = DiskCache::open(cache_dir);

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let epoch = Epoch::default();
        let (ticking, stop, counting) = (engine.clone(), ticker_stop.clone(), epoch.clone());
        std::thread::Builder::new().name("hyperty-epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                ticking.increment_epoch();
                counting.tick();
            }
        })?;

        Ok(Engine { engine, kind, cache, engine_key, loaded: Mutex::default(), ticker_stop, epoch })
    }

    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// The epoch this engine's deadlines count in, as the host reads it.
    pub(crate) fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// How this engine executes components.
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// The component with these bytes (whose digest is `digest`): from
    /// memory, else from the disk cache, else compiled and cached.
    pub fn component(&self, bytes: &[u8], digest: Digest) -> Result<Component> {
        if let Some(c) = self.loaded.lock().unwrap().get(&digest) {
            return Ok(c.clone());
        }
        let component = match self.load_cached(digest) {
            Some(c) => c,
            None => self.compile(bytes, digest)?,
        };
        self.loaded.lock().unwrap().insert(digest, component.clone());
        Ok(component)
    }

    /// Loads a cached artifact that passes the cache's integrity check;
    /// anything else is a cache miss.
    fn load_cached(&self, digest: Digest) -> Option<Component> {
        let bytes = self.cache.as_ref()?.load(digest, &self.engine_key)?;
        // SAFETY: the bytes are exactly those this runtime serialised: their
        // MAC, keyed by a secret only this runtime's user can read, matches
        // (see `cache`), and the engine compatibility hash is in their name.
        match unsafe { Component::deserialize(&self.engine, &bytes) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(%digest, "cached artifact unusable ({e:#}); recompiling");
                None
            }
        }
    }

    fn compile(&self, bytes: &[u8], digest: Digest) -> Result<Component> {
        if !bytes.starts_with(b"\0asm") {
            bail!("not a WebAssembly file (no \\0asm header)");
        }
        if is_core_module(bytes) {
            bail!("a core WebAssembly module, not a component (build for wasm32-wasip2 or run `wasm-tools component new`)");
        }
        let started = std::time::Instant::now();
        let component = Component::new(&self.engine, bytes).map_err(|e| anyhow::anyhow!("not a valid component: {e:#}"))?;
        tracing::debug!(%digest, ms = started.elapsed().as_millis() as u64, "compiled component");
        if let Err(e) = self.store_cached(&component, digest) {
            tracing::warn!("cannot write the component cache: {e:#}");
        }
        Ok(component)
    }

    fn store_cached(&self, component: &Component, digest: Digest) -> Result<()> {
        let Some(cache) = &self.cache else { return Ok(()) };
        let artifact = component.serialize().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        cache.store(digest, &self.engine_key, &artifact)
    }
}

/// The 4-byte version field after the magic tells a core module (1) from a
/// component (0x0d layer 1).
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.get(4..8) == Some(&[1, 0, 0, 0])
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}
