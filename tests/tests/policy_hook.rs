//! The bus asks the policy decision point at all three enforcement points,
//! for every message type, and a denial is a prompt 403 to the sender.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyperty_host::{
    Decision, EnforcementPoint, Message, MessageType, Parties, PolicyDecisionPoint, Runtime, RuntimeConfig,
};
use hyperty_tests::*;

/// Denies a message at the point its `resource` names (`deny-outgoing`,
/// `deny-bus-access`, `deny-incoming`), and records every question.
#[derive(Default)]
struct Recorder {
    asked: Mutex<Vec<(EnforcementPoint, String, MessageType)>>,
}

impl PolicyDecisionPoint for Recorder {
    fn decide(&self, point: EnforcementPoint, domain: &str, m: &Message, _: Parties<'_>) -> Decision {
        self.asked.lock().unwrap().push((point, domain.to_owned(), m.kind));
        if m.body.resource.as_deref() == Some(&format!("deny-{point}")) {
            Decision::Deny { policies: vec![format!("test-{point}")], reason: "the test says no".into() }
        } else {
            Decision::Permit
        }
    }
}

fn setup() -> (Runtime, Arc<Recorder>, Driver, hyperty_host::Address) {
    let recorder = Arc::new(Recorder::default());
    let config = RuntimeConfig {
        cache_dir: cache_dir(),
        domain: "runtime.example".into(),
        request_timeout: Duration::from_secs(60),
        custom_policy: Some(recorder.clone()),
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::new(config).unwrap();
    let driver = Driver::new(&runtime);
    let bundle = TestBundle::new().hyperty("bob.example", "b", &guest("puppet"), puppet_config(true));
    runtime.deploy(&bundle.load()).unwrap();
    let b = runtime.lookup("bob.example", "b").unwrap();
    (runtime, recorder, driver, b)
}

#[test]
fn each_enforcement_point_can_deny_on_its_own_with_a_prompt_403() {
    let (runtime, _recorder, mut driver, b) = setup();
    for (point, domain) in [("outgoing", "app.example"), ("bus-access", "runtime.example"), ("incoming", "bob.example")] {
        let id = driver.fresh_id();
        let mut msg = Message::new(id, MessageType::Read, driver.address().clone(), b.clone(), None);
        msg.body.resource = Some(format!("deny-{point}").into());
        driver.endpoint.request(msg, None).unwrap();
        // Well before the 60 s request timeout.
        let answer = driver.find(|m| m.id == id, Duration::from_secs(10)).expect("a prompt answer");
        assert_eq!(answer.body.code, Some(403), "{point}");
        let why = answer.body.description.unwrap();
        assert!(why.contains(&format!("{point} enforcement point of {domain}")), "{why}");
        assert!(why.contains(&format!("test-{point}")), "the denying policy is named: {why}");
        // Not delivered.
        assert_eq!(driver.before_marker(&b), [], "{point}");
    }
    assert_eq!(runtime.pending_requests(), 0);
}

#[test]
fn every_message_including_responses_passes_all_three_points() {
    let (runtime, recorder, mut driver, b) = setup();
    assert_eq!(driver.read(&b).body.code, Some(200));
    assert!(runtime.wait_idle(Duration::from_secs(5)));
    let asked = recorder.asked.lock().unwrap();
    for kind in [MessageType::Read, MessageType::Response, MessageType::Forward] {
        for point in [EnforcementPoint::Outgoing, EnforcementPoint::BusAccess, EnforcementPoint::Incoming] {
            assert!(asked.iter().any(|(p, _, k)| *p == point && *k == kind), "{kind:?} skipped {point}");
        }
    }
    // The sender's domain out, the runtime's for bus access, the receiver's in.
    assert!(asked.contains(&(EnforcementPoint::Outgoing, "bob.example".into(), MessageType::Response)));
    assert!(asked.contains(&(EnforcementPoint::BusAccess, "runtime.example".into(), MessageType::Response)));
    assert!(asked.contains(&(EnforcementPoint::Incoming, "app.example".into(), MessageType::Response)));
}
