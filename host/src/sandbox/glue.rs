//! The wasmtime glue of the `hyperty` world: the bindings, the store data
//! of one hyperty instance, and the host side of its imports (`bus`,
//! `registry`, `log`), which stamps `from`, refuses the fields only the host
//! or a responder sets, and applies the rate, pending-request and log limits
//! before anything reaches the bus or the log.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::timers::{CallDeadline, Timed};
use super::limits::{Grant, InstanceLimiter, Limits, LogLimiter, MAX_LOG_LINE, RateLimiter};
use crate::address::Address;
use crate::bus::{Bus, SendError};
use crate::events::{EventKind, Events};
use crate::message::{Body, Message, MessageType, Text};
use crate::policy::Descriptor;
use crate::registry::{Kind, Query, Registration, Registry, Status};
use crate::syncher::{Account, SyncError, Syncher};

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "hyperty",
        // What `handle` is given borrows the host's message (`MessageParam`):
        // lowered into the guest straight from it, no copy of its strings
        // first (two allocations and copies a delivery less).
        ownership: Borrowing { duplicate_if_necessary: true },
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
    super::timers::link(&mut linker)?;
    Hyperty::add_to_linker::<_, HasSelf<InstanceState>>(&mut linker, |s| s).map_err(|e| anyhow!("{e:#}"))?;
    crate::media::glue::add_to_linker(&mut linker, |s| &mut s.media)?;
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
    log: GuestLog,
    /// `max-pending` of the domain.
    max_pending: usize,
    /// `max-request-timeout-ms` of the domain.
    max_request_timeout: Duration,
    /// When a rate-limited event was last emitted (at most one a second).
    rate_reported: Option<Instant>,
    /// When a refused-message event was last emitted (at most one a second).
    misbehaviour_reported: Option<Instant>,
    /// Its peer connections (`media`), closed when the store is dropped.
    pub(crate) media: crate::media::glue::MediaState,
    /// Messages it sent that the bus took (for `hyperty status`).
    pub sent: u64,
    /// The deadline of the call in hand, where its timers end.
    pub deadline: CallDeadline,
    /// The last `to` it sent to, parsed ([`InstanceState::receiver`]).
    last_to: Option<Address>,
}

impl InstanceState {
    pub fn new(
        address: Address,
        label: Arc<str>,
        descriptor: Arc<Descriptor>,
        limits: &Limits,
        limiter: InstanceLimiter,
        shared: &super::Shared,
        media: Arc<crate::media::DomainMedia>,
    ) -> InstanceState {
        let media = crate::media::glue::MediaState::new(media, address.clone(), descriptor.clone(), shared.bus.clone());
        let objects = Account::new(address.clone(), label.clone(), limits, limiter.domain().clone(), shared.events.clone());
        InstanceState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter,
            address,
            label: label.clone(),
            descriptor,
            bus: shared.bus.clone(),
            registry: shared.registry.clone(),
            events: shared.events.clone(),
            syncher: shared.syncher.clone(),
            objects,
            rate: RateLimiter::new(limits.rate, limits.burst),
            log: GuestLog::new(label, limits),
            max_pending: limits.max_pending as usize,
            max_request_timeout: Duration::from_millis(limits.max_request_timeout_ms.into()),
            rate_reported: None,
            misbehaviour_reported: None,
            sent: 0,
            media,
            deadline: CallDeadline::new(shared.epoch.clone(), true),
            last_to: None,
        }
    }

    /// Converts a guest's message, checking every field, that `from` is
    /// this hyperty's own address (the stamp), that it sets no field the
    /// host or a responder owns, and the rate limit. `request`: it is sent
    /// with `request`, else with `send`.
    fn accept(&mut self, m: wit::MessageResult, request: bool) -> Result<Message, SendError> {
        if request && m.type_ == wit::MessageType::Response {
            return Err(SendError::Malformed("a response cannot be sent as a request".into()));
        }
        if let Some(code) = m.body.code {
            return Err(SendError::Malformed(format!(
                "body.code ({code}): a response's code is set by its responder through `reply`, never with `send` or `request`"
            )));
        }
        if m.body.description.is_some() {
            return Err(SendError::Malformed("body.description: only the host sets it, on its own answers".into()));
        }
        let from = self.own_address("from", m.from, |from| format!("{from} is not this hyperty's address ({})", self.address))?;
        let to = self.receiver(m.to)?;
        if let Some(claimed) = m.identity {
            return Err(SendError::SpoofedIdentity(format!(
                "{} claims to act for {} of {}: only the host sets a message's identity",
                self.address, claimed.user, claimed.idp
            )));
        }
        let max_bytes = self.bus.config().max_message_bytes;
        let value = m.body.value.map(|v| check_json(v, max_bytes)).transpose()?;
        self.take_token()?;
        Ok(Message {
            id: m.id,
            kind: m.type_.into(),
            from,
            to,
            body: Body { code: m.body.code, resource: m.body.resource.map(Text::from), value: value.map(Text::from), description: m.body.description.map(Text::from) },
            identity: None,
            assertion: None,
        })
    }

    /// A request being replied to must be a request addressed to this
    /// hyperty; the code must be a status code (RFC 9110: 100..=599).
    fn accept_request(&mut self, m: wit::MessageResult, code: u16) -> Result<Message, SendError> {
        if m.type_ == wit::MessageType::Response {
            return Err(SendError::Malformed("cannot reply to a response".into()));
        }
        if !(100..=599).contains(&code) {
            return Err(SendError::Malformed(format!("code {code} is not a status code (100..=599)")));
        }
        let to = self.own_address("to", m.to, |to| format!("cannot reply to a request addressed to {to}, not {}", self.address))?;
        let from = Address::parse(m.from).map_err(|e| SendError::Malformed(format!("from: {e}")))?;
        // Not rate-limited: a reply is delivered only if it answers a pending
        // request, so replies cannot amplify a flood, and a flooder must
        // still be able to answer what it was asked.
        Ok(Message::new(m.id, m.type_.into(), from, to, None))
    }

    /// The address `text` names, as `to`: the last one again, not parsed
    /// again, when it is the same (a hyperty sends to one peer many times
    /// in a row; validating was ~4 % of the bus's one-way path).
    fn receiver(&mut self, text: String) -> Result<Address, SendError> {
        if let Some(last) = &self.last_to
            && last.as_str() == text
        {
            return Ok(last.clone());
        }
        let to = Address::parse(text).map_err(|e| SendError::Malformed(format!("to: {e}")))?;
        self.last_to = Some(to.clone());
        Ok(to)
    }

    /// `text`, the message's `field`, which must be this hyperty's own
    /// address (the stamp): then a copy of it, not parsed again; else
    /// malformed, or spoofed as `spoofed` says of the address given.
    fn own_address(&self, field: &str, text: String, spoofed: impl FnOnce(&Address) -> String) -> Result<Address, SendError> {
        if text == self.address.as_str() {
            return Ok(self.address.clone());
        }
        let other = Address::parse(text).map_err(|e| SendError::Malformed(format!("{field}: {e}")))?;
        Err(SendError::SpoofedFrom(spoofed(&other)))
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

/// A guest's JSON value: its size first, so that a value the bus would
/// refuse as too large is not scanned (40 MiB of it took the domain's
/// thread past its call deadline in a debug build), then
/// [`crate::message::validate_value`].
fn check_json(value: String, max_bytes: usize) -> Result<String, SendError> {
    if value.len() > max_bytes {
        return Err(SendError::TooLarge(format!("body.value has {} bytes, the limit is {max_bytes}", value.len())));
    }
    crate::message::validate_value(&value).map_err(SendError::Malformed)?;
    Ok(value)
}

impl Timed for InstanceState {
    fn deadline(&self) -> &CallDeadline {
        &self.deadline
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl wit::Host for InstanceState {}

impl wit_bus::Host for InstanceState {
    fn send(&mut self, msg: wit::MessageResult) -> Result<(), wit::SendError> {
        let result = self.accept(msg, false).and_then(|msg| self.bus.send(msg, None, Some(&self.descriptor)));
        Ok(self.reported(result)?)
    }

    fn request(&mut self, msg: wit::MessageResult, timeout_ms: Option<u32>) -> Result<(), wit::SendError> {
        let timeout = timeout_ms
            .map_or(self.bus.config().request_timeout, |ms| Duration::from_millis(ms.into()))
            .min(self.max_request_timeout);
        let result = self.accept(msg, true).and_then(|msg| {
            // Only this instance's thread adds requests from its address,
            // so the count cannot grow between this check and the send.
            let pending = self.bus.pending_from(&self.address);
            if pending >= self.max_pending {
                return Err(SendError::TooManyPending(format!(
                    "{} has {pending} requests waiting for their response (max-pending = {})",
                    self.label, self.max_pending
                )));
            }
            self.bus.send(msg, Some(timeout), Some(&self.descriptor))
        });
        Ok(self.reported(result)?)
    }

    fn reply(&mut self, request: wit::MessageResult, code: u16, value: Option<String>) -> Result<(), wit::SendError> {
        let result = self.accept_request(request, code).and_then(|request| {
            let mut response = Message::response(request.id, request.to, request.from, code);
            response.body.value = value.map(|v| check_json(v, self.bus.config().max_message_bytes).map(Text::from)).transpose()?;
            self.bus.send(response, None, Some(&self.descriptor))
        });
        Ok(self.reported(result)?)
    }
}

impl InstanceState {
    /// Reports a refusal that says the guest misbehaves (spoofing, garbage,
    /// oversize, hoarding pending requests) to the operator, at most once a
    /// second; back-pressure errors are the normal course of things and are
    /// not reported.
    fn reported(&mut self, result: Result<(), SendError>) -> Result<(), SendError> {
        self.sent += u64::from(result.is_ok());
        if let Err(
            e @ (SendError::SpoofedFrom(_)
            | SendError::SpoofedIdentity(_)
            | SendError::Malformed(_)
            | SendError::TooLarge(_)
            | SendError::TooManyPending(_)),
        ) = &result
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

/// A component's log (every world imports the same `log` interface): its
/// lines tagged with `who`, escaped and cut ([`log_line`]), at most
/// `log-lines` lines and `log-bytes` bytes a second; a line beyond is
/// dropped, and the next line written is preceded by one saying how many
/// were.
pub(crate) struct GuestLog {
    who: Arc<str>,
    limiter: LogLimiter,
}

impl GuestLog {
    pub fn new(who: impl Into<Arc<str>>, limits: &Limits) -> GuestLog {
        GuestLog { who: who.into(), limiter: LogLimiter::new(limits) }
    }

    pub fn write(&mut self, level: wit_log::Level, message: &str) {
        let line = log_line(message);
        let Some(suppressed) = self.limiter.admit(line.len()) else { return };
        let who = &self.who;
        if suppressed > 0 {
            tracing::warn!(target: "hyperty::guest", "{who}: {suppressed} log lines suppressed (over its log-lines or log-bytes rate)");
        }
        match level {
            wit_log::Level::Trace => tracing::trace!(target: "hyperty::guest", "{who}: {line}"),
            wit_log::Level::Debug => tracing::debug!(target: "hyperty::guest", "{who}: {line}"),
            wit_log::Level::Info => tracing::info!(target: "hyperty::guest", "{who}: {line}"),
            wit_log::Level::Warn => tracing::warn!(target: "hyperty::guest", "{who}: {line}"),
            wit_log::Level::Error => tracing::error!(target: "hyperty::guest", "{who}: {line}"),
        }
    }
}

/// `message` as it goes into the log: escaped, then cut at
/// [`MAX_LOG_LINE`] bytes (`…` included). Only the first `MAX_LOG_LINE`
/// bytes are ever escaped, so a huge line costs no more than a long one.
/// For any text from a component that the host logs.
pub(crate) fn log_line(message: &str) -> Cow<'_, str> {
    let escaped = printable(cut(message, MAX_LOG_LINE));
    if message.len() > MAX_LOG_LINE || escaped.len() > MAX_LOG_LINE {
        let end = MAX_LOG_LINE - '…'.len_utf8();
        return format!("{}…", cut(&escaped, end)).into();
    }
    escaped
}

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text` with every control, bidi, invisible and other non-printable
/// character written as an escape (`\n`, `\u{202e}`, as `{:?}` writes
/// them), so that text from a guest can neither forge a log line nor make
/// one read differently than it is. Quotes and backslashes stay as they are.
pub(crate) fn printable(text: &str) -> Cow<'_, str> {
    let hidden = |c: char| !matches!(c, '"' | '\'' | '\\') && c.escape_debug().nth(1).is_some();
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hidden(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

impl wit_log::Host for InstanceState {
    fn log(&mut self, level: wit_log::Level, message: String) {
        self.log.write(level, &message);
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
            SendError::TooManyPending(s) => wit::SendError::TooManyPending(s),
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

/// `m` as `handle` takes it, borrowed.
pub(crate) fn message_param(m: &Message) -> wit::MessageParam<'_> {
    wit::MessageParam {
        id: m.id,
        type_: m.kind.into(),
        from: m.from.as_str(),
        to: m.to.as_str(),
        body: wit::BodyParam {
            code: m.body.code,
            resource: m.body.resource.as_deref(),
            value: m.body.value.as_deref(),
            description: m.body.description.as_deref(),
        },
        identity: m.identity.as_ref().map(|i| wit::IdentityParam { user: &i.user, idp: &i.idp }),
    }
}
