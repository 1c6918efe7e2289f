//! The engine kinds (issue 18): the demo plays on Pulley from the command
//! line, a bundle names its engine, the compiled-component cache keeps one
//! entry per engine kind, and the harness's runtimes run on the engine
//! `HYPERTY_TEST_ENGINE` names (`just test` re-runs a subset on Pulley).
//!
//! Its own test binary: the demo test captures the process's log, which
//! needs the one global tracing subscriber (so every test installs it
//! first, before the command line or the harness would install theirs).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use hyperty_host::{Bundle, EngineKind, Runtime, RuntimeConfig};
use hyperty_tests::{CliDirs, Driver, TestBundle, engines, guest, healthy_pair, host_log as log, puppet_config, repo};

#[test]
fn demo_plays_on_pulley_with_identities() {
    log();
    let dirs = CliDirs::new();
    let bundle = repo().join("guests/demo/bundle.toml");
    let args = ["run".as_ref(), bundle.as_os_str(), "--engine".as_ref(), "pulley".as_ref(), "--exit-when-idle".as_ref()];
    let code = dirs.cli(&args);
    let log = log();
    assert!(code == ExitCode::SUCCESS, "the demo failed on Pulley:\n{log}");
    assert!(log.contains("(pulley engine): deploying bundle"), "{log}");
    for round in 1..=3 {
        let from = format!("got \"ping {round}\" from alice@idp.example (asserted by idp.example) at hyperty://alice.example/");
        assert!(log.contains(&from), "{log}");
        assert!(log.contains(&format!("answered \"pong {round}\" (round {round} of 3)")), "{log}");
    }
    assert!(log.contains("game over: every ping got its pong"), "{log}");
    // Only Pulley artifacts were made: nothing was compiled to machine code.
    assert_eq!(kinds(dirs.cache()), ["pulley"]);
}

/// The compiled artifacts in cache `dir`: (component digest, engine kind)
/// of each `<digest>-<kind>-<hash>.cwasm`.
fn artifacts(dir: &Path) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter_map(|name| {
            let stem = name.strip_suffix(".cwasm")?;
            let mut parts = stem.splitn(3, '-');
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect();
    found.sort();
    found
}

/// The engine kinds of the artifacts in cache `dir`, each once, sorted.
fn kinds(dir: &Path) -> Vec<String> {
    let kinds: std::collections::BTreeSet<_> = artifacts(dir).into_iter().map(|(_, kind)| kind).collect();
    kinds.into_iter().collect()
}

/// A runtime of engine `kind` on cache `dir` deploys the healthy pair and a
/// request goes from one to the other.
fn play(dir: &Path, kind: EngineKind) {
    let runtime = Runtime::new(RuntimeConfig { cache_dir: dir.to_owned(), engine: kind, ..RuntimeConfig::default() }).unwrap();
    assert_eq!(runtime.engine(), kind);
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = healthy_pair(&runtime);
    driver.still_works(&a, &b);
    runtime.shutdown();
}

#[test]
fn a_cache_entry_of_one_engine_is_never_loaded_by_the_other() {
    log();
    let cache = tempfile::tempdir().unwrap();
    play(cache.path(), EngineKind::Cranelift);
    let cranelift = artifacts(cache.path());
    assert!(!cranelift.is_empty() && cranelift.iter().all(|(_, kind)| kind == "cranelift"), "{cranelift:?}");

    // Pulley on the same cache compiles its own entry of each component
    // instead of loading Cranelift's.
    play(cache.path(), EngineKind::Pulley);
    let both = artifacts(cache.path());
    let pulley: Vec<_> = both.iter().filter(|(_, kind)| kind == "pulley").map(|(digest, _)| digest).collect();
    assert_eq!(pulley, cranelift.iter().map(|(digest, _)| digest).collect::<Vec<_>>(), "{both:?}");
    assert_eq!(both.len(), 2 * cranelift.len(), "{both:?}");

    // Each kind, started again, loads its own entries: nothing new is made.
    for kind in EngineKind::ALL {
        play(cache.path(), kind);
        assert_eq!(artifacts(cache.path()), both);
    }
}

#[test]
fn a_bundle_names_its_engine_and_a_wrong_name_is_refused_with_its_line() {
    log();
    let written = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false));
    let path = written.write();
    let text = std::fs::read_to_string(&path).unwrap();
    let bundle = |engine: &str| Bundle::parse(&format!("{engine}\n{text}"), &path);
    assert_eq!(bundle("engine = \"pulley\"").unwrap().engine, Some(EngineKind::Pulley));
    assert_eq!(bundle("engine = \"cranelift\"").unwrap().engine, Some(EngineKind::Cranelift));
    assert_eq!(bundle("").unwrap().engine, None);
    let err = bundle("engine = \"jit\"").unwrap_err();
    let problem = &err.problems[0];
    assert_eq!((problem.line, problem.field.as_str()), (Some(1), "engine"), "{err}");
    assert!(problem.message.contains("\"jit\" is not an engine") && problem.message.contains("pulley"), "{err}");
}

#[test]
fn a_bundle_that_names_pulley_runs_on_pulley_unless_the_command_line_says_otherwise() {
    log();
    let dirs = CliDirs::new();
    let bundle = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false));
    let written = bundle.write();
    let text = std::fs::read_to_string(&written).unwrap();
    std::fs::write(&written, format!("engine = \"pulley\"\n{text}")).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", written.to_str().unwrap(), "--exit-when-idle"];
        args.extend_from_slice(extra);
        assert!(dirs.cli(&args) == ExitCode::SUCCESS);
        kinds(dirs.cache())
    };
    assert_eq!(run(&[]), ["pulley"]);
    assert_eq!(run(&["--engine", "cranelift"]), ["cranelift", "pulley"]);
    assert!(dirs.cli(&["run", written.to_str().unwrap(), "--engine", "jit"]) == ExitCode::from(2), "an unknown engine is a usage error");
}

#[test]
fn the_harness_runs_on_the_engine_under_test() {
    log();
    let asked = std::env::var(engines::VARIABLE).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "cranelift".into());
    let runtime = hyperty_tests::runtime(Duration::from_secs(5));
    assert_eq!(runtime.engine().name(), asked);
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = healthy_pair(&runtime);
    driver.still_works(&a, &b);
}

/// The data directory is checked as the cache directory is: one others can
/// write to is refused, naming it, before anything is kept in it.
#[cfg(unix)]
#[test]
fn a_data_directory_others_can_write_to_is_refused_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    log();
    let dirs = CliDirs::new();
    std::fs::set_permissions(dirs.data(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let config = RuntimeConfig { cache_dir: dirs.cache().to_owned(), data_dir: Some(dirs.data().to_owned()), ..engines::config() };
    let err = format!("{:#}", Runtime::new(config).err().expect("a data directory others can write to is refused"));
    assert!(err.contains(&dirs.data().display().to_string()) && err.contains("others can write to it (mode 777)"), "{err}");
    assert!(!dirs.data().join("runtime.redb").exists(), "nothing was kept in it");
}
