//! The JavaScript guests (`guests/js`), built by this crate's build script
//! with jco's QuickJS backend (`guests/js/build.sh`).

use std::path::{Path, PathBuf};

/// The built JavaScript component `name` (`pong`, `reporter`, `observer`,
/// `probe`, `sink`, `wrong-world`): `guests/target/js/<name>.wasm`.
pub fn js_guest(name: &str) -> PathBuf {
    let path = Path::new(env!("HYPERTY_JS_GUESTS_DIR")).join(format!("{name}.wasm"));
    assert!(path.exists(), "JavaScript guest {name} was not built: {}", path.display());
    path
}

pub use crate::host_log;
