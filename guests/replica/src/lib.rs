//! What an observer holds of a synchronised data object (see the
//! `syncher` interface of `rethink:hyperty`): the state a `subscribe` or
//! `read` answer carries, kept current by the deltas the object's URL
//! sends — applied in version order; one already held is stale and
//! ignored; a missing version is a gap, after which the observer reads the
//! state again ([`Replica::from_state`]).
//!
//! Written once for both sides: the host re-exports it for embedders, the
//! guest SDK for hyperties; each converts its own message type into a
//! [`Delta`].

use std::collections::BTreeMap;

use serde_json::Value;

/// A delta message, as either side sees it.
#[derive(Clone, Copy, Debug)]
pub struct Delta<'a> {
    /// The sender: the object's URL.
    pub from: &'a str,
    /// The message type: `update`, `create` or `delete`.
    pub kind: &'a str,
    /// What changed: the object's URL or `<url>/children/<name>`.
    pub resource: Option<&'a str>,
    /// `{"version": n, "patch": [...]}` or `{"version": n, "data": ...}`.
    pub value: Option<&'a str>,
}

/// What an observer holds of an object.
#[derive(Clone, Debug, PartialEq)]
pub struct Replica {
    pub url: String,
    pub version: u64,
    pub data: Value,
    pub children: BTreeMap<String, Value>,
    /// The reporter deleted the object.
    pub deleted: bool,
}

/// What [`Replica::apply`] did with a delta.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The replica is at the delta's version now.
    Applied,
    /// Already had it (a duplicate or a late one): ignored.
    Stale,
    /// Versions between are missing: read the state again.
    Gap { have: u64, got: u64 },
    /// Not a delta of this object.
    NotThisObject,
}

impl Replica {
    /// A replica from the state (JSON text) a `subscribe` or `read` answer
    /// carries.
    pub fn from_state(url: &str, state: &str) -> Result<Replica, String> {
        let v: Value = serde_json::from_str(state).map_err(|e| format!("the state is not JSON: {e}"))?;
        Ok(Replica {
            url: url.to_owned(),
            version: v["version"].as_u64().ok_or("the state has no version")?,
            data: v["data"].clone(),
            children: serde_json::from_value(v["children"].clone()).map_err(|e| format!("children: {e}"))?,
            deleted: false,
        })
    }

    /// Applies a delta from the object's URL.
    pub fn apply<'a>(&mut self, delta: impl Into<Delta<'a>>) -> Result<Applied, String> {
        let d = delta.into();
        if d.from != self.url {
            return Ok(Applied::NotThisObject);
        }
        let v: Value = serde_json::from_str(d.value.unwrap_or("null")).map_err(|e| format!("not JSON: {e}"))?;
        let version = v["version"].as_u64().ok_or("a delta without a version")?;
        if version <= self.version {
            return Ok(Applied::Stale);
        }
        if version != self.version + 1 {
            return Ok(Applied::Gap { have: self.version, got: version });
        }
        let resource = d.resource.unwrap_or_default();
        let child = resource.strip_prefix(&self.url).and_then(|rest| rest.strip_prefix("/children/"));
        match (d.kind, child) {
            ("update", None) => {
                let patch: json_patch::Patch = serde_json::from_value(v["patch"].clone()).map_err(|e| format!("patch: {e}"))?;
                json_patch::patch(&mut self.data, &patch).map_err(|e| format!("the patch does not apply: {e}"))?;
            }
            ("delete", None) => self.deleted = true,
            ("create" | "update", Some(name)) => {
                self.children.insert(name.to_owned(), v["data"].clone());
            }
            ("delete", Some(name)) => {
                self.children.remove(name);
            }
            (kind, _) => return Err(format!("a delta of type {kind} about {resource}")),
        }
        self.version = version;
        Ok(Applied::Applied)
    }
}
