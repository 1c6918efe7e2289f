//! Code integrity (G2): signed components, and a compiled-component cache
//! that never runs what it did not write itself.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use hyperty_host::{Runtime, RuntimeConfig};
use hyperty_tests::*;
use serde_json::json;

/// `hyperty <args>` with private data and cache directories.
fn cli(args: &[&str]) -> ExitCode {
    CliDirs::new().cli(args)
}

/// A provider key made with `hyperty keygen`, and its public key.
fn provider_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let secret = dir.join(format!("{name}.key"));
    assert_eq!(cli(&["keygen", secret.to_str().unwrap()]), ExitCode::SUCCESS);
    (secret.clone(), hyperty_host::signing::keygen_public(&secret).unwrap().to_string())
}

/// The component `name` copied into `dir` (so its signature can sit beside it).
fn copy_guest(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::copy(guest(name), &path).unwrap();
    path
}

fn signed_bundle(component: &Path, trusted: &[&str]) -> TestBundle {
    TestBundle::new()
        .hyperty("carol.example", "c", component, puppet_config(false))
        .domain("carol.example", json!({ "trusted-keys": trusted }))
}

#[test]
fn signed_components_deploy_and_bad_signatures_are_refused_saying_why() {
    let runtime = runtime(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let (alice_key, alice_pub) = provider_key(dir.path(), "alice");
    let (mallory_key, _mallory_pub) = provider_key(dir.path(), "mallory");
    let component = copy_guest(dir.path(), "puppet");
    let sig = PathBuf::from(format!("{}.sig", component.display()));

    // Missing.
    let err = runtime.deploy(&signed_bundle(&component, &[&alice_pub]).load()).unwrap_err().to_string();
    assert!(err.contains("signature missing") && err.contains("hyperties[0].signature"), "{err}");

    // Signed by a key the domain does not trust.
    assert_eq!(cli(&["sign", "--key", mallory_key.to_str().unwrap(), component.to_str().unwrap()]), ExitCode::SUCCESS);
    let err = runtime.deploy(&signed_bundle(&component, &[&alice_pub]).load()).unwrap_err().to_string();
    assert!(err.contains("a key the domain does not trust"), "{err}");

    // Tampered: a signature made for another component.
    let other = copy_guest(dir.path(), "pong");
    assert_eq!(cli(&["sign", "--key", alice_key.to_str().unwrap(), other.to_str().unwrap()]), ExitCode::SUCCESS);
    std::fs::copy(format!("{}.sig", other.display()), &sig).unwrap();
    let err = runtime.deploy(&signed_bundle(&component, &[&alice_pub]).load()).unwrap_err().to_string();
    assert!(err.contains("does not verify: the component or its signature was tampered with"), "{err}");

    // Tampered: one hex digit of the signature changed.
    assert_eq!(cli(&["sign", "--key", alice_key.to_str().unwrap(), component.to_str().unwrap()]), ExitCode::SUCCESS);
    let text = std::fs::read_to_string(&sig).unwrap();
    let (key_line, sig_line) = text.split_once('\n').unwrap();
    let flipped = if sig_line.starts_with('0') { sig_line.replacen('0', "1", 1) } else { format!("0{}", &sig_line[1..]) };
    std::fs::write(&sig, format!("{key_line}\n{flipped}")).unwrap();
    let err = runtime.deploy(&signed_bundle(&component, &[&alice_pub]).load()).unwrap_err().to_string();
    assert!(err.contains("does not verify"), "{err}");
    assert!(runtime.lookup("carol.example", "c").is_none());

    // Properly signed: deploys.
    assert_eq!(cli(&["sign", "--key", alice_key.to_str().unwrap(), component.to_str().unwrap()]), ExitCode::SUCCESS);
    runtime.deploy(&signed_bundle(&component, &[&alice_pub]).load()).expect("a good signature deploys");
    // `hyperty check` agrees.
    let good = signed_bundle(&component, &[&alice_pub]);
    assert_eq!(cli(&["check", good.write().to_str().unwrap()]), ExitCode::SUCCESS);
}

fn runtime_with_cache(dir: &Path) -> Runtime {
    Runtime::new(RuntimeConfig { cache_dir: dir.to_owned(), ..RuntimeConfig::default() }).unwrap()
}

fn cached_artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    v.sort();
    v
}

/// Deploys the healthy pair (puppet) and ping/pong-free check that it works.
fn works_with_cache(dir: &Path) {
    let runtime = runtime_with_cache(dir);
    let mut driver = Driver::new(&runtime);
    let (_bundle, a, b) = healthy_pair(&runtime);
    driver.still_works(&a, &b);
}

#[test]
fn corrupt_cached_artifact_is_detected_and_recompiled() {
    let cache = tempfile::tempdir().unwrap();
    works_with_cache(cache.path());
    let artifacts = cached_artifacts(cache.path());
    assert_eq!(artifacts.len(), 1, "puppet compiled once and cached");
    let mut bytes = std::fs::read(&artifacts[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&artifacts[0], &bytes).unwrap();
    works_with_cache(cache.path());
    assert_ne!(std::fs::read(&artifacts[0]).unwrap(), bytes, "the corrupt artifact was replaced by a fresh compile");
}

#[test]
fn swapped_or_foreign_artifacts_are_not_executed() {
    let cache = tempfile::tempdir().unwrap();
    // Cache two components.
    works_with_cache(cache.path());
    let runtime = runtime_with_cache(cache.path());
    let bundle = TestBundle::new().hyperty("bob.example", "pong", &guest("pong"), json!({}));
    runtime.deploy(&bundle.load()).unwrap();
    drop(runtime);
    let artifacts = cached_artifacts(cache.path());
    assert_eq!(artifacts.len(), 2);
    let digest = hyperty_host::Digest::of(&std::fs::read(guest("puppet")).unwrap()).to_string();
    let puppet = artifacts.iter().find(|a| a.file_name().unwrap().to_str().unwrap().starts_with(&digest)).unwrap().clone();
    let original = std::fs::read(&puppet).unwrap();
    // Swap them, sidecars included: each file now claims to be the other.
    let tmp = cache.path().join("swap");
    std::fs::rename(&artifacts[0], &tmp).unwrap();
    std::fs::rename(&artifacts[1], &artifacts[0]).unwrap();
    std::fs::rename(&tmp, &artifacts[1]).unwrap();
    let macs: Vec<PathBuf> = artifacts.iter().map(|a| a.with_extension("mac")).collect();
    std::fs::rename(&macs[0], &tmp).unwrap();
    std::fs::rename(&macs[1], &macs[0]).unwrap();
    std::fs::rename(&tmp, &macs[1]).unwrap();
    // The puppet still behaves as the puppet (not pong's code under its
    // name), compiled afresh: its artifact is the puppet's again.
    assert_ne!(std::fs::read(&puppet).unwrap(), original, "swapped");
    works_with_cache(cache.path());
    assert_eq!(std::fs::read(&puppet).unwrap(), original, "the swapped-in artifact was replaced by the puppet's own");

    // A cache written with another runtime's key (foreign) is recompiled
    // too: the artifact is written again and sealed with this key.
    std::fs::write(cache.path().join("mac.key"), hex_key(0x5a)).unwrap();
    let foreign_mac = std::fs::read(puppet.with_extension("mac")).unwrap();
    let foreign_file = std::fs::metadata(&puppet).unwrap().ino();
    works_with_cache(cache.path());
    assert_ne!(std::fs::metadata(&puppet).unwrap().ino(), foreign_file, "the foreign artifact was rewritten, not used");
    assert_ne!(std::fs::read(puppet.with_extension("mac")).unwrap(), foreign_mac, "and sealed with this runtime's key");
}

/// A cache key of 32 bytes `byte`, as `mac.key` holds it (hex).
fn hex_key(byte: u8) -> String {
    format!("{byte:02x}").repeat(32)
}

#[test]
fn a_cache_directory_others_can_write_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let cache = tempfile::tempdir().unwrap();
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    works_with_cache(cache.path());
    assert!(cached_artifacts(cache.path()).is_empty(), "nothing is cached in a world-writable directory");
    assert!(!cache.path().join("mac.key").exists());
}
