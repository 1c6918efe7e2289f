//! Cedar policies at the three enforcement points: the reTHINK vocabulary,
//! each point on its own, no bypass, prompt 403s, hot reload, groups and the
//! decision cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyperty_host::{Address, CedarPolicies, FixedClock, Runtime, RuntimeConfig};
use hyperty_tests::*;
use serde_json::json;

const OUTGOING_OPEN: &str = r#"@id("outgoing-open") permit (principal, action, resource) when { context.point == "outgoing" };
@id("deploy-open") permit (principal, action == Rethink::Action::"deploy", resource);"#;

/// Monday 2026-11-23, 12:00 UTC.
const MONDAY_NOON: i64 = 1_795_435_200;

fn at(day_offset: i64, hour: i64, minute: i64) -> i64 {
    MONDAY_NOON - 12 * 3600 + day_offset * 86_400 + hour * 3600 + minute * 60
}

struct World {
    _runtime: Runtime,
    clock: Arc<FixedClock>,
    policies: Arc<CedarPolicies>,
    driver: Driver,
    dir: tempfile::TempDir,
    a: Address,
    b: Address,
    _bundle: TestBundle,
}

/// alice.example/a (user alice@idp.example, asserted by idp.example) and
/// bob.example/b (echoing, user bob@idp.example); bob.example's policies
/// are `bob_policies`.
fn world(bob_policies: &str) -> World {
    let clock = Arc::new(FixedClock::new(MONDAY_NOON));
    let policies = Arc::new(CedarPolicies::with_clock(clock.clone()));
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: cache_dir(),
        request_timeout: Duration::from_secs(60),
        policies: policies.clone(),
        ..hyperty_tests::engines::config()
    })
    .unwrap();
    let driver = Driver::new(&runtime);
    let dir = tempfile::tempdir().unwrap();
    // bob.example's own traffic out is open; the test's policies judge
    // what comes in.
    let bob_file = write(dir.path(), "bob.cedar", &format!("{OUTGOING_OPEN}\n{bob_policies}"));
    let bundle = TestBundle::new()
        .hyperty("alice.example", "a", &guest("puppet"), puppet_config(false))
        .hyperty("bob.example", "b", &guest("puppet"), puppet_config(true))
        .user("alice.example", "a", "alice@idp.example")
        .user("bob.example", "b", "bob@idp.example")
        // alice's identity reaches bob.example as an assertion of
        // idp.example, which is what the policies read; the observer drives
        // a anonymously, so alice.example accepts that.
        .idp("idp.example", [7; 32], &["alice.example"])
        .domain("alice.example", json!({ "require-identity": false }))
        .domain("bob.example", json!({ "policies": [bob_file.to_str().unwrap()] }));
    runtime.deploy(&bundle.load()).expect("deploys with valid policies");
    let a = runtime.lookup("alice.example", "a").unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    World { _runtime: runtime, clock, policies, driver, dir, a, b, _bundle: bundle }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

impl World {
    /// a sends a `kind` request (with `resource`) to `to`; the code it gets
    /// back and the description.
    fn send_as_a(&mut self, kind: &str, to: &Address, resource: Option<&str>) -> (u16, String) {
        let id = self.driver.fresh_id();
        let cmd = json!({ "op": "request", "message": { "id": id, "type": kind, "to": to.to_string(), "resource": resource } });
        assert_eq!(self.driver.command(&self.a.clone(), cmd), json!({ "ok": true }));
        let answer = self.driver.report(&self.a.clone(), |m| m["type"] == "response" && m["id"] == id);
        (answer["code"].as_u64().unwrap() as u16, answer["description"].as_str().unwrap_or("").to_owned())
    }

    fn read(&mut self) -> u16 {
        let b = self.b.clone();
        self.send_as_a("read", &b, None).0
    }
}

fn permitted(w: &mut World) -> bool {
    match w.read() {
        200 => true,
        403 => false,
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn sender_user() {
    let mut w = world(r#"permit (principal, action, resource) when { context.sender_user == Rethink::User::"alice@idp.example" };"#);
    assert!(permitted(&mut w));
    let mut w = world(r#"permit (principal, action, resource) when { context.sender_user == Rethink::User::"carol@idp.example" };"#);
    assert!(!permitted(&mut w));
}

#[test]
fn sender_domain() {
    let mut w = world(r#"permit (principal, action, resource) when { context.sender_domain == "alice.example" };"#);
    assert!(permitted(&mut w));
    let mut w = world(r#"permit (principal, action, resource) when { context.sender_domain == "carol.example" };"#);
    assert!(!permitted(&mut w));
}

#[test]
fn target_hyperty_by_name() {
    let mut w = world(r#"permit (principal, action, resource) when { context.target_name == "b" };"#);
    assert!(permitted(&mut w));
    let mut w = world(r#"permit (principal, action, resource) when { context.target_name == "c" };"#);
    assert!(!permitted(&mut w));
}

#[test]
fn message_type() {
    let mut w = world(r#"permit (principal, action == Rethink::Action::"read", resource);"#);
    let b = w.b.clone();
    assert_eq!(w.send_as_a("read", &b, None).0, 200);
    assert_eq!(w.send_as_a("update", &b, None).0, 403);
}

#[test]
fn data_object_scheme_and_resource_type() {
    let mut w = world(
        r#"permit (principal, action, resource) when { context.resource_scheme == "comm" && context.resource_type == "chat" };"#,
    );
    let b = w.b.clone();
    assert_eq!(w.send_as_a("read", &b, Some("comm://alice.example/room-1#chat")).0, 200);
    assert_eq!(w.send_as_a("read", &b, Some("comm://alice.example/room-1#video")).0, 403);
    assert_eq!(w.send_as_a("read", &b, Some("connection://alice.example/c#chat")).0, 403);
}

#[test]
fn date() {
    let mut w = world(r#"permit (principal, action, resource) when { context.time.date >= 20261201 };"#);
    assert!(!permitted(&mut w), "23 November is before 1 December");
    w.clock.set(at(8, 12, 0)); // 2026-12-01
    assert!(permitted(&mut w));
}

#[test]
fn weekday() {
    let mut w = world(r#"permit (principal, action, resource) when { context.time.weekday <= 5 };"#);
    assert!(permitted(&mut w), "Monday");
    w.clock.set(at(6, 12, 0)); // Sunday
    assert!(!permitted(&mut w));
}

#[test]
fn time_window_that_wraps_midnight() {
    let mut w = world(
        r#"@id("night-only")
        permit (principal, action, resource) when { context.time.minute >= 1320 || context.time.minute < 360 };"#,
    );
    for (hour, minute, open) in [(12, 0, false), (21, 59, false), (22, 0, true), (23, 30, true), (2, 0, true), (5, 59, true), (6, 0, false)] {
        w.clock.set(at(0, hour, minute));
        assert_eq!(permitted(&mut w), open, "{hour:02}:{minute:02}");
    }
}

#[test]
fn named_groups_change_at_run_time_without_reloading_policies() {
    let mut w = world(r#"permit (principal, action, resource) when { context.sender_user in Rethink::Group::"friends" };"#);
    assert!(!permitted(&mut w));
    w.policies.add_member("friends", "alice@idp.example");
    assert!(permitted(&mut w), "takes effect on the next message");
    w.policies.remove_member("friends", "alice@idp.example");
    assert!(!permitted(&mut w));
    // Through a groups file, as `hyperty group` edits it.
    let groups = write(w.dir.path(), "groups.toml", "friends = [\"alice@idp.example\"]\n");
    w.policies.set_groups_file(&groups).unwrap();
    assert!(permitted(&mut w));
    let cache = cache_dir();
    let code = hyperty_host::cli::main_with_args([
        "hyperty",
        "--cache-dir",
        cache.to_str().unwrap(),
        "group",
        "remove",
        groups.to_str().unwrap(),
        "friends",
        "alice@idp.example",
    ]);
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    w.policies.reload().unwrap();
    assert!(!permitted(&mut w));
}

#[test]
fn subscription_pre_authorisation() {
    let mut w = world(
        r#"@id("room-42-subscribers")
        permit (principal, action == Rethink::Action::"subscribe", resource)
        when { context.resource == "comm://bob.example/room-42" && context.sender_user in Rethink::Group::"room-42-invited" };"#,
    );
    let b = w.b.clone();
    assert_eq!(w.send_as_a("subscribe", &b, Some("comm://bob.example/room-42")).0, 403);
    w.policies.add_member("room-42-invited", "alice@idp.example");
    assert_eq!(w.send_as_a("subscribe", &b, Some("comm://bob.example/room-42")).0, 200);
    assert_eq!(w.send_as_a("subscribe", &b, Some("comm://bob.example/room-43")).0, 403);
}

#[test]
fn forbid_overrides_permit() {
    let mut w = world(
        r#"@id("open") permit (principal, action, resource);
        @id("no-updates") forbid (principal, action == Rethink::Action::"update", resource);"#,
    );
    let b = w.b.clone();
    assert_eq!(w.send_as_a("read", &b, None).0, 200);
    let (code, why) = w.send_as_a("update", &b, None);
    assert_eq!(code, 403);
    assert!(why.contains("[no-updates]"), "{why}");
}

#[test]
fn each_point_denies_on_its_own_and_names_itself_and_the_policy() {
    let open = r#"permit (principal, action, resource);"#;
    // incoming (bob.example)
    let mut w = world(r#"@id("bob-closed") forbid (principal, action, resource) when { context.point == "incoming" };"#);
    let (code, why) = w.send_as_a("read", &w.b.clone(), None);
    assert_eq!(code, 403);
    assert!(why.contains("incoming enforcement point of bob.example") && why.contains("[bob-closed]"), "{why}");
    // outgoing (alice.example)
    let mut w = world(open);
    let alice = write(w.dir.path(), "alice.cedar", r#"@id("alice-open") permit (principal, action, resource);
        @id("alice-mute") forbid (principal, action == Rethink::Action::"read", resource) when { context.point == "outgoing" };"#);
    w.policies.set_domain_policies("alice.example", &[alice]).unwrap();
    let (code, why) = w.send_as_a("read", &w.b.clone(), None);
    assert_eq!(code, 403);
    assert!(why.contains("outgoing enforcement point of alice.example") && why.contains("[alice-mute]"), "{why}");
    // bus access (the runtime's own)
    let mut w = world(open);
    let runtime_file = write(w.dir.path(), "runtime.cedar", r#"@id("bus-open") permit (principal, action, resource);
        @id("no-execute-at-bob") forbid (principal, action == Rethink::Action::"execute", resource)
        when { context.target_domain == "bob.example" };"#);
    w.policies.set_runtime_policies(&runtime_file).unwrap();
    let (code, why) = w.send_as_a("execute", &w.b.clone(), None);
    assert_eq!(code, 403);
    assert!(why.contains("bus-access enforcement point of localhost") && why.contains("[no-execute-at-bob]"), "{why}");
    assert_eq!(w.send_as_a("read", &w.b.clone(), None).0, 200);
}

#[test]
fn no_message_type_bypasses_enforcement_and_403_is_prompt() {
    let mut w = world(r#"@id("closed") forbid (principal, action, resource) when { context.point == "incoming" };"#);
    let b = w.b.clone();
    for kind in ["create", "read", "update", "delete", "subscribe", "unsubscribe", "forward", "execute", "response"] {
        // `request` for all but response, which is sent as a notification.
        let id = w.driver.fresh_id();
        let op = if kind == "response" { "send" } else { "request" };
        let cmd = json!({ "op": op, "message": { "id": id, "type": kind, "to": b.to_string() } });
        assert_eq!(w.driver.command(&w.a.clone(), cmd), json!({ "ok": true }));
        // The request timeout is 60 s: a 403 must come long before.
        let answer = w.driver.find(|m| m.from == w.a && m.kind == hyperty_host::MessageType::Forward && {
            let r = reported(m);
            r["id"] == id && r["type"] == "response"
        }, Duration::from_secs(10)).unwrap_or_else(|| panic!("no prompt answer for {kind}"));
        assert_eq!(reported(&answer)["code"], 403, "{kind}");
    }
    assert!(w.driver.find(|m| m.from == b, Duration::from_millis(200)).is_none(), "nothing reached b");
}

#[test]
fn bad_policy_file_is_reported_and_the_old_set_stays_in_force() {
    let mut w = world(r#"permit (principal, action == Rethink::Action::"read", resource);"#);
    assert!(permitted(&mut w));
    let bob_file = w.dir.path().join("bob.cedar");
    // A syntax error on line 2.
    std::fs::write(&bob_file, "// all closed\nforbid (principal, action resource);\n").unwrap();
    let err = w.policies.reload().unwrap_err();
    let p = &err.problems[0];
    assert_eq!((p.file.as_path(), p.line), (bob_file.as_path(), Some(2)), "{err}");
    assert!(permitted(&mut w), "the old policies are still in force");
    // A schema error (no such attribute) is refused the same way.
    std::fs::write(&bob_file, "permit (principal, action, resource)\n  when { context.no_such_thing == 1 };\n").unwrap();
    let err = w.policies.reload().unwrap_err().to_string();
    assert!(err.contains("bob.cedar") && err.contains("no_such_thing"), "{err}");
    assert!(permitted(&mut w));
    // A good file replaces the set at once.
    std::fs::write(&bob_file, format!("{OUTGOING_OPEN}\nforbid (principal, action, resource) when {{ context.point == \"incoming\" }};\n")).unwrap();
    w.policies.reload().unwrap();
    assert!(!permitted(&mut w), "a cached decision is not reused after a reload");
}

#[test]
fn a_bundle_with_a_bad_policy_file_is_refused_with_file_and_line() {
    let runtime = runtime(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "carol.cedar", "permit (principal, action, resource);\npermit (principal, action, resource) when { true && 1 };\n");
    let bundle = TestBundle::new()
        .hyperty("carol.example", "c", &guest("puppet"), puppet_config(false))
        .domain("carol.example", json!({ "policies": [bad.to_str().unwrap()] }));
    let err = runtime.deploy(&bundle.load()).unwrap_err();
    assert!(err.problems.iter().any(|p| p.file == bad && p.line == Some(2)), "{err}");
    assert!(runtime.lookup("carol.example", "c").is_none());
}

#[test]
fn cached_decision_is_not_reused_across_a_time_window_boundary() {
    let mut w = world(r#"permit (principal, action, resource) when { context.time.minute >= 1320 || context.time.minute < 360 };"#);
    w.clock.set(at(1, 5, 59));
    assert!(permitted(&mut w));
    assert!(permitted(&mut w), "cached");
    w.clock.set(at(1, 6, 0));
    assert!(!permitted(&mut w));
}

#[test]
fn policies_reload_when_their_file_changes() {
    let mut w = world(r#"permit (principal, action, resource);"#);
    w.policies.watch(Duration::from_millis(20));
    assert!(permitted(&mut w));
    let bob_file = w.dir.path().join("bob.cedar");
    // Written at once, and its modification time put back as a coarse
    // clock would leave it: the watcher sees the new content all the same.
    let modified = std::fs::metadata(&bob_file).unwrap().modified().unwrap();
    std::fs::write(&bob_file, format!("{OUTGOING_OPEN}\nforbid (principal, action, resource) when {{ context.point == \"incoming\" }};\n")).unwrap();
    std::fs::File::options().write(true).open(&bob_file).unwrap().set_modified(modified).unwrap();
    wait_until("the file change is picked up", || !permitted(&mut w));
}

#[test]
fn deploy_is_an_action_the_domain_policies_decide() {
    let w = world(
        r#"@id("open") permit (principal, action, resource);
        @id("no-intruders") forbid (principal, action == Rethink::Action::"deploy", resource) when { context.target_name == "intruder" };"#,
    );
    let bob_file = w.dir.path().join("bob.cedar");
    let add = |name: &str| {
        TestBundle::new()
            .hyperty("bob.example", name, &guest("puppet"), puppet_config(false))
            .domain("bob.example", json!({ "policies": [bob_file.to_str().unwrap()] }))
    };
    let err = w._runtime.deploy(&add("intruder").load()).unwrap_err().to_string();
    assert!(err.contains("deployment not permitted") && err.contains("[no-intruders]"), "{err}");
    assert!(w._runtime.lookup("bob.example", "intruder").is_none());
    w._runtime.deploy(&add("friend").load()).expect("others may deploy");
}

#[test]
fn entity_types_follow_the_address_scheme() {
    let mut w = world(r#"permit (principal is Rethink::Hyperty, action, resource is Rethink::Hyperty);"#);
    assert!(permitted(&mut w));
    let mut w = world(r#"permit (principal, action, resource is Rethink::DataObject);"#);
    assert!(!permitted(&mut w), "b is a hyperty, not a data object");
}

/// `permit ... when { ((( ... true ... ))) };`, `n` deep: Cedar's parser
/// recursed on it until the stack overflowed (150 was enough).
fn deep_policy(n: usize) -> String {
    format!("permit (principal, action, resource) when {{ {}true{} }};\n", "(".repeat(n), ")".repeat(n))
}

#[test]
fn a_deep_policy_written_while_watched_is_refused_and_the_policies_in_force_stay() {
    let mut w = world(r#"permit (principal, action, resource);"#);
    w.policies.watch(Duration::from_millis(20));
    assert!(permitted(&mut w));
    let bob_file = w.dir.path().join("bob.cedar");
    std::fs::write(&bob_file, format!("{OUTGOING_OPEN}\n{}", deep_policy(150))).unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        if let Some(refused) = w.policies.refused() {
            break refused;
        }
        assert!(std::time::Instant::now() < until, "the deep file was not read");
        std::thread::sleep(Duration::from_millis(20));
    };
    let p = &refused.problems[0];
    assert_eq!((p.file.as_path(), p.line), (bob_file.as_path(), Some(3)), "{refused}");
    assert!(p.message.contains("too deep"), "{refused}");
    assert!(permitted(&mut w), "the policies in force stay, and the runtime runs");
    // The watch goes on: a good file is still picked up.
    std::fs::write(&bob_file, format!("{OUTGOING_OPEN}\nforbid (principal, action, resource) when {{ context.point == \"incoming\" }};\n")).unwrap();
    while permitted(&mut w) {
        assert!(std::time::Instant::now() < until + Duration::from_secs(10), "the good file was not picked up");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(w.policies.refused().is_none());
}

#[test]
fn check_refuses_a_deep_policy_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let deep = write(dir.path(), "carol.cedar", &format!("permit (principal, action, resource);\n{}", deep_policy(150)));
    let bundle = TestBundle::new()
        .hyperty("carol.example", "c", &guest("puppet"), puppet_config(false))
        .domain("carol.example", json!({ "policies": [deep.to_str().unwrap()] }));
    let config = RuntimeConfig { cache_dir: cache_dir(), ..hyperty_tests::engines::config() };
    let err = hyperty_host::runtime::check_file(&bundle.write(), config).unwrap_err();
    assert!(err.problems.iter().any(|p| p.file == deep && p.line == Some(2) && p.message.contains("too deep")), "{err}");
}

#[test]
fn a_schema_error_is_listed_once_named_by_file_and_line() {
    let runtime = runtime(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "carol.cedar",
        "permit (principal, action, resource);\n\npermit (principal, action, resource)\n  when { context.no_such_thing == 1 };\n",
    );
    let bundle = TestBundle::new()
        .hyperty("carol.example", "c", &guest("puppet"), puppet_config(false))
        .domain("carol.example", json!({ "policies": [bad.to_str().unwrap()] }));
    let err = runtime.deploy(&bundle.load()).unwrap_err();
    assert_eq!(err.problems.len(), 1, "one problem, not one per action: {err}");
    let shown = err.problems[0].to_string();
    // At the line of the fault, in the policy that starts on line 3.
    assert_eq!((err.problems[0].file.as_path(), err.problems[0].line), (bad.as_path(), Some(4)), "{shown}");
    assert!(shown.contains("no_such_thing"), "{shown}");
    assert!(!shown.contains("policy1") && !shown.contains("policy0"), "named by file and line: {shown}");
    assert_eq!(shown.matches("carol.cedar:").count(), 1, "file:line once: {shown}");
}

#[test]
fn a_decision_is_not_reused_for_another_hyperty_at_the_same_address() {
    // Policies read the receiver's name (`target_name`): a hyperty at a
    // fixed address replaced by one of another name must be decided anew.
    let runtime = runtime(Duration::from_secs(30));
    let mut driver = Driver::new(&runtime);
    let dir = tempfile::tempdir().unwrap();
    let policies = format!("{OUTGOING_OPEN}\n@id(\"not-beta\") permit (principal, action, resource) when {{ context.target_name != \"beta\" }};");
    let file = write(dir.path(), "bob.cedar", &policies);
    let fixed = "hyperty://bob.example/fixed";
    let with = |name: &str| {
        TestBundle::new()
            .hyperty("bob.example", name, &guest("puppet"), puppet_config(true))
            .set("bob.example", name, "address", json!(fixed))
            .domain("bob.example", json!({ "policies": [file.to_str().unwrap()] }))
    };
    let to = Address::parse(fixed).unwrap();
    let alpha = with("alpha");
    runtime.deploy(&alpha.load()).unwrap();
    assert_eq!(driver.read(&to).body.code, Some(200), "alpha is permitted");
    // alpha goes (its address is free again), then beta comes to it.
    assert!(runtime.undeploy("bob.example", "alpha"));
    let beta = with("beta");
    runtime.deploy(&beta.load()).unwrap();
    assert_eq!(driver.read(&to).body.code, Some(403), "beta, at alpha's address, is not");
}
