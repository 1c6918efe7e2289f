//! Live update (issue 20): [`Runtime::apply`] brings what runs to what a
//! bundle says, as one transaction, without losing a message.
//!
//! The difference from what runs is computed entry by entry: domains
//! (settings, policies, IdP, trusted keys), hyperties (component digest,
//! config, user, types, schemes), protostubs (digest, config, endpoints,
//! queue, preload) and IdP proxies (digest, config), each added, removed or
//! changed. Then, in this order, and nothing changed until step 3:
//!
//! 1. **Check** everything new or changed as `check` and `deploy` do (pins,
//!    signatures, contract, grants, fit to the world and the domain's
//!    limits, stub configurations, policy files, IdPs): every problem is
//!    reported, nothing changes.
//! 2. **Stage** each changed hyperty: its new version is instantiated in its
//!    domain's sandbox beside the running one, under the new limits, and
//!    its `init` called (same address, new config); the running one still
//!    takes the messages. New versions of IdP proxies are started too. A
//!    failure (init refused, trapped, the pool full) drops what was staged:
//!    every failure is reported, nothing changes.
//! 3. **Add** the new entries (as a deployment, all or nothing; a failure
//!    undoes them and drops what was staged).
//! 4. **Commit**: each staged hyperty takes its slot through the sandbox's
//!    inbox, so the messages queued before the switch are handled by the
//!    old version and every later one by the new, in order, none lost or
//!    handled twice; its route, pending requests (kept by address) and data
//!    objects (whose reporter is the address) do not move. Then domain
//!    settings, policies, identities, proxies, protostubs (a stub keeps its
//!    queue, in-flight messages and listened addresses: only its component
//!    instance is replaced) and, last, removals (a removed domain's queued
//!    messages are still answered, 404 once its hyperties are gone).
//!
//! What cannot change on a running entry is a problem of step 1: a
//! hyperty's explicit `address` (remove it, apply, add it back), a domain's
//! `limits.inbox`, `limits.inbox-bytes` and `media` (the sandbox's queue and
//! media engine are made at its start: remove the domain and add it back).

use std::fmt;

use super::*;

/// The entries of what runs (as deployed or last applied), compared with a
/// bundle by [`Runtime::apply`].
#[derive(Default)]
pub(super) struct Specs {
    /// Domain entries (their `hyperties` emptied: those are below).
    domains: BTreeMap<String, DomainSpec>,
    hyperties: BTreeMap<(String, String), HypertySpec>,
    /// Protostubs, with the stub running each.
    stubs: BTreeMap<String, (ProtostubSpec, Arc<Stub>)>,
    idps: BTreeMap<String, crate::bundle::IdpSpec>,
}

impl Specs {
    /// Records the entries of `bundle` (deployed now, with `stubs`).
    pub(super) fn record(&mut self, bundle: &Bundle, stubs: Vec<Arc<Stub>>) {
        for domain in &bundle.domains {
            for h in &domain.hyperties {
                self.hyperties.insert((domain.name.clone(), h.name.clone()), h.clone());
            }
            self.domains.insert(domain.name.clone(), DomainSpec { hyperties: Vec::new(), ..domain.clone() });
        }
        for stub in stubs {
            if let Some(spec) = bundle.protostubs.iter().find(|p| p.domain == stub.domain) {
                self.stubs.insert(stub.domain.clone(), (spec.clone(), stub));
            }
        }
        for idp in &bundle.idps {
            self.idps.insert(idp.name.clone(), idp.clone());
        }
    }

    /// Forgets hyperty `name` of `domain` (undeployed).
    pub(super) fn forget(&mut self, domain: &str, name: &str) {
        self.hyperties.remove(&(domain.to_owned(), name.to_owned()));
    }

    /// The stubs running, by remote domain.
    pub(super) fn stubs(&self) -> impl Iterator<Item = &Arc<Stub>> {
        self.stubs.values().map(|(_, stub)| stub)
    }
}

/// What [`Runtime::apply`] did to an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Added,
    Removed,
    Updated,
}

/// One change applied, in words: `updated hyperty a.example/echo at
/// hyperty://a.example/… (component sha256 1a2b3c4d → 5e6f7a8b, config)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub action: Action,
    /// The entry: `domain a.example`, `hyperty a.example/echo at <address>`,
    /// `protostub of b.example`, `IdP proxy of idp.example`.
    pub entry: String,
    /// What changed in an updated entry (`config`, `component sha256 … → …`).
    pub details: Vec<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.action {
            Action::Added => "added",
            Action::Removed => "removed",
            Action::Updated => "updated",
        };
        write!(f, "{verb} {}", self.entry)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details.join(", "))?;
        }
        Ok(())
    }
}

/// What [`Runtime::apply`] changed, in the order it did; Display: one
/// change a line, or `nothing changed`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changes: Vec<Change>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return f.write_str("nothing changed");
        }
        for (i, change) in self.changes.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{change}")?;
        }
        Ok(())
    }
}

/// `sha256 1a2b3c4d → 5e6f7a8b` (the digests' first 8 hex digits).
fn digest_change(old: Digest, new: Digest) -> String {
    let short = |d: Digest| d.to_string().chars().take(8).collect::<String>();
    format!("component sha256 {} → {}", short(old), short(new))
}

/// The digest change (if any), then the names of the fields that differ.
fn differing(digests: (Digest, Digest), fields: &[(&str, bool)]) -> Vec<String> {
    let digest = (digests.0 != digests.1).then(|| digest_change(digests.0, digests.1));
    digest.into_iter().chain(fields.iter().filter(|(_, differs)| *differs).map(|(name, _)| (*name).to_owned())).collect()
}

/// What differs between two entries of a hyperty, in words.
fn hyperty_changes(old: &HypertySpec, new: &HypertySpec) -> Vec<String> {
    differing(
        (old.sha256, new.sha256),
        &[
            ("config", old.config != new.config),
            ("user", old.user != new.user),
            ("types", old.types != new.types),
            ("schemes", old.schemes != new.schemes),
            ("keep-address", old.keep_address != new.keep_address),
        ],
    )
}

/// Whether the changes need a new instance (not only a new registration).
fn needs_instance(old: &HypertySpec, new: &HypertySpec) -> bool {
    old.sha256 != new.sha256 || old.config != new.config || old.user != new.user
}

/// What differs between two entries of a domain, in words.
fn domain_changes(old: &DomainSpec, new: &DomainSpec) -> Vec<String> {
    let s = (&old.settings, &new.settings);
    let nothing = Digest::of(b"");
    differing(
        (nothing, nothing),
        &[
        ("limits", s.0.limits != s.1.limits),
        ("restart", s.0.restart != s.1.restart),
        ("grants", s.0.grants != s.1.grants),
        ("media", s.0.media != s.1.media),
        ("policies", old.policies != new.policies),
        ("idp", old.idp != new.idp),
        ("require-identity", old.require_identity != new.require_identity),
        ("trusted-keys", old.trusted_keys != new.trusted_keys),
        ],
    )
}

fn stub_changes(old: &ProtostubSpec, new: &ProtostubSpec) -> Vec<String> {
    differing(
        (old.sha256, new.sha256),
        &[
            ("config", old.config != new.config),
            ("endpoints", old.endpoints != new.endpoints),
            ("queue", old.queue != new.queue),
            ("preload", old.preload != new.preload),
        ],
    )
}

fn idp_changes(old: &crate::bundle::IdpSpec, new: &crate::bundle::IdpSpec) -> Vec<String> {
    differing((old.sha256, new.sha256), &[("config", old.config != new.config)])
}

/// A changed hyperty, checked, to stage.
struct Replacement {
    domain: usize,
    hyperty: usize,
    instance: u32,
    address: Address,
    pre: HypertyPre<InstanceState>,
    details: Vec<String>,
}

/// A problem about the domain entry `domain` (no line of its own).
fn domain_problem(bundle: &Bundle, domain: &str, field: &str, message: String) -> Problem {
    let field = if field.is_empty() { format!("domains.{domain:?}") } else { format!("domains.{domain:?}.{field}") };
    Problem { file: bundle.path.clone(), line: None, field, message }
}

impl Runtime {
    /// Brings what runs to what `bundle` says (see [`crate::runtime`]'s
    /// `update` module doc): entries added, removed or changed, checked
    /// first and applied as one transaction. A changed hyperty keeps its
    /// address, its queued messages (handled in order by the new version
    /// once its `init` succeeded), its pending requests and its data
    /// objects; a changed protostub keeps its queue and listened
    /// addresses. Errors: every problem found by the checks, or every
    /// new version that failed to start; then nothing changed. Each change
    /// is logged (info) and listed in the [`Applied`].
    pub fn apply(&self, bundle: &Bundle) -> Result<Applied, BundleError> {
        let mut deployed = self.deployed.lock().unwrap();
        let deployed = &mut *deployed;
        let mut problems = Vec::new();
        let mut files = HashMap::new();
        let mut changes = Vec::new();
        let specs = &deployed.specs;

        // Which IdP proxies run after the update: the bundle's.
        let will_have_proxy = |idp: &str| bundle.idps.iter().any(|i| i.name == idp);

        // IdP proxies.
        let mut new_idps = Vec::new();
        let mut changed_idps = Vec::new();
        for (i, idp) in bundle.idps.iter().enumerate() {
            let details = match specs.idps.get(&idp.name) {
                Some(old) => idp_changes(old, idp),
                None if self.identities.has_proxy(&idp.name) => {
                    problems.push(bundle.problem(&idp.at, "component", format!("the IdP proxy of {} already runs", idp.name)));
                    continue;
                }
                None => Vec::new(),
            };
            let running = specs.idps.contains_key(&idp.name);
            if running && details.is_empty() {
                continue;
            }
            match self.load(&mut files, bundle, &idp.at, &idp.component, idp.sha256, &default_grants(), identity::prepare) {
                Ok(pre) if running => changed_idps.push((i, pre, details)),
                Ok(_) => new_idps.push(i),
                Err(problem) => problems.push(problem),
            }
        }

        // Protostubs.
        let mut new_stubs = Vec::new();
        let mut changed_stubs = Vec::new();
        for (i, spec) in bundle.protostubs.iter().enumerate() {
            let details = match specs.stubs.get(&spec.domain) {
                Some((old, _)) if old.durable != spec.durable => {
                    let why = format!("the protostub of {} runs with durable = {}, which cannot change while it runs: remove the entry, apply, then add it back", spec.domain, old.durable);
                    problems.push(bundle.problem(&spec.at, "durable", why));
                    continue;
                }
                Some((old, _)) => stub_changes(old, spec),
                None if self.bus.carries(&spec.domain) => {
                    problems.push(bundle.problem(&spec.at, "component", format!("a protostub for {} already runs", spec.domain)));
                    continue;
                }
                None => Vec::new(),
            };
            let running = specs.stubs.contains_key(&spec.domain);
            if running && details.is_empty() {
                continue;
            }
            match self.prepare_stub(&mut files, bundle, spec) {
                Ok(pre) if running => changed_stubs.push((i, pre, details)),
                Ok(_) => new_stubs.push(i),
                Err(problem) => problems.push(problem),
            }
        }

        // Domains and their hyperties.
        let mut new_hyperties: Vec<(usize, usize)> = Vec::new();
        let mut replacements: Vec<Replacement> = Vec::new();
        let mut reregistered: Vec<(usize, usize, Vec<String>)> = Vec::new();
        let mut changed_domains: Vec<(usize, Vec<String>)> = Vec::new();
        for (d, domain) in bundle.domains.iter().enumerate() {
            problems.extend(self.check_domain(bundle, domain, &will_have_proxy));
            let old_domain = specs.domains.get(&domain.name).filter(|_| deployed.sandboxes.contains_key(&domain.name));
            let domain_details = old_domain.map(|old| domain_changes(old, domain)).unwrap_or_default();
            if let Some(old) = old_domain {
                let (old_limits, new_limits) = (&old.settings.limits, &domain.settings.limits);
                if (old_limits.inbox, old_limits.inbox_bytes) != (new_limits.inbox, new_limits.inbox_bytes) || old.settings.media != domain.settings.media {
                    let message = format!(
                        "{} runs with another inbox size or media settings, which cannot change while it runs: remove the domain, apply, then add it back",
                        domain.name
                    );
                    problems.push(domain_problem(bundle, &domain.name, "", message));
                }
                if !domain_details.is_empty() {
                    changed_domains.push((d, domain_details.clone()));
                }
            }
            let settings_changed = old_domain.is_some_and(|old| old.settings != domain.settings);
            let keys_changed = old_domain.is_some_and(|old| old.trusted_keys != domain.trusted_keys);
            let mut fitted = HashMap::new();
            for (h, hyperty) in domain.hyperties.iter().enumerate() {
                let key = (domain.name.clone(), hyperty.name.clone());
                let running = deployed.hyperties.iter().find(|r| r.hyperty.domain == domain.name && r.hyperty.name == hyperty.name);
                let (Some(old), Some(running)) = (specs.hyperties.get(&key), running) else {
                    if self.registry.lookup(&domain.name, &hyperty.name).is_some() {
                        let message = format!("{}/{} is already deployed", domain.name, hyperty.name);
                        problems.push(bundle.problem(&hyperty.at, "name", message));
                        continue;
                    }
                    match self.prepare_hyperty(&mut files, &mut fitted, bundle, domain, hyperty) {
                        Ok(_) => new_hyperties.push((d, h)),
                        Err(problem) => problems.push(problem),
                    }
                    continue;
                };
                if old.address != hyperty.address {
                    let message = format!(
                        "{}/{} runs at {}: its address cannot change while it runs (remove it, apply, then add it back)",
                        domain.name, hyperty.name, running.hyperty.address
                    );
                    problems.push(bundle.problem(&hyperty.at, "address", message));
                    continue;
                }
                let mut details = hyperty_changes(old, hyperty);
                let instance = needs_instance(old, hyperty) || settings_changed;
                if !instance && !keys_changed {
                    if !details.is_empty() {
                        reregistered.push((d, h, details));
                    }
                    continue;
                }
                match self.prepare_hyperty(&mut files, &mut fitted, bundle, domain, hyperty) {
                    Ok(pre) if instance => {
                        if settings_changed {
                            details.push("domain settings".to_owned());
                        }
                        replacements.push(Replacement {
                            domain: d,
                            hyperty: h,
                            instance: running.instance,
                            address: running.hyperty.address.clone(),
                            pre,
                            details,
                        });
                    }
                    Ok(_) if !details.is_empty() => reregistered.push((d, h, details)),
                    Ok(_) => {}
                    Err(problem) => problems.push(problem),
                }
            }
        }
        let removed_domains: Vec<String> =
            deployed.sandboxes.keys().filter(|name| !bundle.domains.iter().any(|d| &d.name == *name)).cloned().collect();
        let removed_hyperties: Vec<usize> = (0..deployed.hyperties.len())
            .filter(|&i| {
                let h = &deployed.hyperties[i].hyperty;
                !bundle.domains.iter().any(|d| d.name == h.domain && d.hyperties.iter().any(|s| s.name == h.name))
            })
            .collect();
        let removed_stubs: Vec<String> =
            specs.stubs.keys().filter(|domain| !bundle.protostubs.iter().any(|p| &p.domain == *domain)).cloned().collect();
        let removed_idps: Vec<String> = specs.idps.keys().filter(|name| !will_have_proxy(name)).cloned().collect();
        if !problems.is_empty() {
            tracing::error!("update to bundle {} refused: {} problems", bundle.name, problems.len());
            return Err(BundleError { problems });
        }

        // Stage: the new versions, beside what runs.
        let mut staged: Vec<Replacement> = Vec::new();
        for r in replacements {
            let domain = &bundle.domains[r.domain];
            let spec = &domain.hyperties[r.hyperty];
            let new = NewHyperty {
                pre: r.pre.clone(),
                address: r.address.clone(),
                label: format!("{}/{}", domain.name, spec.name).into(),
                descriptor: Arc::new(Descriptor { domain: domain.name.clone(), name: spec.name.clone(), user: spec.user.clone() }),
                config: spec.config.clone(),
            };
            match deployed.sandboxes[&domain.name].stage(r.instance, new, &domain.settings.limits) {
                Ok(()) => staged.push(r),
                Err(e) => problems.push(bundle.problem(&spec.at, "component", format!("{}/{}: the new version failed: {e:#}", domain.name, spec.name))),
            }
        }
        let mut proxies = Vec::new();
        for (i, pre, details) in changed_idps {
            let spec = &bundle.idps[i];
            match Proxy::start(&spec.name, pre, spec.config.clone(), self.engine.epoch().clone()) {
                Ok(proxy) => proxies.push((i, proxy, details)),
                Err(e) => problems.push(bundle.problem(&spec.at, "component", format!("IdP proxy {}: the new version failed: {e:#}", spec.name))),
            }
        }
        let abort = |deployed: &Deployed, staged: &[Replacement]| {
            for r in staged {
                deployed.sandboxes[&bundle.domains[r.domain].name].abort(r.instance);
            }
        };
        if !problems.is_empty() {
            abort(deployed, &staged);
            tracing::error!("update to bundle {} refused: {} new versions failed", bundle.name, problems.len());
            return Err(BundleError { problems });
        }

        // Add: the new entries, as one deployment.
        let delta = Bundle {
            domains: bundle
                .domains
                .iter()
                .enumerate()
                .filter(|(d, domain)| !deployed.sandboxes.contains_key(&domain.name) || new_hyperties.iter().any(|(nd, _)| nd == d))
                .map(|(d, domain)| DomainSpec {
                    hyperties: new_hyperties.iter().filter(|(nd, _)| *nd == d).map(|&(_, h)| domain.hyperties[h].clone()).collect(),
                    ..domain.clone()
                })
                .collect(),
            idps: new_idps.iter().map(|&i| bundle.idps[i].clone()).collect(),
            protostubs: new_stubs.iter().map(|&i| bundle.protostubs[i].clone()).collect(),
            ..bundle.clone()
        };
        let identities_before: Vec<(String, DomainIdentity)> =
            delta.domains.iter().map(|d| (d.name.clone(), self.identities.domain(&d.name))).collect();
        let policies_before: Vec<(String, Vec<PathBuf>)> =
            delta.domains.iter().map(|d| (d.name.clone(), self.policies.domain_policies(&d.name))).collect();
        let ran: Vec<String> = deployed.sandboxes.keys().cloned().collect();
        let added = self.prepare_entries(&delta, &mut files).and_then(|plan| self.start_plan(&delta, plan, deployed));
        let added = match added {
            Ok(added) => added,
            Err(e) => {
                abort(deployed, &staged);
                for (domain, identity) in identities_before.into_iter().filter(|(d, _)| deployed.sandboxes.contains_key(d)) {
                    self.identities.set_domain(&domain, identity);
                }
                for (domain, files) in policies_before.into_iter().filter(|(d, _)| deployed.sandboxes.contains_key(d)) {
                    let _ = self.policies.set_domain_policies(&domain, &files);
                }
                tracing::error!("update to bundle {} refused: {e}", bundle.name);
                return Err(e);
            }
        };
        for domain in delta.domains.iter().filter(|d| !ran.contains(&d.name)) {
            changes.push(Change { action: Action::Added, entry: format!("domain {}", domain.name), details: Vec::new() });
        }
        for idp in &delta.idps {
            changes.push(Change { action: Action::Added, entry: format!("IdP proxy of {}", idp.name), details: Vec::new() });
        }
        for stub in &delta.protostubs {
            changes.push(Change { action: Action::Added, entry: format!("protostub of {}", stub.domain), details: Vec::new() });
        }
        for h in &added {
            changes.push(Change { action: Action::Added, entry: format!("hyperty {}/{} at {}", h.domain, h.name, h.address), details: Vec::new() });
        }

        // Commit.
        for (d, details) in &changed_domains {
            let domain = &bundle.domains[*d];
            self.identities.set_domain(&domain.name, domain_identity(domain));
            if let Err(e) = self.policies.set_domain_policies(&domain.name, &domain.policies) {
                tracing::error!("policies of {}: {e}", domain.name);
            }
            let sandbox = deployed.sandboxes.get_mut(&domain.name).expect("a changed domain runs");
            if sandbox.settings != domain.settings {
                sandbox.configure(domain.settings.clone());
            }
            changes.push(Change { action: Action::Updated, entry: format!("domain {}", domain.name), details: details.clone() });
        }
        for (i, proxy, details) in proxies {
            let spec = &bundle.idps[i];
            self.identities.replace_proxy(&spec.name, proxy);
            changes.push(Change { action: Action::Updated, entry: format!("IdP proxy of {}", spec.name), details });
        }
        for r in staged {
            let domain = &bundle.domains[r.domain];
            let spec = &domain.hyperties[r.hyperty];
            let sandbox = &deployed.sandboxes[&domain.name];
            sandbox.commit(r.instance);
            let descriptor = Arc::new(Descriptor { domain: domain.name.clone(), name: spec.name.clone(), user: spec.user.clone() });
            self.bus.replace_route(&r.address, sandbox.inbox().route(r.instance, descriptor));
            self.reregister(domain, spec, &r.address);
            changes.push(Change {
                action: Action::Updated,
                entry: format!("hyperty {}/{} at {}", domain.name, spec.name, r.address),
                details: r.details,
            });
        }
        for (d, h, details) in reregistered {
            let domain = &bundle.domains[d];
            let spec = &domain.hyperties[h];
            if let Some(address) = self.registry.lookup(&domain.name, &spec.name) {
                self.reregister(domain, spec, &address);
                changes.push(Change { action: Action::Updated, entry: format!("hyperty {}/{} at {address}", domain.name, spec.name), details });
            }
        }
        for (i, pre, details) in changed_stubs {
            let spec = &bundle.protostubs[i];
            if let Some((_, stub)) = deployed.specs.stubs.get(&spec.domain) {
                stub.update(self.stub_context(spec, pre), spec.queue);
                if spec.preload {
                    stub.ensure_started();
                }
            }
            changes.push(Change { action: Action::Updated, entry: format!("protostub of {}", spec.domain), details });
        }

        // Removals, last: what was removed is still there for the messages
        // the commits above had queued.
        for i in removed_hyperties.into_iter().rev() {
            let running = deployed.hyperties.remove(i);
            self.stop(deployed, &running);
            let h = running.hyperty;
            changes.push(Change { action: Action::Removed, entry: format!("hyperty {}/{} at {}", h.domain, h.name, h.address), details: Vec::new() });
        }
        for domain in removed_domains {
            if let Some(sandbox) = deployed.sandboxes.remove(&domain) {
                sandbox.retire();
            }
            let _ = self.policies.set_domain_policies(&domain, &[]);
            self.identities.remove_domain(&domain);
            changes.push(Change { action: Action::Removed, entry: format!("domain {domain}"), details: Vec::new() });
        }
        for domain in removed_stubs {
            self.stop_stub(&domain);
            changes.push(Change { action: Action::Removed, entry: format!("protostub of {domain}"), details: Vec::new() });
        }
        for name in removed_idps {
            self.stop_idp(&name);
            changes.push(Change { action: Action::Removed, entry: format!("IdP proxy of {name}"), details: Vec::new() });
        }

        // What runs now is what the bundle says.
        let stubs: Vec<Arc<Stub>> = deployed.specs.stubs().cloned().collect();
        deployed.specs = Specs::default();
        deployed.specs.record(bundle, stubs.into_iter().filter(|s| bundle.protostubs.iter().any(|p| p.domain == s.domain)).collect());
        let applied = Applied { changes };
        for change in &applied.changes {
            tracing::info!("{change}");
        }
        Ok(applied)
    }

    /// Checks every entry of `bundle`, none of which runs, into a plan
    /// ([`Runtime::prepare`] without the clashes with what runs).
    fn prepare_entries(&self, bundle: &Bundle, files: &mut HashMap<PathBuf, (Vec<u8>, Digest)>) -> Result<Plan, BundleError> {
        let mut problems = Vec::new();
        let mut plan = Plan { hyperties: Vec::new(), idps: Vec::new(), stubs: Vec::new() };
        for (i, idp) in bundle.idps.iter().enumerate() {
            match self.load(files, bundle, &idp.at, &idp.component, idp.sha256, &default_grants(), identity::prepare) {
                Ok(pre) => plan.idps.push((i, pre)),
                Err(problem) => problems.push(problem),
            }
        }
        for (i, spec) in bundle.protostubs.iter().enumerate() {
            match self.prepare_stub(files, bundle, spec) {
                Ok(pre) => plan.stubs.push((i, pre)),
                Err(problem) => problems.push(problem),
            }
        }
        for (d, domain) in bundle.domains.iter().enumerate() {
            let mut fitted = HashMap::new();
            for (h, hyperty) in domain.hyperties.iter().enumerate() {
                match self.prepare_hyperty(files, &mut fitted, bundle, domain, hyperty) {
                    Ok(pre) => plan.hyperties.push(Prepared { domain: d, hyperty: h, pre }),
                    Err(problem) => problems.push(problem),
                }
            }
        }
        if problems.is_empty() { Ok(plan) } else { Err(BundleError { problems }) }
    }

    /// Registers hyperty `spec` of `domain` at `address` again, as its
    /// entry says now (user, types, schemes), keeping its status.
    fn reregister(&self, domain: &DomainSpec, spec: &HypertySpec, address: &Address) {
        self.registry.unregister(&domain.name, &spec.name);
        self.registry.register(Registration {
            address: address.clone(),
            kind: Kind::Hyperty,
            name: spec.name.clone(),
            domain: domain.name.clone(),
            user: spec.user.clone(),
            hyperty_types: spec.types.clone(),
            schemes: spec.schemes.clone(),
            status: Status::Live,
        });
    }
}

/// How [`Runtime::watch_bundle`] last saw the bundle file: modification
/// time and length, then the digest of its content.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    modified: Option<std::time::SystemTime>,
    len: u64,
}

/// A bundle file as it was when first seen, for [`Runtime::watch_bundle`]:
/// take it before loading the bundle deployed first, so that no edit saved
/// in between is missed.
pub struct BundleWatch {
    path: PathBuf,
    last: (Option<Seen>, Option<Digest>),
}

impl BundleWatch {
    pub fn new(path: &std::path::Path) -> BundleWatch {
        BundleWatch { path: path.to_owned(), last: (seen(path), content_digest(path)) }
    }
}

fn seen(path: &std::path::Path) -> Option<Seen> {
    std::fs::metadata(path).ok().map(|m| Seen { modified: m.modified().ok(), len: m.len() })
}

fn content_digest(path: &std::path::Path) -> Option<Digest> {
    std::fs::read(path).ok().map(|b| Digest::of(&b))
}

impl Runtime {
    /// Applies the bundle file of `watch` whenever its content changes, until
    /// `stop` says so (or is dropped): its modification time and length
    /// are read every `every`, and when they change its content's digest
    /// decides. Each applied change is logged (info); a bundle that does not
    /// load or apply (syntax error, bad pin, a component that does not fit,
    /// a failing init) is logged as an error with every problem, and
    /// nothing running changes. Re-applying a previous file rolls back.
    pub fn watch_bundle(&self, watch: BundleWatch, every: Duration, stop: std::sync::mpsc::Receiver<()>) {
        let BundleWatch { path, mut last } = watch;
        let path = path.as_path();
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
            let now = seen(path);
            if now == last.0 {
                continue;
            }
            let content = content_digest(path);
            let changed = content != last.1;
            last = (now, content);
            if !changed {
                continue;
            }
            let Some(_) = content else {
                tracing::error!("bundle {}: cannot read it; what runs stays", path.display());
                continue;
            };
            match Bundle::load(path).and_then(|bundle| self.apply(&bundle)) {
                Ok(applied) if applied.is_empty() => tracing::info!("bundle {} changed: nothing to apply", path.display()),
                Ok(applied) => tracing::info!("bundle {} applied ({} changes)", path.display(), applied.changes.len()),
                Err(e) => tracing::error!("bundle {} not applied, nothing running changed: {e}", path.display()),
            }
        }
    }
}
