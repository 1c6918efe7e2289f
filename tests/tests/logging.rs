//! The CLI's log on stderr, as operators and log collectors read it: plain
//! text (no ANSI colour escapes) when stderr is not a terminal, and one
//! JSON object per line with `--log-format json`. Each case runs the demo
//! bundle with the CLI in a child process (this test binary re-executed,
//! so the CLI installs the process's only tracing subscriber) whose stderr
//! is a file.

use hyperty_tests::*;
use serde_json::Value;

/// Runs `hyperty <args>` in a child process whose stderr is a file; its
/// exit status and stderr.
fn cli_in_child(args: &[&str]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "cli_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("HYPERTY_CLI_ARGS", serde_json::to_string(args).unwrap())
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    (status, std::fs::read_to_string(&log).unwrap())
}

/// Runs `hyperty <args> run guests/demo/bundle.toml --exit-when-idle` in a
/// child process; its stderr.
fn demo_log(args: &[&str]) -> String {
    let bundle = repo().join("guests/demo/bundle.toml");
    let bundle = bundle.to_str().unwrap();
    let all: Vec<&str> = args.iter().copied().chain(["run", bundle, "--exit-when-idle"]).collect();
    let (status, text) = cli_in_child(&all);
    assert!(status.success(), "the demo run failed ({status}):\n{text}\n(if a guest changed, re-pin: just pin)");
    text
}

#[test]
fn a_log_that_is_not_a_terminal_has_no_colour_escapes() {
    let log = demo_log(&[]);
    assert!(log.contains("every hyperty is idle; stopping"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in a log written to a file:\n{log:?}");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let log = demo_log(&["--log-format", "json"]);
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()), "{log}");
    let said = |m: &str| lines.iter().any(|l| l["fields"]["message"].as_str().is_some_and(|t| t.contains(m)));
    assert!(said("every hyperty is idle; stopping"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
    // Nothing but the test harness's own lines outside JSON.
    let other: Vec<&str> = log.lines().filter(|l| !l.starts_with('{') && !l.trim().is_empty() && !is_harness_line(l)).collect();
    assert!(other.is_empty(), "lines that are not JSON: {other:?}");
}

#[test]
fn an_unknown_log_format_is_refused_naming_the_choices() {
    let (status, text) = cli_in_child(&["--log-format", "xml", "check", "none.toml"]);
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(text.contains("invalid value 'xml' for '--log-format") && text.contains("[possible values: text, json]"), "{text}");
}

/// What the re-executed test binary itself prints around the child test.
fn is_harness_line(line: &str) -> bool {
    line.starts_with("running ") || line.starts_with("test ") || line.starts_with("successes:") || line.starts_with("test result:")
}

/// The child process: runs the CLI with the arguments in
/// `HYPERTY_CLI_ARGS` (a JSON list) and exits with its code.
#[test]
#[ignore = "run by the tests above in a child process"]
fn cli_child() {
    let Ok(args) = std::env::var("HYPERTY_CLI_ARGS") else { return };
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    let code = CliDirs::new().cli(&args);
    // `ExitCode` has no accessor: map the codes the CLI uses.
    let code = [0u8, 2].into_iter().find(|c| code == std::process::ExitCode::from(*c)).unwrap_or(1);
    std::process::exit(code.into());
}
