//! A typed way to write a bundle in code, with components by path or by
//! bytes and pins computed (or checked).
//!
//! The builder writes the manifest that [`Bundle::parse`] reads, and
//! [`BundleBuilder::build`] reads it with that same reader: the manifest
//! stays the one way in, so a built bundle and the same bundle loaded from
//! TOML are equal and meet the same checks, with problems naming the same
//! fields. [`BundleBuilder::to_toml`] gives the text (for `hyperty check`,
//! or to keep).
//!
//! ```
//! use hyperty_host::Bundle;
//! use hyperty_host::bundle::{Component, Domain, Hyperty};
//! use hyperty_host::Limits;
//!
//! let wasm = b"\0asm\x0d\x00\x01\x00".to_vec(); // a component's bytes
//! let bundle = Bundle::builder("chat")
//!     .domain("alice.example", Domain::new().limits(Limits { memory_mb: 16, ..Limits::default() }))
//!     .hyperty("alice.example", Hyperty::new("chat", Component::bytes("chat.wasm", wasm))
//!         .config(serde_json::json!({ "room": "lobby" }))
//!         .user("alice@idp.example")
//!         .types(["chat"]))
//!     .build()?;
//! assert_eq!(bundle.domains[0].hyperties[0].user.as_deref(), Some("alice@idp.example"));
//! assert_eq!(bundle.domains[0].settings.limits.memory_mb, 16);
//!
//! // Problems name the field, as for a manifest file.
//! let err = Bundle::builder("bad").hyperty("not a domain", Hyperty::new("x", Component::bytes("x.wasm", vec![]))).build();
//! assert!(err.unwrap_err().to_string().contains("domains.\"not a domain\""));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::{Bundle, BundleError, Problem};
use crate::engine::Digest;
use crate::sandbox::limits::{Grant, Limits, RestartPolicy};
use crate::signing::PublicKey;

/// Where the path of a component given as bytes starts (it names no file).
const MEMORY: &str = "<memory>";

/// A component of a bundle: a file, or bytes held in memory; pinned to
/// the digest of what it is when the bundle is built, or to the digest
/// given with [`Component::pinned`] (then checked at deployment, as a
/// manifest's `sha256`).
#[derive(Clone, Debug)]
pub struct Component {
    source: Source,
    sha256: Option<Digest>,
}

#[derive(Clone, Debug)]
enum Source {
    File(PathBuf),
    Bytes { name: String, bytes: Arc<[u8]> },
}

impl Component {
    /// The component file at `path` (relative paths: to the current
    /// directory; in [`BundleBuilder::to_toml`]'s text, as given).
    pub fn file(path: impl Into<PathBuf>) -> Component {
        Component { source: Source::File(path.into()), sha256: None }
    }

    /// A component given as bytes; `name` (`chat.wasm`) names it in
    /// problems, as `<memory>/<name>`.
    pub fn bytes(name: &str, bytes: impl Into<Arc<[u8]>>) -> Component {
        Component { source: Source::Bytes { name: name.to_owned(), bytes: bytes.into() }, sha256: None }
    }

    /// Pins the component to `sha256` instead of what it is now: a
    /// mismatch is refused at deployment naming both digests.
    pub fn pinned(mut self, sha256: Digest) -> Component {
        self.sha256 = Some(sha256);
        self
    }
}

/// The keys of one manifest table, set from typed values.
#[derive(Clone, Debug, Default)]
struct Table(toml::Table);

impl Table {
    fn put(&mut self, key: &str, value: impl serde::Serialize) {
        let value = toml::Value::try_from(value).expect("typed values are TOML values");
        self.0.insert(key.to_owned(), value);
    }

    /// `value` (JSON) under `key`; JSON `null` has no TOML form and is
    /// left out.
    fn put_json(&mut self, key: &str, value: Value) {
        match toml::Value::try_from(value) {
            Ok(value) => {
                self.0.insert(key.to_owned(), value);
            }
            Err(_) => {
                self.0.remove(key);
            }
        }
    }
}

/// A provider domain's settings (`[domains."<name>"]`); its hyperties are
/// added with [`BundleBuilder::hyperty`].
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct Domain(Table);

impl Domain {
    pub fn new() -> Domain {
        Domain::default()
    }

    /// `limits`.
    pub fn limits(mut self, limits: Limits) -> Domain {
        self.0.put("limits", limits);
        self
    }

    /// `restart`.
    pub fn restart(mut self, restart: RestartPolicy) -> Domain {
        self.0.put("restart", restart);
        self
    }

    /// `grants` (by default clocks and random).
    pub fn grants(mut self, grants: impl IntoIterator<Item = Grant>) -> Domain {
        self.0.put("grants", grants.into_iter().collect::<Vec<_>>());
        self
    }

    /// `trusted-keys`: components must then be signed by one of them.
    pub fn trusted_keys<'a>(mut self, keys: impl IntoIterator<Item = &'a PublicKey>) -> Domain {
        self.0.put("trusted-keys", keys.into_iter().map(ToString::to_string).collect::<Vec<_>>());
        self
    }

    /// `policies`: Cedar policy files of the domain.
    pub fn policies<P: AsRef<Path>>(mut self, files: impl IntoIterator<Item = P>) -> Domain {
        self.0.put("policies", files.into_iter().map(|p| p.as_ref().display().to_string()).collect::<Vec<_>>());
        self
    }

    /// `idp`: the IdP vouching for the domain's users.
    pub fn idp(mut self, idp: &str) -> Domain {
        self.0.put("idp", idp);
        self
    }

    /// `require-identity` (by default: when the domain has an IdP).
    pub fn require_identity(mut self, require: bool) -> Domain {
        self.0.put("require-identity", require);
        self
    }

    /// Any key of the domain's table, as the manifest writes it (in JSON);
    /// checked by the manifest's reader like the others.
    pub fn set(mut self, key: &str, value: Value) -> Domain {
        self.0.put_json(key, value);
        self
    }
}

/// A hyperty of a domain (`[[domains."<domain>".hyperties]]`).
#[derive(Clone, Debug)]
#[must_use]
pub struct Hyperty {
    component: Component,
    table: Table,
}

impl Hyperty {
    /// Hyperty `name` running `component`.
    pub fn new(name: &str, component: Component) -> Hyperty {
        let mut table = Table::default();
        table.put("name", name);
        Hyperty { component, table }
    }

    /// The name it was given.
    pub fn name(&self) -> &str {
        self.table.0["name"].as_str().unwrap_or_default()
    }

    /// `config`: a JSON object handed to its `init`.
    pub fn config(self, config: Value) -> Hyperty {
        self.set("config", config)
    }

    /// `user`: who it acts for.
    pub fn user(self, user: &str) -> Hyperty {
        self.set("user", user.into())
    }

    /// `types`: the reTHINK hyperty types it offers.
    pub fn types<'a>(self, types: impl IntoIterator<Item = &'a str>) -> Hyperty {
        self.set("types", types.into_iter().collect())
    }

    /// `schemes`: the data-object schemes it handles.
    pub fn schemes<'a>(self, schemes: impl IntoIterator<Item = &'a str>) -> Hyperty {
        self.set("schemes", schemes.into_iter().collect())
    }

    /// `keep-address`: the same address at every deployment.
    pub fn keep_address(self, keep: bool) -> Hyperty {
        self.set("keep-address", keep.into())
    }

    /// `signature`: the detached signature file (by default
    /// `<component>.sig`).
    pub fn signature(self, path: impl AsRef<Path>) -> Hyperty {
        self.set("signature", path.as_ref().display().to_string().into())
    }

    /// Any key of the entry, as the manifest writes it (in JSON).
    pub fn set(mut self, key: &str, value: Value) -> Hyperty {
        self.table.put_json(key, value);
        self
    }
}

/// An IdP proxy (`[idps."<name>"]`).
#[derive(Clone, Debug)]
#[must_use]
pub struct Idp {
    component: Component,
    table: Table,
}

impl Idp {
    pub fn new(component: Component) -> Idp {
        Idp { component, table: Table::default() }
    }

    /// `config`: its keys and settings, handed to its `init`.
    pub fn config(mut self, config: Value) -> Idp {
        self.table.put_json("config", config);
        self
    }
}

/// A protostub (`[protostubs."<domain>"]`).
#[derive(Clone, Debug)]
#[must_use]
pub struct Protostub {
    component: Component,
    table: Table,
}

impl Protostub {
    /// A stub running `component`, which may connect to `endpoints` only.
    pub fn new(component: Component, endpoints: impl IntoIterator<Item = std::net::SocketAddr>) -> Protostub {
        let mut table = Table::default();
        table.put("endpoints", endpoints.into_iter().map(|e| e.to_string()).collect::<Vec<_>>());
        Protostub { component, table }
    }

    /// `config`: handed to its `init` (node addresses, credentials).
    pub fn config(self, config: Value) -> Protostub {
        self.set("config", config)
    }

    /// `queue`: outbound messages held while the node is unreachable.
    pub fn queue(self, messages: usize) -> Protostub {
        self.set("queue", messages.into())
    }

    /// `preload`: start at deployment.
    pub fn preload(self, preload: bool) -> Protostub {
        self.set("preload", preload.into())
    }

    /// Any key of the entry, as the manifest writes it (in JSON).
    pub fn set(mut self, key: &str, value: Value) -> Protostub {
        self.table.put_json(key, value);
        self
    }
}

/// Writes a bundle in code; see the [module documentation](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct BundleBuilder {
    name: String,
    domains: BTreeMap<String, (Table, Vec<Hyperty>)>,
    idps: BTreeMap<String, Idp>,
    protostubs: BTreeMap<String, Protostub>,
}

impl Bundle {
    /// A builder of bundle `name`.
    pub fn builder(name: &str) -> BundleBuilder {
        BundleBuilder { name: name.to_owned(), domains: BTreeMap::new(), idps: BTreeMap::new(), protostubs: BTreeMap::new() }
    }

    /// The bytes of the component file at `path` of this bundle: given as
    /// bytes to the builder, else read from the file system.
    pub fn read_component(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        match self.components.get(path) {
            Some(bytes) => Ok(bytes.to_vec()),
            None => std::fs::read(path),
        }
    }
}

impl BundleBuilder {
    /// Sets keys of domain `name` (the domain is added if new; keys set
    /// before are kept unless set again).
    pub fn domain(mut self, name: &str, settings: Domain) -> BundleBuilder {
        let (table, _) = self.domains.entry(name.to_owned()).or_default();
        table.0.extend(settings.0.0);
        self
    }

    /// Adds `hyperty` to `domain`.
    pub fn hyperty(mut self, domain: &str, hyperty: Hyperty) -> BundleBuilder {
        self.domains.entry(domain.to_owned()).or_default().1.push(hyperty);
        self
    }

    /// The hyperty `name` of `domain` added before, to change it.
    pub fn hyperty_mut(&mut self, domain: &str, name: &str) -> Option<&mut Hyperty> {
        self.domains.get_mut(domain)?.1.iter_mut().find(|h| h.name() == name)
    }

    /// Adds the IdP proxy of identity provider `name`.
    pub fn idp(mut self, name: &str, idp: Idp) -> BundleBuilder {
        self.idps.insert(name.to_owned(), idp);
        self
    }

    /// Adds the protostub carrying messages to `domain`.
    pub fn protostub(mut self, domain: &str, stub: Protostub) -> BundleBuilder {
        self.protostubs.insert(domain.to_owned(), stub);
        self
    }

    /// The bundle, checked as [`Bundle::parse`] checks a manifest; its
    /// `path` is `<bundle NAME>` (problems name no line: there is no file).
    pub fn build(self) -> Result<Bundle, BundleError> {
        let path = PathBuf::from(format!("<bundle {}>", self.name));
        let no_lines = |mut e: BundleError| {
            for p in &mut e.problems {
                p.line = None;
            }
            e
        };
        let (text, components) = self.manifest(&path, false).map_err(no_lines)?;
        let mut bundle = Bundle::parse(&text, &path).map_err(no_lines)?;
        bundle.components = components;
        Ok(bundle)
    }

    /// The manifest as TOML text. Component paths are written as given
    /// (relative ones: to where the text is read from); a component given
    /// as bytes has no file to name and is refused.
    pub fn to_toml(&self) -> Result<String, BundleError> {
        let path = PathBuf::from(format!("<bundle {}>", self.name));
        self.clone().manifest(&path, true).map(|(text, _)| text)
    }

    /// The manifest text and the components given as bytes, by path.
    #[allow(clippy::type_complexity)]
    fn manifest(self, path: &Path, files_only: bool) -> Result<(String, BTreeMap<PathBuf, Arc<[u8]>>), BundleError> {
        let mut components = BTreeMap::new();
        let mut problems = Vec::new();
        // Each file hashed once, however many entries name it.
        let mut digests: BTreeMap<PathBuf, Digest> = BTreeMap::new();
        let mut entry = |field: String, component: Component, table: Table| {
            let mut table = table;
            let (name, digest) = match component.source {
                Source::File(file) => {
                    let digest = match (component.sha256, digests.get(&file)) {
                        (Some(pin), _) | (None, Some(&pin)) => Ok(pin),
                        (None, None) => std::fs::read(&file).map(|b| *digests.entry(file.clone()).or_insert(Digest::of(&b))),
                    };
                    match digest {
                        Ok(digest) => (file.display().to_string(), digest),
                        Err(e) => {
                            problems.push(problem(path, &format!("{field}.component"), format!("cannot read {}: {e}", file.display())));
                            (file.display().to_string(), Digest([0; 32]))
                        }
                    }
                }
                Source::Bytes { name, bytes } => {
                    let file = PathBuf::from(MEMORY).join(&name);
                    if files_only {
                        problems.push(problem(path, &format!("{field}.component"), format!("{} is given as bytes: a manifest file cannot name it", file.display())));
                    }
                    if components.get(&file).is_some_and(|other: &Arc<[u8]>| **other != *bytes) {
                        problems.push(problem(path, &format!("{field}.component"), format!("two different components are named {name}")));
                    }
                    let digest = component.sha256.unwrap_or_else(|| Digest::of(&bytes));
                    components.insert(file.clone(), bytes);
                    (file.display().to_string(), digest)
                }
            };
            table.put("component", name);
            table.put("sha256", digest.to_string());
            table.0
        };
        let mut doc = toml::Table::new();
        doc.insert("name".into(), self.name.clone().into());
        let mut domains = toml::Table::new();
        for (name, (settings, hyperties)) in self.domains {
            let mut table = settings.0;
            let list: Vec<toml::Value> = hyperties
                .into_iter()
                .enumerate()
                .map(|(i, h)| entry(format!("domains.{name:?}.hyperties[{i}]"), h.component, h.table).into())
                .collect();
            if !list.is_empty() {
                table.insert("hyperties".into(), list.into());
            }
            domains.insert(name, table.into());
        }
        let mut idps = toml::Table::new();
        for (name, idp) in self.idps {
            idps.insert(name.clone(), entry(format!("idps.{name:?}"), idp.component, idp.table).into());
        }
        let mut stubs = toml::Table::new();
        for (domain, stub) in self.protostubs {
            stubs.insert(domain.clone(), entry(format!("protostubs.{domain:?}"), stub.component, stub.table).into());
        }
        for (key, table) in [("domains", domains), ("idps", idps), ("protostubs", stubs)] {
            if !table.is_empty() {
                doc.insert(key.into(), table.into());
            }
        }
        if !problems.is_empty() {
            return Err(BundleError { problems });
        }
        let text = toml::to_string(&doc).map_err(|e| BundleError { problems: vec![problem(path, "", e.to_string())] })?;
        Ok((text, components))
    }
}

fn problem(path: &Path, field: &str, message: String) -> Problem {
    Problem { file: path.to_owned(), line: None, field: field.to_owned(), message }
}
