//! Bench helpers for many hyperties at once (`benches/scale.rs`,
//! `benches/bus.rs`).

use std::time::Instant;

use hyperty_host::bundle::Bundle;
use hyperty_host::Runtime;
use serde_json::json;

use crate::{TestBundle, guest};

/// A bundle of `domains` domains (`d0.example`, ...) of `per_domain`
/// `pong` hyperties each (`pong0`, ...), each domain allowed 1,000
/// instances and the memory they start with (17 pages each).
pub fn pongs(domains: usize, per_domain: usize) -> TestBundle {
    let mut bundle = TestBundle::new();
    for d in 0..domains {
        let domain = format!("d{d}.example");
        for i in 0..per_domain {
            bundle = bundle.hyperty(&domain, &format!("pong{i}"), &guest("pong"), json!({}));
        }
        bundle = bundle.domain(&domain, json!({ "limits": { "instances": 1000, "total-memory-mb": 2048 } }));
    }
    bundle
}

/// µs per hyperty to deploy `bundle` into `runtime`; its components are
/// compiled (or loaded from the cache) by a check first, outside the
/// measurement.
pub fn deploy_us(runtime: &Runtime, bundle: &Bundle) -> f64 {
    runtime.check(bundle).unwrap();
    let n: usize = bundle.domains.iter().map(|d| d.hyperties.len()).sum();
    let started = Instant::now();
    runtime.deploy(bundle).unwrap();
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
