//! Every parser of the host, fed input nested 100,000 deep, refuses it with
//! a clear error and without overflowing its stack (which would abort the
//! whole process, so a failure here is a crash, not a red line). The test
//! threads have 2 MiB stacks, like the runtime's own threads.

use std::time::Duration;

use hyperty_host::policy::nesting::{MAX_NESTING, MAX_OPERATORS};
use hyperty_host::{Bundle, CedarPolicies, Message, MessageType, SendError};
use hyperty_tests::*;
use serde_json::{Value, json};

const DEEP: usize = 100_000;

/// Runs `f` on a thread with a 2 MiB stack (the default of spawned
/// threads, whatever RUST_MIN_STACK says).
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(2 << 20).spawn(f).unwrap().join().unwrap()
}

#[test]
fn toml_bundles_and_groups_files() {
    let dir = tempfile::tempdir().unwrap();
    let entry = "[[domains.\"a.example\".hyperties]]\nname = \"p\"\ncomponent = \"p.wasm\"\nsha256 = \"00\"\n";
    let cases = [
        ("arrays", format!("{entry}config = {{ x = {}1{} }}\n", "[".repeat(DEEP), "]".repeat(DEEP))),
        ("inline tables", format!("{entry}config = {}1{}\n", "{ a = ".repeat(DEEP), " }".repeat(DEEP))),
        ("dotted keys", format!("{entry}config = {{ {}x = 1 }}\n", "a.".repeat(DEEP))),
    ];
    for (what, text) in cases {
        let path = dir.path().join("bundle.toml");
        std::fs::write(&path, &text).unwrap();
        let err = on_small_stack(move || Bundle::load(&path).unwrap_err());
        // toml gives no position for too many dotted keys.
        assert!(err.problems[0].line.is_none_or(|line| line == 5), "{what}: {err}");
        assert!(err.to_string().contains("recursion"), "{what}: {err}");
    }
    let groups = dir.path().join("groups.toml");
    std::fs::write(&groups, format!("admins = {}\"x\"{}\n", "[".repeat(DEEP), "]".repeat(DEEP))).unwrap();
    let err = on_small_stack(move || CedarPolicies::new().set_groups_file(&groups).unwrap_err());
    assert!(err.to_string().contains("recursion"), "{err}");
}

#[test]
fn cedar_policy_text() {
    let dir = tempfile::tempdir().unwrap();
    let when = |condition: String| format!("@id(\"x\")\npermit (principal, action, resource)\n  when {{ {condition} }};\n");
    let cases = [
        ("parentheses", when(format!("{}true{}", "(".repeat(DEEP), ")".repeat(DEEP))), "brackets nest deeper"),
        ("sets", when(format!("{}1{} == 1", "[".repeat(DEEP), "]".repeat(DEEP))), "brackets nest deeper"),
        ("records", when(format!("{}1{} == 1", "{a: ".repeat(DEEP), "}".repeat(DEEP))), "brackets nest deeper"),
        ("&& chain", when(format!("true{}", " && true".repeat(DEEP))), "operators"),
        ("negations", when(format!("{}true", "!".repeat(DEEP))), "operators"),
        // Without the operator bound, these three overflowed Cedar's stack.
        ("attribute chain", when(format!("context{} == 1", ".a".repeat(DEEP))), "operators"),
        ("+ chain", when(format!("1{} == 1", " + 1".repeat(DEEP))), "operators"),
        ("if chain", when(format!("{}true", "if true then true else ".repeat(DEEP))), "operators"),
    ];
    for (what, text, reason) in cases {
        let file = dir.path().join("deep.cedar");
        std::fs::write(&file, text).unwrap();
        let err = on_small_stack(move || CedarPolicies::new().check_files(&[file]).unwrap_err());
        let p = &err.problems[0];
        assert_eq!(p.line, Some(3), "{what}: {err}");
        assert!(p.message.contains(reason) && p.message.contains("too deep"), "{what}: {err}");
    }
    // At both limits at once, Cedar parses and validates on a small stack.
    let limit = when(format!("{}true{}{}", "(".repeat(MAX_NESTING - 1), " && true".repeat(MAX_OPERATORS), ")".repeat(MAX_NESTING - 1)));
    let file = dir.path().join("limit.cedar");
    std::fs::write(&file, limit).unwrap();
    on_small_stack(move || CedarPolicies::new().check_files(&[file])).expect("a policy at the limits is accepted");
}

#[test]
fn json_values_on_the_bus_data_objects_and_json_patches() {
    let runtime = runtime(Duration::from_secs(5));
    let driver = Driver::new(&runtime);
    // From an endpoint: refused at the bus.
    let deep = format!("{}{}", "[".repeat(DEEP), "]".repeat(DEEP));
    let to = hyperty_host::Address::parse("hyperty://a.example/x").unwrap();
    let message = Message::new(1, MessageType::Update, driver.address().clone(), to, Some(deep));
    match driver.endpoint.send(message) {
        Err(SendError::Malformed(reason)) => assert!(reason.contains("deep"), "{reason}"),
        other => panic!("a 100,000-deep value must be refused malformed: {other:?}"),
    }
    // From a hyperty, which builds the text itself: the bus, the syncher's
    // data and its JSON Patch text refuse it.
    let bundle = TestBundle::new().hyperty("a.example", "deep", &guest("deep-json"), json!({}));
    runtime.deploy(&bundle.load()).unwrap();
    let deep_json = runtime.lookup("a.example", "deep").unwrap();
    let mut driver = driver;
    for (op, refusal) in [("send", "Malformed"), ("create", "Invalid"), ("update", "Invalid")] {
        let answer = driver.ask(&deep_json, json!({ "op": op, "depth": DEEP }));
        let value: Value = serde_json::from_str(answer.body.value.as_deref().unwrap_or("null")).unwrap();
        let refused = value["refused"].as_str().unwrap_or_else(|| panic!("{op}: {value}"));
        assert!(refused.contains(refusal) && (refused.contains("deep") || refused.contains("recursion limit")), "{op}: {refused}");
        // A shallow one of each is accepted: the refusal is the depth.
        let answer = driver.ask(&deep_json, json!({ "op": op, "depth": 3 }));
        assert_eq!(answer.body.value.as_deref(), Some(r#"{"accepted":true}"#), "{op}");
    }
}

#[test]
fn envelopes_through_a_protostub() {
    let nats = Nats::start();
    let runtime = runtime(Duration::from_secs(10));
    let observer = runtime.endpoint(OBSERVER, 64).unwrap();
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .protostub("alice.example", &[nats.endpoint()], json!({}));
    runtime.deploy(&bundle.load()).unwrap();
    let a = runtime.lookup("alice.example", "a").unwrap();
    let subject = nats_subject("alice.example", a.as_str(), "alice.example");
    let mut seq = 0;
    // A well-formed envelope from a remote peer of alice.example reaches a
    // (which reports it to the observer), once the stub listens.
    let delivered = |seq: &mut u64| {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            *seq += 1;
            let envelope = json!({ "v": 1, "origin": "parsers", "seq": *seq, "id": 1000 + *seq, "type": "read",
                "from": "hyperty://alice.example/remote-peer", "to": a.as_str(), "body": {} });
            nats_publish(nats.port, &subject, &envelope.to_string());
            // Reports of earlier attempts may come late; the deep one never.
            while let Some(report) = observer.recv_timeout(Duration::from_millis(500)) {
                let id = reported(&report)["id"].as_u64();
                assert_ne!(id, Some(1), "the 100,000-deep value reached a: {report:?}");
                if id == Some(1000 + *seq) {
                    return;
                }
            }
            assert!(std::time::Instant::now() < until, "no envelope got through the stub");
        }
    };
    delivered(&mut seq);
    // The whole envelope, and the value it carries, 100,000 deep.
    let deep = format!("{}{}", "[".repeat(DEEP), "]".repeat(DEEP));
    nats_publish(nats.port, &subject, &deep);
    let envelope = json!({ "v": 1, "origin": "parsers", "seq": seq + 1, "id": 1, "type": "update",
        "from": "hyperty://alice.example/remote-peer", "to": a.as_str(), "body": { "value": deep } });
    seq += 1;
    nats_publish(nats.port, &subject, &envelope.to_string());
    // Neither reaches a (the stub delivers in order, so it would have come
    // before the next one); the stub and the runtime go on.
    delivered(&mut seq);
}

/// A JWT signed (EdDSA) by `seed` whose header and claims are the given
/// JSON texts.
fn signed_jwt(seed: [u8; 32], header: &str, claims: &str) -> String {
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let signed = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let signature = ed25519_dalek::SigningKey::from_bytes(&seed).sign(signed.as_bytes());
    format!("{signed}.{}", b64(&signature.to_bytes()))
}

#[test]
fn jwt_headers_and_claims_through_the_idp_proxy() {
    const IDP: &str = "idp.example";
    const KEY: [u8; 32] = [7; 32];
    let runtime = runtime(Duration::from_secs(10));
    let bundle = TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), puppet_config(true)).idp(IDP, KEY, &["bob.example"]);
    runtime.deploy(&bundle.load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    let mallory = runtime.endpoint("hyperty://mallory.example/m", 16).unwrap();
    let ask = |id: u64, token: String| {
        let mut m = Message::new(id, MessageType::Read, mallory.address().clone(), b.clone(), None);
        m.assertion = Some(hyperty_host::message::Assertion { idp: IDP.into(), token: token.into() });
        mallory.request(m, None).unwrap();
        let answer = mallory.recv_timeout(Duration::from_secs(10)).expect("an answer");
        assert_eq!(answer.id, id, "{answer:?}");
        answer
    };
    let deep = format!("{}{}", "[".repeat(DEEP), "]".repeat(DEEP));
    let header = r#"{"alg":"EdDSA","typ":"JWT"}"#;
    let claims = json!({ "iss": IDP, "sub": "carol@idp.example", "exp": unix_now() + 300 }).to_string();
    let deep_claims = format!("{}, \"x\": {deep}}}", claims.trim_end_matches('}'));
    let deep_header = format!("{}, \"x\": {deep}}}", header.trim_end_matches('}'));
    for (id, token) in [(1, signed_jwt(KEY, header, &deep_claims)), (2, signed_jwt(KEY, &deep_header, &claims))] {
        let answer = ask(id, token);
        // Why (malformed) is the IdP proxy's to say; that it is refused and
        // nothing overflows is the point here.
        assert_eq!(answer.body.code, Some(401), "{answer:?}");
    }
    // The proxy and the runtime go on: the same claims, shallow, pass.
    let answer = ask(3, signed_jwt(KEY, header, &claims));
    assert_eq!(answer.body.code, Some(200), "{answer:?}");
}
