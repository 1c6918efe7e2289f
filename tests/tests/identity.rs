//! Identity: assertions attached by the host on messages leaving a domain
//! (never on local traffic), validated by the issuing IdP's proxy on
//! arrival (401 for missing, expired, tampered, foreign-key, unknown-IdP
//! ones), guests unable to claim an identity, and policies reading the
//! validated identity.

use std::time::Duration;

use hyperty_host::message::Assertion;
use hyperty_host::{Address, Endpoint, Message, MessageType, Runtime};
use hyperty_tests::*;
use serde_json::{Value, json};

const IDP: &str = "idp.example";
const IDP_KEY: [u8; 32] = [7; 32];
const FOREIGN_KEY: [u8; 32] = [9; 32];

struct World {
    runtime: Runtime,
    driver: Driver,
    a: Address,
    b: Address,
    _bundle: TestBundle,
}

/// alice.example/a (alice@idp.example; the observer drives it, so the
/// domain accepts anonymous messages) and bob.example/b (echoing,
/// bob@idp.example; requires identity, the default with an IdP), both
/// asserted by idp.example; plus carol.example/c, anonymous, echoing.
fn world(bob_policies: Option<&str>) -> World {
    let runtime = runtime(Duration::from_secs(30));
    let driver = Driver::new(&runtime);
    let mut bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .hyperty("alice.example", "a2", &guest("puppet"), puppet_config(true))
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(true))
        .hyperty("carol.example", "c", &guest("puppet"), puppet_config(true))
        .user("alice.example", "a", "alice@idp.example")
        .user("alice.example", "a2", "alice2@idp.example")
        .user("bob.example", "b", "bob@idp.example")
        .idp(IDP, IDP_KEY, &["alice.example", "bob.example"])
        .domain("alice.example", json!({ "require-identity": false }));
    if let Some(policies) = bob_policies {
        let file = bundle.dir().join("bob.cedar");
        std::fs::write(&file, policies).unwrap();
        bundle = bundle.domain("bob.example", json!({ "policies": [file.to_str().unwrap()] }));
    }
    runtime.deploy(&bundle.load()).expect("the identity world deploys");
    let a = runtime.lookup("alice.example", "a").unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    World { runtime, driver, a, b, _bundle: bundle }
}

impl World {
    /// a sends a notification to `to`.
    fn a_sends(&mut self, to: &Address) {
        let cmd = json!({ "op": "send", "message": { "type": "update", "to": to.to_string(), "value": "{}" } });
        assert_eq!(self.driver.command(&self.a.clone(), cmd), json!({ "ok": true }));
    }
}

/// A request from `endpoint` to `to` carrying `assertion`; its answer.
fn request_with(endpoint: &Endpoint, id: u64, to: &Address, assertion: Option<Assertion>) -> Message {
    let mut m = Message::new(id, MessageType::Read, endpoint.address().clone(), to.clone(), None);
    m.assertion = assertion;
    endpoint.request(m, None).unwrap();
    let answer = endpoint.recv_timeout(Duration::from_secs(10)).expect("an answer");
    assert_eq!((answer.kind, answer.id), (MessageType::Response, id), "{answer:?}");
    answer
}

fn assertion(token: String) -> Option<Assertion> {
    Some(Assertion { idp: IDP.into(), token: token.into() })
}

#[test]
fn assertion_attached_on_egress_and_not_on_local_traffic() {
    let mut w = world(None);
    // An endpoint inside alice.example and one in another domain.
    let local = w.runtime.endpoint("hyperty://alice.example/tap", 16).unwrap();
    let remote = w.runtime.endpoint("hyperty://dave.example/tap", 16).unwrap();

    w.a_sends(local.address());
    let m = local.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(m.assertion, None, "no assertion inside the domain");
    assert_eq!(m.identity.as_ref().map(|i| i.user.as_str()), Some("alice@idp.example"), "the bound user, from the bundle");

    // Even what an embedder's endpoint in the domain attaches is dropped.
    let inside = w.runtime.endpoint("hyperty://alice.example/inside", 16).unwrap();
    let mut m = Message::new(1, MessageType::Update, inside.address().clone(), local.address().clone(), None);
    m.assertion = assertion(jwt(IDP_KEY, IDP, "carol@idp.example", unix_now() + 300));
    inside.send(m).unwrap();
    let m = local.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!((m.id, &m.assertion, &m.identity), (1, &None, &None));

    w.a_sends(remote.address());
    let m = remote.recv_timeout(Duration::from_secs(10)).unwrap();
    let a = m.assertion.as_ref().expect("an assertion on the way out of alice.example");
    assert_eq!(a.idp, IDP);
    assert_eq!(a.token.split('.').count(), 3, "a compact JWT: {}", a.token);
    let identity = m.identity.as_ref().unwrap();
    assert_eq!((identity.user.as_str(), identity.idp.as_str()), ("alice@idp.example", IDP), "validated on arrival");
    // The next message carries the assertion issued for the first and the
    // identity validated for it, from the caches: counts, not copies.
    w.a_sends(remote.address());
    let again = remote.recv_timeout(Duration::from_secs(10)).unwrap();
    let buffers = |m: &Message| (m.assertion.as_ref().unwrap().token.as_ptr(), m.identity.as_ref().unwrap().user.as_ptr());
    assert_eq!(buffers(&again), buffers(&m), "one token and one user buffer for both messages");

    // Hyperty to hyperty: b (bob.example) sees alice, validated; a sees
    // bob on the response; a2 (same domain) sees alice without assertion.
    let a = w.a.clone();
    for (to, who) in [(w.b.clone(), "bob@idp.example"), (w.runtime.lookup("alice.example", "a2").unwrap(), "alice2@idp.example")] {
        let id = w.driver.fresh_id();
        let cmd = json!({ "op": "request", "message": { "id": id, "type": "read", "to": to.to_string() } });
        assert_eq!(w.driver.command(&a, cmd), json!({ "ok": true }));
        let got = w.driver.report(&to, |m| m["id"] == id);
        assert_eq!(got["identity"], json!(["alice@idp.example", IDP]), "{got}");
        let answer = w.driver.report(&a, |m| m["type"] == "response" && m["id"] == id);
        assert_eq!(answer["code"], 200, "{answer}");
        assert_eq!(answer["identity"], json!([who, IDP]), "{answer}");
    }
    // The IdP proxy is registered.
    let idps = w.runtime.discover(&hyperty_host::Query { domain: Some(IDP.into()), ..Default::default() });
    assert_eq!(idps.len(), 1);
    assert_eq!((idps[0].kind, idps[0].address.as_str()), (hyperty_host::registry::Kind::IdpProxy, "domain://idp.idp.example"));
    // Anonymous domains send no assertion: c's answer to the endpoint.
    let c = w.runtime.lookup("carol.example", "c").unwrap();
    let answer = request_with(&remote, 1, &c, None);
    assert_eq!((answer.body.code, &answer.assertion, &answer.identity), (Some(200), &None, &None), "{answer:?}");
}

#[test]
fn validation_accepts_the_good_token_and_answers_401_to_bad_ones() {
    let mut w = world(None);
    let mallory = w.runtime.endpoint("hyperty://mallory.example/m", 16).unwrap();
    let b = w.b.clone();
    let in_5_min = unix_now() + 300;

    let good = jwt(IDP_KEY, IDP, "carol@idp.example", in_5_min);
    let mut tampered_claims = good.split('.').map(str::to_owned).collect::<Vec<_>>();
    let other = jwt(IDP_KEY, IDP, "admin@idp.example", in_5_min);
    tampered_claims[1] = other.split('.').nth(1).unwrap().to_owned();
    let tampered = tampered_claims.join(".");
    let mut flipped = good.clone().into_bytes();
    let last = flipped.len() - 3;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();

    let cases: [(&str, Option<Assertion>, &str); 8] = [
        ("missing", None, "requires an identity assertion"),
        ("expired", assertion(jwt(IDP_KEY, IDP, "carol@idp.example", unix_now() - 10)), "expired"),
        ("tampered claims", assertion(tampered), "signature"),
        ("tampered signature", assertion(flipped), "signature not made by a key of idp.example"),
        ("foreign key", assertion(jwt(FOREIGN_KEY, IDP, "carol@idp.example", in_5_min)), "signature not made by a key of idp.example"),
        ("another IdP's user", assertion(jwt(IDP_KEY, IDP, "eve@evil.example", in_5_min)), "not a user of idp.example"),
        ("unknown IdP", Some(Assertion { idp: "evil.example".into(), token: good.as_str().into() }), "no proxy for this IdP"),
        ("garbage", assertion("not.a.jwt".into()), "malformed"),
    ];
    for (i, (case, assertion, why)) in cases.into_iter().enumerate() {
        let answer = request_with(&mallory, 100 + i as u64, &b, assertion);
        let description = answer.body.description.clone().unwrap_or_default();
        assert_eq!(answer.body.code, Some(401), "{case}: {answer:?}");
        assert!(description.contains(why), "{case}: {description}");
    }
    // None of those reached b; the good token does, as carol.
    let answer = request_with(&mallory, 200, &b, assertion(good.clone()));
    assert_eq!(answer.body.code, Some(200), "{answer:?}");
    let first = w.driver.report(&b, |_| true);
    assert_eq!((first["id"].as_u64(), &first["identity"]), (Some(200), &json!(["carol@idp.example", IDP])), "{first}");
    // Validated once, then from the cache: still 200, still carol.
    let answer = request_with(&mallory, 201, &b, assertion(good));
    assert_eq!(answer.body.code, Some(200));
    assert_eq!(w.runtime.pending_requests(), 0);
    w.driver.still_works(&w.a.clone(), &b);
}

#[test]
fn an_idp_proxy_sleeping_in_a_host_call_is_stopped_at_its_call_deadline() {
    // Its timers end at the call deadline (`sandbox::timers`), as a
    // hyperty's: the thread that has an assertion validated (here the
    // embedder's; as often a domain's) is held no longer than by a loop.
    let runtime = runtime(Duration::from_secs(30));
    let bundle = TestBundle::new()
        .hyperty("victim.example", "v", &guest("puppet"), puppet_config(true))
        .idp_guest("idp.hostile", "idp-hostile", json!({ "mode": "sleep" }), &["victim.example"]);
    runtime.deploy(&bundle.load()).expect("the hostile IdP deploys");
    let mallory = runtime.endpoint("hyperty://mallory.example/m", 16).unwrap();
    let v = runtime.lookup("victim.example", "v").unwrap();
    for id in [1, 2] {
        let answer = request_with(&mallory, id, &v, Some(Assertion { idp: "idp.hostile".into(), token: "any".into() }));
        let description = answer.body.description.clone().unwrap_or_default();
        assert_eq!(answer.body.code, Some(401), "{answer:?}");
        assert!(description.contains("the IdP proxy of idp.hostile trapped"), "{description}");
    }
}

#[test]
fn a_hyperty_cannot_set_or_forge_its_identity() {
    let mut w = world(None);
    let mut events = w.runtime.events();
    let c = w.runtime.lookup("carol.example", "c").unwrap();
    // A guest claiming an identity is refused at the import.
    let cmd = json!({ "op": "send", "message": { "type": "update", "to": c.to_string(), "value": "{}",
        "identity": ["root@idp.example", IDP] } });
    let answer = w.driver.command(&w.a.clone(), cmd);
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("spoofed-identity:") && error.contains("only the host sets"), "{answer}");
    wait_event(&mut events, |e| matches!(&e.kind, hyperty_host::EventKind::Refused { reason } if reason.contains("spoofed identity")));
    // Nor can an endpoint: whatever identity it writes is replaced by what
    // the bus establishes (here: none, it is anonymous).
    let mallory = w.runtime.endpoint("hyperty://mallory.example/m", 16).unwrap();
    let mut m = Message::new(5, MessageType::Read, mallory.address().clone(), c.clone(), None);
    m.identity = Some(hyperty_host::message::Identity { user: "root@idp.example".into(), idp: IDP.into() });
    mallory.request(m, None).unwrap();
    let got = w.driver.report(&c, |m| m["id"] == 5);
    assert_eq!(got["identity"], Value::Null, "{got}");
    // And a's own messages still carry alice, not root.
    w.a_sends(&c);
    let got = w.driver.report(&c, |m| m["type"] == "update" && m["from"] == w.a.to_string());
    assert_eq!(got["identity"], json!(["alice@idp.example", IDP]), "{got}");
}

#[test]
fn policies_read_the_validated_identity() {
    let policies = r#"
        @id("carol-only") permit (principal, action, resource)
        when { context.point == "incoming" && context.sender_user == Rethink::User::"carol@idp.example" && context.sender_idp == "idp.example" };
        @id("out") permit (principal, action, resource) when { context.point == "outgoing" };
        @id("deploy") permit (principal, action == Rethink::Action::"deploy", resource);"#;
    let w = world(Some(policies));
    let mallory = w.runtime.endpoint("hyperty://mallory.example/m", 16).unwrap();
    let carol = assertion(jwt(IDP_KEY, IDP, "carol@idp.example", unix_now() + 300));
    let dave = assertion(jwt(IDP_KEY, IDP, "dave@idp.example", unix_now() + 300));
    assert_eq!(request_with(&mallory, 1, &w.b, carol.clone()).body.code, Some(200));
    let denied = request_with(&mallory, 2, &w.b, dave);
    assert_eq!(denied.body.code, Some(403), "{denied:?}");
    assert!(denied.body.description.as_deref().unwrap_or("").contains("incoming"), "{denied:?}");
    // The same address with carol's token again: the decision cache keys on
    // the identity, so dave's denial is not reused.
    assert_eq!(request_with(&mallory, 3, &w.b, carol).body.code, Some(200));
}

#[test]
fn bad_idp_configuration_is_refused_and_nothing_running_is_lost() {
    let mut w = world(None);
    let broken = TestBundle::new()
        .hyperty("erin.example", "e", &guest("puppet"), puppet_config(true))
        .idp("idp2.example", IDP_KEY, &["erin.example"]);
    let path = broken.write();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text = text.replace("signing-key", "signing-kee");
    std::fs::write(&path, &text).unwrap();
    let err = w.runtime.deploy(&hyperty_host::Bundle::load(&path).unwrap()).unwrap_err().to_string();
    assert!(err.contains(r#"idps."idp2.example".component"#) && err.contains("init refused its configuration") && err.contains("signing-kee"), "{err}");
    assert!(w.runtime.lookup("erin.example", "e").is_none());
    // A domain naming an IdP no bundle provides.
    let orphan = TestBundle::new()
        .hyperty("erin.example", "e", &guest("puppet"), puppet_config(true))
        .domain("erin.example", json!({ "idp": "nowhere.example" }));
    let err = w.runtime.deploy(&orphan.load()).unwrap_err().to_string();
    assert!(err.contains(r#"domains."erin.example".idp"#) && err.contains("no IdP proxy for nowhere.example"), "{err}");
    // The same IdP twice.
    let again = TestBundle::new()
        .hyperty("erin.example", "e", &guest("puppet"), puppet_config(true))
        .idp(IDP, IDP_KEY, &["erin.example"]);
    let err = w.runtime.deploy(&again.load()).unwrap_err().to_string();
    assert!(err.contains("the IdP proxy of idp.example already runs"), "{err}");
    // What ran before still runs, identities and all.
    w.driver.still_works(&w.a.clone(), &w.b.clone());
}

#[test]
fn an_anonymous_response_into_a_domain_requiring_identity_is_refused_to_the_requester() {
    let w = world(None);
    let c = w.runtime.lookup("carol.example", "c").unwrap();
    // The observer commands b (bob.example requires identity) with carol's
    // token: b requests c, which is anonymous and answers without assertion.
    let id = 77;
    let command = json!({ "op": "request", "message": { "id": id, "type": "read", "to": c.to_string() } });
    let mut m = Message::new(1, MessageType::Execute, w.driver.address().clone(), w.b.clone(), Some(command.to_string()));
    m.assertion = assertion(jwt(IDP_KEY, IDP, "carol@idp.example", unix_now() + 300));
    w.driver.endpoint.request(m, None).unwrap();
    let ok = w.driver.expect(|m| m.kind == MessageType::Response && m.id == 1);
    assert_eq!(ok.body.code, Some(200), "{ok:?}");
    // c did get the request (b's identity with it) and answered; b gets a
    // prompt 401 in place of the anonymous answer, not a 408.
    let got = w.driver.report(&c, |m| m["id"] == id);
    assert_eq!(got["identity"], json!(["bob@idp.example", IDP]), "{got}");
    let answer = w.driver.report(&w.b, |m| m["type"] == "response" && m["id"] == id);
    assert_eq!(answer["code"], 401, "{answer}");
    let why = answer["description"].as_str().unwrap_or_default();
    assert!(why.contains("the response was refused") && why.contains("bob.example requires an identity assertion"), "{answer}");
    assert_eq!(w.runtime.pending_requests(), 0);
}

/// A token of `IDP` signed by its key, with the JSON texts `header` and
/// `claims` as given.
fn signed(header: &str, claims: &str) -> Option<Assertion> {
    assertion(jws(IDP_KEY, header, claims))
}

const HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;

#[test]
fn every_registered_claim_and_header_parameter_that_limits_validity_is_enforced() {
    let w = world(None);
    let mallory = w.runtime.endpoint("hyperty://mallory.example/m", 16).unwrap();
    let now = unix_now();
    let exp = now + 300;
    let claims = |extra: serde_json::Value| {
        let mut c = json!({ "iss": IDP, "sub": "carol@idp.example", "exp": exp });
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c.to_string()
    };
    // Each correctly signed by the IdP's own key.
    let cases: Vec<(&str, Option<Assertion>, &str)> = vec![
        ("nbf in 50 minutes", signed(HEADER, &claims(json!({ "nbf": now + 3000 }))), "not valid before (nbf)"),
        ("issued in the future", signed(HEADER, &claims(json!({ "iat": now + 3000 }))), "issued (iat) 3000 s in the future"),
        ("an audience this IdP has not", signed(HEADER, &claims(json!({ "aud": "elsewhere.example" }))), "audience (aud)"),
        ("a critical extension", signed(r#"{"alg":"EdDSA","crit":["exp-ext"],"exp-ext":1}"#, &claims(json!({}))), "critical header parameters (crit) not understood: exp-ext"),
        ("another type", signed(r#"{"alg":"EdDSA","typ":"at+jwt"}"#, &claims(json!({}))), r#"type (typ) "at+jwt" refused"#),
        ("a nested token", signed(r#"{"alg":"EdDSA","cty":"JWT"}"#, &claims(json!({}))), "content type (cty)"),
        ("another algorithm", signed(r#"{"alg":"none"}"#, &claims(json!({}))), r#"algorithm (alg) "none" refused"#),
        // Malformed, under a valid signature: the reason names what.
        ("claims that are not an object", signed(HEADER, "[1,2,3]"), "the claims is not a JSON object"),
        ("claims that are not JSON", signed(HEADER, "carol"), "the claims is not a JSON object"),
        ("exp as a string", signed(HEADER, &json!({ "iss": IDP, "sub": "carol@idp.example", "exp": exp.to_string() }).to_string()), "exp is"),
        ("nbf as a string", signed(HEADER, &claims(json!({ "nbf": "0" }))), "nbf is \"0\", not a NumericDate"),
        ("sub twice", signed(HEADER, &format!(r#"{{"iss":"{IDP}","sub":"carol@idp.example","sub":"admin@idp.example","exp":{exp}}}"#)), "duplicate member \"sub\""),
        ("alg twice", signed(r#"{"alg":"EdDSA","alg":"none"}"#, &claims(json!({}))), "duplicate member \"alg\""),
        ("aud a number", signed(HEADER, &claims(json!({ "aud": 7 }))), "aud is 7, not a string or a list of strings"),
        ("a header that is not an object", signed("\"EdDSA\"", &claims(json!({}))), "the header is not a JSON object"),
    ];
    for (i, (case, assertion, why)) in cases.into_iter().enumerate() {
        let answer = request_with(&mallory, 300 + i as u64, &w.b, assertion);
        let description = answer.body.description.clone().unwrap_or_default();
        assert_eq!(answer.body.code, Some(401), "{case}: {answer:?}");
        assert!(description.contains(why), "{case}: {description}");
        assert!(!description.contains("signature not made by"), "{case}: {description}");
    }
    // The limits are limits, not refusals: a token past its nbf, issued a
    // second ago, with a fractional exp, is good.
    let good = signed(HEADER, &claims(json!({ "nbf": now - 60, "iat": now - 1, "exp": exp as f64 + 0.5, "jti": "x" })));
    let answer = request_with(&mallory, 400, &w.b, good);
    assert_eq!(answer.body.code, Some(200), "{answer:?}");
    // A signature check still comes after the form: a well-formed token
    // signed by another key is refused for its signature.
    let foreign = assertion(jws(FOREIGN_KEY, HEADER, &claims(json!({ "nbf": now - 60 }))));
    let answer = request_with(&mallory, 401, &w.b, foreign);
    assert!(answer.body.description.unwrap_or_default().contains("signature not made by a key of idp.example"));
}

#[test]
fn an_idp_configured_with_leeway_and_audience_applies_both_to_what_it_validates_and_issues() {
    let runtime = runtime(Duration::from_secs(30));
    let bundle = TestBundle::new()
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(true))
        .user("bob.example", "b", "bob@idp.example")
        .idp(IDP, IDP_KEY, &["bob.example"]);
    let path = bundle.write();
    let mut manifest: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let config = manifest["idps"][IDP]["config"].as_table_mut().unwrap();
    config.insert("leeway-seconds".into(), 60.into());
    config.insert("audience".into(), "bob.example".into());
    std::fs::write(&path, toml::to_string(&manifest).unwrap()).unwrap();
    runtime.deploy(&hyperty_host::Bundle::load(&path).unwrap()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    let mallory = runtime.endpoint("hyperty://mallory.example/m", 16).unwrap();
    let now = unix_now();
    let token = |extra: Value| {
        let mut c = json!({ "iss": IDP, "sub": "carol@idp.example", "exp": now + 300, "aud": "bob.example" });
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        signed(HEADER, &c.to_string())
    };
    let cases: [(&str, Option<Assertion>, Result<(), &str>); 7] = [
        ("nbf within the leeway", token(json!({ "nbf": now + 30 })), Ok(())),
        ("nbf beyond it", token(json!({ "nbf": now + 3000 })), Err("not valid before (nbf)")),
        ("expired within the leeway", token(json!({ "exp": now - 30 })), Ok(())),
        ("expired beyond it", token(json!({ "exp": now - 90 })), Err("expired")),
        ("the audience among others", token(json!({ "aud": ["x.example", "bob.example"] })), Ok(())),
        ("another audience", token(json!({ "aud": "x.example" })), Err("not bob.example")),
        ("no audience", signed(HEADER, &json!({ "iss": IDP, "sub": "carol@idp.example", "exp": now + 300 }).to_string()), Err("no audience (aud)")),
    ];
    for (i, (case, assertion, expected)) in cases.into_iter().enumerate() {
        let answer = request_with(&mallory, 10 + i as u64, &b, assertion);
        let description = answer.body.description.clone().unwrap_or_default();
        match expected {
            Ok(()) => assert_eq!(answer.body.code, Some(200), "{case}: {answer:?}"),
            Err(why) => assert!(answer.body.code == Some(401) && description.contains(why), "{case}: {answer:?}"),
        }
    }
    // What it issues names the audience: b's answers carry bob's assertion.
    let answer = request_with(&mallory, 99, &b, token(json!({})));
    let issued = answer.assertion.expect("b's answer leaves bob.example with an assertion").token;
    use base64::Engine as _;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(issued.split('.').nth(1).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&claims).unwrap();
    assert_eq!((&claims["sub"], &claims["aud"]), (&json!("bob@idp.example"), &json!("bob.example")), "{claims}");
}
