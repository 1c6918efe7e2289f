//! The wasmtime glue of the `hyperty` world: the bindings, the store data
//! of one hyperty instance, and the host side of its imports (`bus`,
//! `registry`, `log`), which stamps `from` and applies the rate limit before
//! anything reaches the bus.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::limits::{Grant, InstanceLimiter, Limits, RateLimiter};
use crate::address::Address;
use crate::bus::{Bus, SendError};
use crate::events::{EventKind, Events};
use crate::message::{Body, Message, MessageType};
use crate::policy::Descriptor;
use crate::registry::{Kind, Query, Registration, Registry, Status};
use crate::syncher::{Account, SyncError, Syncher};

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "hyperty",
    });
}

use bindings::rethink::hyperty::{bus as wit_bus, log as wit_log, registry as wit_registry, syncher as wit_syncher, types as wit};
pub(crate) use bindings::{Hyperty, HypertyPre};

/// The linker every hyperty is checked against and instantiated with:
/// WASI p2 (a Rust `wasm32-wasip2` guest imports it through std) and our
/// world. What a component may actually import from WASI is decided per
/// domain by [`check_grants`]; the WASI context itself opens no directory,
/// allows no socket address and passes no environment.
pub(crate) fn hyperty_linker(engine: &wasmtime::Engine) -> Result<Linker<InstanceState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow!("{e:#}"))?;
    Hyperty::add_to_linker::<_, HasSelf<InstanceState>>(&mut linker, |s| s).map_err(|e| anyhow!("{e:#}"))?;
    Ok(linker)
}

/// Refuses a component that imports a WASI package its domain was not
/// granted (see [`Grant`]); the error names the import and the grant.
pub(crate) fn check_grants(engine: &wasmtime::Engine, component: &Component, grants: &[Grant]) -> Result<()> {
    for (name, _) in component.component_type().imports(engine) {
        if let Some(grant) = Grant::ALL.iter().find(|g| name.starts_with(g.package()))
            && !grants.contains(grant)
        {
            return Err(anyhow!(
                "imports {name}, but the domain is not granted `{}` (add it to the domain's grants)",
                grant.name()
            ));
        }
    }
    Ok(())
}

/// Checks that `component` fits the `hyperty` world and prepares it for
/// fast instantiation.
pub(crate) fn prepare(linker: &Linker<InstanceState>, component: &Component) -> Result<HypertyPre<InstanceState>> {
    let pre = linker.instantiate_pre(component).map_err(|e| anyhow!("does not fit the hyperty world: {e:#}"))?;
    HypertyPre::new(pre).map_err(|e| anyhow!("does not fit the hyperty world: {e:#}"))
}

/// The store data of one hyperty instance.
pub(crate) struct InstanceState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: InstanceLimiter,
    pub address: Address,
    pub label: Arc<str>,
    descriptor: Arc<Descriptor>,
    bus: Bus,
    registry: Arc<Registry>,
    events: Events,
    syncher: Arc<Syncher>,
    /// What the hyperty's data objects are charged to.
    objects: Arc<Account>,
    rate: RateLimiter,
    /// When a rate-limited event was last emitted (at most one a second).
    rate_reported: Option<Instant>,
    /// When a refused-message event was last emitted (at most one a second).
    misbehaviour_reported: Option<Instant>,
}

impl InstanceState {
    pub fn new(
        address: Address,
        label: Arc<str>,
        descriptor: Arc<Descriptor>,
        limits: &Limits,
        limiter: InstanceLimiter,
        shared: &super::Shared,
    ) -> InstanceState {
        let objects = Account::new(address.clone(), label.clone(), limits, limiter.domain().clone(), shared.events.clone());
        InstanceState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter,
            address,
            label,
            descriptor,
            bus: shared.bus.clone(),
            registry: shared.registry.clone(),
            events: shared.events.clone(),
            syncher: shared.syncher.clone(),
            objects,
            rate: RateLimiter::new(limits),
            rate_reported: None,
            misbehaviour_reported: None,
        }
    }

    /// Converts a guest's message, checking every field, that `from` is
    /// this hyperty's own address (the stamp) and the rate limit.
    fn accept(&mut self, m: wit::Message) -> Result<Message, SendError> {
        let from = Address::parse(m.from).map_err(|e| SendError::Malformed(format!("from: {e}")))?;
        if from != self.address {
            return Err(SendError::SpoofedFrom(format!("{from} is not this hyperty's address ({})", self.address)));
        }
        let to = Address::parse(m.to).map_err(|e| SendError::Malformed(format!("to: {e}")))?;
        if let Some(claimed) = m.identity {
            return Err(SendError::SpoofedIdentity(format!(
                "{} claims to act for {} of {}: only the host sets a message's identity",
                self.address, claimed.user, claimed.idp
            )));
        }
        let value = m.body.value.map(check_json).transpose()?;
        self.take_token()?;
        Ok(Message {
            id: m.id,
            kind: m.type_.into(),
            from,
            to,
            body: Body { code: m.body.code, resource: m.body.resource, value, description: m.body.description },
            identity: None,
            assertion: None,
        })
    }

    /// A request being replied to must be addressed to this hyperty.
    fn accept_request(&mut self, m: wit::Message) -> Result<Message, SendError> {
        let to = Address::parse(m.to).map_err(|e| SendError::Malformed(format!("to: {e}")))?;
        if to != self.address {
            return Err(SendError::SpoofedFrom(format!("cannot reply to a request addressed to {to}, not {}", self.address)));
        }
        let from = Address::parse(m.from).map_err(|e| SendError::Malformed(format!("from: {e}")))?;
        // Not rate-limited: a reply is delivered only if it answers a pending
        // request, so replies cannot amplify a flood, and a flooder must
        // still be able to answer what it was asked.
        Ok(Message::new(m.id, m.type_.into(), from, to, None))
    }

    fn take_token(&mut self) -> Result<(), SendError> {
        if self.rate.take() {
            return Ok(());
        }
        let now = Instant::now();
        if self.rate_reported.is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1)) {
            self.rate_reported = Some(now);
            tracing::warn!(hyperty = %self.label, "exceeds its domain's message rate");
            self.events.emit(&self.label, &self.address, EventKind::RateLimited);
        }
        Err(SendError::RateLimited(format!("{} exceeds its domain's message rate", self.label)))
    }
}

fn check_json(value: String) -> Result<String, SendError> {
    crate::message::validate_value(&value).map_err(SendError::Malformed)?;
    Ok(value)
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl wit::Host for InstanceState {}

impl wit_bus::Host for InstanceState {
    fn send(&mut self, msg: wit::Message) -> Result<(), wit::SendError> {
        let result = self.accept(msg).and_then(|msg| self.bus.send(msg, None, Some(&self.descriptor)));
        Ok(self.reported(result)?)
    }

    fn request(&mut self, msg: wit::Message, timeout_ms: Option<u32>) -> Result<(), wit::SendError> {
        let timeout = timeout_ms.map_or(self.bus.config().request_timeout, |ms| Duration::from_millis(ms.into()));
        let result = self.accept(msg).and_then(|msg| self.bus.send(msg, Some(timeout), Some(&self.descriptor)));
        Ok(self.reported(result)?)
    }

    fn reply(&mut self, request: wit::Message, code: u16, value: Option<String>) -> Result<(), wit::SendError> {
        let result = self.accept_request(request).and_then(|request| {
            let mut response = Message::response(request.id, request.to, request.from, code);
            response.body.value = value.map(check_json).transpose()?;
            self.bus.send(response, None, Some(&self.descriptor))
        });
        Ok(self.reported(result)?)
    }
}

impl InstanceState {
    /// Reports a refusal that says the guest misbehaves (spoofing, garbage,
    /// oversize) to the operator, at most once a second; back-pressure
    /// errors are the normal course of things and are not reported.
    fn reported(&mut self, result: Result<(), SendError>) -> Result<(), SendError> {
        if let Err(e @ (SendError::SpoofedFrom(_) | SendError::SpoofedIdentity(_) | SendError::Malformed(_) | SendError::TooLarge(_))) =
            &result
        {
            let now = Instant::now();
            if self.misbehaviour_reported.is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1)) {
                self.misbehaviour_reported = Some(now);
                tracing::warn!(hyperty = %self.label, "message refused: {e}");
                self.events.emit(&self.label, &self.address, EventKind::Refused { reason: e.to_string() });
            }
        }
        result
    }
}

impl wit_registry::Host for InstanceState {
    fn lookup(&mut self, domain: String, name: String) -> Option<String> {
        self.registry.lookup(&domain, &name).map(String::from)
    }

    fn discover(&mut self, q: wit_registry::Query) -> Vec<wit_registry::Registration> {
        let query = Query { user: q.user, name: q.name, hyperty_type: q.hyperty_type, domain: q.domain, scheme: q.scheme };
        self.registry.discover(&query).into_iter().map(Into::into).collect()
    }
}

impl From<Registration> for wit_registry::Registration {
    fn from(r: Registration) -> wit_registry::Registration {
        wit_registry::Registration {
            address: r.address.into(),
            kind: match r.kind {
                Kind::Hyperty => wit_registry::Kind::Hyperty,
                Kind::Protostub => wit_registry::Kind::Protostub,
                Kind::IdpProxy => wit_registry::Kind::IdpProxy,
                Kind::DataObject => wit_registry::Kind::DataObject,
            },
            name: r.name,
            domain: r.domain,
            user: r.user,
            hyperty_types: r.hyperty_types,
            schemes: r.schemes,
            status: match r.status {
                Status::Created => wit_registry::Status::Created,
                Status::Live => wit_registry::Status::Live,
                Status::Disconnected => wit_registry::Status::Disconnected,
                Status::Failed => wit_registry::Status::Failed,
            },
        }
    }
}

impl wit_syncher::Host for InstanceState {
    fn create(&mut self, scheme: String, data: String) -> Result<String, wit_syncher::SyncError> {
        Ok(self.syncher.create(&self.objects, &scheme, &data)?)
    }

    fn invite(&mut self, url: String, observers: Vec<String>) -> Result<(), wit_syncher::SyncError> {
        Ok(self.syncher.invite(&self.objects, &url, &observers)?)
    }

    fn update(&mut self, url: String, patch: String) -> Result<u64, wit_syncher::SyncError> {
        Ok(self.syncher.update(&self.objects, &url, &patch)?)
    }

    fn set_child(&mut self, url: String, name: String, data: String) -> Result<u64, wit_syncher::SyncError> {
        Ok(self.syncher.set_child(&self.objects, &url, &name, &data)?)
    }

    fn remove_child(&mut self, url: String, name: String) -> Result<u64, wit_syncher::SyncError> {
        Ok(self.syncher.remove_child(&self.objects, &url, &name)?)
    }

    fn delete(&mut self, url: String) -> Result<(), wit_syncher::SyncError> {
        Ok(self.syncher.delete(&self.objects, &url)?)
    }
}

impl From<SyncError> for wit_syncher::SyncError {
    fn from(e: SyncError) -> wit_syncher::SyncError {
        match e {
            SyncError::Forbidden(s) => wit_syncher::SyncError::Forbidden(s),
            SyncError::NotFound(s) => wit_syncher::SyncError::NotFound(s),
            SyncError::Invalid(s) => wit_syncher::SyncError::Invalid(s),
            SyncError::Limit(s) => wit_syncher::SyncError::Limit(s),
        }
    }
}

/// Longest guest log line kept, in bytes.
const MAX_LOG_LINE: usize = 4096;

/// A component's line into the host's log (every world imports the same
/// `log` interface): tagged with `who`, cut at [`MAX_LOG_LINE`].
pub(crate) fn guest_log(who: &str, level: wit_log::Level, mut message: String) {
    if message.len() > MAX_LOG_LINE {
        let mut end = MAX_LOG_LINE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    match level {
        wit_log::Level::Trace => tracing::trace!(target: "hyperty::guest", "{who}: {message}"),
        wit_log::Level::Debug => tracing::debug!(target: "hyperty::guest", "{who}: {message}"),
        wit_log::Level::Info => tracing::info!(target: "hyperty::guest", "{who}: {message}"),
        wit_log::Level::Warn => tracing::warn!(target: "hyperty::guest", "{who}: {message}"),
        wit_log::Level::Error => tracing::error!(target: "hyperty::guest", "{who}: {message}"),
    }
}

impl wit_log::Host for InstanceState {
    fn log(&mut self, level: wit_log::Level, message: String) {
        guest_log(&self.label, level, message);
    }
}

impl From<SendError> for wit::SendError {
    fn from(e: SendError) -> wit::SendError {
        match e {
            SendError::SpoofedFrom(s) => wit::SendError::SpoofedFrom(s),
            SendError::SpoofedIdentity(s) => wit::SendError::SpoofedIdentity(s),
            SendError::Malformed(s) => wit::SendError::Malformed(s),
            SendError::TooLarge(s) => wit::SendError::TooLarge(s),
            SendError::DuplicateId(id) => wit::SendError::DuplicateId(id),
            SendError::InboxFull(s) => wit::SendError::InboxFull(s),
            SendError::RateLimited(s) => wit::SendError::RateLimited(s),
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
            identity: m.identity.map(|i| wit::Identity { user: i.user, idp: i.idp }),
        }
    }
}
