//! The contract a component is built against: the WIT package
//! `rethink:hyperty@x.y.z` (`wit/hyperty.wit`), and which versions of it
//! this host serves.
//!
//! The rule is the component model's semver rule as wasmtime's linker
//! applies it: a component's `rethink:hyperty/<interface>@v` is served when
//! `v` is on the same compatibility track as the version this host
//! implements — the same major version from 1.0.0 on, the same major and
//! minor before it (0.1.0 serves 0.1.z, not 0.2.0), exactly the same for
//! 0.0.z and pre-releases. Within a track the interfaces are then
//! type-checked against the host's: a component built against a later 0.1.z
//! runs if it uses nothing this host lacks, and is otherwise refused with
//! both versions named ([`explain`]).

use std::sync::LazyLock;

use anyhow::{Error, Result, anyhow};
use semver::Version;
use wasmtime::component::Component;

/// The WIT package of the contract.
pub const PACKAGE: &str = "rethink:hyperty";

/// The version of the contract this host implements: the one on the
/// `package` line of `wit/hyperty.wit`, the WIT the host's bindings are
/// generated from.
pub fn served() -> &'static Version {
    static SERVED: LazyLock<Version> = LazyLock::new(|| {
        let wit = include_str!("../../wit/hyperty.wit");
        let package = wit.lines().find_map(|l| l.trim().strip_prefix("package ")).expect("the WIT has a package line");
        let version = package.trim_end_matches(';').strip_prefix(PACKAGE).and_then(|v| v.strip_prefix('@'));
        Version::parse(version.expect("the WIT package is rethink:hyperty@<version>")).expect("the WIT's version is semver")
    });
    &SERVED
}

/// Versions compatible with `v` share this key (wasmtime's
/// `alternate_lookup_key`); `None`: only `v` itself.
fn track(v: &Version) -> Option<(u64, u64)> {
    match (v.pre.is_empty(), v.major, v.minor) {
        (false, _, _) | (true, 0, 0) => None,
        (true, 0, minor) => Some((0, minor)),
        (true, major, _) => Some((major, 0)),
    }
}

/// Whether a component built against `v` is served by a host implementing
/// `served` (before the type check).
pub fn compatible(v: &Version, served: &Version) -> bool {
    v == served || track(v).is_some_and(|t| track(served) == Some(t))
}

/// The versions this host serves, in words: `rethink:hyperty@0.1.x (0.1.0)`.
pub fn served_range() -> String {
    let served = served();
    match track(served) {
        Some((0, minor)) => format!("{PACKAGE}@0.{minor}.x ({served})"),
        Some((major, _)) => format!("{PACKAGE}@{major}.x ({served})"),
        None => format!("{PACKAGE}@{served} only"),
    }
}

/// Every import and export of `component` from [`PACKAGE`], with its
/// version; a name without a version, or with one that is not semver, is
/// refused.
fn versions(engine: &wasmtime::Engine, component: &Component) -> Result<Vec<(String, Version)>> {
    let ty = component.component_type();
    let names: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_owned()).chain(ty.exports(engine).map(|(n, _)| n.to_owned())).collect();
    let mut found = Vec::new();
    for name in names {
        if !name.strip_prefix(PACKAGE).is_some_and(|rest| rest.starts_with('/')) {
            continue;
        }
        let Some((_, version)) = name.split_once('@') else {
            return Err(anyhow!("names {name} without a version, but this host serves {}", served_range()));
        };
        let version = Version::parse(version).map_err(|e| anyhow!("names {name}, whose version is not semver ({e})"))?;
        found.push((name, version));
    }
    Ok(found)
}

/// Refuses a component built against a version of the contract this host
/// does not serve (the module's rule); the error names the version the
/// component needs, what names it, and the versions served.
pub(crate) fn check(engine: &wasmtime::Engine, component: &Component) -> Result<()> {
    for (name, version) in versions(engine, component)? {
        if !compatible(&version, served()) {
            return Err(anyhow!(
                "built against {PACKAGE}@{version} (it uses {name}), but this host serves {}: rebuild it against that WIT",
                served_range()
            ));
        }
    }
    Ok(())
}

/// `error` (a component refused by its world's type check), saying so if
/// the component was built against a later version of the track than the
/// one served: it uses what this host does not have yet.
pub(crate) fn explain(engine: &wasmtime::Engine, component: &Component, error: Error) -> Error {
    let later = versions(engine, component).ok().into_iter().flatten().map(|(_, v)| v).filter(|v| v > served()).max();
    match later {
        Some(v) => anyhow!("built against {PACKAGE}@{v}, later than the {} this host serves, and uses what {} lacks: {error:#}", served(), served()),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_semver_rule_of_the_component_model() {
        let v = |s: &str| Version::parse(s).unwrap();
        let served = v("0.1.0");
        for ok in ["0.1.0", "0.1.1", "0.1.99"] {
            assert!(compatible(&v(ok), &served), "{ok}");
        }
        for refused in ["0.2.0", "1.0.0", "0.0.1", "0.1.1-rc1"] {
            assert!(!compatible(&v(refused), &served), "{refused}");
        }
        assert!(compatible(&v("1.4.2"), &v("1.0.0")) && !compatible(&v("2.0.0"), &v("1.9.0")));
        assert!(!compatible(&v("0.0.2"), &v("0.0.1")) && compatible(&v("0.0.1"), &v("0.0.1")));
    }
}
