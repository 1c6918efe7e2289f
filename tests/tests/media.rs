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
    pair_with(extra, json!({}))
}

/// [`pair`] with bob.example's settings also taking those of `bob`.
fn pair_with(extra: Value, bob: Value) -> (Runtime, Driver, TestBundle, Address, Address) {
    let runtime = runtime(Duration::from_secs(5));
    let driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
        .domain("alice.example", media_domain(4, extra.clone()))
        .hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(true))
        .domain("bob.example", media_domain(4, extra))
        .domain("bob.example", bob);
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
    // (`media_call` saw both sides told they are connected.)

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
    let text_only = offer.replace("m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "m=text 9 RTP/AVP 0");
    let cases = [
        ("not SDP at all".to_owned(), "malformed-sdp"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n".to_owned(), "malformed-sdp"),
        ("v=0\r\n".to_owned() + &"a=x\r\n".repeat(20_000), "malformed-sdp: 100005 bytes, the limit is 65536"),
        (offer.replacen("v=0", "v=x", 1), "malformed-sdp"),
        (without("a=fingerprint:"), "no usable transport: no DTLS fingerprint"),
        (without("a=ice-ufrag:"), "no usable transport: no ICE credentials"),
        (text_only, "no usable transport: no data channel or media section"),
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

/// `bundle` with NATS protostubs (on `servers`) for the media tests' domains.
fn through_nats(mut bundle: TestBundle, servers: &[String]) -> TestBundle {
    for domain in ["alice.example", "bob.example", "app.example"] {
        bundle = bundle.protostub(domain, servers, json!({}));
    }
    bundle
}

/// Has media-peer `a` call `b` (in another runtime) on a channel named
/// "far", with `extra` fields in the call command, until the offer is
/// answered: the stubs connect and subscribe asynchronously, and a call
/// that found no route yet reports `failed`. The caller's connection.
fn call_through_nats(driver: &mut Driver, a: &Address, b: &Address, extra: Value) -> u64 {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut command = json!({ "op": "call", "peer": b.to_string(), "label": "far" });
        command.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
        let call = driver.command(a, command);
        let pc = call["pc"].as_u64().unwrap_or_else(|| panic!("{call}"));
        let signal = driver.media_report(a, 15, |v| v["signal"].is_string() && v["pc"] == pc);
        if signal["signal"] == "answered" {
            return pc;
        }
        driver.command(a, json!({ "op": "drop", "pc": pc }));
        assert!(std::time::Instant::now() < until, "no answer through NATS: {signal}");
    }
}

#[test]
fn hyperties_of_two_runtimes_open_a_data_channel_signalling_through_nats() {
    let nats = Nats::start();
    let servers = [nats.endpoint()];
    let with_stubs = |bundle: TestBundle| through_nats(bundle, &servers);
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

    let pc = call_through_nats(&mut driver, &a, &b, json!({}));
    let ch = driver.media_report(&a, 10, |v| v["event"] == "channel-open" && v["pc"] == pc)["channel"].as_u64().unwrap();
    driver.media_report(&b, 10, |v| v["event"] == "channel-open" && v["label"] == "far");
    driver.command(&a, json!({ "op": "send", "pc": pc, "channel": ch, "text": "across runtimes" }));
    let at_b = driver.media_report(&b, 10, |v| v["event"] == "channel-data");
    assert_eq!(at_b["text"], "across runtimes");
    let at_a = driver.media_report(&a, 10, |v| v["event"] == "channel-data" && v["pc"] == pc);
    assert_eq!(at_a["text"], "echo:across runtimes");
}

/// The page of the Chromium data-channel test: opens a channel to the
/// hyperty, sends a greeting once it is open, and posts every message it
/// receives to `/result`.
fn data_channel_page() -> String {
    offering_page(
        r#"const dc = pc.createDataChannel("page");
    dc.onopen = () => { post("/result", JSON.stringify({ open: true })); dc.send("hello from chromium"); };
    dc.onmessage = (e) => post("/result", JSON.stringify({ got: e.data }));"#,
        "",
    )
}

#[test]
fn a_page_in_chromium_and_a_hyperty_exchange_data_channel_messages_both_ways() {
    // Its own thread: the namespace is the thread's (and its children's).
    std::thread::spawn(chromium_data_channel).join().unwrap();
}

fn chromium_data_channel() {
    let mut call = match ChromiumCall::start(data_channel_page(), media_peer_config(true), json!({})) {
        Ok(call) => call,
        Err(why) => return eprintln!("SKIPPED: no private network namespace can be made here ({why})"),
    };
    let (b, pc) = (call.b.clone(), call.pc);

    // Page → hyperty, and the hyperty's echo back to the page.
    let open = call.driver.media_report(&b, 20, |v| v["event"] == "channel-open" && v["pc"] == pc);
    assert_eq!(open["label"], "page");
    let got = call.driver.media_report(&b, 10, |v| v["event"] == "channel-data");
    assert_eq!(got["text"], "hello from chromium");
    let page_got = |call: &ChromiumCall, text: &str| while call.result()["got"] != text {};
    page_got(&call, "echo:hello from chromium");
    // Hyperty → page on its own.
    let ch = open["channel"].as_u64().unwrap();
    let sent = call.driver.command(&b, json!({ "op": "send", "pc": pc, "channel": ch, "text": "hello from the hyperty" }));
    assert_eq!(sent, json!({ "ok": true }));
    page_got(&call, "hello from the hyperty");
}

/// The frames `peer` reported on connection `pc`, track `track`, until the
/// `n`th (each report counts the track's frames so far), checking each.
fn frames_until(driver: &Driver, peer: &Address, pc: u64, track: u64, n: u64, check: impl Fn(&Value)) {
    let last = driver.media_report(peer, 20, |v| {
        let mine = v["event"] == "media" && v["pc"] == pc && v["track"] == track;
        if mine {
            check(v);
        }
        mine && v["n"] == n
    });
    assert_eq!(last["n"], n, "{last}");
}

#[test]
fn a_hyperty_sends_video_and_audio_frames_and_the_other_receives_and_counts_them() {
    let (_runtime, mut driver, _bundle, a, b) = pair(json!({}));
    let (call, tracks) = driver.media_call_with_tracks(&a, &b, "control", json!([["video", "vp8"], ["audio", "opus"]]));
    let (pc_a, pc_b) = (call.caller.0, call.callee.0);
    let (video_a, audio_a) = (tracks[0], tracks[1]);
    // b was told of both tracks, receive-only seen from b.
    let video = driver.media_track(&b, pc_b, "video");
    assert_eq!((video["codec"].as_str(), video["direction"].as_str()), (Some("vp8"), Some("recvonly")), "{video}");
    let audio = driver.media_track(&b, pc_b, "audio");
    assert_eq!((audio["codec"].as_str(), audio["direction"].as_str()), (Some("opus"), Some("recvonly")), "{audio}");
    let (video_b, audio_b) = (video["track"].as_u64().unwrap(), audio["track"].as_u64().unwrap());

    // 30 video frames of 3000 bytes (three packets each at str0m's MTU),
    // then 50 Opus frames of 120 bytes: every one arrives whole, in order.
    // One track at a time: both at once could hold more than the
    // connection's `pending-frames` (64) in b's inbox, and the cap drops
    // the rest (its own test is the flood test below).
    let sent = driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": video_a, "frames": 30, "size": 3000, "step-us": 33_333 }));
    assert_eq!(sent, json!({ "written": 30 }));
    frames_until(&driver, &b, pc_b, video_b, 30, |v| {
        assert_eq!(v["size"], 3000, "{v}");
        assert_eq!(v["keyframe"], v["n"] == 1, "only the first frame is a VP8 keyframe: {v}");
    });
    let sent = driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": audio_a, "frames": 50, "size": 120, "step-us": 20_000 }));
    assert_eq!(sent, json!({ "written": 50 }));
    frames_until(&driver, &b, pc_b, audio_b, 50, |v| assert_eq!(v["size"], 120, "{v}"));

    // b asks for a keyframe: a's sending track is told.
    assert_eq!(driver.command(&b, json!({ "op": "request-keyframe", "pc": pc_b, "track": video_b })), json!({ "ok": true }));
    let asked = driver.media_report(&a, 10, |v| v["event"] == "keyframe-request" && v["pc"] == pc_a);
    assert_eq!(asked["track"], video_a);

    // Counts only: b's frames stop, its once-a-second totals go on.
    assert_eq!(driver.command(&b, json!({ "op": "deliver-frames", "pc": pc_b, "track": audio_b, "on": false })), json!({ "ok": true }));
    // More frames in one call than str0m lets wait for packetising (512):
    // the host packetises each as it is written.
    let sent = driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": audio_a, "frames": 600, "size": 120, "at-us": 1_000_000, "step-us": 20 }));
    assert_eq!(sent, json!({ "written": 600 }));
    wait_until("b's audio totals count 100 frames", || {
        driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": audio_a, "frames": 10, "size": 120, "at-us": 2_000_000 }));
        let stats = driver.media_report(&b, 10, |v| v["event"] == "track-stats" && v["track"] == audio_b);
        stats["frames"].as_u64().unwrap() >= 100
    });
    // No frame event was delivered meanwhile: the next one, once frames
    // are on again, is the 51st b's hyperty saw.
    driver.command(&b, json!({ "op": "deliver-frames", "pc": pc_b, "track": audio_b, "on": true }));
    driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": audio_a, "frames": 1, "size": 120, "at-us": 9_000_000 }));
    let next = driver.media_report(&b, 10, |v| v["event"] == "media" && v["track"] == audio_b && v["n"].as_u64() > Some(50));
    assert_eq!(next["n"], 51, "{next}");
}

#[test]
fn a_track_is_added_to_a_connected_call_by_renegotiation() {
    let (_runtime, mut driver, _bundle, a, b) = pair(json!({}));
    let call = driver.media_call(&a, &b, "control");
    let (pc_a, pc_b) = (call.caller.0, call.callee.0);
    let added = driver.command(&a, json!({ "op": "add-track", "pc": pc_a, "kind": "video", "codec": "vp9" }));
    let track = added["track"].as_u64().unwrap_or_else(|| panic!("{added}"));
    // Not negotiated yet: nothing to write on.
    let e = error_of(&driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": track })));
    assert_eq!(e, format!("invalid: track {track} is not negotiated yet: make an offer"));
    let reoffer = driver.command(&a, json!({ "op": "reoffer", "pc": pc_a, "peer": b.to_string(), "remote-pc": pc_b }));
    assert_eq!(reoffer, json!({ "ok": true }));
    let answered = driver.media_report(&a, 10, |v| v["signal"].is_string() && v["pc"] == pc_a);
    assert_eq!(answered["signal"], "answered", "{answered}");
    let video = driver.media_track(&b, pc_b, "video");
    let sent = driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": track, "frames": 5, "size": 2000 }));
    assert_eq!(sent, json!({ "written": 5 }));
    frames_until(&driver, &b, pc_b, video["track"].as_u64().unwrap(), 5, |v| {
        assert_eq!((v["size"].as_u64(), v["codec"].as_str()), (Some(2000), Some("vp9")), "{v}");
    });
    // The data channel carried on through the renegotiation.
    driver.command(&a, json!({ "op": "send", "pc": pc_a, "channel": call.caller.1, "text": "still here" }));
    assert_eq!(driver.media_report(&b, 10, |v| v["event"] == "channel-data")["text"], "still here");
}

#[test]
fn bad_track_calls_are_refused_with_their_typed_error_and_the_call_goes_on() {
    let (_runtime, mut driver, _bundle, a, b) = pair(json!({ "tracks": 2, "media-bytes-per-second": 20_000, "message-bytes": 16_384 }));
    let (call, tracks) = driver.media_call_with_tracks(&a, &b, "control", json!([["video", "vp8"]]));
    let (pc_a, pc_b) = (call.caller.0, call.callee.0);
    let video_a = tracks[0];
    let video_b = driver.media_track(&b, pc_b, "video")["track"].as_u64().unwrap();
    let command = |driver: &mut Driver, peer: &Address, c: Value| error_of(&driver.command(peer, c));

    let cases = [
        (&a, json!({ "op": "write", "pc": pc_a, "track": 99 }), "invalid: no track 99 on this connection".to_owned()),
        (&b, json!({ "op": "write", "pc": pc_b, "track": video_b }), format!("invalid: track {video_b} does not send (recvonly)")),
        (&a, json!({ "op": "request-keyframe", "pc": pc_a, "track": video_a }), format!("invalid: track {video_a} does not receive (sendonly)")),
        (&a, json!({ "op": "deliver-frames", "pc": pc_a, "track": 7 }), "invalid: no track 7 on this connection".to_owned()),
        (&a, json!({ "op": "add-track", "pc": pc_a, "kind": "video", "codec": "mpeg2" }), "invalid: unknown codec \"mpeg2\"".to_owned()),
        (&a, json!({ "op": "add-track", "pc": pc_a, "kind": "audio", "codec": "vp8" }), "invalid: vp8 is not a codec for audio".to_owned()),
        (&b, json!({ "op": "forward", "pc": pc_b, "track": video_b, "to": pc_b, "to-track": video_b }), format!("invalid: track {video_b} does not send (recvonly)")),
        (&a, json!({ "op": "forward", "pc": pc_a, "track": video_a, "to": pc_a, "to-track": video_a }), format!("invalid: track {video_a} does not receive (sendonly)")),
        (&a, json!({ "op": "write", "pc": pc_a, "track": video_a, "size": 16_385 }), "limit-reached: message-bytes: a frame of 16385 bytes, the limit is 16384".to_owned()),
    ];
    for (peer, c, why) in cases {
        assert_eq!(command(&mut driver, peer, c.clone()), why, "{c}");
    }
    // One more track fits (tracks = 2), the next does not.
    assert!(driver.command(&a, json!({ "op": "add-track", "pc": pc_a, "kind": "audio", "codec": "opus" }))["track"].is_u64());
    let e = command(&mut driver, &a, json!({ "op": "add-track", "pc": pc_a, "kind": "audio", "codec": "opus" }));
    assert_eq!(e, "limit-reached: tracks: the connection has 2 (tracks = 2)");
    // 20,000 media bytes a second: two frames of 8,000 pass, the third not.
    let over = driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": video_a, "frames": 3, "size": 8000 }));
    assert_eq!(error_of(&over), "limit-reached: media-bytes-per-second: the domain sends more than 20000 media bytes a second");
    assert_eq!(over["written"], 2);
    // The call goes on: the two frames arrived, and the channel works.
    frames_until(&driver, &b, pc_b, video_b, 2, |v| assert_eq!(v["size"], 8000));
    driver.command(&a, json!({ "op": "send", "pc": pc_a, "channel": call.caller.1, "text": "after" }));
    assert_eq!(driver.media_report(&b, 10, |v| v["event"] == "channel-data")["text"], "after");
}

/// Three media-peers: a calls r with a video track, r calls b with its own,
/// and r forwards a's video to b inside the host.
struct RelayWorld {
    _runtime: Runtime,
    driver: Driver,
    a: Address,
    r: Address,
    b: Address,
    /// a's sending track on `pc_a`; r's connections from a and to b; b's
    /// connection and the track on which a's frames arrive there.
    a_tracks: Vec<u64>,
    pc_a: u64,
    pc_ra: u64,
    pc_rb: u64,
    pc_b: u64,
    at_b: u64,
}

fn relay_world() -> RelayWorld {
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let mut bundle = TestBundle::new();
    for (domain, name) in [("alice.example", "a"), ("relay.example", "r"), ("bob.example", "b")] {
        bundle = bundle.hyperty(domain, name, &guest("media-peer"), media_peer_config(false)).domain(domain, media_domain(4, json!({})));
    }
    runtime.deploy(&bundle.load()).expect("the three deploy");
    let [a, r, b] = ["alice.example/a", "relay.example/r", "bob.example/b"].map(|d| {
        let (domain, name) = d.split_once('/').unwrap();
        runtime.lookup(domain, name).unwrap()
    });
    // a → r with a's video; r → b with r's own sending video track.
    let (call_in, a_tracks) = driver.media_call_with_tracks(&a, &r, "in", json!([["video", "vp8"]]));
    let (pc_a, pc_ra) = (call_in.caller.0, call_in.callee.0);
    let from = driver.media_track(&r, pc_ra, "video")["track"].as_u64().unwrap();
    let (call_out, r_tracks) = driver.media_call_with_tracks(&r, &b, "out", json!([["video", "vp8"]]));
    let (pc_rb, pc_b) = (call_out.caller.0, call_out.callee.0);
    let at_b = driver.media_track(&b, pc_b, "video")["track"].as_u64().unwrap();
    let forward = json!({ "op": "forward", "pc": pc_ra, "track": from, "to": pc_rb, "to-track": r_tracks[0] });
    assert_eq!(driver.command(&r, forward), json!({ "ok": true }));
    RelayWorld { _runtime: runtime, driver, a, r, b, a_tracks, pc_a, pc_ra, pc_rb, pc_b, at_b }
}

#[test]
fn a_relay_hyperty_forwards_one_peer_s_video_to_another_inside_the_host_and_keyframe_requests_flow_back() {
    let RelayWorld { _runtime, mut driver, a, r, b, a_tracks, pc_a, pc_ra, pc_rb, pc_b, at_b } = relay_world();

    // a's 40 frames reach b whole, through the host alone.
    let sent = driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": a_tracks[0], "frames": 40, "size": 2500 }));
    assert_eq!(sent, json!({ "written": 40 }));
    frames_until(&driver, &b, pc_b, at_b, 40, |v| {
        assert_eq!(v["size"], 2500, "{v}");
        assert_eq!(v["keyframe"], v["n"] == 1, "{v}");
    });
    let stats = driver.media_report(&r, 10, |v| v["event"] == "track-stats" && v["pc"] == pc_ra);
    assert_eq!((stats["frames"].as_u64(), stats["forwarded"].as_u64(), stats["dropped"].as_u64()), (Some(40), Some(40), Some(0)), "{stats}");

    // b's keyframe request reaches a's sending track, not r's hyperty.
    assert_eq!(driver.command(&b, json!({ "op": "request-keyframe", "pc": pc_b, "track": at_b })), json!({ "ok": true }));
    let asked = driver.media_report(&a, 10, |v| v["event"] == "keyframe-request");
    assert_eq!((asked["pc"].as_u64(), asked["track"].as_u64()), (Some(pc_a), Some(a_tracks[0])));

    // Closing r's connection to b stops the forward: a's next frame reaches
    // r's hyperty, the first of that track it ever saw (none crossed before).
    driver.command(&r, json!({ "op": "close", "pc": pc_rb }));
    driver.media_report(&r, 10, |v| v["event"] == "closed" && v["pc"] == pc_rb);
    driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": a_tracks[0], "frames": 1, "size": 700, "at-us": 5_000_000 }));
    let first = driver.media_report(&r, 10, |v| v["event"] == "media" && v["pc"] == pc_ra);
    assert_eq!((first["n"].as_u64(), first["size"].as_u64()), (Some(1), Some(700)), "{first}");
    // No keyframe request was handed to r's hyperty: r reports what it gets
    // in order, so one would have reached the observer before that frame.
    let to_r = driver.endpoint.take_set_aside(|m| m.from == r && reported(m)["event"] == "keyframe-request");
    assert!(to_r.is_empty(), "{to_r:?}");
}

#[test]
fn when_a_forward_s_source_closes_its_target_s_keyframe_requests_reach_the_hyperty_again() {
    let RelayWorld { _runtime, mut driver, r, b, pc_ra, pc_rb, pc_b, at_b, .. } = relay_world();
    // The source (r's connection from a) closes while it feeds pc_rb.
    driver.command(&r, json!({ "op": "close", "pc": pc_ra }));
    driver.media_report(&r, 10, |v| v["event"] == "closed" && v["pc"] == pc_ra);
    // b asks for a keyframe: no source is left to pass it to, so r's
    // hyperty is told, on its track to b.
    assert_eq!(driver.command(&b, json!({ "op": "request-keyframe", "pc": pc_b, "track": at_b })), json!({ "ok": true }));
    let asked = driver.media_report(&r, 10, |v| v["event"] == "keyframe-request");
    assert_eq!(asked["pc"].as_u64(), Some(pc_rb), "{asked}");
}

/// The page of the Chromium media test: sends its fake camera and
/// microphone, and posts what `getStats()` says of the media it receives
/// to `/result` twice a second: `{"inbound": {"video": {"packets",
/// "frames"}, "audio": ...}}`.
fn camera_page() -> String {
    offering_page(
        r#"const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 320, height: 240 } });
    for (const track of stream.getTracks()) pc.addTrack(track, stream);"#,
        r#"setInterval(async () => {
      const inbound = {};
      (await pc.getStats()).forEach((r) => {
        if (r.type === "inbound-rtp") inbound[r.kind] = { packets: r.packetsReceived, frames: r.framesDecoded ?? null };
      });
      post("/result", JSON.stringify({ inbound, state: pc.connectionState }));
    }, 500);"#,
    )
}

#[test]
fn chromium_sends_camera_and_microphone_the_hyperty_counts_them_and_echoes_them_back_decoded() {
    // Its own thread: the namespace is the thread's (and its children's).
    std::thread::spawn(chromium_media).join().unwrap();
}

fn chromium_media() {
    let mut call = match ChromiumCall::start(camera_page(), media_peer_config(false), json!({ "message-bytes": 262_144 })) {
        Ok(call) => call,
        Err(why) => return eprintln!("SKIPPED: no private network namespace can be made here ({why})"),
    };
    let (b, pc) = (call.b.clone(), call.pc);
    // The page's camera and microphone arrive as two tracks the hyperty may
    // also send on (sendrecv); each is echoed back inside the host.
    let mut tracks = Vec::new();
    for kind in ["video", "audio"] {
        let track = call.driver.media_track(&b, pc, kind);
        assert_eq!(track["direction"], "sendrecv", "{track}");
        let id = track["track"].as_u64().unwrap();
        let echo = call.driver.command(&b, json!({ "op": "forward", "pc": pc, "track": id, "to": pc, "to-track": id }));
        assert_eq!(echo, json!({ "ok": true }));
        tracks.push((kind, id));
    }
    // The hyperty counts what it receives (~20 video frames and 50 Opus
    // frames a second from Chromium's fake devices).
    for (kind, id) in &tracks {
        let stats = call.driver.media_report(&b, 30, |v| v["event"] == "track-stats" && v["track"] == *id && v["forwarded"].as_u64() > Some(10));
        assert!(stats["frames"].as_u64() >= stats["forwarded"].as_u64(), "{kind}: {stats}");
    }
    // The page decodes the echoed video and receives the echoed audio.
    let until = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let v = call.result();
        let video_frames = v["inbound"]["video"]["frames"].as_u64().unwrap_or(0);
        let audio_packets = v["inbound"]["audio"]["packets"].as_u64().unwrap_or(0);
        if video_frames > 5 && audio_packets > 10 {
            eprintln!("the page got the echo back: {v}");
            break;
        }
        assert!(std::time::Instant::now() < until, "the page decoded too little of the echo: {v}");
    }
}

#[test]
fn the_video_demo_page_calls_the_echo_hyperty_through_the_gateway_and_decodes_the_video_it_sends_back() {
    // Its own thread: the namespace is the thread's (and its children's).
    std::thread::spawn(video_demo).join().unwrap();
}

fn video_demo() {
    if let Err(why) = enter_private_network() {
        return eprintln!("SKIPPED: no private network namespace can be made here ({why})");
    }
    hyperty_tests::browser::ensure_chromium();
    // The demo's own bundle (`just video`), its echo hyperty told to report
    // to the test.
    let path = repo().join("guests/demo/video.toml");
    let mut bundle = hyperty_host::Bundle::load(&path).expect("the video bundle loads (re-pin it after changing a guest: `cargo run -p hyperty-host -- pin guests/demo/video.toml`)");
    bundle.domains[0].hyperties[0].config = json!({ "observer": OBSERVER }).to_string();
    let runtime = runtime(Duration::from_secs(10));
    let driver = Driver::new(&runtime);
    runtime.deploy(&bundle).expect("the video bundle deploys");
    let echo = runtime.lookup("video.example", "echo").unwrap();
    let config = hyperty_host::gateway::GatewayConfig::from_spec(bundle.gateway.as_ref().expect("the video bundle has a [gateway]"));
    let gateway = runtime.serve_gateway("127.0.0.1:0".parse().unwrap(), config).expect("the gateway starts");
    let url = format!("http://127.0.0.1:{}/#domain=video.example&user=alice@video.example", gateway.local_addr().port());
    let _chromium = Chromium::start(&url).expect("Debian's chromium is installed");

    let said = |text: &str| driver.media_report(&echo, 40, |v| v["said"].as_str().is_some_and(|s| s.contains(text)));
    said("offer accepted, answer sent");
    said("'s video is sent back to it (forwarded in the host)");
    // The page decodes the video the hyperty sent back.
    let decoded = driver.media_report(&echo, 60, |v| v["page"]["frames-decoded"].as_u64() > Some(5));
    assert_eq!(decoded["page"]["state"], "connected", "{decoded}");
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
    m.assertion = Some(hyperty_host::message::Assertion { idp: IDP.into(), token: token.into() });
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
fn no_remote_identity_is_set_after_a_remote_sdp_even_one_that_was_refused() {
    // str0m keeps the first remote fingerprint it reads, even from an SDP
    // it then refuses: an identity set after that would be checked against
    // the next SDP's text while DTLS checks the first one's certificate.
    let (_runtime, mut driver, _bundle, a, b) = deploy_identified("idp-jwt", json!({ "require-identity": false }));
    // b shows an assertion it holds for another connection (standing for
    // one a victim handed to every peer it called).
    let other = driver.command(&b, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let assertion = driver.command(&b, json!({ "op": "assertion", "pc": other }))["assertion"].as_str().unwrap().to_owned();
    let offer = offer_from(&mut driver, &b);
    // Its media section twice, with the same mid: str0m refuses the offer
    // after reading its fingerprint.
    let section = &offer[offer.find("m=").unwrap()..];
    let broken = format!("{offer}{section}");
    let pc = driver.command(&a, json!({ "op": "open", "remote": b.to_string() }))["pc"].as_u64().unwrap();
    let e = error_of(&driver.command(&a, json!({ "op": "accept-offer", "pc": pc, "sdp": broken, "remote": b.to_string() })));
    assert!(e.starts_with("malformed-sdp: "), "{e}");
    let e = error_of(&driver.command(&a, json!({ "op": "set-identity", "pc": pc, "assertion": assertion })));
    assert_eq!(e, "invalid: a remote SDP was already given: set the remote identity before accept-offer / accept-answer");
}

#[test]
fn an_idp_proxy_without_identity_binding_still_asserts_messages_and_its_peers_are_unauthenticated() {
    // bob.example requires identity (the default with an IdP): the call's
    // offer reaches b only with alice's assertion, made and validated by
    // the old proxy.
    let (_runtime, mut driver, _bundle, a, b) = deploy_identified("idp-jwt-unbound", json!({}));
    let call = driver.media_call(&a, &b, "chat");
    let (at_a, at_b) = &call.connected;
    assert_eq!(at_a["identity"], Value::Null, "{at_a}");
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

#[test]
fn frames_never_wait_for_a_full_inbox_they_are_dropped_and_counted_and_the_call_goes_on() {
    // b's inbox holds 4 messages, and 8 events waiting for it close the
    // connection: frames must not be among them.
    let (_runtime, mut driver, _bundle, a, b) = pair_with(json!({ "pending-events": 8 }), json!({ "limits": { "inbox": 4 } }));
    let (call, tracks) = driver.media_call_with_tracks(&a, &b, "control", json!([["audio", "opus"]]));
    let (pc_a, pc_b) = (call.caller.0, call.callee.0);
    let audio_b = driver.media_track(&b, pc_b, "audio")["track"].as_u64().unwrap();

    let sent = driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": tracks[0], "frames": 600, "size": 120, "step-us": 20 }));
    assert_eq!(sent, json!({ "written": 600 }));
    let is_stats = |v: &Value| v["event"] == "track-stats" && v["track"] == audio_b;
    let mut stats = driver.media_report(&b, 20, is_stats);
    // The last totals: none follows within 2.5 s (they come once a second
    // while frames arrive).
    while let Some(m) = driver.find(|m| m.from == b && is_stats(&reported(m)), Duration::from_millis(2500)) {
        stats = reported(&m);
    }
    let (frames, dropped) = (stats["frames"].as_u64().unwrap(), stats["dropped"].as_u64().unwrap());
    assert!(dropped > 0 && frames > dropped, "a burst of 600 into an inbox of 4 drops some, not all: {stats}");
    // The connection is open: a control event still reaches b.
    driver.command(&a, json!({ "op": "send", "pc": pc_a, "channel": call.caller.1, "text": "still open" }));
    assert_eq!(driver.media_report(&b, 10, |v| v["event"] == "channel-data")["text"], "still open");
    let closed = driver.endpoint.take_set_aside(|m| m.from == b && reported(m)["event"] == "closed");
    assert!(closed.is_empty(), "{closed:?}");
    // What b's hyperty saw and what was dropped add up to the frames received.
    let seen = driver.endpoint.take_set_aside(|m| m.from == b && reported(m)["event"] == "media").len() as u64;
    assert_eq!(seen + dropped, frames, "{stats}");
}

#[test]
fn a_flood_of_frames_to_a_hyperty_that_does_not_read_is_capped_charged_to_its_domain_and_other_messages_still_arrive() {
    // b's inbox holds 64 messages; the frames of one connection may take 16
    // of them (and 64 KiB), charged to b's memory while they wait.
    let runtime = runtime(Duration::from_secs(60));
    let mut driver = Driver::new(&runtime);
    let (cap, cap_bytes) = (16.0, f64::from(64 << 10));
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
        .domain("alice.example", media_domain(4, json!({})))
        .hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(false))
        .domain("bob.example", media_domain(4, json!({ "pending-frames": 16, "pending-frame-bytes": 64 << 10 })))
        .domain("bob.example", json!({ "limits": { "inbox": 64, "call-timeout-ms": 60_000 } }));
    runtime.deploy(&bundle.load()).expect("the pair deploys");
    let [a, b] = [("alice.example", "a"), ("bob.example", "b")].map(|(d, n)| runtime.lookup(d, n).unwrap());
    let (call, tracks) = driver.media_call_with_tracks(&a, &b, "control", json!([["video", "vp8"]]));
    let (pc_a, pc_b) = (call.caller.0, call.callee.0);
    let video_b = driver.media_track(&b, pc_b, "video")["track"].as_u64().unwrap();
    let inbox = |runtime: &Runtime| hyperty_tests::metrics::Samples::parse(&runtime.metrics_text()).get("hyperty_inbox_messages", &[("domain", "bob.example")]);
    wait_until("b has handled its events so far", || inbox(&runtime) == 0.0);

    // b stops reading (it sleeps in its handler) while a floods it.
    let stall = driver.endpoint.message(hyperty_host::MessageType::Execute, b.as_str()).value(json!({ "op": "stall", "ms": 5000 }).to_string()).build().unwrap();
    let stall_id = stall.id;
    driver.endpoint.request(stall, Some(Duration::from_secs(60))).unwrap();
    driver.media_report(&b, 10, |v| v["stalling"] == 5000);
    let memory_before = runtime.memory_used("bob.example").unwrap() as f64;
    let sent = driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": tracks[0], "frames": 600, "size": 1000, "step-us": 1000 }));
    assert_eq!(sent, json!({ "written": 600 }));
    // The stall command in hand, and the frames up to their cap.
    wait_until("b's frames reach their cap in its inbox", || inbox(&runtime) > cap);
    // Another message still finds room in b's inbox, and a's control event too.
    let ping = driver.endpoint.message(hyperty_host::MessageType::Execute, b.as_str()).value(json!({ "op": "candidates", "pc": pc_b }).to_string()).build().unwrap();
    let ping_id = ping.id;
    driver.endpoint.request(ping, Some(Duration::from_secs(60))).expect("b's inbox has room while frames flood it");
    driver.command(&a, json!({ "op": "send", "pc": pc_a, "channel": call.caller.1, "text": "still open" }));
    // Until b reads again, its inbox never holds more than the capped frames
    // (with the stall, the ping, a's text and a few track-stats), and the
    // frames' bytes are charged to b's memory, within their cap.
    let mut samples = 0;
    while driver.find(|m| m.kind == hyperty_host::MessageType::Response && m.id == stall_id, Duration::from_millis(20)).is_none() {
        let (queued, charged) = (inbox(&runtime), runtime.memory_used("bob.example").unwrap() as f64 - memory_before);
        if samples == 0 {
            assert!(charged > 0.0, "the waiting frames are charged to b's memory");
        }
        assert!(queued <= cap + 8.0, "b's inbox holds {queued} messages: frames past the cap of {cap}");
        assert!(charged <= cap_bytes, "{charged} bytes of frames charged: past the cap of {cap_bytes}");
        samples += 1;
    }
    assert!(samples > 0);
    // b reads again: the ping's answer, a's text and the totals arrive.
    driver.expect(|m| m.kind == hyperty_host::MessageType::Response && m.id == ping_id);
    assert_eq!(driver.media_report(&b, 10, |v| v["event"] == "channel-data")["text"], "still open");
    let is_stats = |v: &Value| v["event"] == "track-stats" && v["track"] == video_b;
    let mut stats = driver.media_report(&b, 20, is_stats);
    while let Some(m) = driver.find(|m| m.from == b && is_stats(&reported(m)), Duration::from_millis(2500)) {
        stats = reported(&m);
    }
    let (frames, dropped) = (stats["frames"].as_u64().unwrap(), stats["dropped"].as_u64().unwrap());
    let seen = driver.endpoint.take_set_aside(|m| m.from == b && reported(m)["event"] == "media").len() as u64;
    assert_eq!(seen + dropped, frames, "{stats}");
    assert!(dropped > 0, "a flood of 600 past a cap of 16 drops some: {stats}");
}

#[test]
fn opening_peer_connections_faster_than_opens_per_minute_is_refused_naming_the_setting() {
    // Each connection may call the IdP proxy (its assertion, the remote's):
    // opening and closing in a loop would drive the proxy without bound.
    let (_runtime, mut driver, _bundle, a, _b) = pair(json!({ "opens-per-minute": 3 }));
    for i in 0..3 {
        assert_eq!(driver.command(&a, json!({ "op": "open" }))["pc"], i);
        assert_eq!(driver.command(&a, json!({ "op": "close", "pc": i })), json!({ "ok": true }));
    }
    let e = error_of(&driver.command(&a, json!({ "op": "open" })));
    assert_eq!(e, "limit-reached: opens-per-minute: alice.example opens peer connections faster than 3 a minute (opens-per-minute = 3)");
}

#[test]
fn a_stun_server_of_the_host_configuration_gives_each_connection_a_server_reflexive_candidate_and_calls_connect() {
    // coturn behind a NAT (for its datagrams): it sees alice's socket as
    // 127.0.0.3:<port>, a server-reflexive address unlike the host one.
    let stun = StunServer::start();
    let nat = StunNat::start(stun.addr);
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
        .domain("alice.example", media_domain(4, json!({ "stun": [nat.inside.to_string()] })))
        .hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(true))
        .domain("bob.example", media_domain(4, json!({})));
    runtime.deploy(&bundle.load()).expect("a domain with a STUN server deploys");
    let [a, b] = [("alice.example", "a"), ("bob.example", "b")].map(|(d, n)| runtime.lookup(d, n).unwrap());

    let pc = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let learnt = driver.media_report(&a, 10, |v| v["event"] == "local-candidate" && v["pc"] == pc);
    let srflx = learnt["candidate"].as_str().unwrap().to_owned();
    let host = driver.command(&a, json!({ "op": "candidates", "pc": pc }))["candidates"][0].as_str().unwrap().to_owned();
    // (str0m writes no related address: `raddr 0.0.0.0 rport 0`.)
    assert!(srflx.contains(&format!(" 127.0.0.3 {} typ srflx", nat.outside.port())), "{srflx} (host {host})");
    // It is among the local candidates, and in the SDP the connection makes.
    assert_eq!(driver.command(&a, json!({ "op": "candidates", "pc": pc }))["candidates"], json!([host, srflx]));
    driver.command(&a, json!({ "op": "channel", "pc": pc, "label": "x" }));
    let offer = driver.command(&a, json!({ "op": "offer", "pc": pc }))["sdp"].as_str().unwrap().to_owned();
    assert!(offer.contains(&format!("a={srflx}")), "{offer}");
    // The STUN server's address and credentials never reach the guest: a
    // call through such connections still connects and talks.
    let call = driver.media_call(&a, &b, "chat");
    driver.command(&a, json!({ "op": "send", "pc": call.caller.0, "channel": call.caller.1, "text": "through" }));
    assert_eq!(driver.media_report(&a, 10, |v| v["event"] == "channel-data")["text"], "echo:through");
}

#[test]
fn a_stun_server_that_never_answers_gets_three_binding_requests_per_connection_and_calls_still_connect() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let runtime = runtime(Duration::from_secs(5));
    let mut driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
        .domain("alice.example", media_domain(4, json!({ "stun": [silent.local_addr().unwrap().to_string()] })))
        .hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(true))
        .domain("bob.example", media_domain(4, json!({})));
    runtime.deploy(&bundle.load()).unwrap();
    let [a, b] = [("alice.example", "a"), ("bob.example", "b")].map(|(d, n)| runtime.lookup(d, n).unwrap());
    let host = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    // RFC 8489 Binding requests, the same transaction sent again.
    let transaction = one_request_three_times(&silent, 0x001);
    let mut buf = [0u8; 2048];
    // The call connects on host candidates all the same.
    let call = driver.media_call(&a, &b, "chat");
    driver.command(&a, json!({ "op": "send", "pc": call.caller.0, "channel": call.caller.1, "text": "hi" }));
    assert_eq!(driver.media_report(&a, 10, |v| v["event"] == "channel-data")["text"], "echo:hi");
    // No fourth request of the first connection (its RTO is 500 ms: wait
    // past two of them); the call's own connection sends its own.
    silent.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    while let Ok((_, _)) = silent.recv_from(&mut buf) {
        assert_ne!(&buf[8..20], transaction, "a fourth Binding request of one transaction");
    }
    assert_eq!(driver.command(&a, json!({ "op": "candidates", "pc": host }))["candidates"].as_array().unwrap().len(), 1);
}

// TURN relays (RFC 8656), against Debian's coturn.

/// alice.example/a with the media `extra` settings (a TURN server), and
/// bob.example/b (echoing) with plain ones.
fn turn_pair(alice: Value) -> (Runtime, Driver, TestBundle, Address, Address) {
    let runtime = runtime(Duration::from_secs(5));
    let driver = Driver::new(&runtime);
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("media-peer"), media_peer_config(false))
        .domain("alice.example", media_domain(4, alice))
        .hyperty("bob.example", "b", &guest("media-peer"), media_peer_config(true))
        .domain("bob.example", media_domain(4, json!({})));
    runtime.deploy(&bundle.load()).expect("a domain with a TURN server deploys");
    let [a, b] = [("alice.example", "a"), ("bob.example", "b")].map(|(d, n)| runtime.lookup(d, n).unwrap());
    (runtime, driver, bundle, a, b)
}

/// The candidates of `peer`'s connection `pc`.
fn candidates_of(driver: &mut Driver, peer: &Address, pc: u64) -> Vec<String> {
    let got = driver.command(peer, json!({ "op": "candidates", "pc": pc }));
    got["candidates"].as_array().unwrap_or_else(|| panic!("{got}")).iter().map(|c| c.as_str().unwrap().to_owned()).collect()
}

#[test]
fn a_relay_only_hyperty_calls_through_coturn_and_data_and_video_flow_both_ways_over_the_relay() {
    let turn = TurnServer::start();
    let relay = json!({ "turn": [turn.entry(TurnServer::CREDENTIAL)], "ice-transport-policy": "relay" });
    let (_runtime, mut driver, _bundle, a, b) = turn_pair(relay);

    // A relay-only connection's one candidate is the relayed address coturn
    // allocated (in its relay ports): no host candidate, so whatever it
    // carries goes through the relay.
    let pc = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let learnt = driver.media_report(&a, 10, |v| v["event"] == "local-candidate" && v["pc"] == pc);
    let relayed = learnt["candidate"].as_str().unwrap().to_owned();
    let fields: Vec<&str> = relayed.split_whitespace().collect();
    assert_eq!((fields[4], fields[6], fields[7]), ("127.0.0.1", "typ", "relay"), "{relayed}");
    let port: u16 = fields[5].parse().unwrap();
    assert!(turn.relay_ports.contains(&port), "{relayed}: not in coturn's relay ports {:?}", turn.relay_ports);
    assert_eq!(candidates_of(&mut driver, &a, pc), std::slice::from_ref(&relayed));

    // A call from it, with a video track: the channel opens, text goes both
    // ways, and the caller's only candidate is a relayed one.
    let (call, tracks) = driver.media_call_with_tracks(&a, &b, "chat", json!([["video", "vp8"]]));
    let (pc_a, pc_b) = (call.caller.0, call.callee.0);
    let at_a = candidates_of(&mut driver, &a, pc_a);
    assert!(at_a.len() == 1 && at_a[0].contains(" typ relay "), "{at_a:?}");
    driver.command(&a, json!({ "op": "send", "pc": pc_a, "channel": call.caller.1, "text": "via coturn" }));
    assert_eq!(driver.media_report(&b, 10, |v| v["event"] == "channel-data")["text"], "via coturn");
    assert_eq!(driver.media_report(&a, 10, |v| v["event"] == "channel-data")["text"], "echo:via coturn");
    driver.command(&b, json!({ "op": "send", "pc": pc_b, "channel": call.callee.1, "text": "back" }));
    assert_eq!(driver.media_report(&a, 10, |v| v["event"] == "channel-data")["text"], "back");

    // Video a → b.
    let video_b = driver.media_track(&b, pc_b, "video")["track"].as_u64().unwrap();
    let sent = driver.command(&a, json!({ "op": "write", "pc": pc_a, "track": tracks[0], "frames": 10, "size": 3000, "step-us": 33_333 }));
    assert_eq!(sent, json!({ "written": 10 }));
    frames_until(&driver, &b, pc_b, video_b, 10, |v| assert_eq!(v["size"], 3000, "{v}"));
    // Video b → a, on a track b adds by renegotiation.
    let added = driver.command(&b, json!({ "op": "add-track", "pc": pc_b, "kind": "video", "codec": "vp8" }));
    let track_b = added["track"].as_u64().unwrap_or_else(|| panic!("{added}"));
    let reoffer = driver.command(&b, json!({ "op": "reoffer", "pc": pc_b, "peer": a.to_string(), "remote-pc": pc_a }));
    assert_eq!(reoffer, json!({ "ok": true }));
    assert_eq!(driver.media_report(&b, 10, |v| v["signal"].is_string() && v["pc"] == pc_b)["signal"], "answered");
    let video_a = driver.media_track(&a, pc_a, "video")["track"].as_u64().unwrap();
    let sent = driver.command(&b, json!({ "op": "write", "pc": pc_b, "track": track_b, "frames": 10, "size": 2000, "step-us": 33_333 }));
    assert_eq!(sent, json!({ "written": 10 }));
    frames_until(&driver, &a, pc_a, video_a, 10, |v| assert_eq!(v["size"], 2000, "{v}"));
    // Still one candidate at a: its relayed address carried all of it.
    assert_eq!(candidates_of(&mut driver, &a, pc_a).len(), 1);

    // The TURN server's credentials never reached a guest: not in the
    // SDP a connection makes, its candidates, nor any event either
    // hyperty saw (each forwards every one to the observer).
    driver.command(&a, json!({ "op": "channel", "pc": pc, "label": "x" }));
    let offer = driver.command(&a, json!({ "op": "offer", "pc": pc }))["sdp"].as_str().unwrap().to_owned();
    assert!(offer.contains(&format!("a={relayed}")), "{offer}");
    let mut seen = vec![offer, relayed, learnt.to_string()];
    for peer in [&a, &b] {
        // A command's answer comes after the reports of what its hyperty
        // handled before: those reached the observer, set aside.
        candidates_of(&mut driver, peer, 0);
        seen.extend(driver.endpoint.take_set_aside(|m| &m.from == peer).iter().map(|m| m.body.value.as_deref().unwrap_or_default().to_owned()));
    }
    assert!(seen.len() > 20, "the events of the call: {}", seen.len());
    for text in &seen {
        assert!(!text.contains(TurnServer::USERNAME) && !text.contains(TurnServer::CREDENTIAL), "a guest saw the TURN credentials: {text}");
    }
}

#[test]
fn wrong_turn_credentials_close_a_relay_only_connection_naming_the_server_and_the_401_and_an_all_one_still_connects() {
    let turn = TurnServer::start();
    let wrong = json!({ "turn": [turn.entry("not-the-credential")], "ice-transport-policy": "relay" });
    let (_runtime, mut driver, _bundle, a, _b) = turn_pair(wrong);
    let pc = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let closed = driver.media_report(&a, 10, |v| v["event"] == "closed" && v["pc"] == pc);
    let reason = closed["reason"].as_str().unwrap();
    let refused = format!("the TURN server {} refused the allocation: 401 Unauthorized twice: the username or credential is wrong", turn.addr);
    assert!(reason.contains(&refused), "{reason}");
    assert!(reason.contains("ice-transport-policy is relay"), "{reason}");
    assert!(!reason.contains(TurnServer::USERNAME) && !reason.contains("not-the-credential"), "{reason}");
    let e = error_of(&driver.command(&a, json!({ "op": "channel", "pc": pc, "label": "x" })));
    assert!(e.starts_with("closed: no TURN relay is left"), "{e}");

    // With `all`, the same refused server leaves the host candidate: calls
    // connect over it.
    let all = json!({ "turn": [turn.entry("not-the-credential")] });
    let (_runtime2, mut driver, _bundle2, c, b2) = turn_pair(all);
    let call = driver.media_call(&c, &b2, "chat");
    driver.command(&c, json!({ "op": "send", "pc": call.caller.0, "channel": call.caller.1, "text": "direct" }));
    assert_eq!(driver.media_report(&c, 10, |v| v["event"] == "channel-data")["text"], "echo:direct");
    let at_c = candidates_of(&mut driver, &c, call.caller.0);
    assert!(at_c.len() == 1 && at_c[0].contains(" typ host "), "{at_c:?}");
}

/// Three STUN requests (class request, `method`, the magic cookie) of one
/// transaction that `silent` received: the transaction id.
fn one_request_three_times(silent: &std::net::UdpSocket, method: u8) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    let mut transaction = None;
    for _ in 0..3 {
        let (n, _) = silent.recv_from(&mut buf).expect("a request");
        assert_eq!((&buf[..2], &buf[4..8]), (&[0u8, method][..], &[0x21u8, 0x12, 0xA4, 0x42][..]), "{:?}", &buf[..n]);
        let id = buf[8..20].to_vec();
        assert_eq!(transaction.get_or_insert_with(|| id.clone()), &id, "one transaction, retransmitted");
    }
    transaction.unwrap()
}

#[test]
fn a_turn_server_that_never_answers_gets_three_allocate_requests_then_a_relay_only_connection_closes() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let entry = json!({ "server": silent.local_addr().unwrap().to_string(), "username": "u", "credential": "c" });
    let (_runtime, mut driver, _bundle, a, _b) = turn_pair(json!({ "turn": [entry], "ice-transport-policy": "relay" }));
    let pc = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    // RFC 8656 Allocate requests, one transaction sent again.
    one_request_three_times(&silent, 0x003);
    let mut buf = [0u8; 2048];
    let closed = driver.media_report(&a, 10, |v| v["event"] == "closed" && v["pc"] == pc);
    let reason = closed["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("the TURN server {} gave no allocation", silent.local_addr().unwrap())), "{reason}");
    // No fourth request: the socket closed with the connection.
    silent.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    assert!(silent.recv_from(&mut buf).is_err(), "a fourth Allocate request");
}

/// A scripted TURN server on `server`: answers the first Allocate request
/// 401 (REALM, NONCE) and returns the authenticated one that follows, and
/// where it came from (other requests are not answered).
fn authenticated_allocate(server: &std::net::UdpSocket) -> (Vec<u8>, std::net::SocketAddr) {
    use stun_types::attribute::{ErrorCode, Nonce, Realm};
    use stun_types::message::{Message, MessageWrite, MessageWriteExt, MessageWriteVec};
    let mut buf = [0u8; 2048];
    let mut challenged = None;
    loop {
        let (n, from) = server.recv_from(&mut buf).expect("an Allocate request");
        let m = Message::from_bytes(&buf[..n]).expect("STUN");
        if m.method().value() != 0x003 {
            // An earlier connection's release, sent again.
            continue;
        }
        match challenged {
            Some(id) if id != m.transaction_id() => return (buf[..n].to_vec(), from),
            Some(_) => {}
            None => {
                let mut e = Message::builder_error(&m, MessageWriteVec::new());
                e.add_attribute(&ErrorCode::new(401, "Unauthorized").unwrap()).unwrap();
                e.add_attribute(&Realm::new("hyperty.test").unwrap()).unwrap();
                e.add_attribute(&Nonce::new("n0nce").unwrap()).unwrap();
                server.send_to(&e.finish(), from).unwrap();
                challenged = Some(m.transaction_id());
            }
        }
    }
}

/// The signed success the scripted server answers `request` with (a
/// relayed address, LIFETIME 600).
fn allocated(request: &[u8], from: std::net::SocketAddr) -> Vec<u8> {
    use stun_types::attribute::XorMappedAddress;
    use stun_types::message::{
        IntegrityAlgorithm, LongTermKeyCredentials, Message, MessageIntegrityCredentials, MessageWrite, MessageWriteExt, MessageWriteVec,
    };
    let m = Message::from_bytes(request).unwrap();
    let mut w = Message::builder_success(&m, MessageWriteVec::new());
    let id = m.transaction_id();
    // XOR-RELAYED-ADDRESS (0x0016) is XOR-MAPPED-ADDRESS's encoding under another type.
    let relayed = XorMappedAddress::new("127.0.0.1:50999".parse().unwrap(), id);
    let value = stun_types::attribute::RawAttribute::from(&relayed).value.to_vec();
    w.add_attribute(&stun_types::attribute::RawAttribute::new(0x0016.into(), &value)).unwrap();
    w.add_attribute(&stun_types::attribute::RawAttribute::new(0x000D.into(), &600u32.to_be_bytes())).unwrap();
    w.add_attribute(&XorMappedAddress::new(from, id)).unwrap();
    let key = MessageIntegrityCredentials::LongTerm(LongTermKeyCredentials::new("u".into(), "c".into(), "hyperty.test".into()));
    w.add_message_integrity(&key, IntegrityAlgorithm::Sha1).unwrap();
    w.finish()
}

/// The LIFETIME of the next Refresh request the scripted server receives.
fn refresh_lifetime(server: &std::net::UdpSocket) -> u32 {
    let mut buf = [0u8; 2048];
    loop {
        let (n, _) = server.recv_from(&mut buf).expect("a Refresh request");
        let m = stun_types::message::Message::from_bytes(&buf[..n]).expect("STUN");
        if m.method().value() == 0x004 {
            let lifetime = m.raw_attribute(0x000D.into()).expect("a LIFETIME");
            return u32::from_be_bytes(lifetime.value.as_ref().try_into().unwrap());
        }
    }
}

#[test]
fn an_allocation_still_in_flight_when_its_connection_closes_or_its_runtime_stops_is_released_once_granted() {
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let entry = json!({ "server": server.local_addr().unwrap().to_string(), "username": "u", "credential": "c" });
    let (runtime, mut driver, _bundle, a, _b) = turn_pair(json!({ "turn": [entry], "ice-transport-policy": "relay" }));
    // Closed by its hyperty while the authenticated Allocate waits.
    let pc = driver.command(&a, json!({ "op": "open" }))["pc"].as_u64().unwrap();
    let (request, from) = authenticated_allocate(&server);
    driver.command(&a, json!({ "op": "close", "pc": pc }));
    driver.media_report(&a, 10, |v| v["event"] == "closed" && v["pc"] == pc);
    server.send_to(&allocated(&request, from), from).unwrap();
    assert_eq!(refresh_lifetime(&server), 0, "the late allocation released");
    // The runtime stops (the domain's media thread with it) while another waits.
    driver.command(&a, json!({ "op": "open" }));
    let (request, from) = authenticated_allocate(&server);
    let stopping = std::thread::spawn(move || drop(runtime));
    server.send_to(&allocated(&request, from), from).unwrap();
    assert_eq!(refresh_lifetime(&server), 0, "released as the runtime stops");
    stopping.join().unwrap();
}

#[test]
fn turn_settings_are_checked_at_load_naming_the_domain_and_the_field() {
    let entry = |server: &str| json!({ "server": server, "username": "u", "credential": "c" });
    for (media, why) in [
        (json!({ "turn": [entry("turn.example:3478")] }), "media: turn[0].server: \"turn.example:3478\" is not an ip:port"),
        (json!({ "turn": (1..=5).map(|i| entry(&format!("127.0.0.{i}:3478"))).collect::<Vec<_>>() }), "media: turn: 5 servers, at most 4"),
        (json!({ "turn": [{ "server": "127.0.0.1:3478", "credential": "c" }] }), "media: turn[0].username: missing"),
        (json!({ "turn": [entry("127.0.0.1:3478"), { "server": "127.0.0.1:3479", "username": "u" }] }), "media: turn[1].credential: missing"),
        (json!({ "ice-transport-policy": "relay" }), "media: ice-transport-policy: \"relay\" needs at least one `turn` server"),
    ] {
        let bundle = TestBundle::new()
            .hyperty("carol.example", "c", &guest("media-peer"), media_peer_config(false))
            .domain("carol.example", media_domain(4, media));
        let e = hyperty_host::Bundle::load(bundle.write()).unwrap_err().to_string();
        assert!(e.contains("carol.example") && e.contains(why), "{why}: {e}");
    }
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
    let with_stubs = |bundle: TestBundle| through_nats(bundle, &servers);
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

    let pc = call_through_nats(&mut driver, &a, &b, json!({ "identity": true }));
    let at_a = driver.media_report(&a, 10, |v| v["event"] == "connected" && v["pc"] == pc);
    assert_eq!(at_a["identity"], json!({ "user": "bob@idp.example", "idp": IDP }), "{at_a}");
    let at_b = driver.media_report(&b, 10, |v| v["event"] == "connected");
    assert_eq!(at_b["identity"], json!({ "user": "alice@idp.example", "idp": IDP }), "{at_b}");
}
