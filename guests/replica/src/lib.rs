//! What an observer holds of a synchronised data object (see the
//! `syncher` interface of `rethink:hyperty`): the state a `subscribe` or
//! `read` answer carries, kept current by the deltas the object's URL
//! sends — applied in version order; one already held is stale and
//! ignored; a missing version is a gap, after which the observer reads the
//! state again ([`Replica::from_state`]).
//!
//! Written once for both sides: the host re-exports it for embedders, the
//! guest SDK for hyperties; each converts its own message type into a
//! [`Delta`]. The bounded patching ([`patched`], [`shape`]) is shared too:
//! the host applies a reporter's patch with it, the replica a delta.
//!
//! Nothing here recurses on a value deeper than [`MAX_OBJECT_DEPTH`] plus
//! one patch operation's worth: depth is measured iteratively after every
//! operation, before anything clones, compares, serialises or drops a
//! deeper value.

use std::collections::BTreeMap;

use serde_json::Value;

/// The deepest nesting (arrays and objects, as the host's
/// `MAX_JSON_DEPTH` counts it: `[]` is 1) an object's data and each child
/// may have: 128 (serde_json's recursion limit, the host's JSON limit)
/// less the 3 levels the largest message carrying it adds (a delta's
/// `{"patch": [{"value": ...}]}`), so every state and delta stays readable.
pub const MAX_OBJECT_DEPTH: usize = 125;

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

/// The nesting depth and compact JSON length of a value (see [`shape`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// Levels of arrays and objects: a scalar is 0, `[]` 1, `[[1]]` 2.
    pub depth: usize,
    /// Bytes of its compact JSON text (`serde_json::to_string`).
    pub bytes: usize,
}

/// Measures `value` without recursion (an explicit stack), stopping with
/// an error as soon as it is nested deeper than `max_depth`, so a value of
/// any depth can be measured before anything recursive touches it.
pub fn shape(value: &Value, max_depth: usize) -> Result<Shape, String> {
    let mut shape = Shape::default();
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        shape.bytes += match v {
            Value::Null => 4,
            Value::Bool(b) => 4 + usize::from(!b),
            Value::Number(n) => n.to_string().len(),
            Value::String(s) => quoted_len(s),
            Value::Array(items) => {
                let depth = deeper(depth, max_depth)?;
                shape.depth = shape.depth.max(depth);
                stack.extend(items.iter().map(|item| (item, depth)));
                2 + items.len().saturating_sub(1)
            }
            Value::Object(members) => {
                let depth = deeper(depth, max_depth)?;
                shape.depth = shape.depth.max(depth);
                stack.extend(members.values().map(|member| (member, depth)));
                2 + members.len().saturating_sub(1) + members.keys().map(|k| quoted_len(k) + 1).sum::<usize>()
            }
        };
    }
    Ok(shape)
}

fn deeper(depth: usize, max_depth: usize) -> Result<usize, String> {
    if depth >= max_depth {
        return Err(format!("nested deeper than {max_depth} levels"));
    }
    Ok(depth + 1)
}

/// Length of `s` as a JSON string literal, quotes and escapes included.
fn quoted_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Why [`patched`] refused a patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatchError {
    /// An operation does not apply (RFC 6902 §5: a missing path, a failed
    /// `test`...).
    DoesNotApply(String),
    /// After operation `op` (from 0) the result is nested deeper than allowed.
    TooDeep { op: usize, max_depth: usize },
    /// After operation `op` the result's JSON text is longer than allowed.
    TooLarge { op: usize, bytes: usize, max_bytes: usize },
}

impl std::fmt::Display for PatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PatchError::DoesNotApply(e) => write!(f, "the patch does not apply: {e}"),
            PatchError::TooDeep { op, max_depth } => write!(f, "result too deep: after operation {op} the data is nested deeper than {max_depth} levels"),
            PatchError::TooLarge { op, bytes, max_bytes } => {
                write!(f, "result too large: after operation {op} the data is {bytes} bytes of JSON; at most {max_bytes}")
            }
        }
    }
}

/// `data` with `patch` (RFC 6902) applied, one operation at a time, and
/// its shape; `data` itself is not changed. After every operation the
/// result must be at most `max_depth` deep and `max_bytes` long: a `copy`
/// of the root doubles the document with each operation, so checking only
/// the end of a patch would let its middle grow past any bound.
pub fn patched(data: &Value, patch: &json_patch::Patch, max_depth: usize, max_bytes: usize) -> Result<(Value, Shape), PatchError> {
    let mut result = data.clone();
    let mut measured = shape(&result, max_depth).map_err(|_| PatchError::TooDeep { op: 0, max_depth })?;
    for (op, operation) in patch.0.iter().enumerate() {
        json_patch::patch(&mut result, std::slice::from_ref(operation)).map_err(|e| PatchError::DoesNotApply(e.to_string()))?;
        measured = shape(&result, max_depth).map_err(|_| PatchError::TooDeep { op, max_depth })?;
        if measured.bytes > max_bytes {
            return Err(PatchError::TooLarge { op, bytes: measured.bytes, max_bytes });
        }
    }
    Ok((result, measured))
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

    /// Applies a delta from the object's URL. A patch whose result would
    /// be nested deeper than [`MAX_OBJECT_DEPTH`] is an error (the host
    /// never sends one); the replica is then unchanged.
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
                self.data = patched(&self.data, &patch, MAX_OBJECT_DEPTH, usize::MAX).map_err(|e| e.to_string())?.0;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shape_is_the_compact_text_and_its_depth() {
        for v in [json!(null), json!(true), json!(false), json!(-1.5e3), json!("a\"\\\n\u{1}é"), json!([]), json!({}), json!([1, [2, {"k\n": [null, "x"]}], {}])] {
            let s = shape(&v, 128).unwrap();
            assert_eq!(s.bytes, serde_json::to_string(&v).unwrap().len(), "{v}");
        }
        assert_eq!(shape(&json!([1, [2, {"k": [null]}]]), 128).unwrap().depth, 4);
        assert_eq!(shape(&json!(1), 0).unwrap().depth, 0);
        let mut deep = json!(0);
        for _ in 0..100_000 {
            deep = Value::Array(vec![deep]);
        }
        assert_eq!(shape(&deep, 128).unwrap_err(), "nested deeper than 128 levels");
        // Dropping it would recurse 100,000 deep: take it apart first.
        while let Value::Array(mut items) = deep {
            deep = items.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn a_patch_is_bounded_after_every_operation() {
        let mut data = json!([]);
        for _ in 0..99 {
            data = json!([data]);
        }
        let path = format!("{}/-", "/0".repeat(99));
        let copy: json_patch::Patch = serde_json::from_value(json!([{ "op": "copy", "from": "", "path": path }])).unwrap();
        assert_eq!(patched(&data, &copy, MAX_OBJECT_DEPTH, usize::MAX).unwrap_err(), PatchError::TooDeep { op: 0, max_depth: MAX_OBJECT_DEPTH });
        let six = json_patch::Patch(copy.0.iter().cycle().take(6).cloned().collect());
        assert!(matches!(patched(&data, &six, MAX_OBJECT_DEPTH, usize::MAX), Err(PatchError::TooDeep { op: 0, .. })));
        // Doubling by size: the second copy of the root crosses 100 bytes.
        let big = json!({ "s": "x".repeat(30) });
        let double: json_patch::Patch = serde_json::from_value(json!([{ "op": "copy", "from": "", "path": "/a" }, { "op": "copy", "from": "", "path": "/b" }])).unwrap();
        assert!(matches!(patched(&big, &double, 128, 100), Err(PatchError::TooLarge { op: 1, .. })));
        let (ok, shape) = patched(&big, &double, 128, 1000).unwrap();
        assert_eq!(shape.bytes, ok.to_string().len());
    }
}
