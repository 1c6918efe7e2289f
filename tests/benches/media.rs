//! `just bench` → media: WebRTC between hyperties (str0m held by the host)
//! beside two bare str0m peers driven in this process, measured in the same
//! run (the floor: what the sandbox, the bus and the host's task cost).
//!
//! - time to a connected data channel: from the offer to the channel open
//!   on both sides (hyperties: the caller's `call` command to both
//!   `channel-open` events reaching the test's observer);
//! - data-channel throughput, MB/s, 1 KiB and 16 KiB binary messages, the
//!   sender refilling whenever `buffered-low` says so, the receiver
//!   counting every byte (a hyperty: in its guest);
//! - the in-host forward (two-party SFU): alice's hyperty writes 1000-byte
//!   VP8 frames (one RTP packet each) to a relay hyperty, whose host
//!   forwards them to bob's connection, paced at [`RATE`] frames a second
//!   (batches of [`BATCH`]: a burst of 20,000 outran the loopback socket
//!   buffers and measured their drops, not the forward): packets forwarded
//!   per second over the sending window, lost ones, and CPU time of the
//!   relay domain's media thread (from `/proc/self/task/*/stat`) per 1,000
//!   packets; beside it the floor, a bare str0m relay in this process
//!   (receive, depacketise, write to the other connection, packetise,
//!   send) fed at the same pace, its CPU measured around its own work
//!   (`CLOCK_THREAD_CPUTIME_ID`);
//! - through a TURN relay (Debian's coturn on loopback; the caller's domain
//!   `ice-transport-policy = "relay"`) beside the same call direct, in one
//!   fresh runtime: data-channel MB/s (16 KiB messages) and video frames a
//!   second reaching the callee (1000-byte VP8 frames paced at [`RATE`]);
//! - hyperty ↔ headless Chromium, inside a private network namespace as the
//!   tests run it: time from the page's offer to its channel open, and the
//!   MB/s a hyperty sends the page (1 KiB and 16 KiB messages).
//!
//! Run in the dev profile while developing (`cargo bench -p hyperty-tests
//! --bench media --profile dev`); `just bench` builds it in release. The
//! machines are shared and noisy: read the ratio, not the absolute numbers.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyperty_tests::media::*;
use hyperty_tests::*;
use serde_json::{Value, json};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

const RUNS: usize = 5;
/// Bytes sent per throughput run.
const TOTAL: usize = 8 << 20;
/// Frames the SFU run forwards, written in batches of [`BATCH`] at
/// [`RATE`] frames a second (a 1000-byte frame each: ~33 Mbit/s).
const FRAMES: u64 = 20_000;
const BATCH: u64 = 40;
const RATE: u64 = 4_000;
/// Frames the TURN leg sends on each call (direct, relayed).
const TURN_FRAMES: u64 = 8_000;

fn main() {
    let runtime = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&runtime);
    let media = json!({ "peer-connections": 64, "bytes-per-second": 2_000_000_000u32, "media-bytes-per-second": 2_000_000_000u32, "pending-events": 100_000 });
    let mut bundle = TestBundle::new();
    for (domain, name) in [("alice.example", "a"), ("relay.example", "r"), ("bob.example", "b")] {
        bundle = bundle.hyperty(domain, name, &guest("media-peer"), media_peer_config(false)).domain(domain, media_domain(200, media.clone()));
    }
    runtime.deploy(&bundle.load()).expect("the bench deploys");
    let [a, r, b] = [("alice.example", "a"), ("relay.example", "r"), ("bob.example", "b")].map(|(d, n)| runtime.lookup(d, n).unwrap());

    // Time to a connected data channel.
    let mut hyperty_ms = Vec::new();
    let mut bare_ms = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let call = driver.media_call(&a, &b, "bench");
        hyperty_ms.push(start.elapsed().as_secs_f64() * 1e3);
        driver.command(&a, json!({ "op": "close", "pc": call.caller.0 }));
        driver.command(&b, json!({ "op": "close", "pc": call.callee.0 }));
        bare_ms.push(Bare::connected().2);
    }
    let (h, f) = (median(hyperty_ms), median(bare_ms));
    println!("media (str0m 0.25), loopback, median of {RUNS}:");
    println!("                                  hyperties     bare str0m   ratio");
    println!("  to a connected data channel:  {h:>8.1} ms   {f:>8.1} ms   {:.1}x", h / f);

    // Data-channel throughput.
    let call = driver.media_call(&a, &b, "bulk");
    let (mut pair, channel, _) = Bare::connected();
    for size in [1024usize, 16 << 10] {
        let count = TOTAL / size;
        let mut hyperty = Vec::new();
        let mut bare = Vec::new();
        for _ in 0..RUNS {
            driver.command(&b, json!({ "op": "sink", "messages": count }));
            let start = Instant::now();
            let sent = driver.command(&a, json!({ "op": "blast", "pc": call.caller.0, "channel": call.caller.1, "size": size, "count": count }));
            assert_eq!(sent, json!({ "ok": true }));
            let done = driver.media_report(&b, 300, |v| v["sink"] == "done");
            assert_eq!(done["bytes"].as_u64(), Some((count * size) as u64), "{done}");
            hyperty.push((count * size) as f64 / start.elapsed().as_secs_f64() / 1e6);
            bare.push(pair.throughput(channel, size, count));
        }
        let (h, f) = (median(hyperty), median(bare));
        println!("  data channel, {:>2} KiB messages: {h:>8.1} MB/s {f:>8.1} MB/s {:.0}%", size >> 10, 100.0 * h / f);
    }

    // The in-host forward: a → r → b.
    let (call_in, a_tracks) = driver.media_call_with_tracks(&a, &r, "in", json!([["video", "vp8"]]));
    let from = driver.media_track(&r, call_in.callee.0, "video")["track"].as_u64().unwrap();
    let (call_out, r_tracks) = driver.media_call_with_tracks(&r, &b, "out", json!([["video", "vp8"]]));
    let at_b = driver.media_track(&b, call_out.callee.0, "video")["track"].as_u64().unwrap();
    let forward = json!({ "op": "forward", "pc": call_in.callee.0, "track": from, "to": call_out.caller.0, "to-track": r_tracks[0] });
    assert_eq!(driver.command(&r, forward), json!({ "ok": true }));
    driver.command(&b, json!({ "op": "deliver-frames", "pc": call_out.callee.0, "track": at_b, "on": false }));
    let cpu_before = thread_cpu("media relay.exa");
    let start = Instant::now();
    let mut written = 0;
    while written < FRAMES {
        pace(start, written);
        let at = written * 1_000_000 / RATE;
        let w = driver.command(&a, json!({ "op": "write", "pc": call_in.caller.0, "track": a_tracks[0], "frames": BATCH, "size": 1000, "at-us": at, "step-us": 1_000_000 / RATE }));
        assert_eq!(w, json!({ "written": BATCH }));
        written += BATCH;
    }
    let window = start.elapsed().as_secs_f64();
    let relayed = last_stats(&driver, &r, |_| true);
    let cpu = thread_cpu("media relay.exa") - cpu_before;
    let received = last_stats(&driver, &b, |_| true);
    let forwarded = relayed["forwarded"].as_u64().unwrap_or(0);
    let got = received["frames"].as_u64().unwrap_or(0);
    let floor = sfu_floor();
    println!("  SFU forward, 1000-byte frames (1 packet each), paced at {RATE}/s:");
    println!("                                  hyperties     bare str0m");
    println!("  packets/s forwarded:          {:>8.0}      {:>8.0}", forwarded as f64 / window, floor.forwarded as f64 / floor.window);
    println!("  relay CPU per 1,000 packets:  {:>8.1} ms   {:>8.1} ms", cpu * 1e6 / forwarded.max(1) as f64, floor.cpu * 1e6 / floor.forwarded.max(1) as f64);
    println!("  of {FRAMES}: reached the relay {forwarded} / {}, reached bob {got} / {}", floor.forwarded, floor.received);

    turn_leg(&media);

    // Headless Chromium ↔ a hyperty, inside a private network namespace
    // (its own thread: the namespace is the thread's and its children's).
    std::thread::spawn(move || chromium_leg(media)).join().unwrap();
}

/// The last `track-stats` event of `peer` matching `pred`: the totals come
/// at most once a second, so the last is the one after which none comes
/// for 2.5 s.
fn last_stats(driver: &Driver, peer: &hyperty_host::Address, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    while let Some(m) = driver.find(|m| &m.from == peer && reported(m)["event"] == "track-stats" && pred(&reported(m)), Duration::from_millis(2500)) {
        last = reported(&m);
    }
    last
}

/// The same call from alice (direct) and from carol (relay-only, through
/// Debian's coturn on loopback) to bob, in a fresh runtime: data-channel
/// MB/s of 16 KiB messages, then [`TURN_FRAMES`] 1000-byte VP8 frames
/// paced at [`RATE`] and the frames a second that reached bob.
fn turn_leg(media: &Value) {
    let turn = TurnServer::start();
    let runtime = runtime(Duration::from_secs(10));
    let mut driver = Driver::new(&runtime);
    let mut relayed = media.clone();
    relayed["turn"] = json!([turn.entry(TurnServer::CREDENTIAL)]);
    relayed["ice-transport-policy"] = json!("relay");
    let mut bundle = TestBundle::new();
    for (domain, name, settings) in [("alice.example", "a", media), ("carol.example", "c", &relayed), ("bob.example", "b", media)] {
        bundle = bundle.hyperty(domain, name, &guest("media-peer"), media_peer_config(false)).domain(domain, media_domain(8, settings.clone()));
    }
    runtime.deploy(&bundle.load()).expect("the TURN leg deploys");
    let [a, c, b] = [("alice.example", "a"), ("carol.example", "c"), ("bob.example", "b")].map(|(d, n)| runtime.lookup(d, n).unwrap());
    let mut rows = Vec::new();
    for caller in [&a, &c] {
        let (call, tracks) = driver.media_call_with_tracks(caller, &b, "turn", json!([["video", "vp8"]]));
        let (pc_b, size) = (call.callee.0, 16usize << 10);
        let at_b = driver.media_track(&b, pc_b, "video")["track"].as_u64().unwrap();
        driver.command(&b, json!({ "op": "deliver-frames", "pc": pc_b, "track": at_b, "on": false }));
        driver.command(&b, json!({ "op": "sink", "messages": TOTAL / size }));
        let start = Instant::now();
        let sent = driver.command(caller, json!({ "op": "blast", "pc": call.caller.0, "channel": call.caller.1, "size": size, "count": TOTAL / size }));
        assert_eq!(sent, json!({ "ok": true }));
        driver.media_report(&b, 300, |v| v["sink"] == "done");
        let mbps = TOTAL as f64 / start.elapsed().as_secs_f64() / 1e6;
        let start = Instant::now();
        let mut written = 0;
        while written < TURN_FRAMES {
            pace(start, written);
            let at = written * 1_000_000 / RATE;
            let w = driver.command(caller, json!({ "op": "write", "pc": call.caller.0, "track": tracks[0], "frames": BATCH, "size": 1000, "at-us": at, "step-us": 1_000_000 / RATE }));
            assert_eq!(w, json!({ "written": BATCH }));
            written += BATCH;
        }
        let window = start.elapsed().as_secs_f64();
        let got = last_stats(&driver, &b, |v| v["pc"] == pc_b)["frames"].as_u64().unwrap_or(0);
        rows.push((mbps, got as f64 / window, got));
        driver.command(caller, json!({ "op": "close", "pc": call.caller.0 }));
        driver.command(&b, json!({ "op": "close", "pc": pc_b }));
    }
    let [(dm, df, dg), (rm, rf, rg)] = [rows[0], rows[1]];
    println!("  through a TURN relay (coturn, loopback; the caller relay-only):");
    println!("                                  direct        relayed      ratio");
    println!("  data channel, 16 KiB messages: {dm:>8.1} MB/s {rm:>8.1} MB/s  {:.0}%", 100.0 * rm / dm);
    println!("  video frames/s reaching bob:  {df:>8.0}      {rf:>8.0}       {:.0}%", 100.0 * rf / df);
    println!("  of {TURN_FRAMES} frames paced at {RATE}/s: reached bob {dg} direct, {rg} relayed");
}

/// A page in Chromium offers a data channel to bob's hyperty (a fresh
/// runtime in a private network namespace, as the tests do): the time from
/// the page's offer to the channel open at the page (its clock: gathering,
/// the offer's POST, the hyperty's answer, ICE, DTLS, SCTP), then MB/s the
/// hyperty sends it (`blast`, 1 KiB and 16 KiB messages) until the page
/// has counted [`TOTAL`] bytes more.
fn chromium_leg(media: Value) {
    hyperty_tests::browser::ensure_chromium();
    let page = offering_page(
        &format!(
            r#"const t0 = performance.now();
    const ch = pc.createDataChannel("bench");
    ch.binaryType = "arraybuffer";
    ch.onopen = () => post("/result", JSON.stringify({{ open_ms: performance.now() - t0 }}));
    let got = 0, next = {TOTAL};
    ch.onmessage = (e) => {{
      got += e.data.byteLength ?? e.data.length;
      if (got >= next) {{ post("/result", JSON.stringify({{ got }})); next += {TOTAL}; }}
    }};"#
        ),
        "",
    );
    let mut call = match ChromiumCall::start(page, media_peer_config(false), media) {
        Ok(call) => call,
        Err(why) => return println!("  hyperty ↔ Chromium: SKIPPED, no private network namespace here ({why})"),
    };
    let open_ms = call.result()["open_ms"].as_f64().unwrap();
    let (b, pc) = (call.b.clone(), call.pc);
    let channel = call.driver.media_report(&b, 10, |v| v["event"] == "channel-open" && v["pc"] == pc)["channel"].as_u64().unwrap();
    println!("  hyperty ↔ Chromium (network namespace):");
    println!("  to a connected data channel (page's offer to open, one run): {open_ms:.1} ms");
    for size in [1024usize, 16 << 10] {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            let start = Instant::now();
            let sent = call.driver.command(&b, json!({ "op": "blast", "pc": pc, "channel": channel, "size": size, "count": TOTAL / size }));
            assert_eq!(sent, json!({ "ok": true }));
            call.result();
            runs.push(TOTAL as f64 / start.elapsed().as_secs_f64() / 1e6);
        }
        println!("  data channel to Chromium, {:>2} KiB messages: {:.1} MB/s (median of {RUNS})", size >> 10, median(runs));
    }
}

/// Sleeps until the batch starting at frame `written` is due at [`RATE`].
fn pace(start: Instant, written: u64) {
    let due = start + Duration::from_micros(written * 1_000_000 / RATE);
    if let Some(wait) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

/// What the bare relay did: frames it forwarded, frames the receiver got,
/// the sending window (s) and the relay's CPU seconds.
struct Floor {
    forwarded: u64,
    received: u64,
    window: f64,
    cpu: f64,
}

/// The SFU floor: bare peers a → r_in, r_out → b in this process, r_in's
/// frames written to r_out as the host's forward does (`match_params`),
/// a's frames paced like the hyperty's; CPU counted around the relay's
/// two peers only.
fn sfu_floor() -> Floor {
    let (mut inbound, mid_a) = Bare::media_pair();
    let (mut outbound, mid_out) = Bare::media_pair();
    let (mut forwarded, mut received, mut written, mut cpu) = (0u64, 0u64, 0u64, 0.0);
    let frame = vec![1u8; 1000];
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    let mut last_frame = Instant::now();
    // Until every frame is written and none has come for a second.
    while written < FRAMES || last_frame.elapsed() < Duration::from_secs(1) {
        assert!(Instant::now() < deadline, "the bare relay made no progress within 120 s");
        let due = written < FRAMES && start + Duration::from_micros(written * 1_000_000 / RATE) <= Instant::now();
        if due {
            let vp8 = |p: &&str0m::format::PayloadParams| p.spec().codec == str0m::format::Codec::Vp8;
            let pt = inbound.peers[0].rtc.writer(mid_a).unwrap().payload_params().find(vp8).unwrap().pt();
            for n in written..written + BATCH {
                let mut f = frame.clone();
                f[0] = u8::from(n > 0);
                let at = str0m::media::MediaTime::from_micros(n * 1_000_000 / RATE);
                inbound.peers[0].rtc.writer(mid_a).unwrap().write(pt, Instant::now(), at, f).unwrap();
                let _ = inbound.peers[0].rtc.handle_input(Input::Timeout(Instant::now()));
                inbound.peers[0].poll(&mut inbound.events[0]);
            }
            written += BATCH;
        }
        let mut moved = inbound.peers[0].step(&mut inbound.events[0]);
        let before = thread_cpu_now();
        moved |= inbound.peers[1].step(&mut inbound.events[1]);
        for e in inbound.events[1].drain(..) {
            if let Event::MediaData(d) = e {
                let w = outbound.peers[0].rtc.writer(mid_out).unwrap();
                let pt = w.match_params(d.params).unwrap();
                w.write(pt, d.network_time, d.time, d.data).unwrap();
                let _ = outbound.peers[0].rtc.handle_input(Input::Timeout(Instant::now()));
                outbound.peers[0].poll(&mut outbound.events[0]);
                forwarded += 1;
                last_frame = Instant::now();
            }
        }
        moved |= outbound.peers[0].step(&mut outbound.events[0]);
        cpu += thread_cpu_now() - before;
        moved |= outbound.peers[1].step(&mut outbound.events[1]);
        received += outbound.events[1].drain(..).filter(|e| matches!(e, Event::MediaData(_))).count() as u64;
        outbound.events[0].clear();
        inbound.events[0].clear();
        if !moved && !due {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    Floor { forwarded, received, window: last_frame.duration_since(start).as_secs_f64(), cpu }
}

/// CPU seconds this thread has used (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_now() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU seconds (user + system) of this process's thread named `name` (as
/// `/proc` shows it: 15 characters at most).
fn thread_cpu(name: &str) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the `(comm)`: state is the 3rd field, utime the 14th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (utime, stime): (f64, f64) = (fields[11].parse().unwrap_or(0.0), fields[12].parse().unwrap_or(0.0));
        total += (utime + stime) / ticks;
    }
    total
}

/// A bare str0m peer on a loopback UDP socket, driven by [`Pair::pump`].
struct Bare {
    rtc: Rtc,
    socket: UdpSocket,
    addr: SocketAddr,
}

impl Bare {
    fn new() -> Bare {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let mut rtc = Rtc::builder().set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags())).build(Instant::now());
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        Bare { rtc, socket, addr }
    }

    /// Two bare peers with one data channel open on both sides: the pair,
    /// the channel's id at the offerer, and the milliseconds it took.
    fn connected() -> (Pair, ChannelId, f64) {
        let mut pair = Pair { peers: [Bare::new(), Bare::new()], events: [Vec::new(), Vec::new()] };
        let start = Instant::now();
        let mut api = pair.peers[0].rtc.sdp_api();
        let channel = api.add_channel("bench".into());
        let (offer, pending) = api.apply().unwrap();
        let answer = pair.peers[1].rtc.sdp_api().accept_offer(offer).unwrap();
        pair.peers[0].rtc.sdp_api().accept_answer(pending, answer).unwrap();
        let open = |e: &Event| matches!(e, Event::ChannelOpen(..));
        pair.pump(|p| p.events[0].iter().any(open) && p.events[1].iter().any(open));
        let ms = start.elapsed().as_secs_f64() * 1e3;
        pair.peers[0].rtc.channel(channel).unwrap().set_buffered_amount_low_threshold(64 << 10);
        (pair, channel, ms)
    }

    /// Two bare peers connected with one video m-line (VP8 among its
    /// codecs) sent by the offerer: the pair and that m-line's `Mid`.
    fn media_pair() -> (Pair, str0m::media::Mid) {
        let mut pair = Pair { peers: [Bare::new(), Bare::new()], events: [Vec::new(), Vec::new()] };
        let mut api = pair.peers[0].rtc.sdp_api();
        let mid = api.add_media(str0m::media::MediaKind::Video, str0m::media::Direction::SendOnly, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        let answer = pair.peers[1].rtc.sdp_api().accept_offer(offer).unwrap();
        pair.peers[0].rtc.sdp_api().accept_answer(pending, answer).unwrap();
        let connected = |e: &Event| matches!(e, Event::Connected);
        pair.pump(|p| p.events[0].iter().any(connected) && p.events[1].iter().any(connected));
        pair.clear();
        (pair, mid)
    }
}

impl Bare {
    /// Gives str0m the time and the datagrams waiting, sends what it says
    /// and keeps its events; whether anything moved.
    fn step(&mut self, events: &mut Vec<Event>) -> bool {
        let mut buf = [0u8; 2048];
        let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
        let mut moved = self.poll(events);
        // One datagram at a time, each followed by str0m's outputs (as the
        // host does): its DTLS receive queue is bounded.
        while let Ok((n, source)) = self.socket.recv_from(&mut buf) {
            let contents = buf[..n].try_into().unwrap();
            let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination: self.addr, contents });
            self.rtc.handle_input(input).unwrap();
            self.poll(events);
            moved = true;
        }
        moved
    }

    /// Sends what str0m says and keeps its events; whether anything came.
    fn poll(&mut self, events: &mut Vec<Event>) -> bool {
        let mut moved = false;
        loop {
            match self.rtc.poll_output().unwrap() {
                Output::Transmit(t) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Output::Event(e) => events.push(e),
                Output::Timeout(_) => return moved,
            }
            moved = true;
        }
    }
}

/// Two bare peers and the events each gave.
struct Pair {
    peers: [Bare; 2],
    events: [Vec<Event>; 2],
}

impl Pair {
    fn clear(&mut self) {
        self.events = [Vec::new(), Vec::new()];
    }

    /// Sends `count` messages of `size` bytes from the offerer, refilling
    /// on `buffered-low` like the hyperty; MB/s until the answerer got all.
    fn throughput(&mut self, channel: ChannelId, size: usize, count: usize) -> f64 {
        self.clear();
        let data = vec![7u8; size];
        let (mut left, mut got) = (count, 0usize);
        let start = Instant::now();
        let mut fill = true;
        self.pump(|p| {
            if fill || p.events[0].iter().any(|e| matches!(e, Event::ChannelBufferedAmountLow(_))) {
                let mut ch = p.peers[0].rtc.channel(channel).unwrap();
                while left > 0 && ch.write(true, &data).unwrap() {
                    left -= 1;
                }
                fill = false;
            }
            got += p.events[1].iter().map(|e| if let Event::ChannelData(d) = e { d.data.len() } else { 0 }).sum::<usize>();
            p.clear();
            got >= count * size
        });
        (count * size) as f64 / start.elapsed().as_secs_f64() / 1e6
    }

    /// Feeds both peers their datagrams and the time, and sends what they
    /// say, until `done` (given the events so far) is true; sleeps 50 µs
    /// when nothing moved (this is a bench's loop, not the product's).
    fn pump(&mut self, mut done: impl FnMut(&mut Pair) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done(self) {
            assert!(Instant::now() < deadline, "the bare peers made no progress within 120 s");
            let mut moved = false;
            for (peer, events) in self.peers.iter_mut().zip(self.events.iter_mut()) {
                moved |= peer.step(events);
            }
            if !moved {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}
