//! Owner-only files and directories: the component cache (whose artifacts
//! are machine code the runtime runs), the data directory (the runtime's
//! address, data objects) and secret keys (signing, the cache's MAC key).
//!
//! On Unix they are created owner-only (0700 directories, 0600 files), and
//! a directory is used only if it is owned by the runtime's user and
//! writable by no one else. Elsewhere (Windows) the host does not yet set
//! or read access control lists, so it refuses, with an error saying so,
//! rather than use a directory or write a secret whose safety it cannot
//! check: no check silently vanishes on a platform (ARCHITECTURE.md,
//! "Platforms").

use std::path::Path;

use anyhow::{Context, Result};

/// Why owner-only permissions cannot be had on this platform.
#[cfg(not(unix))]
const UNCHECKED: &str = "owner-only permissions are not set or checked on this platform (no access control list support yet)";

/// Creates `dir` (and its parents) owner-only if missing, then checks it
/// is owned by this process's user and writable by it alone; the error
/// names what is wrong.
pub(crate) fn dir(dir: &Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    check_dir(dir).with_context(|| format!("{} is not private to this runtime's user", dir.display()))
}

#[cfg(unix)]
fn check_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        anyhow::bail!("it is owned by uid {}, not by this runtime's uid {me}", meta.uid());
    }
    if meta.mode() & 0o022 != 0 {
        anyhow::bail!("others can write to it (mode {:o}); it must be writable by its owner only", meta.mode() & 0o777);
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_dir(_: &Path) -> Result<()> {
    anyhow::bail!(UNCHECKED)
}

/// Writes `text` to a new file (never an existing one) readable and
/// writable by its owner only.
#[cfg(unix)]
pub(crate) fn write_file(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(not(unix))]
pub(crate) fn write_file(path: &Path, _: &str) -> Result<()> {
    anyhow::bail!("cannot write the secret {}: {UNCHECKED}", path.display())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_others_can_write_is_refused_and_a_new_one_is_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("a/b");
        super::dir(&fresh).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);

        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = format!("{:#}", super::dir(&shared).unwrap_err());
        assert!(err.contains("shared is not private") && err.contains("others can write to it (mode 775)"), "{err}");

        let key = root.path().join("secret.key");
        super::write_file(&key, "k").unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(super::write_file(&key, "other").is_err(), "never overwrites");
    }
}
