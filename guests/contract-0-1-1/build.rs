//! Copies the repository's WIT into `OUT_DIR` with its package line set to
//! the version in the crate's name (`contract-0-2-0` is built against
//! `rethink:hyperty@0.2.0`), so the tests get real components built against
//! other versions of the contract. 0.1.2 also adds a function to `log`
//! (`flush`), which the component then calls (`cfg(extended)`): a later
//! patch that uses what 0.1.0 lacks.

use std::path::PathBuf;

fn main() {
    let name = std::env::var("CARGO_PKG_NAME").unwrap();
    let version = name.strip_prefix("contract-").expect("named contract-<major>-<minor>-<patch>").replace('-', ".");
    let wit = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("../../wit");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("wit");
    std::fs::create_dir_all(out.join("deps")).unwrap();
    let text = std::fs::read_to_string(wit.join("hyperty.wit")).unwrap();
    let extended = version == "0.1.2";
    println!("cargo::rustc-check-cfg=cfg(extended)");
    if extended {
        println!("cargo::rustc-cfg=extended");
    }
    let edited: Vec<String> = text
        .lines()
        .map(|l| match l {
            l if l.starts_with("package rethink:hyperty@") => format!("package rethink:hyperty@{version};"),
            "interface log {" if extended => format!("{l}\n    flush: func();"),
            l => l.to_owned(),
        })
        .collect();
    assert!(!extended || edited.iter().any(|l| l.contains("flush: func();")), "the WIT has no `interface log {{` line");
    assert!(edited.iter().any(|l| l == &format!("package rethink:hyperty@{version};")), "the WIT has no package line");
    std::fs::write(out.join("hyperty.wit"), edited.join("\n")).unwrap();
    for dep in std::fs::read_dir(wit.join("deps")).unwrap().flatten() {
        std::fs::copy(dep.path(), out.join("deps").join(dep.file_name())).unwrap();
    }
    println!("cargo:rerun-if-changed={}", wit.display());
}
