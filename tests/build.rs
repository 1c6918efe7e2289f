//! Builds the guest components (the separate `guests/` workspace) for
//! `wasm32-wasip2`, the way wasmtime's test-programs crate does, so that a
//! plain `cargo test` on a fresh clone has every component it needs.
//!
//! The guests are built into `guests/target` (not this build's target dir)
//! so the demo bundle's relative paths find them, with path prefixes
//! remapped so that the same toolchain produces the same bytes wherever the
//! clone lives: the demo bundle pins their sha256 digests.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

include!("build_js.rs");

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let repo = manifest_dir.parent().unwrap().to_path_buf();
    let guests = repo.join("guests");
    for watched in ["wit", "guests/Cargo.toml", "guests/Cargo.lock", "guests/.cargo"] {
        println!("cargo:rerun-if-changed={}", repo.join(watched).display());
    }
    for entry in std::fs::read_dir(&guests).unwrap().flatten() {
        if entry.path().join("Cargo.toml").exists() {
            println!("cargo:rerun-if-changed={}", entry.path().join("src").display());
            println!("cargo:rerun-if-changed={}", entry.path().join("Cargo.toml").display());
        }
    }

    ensure_target();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo"));
    let remap = [
        format!("--remap-path-prefix={}=/guests", guests.display()),
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
    ]
    .join("\x1f");
    let status = Command::new(cargo)
        .current_dir(&guests)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(guests.join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("CARGO_ENCODED_RUSTFLAGS", remap)
        .status()
        .expect("cannot run cargo to build the guests");
    assert!(status.success(), "building the guest components failed");

    let out = guests.join("target").join(TARGET).join("release");
    println!("cargo:rustc-env=HYPERTY_GUESTS_DIR={}", out.display());
    println!("cargo:rustc-env=HYPERTY_REPO_DIR={}", repo.display());
    build_js(&repo);
}

/// Installs the wasm32-wasip2 standard library through rustup if missing.
fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc).args(["--print", "sysroot"]).output().expect("cannot run rustc");
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    if Path::new(&sysroot).join("lib/rustlib").join(TARGET).exists() {
        return;
    }
    let status = Command::new("rustup").args(["target", "add", TARGET]).status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "the {TARGET} target is missing and `rustup target add {TARGET}` failed; install it and retry"
    );
}
