//! The policy decision point: Cedar policies, validated against
//! `policies/schema.cedarschema`, for each provider domain (enforcement
//! points `outgoing` and `incoming`) and for the runtime itself
//! (`bus-access`).
//!
//! Semantics: Cedar's — a message passes a point if some `permit` matches
//! and no `forbid` does (forbid overrides permit). A domain with no policy
//! file attached is open (permits everything); attaching one makes the
//! domain default-deny like any Cedar policy set.
//!
//! Cost: Cedar takes ~15 µs per request with tens of policies, so decisions
//! are cached per thread (no lock on a hit), keyed on every input a request
//! is built from (point, domain, from, to, message type, `body.resource`,
//! the sender's identity, the names of the two hyperties) plus, when any policy of the set mentions `time`, the current minute —
//! the finest time a policy can read. A generation number, bumped by every
//! reload and group change, empties the caches, so a cached decision is
//! never used after what it depended on changed.
//!
//! Reload is all or nothing: every file is parsed and validated first, and
//! only a fully valid set replaces the one in force (one pointer swap), so a
//! message sees either the old policies or the new ones.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

use super::clock::{CivilTime, Clock, SystemClock};
use super::{Decision, Descriptor, EnforcementPoint, Parties, PolicyDecisionPoint, Version};
use crate::address::Address;
use crate::bundle::{Problem, line_of};
use crate::message::{Identity, Message, Text};

/// The schema policies are validated against (shipped in `policies/`).
pub const SCHEMA: &str = include_str!("../../../policies/schema.cedarschema");

/// Policy files that do not parse or validate; nothing of them was applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub problems: Vec<Problem>,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "policies refused, the ones in force are kept")?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

/// What the app gateway knows of one of its connections: the attributes of
/// its `Rethink::App` entity (see the schema).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppPrincipal {
    /// The page's origin, as its `Origin` header said (RFC 6454).
    pub origin: String,
    /// The provider domain it logged in to.
    pub domain: String,
    /// The user it logged in as.
    pub user: String,
}

/// One compiled policy set.
struct Compiled {
    set: PolicySet,
    /// Some policy mentions `time`: decisions may change every minute.
    uses_time: bool,
}

/// Everything a decision depends on besides the request.
struct State {
    /// Bumped by every change; cached decisions are tagged with it.
    generation: u64,
    runtime: Option<Compiled>,
    domains: HashMap<String, Compiled>,
    entities: Entities,
}

/// Where the policies and groups come from, for reloads.
#[derive(Clone, Default)]
struct Sources {
    runtime: Option<PathBuf>,
    domains: BTreeMap<String, Vec<PathBuf>>,
    groups: BTreeMap<String, BTreeSet<String>>,
    groups_file: Option<PathBuf>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Cedar policies as the bus's [`PolicyDecisionPoint`].
pub struct CedarPolicies {
    id: u64,
    schema: Schema,
    clock: Arc<dyn Clock>,
    state: RwLock<Arc<State>>,
    /// The generation of `state`, stored once it is in force (for
    /// [`PolicyDecisionPoint::version`], read without the lock).
    generation: AtomicU64,
    /// Some policy of `state` reads the time.
    timed: AtomicBool,
    /// Serialises changes (reloads, group edits).
    sources: Mutex<Sources>,
    /// Why the last [`reload`](CedarPolicies::reload) was refused, if it was.
    refused: Mutex<Option<PolicyError>>,
    /// The gateway's connections by address (`app://…`), for their `App`
    /// entities; one entry per open connection.
    apps: RwLock<HashMap<String, AppPrincipal>>,
}

impl CedarPolicies {
    /// No policies yet (everything permitted), the system clock.
    pub fn new() -> CedarPolicies {
        CedarPolicies::with_clock(Arc::new(SystemClock))
    }

    pub fn with_clock(clock: Arc<dyn Clock>) -> CedarPolicies {
        let (schema, _) = Schema::from_cedarschema_str(SCHEMA).expect("the shipped schema is valid");
        let state = State { generation: 1, runtime: None, domains: HashMap::new(), entities: Entities::empty() };
        CedarPolicies {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            schema,
            clock,
            state: RwLock::new(Arc::new(state)),
            generation: AtomicU64::new(1),
            timed: AtomicBool::new(false),
            sources: Mutex::default(),
            refused: Mutex::default(),
            apps: RwLock::default(),
        }
    }

    /// Sets the runtime's bus-access policy file.
    pub fn set_runtime_policies(&self, file: &Path) -> Result<(), PolicyError> {
        self.change(|s| s.runtime = Some(file.to_owned()))
    }

    /// Sets the policy files of `domain` (none: the domain is open).
    pub fn set_domain_policies(&self, domain: &str, files: &[PathBuf]) -> Result<(), PolicyError> {
        self.change(|s| {
            if files.is_empty() {
                s.domains.remove(domain);
            } else {
                s.domains.insert(domain.to_owned(), files.to_vec());
            }
        })
    }

    /// Replaces the members of `group`.
    pub fn set_group(&self, group: &str, members: impl IntoIterator<Item = String>) {
        let members = members.into_iter().collect();
        self.change(|s| {
            s.groups.insert(group.to_owned(), members);
        })
        .expect("group changes do not touch policy files");
    }

    /// Adds `user` to `group`.
    pub fn add_member(&self, group: &str, user: &str) {
        self.change(|s| {
            s.groups.entry(group.to_owned()).or_default().insert(user.to_owned());
        })
        .expect("group changes do not touch policy files");
    }

    /// Removes `user` from `group`.
    pub fn remove_member(&self, group: &str, user: &str) {
        self.change(|s| {
            if let Some(members) = s.groups.get_mut(group) {
                members.remove(user);
            }
        })
        .expect("group changes do not touch policy files");
    }

    /// Reads group memberships from a TOML file (`group = ["user", ...]`)
    /// and keeps reading it on [`reload`](Self::reload).
    pub fn set_groups_file(&self, file: &Path) -> Result<(), PolicyError> {
        let groups = read_groups(file)?;
        self.change(|s| {
            s.groups = groups;
            s.groups_file = Some(file.to_owned());
        })
    }

    /// Makes `address` (an `app://` address) the `App` entity `app` in
    /// every decision about its messages, until [`remove_app`](Self::remove_app).
    /// An address is never reused, so decisions cached for it stay right.
    pub fn add_app(&self, address: &Address, app: AppPrincipal) {
        self.apps.write().unwrap().insert(address.as_str().to_owned(), app);
    }

    /// Forgets the `App` entity of `address`.
    pub fn remove_app(&self, address: &Address) {
        self.apps.write().unwrap().remove(address.as_str());
    }

    /// The entities of a decision about `m`: the groups and users, plus the
    /// `App` entity of each end that is an `app://` address (an app nobody
    /// registered has origin "" and user `User::""`).
    fn entities_for<'s>(&self, state: &'s State, m: &Message) -> Result<std::borrow::Cow<'s, Entities>, String> {
        let ends = [&m.from, &m.to];
        if !ends.iter().any(|a| a.scheme() == "app") {
            return Ok(std::borrow::Cow::Borrowed(&state.entities));
        }
        let apps = self.apps.read().unwrap();
        let mut entities = Vec::new();
        for address in ends.into_iter().filter(|a| a.scheme() == "app") {
            let app = apps.get(address.as_str());
            let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
            let attributes = HashMap::from([
                ("origin".to_owned(), s(app.map_or("", |a| &a.origin))),
                ("domain".to_owned(), s(app.map_or(address.domain(), |a| &a.domain))),
                ("user".to_owned(), RestrictedExpression::new_entity_uid(user_uid(app.map_or("", |a| &a.user)))),
            ]);
            let entity = Entity::new(address_uid(address), attributes, HashSet::new()).map_err(|e| e.to_string())?;
            if !entities.iter().any(|e: &Entity| e.uid() == entity.uid()) {
                entities.push(entity);
            }
        }
        drop(apps);
        state.entities.clone().add_entities(entities, Some(&self.schema)).map(std::borrow::Cow::Owned).map_err(|e| e.to_string())
    }

    /// Parses and validates policy `files` without applying them.
    pub fn check_files(&self, files: &[PathBuf]) -> Result<(), PolicyError> {
        let mut problems = Vec::new();
        self.compile(files, &mut problems);
        if problems.is_empty() { Ok(()) } else { Err(PolicyError { problems }) }
    }

    /// The policy files attached to `domain`.
    pub fn domain_policies(&self, domain: &str) -> Vec<PathBuf> {
        self.sources.lock().unwrap().domains.get(domain).cloned().unwrap_or_default()
    }

    /// Re-reads every policy and groups file; on any problem the ones in
    /// force stay.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let groups_file = self.sources.lock().unwrap().groups_file.clone();
        let result = groups_file.as_deref().map(read_groups).transpose().and_then(|groups| {
            self.change(|s| {
                if let Some(groups) = groups {
                    s.groups = groups;
                }
            })
        });
        *self.refused.lock().unwrap() = result.as_ref().err().cloned();
        result
    }

    /// Why the last reload (by [`reload`](Self::reload) or
    /// [`watch`](Self::watch)) was refused; `None` if it succeeded or none
    /// was tried.
    pub fn refused(&self) -> Option<PolicyError> {
        self.refused.lock().unwrap().clone()
    }

    /// Every file the policies come from (to watch for changes).
    pub fn files(&self) -> Vec<PathBuf> {
        let s = self.sources.lock().unwrap();
        s.runtime.iter().chain(s.domains.values().flatten()).chain(s.groups_file.iter()).cloned().collect()
    }

    /// Reloads whenever one of [`files`](Self::files) changes, checking
    /// every `interval`, until `self` is dropped; a refused reload is logged
    /// and the policies in force stay. A change is a change of length or of
    /// content (SHA-256 of the first 16 MiB), not only of modification time:
    /// two writes within the file system's timestamp granularity are both
    /// seen.
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        let weak = Arc::downgrade(self);
        let stamp = |files: &[PathBuf]| -> Vec<Option<(u64, [u8; 32])>> {
            use sha2::Digest as _;
            use std::io::Read as _;
            let one = |f: &PathBuf| -> std::io::Result<(u64, [u8; 32])> {
                let file = std::fs::File::open(f)?;
                let len = file.metadata()?.len();
                let mut hasher = sha2::Sha256::new();
                std::io::copy(&mut file.take(16 << 20), &mut hasher)?;
                Ok((len, hasher.finalize().into()))
            };
            files.iter().map(|f| one(f).ok()).collect()
        };
        let mut seen = stamp(&self.files());
        let _ = std::thread::Builder::new().name("hyperty-policy-watch".into()).spawn(move || {
            loop {
                std::thread::sleep(interval);
                let Some(policies) = weak.upgrade() else { return };
                let now = stamp(&policies.files());
                if now != seen {
                    seen = now;
                    match policies.reload() {
                        Ok(()) => tracing::info!("policies reloaded"),
                        Err(e) => tracing::error!("{e}"),
                    }
                }
            }
        });
    }

    /// Applies `edit` to the sources and rebuilds the state from them; if
    /// anything is wrong, neither changes.
    fn change(&self, edit: impl FnOnce(&mut Sources)) -> Result<(), PolicyError> {
        let mut sources = self.sources.lock().unwrap();
        let mut next = sources.clone();
        edit(&mut next);
        let mut state = self.build(&next)?;
        *sources = next;
        let mut current = self.state.write().unwrap();
        state.generation = current.generation + 1;
        let timed = state.runtime.iter().chain(state.domains.values()).any(|c| c.uses_time);
        let generation = state.generation;
        *current = Arc::new(state);
        // Published once the new state is in force: whoever reads the new
        // generation finds the new state.
        self.timed.store(timed, Ordering::Release);
        self.generation.store(generation, Ordering::Release);
        Ok(())
    }

    fn build(&self, sources: &Sources) -> Result<State, PolicyError> {
        let mut problems = Vec::new();
        let runtime = sources.runtime.as_ref().and_then(|f| self.compile(std::slice::from_ref(f), &mut problems));
        let mut domains = HashMap::new();
        for (domain, files) in &sources.domains {
            if let Some(c) = self.compile(files, &mut problems) {
                domains.insert(domain.clone(), c);
            }
        }
        if !problems.is_empty() {
            return Err(PolicyError { problems });
        }
        let entities = self.entities(&sources.groups).map_err(|message| PolicyError {
            problems: vec![Problem { file: PathBuf::new(), line: None, field: "groups".into(), message }],
        })?;
        Ok(State { generation: 0, runtime, domains, entities })
    }

    /// Parses and validates `files` into one policy set. Policy ids are
    /// their `@id` annotation, else `<file>:<line>`.
    fn compile(&self, files: &[PathBuf], problems: &mut Vec<Problem>) -> Option<Compiled> {
        let mut set = PolicySet::new();
        let mut uses_time = false;
        let before = problems.len();
        for file in files {
            let problem = |line: Option<usize>, field: String, message: String| Problem { file: file.clone(), line, field, message };
            let text = match std::fs::read_to_string(file) {
                Ok(text) => text,
                Err(e) => {
                    problems.push(problem(None, String::new(), format!("cannot read: {e}")));
                    continue;
                }
            };
            if let Err(e) = super::nesting::check(&text) {
                problems.push(problem(Some(line_of(&text, e.offset)), String::new(), e.reason));
                continue;
            }
            let parsed = match PolicySet::from_str(&text) {
                Ok(parsed) => parsed,
                Err(errors) => {
                    for e in errors.iter() {
                        problems.push(problem(first_line(e, &text), String::new(), e.to_string()));
                    }
                    continue;
                }
            };
            for policy in parsed.policies() {
                let id = match policy.annotation("id") {
                    Some(id) => id.to_owned(),
                    None => {
                        let line = policy.to_cedar().and_then(|src| text.find(&src)).map_or(0, |at| line_of(&text, at));
                        format!("{}:{line}", file.file_name().unwrap_or_default().to_string_lossy())
                    }
                };
                uses_time |= policy.to_string().contains("time");
                if let Err(e) = set.add(policy.new_id(PolicyId::new(&id))) {
                    problems.push(problem(None, id, e.to_string()));
                }
            }
            // Strict validation checks each policy once per action it may
            // apply to: the same fault is reported once, at its line, under
            // the policy's `@id` if it has one (the file and line name it
            // otherwise), without Cedar's internal `policy<n>` name.
            let validation = Validator::new(self.schema.clone()).validate(&parsed, ValidationMode::Strict);
            let mut seen: Vec<(Option<usize>, std::mem::Discriminant<cedar_policy::ValidationError>, &PolicyId, usize)> = Vec::new();
            let mut found = Vec::new();
            for e in validation.validation_errors() {
                let line = first_line(e, &text);
                let key = (line, std::mem::discriminant(e), e.policy_id());
                if let Some(i) = seen.iter().position(|(l, d, p, _)| (*l, *d, *p) == key) {
                    seen[i].3 += 1;
                    continue;
                }
                seen.push((key.0, key.1, key.2, 1));
                let field = parsed.policy(e.policy_id()).and_then(|p| p.annotation("id")).unwrap_or_default().to_owned();
                let message = e.to_string();
                let message = message.strip_prefix(&format!("for policy `{}`, ", e.policy_id())).unwrap_or(&message).to_owned();
                found.push((line, field, message));
            }
            for ((line, field, message), (.., n)) in found.into_iter().zip(&seen) {
                let message = if *n > 1 { format!("{message} (and for {} other actions)", n - 1) } else { message };
                problems.push(problem(line, field, message));
            }
        }
        (problems.len() == before).then_some(Compiled { set, uses_time })
    }

    fn entities(&self, groups: &BTreeMap<String, BTreeSet<String>>) -> Result<Entities, String> {
        let group_type = type_name("Group");
        let user_type = type_name("User");
        let mut users: BTreeMap<&str, HashSet<EntityUid>> = BTreeMap::new();
        let mut all = Vec::new();
        for (group, members) in groups {
            let gid = EntityUid::from_type_name_and_id(group_type.clone(), EntityId::new(group));
            all.push(Entity::new_no_attrs(gid.clone(), HashSet::new()));
            for user in members {
                users.entry(user).or_default().insert(gid.clone());
            }
        }
        for (user, parents) in users {
            all.push(Entity::new_no_attrs(EntityUid::from_type_name_and_id(user_type.clone(), EntityId::new(user)), parents));
        }
        Entities::from_entities(all, Some(&self.schema)).map_err(|e| e.to_string())
    }

    /// Evaluates without the cache (what a cache miss costs; for benchmarks).
    #[doc(hidden)]
    pub fn decide_uncached(&self, point: EnforcementPoint, domain: &str, message: &Message, parties: Parties<'_>) -> Decision {
        self.evaluate(&self.snapshot(), point, domain, message, parties, self.clock.now())
    }

    fn snapshot(&self) -> Arc<State> {
        self.state.read().unwrap().clone()
    }

    /// Evaluates without the cache.
    fn evaluate(&self, state: &State, point: EnforcementPoint, domain: &str, message: &Message, parties: Parties<'_>, now: i64) -> Decision {
        let compiled = match point {
            EnforcementPoint::BusAccess => state.runtime.as_ref(),
            _ => state.domains.get(domain),
        };
        let Some(compiled) = compiled else { return Decision::Permit };
        let request = self.request(point, message, parties, now).and_then(|r| Ok((r, self.entities_for(state, message)?)));
        let (request, entities) = match request {
            Ok(r) => r,
            Err(e) => {
                return Decision::Deny { policies: vec![], reason: format!("the request cannot be evaluated: {e}") };
            }
        };
        let response = Authorizer::new().is_authorized(&request, &compiled.set, &entities);
        let diagnostics = response.diagnostics();
        for error in diagnostics.errors() {
            tracing::warn!("policy evaluation error (the policy is skipped): {error}");
        }
        match response.decision() {
            cedar_policy::Decision::Allow => Decision::Permit,
            cedar_policy::Decision::Deny => {
                let mut policies: Vec<String> = diagnostics.reason().map(|id| id.to_string()).collect();
                policies.sort();
                let reason = if policies.is_empty() {
                    format!("no policy permits this {}", message.kind.as_str())
                } else {
                    format!("forbidden for this {}", message.kind.as_str())
                };
                Decision::Deny { policies, reason }
            }
        }
    }

    fn request(&self, point: EnforcementPoint, m: &Message, parties: Parties<'_>, now: i64) -> Result<Request, String> {
        let point = point.to_string();
        build_request(RequestParts {
            action: m.kind.as_str(),
            from: &m.from,
            to: &m.to,
            point: &point,
            parties,
            identity: m.identity.as_ref(),
            resource: m.body.resource.as_deref(),
            remote_identity: None,
            now,
        })
    }

    /// Whether `domain`'s policies let the hyperty `descriptor` be deployed
    /// at `address` (action `deploy`, point `deploy`).
    pub fn authorize_deploy(&self, domain: &str, address: &Address, descriptor: &Descriptor) -> Decision {
        let parties = Parties { sender: Some(descriptor), target: Some(descriptor) };
        // Not asserted yet: the user the bundle binds the hyperty to.
        let identity = descriptor.user.as_deref().map(|user| Identity { user: user.into(), idp: Text::default() });
        let parts = RequestParts {
            action: "deploy",
            from: address,
            to: address,
            point: "deploy",
            parties,
            identity: identity.as_ref(),
            resource: None,
            remote_identity: None,
            now: self.clock.now(),
        };
        self.authorize(domain, parts, "deployment not permitted")
    }

    /// Whether hyperty `hyperty` (described by `descriptor`) of `domain`
    /// may open a WebRTC peer connection (`action` `media-open`) or accept
    /// a remote peer's offer (`media-accept`), asked of the domain's
    /// policies with point `media`. The resource is `remote` when it names
    /// an address (its domain and, for a hyperty here, its name and user in
    /// the context as the target's), else the connection's own address;
    /// `remote`'s text is the context's `resource` either way.
    /// `remote_identity` is the remote peer's identity, checked against its
    /// DTLS fingerprint (WebRTC identity), as `remote_user` / `remote_idp`
    /// (`has_remote_user` false without one). A domain without policies
    /// permits.
    pub fn authorize_media(
        &self,
        action: &str,
        hyperty: &Address,
        descriptor: &Descriptor,
        connection: &Address,
        remote: Option<(&str, Option<&Descriptor>)>,
        remote_identity: Option<&Identity>,
    ) -> Decision {
        let identity = descriptor.user.as_deref().map(|user| Identity { user: user.into(), idp: Text::default() });
        let remote_address = remote.and_then(|(r, _)| Address::parse(r).ok());
        let parts = RequestParts {
            action,
            from: hyperty,
            to: remote_address.as_ref().unwrap_or(connection),
            point: "media",
            parties: Parties { sender: Some(descriptor), target: remote.and_then(|(_, d)| d) },
            identity: identity.as_ref(),
            resource: remote.map(|(r, _)| r),
            remote_identity,
            now: self.clock.now(),
        };
        self.authorize(&descriptor.domain, parts, "not permitted")
    }

    /// One request to `domain`'s policies; `denied` says what a denial is.
    fn authorize(&self, domain: &str, parts: RequestParts<'_>, denied: &str) -> Decision {
        let state = self.snapshot();
        let Some(compiled) = state.domains.get(domain) else { return Decision::Permit };
        let request = match build_request(parts) {
            Ok(r) => r,
            Err(e) => return Decision::Deny { policies: vec![], reason: format!("the request cannot be evaluated: {e}") },
        };
        let response = Authorizer::new().is_authorized(&request, &compiled.set, &state.entities);
        match response.decision() {
            cedar_policy::Decision::Allow => Decision::Permit,
            cedar_policy::Decision::Deny => {
                let mut policies: Vec<String> = response.diagnostics().reason().map(|id| id.to_string()).collect();
                policies.sort();
                Decision::Deny { policies, reason: denied.into() }
            }
        }
    }
}

/// What a Cedar request is built from.
struct RequestParts<'a> {
    action: &'a str,
    from: &'a Address,
    to: &'a Address,
    point: &'a str,
    parties: Parties<'a>,
    /// The sender's identity as the identity module established it.
    identity: Option<&'a Identity>,
    resource: Option<&'a str>,
    /// Point `media`: the remote peer's checked identity.
    remote_identity: Option<&'a Identity>,
    now: i64,
}

fn build_request(p: RequestParts<'_>) -> Result<Request, String> {
    let principal = address_uid(p.from);
    let resource = address_uid(p.to);
    let action = EntityUid::from_type_name_and_id(type_name("Action"), EntityId::new(p.action));
    let user = p.identity.map(|i| i.user.as_str());
    let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
    let (res, res_type) = p.resource.map_or(("", ""), |r| r.split_once('#').unwrap_or((r, "")));
    let res_scheme = res.split_once("://").map_or("", |(scheme, _)| scheme);
    let t = CivilTime::from_unix(p.now);
    let time = RestrictedExpression::new_record([
        ("date".to_owned(), RestrictedExpression::new_long(t.date)),
        ("weekday".to_owned(), RestrictedExpression::new_long(t.weekday)),
        ("hour".to_owned(), RestrictedExpression::new_long(t.hour)),
        ("minute".to_owned(), RestrictedExpression::new_long(t.minute)),
    ])
    .map_err(|e| e.to_string())?;
    let mut pairs = vec![
        ("point".to_owned(), s(p.point)),
        ("sender_domain".to_owned(), s(p.from.domain())),
        ("target_domain".to_owned(), s(p.to.domain())),
        ("sender_name".to_owned(), s(p.parties.sender.map_or("", |d| &d.name))),
        ("target_name".to_owned(), s(p.parties.target.map_or("", |d| &d.name))),
        ("has_sender_user".to_owned(), RestrictedExpression::new_bool(user.is_some())),
        ("sender_user".to_owned(), RestrictedExpression::new_entity_uid(user_uid(user.unwrap_or("")))),
        ("sender_idp".to_owned(), s(p.identity.map_or("", |i| &i.idp))),
        ("target_scheme".to_owned(), s(p.to.scheme())),
        ("resource".to_owned(), s(res)),
        ("resource_scheme".to_owned(), s(res_scheme)),
        ("resource_type".to_owned(), s(res_type)),
        ("time".to_owned(), time),
    ];
    if p.point == "media" {
        let remote = p.remote_identity;
        pairs.extend([
            ("has_remote_user".to_owned(), RestrictedExpression::new_bool(remote.is_some())),
            ("remote_user".to_owned(), RestrictedExpression::new_entity_uid(user_uid(remote.map_or("", |i| &i.user)))),
            ("remote_idp".to_owned(), s(remote.map_or("", |i| &i.idp))),
        ]);
    }
    let context = Context::from_pairs(pairs).map_err(|e| e.to_string())?;
    Request::new(principal, action, resource, context, None).map_err(|e| e.to_string())
}

impl Default for CedarPolicies {
    fn default() -> Self {
        CedarPolicies::new()
    }
}

/// `Rethink::<name>`; parsed once per name (parsing runs Cedar's parser,
/// which would dominate an uncached decision).
fn type_name(name: &'static str) -> EntityTypeName {
    static NAMES: std::sync::LazyLock<HashMap<&'static str, EntityTypeName>> = std::sync::LazyLock::new(|| {
        ["Group", "User", "Action", "Hyperty", "Runtime", "Service", "DataObject", "App"]
            .into_iter()
            .map(|n| (n, EntityTypeName::from_str(&format!("Rethink::{n}")).expect("valid type name")))
            .collect()
    });
    NAMES[name].clone()
}

/// The entity of a bus address: its type follows its scheme.
fn address_uid(address: &Address) -> EntityUid {
    let kind = match address.scheme() {
        "hyperty" => "Hyperty",
        "runtime" => "Runtime",
        "domain" => "Service",
        "app" => "App",
        _ => "DataObject",
    };
    EntityUid::from_type_name_and_id(type_name(kind), EntityId::new(address.as_str()))
}

fn user_uid(user: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(type_name("User"), EntityId::new(user))
}

fn read_groups(file: &Path) -> Result<BTreeMap<String, BTreeSet<String>>, PolicyError> {
    let problem = |line, message| PolicyError { problems: vec![Problem { file: file.to_owned(), line, field: String::new(), message }] };
    let text = std::fs::read_to_string(file).map_err(|e| problem(None, format!("cannot read: {e}")))?;
    toml::from_str(&text).map_err(|e| problem(e.span().map(|s| line_of(&text, s.start)), e.message().trim().to_owned()))
}

fn first_line(diagnostic: &dyn Diagnostic, text: &str) -> Option<usize> {
    diagnostic.labels()?.next().map(|label| line_of(text, label.offset()))
}

/// A path's result: the first point that denied, and its decision.
type PathResult = Result<(), (usize, Decision)>;

/// Exactly what a cached result was decided for: the points (each with the
/// domain whose policies apply) and every message input a request is built
/// from, plus the minute when a set involved reads the time.
struct Cached {
    points: Box<[(EnforcementPoint, Box<str>)]>,
    from: Box<str>,
    to: Box<str>,
    kind: crate::message::MessageType,
    resource: Option<Box<str>>,
    /// The sender's identity: user and IdP (an address's sender may act for
    /// different users: an endpoint, a gateway).
    user: Option<(Box<str>, Box<str>)>,
    /// The bundle's names of the sender and the receiver, where they are
    /// hyperties here (`sender_name`, `target_name`): an address may come
    /// to another hyperty (a fixed `address` redeployed under another name).
    names: (Option<Box<str>>, Option<Box<str>>),
    minute: i64,
    result: PathResult,
}

impl Cached {
    /// Bytes of `m`'s strings an entry for it would keep.
    fn size(points: &[(EnforcementPoint, &str)], m: &Message, parties: Parties<'_>) -> usize {
        let user = m.identity.as_ref().map_or(0, |i| i.user.len() + i.idp.len());
        let names = [parties.sender, parties.target].iter().flatten().map(|d| d.name.len()).sum::<usize>();
        points.iter().map(|(_, d)| d.len()).sum::<usize>() + m.from.as_str().len() + m.to.as_str().len() + m.body.resource.as_deref().map_or(0, str::len) + user + names
    }

    fn new(points: &[(EnforcementPoint, &str)], m: &Message, parties: Parties<'_>, minute: i64, result: PathResult) -> Cached {
        Cached {
            points: points.iter().map(|(p, d)| (*p, Box::<str>::from(*d))).collect(),
            from: m.from.as_str().into(),
            to: m.to.as_str().into(),
            kind: m.kind,
            resource: m.body.resource.as_deref().map(Into::into),
            user: m.identity.as_ref().map(|i| (i.user.as_str().into(), i.idp.as_str().into())),
            names: (parties.sender.map(|d| d.name.as_str().into()), parties.target.map(|d| d.name.as_str().into())),
            minute,
            result,
        }
    }

    fn is_for(&self, points: &[(EnforcementPoint, &str)], m: &Message, parties: Parties<'_>, minute: i64) -> bool {
        self.minute == minute
            && self.names.0.as_deref() == parties.sender.map(|d| d.name.as_str())
            && self.names.1.as_deref() == parties.target.map(|d| d.name.as_str())
            && self.kind == m.kind
            && &*self.from == m.from.as_str()
            && &*self.to == m.to.as_str()
            && self.resource.as_deref() == m.body.resource.as_deref()
            && self.user.as_ref().map(|(u, i)| (&**u, &**i)) == m.identity.as_ref().map(|i| (i.user.as_str(), i.idp.as_str()))
            && self.points.len() == points.len()
            && self.points.iter().zip(points).all(|((p, d), (q, e))| p == q && &**d == *e)
    }
}

/// A thread's results for one decision point and generation.
#[derive(Default)]
struct ThreadCache {
    owner: u64,
    generation: u64,
    /// Keyed by the request's hash, which is already a hash: no rehashing.
    entries: HashMap<u64, Vec<Cached>, std::hash::BuildHasherDefault<KeyHasher>>,
    len: usize,
    /// Bytes of the entries' strings.
    bytes: usize,
}

/// The identity "hasher" for keys that are hashes already.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Entries a thread keeps before starting afresh.
const CACHE_CAPACITY: usize = 16_384;
/// Bytes of strings a thread's entries keep before it starts afresh, and
/// the most one entry keeps (a larger request is decided, not kept): a
/// resource may be as long as a message.
const CACHE_BYTES: usize = 4 << 20;
const CACHE_ENTRY_BYTES: usize = 1 << 10;

thread_local! {
    static CACHE: RefCell<ThreadCache> = RefCell::default();
}

impl PolicyDecisionPoint for CedarPolicies {
    fn decide(&self, point: EnforcementPoint, domain: &str, message: &Message, parties: Parties<'_>) -> Decision {
        let state = self.snapshot();
        let result = self.cached(&state, &[(point, domain)], message, parties, |now| {
            match self.evaluate(&state, point, domain, message, parties, now) {
                Decision::Permit => Ok(()),
                denied => Err((0, denied)),
            }
        });
        result.err().map_or(Decision::Permit, |(_, decision)| decision)
    }

    fn decide_path(&self, points: &[(EnforcementPoint, &str)], message: &Message, parties: Parties<'_>) -> PathResult {
        // One version of the policies and one instant for the whole path,
        // and one cache lookup for it in the usual case.
        let state = self.snapshot();
        self.cached(&state, points, message, parties, |now| {
            for (i, (point, domain)) in points.iter().enumerate() {
                match self.evaluate(&state, *point, domain, message, parties, now) {
                    Decision::Permit => {}
                    denied => return Err((i, denied)),
                }
            }
            Ok(())
        })
    }

    /// The state's generation and, when some policy reads the time, the
    /// clock's minute: a reload, a group change or a new minute is a new
    /// version.
    fn version(&self) -> Option<Version> {
        let generation = self.generation.load(Ordering::Acquire);
        let minute = if self.timed.load(Ordering::Acquire) { self.clock.now().div_euclid(60) } else { i64::MIN };
        Some(Version { generation, minute })
    }
}

impl CedarPolicies {
    /// The result for `message` at `points` from this thread's cache, or
    /// from `decide` (given the instant) when it has none.
    fn cached(
        &self,
        state: &State,
        points: &[(EnforcementPoint, &str)],
        message: &Message,
        parties: Parties<'_>,
        decide: impl FnOnce(i64) -> PathResult,
    ) -> PathResult {
        let mut any = false;
        let mut uses_time = false;
        for (point, domain) in points {
            let compiled = match point {
                EnforcementPoint::BusAccess => state.runtime.as_ref(),
                _ => state.domains.get(*domain),
            };
            if let Some(compiled) = compiled {
                any = true;
                uses_time |= compiled.uses_time;
            }
        }
        if !any {
            return Ok(());
        }
        let now = self.clock.now();
        let minute = if uses_time { now.div_euclid(60) } else { i64::MIN };
        let resource = message.body.resource.as_deref();
        let user = message.identity.as_ref().map(|i| (i.user.as_str(), i.idp.as_str()));
        let mut h = DefaultHasher::new();
        (message.from.as_str(), message.to.as_str(), message.kind, resource, user, points, minute).hash(&mut h);
        let key = h.finish();
        let generation = state.generation;
        let hit = CACHE.with(|cache| {
            let cache = cache.borrow();
            if cache.owner != self.id || cache.generation != generation {
                return None;
            }
            cache.entries.get(&key)?.iter().find(|c| c.is_for(points, message, parties, minute)).map(|c| c.result.clone())
        });
        if let Some(result) = hit {
            return result;
        }
        let result = decide(now);
        let size = Cached::size(points, message, parties);
        if size > CACHE_ENTRY_BYTES {
            return result;
        }
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.owner != self.id || cache.generation != generation || cache.len >= CACHE_CAPACITY || cache.bytes + size > CACHE_BYTES {
                *cache = ThreadCache { owner: self.id, generation, ..ThreadCache::default() };
            }
            cache.len += 1;
            cache.bytes += size;
            cache.entries.entry(key).or_default().push(Cached::new(points, message, parties, minute, result.clone()));
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageType;

    fn kept_bytes() -> usize {
        CACHE.with(|c| c.borrow().bytes)
    }

    /// Policies read the hyperties' names: a decision kept for one
    /// receiver is not used for another at the same address (a fixed
    /// `address` redeployed under another name), whatever the generation.
    #[test]
    fn the_thread_cache_keys_on_the_parties_names() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runtime.cedar");
        std::fs::write(&file, r#"permit (principal, action, resource) when { context.target_name != "beta" };"#).unwrap();
        let policies = CedarPolicies::new();
        policies.set_runtime_policies(&file).unwrap();
        let points = [(EnforcementPoint::BusAccess, "localhost")];
        let message = Message::builder(1, MessageType::Read, "hyperty://a.example/x", "hyperty://b.example/fixed").build().unwrap();
        let described = |name: &str| Descriptor { domain: "b.example".into(), name: name.into(), user: None };
        let (alpha, beta) = (described("alpha"), described("beta"));
        let decide = |target: &Descriptor| policies.decide_path(&points, &message, Parties { sender: None, target: Some(target) }).is_ok();
        assert!(decide(&alpha));
        assert!(decide(&alpha), "kept");
        assert!(!decide(&beta), "another receiver's name is another input");
        assert!(decide(&alpha));
    }

    /// A resource may be as long as a message: what a thread keeps of its
    /// requests is bounded in bytes, and a long request is never kept.
    #[test]
    fn the_thread_cache_keeps_short_requests_only_and_at_most_cache_bytes() {
        let policies = CedarPolicies::new();
        policies.set_runtime_policies(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/runtime.cedar")).unwrap();
        let parties = Parties { sender: None, target: None };
        let points = [(EnforcementPoint::BusAccess, "localhost")];
        let request = |resource: String| {
            Message::builder(1, MessageType::Read, "hyperty://a.example/x", "hyperty://b.example/y").resource(&resource).build().unwrap()
        };
        let _ = policies.decide_path(&points, &request("short".into()), parties);
        let after_short = kept_bytes();
        assert!(after_short > 0, "a short request is kept");
        for i in 0..64 {
            let _ = policies.decide_path(&points, &request(format!("{i}{}", "r".repeat(100 << 10))), parties);
        }
        assert_eq!(kept_bytes(), after_short, "a request over {CACHE_ENTRY_BYTES} bytes is never kept");
        for i in 0..20_000 {
            let _ = policies.decide_path(&points, &request(format!("{i}{}", "r".repeat(900))), parties);
            assert!(kept_bytes() <= CACHE_BYTES);
        }
    }
}
