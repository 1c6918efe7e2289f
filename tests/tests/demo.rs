//! The demo bundle runs to completion, as `just demo` runs it.
//!
//! Its own test binary: it captures the process's log to check what the
//! demo said, which needs the one global tracing subscriber.

use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use hyperty_tests::{cache_dir, repo};

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

#[test]
fn demo_bundle_plays_every_round_and_exits_by_itself() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).init();

    let bundle = repo().join("guests/demo/bundle.toml");
    let code = hyperty_host::cli::main_with_args([
        "hyperty".as_ref(),
        "--cache-dir".as_ref(),
        cache_dir().as_os_str(),
        "run".as_ref(),
        bundle.as_os_str(),
        "--exit-when-idle".as_ref(),
    ]);
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(code == ExitCode::SUCCESS, "the demo failed:\n{log}\n(if a guest changed, re-pin: just pin)");
    for round in 1..=3 {
        let from = format!("got \"ping {round}\" from alice@idp.example (asserted by idp.example) at hyperty://alice.example/");
        assert!(log.contains(&from), "{log}");
        assert!(log.contains(&format!("answered \"pong {round}\" (round {round} of 3)")), "{log}");
    }
    assert!(log.contains("game over: every ping got its pong"), "{log}");
    assert!(log.contains("every hyperty is idle; stopping"), "{log}");
}
