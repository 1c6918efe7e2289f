//! What the runtime itself holds stays where it was: 1,000 crash/restart
//! cycles, or a refused oversized message, leave its resident memory (less
//! what the guests hold) as it was. Its own test binary: resident memory is
//! per process, and cargo runs test binaries one after another; the tests
//! here take turns (`MEASURING`), so no other test allocates meanwhile.

use std::sync::Mutex;
use std::time::Duration;

use hyperty_host::EventKind;
use hyperty_tests::*;
use serde_json::{Value, json};

const EVIL: &str = "evil.example";

/// Held by the test measuring resident memory.
static MEASURING: Mutex<()> = Mutex::new(());

#[test]
fn a_thousand_crash_restart_cycles_do_not_grow_memory() {
    let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
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
    // SECURITY.md: "well under a MiB" (measured: +156..168 KiB).
    assert!(grown < 1 << 20, "resident memory grew by {} KiB over 1000 cycles", grown >> 10);
    driver.still_works(&a, &b);
}

#[test]
fn a_refused_oversized_message_leaves_no_copy_in_the_host() {
    let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let (_healthy, a, b) = healthy_pair(&runtime);
    let oversize = |name: &str| {
        TestBundle::new()
            .hyperty(EVIL, name, &guest("hostile"), json!({ "mode": "oversize" }))
            .domain(EVIL, json!({ "limits": { "memory-mb": 256, "call-timeout-ms": 30_000 } }))
    };
    // Once first, so that what the first time allocates for good (code,
    // caches, the pool's bookkeeping) is not counted.
    let mut try_oversize = |name: &str| {
        let bundle = oversize(name);
        runtime.deploy(&bundle.load()).unwrap();
        let evil = runtime.lookup(EVIL, name).unwrap();
        let answer = driver.ask(&evil, json!({ "to": b.to_string(), "bytes": 40 << 20 }));
        let result: Value = serde_json::from_str(answer.body.value.as_deref().unwrap_or_else(|| panic!("{answer:?}"))).unwrap();
        assert!(result["error"].as_str().unwrap().starts_with("too-large:"), "{result}");
        // The guest's own memory (80 MiB and more: the string, and the
        // message holding it) is its domain's; undeployed, it is returned.
        let guest = runtime.memory_used(EVIL).unwrap();
        assert!(guest >= 80 << 20, "the guest holds {} KiB", guest >> 10);
        assert!(runtime.undeploy(EVIL, name));
        wait_until("the guest's memory is returned", || runtime.memory_used(EVIL).unwrap_or(0) == 0);
    };
    try_oversize("warm-up");
    // Several times: the allocator's noise (some MiB either way) averages
    // out, a kept copy (40 MiB each time) adds up.
    const TIMES: i64 = 5;
    let before = resident_bytes();
    for i in 0..TIMES {
        try_oversize(&format!("x{i}"));
    }
    let grown = (resident_bytes() as i64 - before as i64) / TIMES;
    eprintln!("a refused 40 MiB message: resident {:+} KiB a time ({TIMES} times), once its guest is gone", grown >> 10);
    // Half a copy: the allocator's noise reached +16.5 MiB a time once in a
    // full suite on a loaded machine (usually within ±6 MiB).
    assert!(grown < 20 << 20, "the host kept {} KiB a time (a copy is 40 MiB)", grown >> 10);
    driver.still_works(&a, &b);
}
