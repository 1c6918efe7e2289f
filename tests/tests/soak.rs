//! The soak (issue #19): millions of cross-domain messages with policies and
//! identity, none lost, none duplicated, nothing left growing. CI runs the
//! bounded version (the counts below); `just soak` runs 10,000,000 through
//! the bus and 1,000,000 through NATS in a release build, through
//! `HYPERTY_SOAK_MESSAGES` and `HYPERTY_SOAK_NATS_MESSAGES`.

use hyperty_tests::soak::{Ledger, Soak};
use hyperty_tests::*;

/// Resident memory may grow by at most this much between the end of the
/// warm-up and the end of the run: allocator and cache settling, not a
/// per-message cost (1,000,000 messages leaking 32 bytes each would be
/// 30 MiB; the bound is stated in SECURITY.md's soak line).
const RSS_GROWTH_BOUND: usize = 24 << 20;

/// Messages sent before the first measurement (pools, caches, allocator).
const WARM_UP: u64 = 50_000;

fn count(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(v) => v.replace('_', "").parse().unwrap_or_else(|e| panic!("{var}={v:?}: {e}")),
        Err(_) => default,
    }
}

/// Messages per run of the driver: one run answers the harness's request,
/// which must come within the runtime's 60 s request timeout even through
/// NATS on a loaded machine.
const RUN: u64 = 100_000;

/// Sends `total` messages in runs of at most [`RUN`], then checks the
/// ledger, the pending requests, the deployed hyperties and the resident
/// memory against what they were after the warm-up.
fn soak(soak: &Soak, total: u64) {
    soak.send(WARM_UP);
    let (rss, hyperties) = (resident_bytes(), soak.hyperties());
    let mut sent = 0;
    while sent < total {
        let run = (total - sent).min(RUN);
        soak.send(run);
        sent += run;
    }
    let all = WARM_UP + total;
    assert_eq!(soak.ledger(), Ledger { received: all, anomalies: 0, identified: all }, "every message arrives once, in order, with its sender's identity");
    assert_eq!(soak.pending_requests(), 0, "no request is left pending");
    assert_eq!(soak.hyperties(), hyperties, "no instance is left over or lost");
    let grown = resident_bytes().saturating_sub(rss);
    eprintln!("soak: {total} messages, resident memory grew by {:.1} MiB", grown as f64 / (1 << 20) as f64);
    assert!(grown <= RSS_GROWTH_BOUND, "resident memory grew by {grown} bytes over {total} messages (bound {RSS_GROWTH_BOUND})");
}

#[test]
fn through_the_bus_nothing_is_lost_nothing_grows() {
    soak(&Soak::in_process(), count("HYPERTY_SOAK_MESSAGES", 1_000_000));
}

#[test]
fn through_nats_nothing_is_lost_nothing_grows() {
    let nats = Nats::start();
    soak(&Soak::through_nats(&[nats.endpoint()]), count("HYPERTY_SOAK_NATS_MESSAGES", 100_000));
}
