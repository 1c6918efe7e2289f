//! The engine the tests run on: Cranelift unless `HYPERTY_TEST_ENGINE`
//! names another (`pulley`). `just test` runs the whole suite on the
//! default engine, then re-runs a chosen subset (backbone, hostile
//! containment, policies, syncher, platforms) with
//! `HYPERTY_TEST_ENGINE=pulley`: the same tests, not copies, on the other
//! engine.
//!
//! Chosen over a per-test loop over both engines (which would wrap the
//! body of every test of the subset and double each one's time in every
//! run) and over a test that re-runs other test binaries (which would have
//! to find them in the target directory or nest cargo): a runtime's engine
//! is one field of its config, so the harness's config carries it.

use hyperty_host::{EngineKind, RuntimeConfig};

/// The variable naming the engine of the tests' runtimes.
pub const VARIABLE: &str = "HYPERTY_TEST_ENGINE";

/// The engine `HYPERTY_TEST_ENGINE` names (Cranelift when unset or empty);
/// panics, naming the variable, on any other value, so a typo never runs
/// the suite on the default engine unnoticed.
pub fn under_test() -> EngineKind {
    match std::env::var(VARIABLE) {
        Ok(name) if !name.is_empty() => name.parse().unwrap_or_else(|e| panic!("{VARIABLE}: {e}")),
        _ => EngineKind::default(),
    }
}

/// The tests' base runtime config: the defaults on the engine under test.
pub fn config() -> RuntimeConfig {
    RuntimeConfig { engine: under_test(), ..RuntimeConfig::default() }
}
