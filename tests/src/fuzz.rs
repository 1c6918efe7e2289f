//! Fuzz targets (issue #19): one function per input the outside can give a
//! runtime, each taking arbitrary bytes. A target fails by panicking (a
//! panic on any runtime thread aborts under the fuzzer), hanging (the
//! fuzzer's timeout) or growing without bound (its RSS limit); an input the
//! runtime refuses with an error is a pass. The runtime targets return what
//! the runtime answered, so a test can check that an input reached it.
//!
//! The same functions serve `tests/fuzz` (libFuzzer through cargo-fuzz:
//! `just fuzz`, coverage-guided, for long runs) and `tests/tests/fuzz.rs`,
//! which replays every committed corpus and crash input in a plain `cargo
//! test` and then mutates the corpus for a bounded time ([`mutate`]): CI's
//! fuzzing, run without the instrumented build (whose dependencies take
//! longer to compile than CI's whole budget allows). The targets that need a
//! runtime share one, built on first use ([`World`]): inputs reach it the
//! way they would in production, through real components.
//!
//! - [`manifest`]: a bundle manifest, as `hyperty run`/`check` read it;
//! - [`policies`]: a Cedar policy file, checked, applied to a domain and
//!   evaluated for one message;
//! - [`guest_message`]: a message a hyperty sends, built from the bytes and
//!   sent by the `puppet` component through its `bus` import;
//! - [`envelope`]: a protostub envelope, posted into the host by the
//!   `forging-stub` component (whoever can publish on a domain's node);
//! - [`assertion`]: an identity assertion on a message from another domain,
//!   validated by the receiving domain's JWT IdP proxy (`idp-jwt`);
//! - [`patch`]: a JSON Patch (RFC 6902) a reporter applies to its synced data
//!   object through the syncher.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use arbitrary::Unstructured;
use hyperty_host::{Address, Bundle, CedarPolicies, Descriptor, EnforcementPoint, Message, MessageType, Parties, Runtime};
use serde_json::{Value, json};

use crate::forger::{Forger, with_forger};
use crate::{Driver, TestBundle, guest, puppet_config, runtime};

/// A bundle manifest (TOML) parsed and checked as `Bundle::parse` does.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Bundle::parse(text, Path::new("/nonexistent/fuzz/bundle.toml"));
}

/// A Cedar policy file: checked, and when it passes, put in force for
/// `bob.example` and asked about one message from alice.example.
pub fn policies(data: &[u8]) {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"));
    let file = dir.path().join("fuzz.cedar");
    std::fs::write(&file, data).expect("the policy file is written");
    let policies = CedarPolicies::new();
    if policies.check_files(std::slice::from_ref(&file)).is_err() || policies.set_domain_policies("bob.example", &[file]).is_err() {
        return;
    }
    let (from, to) = (Address::parse("hyperty://alice.example/a").unwrap(), Address::parse("hyperty://bob.example/b").unwrap());
    let msg = Message::new(1, MessageType::Update, from, to, Some("{\"x\":1}".into()));
    let sender = Descriptor { domain: "alice.example".into(), name: "a".into(), user: Some("alice@idp.example".into()) };
    let target = Descriptor { domain: "bob.example".into(), name: "b".into(), user: None };
    let parties = Parties { sender: Some(&sender), target: Some(&target) };
    let _ = policies.decide_uncached(EnforcementPoint::Incoming, "bob.example", &msg, parties);
}

/// A message alice.example/a sends (or requests, with a timeout) through its
/// `bus` import: type, id, from, to and body all from the bytes.
/// The puppet's answer: `{"ok": true}` or `{"error": "<the bus's refusal>"}`.
pub fn guest_message(data: &[u8]) -> Option<Value> {
    let mut u = Unstructured::new(data);
    let message = arbitrary_message(&mut u).ok()?;
    let request = u.arbitrary::<bool>().unwrap_or(false);
    let command = json!({ "op": if request { "request" } else { "send" }, "message": message, "timeout_ms": 50 });
    Some(World::get().command(&World::get().a, command))
}

/// A protostub envelope (any text) posted into the host by the protostub of
/// bob.example. What the host's `post` returned: `ok` or its refusal.
pub fn envelope(data: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(data).ok()?;
    let world = World::get();
    let result = world.forger.lock().unwrap().post(Value::String(text.to_owned()), None);
    world.settle();
    Some(result)
}

/// An identity assertion (its IdP name and token from the bytes) on a
/// request from carol.example to bob.example/b, which requires identity:
/// bob.example's `idp-jwt` proxy validates it. The answer's code.
pub fn assertion(data: &[u8]) -> Option<u16> {
    let mut u = Unstructured::new(data);
    let (idp, token) = (u.arbitrary::<bool>().ok()?, u.arbitrary::<&str>().ok()?);
    let world = World::get();
    // One request at a time: concurrent callers would take each other's answers.
    let carol = world.carol.lock().unwrap();
    let mut m = Message::new(0, MessageType::Read, carol.address().clone(), world.b.clone(), None);
    m.id = carol.next_id();
    m.assertion = Some(hyperty_host::Assertion { idp: if idp { IDP.into() } else { token.chars().take(8).collect::<String>().into() }, token: token.into() });
    carol.request(m, None).ok()?;
    carol.recv_timeout(Duration::from_secs(30)).expect("an answer to every request").body.code
}

/// A JSON Patch (RFC 6902) document alice.example/a applies to its data
/// object (when the bytes are JSON at all; the puppet passes the value on).
/// The puppet's answer: `{"version": n}` or `{"error": "<the syncher's refusal>"}`.
pub fn patch(data: &[u8]) -> Option<Value> {
    let patch = serde_json::from_slice::<Value>(data).ok()?;
    let world = World::get();
    // Each input starts from the same data, so a failing input fails again
    // on its own.
    let reset = json!([{ "op": "replace", "path": "", "value": initial_data() }]);
    let reset = world.command(&world.a, json!({ "op": "update", "url": world.object, "patch": reset }));
    assert!(reset["version"].is_u64(), "the data object is reset: {reset}");
    Some(world.command(&world.a, json!({ "op": "update", "url": world.object, "patch": patch })))
}

/// The data object's data before each `patch` input.
fn initial_data() -> Value {
    json!({ "n": 0, "list": [1, 2, 3], "deep": { "a": { "b": [true, null, "x"] } } })
}

/// Type, id, from, to and body fields of a message, as the puppet takes
/// them: the type mostly from the field's names, sometimes any string.
fn arbitrary_message(u: &mut Unstructured) -> arbitrary::Result<Value> {
    const TYPES: [&str; 10] = ["create", "read", "update", "delete", "subscribe", "unsubscribe", "response", "forward", "execute", "bogus"];
    let kind = match u.int_in_range(0..=10)? {
        10 => u.arbitrary::<String>()?,
        i => TYPES[i as usize].to_owned(),
    };
    let to = match u.int_in_range(0..=3)? {
        0 => "hyperty://bob.example/b".to_owned(),
        1 => "hyperty://bob.example/remote".to_owned(),
        2 => format!("hyperty://bob.example/{}", u.arbitrary::<&str>()?),
        _ => u.arbitrary::<String>()?,
    };
    let from = if u.arbitrary::<bool>()? { String::new() } else { u.arbitrary::<String>()? };
    Ok(json!({
        "id": u.arbitrary::<u64>()?,
        "type": kind,
        "from": from,
        "to": to,
        "code": u.arbitrary::<Option<u16>>()?,
        "resource": u.arbitrary::<Option<String>>()?,
        "value": u.arbitrary::<Option<String>>()?,
        "description": u.arbitrary::<Option<String>>()?,
    }))
}

/// The IdP of alice.example and bob.example, and its proxy's signing seed.
const IDP: &str = "idp.example";
const IDP_KEY: [u8; 32] = [23; 32];

/// One runtime for the targets that need one: the puppet alice.example/a
/// (alice@idp.example, owning the data object `object`), the echoing puppet
/// bob.example/b (requiring identity, validated by idp.example's `idp-jwt`
/// proxy), `forging-stub` as bob.example's protostub (what comes in through
/// a stub reaches only its own domain's addresses), and the embedder
/// endpoints that drive them.
pub struct World {
    runtime: Runtime,
    driver: Mutex<Driver>,
    /// Its reports come asserted, as bob.example requires identity.
    forger: Mutex<Forger>,
    carol: Mutex<hyperty_host::Endpoint>,
    a: Address,
    b: Address,
    object: String,
    _bundle: TestBundle,
}

impl World {
    /// The world, deployed on first use.
    pub fn get() -> &'static World {
        static WORLD: OnceLock<World> = OnceLock::new();
        WORLD.get_or_init(World::new)
    }

    fn new() -> World {
        let runtime = runtime(Duration::from_secs(2));
        let mut driver = Driver::new(&runtime);
        let bundle = TestBundle::new()
            .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
            .hyperty("bob.example", "b", &guest("puppet"), puppet_config(true))
            .user("alice.example", "a", "alice@idp.example")
            .idp(IDP, IDP_KEY, &["alice.example", "bob.example"])
            .domain("alice.example", json!({ "require-identity": false }));
        // Valid for as long as a fuzzing run may go.
        let token = crate::jwt(IDP_KEY, IDP, "forger@idp.example", crate::unix_now() + 90 * 24 * 3600);
        let bundle = with_forger(bundle, "bob.example", Some(json!({ "idp": IDP, "token": token })));
        runtime.deploy(&bundle.load()).expect("the fuzz world deploys");
        let a = runtime.lookup("alice.example", "a").unwrap();
        let b = runtime.lookup("bob.example", "b").unwrap();
        let created = driver.command(&a, json!({ "op": "create", "scheme": "comm", "data": initial_data() }));
        let object = created["url"].as_str().unwrap_or_else(|| panic!("the data object is created: {created}")).to_owned();
        let carol = runtime.endpoint("hyperty://carol.example/fuzz", 16).unwrap();
        let forger = Mutex::new(Forger::new(&runtime, "bob.example"));
        World { runtime, driver: Mutex::new(driver), forger, carol: Mutex::new(carol), a, b, object, _bundle: bundle }
    }

    /// `command` to the puppet `to`, waiting for its answer, then
    /// [`settle`](World::settle); its answer.
    fn command(&self, to: &Address, command: Value) -> Value {
        let answer = self.driver.lock().unwrap().command(to, command);
        self.settle();
        answer
    }

    /// Drops the reports the puppets and the forger sent meanwhile (kept
    /// aside by the driver's endpoint, they would grow with every input)
    /// and what reached carol's endpoint.
    fn settle(&self) {
        let driver = self.driver.lock().unwrap();
        while driver.endpoint.try_recv().is_some() {}
        driver.endpoint.take_set_aside(|_| true);
        let forger = self.forger.lock().unwrap();
        while forger.reports.endpoint.try_recv().is_some() {}
        forger.reports.endpoint.take_set_aside(|_| true);
        let carol = self.carol.lock().unwrap();
        while carol.try_recv().is_some() {}
        let _ = &self.runtime;
    }
}

/// The corpus and crash inputs committed for `target`:
/// `tests/fuzz/corpus/<target>/*` and `tests/fuzz/regressions/<target>/*`.
pub fn committed_inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = crate::repo().join("tests/fuzz");
    let mut files: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(fuzz.join(kind).join(target)).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target` on mutations of its committed inputs for `duration`:
/// bit flips, random bytes, insertions and deletions, repeated ranges,
/// splices of two inputs and tokens that parsers trip on, from a fixed
/// seed (the same run every time; `HYPERTY_FUZZ_SEED` picks another).
/// Not coverage-guided: the bounded run CI can afford on the debug build.
/// Returns how many inputs ran. A failing input is printed before the run
/// (so a panic names it) when `HYPERTY_FUZZ_VERBOSE` is set.
pub fn mutate<T>(target: &str, run: fn(&[u8]) -> T, duration: Duration) -> u64 {
    let corpus: Vec<Vec<u8>> = committed_inputs(target).iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!corpus.is_empty(), "no committed input for the fuzz target {target}");
    let seed = std::env::var("HYPERTY_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x4859_5045_5254_5921u64);
    let verbose = std::env::var_os("HYPERTY_FUZZ_VERBOSE").is_some();
    let mut rng = Rng(seed | 1);
    let until = std::time::Instant::now() + duration;
    let mut runs = 0;
    while std::time::Instant::now() < until {
        let mut input = corpus[rng.below(corpus.len())].clone();
        for _ in 0..=rng.below(4) {
            mutate_once(&mut input, &corpus, &mut rng);
        }
        input.truncate(64 * 1024);
        if verbose {
            eprintln!("{target}: {:?}", String::from_utf8_lossy(&input));
        }
        run(&input);
        runs += 1;
    }
    runs
}

/// Tokens that JSON, TOML, Cedar and JWT parsers trip on.
const TOKENS: &[&[u8]] = &[
    b"{", b"}", b"[", b"]", b"\"", b"\\", b"\\u0000", b"\\ud800", b",", b":", b"=", b"\n", b"\0", b"null", b"-0", b"1e999",
    b"18446744073709551616", b"-9223372036854775809", b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", b"{\"a\":{\"a\":{\"a\":",
    b"/~1/~0/-", b"\"op\":\"move\"", b"\"path\":\"\"", b"\xe2\x80\xae", b"\xff\xfe", b"hyperty://", b"..", b"permit(", b"forbid(",
    b"when {", b"unless {", b"@id(\"", b"[[hyperties]]", b"[domains.\"", b"eyJ", b".", b"==",
];

fn mutate_once(input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
    let at = |rng: &mut Rng, len: usize| rng.below(len + 1);
    match rng.below(7) {
        0 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] ^= 1 << rng.below(8);
        }
        1 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] = rng.next() as u8;
        }
        2 => {
            let i = at(rng, input.len());
            let token = TOKENS[rng.below(TOKENS.len())];
            input.splice(i..i, token.iter().copied());
        }
        3 if !input.is_empty() => {
            let i = rng.below(input.len());
            let n = rng.below((input.len() - i).min(64)) + 1;
            input.drain(i..i + n);
        }
        4 if !input.is_empty() => {
            let i = rng.below(input.len());
            let n = rng.below((input.len() - i).min(256)) + 1;
            let copy: Vec<u8> = input[i..i + n].to_vec();
            let j = at(rng, input.len());
            for _ in 0..=rng.below(8) {
                input.splice(j..j, copy.iter().copied());
            }
        }
        5 => {
            let other = &corpus[rng.below(corpus.len())];
            let (i, j) = (at(rng, input.len()), at(rng, other.len()));
            input.truncate(i);
            input.extend_from_slice(&other[j..]);
        }
        _ => {
            let i = at(rng, input.len());
            let n = rng.below(16) + 1;
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            input.splice(i..i, bytes);
        }
    }
}

/// xorshift64*: a fixed, dependency-free sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
