//! The wasmtime glue of the `idp-proxy` world: one IdP proxy component in
//! its own store, called from whichever thread needs an assertion made or
//! checked.
//!
//! A proxy is called rarely (the [`Identities`](super::Identities) caches
//! what it answers until the assertion expires), so one store behind a
//! mutex is enough; each call has the same deadline, fuel and memory limits
//! as a hyperty's call. A proxy that traps is dropped and instantiated
//! afresh (and initialised again) on the next call.
//!
//! The `identity-binding` export (`wit/identity.wit`, world
//! `idp-proxy-binding`) is optional: [`prepare`] looks for it, and a proxy
//! without it (built against `idp-proxy` alone) runs as before and refuses
//! bindings with a clear error.

use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use wasmtime::Store;
use wasmtime::component::{Component, HasSelf, Instance, InstancePre, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::engine::Epoch;
use crate::sandbox::limits::{DomainMemory, InstanceLimiter, Limits};
use crate::sandbox::timers::{CallDeadline, Timed};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "idp-proxy-binding",
        with: { "rethink:hyperty/log": crate::sandbox::glue::bindings::rethink::hyperty::log },
    });
}

use bindings::IdpProxyBinding as Bindings;
use bindings::exports::rethink::hyperty::identity_binding as wit_binding;
use bindings::exports::rethink::hyperty::identity_provider as wit;
use crate::sandbox::glue::bindings::rethink::hyperty::log as wit_log;

/// What a valid assertion says, as the proxy answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Claims {
    pub user: String,
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

/// What a valid bound assertion says, as the proxy answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BoundClaims {
    pub user: String,
    /// Seconds since the Unix epoch.
    pub expires: u64,
    /// The contents it binds, as they were given when it was made.
    pub contents: String,
}

/// A fresh assertion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Issued {
    pub token: String,
    pub expires: u64,
}

/// The store data of a proxy instance.
struct ProxyState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: InstanceLimiter,
    log: crate::sandbox::GuestLog,
    /// The deadline of the call in hand, where its timers end.
    deadline: CallDeadline,
}

impl Timed for ProxyState {
    fn deadline(&self) -> &CallDeadline {
        &self.deadline
    }
}

impl WasiView for ProxyState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl wit_log::Host for ProxyState {
    fn log(&mut self, level: wit_log::Level, message: String) {
        self.log.write(level, &message);
    }
}

/// Checks that `component` fits the `idp-proxy` world and prepares it,
/// noting whether it also exports `identity-binding` (world
/// `idp-proxy-binding`).
pub(crate) fn prepare(engine: &wasmtime::Engine, component: &Component) -> Result<ProxyPre> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow!("{e:#}"))?;
    crate::sandbox::timers::link(&mut linker)?;
    Bindings::add_to_linker::<_, HasSelf<ProxyState>>(&mut linker, |s| s).map_err(|e| anyhow!("{e:#}"))?;
    let pre = linker.instantiate_pre(component).map_err(|e| anyhow!("does not fit the idp-proxy world: {e:#}"))?;
    let provider = wit::GuestIndices::new(&pre).map_err(|e| anyhow!("does not fit the idp-proxy world: {e:#}"))?;
    let binding = wit_binding::GuestIndices::new(&pre).ok();
    Ok(ProxyPre(Arc::new(Prepared { pre, provider, binding })))
}

/// A component checked against the `idp-proxy` world.
#[derive(Clone)]
pub(crate) struct ProxyPre(Arc<Prepared>);

struct Prepared {
    pre: InstancePre<ProxyState>,
    provider: wit::GuestIndices,
    /// Its `identity-binding` export, if it has one.
    binding: Option<wit_binding::GuestIndices>,
}

/// One instance of a proxy: its exports, loaded.
struct Exports {
    provider: wit::Guest,
    binding: Option<wit_binding::Guest>,
}

/// One running IdP proxy.
pub(crate) struct Proxy {
    name: Arc<str>,
    pre: ProxyPre,
    config: String,
    limits: Limits,
    memory: Arc<DomainMemory>,
    /// The engine's epoch, which the proxy's timers read.
    epoch: Epoch,
    running: Mutex<Option<(Store<ProxyState>, Exports)>>,
}

impl Proxy {
    /// Instantiates the proxy of IdP `name` and initialises it with
    /// `config`; an error names what refused. Its calls' deadlines count
    /// in `epoch`, the engine's.
    pub fn start(name: &str, pre: ProxyPre, config: String, epoch: Epoch) -> Result<Proxy> {
        let proxy = Proxy {
            name: name.into(),
            pre,
            config,
            limits: Limits::default(),
            memory: Arc::default(),
            epoch,
            running: Mutex::new(None),
        };
        proxy.call(|_, _| Ok(()))?;
        Ok(proxy)
    }

    /// An assertion for `user`.
    pub fn generate(&self, user: &str) -> Result<Issued, String> {
        self.call(|e, store| e.provider.call_generate_assertion(store, user))
            .map_err(|e| format!("{e:#}"))?
            .map(|a| Issued { token: a.token, expires: a.expires })
    }

    /// What `token` says, if it is valid.
    pub fn validate(&self, token: &str) -> Result<Claims, String> {
        self.call(|e, store| e.provider.call_validate_assertion(store, token))
            .map_err(|e| format!("{e:#}"))?
            .map(|c: wit::Claims| Claims { user: c.user, expires: c.expires })
    }

    /// Whether the proxy exports `identity-binding`.
    pub fn binds(&self) -> bool {
        self.pre.0.binding.is_some()
    }

    /// An assertion for `user` bound to `contents`; refused by a proxy
    /// without `identity-binding`.
    pub fn generate_bound(&self, user: &str, contents: &str) -> Result<Issued, String> {
        self.bound(|b, store| b.call_generate_bound_assertion(store, user, contents))?
            .map(|a| Issued { token: a.token, expires: a.expires })
    }

    /// What the bound assertion `token` says, if it is valid.
    pub fn validate_bound(&self, token: &str) -> Result<BoundClaims, String> {
        self.bound(|b, store| b.call_validate_bound_assertion(store, token))?
            .map(|c| BoundClaims { user: c.user, expires: c.expires, contents: c.contents })
    }

    /// Calls the `identity-binding` export.
    fn bound<T>(&self, f: impl FnOnce(&wit_binding::Guest, &mut Store<ProxyState>) -> wasmtime::Result<T>) -> Result<T, String> {
        if !self.binds() {
            return Err(format!("the IdP proxy of {} cannot bind assertions to contents (it does not export identity-binding)", self.name));
        }
        self.call(|e, store| f(e.binding.as_ref().expect("checked by binds"), store)).map_err(|e| format!("{e:#}"))
    }

    /// Runs `f` against the instance, instantiating (and initialising) one
    /// first if there is none; a trap drops the instance.
    fn call<T>(&self, f: impl FnOnce(&Exports, &mut Store<ProxyState>) -> wasmtime::Result<T>) -> Result<T> {
        let mut running = self.running.lock().unwrap();
        if running.is_none() {
            *running = Some(self.instantiate()?);
        }
        let (store, bindings) = running.as_mut().expect("just set");
        self.arm(store);
        match f(bindings, store) {
            Ok(value) => Ok(value),
            Err(e) => {
                *running = None;
                tracing::warn!(idp = %self.name, "IdP proxy trapped, it will be instantiated afresh: {e:#}");
                Err(anyhow!("the IdP proxy of {} trapped: {e:#}", self.name))
            }
        }
    }

    fn instantiate(&self) -> Result<(Store<ProxyState>, Exports)> {
        let state = ProxyState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter: InstanceLimiter::new(&self.limits, self.memory.clone()),
            log: crate::sandbox::GuestLog::new(format!("IdP proxy {}", self.name), &self.limits),
            deadline: CallDeadline::new(self.epoch.clone(), false),
        };
        let prepared = &self.pre.0;
        let mut store = Store::new(prepared.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        self.arm(&mut store);
        let instance: Instance = prepared.pre.instantiate(&mut store).map_err(|e| anyhow!("instantiation failed: {e:#}"))?;
        let exports = Exports {
            provider: prepared.provider.load(&mut store, &instance)?,
            binding: prepared.binding.as_ref().map(|b| b.load(&mut store, &instance)).transpose()?,
        };
        self.arm(&mut store);
        exports
            .provider
            .call_init(&mut store, &self.config)
            .map_err(|e| anyhow!("init trapped: {e:#}"))?
            .map_err(|e| anyhow!("init refused its configuration: {e}"))?;
        Ok((store, exports))
    }

    fn arm(&self, store: &mut Store<ProxyState>) {
        let deadline = crate::engine::ticks(std::time::Duration::from_millis(self.limits.call_timeout_ms));
        crate::sandbox::timers::arm(store, deadline, self.limits.fuel_per_call);
    }
}
