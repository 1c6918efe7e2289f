//! Bundle manifests: which provider domains to run and, per domain, its
//! limits and its hyperty components, each pinned by sha256.
//!
//! ```toml
//! name = "ping-pong"
//! engine = "pulley"   # optional: how `hyperty run` executes it (default cranelift; --engine overrides)
//!
//! [domains."alice.example"]
//! limits = { inbox = 256, memory-mb = 32 }         # see sandbox::limits::Limits
//! restart = { policy = "backoff", initial-backoff-ms = 100, max-backoff-ms = 30000 }
//! grants = ["clocks", "random"]                     # the default; also "filesystem", "sockets", "media"
//! media = { bind = "127.0.0.1", ports = "40000-40100" } # with "media": see media::MediaSettings
//! trusted-keys = ["ed25519:…"]                      # optional: require signed components
//! policies = ["alice.cedar"]                        # optional: Cedar policies of the domain
//!
//! [[domains."alice.example".hyperties]]
//! name = "ping"
//! component = "ping.wasm"          # relative to this file
//! sha256 = "9f86d0…"               # 64 hex digits
//! signature = "ping.wasm.sig"      # the default; checked when the domain trusts keys
//! config = { peer = "bob.example/pong", rounds = 3 }
//! user = "alice@idp.example"       # optional: the user it acts for
//! address = "hyperty://alice.example/ping-1"  # optional: this exact address (its domain's, free)
//!
//! # optional: an IdP proxy (world `idp-proxy`); a domain names it with
//! # `idp = "idp.example"` to have its users' identities asserted by it, and
//! # then requires asserted identities of messages from other domains
//! # (`require-identity = false` to accept anonymous ones).
//! [idps."idp.example"]
//! component = "idp-jwt.wasm"
//! sha256 = "…"
//! config = { issuer = "idp.example", signing-key = "…" }
//!
//! # optional: the app gateway (see ARCHITECTURE.md, "Gateway"), started by
//! # `hyperty run` when present; its flags (`--gateway` …) override it.
//! [gateway]
//! listen = "127.0.0.1:8080"            # the default
//! origins = ["http://127.0.0.1:8080"]  # default: the gateway's own origin only
//! static = "app"                       # files served over HTTP, relative to this file
//! [gateway.dev-users]                  # development mode: logins without assertion
//! "alice.example" = ["alice@alice.example"]
//! ```
//!
//! Every problem is reported as a [`Problem`] naming the file, the line and
//! the field, and all problems are collected rather than stopping at the
//! first, so `hyperty check` can list them at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::address::validate_domain;
use crate::engine::Digest;
use crate::signing::PublicKey;
use crate::sandbox::SandboxSettings;
use crate::sandbox::limits::{Grant, Limits, RestartPolicy, default_grants};

mod builder;
pub use builder::{BundleBuilder, Component, Domain, Hyperty, Idp, Protostub};

/// A parsed, statically valid bundle manifest.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub path: PathBuf,
    pub name: String,
    pub domains: Vec<DomainSpec>,
    /// IdP proxies, by the name of their identity provider.
    pub idps: Vec<IdpSpec>,
    /// Protostubs, by the domain they carry messages to.
    pub protostubs: Vec<ProtostubSpec>,
    /// Components given as bytes ([`Bundle::builder`]), by the path their
    /// entries name (`<memory>/<name>`); see [`Bundle::read_component`].
    pub components: BTreeMap<PathBuf, std::sync::Arc<[u8]>>,
    /// The `[gateway]` section, if any.
    pub gateway: Option<GatewaySpec>,
    /// The engine `hyperty run` executes it on (`engine`; `None`: the
    /// runtime's, Cranelift unless `--engine` says otherwise).
    pub engine: Option<crate::EngineKind>,
}

/// The `[gateway]` section of a bundle: how `hyperty run` serves the app
/// gateway ([`crate::gateway`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewaySpec {
    /// Where to listen (`listen`; `None`: the CLI's default).
    pub listen: Option<std::net::SocketAddr>,
    /// Page origins allowed to connect (`origins`, RFC 6454 serialized:
    /// `scheme://host[:port]`); empty: the gateway's own.
    pub origins: Vec<String>,
    /// The directory of static files (`static`), resolved against the
    /// manifest's directory.
    pub static_dir: Option<PathBuf>,
    /// Development users by domain (`dev-users`): a login naming one of
    /// them needs no assertion.
    pub dev_users: BTreeMap<String, Vec<String>>,
}

/// A protostub of a bundle: how to reach a domain that runs elsewhere.
#[derive(Clone, Debug)]
pub struct ProtostubSpec {
    /// The domain whose messages it carries.
    pub domain: String,
    pub component: PathBuf,
    pub sha256: Digest,
    /// The `config` table as JSON text, handed to the stub's `init` (node
    /// addresses, credentials).
    pub config: String,
    /// The only `ip:port` endpoints the stub may connect to.
    pub endpoints: Vec<std::net::SocketAddr>,
    /// Outbound messages held while the node is unreachable (default 1000);
    /// beyond that, senders are answered 503.
    pub queue: usize,
    /// Start at deployment rather than on the first message for the domain
    /// (a stub whose domain has hyperties here always starts at once: it
    /// listens for them).
    pub preload: bool,
    /// Durable delivery (`durable = true`): the queue is kept in the data
    /// directory until the far end acknowledged each message, and the stub
    /// is told to use its node's durable delivery (JetStream for NATS).
    pub durable: bool,
    pub at: Location,
}

/// An IdP proxy of a bundle.
#[derive(Clone, Debug)]
pub struct IdpSpec {
    /// The identity provider's name (a domain name: users are `<name>@<idp>`).
    pub name: String,
    pub component: PathBuf,
    pub sha256: Digest,
    /// The `config` table as JSON text, handed to the proxy's `init`: its
    /// keys come from here, never from its code.
    pub config: String,
    pub at: Location,
}

/// One provider domain of a bundle.
#[derive(Clone, Debug)]
pub struct DomainSpec {
    pub name: String,
    /// If not empty, every component of the domain must carry a signature
    /// by one of these keys.
    pub trusted_keys: Vec<PublicKey>,
    /// Cedar policy files of the domain (resolved), for its outgoing and
    /// incoming enforcement points.
    pub policies: Vec<PathBuf>,
    /// The IdP vouching for the domain's users (see [`crate::identity`]).
    pub idp: Option<String>,
    /// Whether messages from other domains must carry an identity
    /// assertion (`require-identity`; by default, when the domain has an IdP).
    pub require_identity: bool,
    /// Limits, restart policy and WASI grants of the domain's sandbox.
    pub settings: SandboxSettings,
    pub hyperties: Vec<HypertySpec>,
}

/// One hyperty of a domain.
#[derive(Clone, Debug)]
pub struct HypertySpec {
    pub name: String,
    /// The component file, resolved against the manifest's directory.
    pub component: PathBuf,
    pub sha256: Digest,
    /// The detached signature file: `signature`, else `<component>.sig`.
    pub signature: PathBuf,
    /// The user identity the hyperty acts for (policies read it).
    pub user: Option<String>,
    /// reTHINK hyperty types it offers (chat, audio, ...), for discovery.
    pub types: Vec<String>,
    /// Data-object schemes it handles (comm, connection, ...), for discovery.
    pub schemes: Vec<String>,
    /// Get the same address at every deployment, across runtime restarts
    /// (needs a runtime data directory).
    pub keep_address: bool,
    /// The exact address asked for (`address`): a `hyperty://` address of
    /// the entry's own domain (checked when the bundle is read), not taken
    /// by anything routed in the runtime (checked at deployment). reTHINK
    /// deployed at a given address to reuse it by URL.
    pub address: Option<crate::address::Address>,
    /// The `config` table as JSON text, handed to the hyperty's `init`.
    pub config: String,
    /// Where the entry is, for problems found later (digest, component).
    pub at: Location,
}

impl HypertySpec {
    /// The manifest field its address comes from: `address` when it sets
    /// one, else `name` (for problems about the address).
    pub fn address_field(&self) -> &'static str {
        if self.address.is_some() { "address" } else { "name" }
    }
}

/// Where in the manifest an entry is: the field path and the lines of its
/// `component` and `sha256` keys.
#[derive(Clone, Debug)]
pub struct Location {
    pub field: String,
    pub component_line: usize,
    pub sha256_line: usize,
}

/// A problem with a bundle, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// The field path, e.g. `domains."alice.example".hyperties[0].sha256`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One or more problems that stopped a bundle from loading or deploying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "{n} problem{} in the bundle", if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BundleError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundle {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    domains: BTreeMap<Spanned<String>, RawDomain>,
    #[serde(default)]
    idps: BTreeMap<Spanned<String>, RawIdp>,
    #[serde(default)]
    protostubs: BTreeMap<Spanned<String>, RawProtostub>,
    #[serde(default)]
    gateway: Option<RawGateway>,
    #[serde(default)]
    engine: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawGateway {
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default)]
    origins: Vec<Spanned<String>>,
    #[serde(default, rename = "static")]
    static_dir: Option<String>,
    #[serde(default)]
    dev_users: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtostub {
    component: Spanned<String>,
    sha256: Spanned<String>,
    #[serde(default)]
    config: Option<toml::Table>,
    endpoints: Spanned<Vec<String>>,
    #[serde(default)]
    queue: Option<Spanned<usize>>,
    #[serde(default)]
    preload: bool,
    #[serde(default)]
    durable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdp {
    component: Spanned<String>,
    sha256: Spanned<String>,
    #[serde(default)]
    config: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDomain {
    #[serde(default)]
    limits: Option<Spanned<Limits>>,
    #[serde(default)]
    restart: Option<Spanned<RestartPolicy>>,
    #[serde(default = "default_grants")]
    grants: Vec<Grant>,
    #[serde(default)]
    media: Option<Spanned<crate::media::settings::RawMedia>>,
    #[serde(default)]
    trusted_keys: Vec<PublicKey>,
    #[serde(default)]
    policies: Vec<String>,
    #[serde(default)]
    idp: Option<Spanned<String>>,
    #[serde(default)]
    require_identity: Option<bool>,
    #[serde(default)]
    hyperties: Vec<RawHyperty>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawHyperty {
    name: Spanned<String>,
    component: Spanned<String>,
    sha256: Spanned<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    types: Vec<String>,
    #[serde(default)]
    schemes: Vec<String>,
    #[serde(default)]
    keep_address: bool,
    #[serde(default)]
    address: Option<Spanned<String>>,
    #[serde(default)]
    config: Option<toml::Table>,
}

impl Bundle {
    /// Reads and checks the manifest at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Bundle, BundleError> {
        let path = path.as_ref();
        let problem = |line, message| BundleError { problems: vec![Problem { file: path.to_owned(), line, field: String::new(), message }] };
        let bytes = std::fs::read(path).map_err(|e| problem(None, format!("cannot read: {e}")))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let line = line_of(std::str::from_utf8(&e.as_bytes()[..at]).expect("valid up to there"), at);
            problem(Some(line), format!("not UTF-8: invalid byte 0x{:02x} at byte offset {at}", e.as_bytes()[at]))
        })?;
        Bundle::parse(&text, path)
    }

    /// Parses manifest `text`; `path` locates it (component paths are
    /// relative to its directory) and names it in problems.
    pub fn parse(text: &str, path: &Path) -> Result<Bundle, BundleError> {
        let lines = Lines::new(text);
        let problem = |span: Option<Range<usize>>, field: String, message: String| Problem {
            file: path.to_owned(),
            line: span.map(|s| lines.line(s.start)),
            field,
            message,
        };
        let raw: RawBundle = toml::from_str(text).map_err(|e| {
            let mut message = e.message().trim().to_owned();
            // toml says "overflowed" of any integer it cannot convert.
            if let Some(literal) = e.span().and_then(|s| text.get(s)).filter(|_| message == "integer number overflowed") {
                message = integer_problem(literal);
            }
            BundleError { problems: vec![problem(e.span(), String::new(), message)] }
        })?;
        let not_json = values_json_cannot_carry(text);
        if !not_json.is_empty() {
            return Err(BundleError {
                problems: not_json.into_iter().map(|(span, field, message)| problem(Some(span), field, message)).collect(),
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut problems = Vec::new();
        let mut domains = Vec::new();
        if raw.domains.is_empty() && raw.protostubs.is_empty() {
            problems.push(problem(None, "domains".into(), "the bundle names no provider domain".into()));
        }
        for (domain_key, raw_domain) in raw.domains {
            let domain = domain_key.get_ref().clone();
            let dfield = format!("domains.{domain:?}");
            if let Err(e) = validate_domain(&domain) {
                problems.push(problem(Some(domain_key.span()), dfield.clone(), e));
            }
            let limits = checked(raw_domain.limits, Limits::validate, &mut |span, e| {
                problems.push(problem(Some(span), format!("{dfield}.limits"), e));
            });
            let restart = checked(raw_domain.restart, RestartPolicy::validate, &mut |span, e| {
                problems.push(problem(Some(span), format!("{dfield}.restart"), e));
            });
            let mut grants = raw_domain.grants;
            grants.sort();
            grants.dedup();
            let media = media_settings(raw_domain.media, grants.contains(&Grant::Media), &mut |span, e| {
                problems.push(problem(span.or(Some(domain_key.span())), format!("{dfield}.media"), e));
            });
            let mut hyperties: Vec<HypertySpec> = Vec::new();
            // Names and asked addresses of the domain's entries so far, to
            // find one named twice in O(1) (bundles have 10,000 entries).
            let mut names: HashSet<String> = HashSet::new();
            let mut addresses: HashMap<crate::address::Address, usize> = HashMap::new();
            for (i, h) in raw_domain.hyperties.into_iter().enumerate() {
                let hfield = format!("{dfield}.hyperties[{i}]");
                let name = h.name.get_ref().clone();
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                    problems.push(problem(Some(h.name.span()), format!("{hfield}.name"), format!("{name:?} is not a name (letters, digits, -, _, .)")));
                } else if !names.insert(name.clone()) {
                    problems.push(problem(Some(h.name.span()), format!("{hfield}.name"), format!("{domain}/{name} is named twice")));
                }
                let sha256 = Digest::parse(h.sha256.get_ref()).unwrap_or_else(|e| {
                    problems.push(problem(Some(h.sha256.span()), format!("{hfield}.sha256"), e));
                    Digest([0; 32])
                });
                let address = h.address.and_then(|a| {
                    let checked = hyperty_address(a.get_ref(), &domain, h.keep_address).and_then(|address| {
                        match addresses.get(&address) {
                            Some(&other) => Err(format!("{address} is taken: {domain}/{} asks for it too", hyperties[other].name)),
                            None => {
                                addresses.insert(address.clone(), hyperties.len());
                                Ok(address)
                            }
                        }
                    });
                    checked.map_err(|e| problems.push(problem(Some(a.span()), format!("{hfield}.address"), e))).ok()
                });
                let config = config_json(h.config);
                let component = base.join(h.component.get_ref());
                let signature = match &h.signature {
                    Some(path) => base.join(path),
                    None => signature_path(&component),
                };
                hyperties.push(HypertySpec {
                    name,
                    component,
                    signature,
                    user: h.user,
                    types: h.types,
                    schemes: h.schemes,
                    keep_address: h.keep_address,
                    address,
                    sha256,
                    config,
                    at: Location {
                        field: hfield,
                        component_line: lines.line(h.component.span().start),
                        sha256_line: lines.line(h.sha256.span().start),
                    },
                });
            }
            if hyperties.is_empty() {
                problems.push(problem(Some(domain_key.span()), format!("{dfield}.hyperties"), "the domain has no hyperty".into()));
            }
            let policies = raw_domain.policies.iter().map(|p| base.join(p)).collect();
            let idp = raw_domain.idp.map(|idp| {
                if let Err(e) = validate_domain(idp.get_ref()) {
                    problems.push(problem(Some(idp.span()), format!("{dfield}.idp"), format!("not an IdP name: {e}")));
                }
                idp.into_inner()
            });
            domains.push(DomainSpec {
                name: domain,
                trusted_keys: raw_domain.trusted_keys,
                policies,
                require_identity: raw_domain.require_identity.unwrap_or(idp.is_some()),
                idp,
                settings: SandboxSettings { limits, restart, grants, media },
                hyperties,
            });
        }
        let mut idps = Vec::new();
        for (key, raw_idp) in raw.idps {
            let name = key.get_ref().clone();
            let field = format!("idps.{name:?}");
            if let Err(e) = validate_domain(&name) {
                problems.push(problem(Some(key.span()), field.clone(), format!("not an IdP name: {e}")));
            }
            let sha256 = Digest::parse(raw_idp.sha256.get_ref()).unwrap_or_else(|e| {
                problems.push(problem(Some(raw_idp.sha256.span()), format!("{field}.sha256"), e));
                Digest([0; 32])
            });
            idps.push(IdpSpec {
                name,
                component: base.join(raw_idp.component.get_ref()),
                sha256,
                config: config_json(raw_idp.config),
                at: Location {
                    field,
                    component_line: lines.line(raw_idp.component.span().start),
                    sha256_line: lines.line(raw_idp.sha256.span().start),
                },
            });
        }
        let mut protostubs = Vec::new();
        for (key, raw_stub) in raw.protostubs {
            let domain = key.get_ref().clone();
            let field = format!("protostubs.{domain:?}");
            if let Err(e) = validate_domain(&domain) {
                problems.push(problem(Some(key.span()), field.clone(), e));
            }
            let sha256 = Digest::parse(raw_stub.sha256.get_ref()).unwrap_or_else(|e| {
                problems.push(problem(Some(raw_stub.sha256.span()), format!("{field}.sha256"), e));
                Digest([0; 32])
            });
            let mut endpoints = Vec::new();
            for e in raw_stub.endpoints.get_ref() {
                match e.parse::<std::net::SocketAddr>() {
                    Ok(addr) => endpoints.push(addr),
                    Err(err) => problems.push(problem(
                        Some(raw_stub.endpoints.span()),
                        format!("{field}.endpoints"),
                        format!("{e:?} is not <ip>:<port>: {err}"),
                    )),
                }
            }
            if raw_stub.endpoints.get_ref().is_empty() {
                problems.push(problem(Some(raw_stub.endpoints.span()), format!("{field}.endpoints"), "a protostub needs at least one endpoint".into()));
            }
            let queue = match raw_stub.queue {
                Some(q) if *q.get_ref() == 0 => {
                    problems.push(problem(Some(q.span()), format!("{field}.queue"), "must be at least 1".into()));
                    1
                }
                Some(q) => q.into_inner(),
                None => 1000,
            };
            protostubs.push(ProtostubSpec {
                domain,
                component: base.join(raw_stub.component.get_ref()),
                sha256,
                config: config_json(raw_stub.config),
                endpoints,
                queue,
                preload: raw_stub.preload,
                durable: raw_stub.durable,
                at: Location {
                    field,
                    component_line: lines.line(raw_stub.component.span().start),
                    sha256_line: lines.line(raw_stub.sha256.span().start),
                },
            });
        }
        let gateway = raw.gateway.map(|raw| {
            let listen = raw.listen.and_then(|l| match l.get_ref().parse() {
                Ok(addr) => Some(addr),
                Err(e) => {
                    problems.push(problem(Some(l.span()), "gateway.listen".into(), format!("{:?} is not <ip>:<port>: {e}", l.get_ref())));
                    None
                }
            });
            for origin in &raw.origins {
                if let Err(e) = validate_origin(origin.get_ref()) {
                    problems.push(problem(Some(origin.span()), "gateway.origins".into(), e));
                }
            }
            let mut dev_users = BTreeMap::new();
            for (domain, users) in raw.dev_users {
                let field = format!("gateway.dev-users.{:?}", domain.get_ref());
                if !domains.iter().any(|d| &d.name == domain.get_ref()) {
                    problems.push(problem(Some(domain.span()), field.clone(), format!("{} is not a domain of the bundle", domain.get_ref())));
                }
                for user in &users {
                    if user.get_ref().is_empty() || user.get_ref().chars().any(char::is_control) {
                        problems.push(problem(Some(user.span()), field.clone(), format!("{:?} is not a user name", user.get_ref())));
                    }
                }
                dev_users.insert(domain.into_inner(), users.into_iter().map(Spanned::into_inner).collect());
            }
            GatewaySpec {
                listen,
                origins: raw.origins.into_iter().map(Spanned::into_inner).collect(),
                static_dir: raw.static_dir.map(|d| base.join(d)),
                dev_users,
            }
        });
        let engine = raw.engine.and_then(|e| {
            e.get_ref().parse().map_err(|message| problems.push(problem(Some(e.span()), "engine".into(), message))).ok()
        });
        if !problems.is_empty() {
            return Err(BundleError { problems });
        }
        let name = raw.name.unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
        Ok(Bundle { path: path.to_owned(), name, domains, idps, protostubs, components: BTreeMap::new(), gateway, engine })
    }

    /// A problem about `field` of the entry at `at` (a hyperty or an IdP);
    /// it is placed on the `sha256` line for that field, else on the
    /// `component` line.
    pub fn problem(&self, at: &Location, field: &str, message: String) -> Problem {
        let line = if field == "sha256" { at.sha256_line } else { at.component_line };
        Problem { file: self.path.clone(), line: Some(line), field: format!("{}.{field}", at.field), message }
    }
}

/// The `address` a hyperty entry of `domain` asks for: a `hyperty://`
/// address of that domain, not together with `keep-address`.
fn hyperty_address(text: &str, domain: &str, keep_address: bool) -> Result<crate::address::Address, String> {
    let address = crate::address::Address::parse(text)?;
    if address.scheme() != "hyperty" || address.domain() != domain {
        return Err(format!("{address} is not an address of this domain: a hyperty's is hyperty://{domain}/<id>"));
    }
    if address.as_str().len() == "hyperty://".len() + domain.len() + 1 {
        return Err(format!("{address} names no hyperty: hyperty://{domain}/<id>"));
    }
    if keep_address {
        return Err("an exact address is kept by nature: leave out keep-address".into());
    }
    Ok(address)
}

/// `value`, or the default when it is absent; a value that fails `check`
/// is reported at its span (and kept, so every other problem is found too).
fn checked<T: Default>(
    value: Option<Spanned<T>>,
    check: fn(&T) -> Result<(), String>,
    report: &mut dyn FnMut(Range<usize>, String),
) -> T {
    let Some(value) = value else { return T::default() };
    if let Err(e) = check(value.get_ref()) {
        report(value.span(), e);
    }
    value.into_inner()
}

/// Checks that `origin` is a serialized origin as a browser sends it in the
/// `Origin` header (RFC 6454 §6.1): `http` or `https`, a host, an optional
/// port, nothing else (no path, not even `/`).
pub fn validate_origin(origin: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{origin:?} is not an origin (scheme://host[:port]): {why}"));
    let Some((scheme, rest)) = origin.split_once("://") else { return bad("no scheme") };
    if scheme != "http" && scheme != "https" {
        return bad("the scheme is not http or https");
    }
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => match port.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return bad("characters after the IPv6 address"),
            },
            None => return bad("an unclosed ["),
        },
        None => match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        },
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err()) {
        return bad("the port is not a number up to 65535");
    }
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b)) {
        return bad("the host has characters no host name has (a path or a query?)");
    }
    Ok(())
}

/// A domain's `media` table, checked: there is one exactly when the
/// domain is granted `media`.
fn media_settings(
    raw: Option<Spanned<crate::media::settings::RawMedia>>,
    granted: bool,
    report: &mut dyn FnMut(Option<Range<usize>>, String),
) -> Option<crate::media::MediaSettings> {
    match (raw, granted) {
        (None, false) => None,
        (None, true) => {
            report(None, "the domain is granted `media` but has no `media` table (bind, ports)".into());
            None
        }
        (Some(raw), false) => {
            report(Some(raw.span()), "a `media` table, but the domain is not granted `media` (add it to grants)".into());
            None
        }
        (Some(raw), true) => {
            let span = raw.span();
            raw.into_inner().check().map_err(|e| report(Some(span), e)).ok()
        }
    }
}

/// What toml's "integer number overflowed" means for `literal`: a radix
/// prefix with no digits (`0x`), or a number out of the 64-bit range.
fn integer_problem(literal: &str) -> String {
    let digits = literal.trim_start_matches(['+', '-']);
    match ["0x", "0o", "0b"].into_iter().find(|p| digits.starts_with(p)) {
        Some(prefix) if digits.len() == prefix.len() => format!("`{literal}` is not a number: no digits after `{prefix}`"),
        _ => format!("`{literal}` is not a 64-bit integer"),
    }
}

/// Every float in the manifest that JSON cannot carry (`inf`, `nan`):
/// (where, field path, why). Configurations reach components as JSON, so
/// such a value cannot be passed on unchanged. Walks the document without
/// recursion.
fn values_json_cannot_carry(text: &str) -> Vec<(Range<usize>, String, String)> {
    use toml::de::{DeTable, DeValue};
    let Ok(document) = DeTable::parse(text) else { return Vec::new() };
    let mut found = Vec::new();
    let mut pending: Vec<(String, &toml::Spanned<DeValue>)> = Vec::new();
    let mut tables: Vec<(String, &DeTable)> = vec![(String::new(), document.get_ref())];
    while let Some((prefix, table)) = tables.pop() {
        for (key, value) in table.iter() {
            let key = key.get_ref();
            let key = if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                key.to_string()
            } else {
                format!("{key:?}")
            };
            let field = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
            pending.push((field, value));
        }
        while let Some((field, value)) = pending.pop() {
            match value.get_ref() {
                DeValue::Float(f) if !f.as_str().parse::<f64>().is_ok_and(f64::is_finite) => {
                    let message = format!("`{}` cannot be passed to a component: JSON has no infinity or NaN", f.as_str());
                    found.push((value.span(), field, message));
                }
                DeValue::Table(t) => tables.push((field, t)),
                DeValue::Array(a) => pending.extend(a.iter().enumerate().map(|(i, v)| (format!("{field}[{i}]"), v))),
                _ => {}
            }
        }
    }
    found.sort_by_key(|(span, _, _)| span.start);
    found
}

/// A `config` table as JSON text for a component's `init`. TOML datetimes
/// become strings in RFC 3339 form (`1987-07-05T17:45:00Z`; a local
/// date-time, date or time as RFC 3339's `date-time` without offset,
/// `full-date`, `partial-time`); floats JSON cannot carry were refused by
/// [`values_json_cannot_carry`].
fn config_json(config: Option<toml::Table>) -> String {
    // Recursion is bounded by toml's parser, which refuses nesting deeper
    // than 80.
    fn json(value: toml::Value) -> serde_json::Value {
        match value {
            toml::Value::String(s) => s.into(),
            toml::Value::Integer(i) => i.into(),
            toml::Value::Float(f) => serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into),
            toml::Value::Boolean(b) => b.into(),
            toml::Value::Datetime(d) => d.to_string().into(),
            toml::Value::Array(a) => a.into_iter().map(json).collect(),
            toml::Value::Table(t) => t.into_iter().map(|(k, v)| (k, json(v))).collect::<serde_json::Map<_, _>>().into(),
        }
    }
    json(toml::Value::Table(config.unwrap_or_default())).to_string()
}

/// Where the detached signature of `component` lives by default.
pub fn signature_path(component: &Path) -> PathBuf {
    let mut name = component.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// 1-based line number of byte `offset` in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Where each line of a text starts, to give the line of many offsets
/// (one per bundle entry) in O(log lines) each rather than by counting
/// from the start every time.
struct Lines {
    /// Byte offsets just after each `\n`.
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Lines {
        Lines { starts: text.bytes().enumerate().filter(|&(_, b)| b == b'\n').map(|(i, _)| i + 1).collect() }
    }

    /// 1-based line number of byte `offset`, as [`line_of`] counts it.
    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset) + 1
    }
}

/// Rewrites the `sha256` pin of every hyperty in the manifest at `path` to
/// the digest of its component file as it is now; returns what changed as
/// (field, old, new). Formatting and comments are kept.
pub fn pin(path: &Path) -> anyhow::Result<Vec<(String, String, String)>> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut doc: toml_edit::DocumentMut = text.parse().with_context(|| format!("{} is not TOML", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut changed = Vec::new();
    let mut pin_entry = |field: String, entry: &mut dyn toml_edit::TableLike| -> anyhow::Result<()> {
        let component = entry.get("component").and_then(|c| c.as_str()).with_context(|| format!("{field}.component is missing"))?;
        let file = base.join(component);
        let bytes = std::fs::read(&file).with_context(|| format!("{field}.component: cannot read {}", file.display()))?;
        let digest = Digest::of(&bytes).to_string();
        let old = entry.get("sha256").and_then(|s| s.as_str()).unwrap_or("").to_owned();
        if old != digest {
            entry.insert("sha256", toml_edit::value(digest.clone()));
            changed.push((format!("{field}.sha256"), old, digest));
        }
        Ok(())
    };
    let domains = doc.get_mut("domains").and_then(|d| d.as_table_like_mut());
    for (domain, d) in domains.into_iter().flat_map(|d| d.iter_mut()) {
        let Some(hyperties) = d.get_mut("hyperties").and_then(|h| h.as_array_of_tables_mut()) else { continue };
        for (i, h) in hyperties.iter_mut().enumerate() {
            pin_entry(format!("domains.{:?}.hyperties[{i}]", domain.get()), h)?;
        }
    }
    for table in ["idps", "protostubs"] {
        let Some(entries) = doc.get_mut(table).and_then(|d| d.as_table_like_mut()) else { continue };
        for (name, entry) in entries.iter_mut() {
            let field = format!("{table}.{:?}", name.get());
            let entry = entry.as_table_like_mut().with_context(|| format!("{field} is not a table"))?;
            pin_entry(field, entry)?;
        }
    }
    if !changed.is_empty() {
        std::fs::write(path, doc.to_string()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_give_the_line_line_of_counts() {
        for text in ["", "a", "\n", "a\nb", "a\n\nbc\n", "\n\n\nx"] {
            let lines = Lines::new(text);
            for offset in 0..=text.len() + 1 {
                assert_eq!(lines.line(offset), line_of(text, offset), "{text:?} at {offset}");
            }
        }
    }
}
