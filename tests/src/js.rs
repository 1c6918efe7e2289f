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

/// The host's log (every test of the calling binary), captured by a global
/// tracing subscriber installed on first use, before any runtime exists (so
/// the test helper's own subscriber is not installed). Lines are also
/// written to stderr, shown when a test fails.
pub fn host_log() -> String {
    use std::io::Write;
    use std::sync::{Arc, Mutex, OnceLock};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            std::io::stderr().write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    static LOG: OnceLock<Captured> = OnceLock::new();
    let captured = LOG.get_or_init(|| {
        let log = Captured::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(move || writer.clone())
            .init();
        log
    });
    String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned()
}
