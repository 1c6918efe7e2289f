//! The soak (issue #19): millions of cross-domain messages from a hyperty in
//! alice.example to one in bob.example, with Cedar policies on both domains
//! and the bus and with identity on (an IdP proxy asserts the sender's user
//! on every message), either through one runtime's bus or between two
//! runtimes through a real nats-server. The sink (`guests/bench`, role
//! `sink`) keeps the ledger: every message counted, every gap, repeat or
//! reordering in the driver's numbering counted as an anomaly, and how many
//! carried the sender's identity.

use std::cell::Cell;
use std::time::Duration;

use hyperty_host::{Address, CedarPolicies, Endpoint, Message, MessageType, Runtime, RuntimeConfig};
use serde_json::{Value, json};

use crate::{TestBundle, cache_dir, guest};

/// The IdP of both domains, and the ed25519 seed its proxy signs with.
const IDP: &str = "idp.example";
const IDP_KEY: [u8; 32] = [19; 32];

/// What the sink counted since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ledger {
    /// Messages it received (notifications and the batch-closing requests).
    pub received: u64,
    /// Messages whose id was neither the previous one + 1 nor 1 (a new run):
    /// lost, duplicated or reordered.
    pub anomalies: u64,
    /// Messages that carried the sender's identity.
    pub identified: u64,
}

/// A driver hyperty in alice.example and a sink in bob.example, and the
/// harness endpoint that commands them.
pub struct Soak {
    runtimes: Vec<Runtime>,
    harness: Endpoint,
    driver: Address,
    sink: Address,
    next_id: Cell<u64>,
    _bundles: Vec<TestBundle>,
}

impl Soak {
    /// Both hyperties in one runtime: the path is the bus alone.
    pub fn in_process() -> Soak {
        let (runtime, policies) = checked_runtime();
        let bundle = with_policies(
            TestBundle::new()
                .hyperty("alice.example", "driver", &guest("bench"), json!({ "role": "driver" }))
                .hyperty("bob.example", "sink", &guest("bench"), json!({ "role": "sink" }))
                .user("alice.example", "driver", "user0@idp.example")
                .user("bob.example", "sink", "user1@idp.example")
                .idp(IDP, IDP_KEY, &["alice.example", "bob.example"]),
            &policies,
            &["alice.example", "bob.example"],
        );
        runtime.deploy(&bundle.load()).expect("the soak bundle deploys");
        let driver = runtime.lookup("alice.example", "driver").unwrap();
        let sink = runtime.lookup("bob.example", "sink").unwrap();
        let harness = runtime.endpoint("hyperty://bench.example/harness", 16).unwrap();
        Soak { runtimes: vec![runtime], harness, driver, sink, next_id: Cell::new(0), _bundles: vec![bundle] }
    }

    /// The driver in one runtime, the sink in another, each with the NATS
    /// protostubs of every domain connected to `servers`; the receiving
    /// runtime validates alice's assertions with the IdP's public key only
    /// (the verifier is bob.example's IdP there).
    pub fn through_nats(servers: &[String]) -> Soak {
        let stubs = |mut b: TestBundle| {
            for d in ["alice.example", "bob.example", "bench.example"] {
                b = b.protostub(d, servers, json!({ "queue": 100_000 }));
            }
            b
        };
        let (r1, p1) = checked_runtime();
        let (r2, p2) = checked_runtime();
        let b1 = with_policies(
            stubs(TestBundle::new().hyperty("alice.example", "driver", &guest("bench"), json!({ "role": "driver" })))
                .user("alice.example", "driver", "user0@idp.example")
                .idp(IDP, IDP_KEY, &["alice.example"]),
            &p1,
            &["alice.example"],
        );
        let b2 = with_policies(
            // The sink has no user here: this runtime cannot sign for idp.example.
            stubs(TestBundle::new().hyperty("bob.example", "sink", &guest("bench"), json!({ "role": "sink" })))
                .idp_verifier(IDP, IDP_KEY, &["bob.example"]),
            &p2,
            &["bob.example"],
        );
        r1.deploy(&b1.load()).expect("the sending runtime deploys");
        r2.deploy(&b2.load()).expect("the receiving runtime deploys");
        let driver = r1.lookup("alice.example", "driver").unwrap();
        let sink = r2.lookup("bob.example", "sink").unwrap();
        let harness = r1.endpoint("hyperty://bench.example/harness", 1024).unwrap();
        let soak = Soak { runtimes: vec![r1, r2], harness, driver, sink, next_id: Cell::new(0), _bundles: vec![b1, b2] };
        // Until both stubs are connected and subscribed, the ledger request
        // is answered 503 or 408: ask until the sink answers.
        crate::wait_until("the sink answers through NATS", || {
            soak.ask(&soak.sink, json!({}), Duration::from_secs(5)).is_some_and(|a| a.body.code == Some(200))
        });
        soak
    }

    /// Has the driver send `count` messages to the sink (batches of 64, each
    /// closed by a request whose answer releases the next) and waits until
    /// it reports them all through; panics with the driver's answer if not.
    pub fn send(&self, count: u64) {
        let command = json!({ "to": self.sink.to_string(), "count": count, "mode": "oneway", "batch": 64 });
        let answer = self.ask(&self.driver, command, Duration::from_secs(600)).expect("the driver answers within 10 minutes");
        assert_eq!(answer.body.code, Some(200), "the soak run of {count} failed: {:?}", answer.body);
    }

    /// The sink's ledger.
    pub fn ledger(&self) -> Ledger {
        let answer = self.ask(&self.sink, json!({}), Duration::from_secs(60)).expect("the sink answers");
        assert_eq!(answer.body.code, Some(200), "the sink's ledger: {:?}", answer.body);
        let value: Value = serde_json::from_str(answer.body.value.as_deref().unwrap_or("null")).unwrap();
        let field = |k: &str| value[k].as_u64().unwrap_or_else(|| panic!("no {k} in the sink's ledger {value}"));
        Ledger { received: field("received"), anomalies: field("anomalies"), identified: field("identified") }
    }

    /// Requests still waiting for an answer, in every runtime.
    pub fn pending_requests(&self) -> usize {
        self.runtimes.iter().map(Runtime::pending_requests).sum()
    }

    /// Hyperty instances deployed, in every runtime.
    pub fn hyperties(&self) -> usize {
        self.runtimes.iter().map(|r| r.hyperties().len()).sum()
    }

    /// An `execute` request to `to`, and its answer within `within`.
    fn ask(&self, to: &Address, value: Value, within: Duration) -> Option<Message> {
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        let msg = Message::new(id, MessageType::Execute, self.harness.address().clone(), to.clone(), Some(value.to_string()));
        self.harness.request(msg, None).ok()?;
        // An answer to an earlier ask that timed out may still come: skip it.
        self.harness.recv_where(|m| m.id == id, within)
    }
}

/// A runtime with its own policy set, a 60 s request timeout and the flood
/// limiter out of the way (the soak measures the path, not the limiter).
fn checked_runtime() -> (Runtime, std::sync::Arc<CedarPolicies>) {
    crate::test_log();
    let policies = std::sync::Arc::new(CedarPolicies::new());
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: cache_dir(),
        request_timeout: Duration::from_secs(60),
        policies: policies.clone(),
        ..RuntimeConfig::default()
    })
    .unwrap();
    (runtime, policies)
}

/// `bundle` with the realistic policy sets on the bus and on each of
/// `domains` (`alice.example` and/or `bob.example`), ten groups of 100
/// users, anonymous senders accepted (the harness), and the flood limiter
/// opened up (the soak measures the path, not the limiter).
fn with_policies(mut bundle: TestBundle, policies: &CedarPolicies, domains: &[&str]) -> TestBundle {
    let bus = bundle.dir().join("bus.cedar");
    std::fs::write(&bus, realistic_policies("bus")).unwrap();
    policies.set_runtime_policies(&bus).unwrap();
    for g in 0..10 {
        policies.set_group(&format!("team{g}"), (0..100).map(|u| format!("user{}@idp.example", u * 10 + g)));
    }
    for domain in domains {
        let owner = domain.split('.').next().unwrap();
        let file = bundle.dir().join(format!("{owner}.cedar"));
        std::fs::write(&file, realistic_policies(owner)).unwrap();
        let limits = json!({ "rate": 100_000_000, "burst": 1_000_000, "inbox": 65_536 });
        bundle = bundle.domain(domain, json!({ "policies": [file.to_str().unwrap()], "limits": limits, "require-identity": false }));
    }
    bundle
}

/// Policies in each domain's set of [`realistic_policies`] (the bus's has
/// the same count).
pub const POLICIES: usize = 50;

/// A realistic policy set for `owner`: permits for the bench traffic (from
/// alice.example, bob.example, the bus bench's alice<i>.example and
/// bob<i>.example, or the harness's bench.example) and
/// [`POLICIES`] rules that do not apply to it: other domains, time windows,
/// groups, schemes, forbids.
pub fn realistic_policies(owner: &str) -> String {
    let mut p = String::new();
    p.push_str(&format!(
        "@id(\"{owner}-bench\") permit (principal, action in [Rethink::Action::\"read\", Rethink::Action::\"update\", \
         Rethink::Action::\"response\", Rethink::Action::\"execute\", Rethink::Action::\"deploy\"], resource) \
         when {{ context.sender_domain like \"alice*.example\" || context.sender_domain like \"bob*.example\" || \
         context.sender_domain == \"bench.example\" }};\n"
    ));
    for i in 0..POLICIES {
        let rule = match i % 5 {
            0 => format!("forbid (principal, action, resource) when {{ context.sender_domain == \"blocked{i}.example\" }};"),
            1 => format!(
                "permit (principal, action == Rethink::Action::\"subscribe\", resource) \
                 when {{ context.sender_user in Rethink::Group::\"team{}\" && context.resource_scheme == \"comm\" }};",
                i % 10
            ),
            2 => format!(
                "forbid (principal, action == Rethink::Action::\"create\", resource) \
                 when {{ context.time.minute >= 1320 || context.time.minute < {} }};",
                300 + i
            ),
            3 => format!(
                "permit (principal, action == Rethink::Action::\"delete\", resource) \
                 when {{ context.time.weekday <= 5 && context.sender_user == Rethink::User::\"admin{i}@idp.example\" }};"
            ),
            _ => format!(
                "forbid (principal, action, resource) when {{ context.resource_type == \"type{i}\" && context.time.date < 20200101 }};"
            ),
        };
        p.push_str(&format!("@id(\"{owner}-{i}\") {rule}\n"));
    }
    p
}
