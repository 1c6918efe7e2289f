//! Bad bundles are refused with a clear error naming what and where, and
//! what was already running keeps running.

use std::path::Path;
use std::time::Duration;

use hyperty_host::{Address, Bundle, BundleError, Runtime};
use hyperty_tests::*;
use serde_json::json;

/// A runtime with the healthy pair running.
fn running() -> (Runtime, Driver, TestBundle, Address, Address) {
    let runtime = runtime(Duration::from_secs(5));
    let driver = Driver::new(&runtime);
    let (bundle, a, b) = healthy_pair(&runtime);
    (runtime, driver, bundle, a, b)
}

fn deploy_err(runtime: &Runtime, bundle: &TestBundle) -> BundleError {
    let err = runtime.deploy(&bundle.load()).expect_err("the bundle must be refused");
    assert!(runtime.lookup("carol.example", "c").is_none(), "nothing of a refused bundle is deployed");
    err
}

#[test]
fn malformed_manifest_points_at_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.toml");
    let cases = [
        ("[domains.\"a.example\"\nx = 1\n", 1, "unclosed table, expected `]`"),
        ("name = \"x\"\n\n[[domains.\"a.example\".hyperties]]\nnmae = \"p\"\n", 4, "unknown field `nmae`"),
        (
            "[[domains.\"a.example\".hyperties]]\nname = \"p\"\ncomponent = \"p.wasm\"\nsha256 = \"abc\"\n",
            4,
            "domains.\"a.example\".hyperties[0].sha256",
        ),
        (
            "[[domains.\"not a domain\".hyperties]]\nname = \"p\"\ncomponent = \"p.wasm\"\nsha256 = \"00\"\n",
            1,
            "not a domain name",
        ),
        ("[domains.\"a.example\".limits]\ninbox = 0\n", 1, "inbox must be in"),
    ];
    for (text, line, needle) in cases {
        std::fs::write(&path, text).unwrap();
        let err = Bundle::load(&path).expect_err(text);
        let first = &err.problems[0];
        assert_eq!(first.file, path);
        assert_eq!(first.line, Some(line), "{err}");
        let shown = err.to_string();
        assert!(shown.contains(needle), "{shown:?} should mention {needle:?}");
        assert!(shown.contains(&path.display().to_string()), "{shown}");
    }
}

#[test]
fn digest_mismatch_is_refused_naming_both_digests() {
    let (runtime, mut driver, _good, a, b) = running();
    let bundle = TestBundle::new().hyperty("carol.example", "c", &guest("puppet"), puppet_config(false));
    let path = bundle.write();
    let text = std::fs::read_to_string(&path).unwrap();
    let pinned = "0".repeat(64);
    let actual = hyperty_host::Digest::of(&std::fs::read(guest("puppet")).unwrap()).to_string();
    std::fs::write(&path, text.replace(&actual, &pinned)).unwrap();
    let err = runtime.deploy(&Bundle::load(&path).unwrap()).unwrap_err();
    let shown = err.to_string();
    assert!(shown.contains(&pinned) && shown.contains(&actual), "{shown}");
    assert!(shown.contains("hyperties[0].sha256"), "{shown}");
    assert!(runtime.lookup("carol.example", "c").is_none());
    driver.still_works(&a, &b);
}

#[test]
fn file_that_is_not_a_component_is_refused() {
    let (runtime, mut driver, _good, a, b) = running();
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 3] = [
        ("junk.wasm", b"this is not webassembly", "not a WebAssembly file"),
        ("core.wasm", b"\0asm\x01\0\0\0", "core WebAssembly module, not a component"),
        ("broken.wasm", b"\0asm\x0d\0\x01\0\xff\xff", "not a valid component"),
    ];
    for (name, bytes, reason) in cases {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        let bundle = TestBundle::new().hyperty("carol.example", "c", &file, json!({}));
        let shown = deploy_err(&runtime, &bundle).to_string();
        assert!(shown.contains(reason), "{shown:?} should say {reason:?}");
        assert!(shown.contains(name) && shown.contains("hyperties[0].component"), "{shown}");
    }
    driver.still_works(&a, &b);
}

#[test]
fn component_of_another_world_is_refused_with_the_reason() {
    let (runtime, mut driver, _good, a, b) = running();
    let bundle = TestBundle::new().hyperty("carol.example", "c", &guest("not-a-hyperty"), json!({}));
    let shown = deploy_err(&runtime, &bundle).to_string();
    assert!(shown.contains("does not fit the hyperty world"), "{shown}");
    assert!(shown.contains("rethink:hyperty/handler"), "the reason names the missing export: {shown}");
    driver.still_works(&a, &b);
}

#[test]
fn missing_file_is_refused() {
    let (runtime, mut driver, _good, a, b) = running();
    let bundle = TestBundle::new().hyperty("carol.example", "c", Path::new("/no/such/file.wasm"), json!({}));
    let shown = deploy_err(&runtime, &bundle).to_string();
    assert!(shown.contains("cannot read /no/such/file.wasm"), "{shown}");
    driver.still_works(&a, &b);
}

#[test]
fn every_problem_is_listed_and_nothing_is_half_deployed() {
    let (runtime, mut driver, _good, a, b) = running();
    // One good hyperty and two bad ones in the same bundle: none deploys.
    let bundle = TestBundle::new()
        .hyperty("carol.example", "c", &guest("puppet"), puppet_config(false))
        .hyperty("carol.example", "d", Path::new("/no/such/file.wasm"), json!({}))
        .hyperty("dave.example", "e", &guest("not-a-hyperty"), json!({}));
    let err = deploy_err(&runtime, &bundle);
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(runtime.lookup("carol.example", "c").is_none());
    // A name already running is a problem too.
    let again = TestBundle::new().hyperty("alice.example", "a", &guest("puppet"), puppet_config(false));
    assert!(deploy_err(&runtime, &again).to_string().contains("alice.example/a is already deployed"));
    driver.still_works(&a, &b);
}

#[test]
fn init_failure_rolls_back_the_whole_bundle() {
    let (runtime, mut driver, _good, a, b) = running();
    // The puppet refuses a config without an observer.
    let bundle = TestBundle::new()
        .hyperty("carol.example", "c", &guest("puppet"), puppet_config(false))
        .hyperty("carol.example", "bad", &guest("puppet"), json!({ "nothing": true }));
    let shown = deploy_err(&runtime, &bundle).to_string();
    assert!(shown.contains("init refused: bad config"), "{shown}");
    assert!(runtime.lookup("carol.example", "bad").is_none());
    driver.still_works(&a, &b);
}

#[test]
fn cli_check_reports_problems_and_passes_good_bundles() {
    let good = TestBundle::new().hyperty("carol.example", "c", &guest("puppet"), puppet_config(false));
    let dirs = CliDirs::new();
    let run = |path: &Path| dirs.cli(&["check".as_ref(), path.as_os_str()]);
    assert_eq!(run(&good.write()), std::process::ExitCode::SUCCESS);
    let bad = TestBundle::new().hyperty("carol.example", "c", &guest("not-a-hyperty"), json!({}));
    assert_eq!(run(&bad.write()), std::process::ExitCode::FAILURE);
}

#[test]
fn bad_protostub_entries_are_refused_naming_the_field_and_nothing_running_is_lost() {
    let (runtime, mut driver, _good, a, b) = running();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.toml");
    // Endpoints that are not ip:port, an empty list, a zero queue: each with its line.
    let stub = guest("nats-stub");
    let text = format!(
        "[protostubs.\"bob.example\"]\ncomponent = {c:?}\nsha256 = \"{d}\"\nendpoints = [\"localhost:4222\"]\n\n\
         [protostubs.\"carol.example\"]\ncomponent = {c:?}\nsha256 = \"{d}\"\nendpoints = []\nqueue = 0\n",
        c = stub.display().to_string(),
        d = hyperty_host::Digest::of(&std::fs::read(&stub).unwrap())
    );
    std::fs::write(&path, text).unwrap();
    let err = Bundle::load(&path).unwrap_err();
    let shown = err.to_string();
    for (line, needle) in [
        (4, r#"protostubs."bob.example".endpoints: "localhost:4222" is not <ip>:<port>"#),
        (9, r#"protostubs."carol.example".endpoints: a protostub needs at least one endpoint"#),
        (10, r#"protostubs."carol.example".queue: must be at least 1"#),
    ] {
        assert!(err.problems.iter().any(|p| p.line == Some(line) && p.to_string().contains(needle)), "{needle} at line {line} in:\n{shown}");
    }
    // A hyperty given as a protostub does not fit the world.
    let wrong = TestBundle::new().protostub("carol.example", &["127.0.0.1:4222".into()], json!({}));
    let wrong_path = wrong.write();
    let text = std::fs::read_to_string(&wrong_path).unwrap();
    let puppet = guest("puppet");
    let text = text
        .replace(&guest("nats-stub").display().to_string(), &puppet.display().to_string())
        .replace(&hyperty_host::Digest::of(&std::fs::read(guest("nats-stub")).unwrap()).to_string(), &hyperty_host::Digest::of(&std::fs::read(&puppet).unwrap()).to_string());
    std::fs::write(&wrong_path, text).unwrap();
    let err = runtime.deploy(&Bundle::load(&wrong_path).unwrap()).unwrap_err().to_string();
    assert!(err.contains(r#"protostubs."carol.example".component"#) && err.contains("does not fit the protostub world"), "{err}");
    // A configuration the stub refuses: found at deployment, naming it.
    let bad = TestBundle::new().protostub("carol.example", &["127.0.0.1:4222".into()], json!({ "config": { "servers": ["nowhere"] } }));
    let err = runtime.deploy(&bad.load()).unwrap_err().to_string();
    assert!(err.contains(r#"protostubs."carol.example".config"#) && err.contains(r#"server "nowhere" is not <ip>:<port>"#), "{err}");
    // A second stub for a domain that has one.
    let first = TestBundle::new().protostub("carol.example", &["127.0.0.1:4222".into()], json!({}));
    runtime.deploy(&first.load()).unwrap();
    let err = runtime.deploy(&first.load()).unwrap_err().to_string();
    assert!(err.contains("a protostub for carol.example already runs"), "{err}");
    driver.still_works(&a, &b);
}

/// `hyperty check` of the bundle at `path`: its problems, as shown.
fn check_err(path: &Path) -> String {
    let config = hyperty_host::RuntimeConfig { cache_dir: cache_dir(), ..Default::default() };
    hyperty_host::runtime::check_file(path, config).expect_err("check must refuse the bundle").to_string()
}

#[test]
fn a_component_built_against_another_contract_track_is_refused_naming_both_versions() {
    let (runtime, mut driver, _good, a, b) = running();
    let bundle = TestBundle::new().hyperty("carol.example", "c", &guest("contract-0-2-0"), json!({}));
    for shown in [deploy_err(&runtime, &bundle).to_string(), check_err(&bundle.write())] {
        assert!(shown.contains("built against rethink:hyperty@0.2.0"), "{shown}");
        assert!(shown.contains("this host serves rethink:hyperty@0.1.x (0.1.0)"), "{shown}");
        assert!(!shown.contains("missing"), "the reason is the version, not a missing function: {shown}");
        assert!(shown.contains("hyperties[0].component"), "{shown}");
    }
    driver.still_works(&a, &b);
}

#[test]
fn a_component_built_against_a_later_patch_of_the_served_track_runs() {
    // 0.1.1 is on the 0.1 track this host serves, and its interfaces are
    // those of 0.1.0: the component model's semver rule accepts it.
    let (runtime, mut driver, _good, a, b) = running();
    let bundle = TestBundle::new().hyperty("carol.example", "c", &guest("contract-0-1-1"), json!({}));
    let config = hyperty_host::RuntimeConfig { cache_dir: cache_dir(), ..Default::default() };
    hyperty_host::runtime::check_file(&bundle.write(), config).expect("check accepts 0.1.1");
    runtime.deploy(&bundle.load()).expect("deploy accepts 0.1.1");
    let c = runtime.lookup("carol.example", "c").unwrap();
    let answer = driver.ask(&c, json!({}));
    assert_eq!((answer.body.code, answer.body.value.as_deref()), (Some(200), Some("\"contract-0-1-1\"")));
    driver.still_works(&a, &b);
}

#[test]
fn a_component_using_what_a_later_patch_added_is_refused_naming_both_versions() {
    // 0.1.2 is on the served track, but this one calls `log.flush`, which
    // only 0.1.2 has: the type check refuses it, and says why.
    let (runtime, mut driver, _good, a, b) = running();
    let bundle = TestBundle::new().hyperty("carol.example", "c", &guest("contract-0-1-2"), json!({}));
    for shown in [deploy_err(&runtime, &bundle).to_string(), check_err(&bundle.write())] {
        assert!(shown.contains("built against rethink:hyperty@0.1.2, later than the 0.1.0 this host serves"), "{shown}");
        assert!(shown.contains("rethink:hyperty/log@0.1.2"), "the import that does not fit is named: {shown}");
    }
    driver.still_works(&a, &b);
}

#[test]
fn a_protostub_importing_beyond_its_world_is_refused_naming_each_import() {
    let (runtime, mut driver, _good, a, b) = running();
    let nosy = guest("nosy-stub");
    let bundle = TestBundle::new().protostub("carol.example", &["127.0.0.1:4222".into()], json!({}));
    let path = bundle.write();
    let nats = guest("nats-stub");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&nats.display().to_string(), &nosy.display().to_string())
        .replace(
            &hyperty_host::Digest::of(&std::fs::read(&nats).unwrap()).to_string(),
            &hyperty_host::Digest::of(&std::fs::read(&nosy).unwrap()).to_string(),
        );
    std::fs::write(&path, text).unwrap();
    let deployed = runtime.deploy(&Bundle::load(&path).unwrap()).unwrap_err().to_string();
    for shown in [deployed, check_err(&path)] {
        assert!(shown.contains(r#"protostubs."carol.example".component"#), "{shown}");
        for import in ["wasi:sockets/udp@", "wasi:sockets/ip-name-lookup@", "wasi:clocks/wall-clock@"] {
            assert!(shown.contains(import), "{shown} should name {import}");
        }
        assert!(!shown.contains("wasi:sockets/tcp@"), "TCP is the stub's own: {shown}");
    }
    assert!(runtime.discover(&hyperty_host::Query { domain: Some("carol.example".into()), ..Default::default() }).is_empty());
    driver.still_works(&a, &b);
}

#[test]
fn toml_values_json_cannot_carry_are_converted_or_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.toml");
    let entry = "[[domains.\"a.example\".hyperties]]\nname = \"p\"\ncomponent = \"p.wasm\"\nsha256 = \"00000000000000000000000000000000000000000000000000000000000000ff\"\n";
    // Datetimes reach `init` as RFC 3339 strings.
    let dates = "config = { when = 1987-07-05, at = 1979-05-27T07:32:00Z, local = 1979-05-27T07:32:00.5, time = 07:32:00 }\n";
    std::fs::write(&path, format!("{entry}{dates}")).unwrap();
    let bundle = Bundle::load(&path).unwrap();
    let config: serde_json::Value = serde_json::from_str(&bundle.domains[0].hyperties[0].config).unwrap();
    assert_eq!(
        config,
        json!({ "when": "1987-07-05", "at": "1979-05-27T07:32:00Z", "local": "1979-05-27T07:32:00.5", "time": "07:32:00" })
    );
    // inf and nan cannot be carried: refused by load (so by run) and check, each on its line.
    std::fs::write(&path, format!("{entry}[domains.\"a.example\".hyperties.config]\nx = inf\nok = 1.5\ny = [1.0, -nan]\n")).unwrap();
    let config = hyperty_host::RuntimeConfig { cache_dir: cache_dir(), ..Default::default() };
    for err in [Bundle::load(&path).unwrap_err(), hyperty_host::runtime::check_file(&path, config).unwrap_err()] {
        let at: Vec<_> = err.problems.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(
            at,
            [(Some(6), r#"domains."a.example".hyperties[0].config.x"#), (Some(8), r#"domains."a.example".hyperties[0].config.y[1]"#)],
            "{err}"
        );
        assert!(err.to_string().contains("`inf` cannot be passed to a component") && err.to_string().contains("`-nan`"), "{err}");
    }
}

#[test]
fn bytes_that_are_not_utf8_and_digitless_integers_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.toml");
    std::fs::write(&path, b"name = \"x\"\n# caf\xe9\n").unwrap();
    let err = Bundle::load(&path).unwrap_err();
    assert_eq!(err.problems[0].line, Some(2), "{err}");
    assert!(err.to_string().contains("invalid byte 0xe9 at byte offset 16"), "{err}");
    std::fs::write(&path, "[domains.\"a.example\".limits]\n\ninbox = 0x\n").unwrap();
    let err = Bundle::load(&path).unwrap_err();
    assert_eq!(err.problems[0].line, Some(3), "{err}");
    assert!(err.to_string().contains("`0x` is not a number: no digits after `0x`"), "{err}");
    std::fs::write(&path, "[domains.\"a.example\".limits]\ninbox = 0xffffffffffffffffffffffffffffffffffffffff\n").unwrap();
    let err = Bundle::load(&path).unwrap_err();
    assert!(err.to_string().contains("is not a 64-bit integer"), "{err}");
}

#[test]
fn check_and_deploy_refuse_a_component_whose_memory_starts_above_memory_mb() {
    let (runtime, mut driver, _good, a, b) = running();
    let big = guest("big-memory");
    let bundle = TestBundle::new()
        .hyperty("carol.example", "c", &big, json!({}))
        .domain("carol.example", json!({ "limits": { "memory-mb": 32 } }));
    for shown in [check_err(&bundle.write()), deploy_err(&runtime, &bundle).to_string()] {
        assert!(shown.contains("its linear memory starts at") && shown.contains("MiB, more than the domain's memory-mb = 32"), "{shown}");
        assert!(shown.contains("hyperties[0].component"), "{shown}");
    }
    // With room for it, the same component passes check and runs.
    let roomy = TestBundle::new()
        .hyperty("carol.example", "c", &big, json!({}))
        .domain("carol.example", json!({ "limits": { "memory-mb": 64 } }));
    let config = hyperty_host::RuntimeConfig { cache_dir: cache_dir(), ..Default::default() };
    hyperty_host::runtime::check_file(&roomy.write(), config).expect("64 MiB is room enough");
    runtime.deploy(&roomy.load()).unwrap();
    let c = runtime.lookup("carol.example", "c").unwrap();
    assert_eq!(driver.ask(&c, json!({})).body.code, Some(200));
    driver.still_works(&a, &b);
}
