//! The on-disk cache of compiled components.
//!
//! `Component::deserialize` runs whatever machine code it is given, so a
//! cached artifact is only used if it provably came from this runtime:
//!
//! - the cache directory is created owner-only (0700); if it is writable by
//!   anyone else, or owned by another user, or on a platform where this
//!   cannot be checked ([`crate::private`]), the disk cache is not used at
//!   all (components are compiled in memory) and a warning says why;
//! - each artifact `<digest>-<kind>-<engine>.cwasm` has a sidecar `.mac`:
//!   HMAC-SHA256, keyed by a secret only this runtime's user can read
//!   (`mac.key`, 0600), over the artifact's name and bytes. A corrupted,
//!   swapped or foreign artifact fails the check and is recompiled.
//!
//! Artifacts are keyed by the component's sha256, the engine's kind
//! (`cranelift`, `pulley`) and its compatibility hash, so neither another
//! kind of engine nor a change of settings or wasmtime ever reuses one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::engine::Digest;

/// A usable cache directory with its MAC key.
pub(crate) struct DiskCache {
    dir: PathBuf,
    key: [u8; 32],
}

impl DiskCache {
    /// Opens (creating if needed) the cache at `dir`; `None`, with a warning,
    /// if it cannot be trusted.
    pub fn open(dir: &Path) -> Option<DiskCache> {
        match DiskCache::try_open(dir) {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!("not using the component cache {}: {e:#}; components are compiled at each start", dir.display());
                None
            }
        }
    }

    fn try_open(dir: &Path) -> Result<DiskCache> {
        crate::private::dir(dir)?;
        let key_path = dir.join("mac.key");
        if !key_path.exists() {
            let mut key = [0u8; 32];
            getrandom::getrandom(&mut key).context("no randomness for the cache key")?;
            // Another runtime may win the race to create it; then use theirs.
            let _ = crate::private::write_file(&key_path, &hex::encode(key));
        }
        let text = std::fs::read_to_string(&key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut key).with_context(|| format!("{} is not a cache key", key_path.display()))?;
        Ok(DiskCache { dir: dir.to_owned(), key })
    }

    fn artifact(&self, digest: Digest, engine_key: &str) -> (String, PathBuf) {
        let name = format!("{digest}-{engine_key}.cwasm");
        let path = self.dir.join(&name);
        (name, path)
    }

    fn mac(&self, name: &str, bytes: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(bytes);
        hex::encode(mac.finalize().into_bytes())
    }

    /// The cached artifact for (`digest`, `engine_key`), if there is one and
    /// its MAC checks out.
    pub fn load(&self, digest: Digest, engine_key: &str) -> Option<Vec<u8>> {
        let (name, path) = self.artifact(digest, engine_key);
        let bytes = std::fs::read(&path).ok()?;
        let recorded = std::fs::read_to_string(path.with_extension("mac")).unwrap_or_default();
        if recorded.trim() != self.mac(&name, &bytes) {
            tracing::warn!(file = %path.display(), "cached artifact fails its integrity check (corrupt or not ours); recompiling");
            return None;
        }
        Some(bytes)
    }

    /// Stores an artifact and its MAC (written to a temporary file and
    /// renamed, so readers never see half a file).
    pub fn store(&self, digest: Digest, engine_key: &str, artifact: &[u8]) -> Result<()> {
        let (name, path) = self.artifact(digest, engine_key);
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
        std::fs::write(&tmp, artifact)?;
        std::fs::write(path.with_extension("mac"), self.mac(&name, artifact))?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}
