//! The demo bundle runs to completion, as `just demo` runs it, in data and
//! cache directories of its own; a data directory another runtime holds is
//! refused at once, naming the file.
//!
//! Its own test binary: it captures the process's log to check what the
//! demo said, which needs the one global tracing subscriber.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hyperty_host::{Runtime, RuntimeConfig};
// The process's log so far (the subscriber is installed on first use).
use hyperty_tests::{CliDirs, host_log as log, repo};

#[test]
fn demo_bundle_plays_every_round_and_exits_by_itself() {
    log();
    let dirs = CliDirs::new();
    let bundle = repo().join("guests/demo/bundle.toml");
    let code = dirs.cli(&["run".as_ref(), bundle.as_os_str(), "--exit-when-idle".as_ref()]);
    let log = log();
    assert!(code == ExitCode::SUCCESS, "the demo failed:\n{log}\n(if a guest changed, re-pin: just pin)");
    for round in 1..=3 {
        let from = format!("got \"ping {round}\" from alice@idp.example (asserted by idp.example) at hyperty://alice.example/");
        assert!(log.contains(&from), "{log}");
        assert!(log.contains(&format!("answered \"pong {round}\" (round {round} of 3)")), "{log}");
    }
    assert!(log.contains("game over: every ping got its pong"), "{log}");
    assert!(log.contains("every hyperty is idle; stopping"), "{log}");
    assert!(dirs.data().join("runtime.redb").exists(), "the runtime kept its state in the data directory given");
}

#[test]
fn a_data_directory_another_runtime_holds_is_refused_naming_the_file() {
    log();
    let dirs = Arc::new(CliDirs::new());
    let config = || RuntimeConfig { cache_dir: dirs.cache().to_owned(), data_dir: Some(dirs.data().to_owned()), ..RuntimeConfig::default() };
    let holder = Runtime::new(config()).expect("the first runtime opens the data directory");
    let file = dirs.data().join("runtime.redb");

    let err = format!("{:#}", Runtime::new(config()).err().expect("a second runtime on the same data directory is refused"));
    assert!(err.contains(&file.display().to_string()) && err.contains("in use by another runtime"), "{err}");

    // The command line fails at once too (it does not wait for the holder
    // to go away), even with --exit-when-idle; the holder keeps running.
    let (done, finished) = std::sync::mpsc::channel();
    let bundle = repo().join("guests/demo/bundle.toml");
    let args = [std::ffi::OsString::from("run"), bundle.into_os_string(), "--exit-when-idle".into()];
    let cli_dirs = dirs.clone();
    std::thread::spawn(move || done.send(cli_dirs.cli(&args)));
    let code = finished.recv_timeout(Duration::from_secs(60)).expect("the command line returned");
    assert!(code == ExitCode::FAILURE);
    assert!(holder.wait_idle(Duration::from_secs(5)), "the first runtime still works");
}
