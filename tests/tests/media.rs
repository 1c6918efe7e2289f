//! WebRTC for hyperties (issue 15): `media-peer` hyperties open peer
//! connections the host keeps (str0m, host-owned UDP sockets on
//! 127.0.0.1), signal over the bus, and exchange data-channel messages;
//! every bad input is refused with its typed error, and what a connection
//! holds (its socket, the domain's count) is freed when it closes, when
//! the peer vanishes and when its hyperty traps.

use std::time::Duration;

use hyperty_host::{Address, Runtime};
use hyperty_tests::media::*;
use hyperty_tests::*;
use serde_json::{Value, json};

/// A runtime with media-peers alice.example/a and bob.example/b (b echoes),
/// each domain granted media with `media` settings `extra`.
fn pair(extra: Value) -> (Runtime, Driver, TestBundle, Address, Address) {
    let runtime = runtime(Duration::from_secs(5));
    let driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
        .domain("alice.example", media_domain(4, extra.clone()))
        .hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(true))
        .domain("bob.example", media_domain(4, extra));
    runtime.deploy(&bundle.load()).expect("the media pair deploys");
    let a = runtime.lookup("alice.example", "a").unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    (runtime, driver, bundle, a, b)
}

fn error_of(v: &Value) -> String {
    v["error"].as_str().unwrap_or_else(|| panic!("expected an error, got {v}")).to_owned()
}

#[test]
fn two_hyperties_of_two_domains_open_a_data_channel_and_talk_both_ways() {
    let (_runtime, mut driver, _bundle, a, b) = pair(json!({}));
    let call = driver.media_call(&a, &b, "chat");
    let (pc_a, ch_a) = call.caller;
    let (pc_b, ch_b) = call.callee;
    // Both sides were told they are connected, before the channel opened.
    driver.media_report(&a, 10, |v| v["event"] == "connected" && v["pc"] == pc_a);
    driver.media_report(&b, 10, |v| v["event"] == "connected" && v["pc"] == pc_b);

    // a → b, and b's echo back to a.
    let sent = driver.command(&a, json!({ "op": "send", "pc": pc_a, "channel": ch_a, "text": "hello bob" }));
    assert_eq!(sent, json!({ "ok": true }));
    let at_b = driver.media_report(&b, 10, |v| v["event"] == "channel-data");
    assert_eq!((at_b["text"].as_str(), at_b["channel"].as_u64()), (Some("hello bob"), Some(ch_b)), "{at_b}");
    let at_a = driver.media_report(&a, 10, |v| v["event"] == "channel-data");
    assert_eq!(at_a["text"], "echo:hello bob", "{at_a}");

    // b → a on its own, binary this time, in order.
    for n in [3, 300, 3000] {
        let sent = driver.command(&b, json!({ "op": "send", "pc": pc_b, "channel": ch_b, "bytes": n }));
        assert_eq!(sent, json!({ "ok": true }));
    }
    for n in [3usize, 300, 3000] {
        let got = driver.media_report(&a, 10, |v| v["event"] == "channel-data" && v["bytes"].is_string());
        let bytes = base64_len(got["bytes"].as_str().unwrap());
        assert_eq!(bytes, n, "{got}");
    }

    // A second channel, opened in-band once connected, by the callee.
    let opened = driver.command(&b, json!({ "op": "channel", "pc": pc_b, "label": "files", "ordered": false }));
    let files_b = opened["channel"].as_u64().unwrap_or_else(|| panic!("{opened}"));
    driver.media_report(&b, 10, |v| v["event"] == "channel-open" && v["channel"] == files_b);
    let files_a = driver.media_report(&a, 10, |v| v["event"] == "channel-open" && v["label"] == "files")["channel"].as_u64().unwrap();
    assert_ne!(files_a, ch_a);
    driver.command(&a, json!({ "op": "send", "pc": pc_a, "channel": files_a, "text": "on files" }));
    let got = driver.media_report(&b, 10, |v| v["event"] == "channel-data" && v["channel"] == files_b);
    assert_eq!(got["text"], "on files");
}

fn base64_len(text: &str) -> usize {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).unwrap().len()
}

/// An offer made by b's connection `pc` with one channel.
fn offer_from(driver: &mut Driver, b: &Address) -> String {
    let pc = driver.command(b, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    driver.command(b, json!({ "op": "channel", "pc": pc, "label": "x" }));
    driver.command(b, json!({ "op": "offer", "pc": pc }))["sdp"].as_str().unwrap().to_owned()
}

#[test]
fn malformed_sdp_and_sdp_without_a_usable_transport_are_refused_and_the_connection_goes_on() {
    let (_runtime, mut driver, _bundle, a, b) = pair(json!({}));
    let pc = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let offer = offer_from(&mut driver, &b);
    let without = |prefix: &str| offer.split_inclusive("\r\n").filter(|l| !l.starts_with(prefix)).collect::<String>();
    let audio_only = offer.replace("m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "m=audio 9 UDP/TLS/RTP/SAVPF 111");
    let cases = [
        ("not SDP at all".to_owned(), "malformed-sdp"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n".to_owned(), "malformed-sdp"),
        ("v=0\r\n".to_owned() + &"a=x\r\n".repeat(20_000), "malformed-sdp: 100005 bytes, the limit is 65536"),
        (offer.replacen("v=0", "v=x", 1), "malformed-sdp"),
        (without("a=fingerprint:"), "no usable transport: no DTLS fingerprint"),
        (without("a=ice-ufrag:"), "no usable transport: no ICE credentials"),
        (audio_only, "no usable transport: no data channel section"),
    ];
    for (sdp, why) in cases {
        let answer = driver.command(&a, json!({ "op": "accept-offer", "pc": pc, "sdp": sdp }));
        let e = error_of(&answer);
        assert!(e.contains(why), "expected {why:?}, got {e:?}");
    }
    let e = error_of(&driver.command(&a, json!({ "op": "accept-answer", "pc": pc, "sdp": offer })));
    assert!(e.starts_with("invalid: no offer is waiting"), "{e}");
    // The same connection still accepts a good offer.
    let answer = driver.command(&a, json!({ "op": "accept-offer", "pc": pc, "sdp": offer }));
    assert!(answer["sdp"].as_str().is_some_and(|s| s.contains("a=fingerprint:")), "{answer}");
}

#[test]
fn a_candidate_outside_the_grant_is_refused_and_its_packets_never_reach_the_stack() {
    let (_runtime, mut driver, _bundle, a, _b) = pair(json!({}));
    let pc = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let outside = "candidate:1 1 udp 2113929471 10.1.2.3 5000 typ host";
    let e = error_of(&driver.command(&a, json!({ "op": "candidate", "pc": pc, "candidate": outside })));
    assert_eq!(e, "not-granted: 10.1.2.3 is outside the domain's media peers");
    let e = error_of(&driver.command(&a, json!({ "op": "candidate", "pc": pc, "candidate": "candidate:what" })));
    assert!(e.starts_with("invalid: not an ICE candidate"), "{e}");
    let inside = "a=candidate:1 1 udp 2113929471 127.0.0.1 5000 typ host";
    assert_eq!(driver.command(&a, json!({ "op": "candidate", "pc": pc, "candidate": inside })), json!({ "ok": true }));
    // Its own candidate is on the granted address, in the granted range.
    let ours = driver.command(&a, json!({ "op": "candidates", "pc": pc }));
    let ours = ours["candidates"][0].as_str().unwrap().to_owned();
    assert!(ours.contains(" 127.0.0.1 ") && ours.contains(" typ host"), "{ours}");
}

#[test]
fn a_channel_message_over_the_limit_is_refused_and_one_at_the_limit_arrives() {
    let (_runtime, mut driver, _bundle, a, b) = pair(json!({ "message-bytes": 1024 }));
    let call = driver.media_call(&a, &b, "chat");
    let (pc, ch) = call.caller;
    let e = error_of(&driver.command(&a, json!({ "op": "send", "pc": pc, "channel": ch, "pad": 1025 })));
    assert_eq!(e, "limit-reached: message-bytes: 1025 bytes, the limit is 1024");
    let e = error_of(&driver.command(&a, json!({ "op": "send", "pc": pc, "channel": 99, "text": "x" })));
    assert_eq!(e, "no-such-channel: 99");
    assert_eq!(driver.command(&a, json!({ "op": "send", "pc": pc, "channel": ch, "pad": 1024 })), json!({ "ok": true }));
    let got = driver.media_report(&b, 10, |v| v["event"] == "channel-data");
    assert_eq!(got["text"].as_str().map(str::len), Some(1024));
}

#[test]
fn a_domain_without_the_media_grant_cannot_deploy_a_media_hyperty_and_the_table_goes_with_the_grant() {
    let runtime = runtime(Duration::from_secs(5));
    let bundle = TestBundle::new().hyperty("carol.example", "c", &guest("media-peer"), media_peer_config(false));
    let e = runtime.deploy(&bundle.load()).unwrap_err().to_string();
    assert!(e.contains("imports rethink:hyperty/media@0.1.0, but the domain is not granted `media`"), "{e}");
    assert!(runtime.lookup("carol.example", "c").is_none());

    let granted_no_table = TestBundle::new()
        .hyperty("carol.example", "c", &guest("media-peer"), media_peer_config(false))
        .domain("carol.example", json!({ "grants": ["clocks", "random", "media"] }));
    let e = hyperty_host::Bundle::load(granted_no_table.write()).unwrap_err().to_string();
    assert!(e.contains("media: the domain is granted `media` but has no `media` table"), "{e}");

    let table_no_grant = TestBundle::new()
        .hyperty("carol.example", "c", &guest("media-peer"), media_peer_config(false))
        .domain("carol.example", json!({ "media": { "bind": "127.0.0.1", "ports": "40000-40001" } }));
    let e = hyperty_host::Bundle::load(table_no_grant.write()).unwrap_err().to_string();
    assert!(e.contains("media: a `media` table, but the domain is not granted `media`"), "{e}");

    let bad_bind = TestBundle::new()
        .hyperty("carol.example", "c", &guest("media-peer"), media_peer_config(false))
        .domain("carol.example", json!({ "grants": ["media"], "media": { "bind": "0.0.0.0", "ports": "40000-40001" } }));
    let e = hyperty_host::Bundle::load(bad_bind.write()).unwrap_err().to_string();
    assert!(e.contains("media: bind: 0.0.0.0 is not one interface's address"), "{e}");
}

#[test]
fn more_peer_connections_than_the_limit_are_refused_until_one_is_freed() {
    let (_runtime, mut driver, _bundle, a, _b) = pair(json!({ "peer-connections": 2 }));
    for i in 0..2 {
        assert_eq!(driver.command(&a, json!({ "op": "open" }))["pc"], i);
    }
    let e = error_of(&driver.command(&a, json!({ "op": "open" })));
    assert_eq!(e, "limit-reached: peer-connections: alice.example holds 2 open (peer-connections = 2)");
    // Closing one frees its place (once its task has let go of the socket).
    driver.command(&a, json!({ "op": "close", "pc": 0 }));
    let closed = driver.media_report(&a, 10, |v| v["event"] == "closed");
    assert_eq!((closed["pc"].as_u64(), closed["reason"].as_str()), (Some(0), Some("closed by its hyperty")));
    let e = error_of(&driver.command(&a, json!({ "op": "send", "pc": 0, "channel": 1, "text": "x" })));
    assert_eq!(e, "closed: closed by its hyperty");
    wait_until("a place is free again", || driver.command(&a, json!({ "op": "open" }))["pc"].is_u64());
}

#[test]
fn a_peer_that_vanishes_is_reported_disconnected_and_its_connection_freed() {
    let (runtime, mut driver, _bundle, a, b) = pair(json!({ "peer-connections": 1 }));
    let call = driver.media_call(&a, &b, "chat");
    // b goes away mid-call: its store, its connection and socket with it.
    assert!(runtime.undeploy("bob.example", "b"));
    let (pc, _) = call.caller;
    let state = driver.media_report(&a, 40, |v| v["event"] == "ice-state" && v["state"] == "disconnected");
    assert_eq!(state["pc"], pc);
    let closed = driver.media_report(&a, 10, |v| v["event"] == "closed");
    assert_eq!(closed["reason"], "the peer stopped answering (ICE disconnected)");
    // Its place is free: with peer-connections = 1, a opens another.
    wait_until("a's place is free again", || driver.command(&a, json!({ "op": "open" }))["pc"].is_u64());
}

#[test]
fn a_trap_closes_the_hyperty_s_connections_and_frees_their_sockets() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let mut events = runtime.events();
    // One port: a second connection finds none while the first holds it.
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
        .domain("alice.example", media_domain(1, json!({})));
    runtime.deploy(&bundle.load()).unwrap();
    let a = runtime.lookup("alice.example", "a").unwrap();
    assert_eq!(driver.command(&a, json!({ "op": "open" }))["pc"], 0);
    let e = error_of(&driver.command(&a, json!({ "op": "open" })));
    assert!(e.starts_with("limit-reached: ports: no free UDP port on 127.0.0.1 in "), "{e}");

    let _ = driver.ask(&a, json!({ "op": "trap" }));
    wait_event(&mut events, |e| matches!(e.kind, hyperty_host::EventKind::Restarted { .. }));
    // The restarted instance gets the port back.
    wait_until("the trapped instance's socket is freed", || driver.command(&a, json!({ "op": "open" }))["pc"] == 0);
}

#[test]
fn opening_a_peer_connection_and_accepting_a_peer_are_cedar_actions_denied_with_a_clear_error() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let policies = r#"@id("open") permit (principal, action, resource);
@id("no-mallory") forbid (principal, action == Rethink::Action::"media-open", resource) when { context.target_domain == "mallory.example" };
@id("no-offers-from-bob") forbid (principal, action == Rethink::Action::"media-accept", resource) when { context.target_domain == "bob.example" };"#;
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
        .domain("alice.example", media_domain(4, json!({})))
        .hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(false))
        .domain("bob.example", media_domain(4, json!({})));
    let file = bundle.dir().join("alice.cedar");
    std::fs::write(&file, policies).unwrap();
    let bundle = bundle.domain("alice.example", json!({ "policies": [file.to_str().unwrap()] }));
    runtime.deploy(&bundle.load()).unwrap();
    let a = runtime.lookup("alice.example", "a").unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();

    let e = error_of(&driver.command(&a, json!({ "op": "open", "remote": "hyperty://mallory.example/m" })));
    assert_eq!(e, "denied: media-open not permitted by the policies of alice.example [no-mallory]");
    // Any other peer, or none named, is permitted.
    let pc = driver.command(&a, json!({ "op": "open", "remote": b.to_string() }))["pc"].as_u64().unwrap();
    assert!(driver.command(&a, json!({ "op": "open" }))["pc"].is_u64());

    // An offer from bob.example is not accepted; nothing changed, so the
    // same connection can still make its own offer.
    let offer = offer_from(&mut driver, &b);
    let e = error_of(&driver.command(&a, json!({ "op": "accept-offer", "pc": pc, "sdp": offer, "remote": b.to_string() })));
    assert_eq!(e, "denied: media-accept not permitted by the policies of alice.example [no-offers-from-bob]");
    driver.command(&a, json!({ "op": "channel", "pc": pc, "label": "x" }));
    assert!(driver.command(&a, json!({ "op": "offer", "pc": pc }))["sdp"].is_string());
}

#[test]
fn hyperties_of_two_runtimes_open_a_data_channel_signalling_through_nats() {
    let nats = Nats::start();
    let servers = [nats.endpoint()];
    let with_stubs = |mut bundle: TestBundle| {
        for domain in ["alice.example", "bob.example", "app.example"] {
            bundle = bundle.protostub(domain, &servers, json!({}));
        }
        bundle
    };
    let r1 = runtime(Duration::from_secs(10));
    let r2 = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&r1);
    let b1 = with_stubs(
        TestBundle::new()
            .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
            .domain("alice.example", media_domain(8, json!({}))),
    );
    let b2 = with_stubs(
        TestBundle::new()
            .hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(true))
            .domain("bob.example", media_domain(8, json!({}))),
    );
    r1.deploy(&b1.load()).expect("runtime 1 deploys");
    r2.deploy(&b2.load()).expect("runtime 2 deploys");
    let a = r1.lookup("alice.example", "a").unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();

    // The stubs connect and subscribe asynchronously: call until the offer
    // is answered (a call that found no route yet reports `failed`).
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let pc = loop {
        let call = driver.command(&a, json!({ "op": "call", "peer": b.to_string(), "label": "far" }));
        let pc = call["pc"].as_u64().unwrap_or_else(|| panic!("{call}"));
        let signal = driver.media_report(&a, 15, |v| v["signal"].is_string() && v["pc"] == pc);
        if signal["signal"] == "answered" {
            break pc;
        }
        driver.command(&a, json!({ "op": "drop", "pc": pc }));
        assert!(std::time::Instant::now() < until, "no answer through NATS: {signal}");
    };
    let ch = driver.media_report(&a, 10, |v| v["event"] == "channel-open" && v["pc"] == pc)["channel"].as_u64().unwrap();
    driver.media_report(&b, 10, |v| v["event"] == "channel-open" && v["label"] == "far");
    driver.command(&a, json!({ "op": "send", "pc": pc, "channel": ch, "text": "across runtimes" }));
    let at_b = driver.media_report(&b, 10, |v| v["event"] == "channel-data");
    assert_eq!(at_b["text"], "across runtimes");
    let at_a = driver.media_report(&a, 10, |v| v["event"] == "channel-data" && v["pc"] == pc);
    assert_eq!(at_a["text"], "echo:across runtimes");
}

/// The page of the Chromium test: opens a data channel to the hyperty
/// (offer to `/offer`, the hyperty's answer back), sends a greeting once
/// it is open, and posts every message it receives to `/result`.
const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>hyperty media</title><script>
const post = (path, body) => fetch(path, { method: "POST", body });
(async () => {
  try {
    const pc = new RTCPeerConnection();
    const dc = pc.createDataChannel("page");
    dc.onopen = () => { post("/result", JSON.stringify({ open: true })); dc.send("hello from chromium"); };
    dc.onmessage = (e) => post("/result", JSON.stringify({ got: e.data }));
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((done) => {
      if (pc.iceGatheringState === "complete") return done();
      pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
    });
    const answer = await (await post("/offer", pc.localDescription.sdp)).text();
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
  } catch (e) {
    post("/result", JSON.stringify({ error: String(e) }));
  }
})();
</script>"#;

#[test]
fn a_page_in_chromium_and_a_hyperty_exchange_data_channel_messages_both_ways() {
    // Its own thread: the namespace is the thread's (and its children's).
    std::thread::spawn(chromium_data_channel).join().unwrap();
}

fn chromium_data_channel() {
    if let Err(why) = enter_private_network() {
        eprintln!("SKIPPED: no private network namespace can be made here ({why})");
        return;
    }
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let ports = udp_ports(8);
    let bundle = TestBundle::new().hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(true)).domain(
        "bob.example",
        json!({ "grants": ["clocks", "random", "media"], "media": { "bind": NAMESPACE_ADDRESS, "ports": ports } }),
    );
    runtime.deploy(&bundle.load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    let server = PageServer::start(NAMESPACE_ADDRESS, PAGE);
    let _chromium = Chromium::start(&server.url).expect("Debian's chromium is installed");

    let offer = server.post("/offer", 30);
    let pc = driver.command(&b, json!({ "op": "open", "remote": "chromium" }))["pc"].as_u64().unwrap();
    let answer = driver.command(&b, json!({ "op": "accept-offer", "pc": pc, "sdp": offer.body }));
    let sdp = answer["sdp"].as_str().unwrap_or_else(|| panic!("the hyperty refused Chromium's offer: {answer}"));
    offer.answer(sdp.to_owned());

    // Page → hyperty, and the hyperty's echo back to the page.
    let open = driver.media_report(&b, 20, |v| v["event"] == "channel-open" && v["pc"] == pc);
    assert_eq!(open["label"], "page");
    let got = driver.media_report(&b, 10, |v| v["event"] == "channel-data");
    assert_eq!(got["text"], "hello from chromium");
    let page_got = |text: &str| loop {
        let post = server.post("/result", 20);
        let v: Value = serde_json::from_str(&post.body).unwrap_or(Value::Null);
        post.answer(String::new());
        assert!(v["error"].is_null(), "the page failed: {v}");
        if v["got"] == text {
            return;
        }
    };
    page_got("echo:hello from chromium");
    // Hyperty → page on its own.
    let ch = open["channel"].as_u64().unwrap();
    assert_eq!(driver.command(&b, json!({ "op": "send", "pc": pc, "channel": ch, "text": "hello from the hyperty" })), json!({ "ok": true }));
    page_got("hello from the hyperty");
}

// WebRTC identity (W3C webrtc-identity, RFC 8827 §7): fingerprints bound to
// users by the IdP proxy of each hyperty's domain.

use hyperty_tests::webid::*;

fn deploy_identified(component: &str, bob: Value) -> (Runtime, Driver, TestBundle, Address, Address) {
    let runtime = runtime(Duration::from_secs(5));
    let driver = Driver::new(&runtime);
    let bundle = identified_pair(component, bob);
    runtime.deploy(&bundle.load()).expect("the identified media pair deploys");
    let a = runtime.lookup("alice.example", "a").unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    (runtime, driver, bundle, a, b)
}

#[test]
fn identity_bound_fingerprints_are_accepted_and_each_side_is_told_the_other_s_user() {
    let (runtime, mut driver, _bundle, a, b) = deploy_identified("idp-jwt", json!({ "require-identity": false }));
    let (at_a, at_b) = driver.identified_call(&a, &b, "chat");
    assert_eq!(at_a["identity"], json!({ "user": "bob@idp.example", "idp": IDP }), "{at_a}");
    assert_eq!(at_b["identity"], json!({ "user": "alice@idp.example", "idp": IDP }), "{at_b}");

    // The assertion a peer is shown binds its fingerprint, and is not a
    // message assertion: replayed on the bus, it is refused.
    let pc = driver.command(&b, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let shown = driver.command(&b, json!({ "op": "assertion", "pc": pc }));
    let shown: Value = serde_json::from_str(shown["assertion"].as_str().unwrap_or_else(|| panic!("{shown}"))).unwrap();
    assert_eq!(shown["idp"]["domain"], IDP, "{shown}");
    let token = shown["assertion"].as_str().unwrap().to_owned();
    let again = driver.command(&b, json!({ "op": "assertion", "pc": pc }));
    assert_eq!(again["assertion"].as_str().map(|a| a.contains(&token)), Some(true), "kept for the connection: {again}");
    let endpoint = runtime.endpoint("hyperty://carol.example/replayer", 16).unwrap();
    let mut m = hyperty_host::Message::new(1, hyperty_host::MessageType::Read, endpoint.address().clone(), b.clone(), None);
    m.assertion = Some(hyperty_host::message::Assertion { idp: IDP.into(), token });
    endpoint.request(m, None).unwrap();
    let answer = endpoint.recv_timeout(Duration::from_secs(10)).expect("an answer");
    assert_eq!(answer.body.code, Some(401), "{answer:?}");
    let why = answer.body.description.unwrap_or_default();
    assert!(why.contains("a bound assertion (its contents claim) is not a message assertion"), "{why}");
}

#[test]
fn an_assertion_binding_another_connection_s_fingerprint_is_refused_and_the_connection_closed_with_the_reason() {
    let (_runtime, mut driver, _bundle, a, b) = deploy_identified("idp-jwt", json!({ "require-identity": false }));
    // b offers from one connection and shows the assertion of another.
    let other = driver.command(&b, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let assertion = driver.command(&b, json!({ "op": "assertion", "pc": other }))["assertion"].as_str().unwrap().to_owned();
    let offer = offer_from(&mut driver, &b);

    let pc = driver.command(&a, json!({ "op": "open", "remote": b.to_string() }))["pc"].as_u64().unwrap();
    let set = driver.command(&a, json!({ "op": "set-identity", "pc": pc, "assertion": assertion }));
    assert_eq!(set, json!({ "user": "bob@idp.example" }), "the assertion itself is valid");
    // Once per connection: the IdP proxy is not asked again.
    let e = error_of(&driver.command(&a, json!({ "op": "set-identity", "pc": pc, "assertion": assertion })));
    assert_eq!(e, "invalid: the remote identity is set already (bob@idp.example): once per connection");
    let e = error_of(&driver.command(&a, json!({ "op": "accept-offer", "pc": pc, "sdp": offer, "remote": b.to_string() })));
    assert!(e.starts_with("closed: identity mismatch: the remote SDP's fingerprint sha-256 "), "{e}");
    assert!(e.contains("is not the one the identity assertion of bob@idp.example binds"), "{e}");
    let closed = driver.media_report(&a, 10, |v| v["event"] == "closed" && v["pc"] == pc);
    assert!(closed["reason"].as_str().unwrap().starts_with("identity mismatch"), "{closed}");
    // It was never reported connected.
    assert!(driver.find(|m| m.from == a && reported(m)["event"] == "connected", Duration::ZERO).is_none());

    // A tampered assertion closes the next connection with the IdP's reason;
    // text that is no assertion is refused and the connection goes on.
    let pc = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let e = error_of(&driver.command(&a, json!({ "op": "set-identity", "pc": pc, "assertion": "{\"x\":1}" })));
    assert!(e.starts_with("invalid: not an identity assertion: expected"), "{e}");
    let huge = json!({ "idp": { "domain": IDP }, "assertion": "x".repeat(16 << 10) }).to_string();
    let e = error_of(&driver.command(&a, json!({ "op": "set-identity", "pc": pc, "assertion": huge })));
    assert!(e.starts_with("invalid: not an identity assertion: ") && e.ends_with("bytes, the limit is 16384"), "{e}");
    let mut tampered: Value = serde_json::from_str(&assertion).unwrap();
    let token = tampered["assertion"].as_str().unwrap().to_owned();
    // The signature's first character changed: its bits all count.
    let at = token.rfind('.').unwrap() + 1;
    let other = if &token[at..=at] == "A" { "B" } else { "A" };
    tampered["assertion"] = json!(format!("{}{other}{}", &token[..at], &token[at + 1..]));
    let e = error_of(&driver.command(&a, json!({ "op": "set-identity", "pc": pc, "assertion": tampered.to_string() })));
    assert!(e.starts_with("closed: the remote identity assertion of IdP idp.example was refused: "), "{e}");
    driver.media_report(&a, 10, |v| v["event"] == "closed" && v["pc"] == pc && v["reason"].as_str().unwrap().contains("was refused"));

    // A message assertion (valid, but binding nothing) is no identity
    // assertion for a connection.
    let pc = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let unbound = json!({ "idp": { "domain": IDP }, "assertion": jwt(IDP_KEY, IDP, "bob@idp.example", unix_now() + 600) });
    let e = error_of(&driver.command(&a, json!({ "op": "set-identity", "pc": pc, "assertion": unbound.to_string() })));
    assert_eq!(e, "closed: the remote identity assertion of IdP idp.example was refused: not a bound assertion: no contents claim");
}

#[test]
fn an_idp_proxy_without_identity_binding_still_asserts_messages_and_its_peers_are_unauthenticated() {
    // bob.example requires identity (the default with an IdP): the call's
    // offer reaches b only with alice's assertion, made and validated by
    // the old proxy.
    let (_runtime, mut driver, _bundle, a, b) = deploy_identified("idp-jwt-unbound", json!({}));
    let call = driver.media_call(&a, &b, "chat");
    let at_a = driver.media_report(&a, 10, |v| v["event"] == "connected" && v["pc"] == call.caller.0);
    assert_eq!(at_a["identity"], Value::Null, "{at_a}");
    let at_b = driver.media_report(&b, 10, |v| v["event"] == "connected");
    assert_eq!(at_b["identity"], Value::Null, "{at_b}");
    let e = error_of(&driver.command(&a, json!({ "op": "assertion", "pc": call.caller.0 })));
    assert!(e.starts_with("not-granted: IdP idp.example cannot assert alice@idp.example: "), "{e}");
    assert!(e.ends_with("cannot bind assertions to contents (it does not export identity-binding)"), "{e}");
}

#[test]
fn a_policy_requiring_an_identified_peer_denies_an_unauthenticated_one() {
    let policies = r#"@id("open") permit (principal, action, resource);
@id("identified-peers-only") forbid (principal, action == Rethink::Action::"media-accept", resource) unless { context.has_remote_user && context.remote_idp == "idp.example" };"#;
    let bundle = identified_pair("idp-jwt", json!({ "require-identity": false }));
    let file = bundle.dir().join("bob.cedar");
    std::fs::write(&file, policies).unwrap();
    let bundle = bundle.domain("bob.example", json!({ "policies": [file.to_str().unwrap()] }));
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    runtime.deploy(&bundle.load()).unwrap();
    let a = runtime.lookup("alice.example", "a").unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();

    // Without an assertion, b's accept is denied: the call fails.
    let pc = driver.command(&a, json!({ "op": "call", "peer": b.to_string(), "label": "chat" }))["pc"].as_u64().unwrap();
    let failed = driver.media_report(&a, 10, |v| v["signal"].is_string() && v["pc"] == pc);
    assert_eq!(failed["signal"], "failed", "{failed}");
    assert_eq!(
        failed["answer"]["error"],
        "denied: media-accept not permitted by the policies of bob.example [identified-peers-only]",
        "{failed}"
    );
    // With one, the same policy permits.
    let (_, at_b) = driver.identified_call(&a, &b, "chat");
    assert_eq!(at_b["identity"]["user"], "alice@idp.example", "{at_b}");
}

// Signalling through reTHINK's Connection data object (media-caller).

/// The first line media-caller `at` said that contains `text`.
fn said(driver: &Driver, at: &Address, text: &str) -> Value {
    driver.media_report(at, 10, |v| v["said"].as_str().is_some_and(|s| s.contains(text)))
}

#[test]
fn a_call_signalled_through_a_synced_connection_object_opens_a_channel_between_identified_peers() {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let caller = json!({ "peer": "bob.example/callee", "message": "hello bob", "observer": OBSERVER });
    let callee = json!({ "message": "hello alice", "observer": OBSERVER });
    let bundle = TestBundle::new()
        .hyperty("alice.example", "caller", &guest("media-caller"), caller)
        .hyperty("bob.example", "callee", &guest("media-caller"), callee)
        .user("alice.example", "caller", "alice@idp.example")
        .user("bob.example", "callee", "bob@idp.example")
        .idp(IDP, IDP_KEY, &["alice.example", "bob.example"])
        .domain("alice.example", media_domain(4, json!({})))
        .domain("bob.example", media_domain(4, json!({})));
    runtime.deploy(&bundle.load()).expect("the call deploys");
    let a = runtime.lookup("alice.example", "caller").unwrap();
    let b = runtime.lookup("bob.example", "callee").unwrap();

    // The offer is the data of a connection:// object of the caller's
    // domain; the callee, invited, answers in a child of the same object.
    let offered = said(&driver, &a, "offer sent to bob.example/callee in the Connection object connection://alice.example/");
    let url = offered["url"].as_str().unwrap().to_owned();
    assert!(offered["said"].as_str().unwrap().ends_with("with our identity assertion"), "{offered}");
    let received = said(&driver, &b, "offer received from alice@idp.example");
    assert!(received["said"].as_str().unwrap().ends_with(&format!("in the Connection object {url}")), "{received}");
    said(&driver, &b, "the caller's identity assertion is valid: alice@idp.example");
    said(&driver, &b, &format!("answer written into the Connection object {url}"));
    said(&driver, &a, "answer received from bob@idp.example (its identity assertion is valid; its fingerprint checked)");
    // Both see the other's identity, checked against its fingerprint.
    said(&driver, &a, "connected: identity of the peer verified: bob@idp.example (IdP idp.example)");
    said(&driver, &b, "connected: identity of the peer verified: alice@idp.example (IdP idp.example)");
    said(&driver, &a, "channel \"chat\" open; sent \"hello bob\"");
    said(&driver, &b, "message exchanged: received \"hello bob\"");
    said(&driver, &a, "message exchanged: received \"hello alice\"");
    // The caller hangs up and deletes the object; the callee, told, closes.
    said(&driver, &a, "hanging up");
    said(&driver, &b, "call ended");
    wait_until("both peer connections are freed", || runtime.is_idle());
    let read = driver.read(&Address::parse(url.clone()).unwrap());
    assert_eq!(read.body.code, Some(404), "the Connection object is gone: {read:?}");
}

#[test]
fn a_runtime_whose_hyperty_holds_a_peer_connection_is_not_idle_until_it_is_closed() {
    let (runtime, mut driver, _bundle, a, _b) = pair(json!({}));
    let pc = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    // Its events may come at any time: --exit-when-idle must not stop it.
    assert!(!runtime.wait_idle(Duration::from_millis(200)), "an open peer connection keeps the runtime busy");
    assert_eq!(driver.command(&a, json!({ "op": "close", "pc": pc })), json!({ "ok": true }));
    wait_until("the runtime is idle once the connection is closed", || runtime.is_idle());
}

#[test]
fn a_remote_name_over_1024_bytes_is_refused_at_open_and_one_at_the_limit_is_kept() {
    let (_runtime, mut driver, _bundle, a, _b) = pair(json!({}));
    let e = error_of(&driver.command(&a, json!({ "op": "open", "remote": "x".repeat(1025) })));
    assert_eq!(e, "invalid: a remote name of 1025 bytes; at most 1024");
    assert!(driver.command(&a, json!({ "op": "open", "remote": "x".repeat(1024) }))["pc"].is_u64());
}

#[test]
fn identities_bound_in_two_runtimes_are_checked_across_nats() {
    let nats = Nats::start();
    let servers = [nats.endpoint()];
    let with_stubs = |mut bundle: TestBundle| {
        for domain in ["alice.example", "bob.example", "app.example"] {
            bundle = bundle.protostub(domain, &servers, json!({}));
        }
        bundle
    };
    let r1 = runtime(Duration::from_secs(10));
    let r2 = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&r1);
    // Each runtime runs the IdP's proxy for its own domain's users, and
    // validates the other's with it (the same IdP).
    let b1 = with_stubs(
        TestBundle::new()
            .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
            .user("alice.example", "a", "alice@idp.example")
            .idp(IDP, IDP_KEY, &["alice.example"])
            .domain("alice.example", media_domain(8, json!({})))
            .domain("alice.example", json!({ "require-identity": false })),
    );
    let b2 = with_stubs(
        TestBundle::new()
            .hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(true))
            .user("bob.example", "b", "bob@idp.example")
            .idp(IDP, IDP_KEY, &["bob.example"])
            .domain("bob.example", media_domain(8, json!({}))),
    );
    r1.deploy(&b1.load()).expect("runtime 1 deploys");
    r2.deploy(&b2.load()).expect("runtime 2 deploys");
    let a = r1.lookup("alice.example", "a").unwrap();
    let b = r2.lookup("bob.example", "b").unwrap();

    // The stubs connect and subscribe asynchronously: call until the offer
    // is answered (a call that found no route yet reports `failed`).
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let pc = loop {
        let call = driver.command(&a, json!({ "op": "call", "peer": b.to_string(), "label": "far", "identity": true }));
        let pc = call["pc"].as_u64().unwrap_or_else(|| panic!("{call}"));
        let signal = driver.media_report(&a, 15, |v| v["signal"].is_string() && v["pc"] == pc);
        if signal["signal"] == "answered" {
            break pc;
        }
        driver.command(&a, json!({ "op": "drop", "pc": pc }));
        assert!(std::time::Instant::now() < until, "no answer through NATS: {signal}");
    };
    let at_a = driver.media_report(&a, 10, |v| v["event"] == "connected" && v["pc"] == pc);
    assert_eq!(at_a["identity"], json!({ "user": "bob@idp.example", "idp": IDP }), "{at_a}");
    let at_b = driver.media_report(&b, 10, |v| v["event"] == "connected");
    assert_eq!(at_b["identity"], json!({ "user": "alice@idp.example", "idp": IDP }), "{at_b}");
}
