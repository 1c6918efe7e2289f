//! `just call`: the call demo bundle (guests/demo/call.toml) runs to
//! completion as the recipe runs it, and its log tells the setup in words.
//!
//! Its own test binary: it captures the process's log, which needs the one
//! global tracing subscriber.

use std::process::ExitCode;

use hyperty_tests::{CliDirs, host_log as log, repo};

#[test]
fn the_call_demo_tells_a_call_between_identified_peers_and_exits_by_itself() {
    log();
    let dirs = CliDirs::new();
    let bundle = repo().join("guests/demo/call.toml");
    let code = dirs.cli(&["run".as_ref(), bundle.as_os_str(), "--exit-when-idle".as_ref()]);
    let log = log();
    assert!(code == ExitCode::SUCCESS, "the call demo failed:\n{log}\n(if a guest changed, re-pin: just call)");
    let lines = [
        "alice.example/caller: offer sent to bob.example/callee in the Connection object connection://alice.example/",
        "bob.example/callee: offer received from alice@idp.example",
        "bob.example/callee: answer written into the Connection object connection://alice.example/",
        "alice.example/caller: answer received from bob@idp.example (its identity assertion is valid; its fingerprint checked)",
        "alice.example/caller: connected: identity of the peer verified: bob@idp.example (IdP idp.example)",
        "bob.example/callee: connected: identity of the peer verified: alice@idp.example (IdP idp.example)",
        "alice.example/caller: channel \"chat\" open; sent \"hello bob\"",
        "bob.example/callee: message exchanged: received \"hello bob\"",
        "alice.example/caller: message exchanged: received \"hello alice\"",
        "alice.example/caller: hanging up",
        "bob.example/callee: the caller hung up (the Connection object is deleted): closing",
        "bob.example/callee: call ended",
        "every hyperty is idle; stopping",
    ];
    // Each side's lines in this order (the two sides interleave).
    let mut at = std::collections::HashMap::new();
    for line in lines {
        let side = line.split(':').next().unwrap();
        let from = *at.get(side).unwrap_or(&0);
        let found = log[from..].find(line).unwrap_or_else(|| panic!("the log lacks {line:?} (after byte {from}):\n{log}"));
        at.insert(side, from + found + line.len());
    }
}
