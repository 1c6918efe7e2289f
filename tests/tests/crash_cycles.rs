//! 1,000 crash/restart cycles leave the runtime's resident memory where it
//! was. Its own test binary: resident memory is per process, and cargo runs
//! test binaries one after another, so no other test allocates meanwhile.

use std::time::Duration;

use hyperty_host::EventKind;
use hyperty_tests::*;
use serde_json::json;

#[test]
fn a_thousand_crash_restart_cycles_do_not_grow_memory() {
    const EVIL: &str = "evil.example";
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let mut events = runtime.events();
    let (_healthy, a, b) = healthy_pair(&runtime);
    let bundle = TestBundle::new()
        .hyperty(EVIL, "x", &guest("hostile"), json!({ "mode": "vault", "owner": OBSERVER }))
        .domain(EVIL, json!({ "restart": { "initial-backoff-ms": 1, "max-backoff-ms": 1 } }));
    runtime.deploy(&bundle.load()).unwrap();
    let evil = runtime.lookup(EVIL, "x").unwrap();
    let mut cycle = || {
        let answer = driver.ask(&evil, json!({ "panic": true }));
        assert_eq!(answer.body.code, Some(500));
        wait_event(&mut events, |e| e.address == evil && matches!(e.kind, EventKind::Restarted { .. }));
    };
    for _ in 0..50 {
        cycle();
    }
    let before = resident_bytes();
    let domain_before = runtime.memory_used(EVIL).unwrap();
    for _ in 0..1000 {
        cycle();
    }
    let after = resident_bytes();
    let grown = after as i64 - before as i64;
    eprintln!(
        "1000 crash/restart cycles: resident {} -> {} KiB ({:+} KiB); domain memory {} -> {} KiB",
        before >> 10,
        after >> 10,
        grown >> 10,
        domain_before >> 10,
        runtime.memory_used(EVIL).unwrap() >> 10
    );
    assert_eq!(runtime.memory_used(EVIL).unwrap(), domain_before, "dead instances hold no domain memory");
    assert!(grown < 16 << 20, "resident memory grew by {} KiB over 1000 cycles", grown >> 10);
    driver.still_works(&a, &b);
}
