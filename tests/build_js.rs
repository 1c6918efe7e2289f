// Included by build.rs: builds the JavaScript guests.

/// Builds every JavaScript guest `guests/js/<name>/<name>.js` into
/// `guests/target/js/<name>.wasm` with `guests/js/build.sh` (jco's QuickJS
/// backend; it installs the pinned npm packages when missing). The packages
/// and npm's cache go to `<cargo target dir>/js-tools`, outside the clone
/// and outside HOME. Sets `HYPERTY_JS_GUESTS_DIR`.
fn build_js(repo: &Path) {
    let js = repo.join("guests/js");
    println!("cargo:rerun-if-changed={}", js.display());
    // OUT_DIR is <target>/<profile>/build/<crate>-<hash>/out.
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    let tools = out_dir.ancestors().nth(4).unwrap_or(&out_dir).join("js-tools");
    let out = repo.join("guests/target/js");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&js)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "sdk")
        .map(|e| e.path().join(e.file_name()).with_extension("js"))
        .filter(|p| p.exists())
        .collect();
    sources.sort();
    let status = Command::new("bash")
        .arg(js.join("build.sh"))
        .arg(&out)
        .args(&sources)
        .env("HYPERTY_JS_TOOLS", &tools)
        .status()
        .expect("cannot run bash to build the JavaScript guests");
    assert!(status.success(), "building the JavaScript guest components failed (guests/js/build.sh)");
    println!("cargo:rustc-env=HYPERTY_JS_GUESTS_DIR={}", out.display());
}
